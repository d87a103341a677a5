"""Lowering of the neural-network ops: conv2d and its gradients (im2col + Gemm),
pooling and its gradients, and the softmax family.

Out-of-range window positions (padding) never touch memory: indices are
clamped into the buffer and the value is replaced by the padding value with a
select, and scatters add 0 at the clamped position.  That keeps inner loops
branch-free and every access in bounds.
"""
from __future__ import annotations

from math import prod

import numpy as np

from . import ir as K
from .ir import (BOOL, INDEX, Assign, BinOp, Cast, Const, Gemm, Kernel, Load, Local, Loop, Select,
                 Store, UnOp, Var, affine, idx)
from .checks import label_checks
from .lower import _shape, rule
from .scalar import nan_max


def _clamp(e, hi):
    """min(max(e, 0), hi) on index expressions."""
    z, h = idx(0), idx(hi)
    e = Select(BinOp("lt", e, z), z, e)
    return Select(BinOp("gt", e, h), h, e)


def _inb(e, size):
    return BinOp("and", BinOp("ge", e, idx(0)), BinOp("lt", e, idx(size)))


def _band(a, b):
    return BinOp("and", a, b)


def _zero_fill(buf):
    v = Var("z")
    return [Loop(v, buf.size, [Store(buf, v, Const(0, buf.dtype))], "vector")]


# ------------------------------------------------------------------ conv2d
class _ConvGeom:
    def __init__(self, x_shape, w_shape, out_hw, attrs):
        self.N, self.C, self.H, self.W = x_shape
        self.O, self.Cg, self.kh, self.kw = w_shape
        self.OH, self.OW = out_hw
        self.sh, self.sw = attrs["stride"]
        (self.pt, _), (self.pl, _) = attrs["padding"]
        self.dh, self.dw = attrs["dilation"]
        self.G = attrs["groups"]
        self.Og = self.O // self.G
        self.P = self.OH * self.OW
        self.CKK = self.Cg * self.kh * self.kw

    @property
    def direct(self):
        """1x1, stride 1, no padding: the input image already is the column matrix."""
        return (self.kh == self.kw == 1 and self.sh == self.sw == 1 and self.pt == 0
                and self.pl == 0 and self.OH == self.H and self.OW == self.W)

    def _windows(self, n, g):
        """The loop variables (c, k, l, i, j) of a column matrix, the image element the
        column entry (c, k, l), (i, j) reads or writes (clamped into range), whether
        that element is inside the image (not padding), and the entry's index in the
        tap-major column matrix."""
        c, k, l, i, j = (Var(s) for s in "cklij")
        hi = affine([i, k], [self.sh, self.dh], -self.pt)
        wi = affine([j, l], [self.sw, self.dw], -self.pl)
        base = affine([n, g], [self.C * self.H * self.W, self.Cg * self.H * self.W])
        img = K.add(base, affine([c, _clamp(hi, self.H - 1), _clamp(wi, self.W - 1)],
                                 [self.H * self.W, self.W, 1]))
        inside = _band(_inb(hi, self.H), _inb(wi, self.W))
        col = affine([c, k, l, i, j], [self.kh * self.kw * self.P, self.kw * self.P, self.P,
                                       self.OW, 1])
        return (c, k, l, i, j), img, inside, col

    def _nest(self, order, body, vector=None):
        ext = dict(zip("cklij", (self.Cg, self.kh, self.kw, self.OH, self.OW)))
        for v in reversed(order):
            body = [Loop(v, ext[v.name], body, "vector" if v is vector else "serial")]
        return body

    def im2col(self, x, cols, n, g, pixel_major=False):
        """cols[(c, k, l), (i, j)] = x[n, g*Cg + c, i*sh + k*dh - pt, j*sw + l*dw - pl] (0 outside).

        pixel_major: store cols[(i, j), (c, k, l)] instead (the transpose), with the
        tap loops inside the pixel loops."""
        (c, k, l, i, j), src, inside, dst = self._windows(n, g)
        val = Select(inside, Load(x, src), Const(0, x.dtype))
        if pixel_major:
            dst = affine([i, j, c, k, l], [self.OW * self.CKK, self.CKK, self.kh * self.kw,
                                           self.kw, 1])
            return self._nest((i, j, c, k, l), [Store(cols, dst, val)])
        return self._nest((c, k, l, i, j), [Store(cols, dst, val)], vector=j)

    def col2im_add(self, cols, dx, n, g):
        """dx[n, g*Cg + c, hi, wi] += cols[(c, k, l), (i, j)] for in-range (hi, wi)."""
        (c, k, l, i, j), dst, inside, src = self._windows(n, g)
        val = Select(inside, Load(cols, src), Const(0, dx.dtype))
        return self._nest((c, k, l, i, j), [Store(dx, dst, BinOp("add", Load(dx, dst), val))])


