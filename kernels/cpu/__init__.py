"""CPU kernels (Numba, parallel=True, cache=True): the algorithms, the auto cost model, the layout twins.

choose(g, primitive), the cost model behind algo="auto" (from `cnnfast bench --shapes cpu` and thin-layer
measurements on a 2-core AVX2 machine, bench/RESULTS.md), the same for all three primitives:
  1. depthwise layers (groups == C)                   -> depthwise (memory-bound; a plane, or 16, per task), but
                                                         - a single-channel input with >= SINGLE_CHANNEL_GEMM
                                                           output channels (backward: and a stride or >= 4096
                                                           positions; or a kernel of >= 27 taps and >= 32
                                                           output channels) -> im2col (1 -> 64: 1.5-6x faster)
                                                         - the weight gradient of a 1-D layer -> direct
                                                           (1.2-2x faster)
  2. a kernel that covers the whole unpadded input     -> im2col (one GEMM over the batch, no columns: a DCGAN
     (g.covers_input)                                    generator's first and discriminator's last layers, batch
                                                         64, 3-22x faster than direct or im2col's columns)
  3. a grouped layer (not depthwise) of at most      -> direct (its wide kernels, kernels/cpu/wide.py: three
     GROUPED_DIRECT_CHANNELS channels per group in and   taps a pass over the batch's padded planes; 1.1-3.4x
     out, with a kernel of more than one tap, that the   faster than im2col's or Winograd's per-group GEMMs on
     wide kernels take (wide.supports); and the weight   ResNeXt's 3x3 g32 layers; dense weight gradients of
     gradient of such a layer without groups (but a 3-D  <= 32 channels 0.94-2.9x, 1.3x typical; small 3-D
     one of >= WINOGRAD_WEIGHT_GRADIENT_3D channels and   layers 1.1-1.6x faster than Winograd)
     output positions that rule 5 takes goes to rule 5),
     and every pass of a small T x 3 x 3 unit-stride
     layer without groups (channels x output positions
     <= SMALL_3D_DIRECT)
  4. fewer than 8 output channels per group           -> direct (a GEMM that thin does not pay for its columns:
     (not a grouped 1x1 layer of >= 4 input channels     2-8x faster than im2col at 1-4 channels; a grouped 1x1
     per group)                                          layer's GEMMs are 1.5-2.5x faster than direct)
  5. 3x3 across height and width (2-D, or 3-D of any  -> winograd (F(4x4, 3x3): 4x fewer multiply-adds; 1.3-1.5x
     depth taps), unit stride and dilation, at least 8    faster than im2col at 3x3 64@56 batch 1, 128@28 batch 2,
     channels per group in and out, and at least          all three primitives; 3-D 3x3x3 layers 1.4-3.1x (C3D,
     WINOGRAD_TILES_PER_CHANNEL[primitive] x              3-D UNet); at 512@7, 16 tiles for 512 channels, its
     max(C/g, K/g) output tiles (4x4 each, all samples    4x larger transformed filters cost more than it saves:
     and output slices; with more than one depth tap      0.3-0.5x; with 3 input channels its transforms
     WINOGRAD_DEPTH_TILES_PER_CHANNEL[primitive] x)       dominate: 2-2.5x slower than im2col)
  6. otherwise                                        -> im2col (BLAS GEMM; building the columns costs
     C*T*R*S*P*Q*U copies against 2*K*C*T*R*S*P*Q*U flops; 1.2-15x faster than direct on every dense
     benchmark shape, backward passes included)
"""
import numpy as np
from cnnfast.kernels.contract import Algorithm
from cnnfast.kernels.cpu import blas, depthwise, depthwise_planes, direct, im2col, layout, threads, wide, winograd
from cnnfast.kernels.cpu.layout import bias_grad_cpu, fold_pad_cpu, pad_cpu

# before any kernel loads its cache:
threads.drop_stale_caches([blas, depthwise, depthwise_planes, direct, im2col, layout, wide, winograd])

