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
    lines = [f"  __shared__ {dt} As[{T}][{T + 1}];", f"  __shared__ {dt} Bs[{T}][{T + 1}];",
            "  const int tx = threadIdx.x, ty = threadIdx.y;",
            f"  const long long row = (long long)blockIdx.y * {T} + ty;",
            f"  const long long col = (long long)blockIdx.x * {T} + tx;",
            f"  {dt} acc = {zero};",
            f"  for (long long k0 = 0; k0 < {g.K}LL; k0 += {T}) {{"]
    # consecutive threads (tx) walk each operand's contiguous axis: A along k unless
    # only its rows are contiguous (then As[tx][ty] = A[m0 + tx, k0 + ty]), B along n
    # unless only k is (a transposed operand: conv2d_grad_weight's columns)
    if acs != 1 and ars == 1:
        lines += [f"    {{ const long long m = (long long)blockIdx.y * {T} + tx, k = k0 + ty;",
                  f"      As[tx][ty] = (m < {g.M}LL && k < {g.K}LL) ? "
                  f"{Ab.name}[a0 + m * {ars}LL + k * {acs}LL] : {zero}; }}"]
    else:
        lines += ["    const long long ka = k0 + tx;",
                  f"    As[ty][tx] = (row < {g.M}LL && ka < {g.K}LL) ? "
                  f"{Ab.name}[a0 + row * {ars}LL + ka * {acs}LL] : {zero};"]
    if bcs != 1 and brs == 1:
        lines += [f"    {{ const long long n = (long long)blockIdx.x * {T} + ty, k = k0 + tx;",
                  f"      Bs[tx][ty] = (k < {g.K}LL && n < {g.N}LL) ? "
                  f"{Bb.name}[b0 + k * {brs}LL + n * {bcs}LL] : {zero}; }}"]
    else:
        lines += ["    const long long kb = k0 + ty;",
                  f"    Bs[ty][tx] = (kb < {g.K}LL && col < {g.N}LL) ? "
                  f"{Bb.name}[b0 + kb * {brs}LL + col * {bcs}LL] : {zero};"]
    return lines + [
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


# ---------------------------------------------------------------- wide tiles
# Large fp32 GEMMs: BM x BN tiles of C (BM, BN in {64, 128}) per block of 256
# threads, each thread an (BM/16) x (BN/16) register micro-tile, K in steps of
# WIDE_BK.  Why it beats the 64x64 tile: per k step a thread reads BM/16 + BN/16
# values from shared memory as float4s for (BM/16)(BN/16) FMAs (16 loads for 64
# FMAs at 128x128, against 8 scalar loads for 16 FMAs at 64x64), global loads are
# float4s where the operand allows, and two shared buffers let the next K-tile's
# global loads (held in registers) overlap this tile's FMAs with one barrier a step.
WIDE_BK = 8
# the wide kernels' function-scope names (codegen reserves them: a batch loop variable
# of the same name would clash)
WIDE_NAMES = ["am0", "bm0", "avec", "bvec", "cvec", "ra", "rb", "nb", "ak0", "an0", "ap0",
              "bk0", "bn0", "bp0"]
WIDE_THREADS = 256
WIDE_PAD = 4         # shared rows of BM + 4 floats: 16-byte aligned, and the transposed
#                      stores of two k-rows four apart land in different banks


def wide_tile_ok(g) -> bool:
    """The wide tile is written for float32 operands with constant strides."""
    ops = (g.a, g.b, g.c)
    return (g.K < 2 ** 31 - 2 * WIDE_BK            # int k indices
            and all(str(op[0].dtype) == "float32" for op in ops)
            and all(isinstance(s, int) for op in ops for s in op[2:]))


def wide_tile_smem(BM, BN) -> int:
    return 2 * WIDE_BK * (BM + WIDE_PAD + BN + WIDE_PAD) * 4


def _operand_loads(name, base, origin, M, K, rs, cs, rows, prefix, reg):
    """Global -> register loads of one operand's (rows x BK) tile in groups of 4 along
    its contiguous axis.  Returns (setup lines, load lines, smem store lines, vec flag).

    rows: BM (operand A, indexed [m][k]) or BN (B^T: [n][k]); rs, cs the strides of
    the row and k axes.  `along_k`: the groups run along k (cs == 1, or neither axis
    is contiguous); else along the rows (rs == 1).  Each thread's group position in
    the tile is fixed, so its pointer (`{prefix}p{r}`) and row check are computed
    once; a K-step only adds kl * cs (few live 64-bit values: no spills)."""
    BK, T = WIDE_BK, WIDE_THREADS
    along_k = cs == 1 or rs != 1
    groups = rows * BK // 4
    R = -(-groups // T)
    guard = groups % T != 0                      # BM = 64: half the threads load
    vec = (cs == 1 and (rs % 4 == 0 or M == 1)) if along_k else (cs % 4 == 0 or K == 1)
    P = prefix
    setup, lines, st = [f"float {reg}[{R}][4];"], [], []
    for r in range(R):
        e = f"(t + {T * r})"
        if along_k:
            rr, kk = f"{e} / {BK // 4}", f"({e} % {BK // 4}) * 4"
        else:
            rr, kk = f"({e} % {rows // 4}) * 4", f"{e} / {rows // 4}"
        # rows of this thread's group that are in range (0..4, all 4 along k)
        nrow = (f"({origin} + {rr} < {M}LL ? 4 : 0)" if along_k else
                f"({M}LL - ({origin} + {rr}) >= 4 ? 4 : {M}LL - ({origin} + {rr}) > 0 ? "
                f"(int)({M}LL - ({origin} + {rr})) : 0)")
        setup += [f"const int {P}k{r} = {kk};",
                  f"const int {P}n{r} = {'' if not guard else f'{e} >= {groups} ? 0 : '}{nrow};",
                  f"const float* {P}p{r} = {name} + {base} + ({P}n{r} ? "
                  f"({origin} + {rr}) * {rs}LL : 0LL) + {P}k{r} * {cs}LL;"]
        if along_k:   # 4 consecutive k of one row: in range up to K - gk
            ok = [f"{P}n{r} && gk + {q} < {K}" for q in range(4)]
            full = f"{P}n{r} && gk + 3 < {K}"
            elem = [f"{reg}[{r}][{q}] = {ok[q]} ? p[{q * cs}] : 0.0f;" for q in range(4)]
        else:         # 4 consecutive rows at one k
            ok = [f"{P}n{r} > {q} && gk < {K}" for q in range(4)]
            full = f"{P}n{r} == 4 && gk < {K}"
            elem = [f"{reg}[{r}][{q}] = {ok[q]} ? p[{q * rs}] : 0.0f;" for q in range(4)]
        body = [f"const int gk = kl + {P}k{r};",
                f"const float* p = {P}p{r} + (long long)kl * {cs}LL;"]
        if vec:
            body += [f"if ({P}vec && {full}) {{",
                     "  const float4 v = GC_LD4(p);",
                     f"  {reg}[{r}][0] = v.x; {reg}[{r}][1] = v.y; "
                     f"{reg}[{r}][2] = v.z; {reg}[{r}][3] = v.w;",
                     "} else {"] + ["  " + x for x in elem] + ["}"]
        else:
            body += elem
        lines += ["{"] + ["  " + x for x in body] + ["}"]
        # register -> shared (buffer `nb`), transposed to [k][row]
        if along_k:
            body = [f"const int {P}r = {rr};"] + [
                f"{P.upper()}s[nb][{P}k{r} + {q}][{P}r] = {reg}[{r}][{q}];" for q in range(4)]
        else:
            body = [f"const int {P}r = {rr};",
                    f"GC_ST4(&{P.upper()}s[nb][{P}k{r}][{P}r], make_float4("
                    f"{reg}[{r}][0], {reg}[{r}][1], {reg}[{r}][2], {reg}[{r}][3]));"]
        st += ([f"if ({e} < {groups}) {{"] if guard else ["{"]) + ["  " + x for x in body] + ["}"]
    return setup, lines, st, vec


def wide_min_blocks(BM, BN) -> int:
    """Blocks per SM asked of ptxas (`__launch_bounds__(256, n)`) for a wide tile.

    128x128: ptxas wants ~145 registers with the k loop fully unrolled (one block,
    8 warps, per SM); asked for two blocks (<= 128 registers) it spilled unless the
    k loop is unrolled by 2 (124 registers, no spills).  Two blocks is the default;
    GRAPHC_CUDA_GEMM_MINBLOCKS=1 selects the other for an A/B run on a GPU.  The
    smaller wide tiles use <= 105 registers: two blocks fit without asking."""
    import os
    if (BM, BN) != (128, 128):
        return 1
    v = os.environ.get(MINBLOCKS_ENV, "2").strip()
    if v not in ("1", "2"):
        raise ValueError(f"{MINBLOCKS_ENV}={v!r}: expected 1 or 2")
    return int(v)


def wide_tile_lines(g, BM, BN, atomic=False):
    """BM x BN tile of C per block of 16 x 16 threads (see WIDE_BK above).

    Thread (ty, tx) holds rows c*64 + 4ty + i and columns d*64 + 4tx + j (i, j < 4):
    its A and B values of one k are float4 reads of shared memory (a warp reads two
    A addresses, broadcast, and 16 consecutive float4s of B, conflict-free), and
    its C stores are float4s along rows.  Shared tiles are stored transposed,
    As[k][m] and Bs[k][n]; elements outside M, N, K load as 0, so every shape is
    exact.  A float4 global load is used where the operand is contiguous along the
    group's axis, its other stride a multiple of 4, the group entirely in range and
    the operand's base 16-byte aligned (checked at run time: buffers in an arena);
    otherwise four scalar loads."""
    (Ab, _, ars, acs), (Bb, _, brs, bcs), (Cb, _, crs, ccs) = g.a, g.b, g.c
    BK, TM, TN = WIDE_BK, BM // 16, BN // 16
    M, N, Kd = g.M, g.N, g.K
    # A as rows m, k; B as rows n, k (B^T): one loader for both
    adecl, aload, astore, avec = _operand_loads(Ab.name, "a0", "am0", M, Kd, ars, acs, BM, "a", "ra")
    bdecl, bload, bstore, bvec = _operand_loads(Bb.name, "b0", "bm0", N, Kd, bcs, brs, BN, "b", "rb")
    P = WIDE_PAD
    lines = [f"  __shared__ __align__(16) float As[2][{BK}][{BM + P}];",
             f"  __shared__ __align__(16) float Bs[2][{BK}][{BN + P}];",
             "  const int tx = threadIdx.x, ty = threadIdx.y, t = ty * 16 + tx;",
             f"  const long long am0 = (long long)blockIdx.y * {BM}, "
             f"bm0 = (long long)blockIdx.x * {BN};"]
    if avec:
        lines.append(f"  const bool avec = (((unsigned long long)({Ab.name} + a0)) & 15ULL) == 0;")
    if bvec:
        lines.append(f"  const bool bvec = (((unsigned long long)({Bb.name} + b0)) & 15ULL) == 0;")
    lines += ["  " + x for x in adecl + bdecl]  # after avec/bvec: none refers to them
    lines += [f"  float acc[{TM}][{TN}];",
              "#pragma unroll", f"  for (int i = 0; i < {TM}; ++i)",
              "#pragma unroll", f"    for (int j = 0; j < {TN}; ++j) acc[i][j] = 0.0f;",
              "  int nb = 0;", "  {", "    const int kl = 0;"]
    lines += ["    " + x for x in aload + bload + astore + bstore]
    lines += ["  }", "  __syncthreads();",
              f"  for (int k0 = 0; k0 < {Kd}; k0 += {BK}) {{",
              "    const int cur = nb;",
              f"    const bool more = k0 + {BK} < {Kd};",
              "    if (more) {",
              f"      const int kl = k0 + {BK};"]
    lines += ["      " + x for x in aload + bload]
    lines += ["    }",
              # two blocks per SM: unrolled by 2 (fully, ptxas spilled under 128 registers)
              "#pragma unroll" + (" 2" if wide_min_blocks(BM, BN) == 2 else ""),
              f"    for (int kk = 0; kk < {BK}; ++kk) {{",
              f"      float a[{TM}], b[{TN}];"]
    for c in range(TM // 4):
        lines += [f"      {{ const float4 v = GC_LD4(&As[cur][kk][{64 * c} + 4 * ty]);",
                  f"        a[{4 * c}] = v.x; a[{4 * c + 1}] = v.y; a[{4 * c + 2}] = v.z; "
                  f"a[{4 * c + 3}] = v.w; }}"]
    for d in range(TN // 4):
        lines += [f"      {{ const float4 v = GC_LD4(&Bs[cur][kk][{64 * d} + 4 * tx]);",
                  f"        b[{4 * d}] = v.x; b[{4 * d + 1}] = v.y; b[{4 * d + 2}] = v.z; "
                  f"b[{4 * d + 3}] = v.w; }}"]
    lines += ["#pragma unroll", f"      for (int i = 0; i < {TM}; ++i)",
              "#pragma unroll", f"        for (int j = 0; j < {TN}; ++j) acc[i][j] += a[i] * b[j];",
              "    }",
              "    if (more) {", "      nb = cur ^ 1;"]
    lines += ["      " + x for x in astore + bstore]
    lines += ["    }", "    __syncthreads();", "  }"]
    # epilogue
    cvec = ccs == 1 and crs % 4 == 0 and not atomic
    if cvec:
        lines.append(f"  const bool cvec = (((unsigned long long)({Cb.name} + c0)) & 15ULL) == 0;")
    for i in range(TM):
        row = f"am0 + {64 * (i // 4) + i % 4} + 4 * ty"
        for d in range(TN // 4):
            col = f"bm0 + {64 * d} + 4 * tx"
            lines += ["  {", f"    const long long row = {row}, col = {col};"]
            scal = []
            for q in range(4):
                v = f"acc[{i}][{4 * d + q}]"
                scal += [f"      if (row < {M}LL && col + {q} < {N}LL) {{",
                         f"        float* out = &{Cb.name}[c0 + row * {crs}LL + (col + {q}) * {ccs}LL];",
                         f"        atomicAdd(out, {v});" if atomic else
                         f"        *out = {'*out + ' if g.accumulate else ''}{v};", "      }"]
            if cvec:
                vals = ", ".join(f"acc[{i}][{4 * d + q}]" for q in range(4))
                lines += [f"    if (cvec && row < {M}LL && col + 3 < {N}LL) {{",
                          f"      float* out = &{Cb.name}[c0 + row * {crs}LL + col];"]
                if g.accumulate:
                    lines += ["      float4 o = GC_LD4(out);",
                              f"      o.x += acc[{i}][{4 * d}]; o.y += acc[{i}][{4 * d + 1}]; "
                              f"o.z += acc[{i}][{4 * d + 2}]; o.w += acc[{i}][{4 * d + 3}];",
                              "      GC_ST4(out, o);"]
                else:
                    lines.append(f"      GC_ST4(out, make_float4({vals}));")
                lines += ["    } else {"] + scal + ["    }"]
            else:
                lines += ["    {"] + scal + ["    }"]
            lines.append("  }")
    return lines


# ---------------------------------------------------------------- choice
TILE_ENV = "GRAPHC_CUDA_GEMM_TILE"
MINBLOCKS_ENV = "GRAPHC_CUDA_GEMM_MINBLOCKS"


def forced_tile():
    """GRAPHC_CUDA_GEMM_TILE: auto (default) | 16 | 64 | 128 | BMxBN (64x128, ...):
    force one GEMM tile for every GEMM (A/B comparisons on a GPU; tests)."""
    import os
    v = os.environ.get(TILE_ENV, "auto").strip().lower() or "auto"
    if v == "auto":
        return None
    if v in ("16", "64"):
        return int(v)
    parts = v.split("x")
    try:
        bm, bn = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        bm = bn = 0
    if bm in (64, 128) and bn in (64, 128):
        return (bm, bn)
    raise ValueError(f"{TILE_ENV}={v!r}: expected auto, 16, 64, 128 or BMxBN with "
                     "BM, BN in {64, 128} (e.g. 64x128)")


# relative speed of a wide tile per output (more FMAs per shared load for the larger
# ones): an unmeasured guess that only breaks ties between the tiles' padding
WIDE_SPEED = {(128, 128): 1.0, (128, 64): 0.85, (64, 128): 0.85, (64, 64): 0.7}


def choose_tile(g, nb, target_sms):
    """16 (one output per thread), 64 (64x64, 4x4 per thread) or (BM, BN) (wide).

    Automatic: a wide tile for float32 GEMMs with M, N >= 32 and K >= its depth, among
    those that still give every SM a block the one with the least padded work per
    unit of speed (the padded area ceil(M/BM) BM x ceil(N/BN) BN over WIDE_SPEED: a
    128-row tile for M = 64 would be half padding); otherwise the older rule (64x64
    where those fill the SMs, else 16x16)."""
    f = forced_tile()
    if f is not None:
        if isinstance(f, tuple) and not wide_tile_ok(g):
            return BIG
        return f
    blocks = lambda bm, bn: -(-g.M // bm) * -(-g.N // bn) * nb
    if wide_tile_ok(g) and g.K >= WIDE_BK and g.M >= 32 and g.N >= 32:
        fits = [t for t in WIDE_SPEED if blocks(*t) >= target_sms]
        if fits:
            return min(fits, key=lambda t: (blocks(*t) * t[0] * t[1] / WIDE_SPEED[t], -t[0] * t[1]))
    if g.M >= BIG and g.N >= BIG and g.K >= TILE and blocks(BIG, BIG) >= target_sms:
        return BIG
    return TILE