def _same_dtype(lw, n, bufs):
    for b in bufs:
        if b.dtype != n.dtype:
            from ..ir.errors import NotLoweredError
            raise NotLoweredError(f"{n.op.name} with mixed dtypes (node at {n.loc})")


@rule("conv2d")
def lower_conv2d(lw, n):
    x, w = n.inputs
    X, Wb, Y = lw.buf(x), lw.buf(w), lw.buf(n)
    _same_dtype(lw, n, [X, Wb])
    gm = _ConvGeom(_shape(x), _shape(w), _shape(n)[2:], n.attrs)
    flops = 2 * gm.N * gm.O * gm.P * gm.CKK
    if gm.N * gm.G == 1 and flops >= 1 << 22:
        # One image and one group (batch-1 inference): no image loop to share out, so the
        # GEMM itself is split among threads (column bands), after an im2col kernel that
        # threads share by channel rows.  (Smaller convs stay on one thread: waking the
        # others would cost more than it saves.)
        a0, c0 = (Wb, idx(0), gm.CKK, 1), (Y, idx(0), gm.P, 1)
        if gm.direct:
            return [Kernel("conv2d", [Y, X, Wb],
                           [Gemm(gm.O, gm.P, gm.CKK, a0, (X, idx(0), gm.P, 1), c0)], flops=flops)]
        cols = lw.new_buffer(n.dtype, gm.CKK * gm.P, hint="cols")
        fill = gm.im2col(X, cols, idx(0), idx(0))
        fill[0].kind = "parallel"
        return [Kernel("im2col", [cols, X], fill, flops=0),
                Kernel("conv2d", [Y, Wb, cols],
                       [Gemm(gm.O, gm.P, gm.CKK, a0, (cols, idx(0), gm.P, 1), c0)], flops=flops)]
    nv, gv = Var("n"), Var("g")
    y_off = affine([nv, gv], [gm.O * gm.P, gm.Og * gm.P])
    a = (Wb, affine([gv], [gm.Og * gm.CKK]), gm.CKK, 1)
    if gm.direct:
        bufs = [Y, X, Wb]
        b = (X, affine([nv, gv], [gm.C * gm.P, gm.Cg * gm.P]), gm.P, 1)
        inner = [Gemm(gm.Og, gm.P, gm.CKK, a, b, (Y, y_off, gm.P, 1))]
    else:
        cols = lw.new_buffer(n.dtype, gm.CKK * gm.P, hint="cols", scope="thread")
        bufs = [Y, X, Wb, cols]
        inner = gm.im2col(X, cols, nv, gv) + [
            Gemm(gm.Og, gm.P, gm.CKK, a, (cols, idx(0), gm.P, 1), (Y, y_off, gm.P, 1))]
    body = [Loop(nv, gm.N, [Loop(gv, gm.G, inner)], "parallel")]
    return [Kernel("conv2d", bufs, body, flops=flops)]


@rule("conv2d_grad_input")
def lower_conv2d_grad_input(lw, n):
    gnode, w = n.inputs
    Gb, Wb, DX = lw.buf(gnode), lw.buf(w), lw.buf(n)
    _same_dtype(lw, n, [Gb, Wb])
    gm = _ConvGeom(_shape(n), _shape(w), _shape(gnode)[2:], n.attrs)
    nv, gv = Var("n"), Var("g")
    a = (Wb, affine([gv], [gm.Og * gm.CKK]), 1, gm.CKK)           # w_g^T: (CKK x Og)
    b = (Gb, affine([nv, gv], [gm.O * gm.P, gm.Og * gm.P]), gm.P, 1)
    if gm.direct:
        c = (DX, affine([nv, gv], [gm.C * gm.P, gm.Cg * gm.P]), gm.P, 1)
        body = [Loop(nv, gm.N, [Loop(gv, gm.G, [Gemm(gm.CKK, gm.P, gm.Og, a, b, c)])],
                     "parallel")]
        return [Kernel("conv2d_grad_input", [DX, Gb, Wb], body,
                       flops=2 * gm.N * gm.O * gm.P * gm.CKK)]
    cols = lw.new_buffer(n.dtype, gm.CKK * gm.P, hint="cols", scope="thread")
    inner = [Gemm(gm.CKK, gm.P, gm.Og, a, b, (cols, idx(0), gm.P, 1))] + \
        gm.col2im_add(cols, DX, nv, gv)
    image = gm.C * gm.H * gm.W
    z = Var("z")
    zero = [Loop(z, image, [Store(DX, affine([nv, z], [image, 1]), Const(0, DX.dtype))], "vector")]
    body = [Loop(nv, gm.N, zero + [Loop(gv, gm.G, inner)], "parallel")]
    return [Kernel("conv2d_grad_input", [DX, Gb, Wb, cols], body,
                   flops=2 * gm.N * gm.O * gm.P * gm.CKK)]