__all__ = ["ALGORITHMS", "choose", "pad_cpu", "fold_pad_cpu", "bias_grad_cpu"]

# Winograd when its tiles (all samples) are at least this many per channel: the transformed filters (and
# backward_filter's dU) are 4x the filters, paid once per call. Measured against im2col (2026-12-06, 2-core
# Sapphire Rapids, after blas.matmul split Winograd's 36 GEMMs over the cores; im2col / winograd time, > 1: winograd
# faster): forward 0.93-1.03x at 0.12 tiles per channel (256@14 batch 2, 512@7 batch 16), 1.06x at 0.19, 1.09-1.30x
# at 0.25; backward_data 0.96-1.04x at 0.25, 0.82x and 1.11x at 0.38, 1.25x at 0.5; backward_filter (once both
# algorithms wrote their first block's product in place) 0.98-1.05x at 0.25, 1.09x and 1.16x at 0.38, 1.39x at
# 0.5. (2026-12-05, before the split: forward from 0.3, backward_data from 0.45, backward_filter from 1.0.)
WINOGRAD_TILES_PER_CHANNEL = {"forward": 0.2, "backward_data": 0.45, "backward_filter": 0.3}
# ... and with more than one depth tap (3-D), at least this many: its input slices padded in depth feed zeros to the
# GEMMs (2 slices in P + 2 at 'same' padding) and its filters are T times larger. im2col / winograd time (2026-12-06,
# 3x3x3 'same', forward, input and weight gradient; > 1: winograd faster): 0.5 tiles a channel 0.94, 0.90, 1.00
# (64 @4x8x8 batch 2), 1.25, 1.21, 1.29 (128 @8^3 batch 2), 1.25, 0.98, 1.33 (256 @4x14x14 batch 2); 1.0 tiles 1.25,
# 1.18, 1.30 (64 @4x8x8 batch 4), 1.69, 1.58, 1.87 (128 @8^3 batch 4), 1.31, 1.11, 1.46 (256 @4x14x14 batch 4); 2.0
# tiles 1.65, 1.52, 2.42 (128 @8^3 batch 8).
WINOGRAD_DEPTH_TILES_PER_CHANNEL = {"forward": 0.5, "backward_data": 0.75, "backward_filter": 0.5}
# A single-channel input's layer (depthwise by groups == C == 1) runs im2col from this many output channels, its
# gradients only at a stride > 1 or from SINGLE_CHANNEL_POSITIONS input positions per sample (2026-12-06, seventeenth
# session, bench/RESULTS.md: 1 -> 16..64 layers @28..256 and 1-D; below these the depthwise kernels win or tie).
SINGLE_CHANNEL_GEMM = {"forward": 16, "backward_data": 64, "backward_filter": 64}
SINGLE_CHANNEL_POSITIONS = 4096
# ... and a kernel of at least SINGLE_CHANNEL_TAPS taps (a 3-D UNet's first layer, 3x3x3) from 32 output channels in
# all three passes (2026-12-06, 1 -> 32 3x3x3, ms depthwise / im2col, input and weight gradients: @64^3 37.3 / 7.8 and
# 27.0 / 7.7, @48^3 8.7 / 2.6 and 7.2 / 3.3, @32^3 batch 2 2.7 / 2.2 and 4.3 / 2.2, @24^3 batch 4 2.6 / 2.0 and
# 4.0 / 1.6; at 16 channels the weight gradient is 1.14 / 1.24).
SINGLE_CHANNEL_TAPS, SINGLE_CHANNEL_WIDE_GEMM = 27, 32
# A grouped layer (not depthwise, a kernel of more than one tap) of at most this many channels per group in and out
# runs direct (its wide kernels, kernels/cpu/wide.py): 1.1-3.4x faster than im2col or Winograd on ResNeXt-50's
# 3x3 g32 layers of 4 to 32 channels per group, all three passes, batch 1 and 8; at 64 a group 0.45-2x (2026-12-06,
# bench/RESULTS.md). So does such a layer's weight gradient without groups: 0.94-2.9x on 16 layers of 2 to 32
# channels (2-D, 1-D, 3-D, strided, 5x5), the forward and input gradient there 0.65-2.3x (left on im2col/Winograd).
GROUPED_DIRECT_CHANNELS = 32
# ... but a 3-D weight gradient of at least this many channels (in or out) and output positions (all samples) goes on
# to rule 5, Winograd: direct / winograd time (2026-12-06, 3x3x3 'same') 24.8 / 17.4 ms (32 @32^3 batch 2), 12.3 / 8.4
# (32 @32^3 batch 1), 6.8 / 4.6 (32 @16^3 batch 4), 3.5 / 2.8 (32 @16^3 batch 2), 2.0 / 1.7 (32 @16^3 batch 1), 4.0 /
# 3.3 (24 @16^3 batch 4); below it 0.98 / 1.02 (32 @12^3 batch 1, 1,728 positions), 1.17 / 1.29 (32 @8^3 batch 4,
# 2,048); at 16 channels direct 0.8-1.06x of Winograd's time (16 @16^3 batch 1 and 4, @32^3 batch 2).
WINOGRAD_WEIGHT_GRADIENT_3D = (24, 4096)
# A 3-D layer (T x 3 x 3, unit stride, no groups) of at most GROUPED_DIRECT_CHANNELS channels whose max(C, K) x output
# positions (all samples) is at most this runs direct in all three passes: its forward and input gradient ran 1.1-1.6x
# faster than Winograd, 1.7-3.1x faster than im2col (2026-12-06, 3x3x3 'same', ms direct / winograd / im2col: 16 @8^3
# batch 1 0.21 / 0.33 / 0.51 and 0.24 / 0.32 / 0.47, batch 4 0.49 / 0.61 / 0.97 and 0.52 / 0.57 / 1.14, 16 @12^3 batch
# 1 0.40 / 0.55 / 1.23 and 0.42 / 0.57 / 1.00, 32 @8^3 batch 1 0.59 / 0.86 / 0.99 and 0.51 / 0.67 / 1.02); above it
# Winograd wins or ties (32 @8^3 batch 4: 1.58 / 1.28 forward; 16 @12^3 batch 4: 1.29 / 1.33; 32 @12^3 batch 1: 1.11
# / 1.11).
SMALL_3D_DIRECT = 1 << 15

