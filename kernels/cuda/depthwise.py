"""Depthwise convolution on CUDA: groups == C, K = M*C (channel multiplier M); memory-bound.

x (N, C, D, H, W) * w (K, 1, T, R, S) -> y (N, K, P, Q, U); output channel k = c*M + m reads input channel c.

    plane_kernel   forward and backward_data, at any stride: block per (TQ x TU output tile, output depth p,
                   slot z) working through the planes n*C + c = z, z + slots, ... (about PLANES of them, so the
                   thread's setup, a dozen integer divisions, is paid once for them all). Per plane and depth tap
                   the source rows the tile reads, with their halo, are staged once in shared memory (at most HALO
                   elements; each thread issues STAGE loads before it stores them); thread tid owns the V output
                   rows q = q0 + (tid // TU)*V + v, v < V, at column u = u0 + tid % TU, and reads their taps
                   there: V = ROWS on planes taller than a block of thread rows (each tap's weight and the setup
                   then serve V outputs: ~2x fewer instructions per output for 56x56, sm_90 SASS), else 1.
                   Planes one tile covers (7x7, 14x14: V = ROWS from 4 rows) take the grouped builds: G planes
                   side by side per block (slot z: groups z*G, (z + slots)*G, ...), thread tid on plane
                   tid // (TQ // V * TU) of each group, so a 7x7 block has 18 planes' 252 threads, not 49.
                   Forward stages x[n, c] and writes the M outputs c*M + m; backward_data stages dy[n, c*M + m] in
                   turn and sums the M filters into dx[n, c]. At stride 1 along h and w its gather reads every tap
                   like a forward window; at a larger stride (the walk build, V = 1) only the taps whose output
                   exists (a tap walk per axis, indexing.tap_walk: no division per tap, no multiply-add on the zeros a
                   strided transposed convolution inserts).
                   A build per SPECIALISED filter size (depthwise_filter's), compiled in: the tap loops unroll.
    backward_filter: depthwise_filter.filter_kernel (its own module: the weight gradient in registers, split).
    forward_kernel, backward_data_kernel
                   thread (grid-stride) per output, taps read from global memory: the fallbacks when a halo tile
                   cannot fit (huge dilated filters).
Consecutive threads own consecutive u (or w): global loads and stores are coalesced along rows. Indices into
the arrays are cast to uint64 (none is negative where it is used), as in depthwise_filter.
"""
from functools import lru_cache

from cnnfast.kernels.cuda import depthwise_filter, direct, indexing
from cnnfast.kernels.cuda.compile import ZERO, helper, numba_dtype, uint64
from cnnfast.kernels.cuda.depthwise_filter import TARGET_BLOCKS, constant_sizes, size_name
from cnnfast.kernels.cuda.indexing import carry, next_tap, split, tap_walk, transposed_gather, within, within32
from cnnfast.kernels.cuda.launch import flat, launch
from numba import cuda, int64, types

BLOCK = 256  # threads per block of the thread-per-output kernels; plane_kernel's tiles hold at most BLOCK outputs
MAX_BLOCKS = 8192
TILE_W = 64  # widest output tile of a 2-D/3-D plane (1-D rows take BLOCK)
HALO = 4096  # shared-memory elements of one staged input tile: 16 KiB float32, 32 KiB float64
STAGE = 2  # plane_kernel: halo elements a thread loads before it stores them (loads in flight per thread)
ROWS = 4  # plane_kernel on planes taller than a block of threads: output rows per thread (builds for 1 and ROWS)
PLANE_BLOCKS = 3  # plane_kernel's float32 SPECIALISED straight builds: blocks of BLOCK threads per SM (bounds)
PLANES = 8  # plane_kernel: (n, c) planes per block, when that leaves TARGET_BLOCKS blocks
GRID_YZ = 65535  # CUDA's limit on a grid's y and z
GRID_X = 2 ** 31 - 1  # ... and on its x
NTILE = 36  # len(tile_geometry(...))
GROUP = 32  # plane_kernel: planes side by side in a block at most (1: no grouped builds)
GROUPED_BLOCKS = 2  # plane_kernel's float32 SPECIALISED grouped builds: blocks of BLOCK threads per SM (bounds)
# plane_kernel's builds (forward, V, walk, grouped): walk only for backward_data at V = 1, grouped only at V = ROWS
PLANE_BUILDS = ((True, 1, False, False), (True, ROWS, False, False), (True, ROWS, False, True),
                (False, 1, False, False), (False, ROWS, False, False), (False, ROWS, False, True),
                (False, 1, True, False))