# conv2d grad-weight as dW^T = cols . dY^T from this many output channels per group:
# measured on one thread, 32 channels 38 -> 53 GFLOP/s, 64: 72 -> 80, 128: 82 -> 82.
_SWAP_MIN_OG = 32


def _image_groups(n_images, most=8):
    """The largest divisor of n_images that is <= most: groups of consecutive images
    whose partial sums are added in a fixed order (results do not depend on the
    thread count)."""
    return max(d for d in range(1, min(most, n_images) + 1) if n_images % d == 0)


@rule("conv2d_grad_weight")
def lower_conv2d_grad_weight(lw, n):
    x, gnode = n.inputs
    X, Gb, DW = lw.buf(x), lw.buf(gnode), lw.buf(n)
    _same_dtype(lw, n, [X, Gb])
    gm = _ConvGeom(_shape(x), _shape(n), _shape(gnode)[2:], n.attrs)
    ng = _image_groups(gm.N)
    per = gm.N // ng
    size = DW.size
    part = DW if ng == 1 else lw.new_buffer(n.dtype, ng * size, hint="part")
    grp, nl, gv = Var("grp"), Var("nl"), Var("g")
    nv = affine([grp, nl], [per, 1])
    a = (Gb, affine([nv, gv], [gm.O * gm.P, gm.Og * gm.P]), gm.P, 1)   # (Og x P)
    c = (part, affine([grp, gv], [size, gm.Og * gm.CKK]), gm.CKK, 1)
    if gm.direct:
        bufs = [part, X, Gb]
        b = (X, affine([nv, gv], [gm.C * gm.P, gm.Cg * gm.P]), 1, gm.P)   # (P x Cg)
        inner = [Gemm(gm.Og, gm.CKK, gm.P, a, b, c, accumulate=True)]
    else:
        cols = lw.new_buffer(n.dtype, gm.CKK * gm.P, hint="cols", scope="thread")
        bufs = [part, X, Gb, cols]
        # The GEMM's B operand is cols read transposed.  With few output channels
        # (M) its packing, a gather, outweighs the multiply, so the columns are
        # written pixel-major instead (B rows contiguous).  With few taps (CKK) the
        # pixel-major im2col's short inner loop costs more than it saves.  Measured,
        # one thread: LeNet conv2 (M=16, CKK=150) 0.83 -> 0.62 ms; conv1 (M=6,
        # CKK=25) 0.94 -> 1.37 ms; 64->64 3x3 (M=64) unchanged.
        pm = gm.CKK >= 64 and gm.Og < 32
        if pm or gm.Og < _SWAP_MIN_OG:
            g = Gemm(gm.Og, gm.CKK, gm.P, a, (cols, idx(0), gm.CKK, 1) if pm else
                     (cols, idx(0), 1, gm.P), c, accumulate=True)
        else:
            # Many output channels: compute dW^T = cols . dY^T (M = taps, N = channels),
            # so the big operand, cols, is A with rows contiguous in K (cheap to pack)
            # and the gathered operand is dY^T, CKK/Og times smaller; C is written
            # through its transposed strides.
            g = Gemm(gm.CKK, gm.Og, gm.P, (cols, idx(0), gm.P, 1), (a[0], a[1], 1, gm.P),
                     (c[0], c[1], 1, gm.CKK), accumulate=True)
        inner = gm.im2col(X, cols, nv, gv, pixel_major=pm) + [g]
    z = Var("z")
    zero = [Loop(z, size, [Store(part, affine([grp, z], [size, 1]), Const(0, DW.dtype))],
                 "vector")]
    body = [Loop(grp, ng, zero + [Loop(nl, per, [Loop(gv, gm.G, inner)])], "parallel")]
    kernels = [Kernel("conv2d_grad_weight", bufs, body, flops=2 * gm.N * gm.O * gm.P * gm.CKK)]
    if ng > 1:
        e, r = Var("e"), Var("r")
        acc = Local(DW.dtype, "acc")
        red = [Loop(e, size, [Assign(acc, Const(0, DW.dtype)),
                              Loop(r, ng, [Assign(acc, BinOp("add", acc, Load(
                                  part, affine([r, e], [size, 1]))))]),
                              Store(DW, e, acc)], "parallel")]
        kernels.append(Kernel("sum_partials", [DW, part], red, flops=ng * size))
    return kernels


