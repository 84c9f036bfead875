"""Direct convolution over the batch's padded planes laid end to end, for grouped and thin layers on the CPU.

x (N, C, D, H, W) * w (K, C/g, T, R, S) -> y (N, K, P, Q, U). Every source channel's planes, zero-padded, are
spread once into scratch as one long grid (spread_cpu): sample after sample, each a (Dp, Hp, Wp) volume whose
pitches leave room for the taps (at a stride, the plane split into stride-phase volumes as in
depthwise_planes.pad_plane). Output (n, p, q, u) is then grid position o = ((n*Dp + p)*Hp + q)*Wp + u, and its tap
(c, t, r, s) reads the source grid at o + offset[c, t, r, s], one constant per term: a convolution is

    dst[j, o] = sum over the terms e of its group of wt[j, e] * grid[o + offsets[e]]

over all positions at once (the grid positions past the outputs, in the padding's rows and columns, are computed and
dropped). wide_direct_cpu runs it for blocks of KB destination channels and GRID_POSITIONS positions per task, three
terms per pass (each pass reads three source runs and updates four accumulator rows in L1: FMA-bound rather than
load/store-bound, 2-3x faster than a term per pass). The per-row direct kernels looped over rows of U outputs:
on grouped layers of 4 to 32 channels per group they started T*R*S*C/g loops of a few vectors per row and ran at
~1 multiply-add a cycle.

    forward:          src x, dst y, terms (c, tap) of the group, wt[k, e] = w[k, c, tap]
    backward_data:    src dy padded by (T-1)*dil - pad, dst dx, terms (k, tap) of the group, wt[c, e] = w[k, c,
                      flipped tap] (a correlation of dy with the flipped filters); at a stride per sub-pixel class of
                      dx positions (depthwise.subpixel_classes), terms (k, tap reaching the class), wt[c, e] = w[k, c,
                      tap], into the class's strided view of dx (no multiply-adds with the zeros a stride inserts)
    backward_filter:  dw[k, c, tap] = sum over o of dy_grid[k, o] * x_grid[o + offset[c, tap]], dy spread onto the
                      output grid with zeros at the dropped positions; the grid in parts of FILTER_POSITIONS, each
                      part's sums added in part order (wide_direct_filter_cpu), then the blocks' sums in order

The batch runs in blocks of samples whose grids fit BLOCK_SCRATCH and whose scratch fits workspace_limit (at least
one sample a block); each thread keeps its grids between calls (_scratch).

Pitches at unit stride are compact: a line's trailing zeros and the next line's leading zeros (the next sample's, the
next channel's, the zero tail's) make one border, so 3x3 'same' planes take (H + 1) x (W + 1) rather than
(H + 2) x (W + 2). Non-finite values as the reference has them: the forward multiplies the padding's zeros as the
reference does; the input gradient also multiplies dy's zero border, so a NaN or inf weight takes the row kernel;
the weight gradient also meets x at dropped positions (dy 0 there), so a non-finite result is computed again by the
row kernel (direct.py). Every task writes its own outputs in a fixed order: deterministic, no atomics.
"""
import threading
from functools import lru_cache

import numba
import numpy as np
from cnnfast.kernels.contract import DEFAULT_WORKSPACE_LIMIT
from cnnfast.kernels.cpu import depthwise  # (a module: depthwise imports direct, which imports this one)
from cnnfast.kernels.cpu.direct import CONTRACT, CONTRACT_REASSOC
from cnnfast.kernels.cpu.threads import parallel, sized

MIN_CHANNELS = 3  # destination channels per group from which the wide kernels run (supports)
KB = 4  # destination channels per task: four accumulator rows (eight: ~10% faster alone, more waste on 4 a group)
GRID_POSITIONS = 1024  # grid positions per forward task: KB accumulator rows and the source runs stay in L1
FILTER_POSITIONS = 1 << 15  # grid positions per part of the weight gradient (a task per part, summed in order)
# Samples per block: as many as keep a block's grids within this (at least one). The grids of a whole batch, tens of
# MB fresh from mmap, were page-faulted every call (3x3 g32 128 @56 batch 8 weight gradient 12.7 ms whole, 4.7 in
# blocks of 4 MiB); with the grids kept between calls (_scratch), blocks of 16 MiB ran ~10% faster than of 4 MiB.
BLOCK_SCRATCH = 16 << 20
CACHED_SCRATCH = 32 << 20  # a thread keeps its grids between calls up to this size each (_scratch)


