#!/usr/bin/env bash
# Everything cnnfast still has to measure on a GPU, in steps that each fit one 10-minute call on the GPU
# machine. A session has 15 minutes of device time, machine start included: run `bench` first (the issue's
# deliverable), then `tests`. Results go to $OUT (or ./gpu-out): logs, JSON, PNG.
#
#   bash bench/gpu_session.sh tests             CUDA tests at real size on both launch paths, torch CUDA tensors
#                                               (the test files run side by side)
#   bash bench/gpu_session.sh sanitize          compute-sanitizer memcheck, racecheck, synccheck (bench/sanitize.py)
#   bash bench/gpu_session.sh host              host cost of one tiny conv2d: Numba vs raw launches, CuPy/Numba/torch
#   bash bench/gpu_session.sh bench [NAME...]   cnnfast bench --device cuda on the anchor set (or the shapes whose
#                                               names contain NAME), table + JSON + roofline PNG, on the raw
#                                               launch path (CNNFAST_CUDA_LAUNCH=numba for Numba's dispatcher)
#   bash bench/gpu_session.sh tiles [NAME...]   the same with the direct algorithm in each tile configuration
#                                               (8x64, 32x64, 64x128, 128x128): the data to retune gemm.choose_tile
#   bash bench/gpu_session.sh planes            the depthwise shapes with each halo-tile block doing 1 (n, c) plane
#                                               and 8 (depthwise.PLANES), with 1 output row per thread against
#                                               4 (depthwise.ROWS), and small planes one per block (GROUP = 1)
#                                               against side by side: setup amortised vs occupancy; the 3x3
#                                               builds at 2 blocks per SM (PLANE_BLOCKS = 2: 128 registers, not
#                                               80); the weight gradient's runs of 8 and 32 output rows
#                                               (depthwise_filter.FILTER_ROWS) against 16
# Exit status: the step's.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
tests|sanitize|host|bench|tiles|planes) ;;
*) sed -n '2,22p' "$0"; exit 2 ;;  # usage, before installing anything
esac
out="${OUT:-gpu-out}"
mkdir -p "$out"
export NUMBA_ENABLE_CUDASIM=0 NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-/tmp/cnnfast-numba}"
pip install --no-deps --no-build-isolation -q -e . > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
step="${1:-}"
shift || true
# bench and tiles launch through the raw path (CNNFAST_CUDA_LAUNCH=raw unless set otherwise), whose PTX disk cache
# is first filled on every core: its 102 specialisations take up to ~2 s each (a tiled GEMM, on this project's CI
# VM), one at a time when they compile on first use
warm() {
    export CNNFAST_CUDA_LAUNCH="${CNNFAST_CUDA_LAUNCH:-raw}"
    if [ "$CNNFAST_CUDA_LAUNCH" = raw ]; then
        start=$SECONDS
        python -m cnnfast.kernels.cuda.ptx --warm > "$out/warm.txt" 2>&1
        echo "PTX cache warmed in $(( SECONDS - start )) s" | tee -a "$out/warm.txt"
    fi
}
case "$step" in
tests)
    # side by side: each file's run compiles the kernels it launches on first use (~2 s per tiled GEMM on one core,
    # ~100 of them in all), which one after another took longer than a call; the PTX report is the same here as on
    # any machine with the toolchain wheels (test_cuda_kernels.py checks it)
    logs=$(mktemp -d)
    pids=()
    for name in ops cuda_kernels bad_inputs fuzz interop reliability tune; do
        pytest -m cuda -q -p no:cacheprovider "tests/test_$name.py" > "$logs/numba-$name.txt" 2>&1 &
        pids+=($!)
    done
    CNNFAST_CUDA_LAUNCH=raw pytest -m cuda -q -p no:cacheprovider tests/test_ops.py tests/test_cuda_kernels.py \
        > "$logs/raw.txt" 2>&1 &
    pids+=($!)
    pytest -q -p no:cacheprovider tests/test_torch.py > "$logs/torch.txt" 2>&1 &
    pids+=($!)
    rc=0
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    for log in "$logs"/numba-*.txt; do echo "== $(basename "$log")"; tail -n 25 "$log"; done \
        > "$out/tests-numba-launch.txt"
    tail -n 40 "$logs/raw.txt" > "$out/tests-raw-launch.txt"
    tail -n 20 "$logs/torch.txt" > "$out/tests-torch.txt"
    grep -E "passed|failed|error" "$logs"/*.txt | sed "s#$logs/##" | tail -n 20
    exit "$rc"
    ;;
sanitize)
    python bench/sanitize.py 2>&1 | tee "$out/sanitize.txt" | tail -30
    exit "${PIPESTATUS[0]}"
    ;;
host)
    pytest -q -p no:cacheprovider bench/test_cuda.py -k host_cost --benchmark-json="$out/host-cost.json" \
        --benchmark-columns=min,median,mean,rounds 2>&1 | tee "$out/host-cost.txt" | tail -30
    exit "${PIPESTATUS[0]}"
    ;;
bench)
    filters=()
    for name in "$@"; do filters+=(--shape "$name"); done
    warm
    tag="$CNNFAST_CUDA_LAUNCH"
    cnnfast bench --device cuda "${filters[@]}" --json "$out/bench-cuda-$tag.json" \
        --plot "$out/roofline-cuda-$tag.png" 2>/dev/null | tee "$out/bench-cuda-$tag.txt"
    exit "${PIPESTATUS[0]}"
    ;;
tiles)
    filters=()
    for name in "$@"; do filters+=(--shape "$name"); done
    warm
    cnnfast bench --device cuda "${filters[@]}" --algo direct --tiles --json "$out/bench-cuda-tiles.json" \
        2>/dev/null | tee "$out/bench-cuda-tiles.txt"
    exit "${PIPESTATUS[0]}"
    ;;
planes)
    rc=0
    # (depthwise.PLANES=8: the defaults)
    for setting in depthwise.PLANES=1 depthwise.PLANES=8 depthwise.ROWS=1 depthwise.GROUP=1 depthwise.PLANE_BLOCKS=2 \
                   depthwise_filter.FILTER_ROWS=8 depthwise_filter.FILTER_ROWS=32; do
        python - "$setting" bench --device cuda --shape depthwise --algo depthwise --json "$out/bench-$setting.json" \
            2>/dev/null <<'EOF' | tee "$out/bench-$setting.txt"
import importlib, sys
target, value = sys.argv[1].split("=")
module, name = target.split(".")
module = importlib.import_module(f"cnnfast.kernels.cuda.{module}")
getattr(module, name)  # the constant exists (a typo, or a constant that moved, fails here)
setattr(module, name, int(value))
from cnnfast import cli
sys.exit(cli.main(sys.argv[2:]))
EOF
        rc=$(( rc || PIPESTATUS[0] ))
    done
    exit "$rc"
    ;;
*)
    sed -n '2,22p' "$0"
    exit 2
    ;;
esac