# ------------------------------------------------------------------ pooling
def _pool_geom(in_hw, attrs):
    from ..ops.pool import _geometry
    dil = attrs.get("dilation", (1, 1))
    ohw, pads = _geometry(in_hw, attrs["kernel_size"], attrs["stride"], attrs["padding"], dil,
                          attrs["ceil_mode"])
    return ohw, pads, dil


def _inside(x_shape, out_hw, attrs, dil) -> bool:
    """No padding, and the last window ends inside the input."""
    H, W = x_shape[2:]
    (kh, kw), (sh, sw), (ph, pw) = attrs["kernel_size"], attrs["stride"], attrs["padding"]
    return (ph == pw == 0 and (out_hw[0] - 1) * sh + dil[0] * (kh - 1) < H
            and (out_hw[1] - 1) * sw + dil[1] * (kw - 1) < W)


def _windows(x_shape, out_hw, attrs, dil, make_body, per_window_pre=None, per_window_post=None,
             zero_buf=None):
    """Loops n, c, i, j (windows) and k, l (window elements).

    make_body(hi, wi, inb, plane) -> statements for one window element, where
    plane is the flat offset of x[n, c] and (hi, wi) the unclamped position.
    """
    N, C, H, W = x_shape
    OH, OW = out_hw
    kh, kw = attrs["kernel_size"]
    sh, sw = attrs["stride"]
    ph, pw = attrs["padding"]
    nc, i, j, k, l = (Var(s) for s in ("nc", "i", "j", "k", "l"))
    hi = affine([i, k], [sh, dil[0]], -ph)
    wi = affine([j, l], [sw, dil[1]], -pw)
    plane = affine([nc], [H * W])
    if _inside(x_shape, out_hw, attrs, dil):
        # Every window lies inside the input: no clamping, no masks.
        inb = Const(True, BOOL)
        pos = K.add(plane, affine([hi, wi], [W, 1]))
    else:
        inb = _band(_inb(hi, H), _inb(wi, W))
        pos = K.add(plane, affine([_clamp(hi, H - 1), _clamp(wi, W - 1)], [W, 1]))
    out_pos = affine([nc, i, j], [OH * OW, OW, 1])
    inner = [Loop(k, kh, [Loop(l, kw, make_body(pos, inb))])]
    wv = {"nc": nc, "i": i, "j": j, "plane": plane}
    body = (per_window_pre(out_pos, wv) if per_window_pre else []) + inner + \
        (per_window_post(out_pos, wv) if per_window_post else [])
    z = Var("z")
    zero = [] if zero_buf is None else [
        Loop(z, H * W, [Store(zero_buf, K.add(plane, z), Const(0, zero_buf.dtype))], "vector")]
    return [Loop(nc, N * C, zero + [Loop(i, OH, [Loop(j, OW, body)])], "parallel")]


def _argmax_window(lw, n, x_buf, x_shape, out_hw, attrs, dil, finish, zero_buf=None):
    """Per window: (best value, flat position of the first maximum among real elements)."""
    best, bpos, found = Local(x_buf.dtype, "best"), Local(INDEX, "bpos"), Local(BOOL, "found")

    inside = _inside(x_shape, out_hw, attrs, dil)

    def body(pos, inb):
        v = Load(x_buf, pos)
        better = BinOp("or", BinOp("gt", v, best),
                       BinOp("and", UnOp("isnan", v), UnOp("not", UnOp("isnan", best))))
        if inside:
            # best starts at -inf with bpos at the window's first element: a strict >
            # keeps the first maximum, and an all -inf window keeps its first element.
            return [Assign(bpos, Select(better, pos, bpos)), Assign(best, Select(better, v, best))]
        take = _band(inb, BinOp("or", better, UnOp("not", found)))
        return [Assign(bpos, Select(take, pos, bpos)), Assign(best, Select(take, v, best)),
                Assign(found, BinOp("or", found, inb))]

    H, W = x_shape[2:]
    sh, sw = attrs["stride"]

    def pre(out_pos, wv):
        if inside:
            # the window's first element is (i*sh, j*sw) of plane nc
            first = affine([wv["nc"], wv["i"], wv["j"]], [H * W, sh * W, sw])
            return [Assign(best, Const(float("-inf"), x_buf.dtype)), Assign(bpos, first)]
        return [Assign(best, Const(float("-inf"), x_buf.dtype)), Assign(bpos, idx(0)),
                Assign(found, Const(False, BOOL))]
    # wv["found"]: whether the window holds a real element (None: every window does).
    # With dilation a window can lie entirely in the padding: its maximum is -inf and
    # it has no argmax (the reference routes nothing from it).
    return _windows(x_shape, out_hw, attrs, dil, body, pre,
                    lambda out_pos, wv: finish(out_pos, best, bpos,
                                               dict(wv, found=None if inside else found)),
                    zero_buf)


