"""Index arithmetic the CUDA kernels share (inline device functions): mixed-radix split and carry, range tests as
one unsigned compare, division-free tap walks, and the gathers built on them (x_patch, transposed_gather).

Indices into arrays are cast to uint64 where none is negative: Numba wraps a negative signed index at every
access (a compare and a select per load).
"""
from cnnfast.kernels.cuda.compile import ZERO, helper, int64, uint32, uint64


@helper
def x_patch(x, g, tap, n, o, geo):
    """x at input channel group g, reduction index tap = ((c*T + t)*R + r)*S + s, sample n, output o = (p*Q+q)*U+u;
    0 where the window reads padding."""
    C, D, H, W = geo[1], geo[2], geo[3], geo[4]
    T, R, S, Q, U = geo[6], geo[7], geo[8], geo[10], geo[11]
    Cg = C // geo[21]
    s = tap % S
    r = (tap // S) % R
    t = (tap // (S * R)) % T
    c = tap // (S * R * T)
    u = o % U
    q = (o // U) % Q
    p = o // (U * Q)
    di = p * geo[12] - geo[18] + t * geo[15]
    hi = q * geo[13] - geo[19] + r * geo[16]
    wi = u * geo[14] - geo[20] + s * geo[17]
    if di < 0 or di >= D or hi < 0 or hi >= H or wi < 0 or wi >= W:
        return ZERO
    return x[(((n * C + g * Cg + c) * D + di) * H + hi) * W + wi]


@helper
def split(e, C, D, H, W):
    """(n, c, d, h, w) of the flat index e = (((n*C + c)*D + d)*H + h)*W + w."""
    w = e % W
    h = (e // W) % H
    d = (e // (W * H)) % D
    c = (e // (W * H * D)) % C
    return e // (W * H * D * C), c, d, h, w


@helper
def within(i, n):
    """0 <= i < n as one unsigned comparison (a negative i casts to 2**64 - |i|)."""
    return uint64(i) < uint64(n)


@helper
def within32(i, n):
    """within in 32 bits, for |i| and n under 2**31: one compare of 32-bit registers instead of two."""
    return uint32(i) < uint32(n)


def beyond32(g):
    """Why the 32-bit range tests (within32) cannot take geometry g, or None: every extent of x and y, plus its
    padding, must stay under 2**31 (a larger one wraps, and a row inside reads as outside)."""
    extents = ((g.D, g.pad_d), (g.H, g.pad_h), (g.W, g.pad_w), (g.P, 0), (g.Q, 0), (g.U, 0))
    if max(L + pad for L, pad in extents) >= 2**31:
        return (f"its index tests are 32-bit, and an extent of x or y plus its padding reaches 2**31 "
                f"(x {g.D}x{g.H}x{g.W}, y {g.P}x{g.Q}x{g.U})")
    return None


@helper
def carry(digit, next_digit, size):
    """(digit, next_digit) with a digit in [0, 2*size) brought under size by one carry: a mixed-radix index
    advanced by a step's digits (see split) without division."""
    if digit >= size:
        return digit - size, next_digit + 1
    return digit, next_digit


@helper
def tap_walk(pos, stride, step):
    """Start a division-free walk over the taps t = 0, 1, ... of one axis: (o, rem, dq, dr) with
    pos - t*step = o*stride + rem, 0 <= rem < stride, at t = 0, and step = dq*stride + dr; next_tap moves to t + 1.
    A transposed gather (pos = i + pad, step = dil) reads output o at the taps where rem == 0; a forward window
    (stride 1, step = -dil) reads every tap. Two divisions per axis and thread when stride > 1 (pos, step >= 0
    then), none at stride 1."""
    if stride == 1:
        return pos, 0, step, 0
    o = int64(uint64(pos) // uint64(stride))
    dq = int64(uint64(step) // uint64(stride))
    return o, pos - o * stride, dq, step - dq * stride


@helper
def next_tap(o, rem, dq, dr, stride):
    """(o, rem) of the next tap of a tap_walk: subtract step = dq*stride + dr, keeping 0 <= rem < stride."""
    rem -= dr
    o -= dq
    if rem < 0:
        rem += stride
        o -= 1
    return o, rem


@helper
def transposed_gather(src, base, tap_stride, w, w0, weighted, i_d, ih, iw, geo):
    """The sum over taps (t, r, s), in order, of w[w0 + tap] * src[base + tap*tap_stride + (p*Q + q)*U + u]
    (without the weight when not weighted) for the output (p, q, u) each tap of input (i_d, ih, iw) reads: a
    tap_walk per axis (divisions once per call when a stride is > 1, none per tap); taps reading none skipped.
    Indices cast to uint64: no negative-index wrap-around per access."""
    P, Q, U = geo[9], geo[10], geo[11]
    p, rem_p, dq_p, dr_p = tap_walk(i_d + geo[18], geo[12], geo[15])
    q0, rem_q0, dq_q, dr_q = tap_walk(ih + geo[19], geo[13], geo[16])
    u0, rem_u0, dq_u, dr_u = tap_walk(iw + geo[20], geo[14], geo[17])
    tap = 0
    total = ZERO
    for _t in range(geo[6]):
        q, rem_q = q0, rem_q0
        for _r in range(geo[7]):
            u, rem_u = u0, rem_u0
            ok = rem_p == 0 and p >= 0 and p < P and rem_q == 0 and q >= 0 and q < Q
            for _s in range(geo[8]):
                if ok and rem_u == 0 and u >= 0 and u < U:
                    v = src[uint64(base + tap * tap_stride + (p * Q + q) * U + u)]
                    total += w[uint64(w0 + tap)] * v if weighted else v
                tap += 1
                u, rem_u = next_tap(u, rem_u, dq_u, dr_u, geo[14])
            q, rem_q = next_tap(q, rem_q, dq_q, dr_q, geo[13])
        p, rem_p = next_tap(p, rem_p, dq_p, dr_p, geo[12])
    return total