# ---------------------------------------------------------------- halo tiles: forward and backward_data

@helper
def _axis(o0, oo, mul, add, div, step, reach):
    """One axis of a halo tile whose outputs start at o0, for the thread at offset oo: (base, o, rem, dq, dr),
    base the first source index staged, then the thread's tap_walk with o relative to base. Output o reads
    source (o*mul + add - t*step) / div at tap t where that divides; reach = the largest t*step read below."""
    v = o0 * mul + add - reach
    base = v if div == 1 else v // div  # floor: v < 0 where the tile reaches into padding
    o, rem, dq, dr = tap_walk((o0 + oo) * mul + add, div, step)
    return base, o - base, rem, dq, dr


@lru_cache(maxsize=None)
def plane_kernel(dtype, forward, sizes=None, V=1, walk=False, grouped=False):
    """The halo-tile kernel's Python function for a numba dtype, primitive (forward, else backward_data) and
    filter size: sizes = (T, R, S) compiles them in as constants (SPECIALISED: the tap loops unroll, the filter
    offsets fold), None reads them from tg, tile_geometry()'s NTILE ints. Forward windows read every tap at
    source o*stride - pad + t*dil; the transposed gather of backward_data reads source (i + pad - t*dil) / stride
    at the taps where that divides (a tap walk per axis: no division per tap, no multiply-add on a zero inserted
    by the stride). walk: backward_data at a stride > 1 along h or w (else its gather, like a forward window, reads
    every tap, one dilation apart). V: output rows per thread (tile_geometry's tg[34]; 1 when walking), compiled in:
    its loops unroll, its V sums stay in registers and each tap's weight is read once for them. grouped: a block
    works on G = tg[35] > 1 planes at once (V = ROWS, one tile per plane); else G = 1 and the group code folds away."""
    KT, KR, KS = sizes or (0, 0, 0)  # 0: read from tg
    # the staging's range tests: in 32 bits (5% fewer instructions per output of the 4-row builds), but the 1-row
    # builds sit at their 80-register bound, where the 32-bit tests spill 12-28 bytes
    below = within32 if V > 1 else within

    @helper
    def store(out, first, pitch, acc, bias, rows_left, active):
        """out[first + v*pitch] = acc[v] + bias for the thread's rows v that exist; acc zeroed for the next sum."""
        at = uint64(first)
        for v in range(V):
            if active and v < rows_left:
                out[at] = acc[v] + bias
            at += uint64(pitch)
            acc[v] = 0

    def kernel(src, w, bias, out, tg, has_bias):
        halo = cuda.shared.array(HALO, dtype)
        acc = cuda.local.array(V, dtype)  # the thread's sums for its output rows v
        oh = cuda.local.array(V, types.int64)  # row v's tap walk along h: halo row, remainder
        rem_h = cuda.local.array(V, types.int64)
        buf = cuda.local.array(STAGE, dtype)  # the thread's staged elements, loaded before any is stored
        C, M = tg[1], tg[2]
        SD, SH, SW, OD, OH, OW = tg[4], tg[5], tg[6], tg[7], tg[8], tg[9]
        T = KT if KT else tg[10]
        R = KR if KR else tg[11]
        S = KS if KS else tg[12]
        TQ, TU, tiles_u, rows, pitch, G = tg[28], tg[29], tg[31], tg[32], tg[33], tg[35]
        NC = tg[0] * C  # planes n*C + c
        # block -> (tile, p, groups of G planes n*C + c from z*G); thread -> plane j of each group, output rows
        # q0 + qq*V + v (v < V), column u0 + uu
        tile = cuda.blockIdx.x
        p = cuda.blockIdx.y
        q0 = tile // tiles_u * TQ
        u0 = tile % tiles_u * TU
        tid = cuda.threadIdx.x
        per_plane = TQ // V * TU  # threads
        j = tid // per_plane if grouped else 0
        qq = (tid - j * per_plane) // TU
        uu = tid - j * per_plane - qq * TU
        # (tid < G*per_plane would say the same, but costs the grouped backward_data build a 16-byte spill at 128)
        active = (j < G if grouped else qq < TQ // V) and u0 + uu < OW
        rows_left = OH - q0 - qq * V  # the thread's rows v < rows_left exist (not all in the plane's last tile)
        pixel = (p * OH + q0 + qq * V) * OW + u0 + uu  # the thread's first output in its (n, channel) plane
        h_base, oh0, rem_h0, dq_h, dr_h = _axis(q0, qq * V, tg[18], tg[19], tg[20], tg[21], tg[22])
        w_base, ow0, rem_w0, dq_w, dr_w = _axis(u0, uu, tg[23], tg[24], tg[25], tg[26], tg[27])
        ow0 += j * rows * pitch  # plane j's halo follows the j before it
        # staging: thread tid copies column col0 (+ threads, ...) of the group's G*rows x pitch halos, rows
        # row0 + i*lanes
        threads = cuda.blockDim.x
        lanes = threads // pitch if threads >= pitch else 1
        row0 = tid // pitch
        col0 = tid - row0 * pitch
        size = OD * OH * OW  # an output plane
        step = (1 if forward else M) * SD * SH * SW  # from one staged plane to the next: x[n, c] or dy[n, c*M + m]
        # grouped builds: halo row rr = j*rows + r is source row r of the group's plane j, at offset j*step + r*SW;
        # stepped by lanes rows: r by dr and the offset by dstep, less wrap each time r passes rows (no division)
        r0 = row0 % rows
        off0 = row0 // rows * step + r0 * SW
        dr = lanes % rows
        dstep, wrap = lanes // rows * step + dr * SW, step - rows * SW
        d0, rem_d0, dq_d, dr_d = tap_walk(p * tg[13] + tg[14], tg[15], tg[16])
        c, dc = (cuda.blockIdx.z * G + j) % C, cuda.gridDim.z * G % C  # nc = n*C + c steps: c by dc, carried
        for v in range(V):
            acc[v] = 0  # (then zeroed by each store)
        for group in range(cuda.blockIdx.z * G, NC, cuda.gridDim.z * G):  # the block's groups: setup done once
            nc = group + j  # the thread's plane
            live = active and nc < NC
            staged = min(G, NC - group) * rows  # halo rows of the group's planes
            first_out = (nc * M if forward else nc) * size + pixel  # the thread's first output in plane nc(*M + m)
            for m in range(M):
                k = c * M + m
                plane = group if forward else group * M + m  # the group's first plane
                d, rem_d = d0, rem_d0
                for t in range(T):
                    if rem_d == 0 and d >= 0 and d < SD:  # the same for the whole block: barriers stay uniform
                        if m == 0 or T > 1 or not forward:  # forward at T == 1 keeps x[n, c]'s tile for every m
                            cuda.syncthreads()  # every thread is done reading the previous tile
                            first = ((plane * SD + d) * SH + h_base) * SW + w_base  # source of halo[0, 0]
                            col = col0
                            while row0 < lanes and col < pitch:  # a column: its test once
                                inside = within(w_base + col, SW)
                                rr, r, off = row0, r0, first + off0 + col
                                while rr < staged:  # STAGE of its rows at a time: their loads all issued, then stored
                                    for i in range(STAGE):
                                        row = r if grouped else rr + i * lanes  # in its plane
                                        x = ZERO
                                        if below(rr + i * lanes, staged) & inside & below(h_base + row, SH):
                                            x = src[uint64(off if grouped else first + row * SW + col)]
                                        buf[i] = x
                                        if grouped:  # (the wrap without a branch: ptxas then issues forward's
                                            r, off = r + dr, off + dstep  # loads before their stores)
                                            past = int64(r >= rows)
                                            r, off = r - past * rows, off + past * wrap
                                    for i in range(STAGE):
                                        if below(rr + i * lanes, staged):
                                            halo[uint64((rr + i * lanes) * pitch + col)] = buf[i]
                                    rr += STAGE * lanes
                                col += threads
                            cuda.syncthreads()
                        if live:
                            o, rem = oh0, rem_h0  # row v's taps start one output row (forward: stride) after v-1's
                            for v in range(V):
                                oh[v], rem_h[v] = o, rem
                                if walk:
                                    rem, o = carry(rem + 1, o, tg[20])
                                else:
                                    o += tg[18]
                            for r in range(R):
                                ow, rem_w = ow0, rem_w0
                                tap = ((k * T + t) * R + r) * S
                                for s in range(S):
                                    if not walk or rem_w == 0:
                                        wt = w[uint64(tap + s)]  # read once for the thread's V rows
                                        for v in range(V):
                                            if not walk or rem_h[v] == 0:
                                                acc[v] += wt * halo[uint64(oh[v] * pitch + ow)]
                                    ow, rem_w = next_tap(ow, rem_w, dq_w, dr_w, tg[25]) if walk else (ow - dq_w, 0)
                                for v in range(V):
                                    oh[v], rem_h[v] = next_tap(oh[v], rem_h[v], dq_h, dr_h, tg[20]) if walk else (
                                        oh[v] - dq_h, 0)
                    d, rem_d = next_tap(d, rem_d, dq_d, dr_d, tg[15])
                if forward:
                    store(out, first_out, OW, acc, bias[uint64(k)] if has_bias else ZERO, rows_left, live)
                    first_out += size
            if not forward:
                store(out, first_out, OW, acc, ZERO, rows_left, live)
            c, _ = carry(c + dc, 0, C)

    if sizes and not walk and dtype.bitwidth == 32:  # ptxas fits these without spills: 80 registers (4 rows: 2 -> 3
        kernel.launch_bounds = (BLOCK, GROUPED_BLOCKS if grouped else PLANE_BLOCKS)  # blocks per SM), grouped 128
        # (134 unbounded: 1 block); float64 would spill
    kernel.cache_key = f"{__name__}.plane_kernel[{dtype}:{build_name(forward, V, walk, grouped)}:{size_name(sizes)}]"
    return kernel


def extent(n, k, stride, dil, forward):
    """Source indices a run of n outputs reads along an axis of k taps: forward windows span (n-1)*stride +
    (k-1)*dil + 1; the transposed gather at most ceil(((n-1) + (k-1)*dil) / stride) + 1."""
    if forward:
        return (n - 1) * stride + (k - 1) * dil + 1
    return -(-((n - 1) + (k - 1) * dil) // stride) + 1


def tile_shape(OH, OW, R, S, sh, sw, dh, dw, forward=True, walk=False):
    """(TQ, TU, V, staged rows, pitch, G): the output tile, TQ // V rows of threads TU wide (at most BLOCK threads,
    at most TILE_W wide unless the plane is one row) with V output rows each, whose source rows with halo fit HALO
    elements; None when not even one output's does. V = ROWS on planes taller than a block of thread rows (the
    thread rows then balanced over the plane's tiles: 56 rows, 4 tiles of 4 x 4; 28 rows, 1 of 7 x 4) or on planes
    of ROWS rows or more that one tile covers (7 rows: 2 x 4), unless the build walks its taps (walks()), else 1.
    G: planes a block can hold side by side, when one V = ROWS tile covers a plane (7x7: 18 of 2 x 7 threads), else
    1."""
    TU = min(OW, TILE_W if OH > 1 else BLOCK)
    TR = max(1, min(OH, BLOCK // TU))
    V = ROWS if (OH > TR or OW <= TU and OH >= ROWS) and not walk else 1
    TR = -(-OH // (-(-OH // (TR * V)) * V))  # as few thread rows as the fewest tiles need
    while True:
        rows, pitch = extent(TR * V, R, sh, dh, forward), extent(TU, S, sw, dw, forward)
        if rows * pitch <= HALO:
            G = min(BLOCK // (TR * TU), HALO // (rows * pitch)) if V > 1 and TR * V >= OH and TU >= OW else 1
            return TR * V, TU, V, rows, pitch, G
        if V > 1:
            V, TR = 1, max(1, min(OH, BLOCK // TU))
        elif TR > 1:
            TR = (TR + 1) // 2
        elif TU > 1:
            TU = (TU + 1) // 2
        else:
            return None


def tile_geometry(g, primitive):
    """plane_kernel's NTILE ints for forward (source x, output y) or backward_data (source dy, output dx); None
    when no tile fits. Per axis (mul, add, div, step, reach) (_axis; d, h, w at 13, 18, 23): forward (stride, -pad,
    1, -dil, 0), backward (1, pad, stride, dil, (k-1)*dil). Cached per problem (5 us of host time per launch
    otherwise), keyed with the tile constants so that changing one re-plans."""
    return _tile_geometry(g, primitive, HALO, TILE_W, BLOCK, ROWS, TARGET_BLOCKS, GROUP)


@lru_cache(maxsize=1024)
def _tile_geometry(g, primitive, halo, tile_w, block, rows, target_blocks, group):
    fwd = primitive == "forward"
    src, dst = ((g.D, g.H, g.W), (g.P, g.Q, g.U)) if fwd else ((g.P, g.Q, g.U), (g.D, g.H, g.W))
    axes = []
    for k, stride, dil, pad in ((g.T, g.stride_d, g.dil_d, g.pad_d), (g.R, g.stride_h, g.dil_h, g.pad_h),
                                (g.S, g.stride_w, g.dil_w, g.pad_w)):
        axes += (stride, -pad, 1, -dil, 0) if fwd else (1, pad, stride, dil, (k - 1) * dil)
    shape = tile_shape(dst[1], dst[2], g.R, g.S, g.stride_h, g.stride_w, g.dil_h, g.dil_w, fwd, walks(g, primitive))
    if shape is None:
        return None
    TQ, TU, V, rows, pitch, G = shape
    G = max(1, min(G, group, g.N * g.C, g.N * g.C * dst[0] // target_blocks))  # not at the cost of TARGET_BLOCKS
    if dst[0] > GRID_YZ:  # output depths are the grid's y
        return None
    if -(-dst[1] // TQ) * -(-dst[2] // TU) > GRID_X:  # tiles are its x (a plane of billions of positions in 1x1 tiles)
        return None
    return (g.N, g.C, g.K // g.C, int(fwd), *src, *dst, g.T, g.R, g.S, *axes,
            TQ, TU, -(-dst[1] // TQ), -(-dst[2] // TU), rows, pitch, V, G)


def _plane(primitive, src, w, bias, flag, out, g, stream):
    """Launch plane_kernel if a halo tile fits this problem; False when it does not."""
    tg = tile_geometry(g, primitive)
    if tg is None:
        return False
    grid, threads = plane_grid(g, tg)
    launch(plane_kernel(numba_dtype(out.dtype), primitive == "forward", constant_sizes(g), tg[34], walks(g, primitive),
                        tg[35] > 1),
           grid, threads, stream, flat(src), flat(w), bias, flat(out), tg, flag)
    return True


def plane_grid(g, tg):
    """plane_kernel's grid (tiles, output depths, plane slots) and threads per block: PLANES groups of G planes
    per block, or fewer where that leaves under TARGET_BLOCKS blocks."""
    tiles, groups = tg[30] * tg[31], -(-g.N * g.C // tg[35])
    slots = min(groups, GRID_YZ, max(-(-groups // PLANES), -(-TARGET_BLOCKS // (tiles * tg[7]))))
    threads = tg[35] * (tg[28] // tg[34]) * tg[29]  # G planes of TQ // V rows of TU
    return (tiles, tg[7], slots), -(-threads // 32) * 32


def walks(g, primitive):
    """True when plane_kernel walks backward_data's taps: a stride > 1 along h or w (along d the walk is per block)."""
    return primitive == "backward_data" and (g.stride_h > 1 or g.stride_w > 1)


def build_name(forward, V, walk, grouped=False):
    """'forward/4rows', 'backward_data/1rows/walk', 'forward/4rows/grouped': plane_kernel's build, for cache keys and
    the PTX table."""
    return f"{'forward' if forward else 'backward_data'}/{V}rows" + "/walk" * walk + "/grouped" * grouped


# ---------------------------------------------------------------- fallbacks: thread per output

def forward_kernel(x, w, bias, y, geo, has_bias):
    """Thread (grid-stride) per output y[n, k, p, q, u]: the window's first input (d0, h0, w0) is found once,
    then the taps walk it in (t, r, s) order with no division (padding reads as 0)."""
    C, D, H, W, K, T, R, S = geo[1], geo[2], geo[3], geo[4], geo[5], geo[6], geo[7], geo[8]
    P, Q, U = geo[9], geo[10], geo[11]
    O = P * Q * U
    M = K // C
    for e in range(cuda.grid(1), geo[0] * K * O, cuda.gridsize(1)):
        n, k, p, q, u = split(e, K, P, Q, U)
        d0 = p * geo[12] - geo[18]
        h0 = q * geo[13] - geo[19]
        w0 = u * geo[14] - geo[20]
        plane = (n * C + k // M) * D * H * W
        tap = k * T * R * S
        total = bias[k] if has_bias else ZERO
        for t in range(T):
            di = d0 + t * geo[15]
            for r in range(R):
                hi = h0 + r * geo[16]
                inside = di >= 0 and di < D and hi >= 0 and hi < H
                row = plane + (di * H + hi) * W
                for s in range(S):
                    wi = w0 + s * geo[17]
                    v = x[uint64(row + wi)] if inside and wi >= 0 and wi < W else ZERO
                    total += w[uint64(tap)] * v
                    tap += 1
        y[e] = total


def backward_data_kernel(dy, w, dx, geo):
    """Thread (grid-stride) per input dx[n, c, i_d, ih, iw]: for each filter m of channel c, the taps (t, r, s)
    with the outputs that read it (transposed_gather: no division per tap), in (m, t, r, s) order."""
    C, D, H, W, K = geo[1], geo[2], geo[3], geo[4], geo[5]
    O = geo[9] * geo[10] * geo[11]
    M = K // C
    for e in range(cuda.grid(1), geo[0] * C * D * H * W, cuda.gridsize(1)):
        n, c, i_d, ih, iw = split(e, C, D, H, W)
        total = ZERO
        for m in range(M):
            k = c * M + m
            total += transposed_gather(dy, (n * K + k) * O, 0, w, k * geo[6] * geo[7] * geo[8], True,
                                       i_d, ih, iw, geo)
        dx[e] = total


# ---------------------------------------------------------------- launchers

def supports(g, primitive):
    if not g.is_depthwise:
        return (f"depthwise needs groups == in_channels and out_channels a multiple of them, got groups={g.groups}, "
                f"C={g.C}, K={g.K}")
    return indexing.beyond32(g)  # (the halo tiles' row tests)


def workspace_bytes(g, primitive, itemsize, workspace_limit):
    return depthwise_filter.workspace_bytes(g, itemsize, workspace_limit) if primitive == "backward_filter" else 0


def _blocks(n):
    return max(1, min(MAX_BLOCKS, -(-n // BLOCK)))


def forward(x, w, bias, y, g, workspace_limit=None, stream=0):
    bias, flag = direct._bias_arg(bias, y)
    if not _plane("forward", x, w, bias, flag, y, g, stream):
        launch(forward_kernel, _blocks(y.size), BLOCK, stream, flat(x), flat(w), bias, flat(y), tuple(g), flag)


def backward_data(dy, w, dx, g, workspace_limit=None, stream=0):
    bias, _ = direct._bias_arg(None, dx)
    if not _plane("backward_data", dy, w, bias, 0, dx, g, stream):
        launch(backward_data_kernel, _blocks(dx.size), BLOCK, stream, flat(dy), flat(w), flat(dx), tuple(g))


backward_filter = depthwise_filter.backward_filter


def kernels(g, primitive, dtype):
    """The kernels a depthwise call launches (explain())."""
    if primitive == "backward_filter":
        return depthwise_filter.kernels(g, dtype)
    tg = tile_geometry(g, primitive)
    if tg is not None:
        notes = depthwise_filter.sizes_note(g)
        notes += [f"{tg[34]} output rows per thread"] if tg[34] > 1 else []
        notes += [f"{tg[35]} planes per block"] if tg[35] > 1 else []
        notes += ["tap walk: the taps whose output exists"] if walks(g, primitive) else []
        return (f"depthwise plane_kernel [{dtype}] ({', '.join(['shared-memory halo tile'] + notes)})",)
    return (f"depthwise {primitive}_kernel [{dtype}]",)