def _if_found(wv, v):
    """v where the window holds a real element, else 0 (a window all in padding)."""
    f = wv["found"]
    return v if f is None else Select(f, v, Const(0, v.dtype))


def _tiles(x_shape, out_hw, attrs, dil) -> bool:
    """Windows tile the input exactly: no padding, stride == kernel, no dilation,
    OH*kh == H and OW*kw == W (a 2x2/stride-2 pool of an even image), at most
    16 elements per window (the window loops are unrolled)."""
    (kh, kw), (sh, sw), (ph, pw) = attrs["kernel_size"], attrs["stride"], attrs["padding"]
    H, W = x_shape[2:]
    return ((kh, kw) == (sh, sw) and ph == pw == 0 and tuple(dil) == (1, 1) and kh * kw <= 16
            and out_hw[0] * kh == H and out_hw[1] * kw == W)


def _better(v, best):
    """v replaces best: strictly greater, or the first NaN (NumPy's max propagates NaN)."""
    return BinOp("or", BinOp("gt", v, best),
                 BinOp("and", UnOp("isnan", v), UnOp("not", UnOp("isnan", best))))


def _tiled_pool_rows(lw, X, x_shape, out_hw, attrs, nc, with_pos):
    """Phase 1 of a tiled max pool, per plane nc: the best of each row segment of kw
    elements, hb[t] for t = y*OW + j (input row y, window column j), and with_pos
    the index l of its first maximum in hl[t].  Since W == OW*kw the segment's
    elements are x[plane + kw*t + l]: one long loop over the plane with loads of
    stride kw (vectorized as wide loads and shuffles, not per-row gathers)."""
    H, W = x_shape[2:]
    OW = out_hw[1]
    kw = attrs["kernel_size"][1]
    hb = lw.new_buffer(X.dtype, H * OW, hint="prow", scope="thread")
    hl = lw.new_buffer(np.dtype("int32"), H * OW, hint="pcol", scope="thread") if with_pos else None
    t = Var("t")
    best, bl = Local(X.dtype, "best"), Local(np.dtype("int32"), "bl")
    stmts = [Assign(best, Load(X, affine([nc, t], [H * W, kw])))]
    if with_pos:
        stmts.append(Assign(bl, Const(0, "int32")))
    for l in range(1, kw):
        v = Load(X, affine([nc, t], [H * W, kw], l))
        take = _better(v, best)
        if with_pos:
            stmts.append(Assign(bl, Select(take, Const(l, "int32"), bl)))
        stmts.append(Assign(best, Select(take, v, best)))
    stmts.append(Store(hb, t, best))
    if with_pos:
        stmts.append(Store(hl, t, bl))
    return hb, hl, [Loop(t, H * OW, stmts, "vector")]


def _tiled_pool_cols(hb, out_hw, kh, dtype, finish, with_k):
    """Phase 2: per window (i, j) the best over its kh row segments
    hb[(i*kh + k)*OW + j] (first maximum kept); finish(i, j, best, bk) -> stores."""
    OH, OW = out_hw
    i, j = Var("i"), Var("j")
    best, bk = Local(dtype, "wbest"), Local(np.dtype("int32"), "bk")
    stmts = [Assign(best, Load(hb, affine([i, j], [kh * OW, 1])))]
    if with_k:
        stmts.append(Assign(bk, Const(0, "int32")))
    for k in range(1, kh):
        v = Load(hb, affine([i, j], [kh * OW, 1], k * OW))
        take = _better(v, best)
        if with_k:
            stmts.append(Assign(bk, Select(take, Const(k, "int32"), bk)))
        stmts.append(Assign(best, Select(take, v, best)))
    # j outside i: LLVM fully unrolls the short inner loop and then vectorizes the
    # outer one, so the loop left is the one over contiguous columns (rows as the
    # outer loop got unrolled columns and a vectorized row loop of gathers).
    return [Loop(j, OW, [Loop(i, OH, stmts + finish(i, j, best, bk))], "vector")]