_KERNELS = {
    "direct": {"forward": "direct_forward_cpu", "backward_data": "direct_backward_data_cpu",
               "backward_filter": "direct_backward_filter_cpu"},
    "wide": {"forward": "spread_cpu + wide_direct_cpu", "backward_data": "spread_cpu + wide_direct_cpu",
             "backward_filter": "spread_cpu + wide_direct_filter_cpu"},
    "wide classes": {"backward_data": "spread_cpu + wide_direct_cpu per sub-pixel class"},
    "im2col": {"forward": "im2col_cpu + BLAS GEMM", "backward_data": "BLAS GEMM + col2im_cpu",
               "backward_filter": "im2col_cpu + BLAS GEMM"},
    "depthwise": {"forward": "depthwise_forward_cpu", "backward_data": "depthwise_backward_data_cpu",
                  "backward_filter": "direct_backward_filter_cpu"},
    "winograd": {"forward": "BLAS filter transform + input_transform_cpu + BLAS GEMM + output_transform_cpu",
                 "backward_data": "BLAS filter transform (flipped) + input_transform_cpu + BLAS GEMM + "
                                  "output_transform_cpu",
                 "backward_filter": "input_transform_cpu + grad_transform_cpu + BLAS GEMM + BLAS filter transform"},
}


def _kernels(name):
    def names(g, primitive, dtype):
        kernel = _KERNELS[name][primitive]
        if name == "winograd":
            kernel += " (im2col's when the result holds a NaN or Inf)"
        if name == "im2col" and (g.covers_input or g.is_pointwise):
            kernel = ("BLAS GEMM over the batch (the kernel covers the input: a fully connected layer, no columns)"
                      if g.covers_input else "BLAS GEMM (a 1x1 layer: no columns)")
        if name == "im2col" and im2col._chunk(g, primitive, np.dtype(dtype).itemsize, None):
            kernel += (f", in chunks side by side on {blas.threads()} threads (as column blocks when the chunks' "
                       f"scratch exceeds workspace_limit)")
        if name == "direct" and wide.supports(g, primitive) is None:
            strided = primitive == "backward_data" and not g.stride_d == g.stride_h == g.stride_w == 1
            family = _KERNELS["wide classes" if strided else "wide"][primitive]
            kernel = (f"{family} ({kernel} when its scratch exceeds workspace_limit"
                      + {"forward": ")", "backward_data": " or the weight holds a NaN or an inf)",
                         "backward_filter": "; again when the result holds a NaN or an inf)"}[primitive])
        if name == "depthwise":  # the plane kernels that run where their scratch fits, in order (depthwise.takes)
            unit = g.stride_d == g.stride_h == g.stride_w == 1
            plane = {"forward": "depthwise_wide_cpu", "backward_filter": "depthwise_wide_filter_cpu",
                     "backward_data": "depthwise_wide_cpu" if unit else "depthwise_wide_classes_cpu"}[primitive]
            lanes = {"forward": "depthwise_lanes_cpu", "backward_filter": "depthwise_lanes_filter_cpu",
                     "backward_data": "depthwise_lanes_cpu" if unit else "depthwise_lanes_classes_cpu"}[primitive]
            chain = [{"lanes": lanes, "wide": plane}[f] for f in depthwise.takes(g, primitive)]
            if primitive == "backward_filter" and wide.supports(g, primitive) is None:  # (a multiplier >= 3)
                chain.append(f"direct's {_KERNELS['wide'][primitive]}")
            if chain:
                first, *then = chain + [kernel]
                kernel = (f"{first} ({then[0]} when its scratch exceeds workspace_limit"
                          + "".join(f", {k} when that one's does too" for k in then[1:])
                          + {"forward": ")", "backward_data": " or the weight holds a NaN or an inf)",
                             "backward_filter": "; direct's again when the result holds a NaN or an inf)"}[primitive])
        return (f"{kernel} [{dtype}]",)
    return names


