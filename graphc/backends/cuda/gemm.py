"""The GEMM kernels' bodies (codegen.py adds the signature, the batch index and the
operands' base offsets a0, b0, c0).

Both stage tiles of A and B in shared memory between two __syncthreads per
step of depth TILE; out-of-range elements load as 0, so any M, N, K works.
`atomic`: C += the product with atomicAdd (batched GEMMs that sum into one C).
"""
from __future__ import annotations

from .cexpr import const, ctype

TILE = 16    # tile edge and depth; blocks of TILE x TILE threads
BIG = 64     # GEMMs with M, N >= BIG use BIG x BIG tiles, a 4x4 register block per thread


def small_tile_lines(g, atomic=False):
    """16x16 tiles of A and B in shared memory, one element of C per thread."""
    (Ab, _, ars, acs), (Bb, _, brs, bcs), (Cb, _, crs, ccs) = g.a, g.b, g.c
    dt, zero, T = ctype(Cb.dtype), const(0, Cb.dtype), TILE
    return [f"  __shared__ {dt} As[{T}][{T + 1}];", f"  __shared__ {dt} Bs[{T}][{T + 1}];",
            "  const int tx = threadIdx.x, ty = threadIdx.y;",
            f"  const long long row = (long long)blockIdx.y * {T} + ty;",
            f"  const long long col = (long long)blockIdx.x * {T} + tx;",
            f"  {dt} acc = {zero};",
            f"  for (long long k0 = 0; k0 < {g.K}LL; k0 += {T}) {{",
            "    const long long ka = k0 + tx, kb = k0 + ty;",
            f"    As[ty][tx] = (row < {g.M}LL && ka < {g.K}LL) ? "
            f"{Ab.name}[a0 + row * {ars}LL + ka * {acs}LL] : {zero};",
            f"    Bs[ty][tx] = (kb < {g.K}LL && col < {g.N}LL) ? "
            f"{Bb.name}[b0 + kb * {brs}LL + col * {bcs}LL] : {zero};",
            "    __syncthreads();",
            "#pragma unroll",
            f"    for (int kk = 0; kk < {T}; ++kk) acc += As[ty][kk] * Bs[kk][tx];",
            "    __syncthreads();", "  }",
            f"  if (row < {g.M}LL && col < {g.N}LL) {{",
            f"    {dt}* out = &{Cb.name}[c0 + row * {crs}LL + col * {ccs}LL];",
            "    atomicAdd(out, acc);" if atomic else
            f"    *out = {'*out + acc' if g.accumulate else 'acc'};", "  }"]

def big_tile_lines(g, atomic=False):
    """64x64 tiles of C per block of 16x16 threads, each thread a 4x4 register block
    (rows ty + 16 i, columns tx + 16 j: coalesced stores, conflict-free shared reads);
    A and B tiles of depth 16 are staged in shared memory, loaded along whichever
    of their axes is contiguous in memory."""
    (Ab, _, ars, acs), (Bb, _, brs, bcs), (Cb, _, crs, ccs) = g.a, g.b, g.c
    dt, zero, T, R = ctype(Cb.dtype), const(0, Cb.dtype), TILE, BIG // TILE
    # A tile (BIG rows x T deep) -> As[k][m]; B tile (T deep x BIG cols) -> Bs[k][n]
    a_km = "const int k = e % 16, m = e / 16;" if acs == 1 else \
        "const int m = e % 64, k = e / 64;"
    b_kn = "const int n = e % 64, k = e / 64;" if bcs == 1 or brs != 1 else \
        "const int k = e % 16, n = e / 16;"
    return [
        f"  __shared__ {dt} As[{T}][{BIG + 1}];",
        f"  __shared__ {dt} Bs[{T}][{BIG + 1}];",
        "  const int tx = threadIdx.x, ty = threadIdx.y, t = ty * 16 + tx;",
        f"  const long long m0 = (long long)blockIdx.y * {BIG}, n0 = (long long)blockIdx.x * {BIG};",
        f"  {dt} acc[{R}][{R}];",
        "#pragma unroll",
        f"  for (int i = 0; i < {R}; ++i)",
        "#pragma unroll",
        f"    for (int j = 0; j < {R}; ++j) acc[i][j] = {zero};",
        f"  for (long long k0 = 0; k0 < {g.K}LL; k0 += {T}) {{",
        "#pragma unroll",
        f"    for (int r = 0; r < {R}; ++r) {{",
        f"      const int e = t + {T * T} * r;",
        "      {",
        f"        {a_km}",
        "        const long long gm = m0 + m, gk = k0 + k;",
        f"        As[k][m] = (gm < {g.M}LL && gk < {g.K}LL) ? "
        f"{Ab.name}[a0 + gm * {ars}LL + gk * {acs}LL] : {zero};",
        "      }",
        "      {",
        f"        {b_kn}",
        "        const long long gk = k0 + k, gn = n0 + n;",
        f"        Bs[k][n] = (gk < {g.K}LL && gn < {g.N}LL) ? "
        f"{Bb.name}[b0 + gk * {brs}LL + gn * {bcs}LL] : {zero};",
        "      }",
        "    }",
        "    __syncthreads();",
        "#pragma unroll",
        f"    for (int kk = 0; kk < {T}; ++kk) {{",
        f"      {dt} a[{R}], b[{R}];",
        "#pragma unroll",
        f"      for (int i = 0; i < {R}; ++i) a[i] = As[kk][ty + 16 * i];",
        "#pragma unroll",
        f"      for (int j = 0; j < {R}; ++j) b[j] = Bs[kk][tx + 16 * j];",
        "#pragma unroll",
        f"      for (int i = 0; i < {R}; ++i)",
        "#pragma unroll",
        f"        for (int j = 0; j < {R}; ++j) acc[i][j] += a[i] * b[j];",
        "    }",
        "    __syncthreads();",
        "  }",
        "#pragma unroll",
        f"  for (int i = 0; i < {R}; ++i) {{",
        "    const long long row = m0 + ty + 16 * i;",
        "#pragma unroll",
        f"    for (int j = 0; j < {R}; ++j) {{",
        "      const long long col = n0 + tx + 16 * j;",
        f"      if (row < {g.M}LL && col < {g.N}LL) {{",
        f"        {dt}* out = &{Cb.name}[c0 + row * {crs}LL + col * {ccs}LL];",
        "        atomicAdd(out, acc[i][j]);" if atomic else
        f"        *out = {'*out + acc[i][j]' if g.accumulate else 'acc[i][j]'};",
        "      }",
        "    }",
        "  }"]