def _lower_tiled_max_pool(lw, n, X, Y):
    x_shape = _shape(n.inputs[0])
    N, C, H, W = x_shape
    ohw = tuple(_shape(n)[2:])
    OH, OW = ohw
    nc = Var("nc")
    hb, _, p1 = _tiled_pool_rows(lw, X, x_shape, ohw, n.attrs, nc, False)
    p2 = _tiled_pool_cols(hb, ohw, n.attrs["kernel_size"][0], X.dtype, lambda i, j, best, bk: [
        Store(Y, affine([nc, i, j], [OH * OW, OW, 1]), best)], False)
    return [Kernel("max_pool2d", [Y, X, hb], [Loop(nc, N * C, p1 + p2, "parallel")],
                   flops=prod(_shape(n)) * prod(n.attrs["kernel_size"]))]


def _lower_tiled_max_pool_grad(lw, n, X, Gb, DX):
    """dx for windows that tile x: phase 1 and 2 as in the forward; phase 2 also
    writes, per row segment, g of its window where the window's maximum lies in
    that segment and 0 elsewhere (gk[t]); phase 3 writes every element of the plane
    in one long loop: dx[plane + kw*t + l] = gk[t] if l is the segment's maximum."""
    x_shape = _shape(n.inputs[0])
    N, C, H, W = x_shape
    ohw = tuple(_shape(n.inputs[1])[2:])
    OH, OW = ohw
    kh, kw = n.attrs["kernel_size"]
    nc = Var("nc")
    hb, hl, p1 = _tiled_pool_rows(lw, X, x_shape, ohw, n.attrs, nc, True)
    gk = lw.new_buffer(DX.dtype, H * OW, hint="pgrad", scope="thread")
    zero = Const(0, DX.dtype)

    def finish(i, j, best, bk):
        g = Load(Gb, affine([nc, i, j], [OH * OW, OW, 1]))
        return [Store(gk, affine([i, j], [kh * OW, 1], k * OW),
                      Select(BinOp("eq", bk, Const(k, "int32")), g, zero)) for k in range(kh)]
    p2 = _tiled_pool_cols(hb, ohw, kh, X.dtype, finish, True)
    t = Var("t")
    p3 = [Loop(t, H * OW, [
        Store(DX, affine([nc, t], [H * W, kw], l),
              Select(BinOp("eq", Load(hl, t), Const(l, "int32")), Load(gk, t), zero))
        for l in range(kw)], "vector")]
    return [Kernel("max_pool2d_grad", [DX, X, Gb, hb, hl, gk],
                   [Loop(nc, N * C, p1 + p2 + p3, "parallel")], flops=prod(x_shape))]


@rule("max_pool2d")
def lower_max_pool2d(lw, n):
    x = n.inputs[0]
    X, Y = lw.buf(x), lw.buf(n)
    ohw, _, dil = _pool_geom(_shape(x)[2:], n.attrs)
    if _tiles(_shape(x), ohw, n.attrs, dil):
        return _lower_tiled_max_pool(lw, n, X, Y)
    body = _argmax_window(lw, n, X, _shape(x), ohw, n.attrs, dil,
                          lambda op, best, bpos, wv: [Store(Y, op, best)])
    return [Kernel("max_pool2d", [Y, X], body, flops=prod(_shape(n)) * prod(n.attrs["kernel_size"]))]


@rule("max_pool2d_grad")
def lower_max_pool2d_grad(lw, n):
    x, g = n.inputs
    X, Gb, DX = lw.buf(x), lw.buf(g), lw.buf(n)
    _same_dtype(lw, n, [X, Gb])
    ohw, _, dil = _pool_geom(_shape(x)[2:], n.attrs)
    xs = _shape(x)
    (kh, kw), (sh, sw) = n.attrs["kernel_size"], n.attrs["stride"]
    if _tiles(xs, ohw, n.attrs, dil):
        return _lower_tiled_max_pool_grad(lw, n, X, Gb, DX)
    if _inside(xs, ohw, n.attrs, dil) and (sh, sw) == (kh, kw) and dil == (1, 1):
        # Windows tile the input without overlap: each window writes its own block
        # (g at the argmax, 0 elsewhere); no scatter-add, zero-fill only the uncovered rim.
        H, W = xs[2:]
        covered = ohw[0] * kh == H and ohw[1] * kw == W
        k2, l2 = Var("k"), Var("l")

        def finish(op, best, bpos, wv):
            pos = affine([wv["nc"], wv["i"], k2, wv["j"], l2], [H * W, kh * W, W, kw, 1])
            g = Load(Gb, op)
            return [Loop(k2, kh, [Loop(l2, kw, [Store(DX, pos, Select(
                BinOp("eq", pos, bpos), g, Const(0, DX.dtype)))])])]
        body = _argmax_window(lw, n, X, xs, ohw, n.attrs, dil, finish,
                              zero_buf=None if covered else DX)
        return [Kernel("max_pool2d_grad", [DX, X, Gb], body, flops=prod(xs))]
    body = _argmax_window(lw, n, X, _shape(x), ohw, n.attrs, dil, lambda op, best, bpos, wv: [
        Store(DX, bpos, BinOp("add", Load(DX, bpos), _if_found(wv, Load(Gb, op))))],
        zero_buf=DX)
    return [Kernel("max_pool2d_grad", [DX, X, Gb], body, flops=prod(xs))]