ALGORITHMS = {
    "direct": Algorithm("direct", direct.forward, direct.backward_data, direct.backward_filter,
                        workspace_bytes=direct.workspace_bytes, kernels=_kernels("direct"),
                        doc="direct loops over the batch's padded planes laid end to end (over output rows when "
                            "the scratch does not fit)"),
    "im2col": Algorithm("im2col", im2col.forward, im2col.backward_data, im2col.backward_filter,
                        workspace_bytes=im2col.workspace_bytes, kernels=_kernels("im2col"),
                        doc="column matrix + BLAS GEMM, col2im as a gather; scratch capped by workspace_limit"),
    "depthwise": Algorithm("depthwise", depthwise.forward, depthwise.backward_data, depthwise.backward_filter,
                           supports=depthwise.supports, workspace_bytes=depthwise.workspace_bytes,
                           kernels=_kernels("depthwise"),
                           doc="groups == channels: one plane per task (small planes: 16 interleaved)"),
    "winograd": Algorithm("winograd", winograd.forward, winograd.backward_data, winograd.backward_filter,
                          supports=winograd.supports, workspace_bytes=winograd.workspace_bytes,
                          kernels=_kernels("winograd"),
                          doc="F(4x4, 3x3) for unit-stride layers 3x3 across height and width (2-D, or 3-D of any "
                              "depth taps): 4x fewer multiply-adds, batched BLAS"),
}