@parallel()
def spread_cpu(src, grid, pd, ph, pw, Dp, Hp, Wp, sd, sh, sw):
    """src (N, C, D, H, W) -> grid (C, sd*sh*sw*N*Dp*Hp*Wp): per channel, per stride phase (fd, fh, fw), per sample,
    the (Dp, Hp, Wp) volume whose element (a, b, e) is src[n, c, a*sd + fd - pd, b*sh + fh - ph, e*sw + fw - pw], or
    0 outside src. One task per (channel, sample); every element written."""
    N, C, D, H, W = src.shape
    V = N * Dp * Hp * Wp
    for task in numba.prange(C * N):
        c, n = task // N, task % N
        plane = src[n, c]
        for fd in range(sd):
            for fh in range(sh):
                for fw in range(sw):
                    volume = ((fd * sh + fh) * sw + fw) * V + n * Dp * Hp * Wp
                    lo = min(Wp, max(0, -((fw - pw) // sw)))  # line elements [lo, hi) read inside the row
                    hi = max(lo, min(Wp, -((fw - pw - W) // sw)))
                    for a in range(Dp):
                        i_d = a * sd + fd - pd
                        for b in range(Hp):
                            i_h = b * sh + fh - ph
                            line = grid[c, volume + (a * Hp + b) * Wp:volume + (a * Hp + b + 1) * Wp]
                            inside = 0 <= i_d < D and 0 <= i_h < H
                            for e in range(lo if inside else Wp):
                                line[e] = 0.0
                            if not inside:
                                continue
                            for e in range(hi, Wp):
                                line[e] = 0.0
                            row = plane[i_d, i_h]
                            if sw == 1:  # unsigned offsets: no negative-index wraparound, so LLVM vectorises
                                for e in range(lo, hi):
                                    line[np.uint64(e)] = row[np.uint64(e - pw)]
                            else:
                                for e in range(lo, hi):
                                    line[np.uint64(e)] = row[np.uint64(e * sw + fw - pw)]


@parallel(fastmath=CONTRACT)
def wide_direct_cpu(grid, offsets, wt, bias, has_bias, dst, Dp, Hp, Wp, lines_per_task):
    """dst[n, j, p, q, u] = bias[j] + sum over e of wt[g, b, jj, e] * grid[offsets[g, e] + o], o = ((n*Dp + p)*Hp
    + q)*Wp + u, for output channel j = g*Gd + b*KB + jj of group g (Gd = dst channels per group).

    grid: the source grids flattened, with a zero tail past the last one (every read inside); offsets (groups, E);
    wt (groups, nb, KB, E), zeros for a last block's missing channels. One task per (group g, block b of KB output
    channels, lines_per_task grid lines of Wp positions); the task keeps a (KB, positions) accumulator and adds the
    terms into it three at a time (one pass per triple: the 12 weights in registers, three source runs read), then
    copies the lines that hold outputs into dst. Terms in order."""
    N, Cd, P, Q, U = dst.shape
    groups, nb, _, E = wt.shape
    Gd = Cd // groups
    lines = N * Dp * Hp
    chunks = (lines + lines_per_task - 1) // lines_per_task
    whole = E - E % 3
    for task in numba.prange(groups * nb * chunks):
        chunk = task % chunks
        b = (task // chunks) % nb
        g = task // (chunks * nb)
        j0 = g * Gd + b * KB
        nj = min(KB, Gd - b * KB)
        l0 = chunk * lines_per_task
        l1 = min(lines, l0 + lines_per_task)
        o0, n_o = l0 * Wp, (l1 - l0) * Wp
        acc = np.empty((KB, n_o), dst.dtype)
        for jj in range(KB):
            v = bias[j0 + jj] if has_bias and jj < nj else 0.0
            for o in range(n_o):
                acc[jj, o] = v
        a0, a1, a2, a3 = acc[0], acc[1], acc[2], acc[3]
        c = wt[g, b]
        for e in range(0, whole, 3):
            x0 = grid[o0 + offsets[g, e]:o0 + offsets[g, e] + n_o]
            x1 = grid[o0 + offsets[g, e + 1]:o0 + offsets[g, e + 1] + n_o]
            x2 = grid[o0 + offsets[g, e + 2]:o0 + offsets[g, e + 2] + n_o]
            c00, c01, c02, c03 = c[0, e], c[1, e], c[2, e], c[3, e]
            c10, c11, c12, c13 = c[0, e + 1], c[1, e + 1], c[2, e + 1], c[3, e + 1]
            c20, c21, c22, c23 = c[0, e + 2], c[1, e + 2], c[2, e + 2], c[3, e + 2]
            for o in range(n_o):
                v0, v1, v2 = x0[o], x1[o], x2[o]
                a0[o] += c00 * v0 + c10 * v1 + c20 * v2
                a1[o] += c01 * v0 + c11 * v1 + c21 * v2
                a2[o] += c02 * v0 + c12 * v1 + c22 * v2
                a3[o] += c03 * v0 + c13 * v1 + c23 * v2
        for e in range(whole, E):  # the last one or two terms
            x0 = grid[o0 + offsets[g, e]:o0 + offsets[g, e] + n_o]
            c00, c01, c02, c03 = c[0, e], c[1, e], c[2, e], c[3, e]
            for o in range(n_o):
                v0 = x0[o]
                a0[o] += c00 * v0
                a1[o] += c01 * v0
                a2[o] += c02 * v0
                a3[o] += c03 * v0
        for line in range(l0, l1):
            q = line % Hp
            p = (line // Hp) % Dp
            n = line // (Hp * Dp)
            if p < P and q < Q:
                at = (line - l0) * Wp
                for jj in range(nj):
                    out = dst[n, j0 + jj, p, q]
                    for u in range(U):
                        out[u] = acc[jj, at + u]


@parallel(fastmath=CONTRACT_REASSOC)
def wide_direct_filter_cpu(grid, offsets, dy_grid, parts):
    """parts[part, g, b, kk, e] = sum over the part's grid positions o of dy_grid[k, o] * grid[offsets[g, e] + o],
    k = g*Kg + b*KB + kk (a last block's missing channels repeat its last one; the caller drops them).

    grid and offsets as in wide_direct_cpu (x's grids, terms (c, tap)); dy_grid (K, positions): dy on the output
    grid, zero at the dropped positions. One task per (part of FILTER_POSITIONS positions, group, block of KB
    filters); per GRID_POSITIONS run, three terms at a time: 12 dot products over the run (reassociated so LLVM
    vectorises them; fixed code, so bit-identical run to run), added into the part's sums in run order."""
    n_parts, groups, nb, _, E = parts.shape
    K, L = dy_grid.shape
    Kg = K // groups
    size = (L + n_parts - 1) // n_parts
    whole = E - E % 3
    for task in numba.prange(n_parts * groups * nb):
        b = task % nb
        g = (task // nb) % groups
        part = task // (nb * groups)
        k0 = g * Kg + b * KB
        last = min(KB, Kg - b * KB) - 1
        out = parts[part, g, b]
        for kk in range(KB):
            for e in range(E):
                out[kk, e] = 0.0
        zero = out[0, 0]  # sums in the result's dtype (a literal 0.0 would make a float32 sum float64)
        for o0 in range(part * size, min(L, (part + 1) * size), GRID_POSITIONS):
            n_o = min(GRID_POSITIONS, L - o0, (part + 1) * size - o0)
            d0 = dy_grid[k0, o0:o0 + n_o]
            d1 = dy_grid[k0 + min(1, last), o0:o0 + n_o]
            d2 = dy_grid[k0 + min(2, last), o0:o0 + n_o]
            d3 = dy_grid[k0 + min(3, last), o0:o0 + n_o]
            for e in range(0, whole, 3):
                x0 = grid[o0 + offsets[g, e]:o0 + offsets[g, e] + n_o]
                x1 = grid[o0 + offsets[g, e + 1]:o0 + offsets[g, e + 1] + n_o]
                x2 = grid[o0 + offsets[g, e + 2]:o0 + offsets[g, e + 2] + n_o]
                s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = s20 = s21 = s22 = s23 = zero
                for o in range(n_o):
                    v0, v1, v2 = x0[o], x1[o], x2[o]
                    e0, e1, e2, e3 = d0[o], d1[o], d2[o], d3[o]
                    s00 += e0 * v0
                    s01 += e1 * v0
                    s02 += e2 * v0
                    s03 += e3 * v0
                    s10 += e0 * v1
                    s11 += e1 * v1
                    s12 += e2 * v1
                    s13 += e3 * v1
                    s20 += e0 * v2
                    s21 += e1 * v2
                    s22 += e2 * v2
                    s23 += e3 * v2
                out[0, e] += s00
                out[1, e] += s01
                out[2, e] += s02
                out[3, e] += s03
                out[0, e + 1] += s10
                out[1, e + 1] += s11
                out[2, e + 1] += s12
                out[3, e + 1] += s13
                out[0, e + 2] += s20
                out[1, e + 2] += s21
                out[2, e + 2] += s22
                out[3, e + 2] += s23
            for e in range(whole, E):
                x0 = grid[o0 + offsets[g, e]:o0 + offsets[g, e] + n_o]
                s00 = s01 = s02 = s03 = zero
                for o in range(n_o):
                    v0 = x0[o]
                    s00 += d0[o] * v0
                    s01 += d1[o] * v0
                    s02 += d2[o] * v0
                    s03 += d3[o] * v0
                out[0, e] += s00
                out[1, e] += s01
                out[2, e] += s02
                out[3, e] += s03


# ---------------------------------------------------------------- launchers

def _pitch(n_out, taps, stride, dil, pad, length):
    """Grid extent along one axis: at a stride, each phase's n_out + (taps-1)*dil // stride; at unit stride compact,
    the reads past a line's data wrapping into the next line's leading zeros (at least n_out, and room for the taps
    past the pad: every read below the pitch plus the next line's pad)."""
    if stride > 1:
        return n_out + (taps - 1) * dil // stride
    reach = n_out + (taps - 1) * dil  # one past the last read
    return max(n_out, reach - max(pad, 0), min(pad + length, reach), 1)


class _Layout:
    """The grid of one primitive on geometry g: the source's extents, pads and strides, the pitches, the terms'
    offsets per group, and the scratch it needs."""

    def __init__(self, g, primitive, samples):
        flip = primitive == "backward_data"
        taps, dils = (g.T, g.R, g.S), (g.dil_d, g.dil_h, g.dil_w)
        if flip:  # correlation of dy with the flipped filters (at a stride: by sub-pixel classes, below)
            self.src, self.out = (g.P, g.Q, g.U), (g.D, g.H, g.W)
            self.strides = (1, 1, 1)
            self.pads = tuple((n - 1) * d - p for n, d, p in zip(taps, dils, (g.pad_d, g.pad_h, g.pad_w)))
            self.src_channels, self.terms_per_group = g.K, (g.K // g.groups) * g.T * g.R * g.S
            self.blocks = -(-(g.C // g.groups) // KB)  # blocks of KB destination channels per group
        else:
            self.src, self.out = (g.D, g.H, g.W), (g.P, g.Q, g.U)
            self.strides = (g.stride_d, g.stride_h, g.stride_w)
            self.pads = (g.pad_d, g.pad_h, g.pad_w)
            self.src_channels, self.terms_per_group = g.C, (g.C // g.groups) * g.T * g.R * g.S
            self.blocks = -(-(g.K // g.groups) // KB)
        self.pitches = tuple(_pitch(*a) for a in zip(self.out, taps, self.strides, dils, self.pads, self.src))
        self.classes = None
        if flip and not g.stride_d == g.stride_h == g.stride_w == 1:  # by sub-pixel classes: their pads and pitches
            self.classes = depthwise.subpixel_classes(g)
            lows = [int(v) for v in self.classes[2]]
            self.pads, self.pitches = tuple(lows[:3]), tuple(lows[3:])
        Dp, Hp, Wp = self.pitches
        sd, sh, sw = self.strides
        self.volume = samples * Dp * Hp * Wp  # one phase volume: the block's samples' grids
        self.channel = sd * sh * sw * self.volume  # one source channel's phase volumes
        t, r, s = np.meshgrid(*(np.arange(n) for n in taps), indexing="ij")  # (the input gradient's weights flip)
        t, r, s = t * g.dil_d, r * g.dil_h, s * g.dil_w
        phase = ((t % sd) * sh + r % sh) * sw + s % sw
        self.tap_offsets = (phase * self.volume + ((t // sd) * Hp + r // sh) * Wp + s // sw).ravel()
        # zeros past the last grid: the reads past its end (a compact pitch's wrapped reads, which must meet zeros, and
        # the dropped positions'); the last term reads up to its offset + volume - 1 into the last channel
        reach = self.tap_offsets.max() if self.classes is None else self.classes[1][:, 3].max()
        self.tail = max(0, int(reach) + self.volume - self.channel)
        self._offsets = None  # offsets() of every tap, made once

    def offsets(self, groups, taps=None):
        """(groups, E) int64: term (m, tap) of group gi reads source channel gi*Gs + m at that tap's offset (taps: the
        offsets of the taps selected, all of them by default)."""
        if taps is None:
            if self._offsets is None:
                self._offsets = self.offsets(groups, self.tap_offsets)
            return self._offsets
        Gs = self.src_channels // groups
        channels = np.arange(self.src_channels, dtype=np.int64).reshape(groups, Gs, 1) * self.channel
        return (channels + np.asarray(taps, np.int64)[None, None, :]).reshape(groups, -1)

    def grid_bytes(self, itemsize):
        return (self.src_channels * self.channel + self.tail) * itemsize

    def spread(self, src):
        """src's grids (flattened, a zero tail past the last): the source of every term."""
        flat = _scratch("grid", self.src_channels * self.channel + self.tail, src.dtype)
        flat[self.src_channels * self.channel:] = 0
        sized(spread_cpu, flat.size)(src, flat[:self.src_channels * self.channel].reshape(self.src_channels, -1),
                                     *self.pads, *self.pitches, *self.strides)
        return flat


_CACHED = threading.local()


def _scratch(name, size, dtype):
    """A flat array of `size` elements for one launch: this thread's buffer `name`, kept between calls when it holds at
    most CACHED_SCRATCH bytes. A fresh buffer every call was page-faulted anew whenever the memory had gone back to
    the system in between (interleaved with torch's convolutions: ~1,600 faults a call at 3x3 g32 128 @56 batch 8,
    at 2-15 us each on the 2-core VM)."""
    dtype = np.dtype(dtype)
    held = getattr(_CACHED, name, None)
    if held is not None and held.dtype == dtype and held.size >= size:
        return held[:size]
    fresh = np.empty(size, dtype)
    if size * dtype.itemsize <= CACHED_SCRATCH:
        setattr(_CACHED, name, fresh)
    return fresh


@lru_cache(maxsize=256)
def _layout(g, primitive, samples):
    """_Layout, once per geometry, primitive and block size (explain, the workspace and each launch ask)."""
    return _Layout(g, primitive, samples)


def _lines_per_task(layout):
    return max(1, GRID_POSITIONS // layout.pitches[2])


def _samples(g, primitive, itemsize, workspace_limit):
    """Samples per block: as many as keep its grids (source, and the weight gradient's dy on the output grid) within
    BLOCK_SCRATCH, and all its scratch within workspace_limit, but at least one."""
    one = _layout(g, primitive, 1)
    per_sample = one.grid_bytes(itemsize) + (g.K * one.volume * itemsize if primitive == "backward_filter" else 0)
    n = max(1, min(g.N, BLOCK_SCRATCH // per_sample))
    limit = DEFAULT_WORKSPACE_LIMIT if workspace_limit is None else workspace_limit
    while n > 1 and _bytes(g, primitive, itemsize, n) > limit:
        n //= 2
    return n


def _blocks(g, primitive, itemsize, workspace_limit):
    """(first sample, samples, layout) of each block, in order."""
    step = _samples(g, primitive, itemsize, workspace_limit)
    for n0 in range(0, g.N, step):
        yield n0, min(step, g.N - n0), _layout(g, primitive, min(step, g.N - n0))


def _weight_table(w, g, transposed, taps=slice(None)):
    """(groups, nb, KB, E): per group and block of KB destination channels, their weights of each term (zeros past
    the last channel), for the flat taps selected (a slice, or a sub-pixel class's array of them). Forward: terms (c,
    tap) of w[k, c, tap], destinations k; the input gradient (transposed): terms (k, tap), destinations c. Written
    straight into the table (no temporary as large as it: workspace_bytes counts one table)."""
    K, Cg = w.shape[0], w.shape[1]
    w = w.reshape(g.groups, K // g.groups, Cg, g.T * g.R * g.S)
    if transposed:
        w = w.transpose(0, 2, 1, 3)
    picked = range(w.shape[3])[taps] if isinstance(taps, slice) else taps
    dst, src = w.shape[1], w.shape[2]
    nb = -(-dst // KB)
    if not transposed and dst == nb * KB and taps == slice(None) and w.flags.c_contiguous:  # (forward) a view of w
        return w.reshape(g.groups, nb, KB, src * len(picked))
    table = np.zeros((g.groups, nb * KB, src, len(picked)), w.dtype)
    if isinstance(taps, slice):
        table[:, :dst] = w[..., taps]
    else:
        for i, tap in enumerate(picked):
            table[:, :dst, :, i] = w[..., tap]
    return table.reshape(g.groups, nb, KB, src * len(picked))


def supports(g, primitive):
    """None when the wide kernels compute the primitive: from MIN_CHANNELS destination channels per group (a block
    computes KB: with one or two, 2-4x the work, and the row kernels were 1.6-2.5x faster on depthwise layers and
    thin 16 -> 1 and 64 -> 2 layers, 2026-12-06) and from one whole pass of three terms (the input gradient of a
    1x1 64 -> 2 layer @256, two terms: rows 1.27 ms, wide 1.73)."""
    channels = (g.C if primitive == "backward_data" else g.K) // g.groups
    if channels < MIN_CHANNELS:
        return f"the wide kernels need at least {MIN_CHANNELS} destination channels per group, got {channels}"
    terms = (g.K if primitive == "backward_data" else g.C) // g.groups * g.T * g.R * g.S
    if terms < 3:
        return f"the wide kernels need at least 3 terms (source channels per group x taps), got {terms}"
    classes = depthwise.class_count(g) if primitive == "backward_data" else 1
    if classes > depthwise.MAX_CLASSES:
        return f"the wide kernels take an input gradient of at most {depthwise.MAX_CLASSES} sub-pixel classes, " \
               f"got {classes}"
    return None


def workspace_bytes(g, primitive, itemsize, workspace_limit=None):
    """Scratch of a wide launch (its blocks of samples as workspace_limit leaves them)."""
    return _bytes(g, primitive, itemsize, _samples(g, primitive, itemsize, workspace_limit))


def _bytes(g, primitive, itemsize, samples):
    """Scratch of a launch in blocks of `samples`: a block's source grids, the weight and offset tables, then the
    accumulators (forward, input gradient) or dy on the block's output grid, the parts' sums, a block's sum and the
    running total (weight gradient)."""
    layout = _layout(g, primitive, samples)
    table = g.groups * layout.blocks * KB * layout.terms_per_group
    if primitive == "backward_filter":
        extra = g.K * layout.volume + (_parts(layout) + 2) * table
    else:
        extra = KB * _lines_per_task(layout) * layout.pitches[2] * numba.get_num_threads()
    offsets = g.groups * layout.terms_per_group * 8  # int64
    return layout.grid_bytes(itemsize) + (table + extra) * itemsize + offsets


def fits(g, primitive, itemsize, workspace_limit):
    """Whether the wide kernels run: they support the primitive (and the batch is not empty) and their scratch fits."""
    limit = DEFAULT_WORKSPACE_LIMIT if workspace_limit is None else workspace_limit
    return (g.N > 0 and supports(g, primitive) is None
            and workspace_bytes(g, primitive, itemsize, workspace_limit) <= limit)


def _parts(layout):
    return -(-layout.volume // FILTER_POSITIONS)


def forward(x, w, bias, y, g, workspace_limit=None):
    table = _weight_table(w, g, False)
    bias, has_bias = (bias, True) if bias is not None else (np.zeros(1, x.dtype), False)
    for n0, n, layout in _blocks(g, "forward", x.itemsize, workspace_limit):
        sized(wide_direct_cpu, g.dense_macs // g.N * n)(layout.spread(x[n0:n0 + n]), layout.offsets(g.groups), table,
                                                        bias, has_bias, y[n0:n0 + n], *layout.pitches,
                                                        _lines_per_task(layout))


def backward_data(dy, w, dx, g, workspace_limit=None):
    """At unit strides the correlation of dy with the flipped filters; at a stride, per sub-pixel class of dx
    positions (depthwise.subpixel_classes), the unit-stride correlation of dy with the taps that reach the class, into
    the class's strided view of dx (a class no tap reaches: zeros)."""
    strides = (g.stride_d, g.stride_h, g.stride_w)
    if strides == (1, 1, 1):
        parts = [((0, 0, 0), slice(None, None, -1), None)]  # (first dx position, taps, their offsets)
    else:
        classes, taps, _ = depthwise.subpixel_classes(g)
        flat = (taps[:, 0] * g.R + taps[:, 1]) * g.S + taps[:, 2]
        parts = [(tuple(row[:3]), flat[row[6]:row[6] + row[7]], taps[row[6]:row[6] + row[7], 3]) for row in classes]
    tables = [_weight_table(w, g, True, taps) for _, taps, _ in parts]
    no_bias = np.zeros(1, dx.dtype)
    for n0, n, layout in _blocks(g, "backward_data", dx.itemsize, workspace_limit):
        grid = layout.spread(dy[n0:n0 + n])
        for ((a_d, a_h, a_w), _, offsets), table in zip(parts, tables):
            view = dx[n0:n0 + n, :, a_d::strides[0], a_h::strides[1], a_w::strides[2]]
            if view.size:
                sized(wide_direct_cpu, g.dense_macs // g.N * n)(grid, layout.offsets(g.groups, offsets), table,
                                                                no_bias, False, view, *layout.pitches,
                                                                _lines_per_task(layout))


def backward_filter(x, dy, dw, g, workspace_limit=None):
    """Per block of samples, its parts' sums; the blocks' sums added in order (into two tables made once)."""
    Kg, Cg = g.K // g.groups, g.C // g.groups
    nb = -(-Kg // KB)
    total = block = None
    for n0, n, layout in _blocks(g, "backward_filter", x.itemsize, workspace_limit):
        Dp, Hp, Wp = layout.pitches
        dy_grid = _scratch("dy grid", g.K * layout.volume, dy.dtype).reshape(g.K, -1)  # dy on the output grid
        sized(spread_cpu, dy_grid.size)(dy[n0:n0 + n], dy_grid, 0, 0, 0, Dp, Hp, Wp, 1, 1, 1)
        parts = np.empty((_parts(layout), g.groups, nb, KB, layout.terms_per_group), dw.dtype)
        sized(wide_direct_filter_cpu, g.dense_macs // g.N * n)(layout.spread(x[n0:n0 + n]), layout.offsets(g.groups),
                                                               dy_grid, parts)
        if total is None:
            total, block = parts.sum(axis=0), np.empty(parts.shape[1:], dw.dtype)  # (NumPy's fixed pairwise order)
        else:
            np.add(total, parts.sum(axis=0, out=block), out=total)
        del parts
    dw[...] = total.reshape(g.groups, nb * KB, Cg, g.T, g.R, g.S)[:, :Kg].reshape(dw.shape)