@rule("max_pool2d_gather")
def lower_max_pool2d_gather(lw, n):
    x, h = n.inputs
    X, Hb, Y = lw.buf(x), lw.buf(h), lw.buf(n)
    _same_dtype(lw, n, [X, Hb])
    ohw, _, dil = _pool_geom(_shape(x)[2:], n.attrs)
    body = _argmax_window(lw, n, X, _shape(x), ohw, n.attrs, dil,
                          lambda op, best, bpos, wv: [
                              Store(Y, op, _if_found(wv, Load(Hb, bpos)))])
    return [Kernel("max_pool2d_gather", [Y, X, Hb], body)]


@rule("avg_pool2d")
def lower_avg_pool2d(lw, n):
    x = n.inputs[0]
    X, Y = lw.buf(x), lw.buf(n)
    attrs = dict(n.attrs, dilation=(1, 1))
    ohw, _, _ = _pool_geom(_shape(x)[2:], n.attrs)
    div = _divisor_buffer(lw, n, _shape(x)[2:], attrs, ohw)
    acc = Local(X.dtype, "acc")
    OH, OW = ohw

    def body(pos, inb):
        return [Assign(acc, BinOp("add", acc, Select(inb, Load(X, pos), Const(0, X.dtype))))]

    def post(op, wv):
        dpos = affine([wv["i"], wv["j"]], [OW, 1])
        return [Store(Y, op, BinOp("div", acc, Load(div, dpos)))]
    loops = _windows(_shape(x), ohw, attrs, (1, 1), body,
                     lambda op, wv: [Assign(acc, Const(0, X.dtype))], post)
    return [Kernel("avg_pool2d", [Y, X, div], loops)]


def _divisor_buffer(lw, n, in_hw, attrs, ohw):
    """The (OH, OW) divisors as a constant buffer (computed by the pool module's rule)."""
    import numpy as np
    from ..ops.pool import _divisor
    d = _divisor(in_hw, attrs["kernel_size"], attrs["stride"], attrs["padding"], ohw,
                 attrs["count_include_pad"], n.dtype)
    d = np.ascontiguousarray(d, dtype=n.dtype)
    buf = lw.new_buffer(n.dtype, d.size, hint="div", temp=False)
    lw.prog.externals.append((buf, ("array", d)))
    return buf


@rule("avg_pool2d_grad")
def lower_avg_pool2d_grad(lw, n):
    g = n.inputs[0]
    Gb, DX = lw.buf(g), lw.buf(n)
    in_hw = n.attrs["input_size"]
    attrs = dict(n.attrs, dilation=(1, 1))
    ohw, _, _ = _pool_geom(in_hw, attrs)
    div = _divisor_buffer(lw, n, in_hw, attrs, ohw)
    OH, OW = ohw
    x_shape = tuple(_shape(g)[:2]) + tuple(in_hw)
    share = Local(DX.dtype, "share")

    def pre(op, wv):
        dpos = affine([wv["i"], wv["j"]], [OW, 1])
        return [Assign(share, BinOp("div", Load(Gb, op), Load(div, dpos)))]

    def body(pos, inb):
        return [Store(DX, pos, BinOp("add", Load(DX, pos),
                                     Select(inb, share, Const(0, DX.dtype))))]
    loops = _windows(x_shape, ohw, attrs, (1, 1), body, pre, zero_buf=DX)
    return [Kernel("avg_pool2d_grad", [DX, Gb, div], loops)]


# ------------------------------------------------------------------ softmax family
def _rows(shape, axis):
    return prod(shape[:axis]), shape[axis], prod(shape[axis + 1:])