def choose(g, primitive):
    """(algorithm name, reason) for algo="auto"; see the module docstring for the cost model."""
    cg, kg = g.C // g.groups, g.K // g.groups
    gemm = "im2col", (f"GEMM of {kg} x {cg * g.T * g.R * g.S} x {g.P * g.Q * g.U} per sample and group: "
                      f"BLAS beats direct loops")
    if g.is_depthwise:
        many = g.T * g.R * g.S >= SINGLE_CHANNEL_TAPS and g.K >= SINGLE_CHANNEL_WIDE_GEMM
        if g.C == 1 and (many or g.K >= SINGLE_CHANNEL_GEMM[primitive] and (
                primitive == "forward" or max(g.stride_d, g.stride_h, g.stride_w) > 1
                or g.D * g.H * g.W >= SINGLE_CHANNEL_POSITIONS)):
            return "im2col", gemm[1] + f" (a single-channel input's layer of {g.K} output channels)"
        if primitive == "backward_filter" and g.D == g.H == 1:
            return "direct", "1-D depthwise weight gradient: direct's per-(k, c) dot products"
        return "depthwise", "depthwise layer (groups == in_channels): memory-bound, plane-per-task kernels"
    if g.covers_input:
        return "im2col", (f"the kernel covers the whole input: one GEMM of {g.N} x {cg * g.T * g.R * g.S} x {kg} "
                          f"over the batch per group (a fully connected layer)")
    channels, positions = WINOGRAD_WEIGHT_GRADIENT_3D
    tiles = _winograd_tiles(g, primitive, cg, kg)
    to_winograd = tiles and g.T > 1 and max(cg, kg) >= channels and g.N * g.P * g.Q * g.U >= positions
    small_3d = (g.T > 1 and winograd.supports(g, primitive) is None  # (as measured: T x 3 x 3, unit stride)
                and max(cg, kg) * g.N * g.P * g.Q * g.U <= SMALL_3D_DIRECT)
    if (g.T * g.R * g.S > 1 and max(cg, kg) <= GROUPED_DIRECT_CHANNELS and wide.supports(g, primitive) is None
            and (g.groups > 1 or primitive == "backward_filter" and not to_winograd or small_3d)):
        if g.groups == 1 and small_3d:
            return "direct", (f"a small 3-D layer, {cg} -> {kg} channels over {g.N * g.P * g.Q * g.U} output "
                              f"positions: direct's wide kernels beat Winograd's transforms and im2col's columns")
        if g.groups == 1:
            return "direct", (f"weight gradient of {cg} -> {kg} channels: direct's wide dot products, 12 a pass, "
                              f"beat a GEMM this thin")
        return "direct", (f"grouped layer of {cg} -> {kg} channels per group: its {g.groups} GEMMs too small for "
                          f"BLAS")
    if kg < 8 and not (g.groups > 1 and cg >= 4 and g.T * g.R * g.S == 1):
        return "direct", f"{kg} output channels per group: too thin for a BLAS GEMM"
    if tiles:
        return "winograd", (f"3x3, unit stride: F(4x4, 3x3) Winograd, 4x fewer multiply-adds than a GEMM "
                            f"({tiles} tiles for {max(cg, kg)} channels per group)")
    return gemm


def _winograd_tiles(g, primitive, cg, kg):
    """Rule 5: the layer's output tiles where winograd takes it (at least 8 channels per group in and out, enough
    tiles per channel), else 0."""
    if winograd.supports(g, primitive) is not None or min(cg, kg) < 8:
        return 0
    tiles = winograd.tile_count(g, primitive)
    per_channel = (WINOGRAD_DEPTH_TILES_PER_CHANNEL if g.T > 1 else WINOGRAD_TILES_PER_CHANNEL)[primitive]
    return tiles if tiles >= per_channel * max(cg, kg) else 0
