"""The explicit convolution matrix, built with scalar loops: an oracle independent of cnnfast.reference.

For one sample, the convolution is a linear map y = M @ x + b (x flattened C-order from (C, *L), y from
(K, *O)). M = sum over weights w[k, c, r] of w[k, c, r] * E[k, c, r], where E[k, c, r] is the 0/1
pattern matrix saying which input element tap r of filter k reads for each output element. E is
built here tap by tap from the definition, with this module's own rule for the padded coordinate's
source in each padding mode (no np.pad, no sliding windows, nothing from cnnfast).
"""
import itertools

import numpy as np


def source_index(j, length, mode):
    """Index into an axis of `length` elements read by padded coordinate j (j < 0 or j >= length lie in
    the padding, measured from x's first element); None where the padding is a zero."""
    if 0 <= j < length:
        return j
    if mode == "zeros":
        return None
    if mode == "replicate":  # the nearest edge element
        return 0 if j < 0 else length - 1
    if mode == "circular":  # the axis wraps around
        return j % length
    if mode == "reflect":  # mirror about the edge elements, which are not repeated: period 2*(length-1)
        j = j % (2 * (length - 1))
        return j if j < length else 2 * (length - 1) - j
    raise ValueError(mode)


def conv_out_size(length, kernel, stride, dilation, lo, hi):
    """Outputs along one axis: the largest o with o*s + d*(k-1) <= lo + L + hi - 1, plus one."""
    o = 0
    while (o + 1) * stride + dilation * (kernel - 1) <= lo + length + hi - 1:
        o += 1
    return o + 1


def pattern_matrices(x_shape, w_shape, stride, pads, dilation, groups, mode):
    """E (K, C/groups, *k, K*prod(O), C*prod(L)): E[k, c, r][row(k, o), col(c', i)] counts how often output
    (k, o) reads input (c', i) through weight w[k, c, r] (c' = c + group offset, i the source of the padded
    coordinate o*s - lo + r*d on each axis)."""
    C, L = x_shape[1], tuple(x_shape[2:])
    K, Cg, ksize = w_shape[0], w_shape[1], tuple(w_shape[2:])
    out = tuple(conv_out_size(*a, *p) for a, p in zip(zip(L, ksize, stride, dilation), pads))
    n_rows, n_cols = K * int(np.prod(out)), C * int(np.prod(L))
    E = np.zeros((K, Cg) + ksize + (n_rows, n_cols))
    for k in range(K):
        group = k // (K // groups)
        for c in range(Cg):
            for o in itertools.product(*map(range, out)):
                row = np.ravel_multi_index((k,) + o, (K,) + out)
                for r in itertools.product(*map(range, ksize)):
                    src = [source_index(o[a] * stride[a] - pads[a][0] + r[a] * dilation[a], L[a], mode)
                           for a in range(len(L))]
                    if None in src:
                        continue
                    col = np.ravel_multi_index((group * Cg + c,) + tuple(src), (C,) + L)
                    E[(k, c) + r + (row, col)] += 1.0
    return E, out


def conv_matrix(w, E):
    """M = sum_{k,c,r} w[k,c,r] * E[k,c,r]: (K*prod(O), C*prod(L))."""
    return np.tensordot(w, E, axes=w.ndim)