def _row_stats(X, o, i, C, inner, dtype):
    """Statements computing m = max_r x (0 if not finite) and s = sum_r exp(x - m)."""
    r1, r2 = Var("r"), Var("r")
    m, s = Local(dtype, "m"), Local(dtype, "s")
    at = lambda r: Load(X, affine([o, r, i], [C * inner, inner, 1]))
    finite = BinOp("lt", UnOp("abs", m), Const(float("inf"), dtype))
    stmts = [Assign(m, Const(float("-inf"), dtype)),
             Loop(r1, C, [Assign(m, nan_max(at(r1), m))], "vector"),
             Assign(m, Select(finite, m, Const(0.0, dtype))),
             Assign(s, Const(0.0, dtype)),
             Loop(r2, C, [Assign(s, BinOp("add", s, UnOp("exp", BinOp("sub", at(r2), m)),
                                          reassoc=True))], "vector")]
    return stmts, m, s, at


@rule("softmax", "log_softmax")
def lower_softmax(lw, n):
    x = n.inputs[0]
    X, Y = lw.buf(x), lw.buf(n)
    outer, C, inner = _rows(_shape(x), n.attrs["axis"] % x.ndim)
    o, i, r = Var("o"), Var("i"), Var("r")
    stats, m, s, at = _row_stats(X, o, i, C, inner, n.dtype)
    z = BinOp("sub", at(r), m)
    if n.op.name == "softmax":
        inv = Local(n.dtype, "inv")
        fin = [Assign(inv, BinOp("div", Const(1.0, n.dtype), s)),
               Loop(r, C, [Store(Y, affine([o, r, i], [C * inner, inner, 1]),
                                 BinOp("mul", UnOp("exp", z), inv))], "vector")]
    else:
        ls = Local(n.dtype, "ls")
        fin = [Assign(ls, UnOp("log", s)),
               Loop(r, C, [Store(Y, affine([o, r, i], [C * inner, inner, 1]),
                                 BinOp("sub", z, ls))], "vector")]
    body = [Loop(o, outer, [Loop(i, inner, stats + fin)], "parallel")]
    return [Kernel(n.op.name, [Y, X], body, flops=4 * prod(_shape(x)))]


@rule("softmax_cross_entropy")
def lower_softmax_xent(lw, n):
    """Per sample: m + log(sum exp(x - m)) - x[label] (label smoothing and ignore_index too).

    A check kernel first scans the labels (the call then raises as the reference
    does); the loss kernel itself reads a clamped (valid) address for a bad label
    and yields NaN there.
    """
    x, y = n.inputs
    X, L, OUT = lw.buf(x), lw.buf(y), lw.buf(n)
    cax = 1 if x.ndim >= 2 else 0
    outer, C, inner = _rows(_shape(x), cax)
    checks = label_checks(lw, n, y, C)
    d = n.dtype
    o, i, r = Var("o"), Var("i"), Var("r")
    stats, m, s, at = _row_stats(X, o, i, C, inner, d)
    lab = Cast(Load(L, affine([o, i], [inner, 1])), INDEX)
    ok = _inb(lab, C)
    lse = BinOp("add", m, UnOp("log", s))                      # logsumexp of the row
    picked = at(_clamp(lab, C - 1))
    loss = BinOp("sub", lse, picked)                            # -logp[label]
    eps = n.attrs["label_smoothing"]
    body = list(stats)
    if eps:
        tot = Local(d, "tot")
        body += [Assign(tot, Const(0.0, d)),
                 Loop(r, C, [Assign(tot, BinOp("add", tot, at(r), reassoc=True))], "vector")]
        mean_logp = BinOp("sub", BinOp("div", tot, Const(float(C), d)), lse)
        loss = BinOp("sub", BinOp("mul", Const(1.0 - eps, d), loss),
                     BinOp("mul", Const(eps, d), mean_logp))
    ii = n.attrs["ignore_index"]
    if ii is not None:
        valid = BinOp("ne", lab, Const(ii, INDEX))
        ok = BinOp("or", ok, UnOp("not", valid))
        loss = Select(valid, loss, Const(0.0, d))
    loss = Select(ok, loss, Const(float("nan"), d))
    body.append(Store(OUT, affine([o, i], [inner, 1]), loss))
    return checks + [Kernel("softmax_cross_entropy", [OUT, X, L],
                   [Loop(o, outer, [Loop(i, inner, body)], "parallel")],
                   flops=4 * prod(_shape(x)))]
