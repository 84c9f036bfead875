"""Layout kernels on the CPU: explicit padding, its adjoint fold, the bias gradient (twins of cuda/layout.py).

pad_cpu(src, dst, idx_d, idx_h, idx_w), fold_pad_cpu(...) and bias_grad_cpu(dy, db) launch the kernels below
(their serial builds for small arrays: threads.sized).

pad_kernel:       src (N, C, D, H, W) -> dst (N, C, Dp, Hp, Wp); dst[..., a, b, e] = src[..., idx_d[a], idx_h[b],
                  idx_w[e]], or 0 where any index is -1 (tables from contract.pad_indices). One task per (n, c).
fold_pad_kernel:  the adjoint: dst (N, C, D, H, W)[..., i, j, l] = sum of src[..., a, b, e] over the padded
                  positions whose tables point at (i, j, l), added in padded order. One task per (n, c).
bias_grad_kernel: dy (N, K, P, Q, U) -> db (K,), db[k] = sum over n and space, in a fixed order. One task per k.
"""
import numba
from cnnfast.kernels.cpu.threads import parallel, sized


@parallel()
def pad_kernel(src, dst, idx_d, idx_h, idx_w):
    N, C = src.shape[:2]
    for nc in numba.prange(N * C):
        n, c = nc // C, nc % C
        for a in range(idx_d.shape[0]):
            for b in range(idx_h.shape[0]):
                for e in range(idx_w.shape[0]):
                    i, j, l = idx_d[a], idx_h[b], idx_w[e]
                    dst[n, c, a, b, e] = src[n, c, i, j, l] if (i >= 0 and j >= 0 and l >= 0) else 0.0


@parallel()
def fold_pad_kernel(src, dst, idx_d, idx_h, idx_w):
    N, C = dst.shape[:2]
    for nc in numba.prange(N * C):
        n, c = nc // C, nc % C
        dst[n, c] = 0.0
        for a in range(idx_d.shape[0]):
            for b in range(idx_h.shape[0]):
                for e in range(idx_w.shape[0]):
                    i, j, l = idx_d[a], idx_h[b], idx_w[e]
                    if i >= 0 and j >= 0 and l >= 0:
                        dst[n, c, i, j, l] += src[n, c, a, b, e]


@parallel()
def bias_grad_kernel(dy, db):
    N, K, P, Q, U = dy.shape
    for k in numba.prange(K):
        total = 0.0  # float64 for either dtype: a float32 sum of N*P*Q terms in order stops growing at 2^24 (ones)
        for n in range(N):
            for p in range(P):
                for q in range(Q):
                    for u in range(U):
                        total += dy[n, k, p, q, u]
        db[k] = total


def pad_cpu(src, dst, idx_d, idx_h, idx_w):
    sized(pad_kernel, dst.size)(src, dst, idx_d, idx_h, idx_w)


def fold_pad_cpu(src, dst, idx_d, idx_h, idx_w):
    sized(fold_pad_kernel, src.size)(src, dst, idx_d, idx_h, idx_w)


def bias_grad_cpu(dy, db):
    sized(bias_grad_kernel, dy.size)(dy, db)
