#!/usr/bin/env bash
# Everything cnnfast still has to measure on a GPU, in steps that each fit one 10-minute call on the GPU
# machine. A session has 15 minutes of device time, machine start included: run `bench` first (the issue's
# deliverable), then `tests`. Results go to $OUT (or ./gpu-out): at most 8 files (the device tool's limit), each
# named in letters, digits, '.', '_' and '-'; every Python step runs python3 (the GPU machine's, with torch).
#
#   bash bench/gpu_session.sh tests             CUDA tests at real size on both launch paths, torch CUDA tensors
#                                               (the test files run side by side, stopped within the call)
#   bash bench/gpu_session.sh sanitize [TOOL]   compute-sanitizer: memcheck (or racecheck, synccheck: one per call)
#                                               over every kernel specialisation (bench/sanitize.py)
#   bash bench/gpu_session.sh host              host cost of one tiny conv2d: Numba vs raw launches (replayed or in full), CuPy/Numba/torch
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
# GPU_DEADLINE (seconds, default 560): when tests, sanitize and planes stop, and past which bench and tiles start no
# layer (their summary and plot then cover what was measured), counted from this script's start; set it below what
# the call has left (the device tool's budget_left_s, less the machine's start) so the results come back.
# Exit status: the step's.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
tests|sanitize|host|bench|tiles|planes) ;;
*) sed -n '2,27p' "$0"; exit 2 ;;  # usage, before installing anything
esac
out="${OUT:-gpu-out}"
mkdir -p "$out"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 NUMBA_ENABLE_CUDASIM=0 NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-/tmp/cnnfast-numba}"
deadline="${GPU_DEADLINE:-560}"
# (offline: no index, no version check)
"$PY" -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -q -e . \
    > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
{  # the machine and the CUDA stack (NVVM's PTX version must load on the driver for the raw launch path)
    nvidia-smi
    "$PY" -m pip list --disable-pip-version-check 2>/dev/null | grep -iE "^(numba|numba-cuda|cupy|torch|cuda-|nvidia-)"
} > "$out/machine.txt" 2>&1
step="${1:-}"
shift || true
# The raw launch path (CNNFAST_CUDA_LAUNCH=raw) loads each kernel's PTX from a disk cache, first filled here on
# every core: its ~100 specialisations take up to ~2 s each (a tiled GEMM, on this project's CI VM), one at a time
# when they compile on first use.
warm_ptx() {
    start=$SECONDS
    "$PY" -m cnnfast.kernels.cuda.ptx --warm > "$out/warm.txt" 2>&1
    echo "PTX cache warmed in $(( SECONDS - start )) s" | tee -a "$out/warm.txt"
    ptx_dir=$(sed -n 's/.* compiled into //p' "$out/warm.txt")  # (the PTX version NVVM wrote: the driver must load it)
    grep -h -m1 '^\.version' "$ptx_dir"/*.ptx 2>/dev/null | head -n 1 | sed 's/^/PTX /' | tee -a "$out/warm.txt"
}
left() {  # seconds to GPU_DEADLINE less $1, at least 1 (bench's --deadline, counted from its own start: the margin
    # covers Python's start and imports before it, and the summary and plot after its last layer)
    echo $(( deadline - SECONDS - $1 > 0 ? deadline - SECONDS - $1 : 1 ))
}
raw_by_default() {  # bench and tiles time the raw path unless CNNFAST_CUDA_LAUNCH says otherwise
    export CNNFAST_CUDA_LAUNCH="${CNNFAST_CUDA_LAUNCH:-raw}"
    if [ "$CNNFAST_CUDA_LAUNCH" = raw ]; then warm_ptx; fi
}
case "$step" in
tests)
    # side by side, each file's run stopped at the deadline, so that the tails below come back within the call;
    # both runs leave out the tests that read the PTX table (compile-only: CI runs them; here the table would
    # compile on the cores the tests need), the raw run also the raw specialisations' (the Numba run has them)
    warm_ptx
    left=$(( deadline - SECONDS ))
    if [ "$left" -lt 60 ]; then echo "tests: ${left} s left before GPU_DEADLINE=$deadline: not started"; exit 3; fi
    logs=$(mktemp -d)
    table="ptx_9 or halo_builds or integer_division or unrolled_loop or raw_spec"
    pids=()
    for name in ops cuda_kernels bad_inputs fuzz interop reliability tune; do
        CNNFAST_CUDA_LAUNCH=numba timeout "$left" "$PY" -m pytest -m cuda -q -p no:cacheprovider "tests/test_$name.py" \
            -k "not ($table)" > "$logs/numba-$name.txt" 2>&1 &
        pids+=($!)
    done
    CNNFAST_CUDA_LAUNCH=raw timeout "$left" "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/test_ops.py \
        tests/test_cuda_kernels.py -k "not ($table)" > "$logs/raw.txt" 2>&1 &
    pids+=($!)
    timeout "$left" "$PY" -m pytest -q -p no:cacheprovider tests/test_torch.py > "$logs/torch.txt" 2>&1 &
    pids+=($!)
    rc=0
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    for log in "$logs"/numba-*.txt; do echo "== $(basename "$log")"; tail -n 25 "$log"; done \
        > "$out/tests-numba-launch.txt"
    tail -n 40 "$logs/raw.txt" > "$out/tests-raw-launch.txt"
    tail -n 20 "$logs/torch.txt" > "$out/tests-torch.txt"
    grep -E "[0-9]+ (passed|failed|errors?)( |,|$)" "$logs"/*.txt | sed "s#$logs/##" | tail -n 20
    exit "$rc"
    ;;
sanitize)
    # one tool per call, as a rule (each runs every specialisation once under the sanitizer; the tools named share
    # the call's time); the child launches through the raw path, its PTX cached here first, with CuPy's memory pool
    # off (exact-size allocations for memcheck)
    warm_ptx
    tools=("${@:-memcheck}")
    CNNFAST_CUDA_LAUNCH=raw "$PY" bench/sanitize.py --tools "${tools[@]}" --log-dir "$out" \
        --timeout $(( (deadline - SECONDS) / ${#tools[@]} )) 2>&1 | tee "$out/sanitize.txt" | tail -30
    exit "${PIPESTATUS[0]}"
    ;;
host)
    "$PY" -m pytest -q -p no:cacheprovider bench/test_cuda.py -k host_cost --benchmark-json="$out/host-cost.json" \
        --benchmark-columns=min,median,mean,rounds 2>&1 | tee "$out/host-cost.txt" | tail -30
    exit "${PIPESTATUS[0]}"
    ;;
bench)
    filters=()
    for name in "$@"; do filters+=(--shape "$name"); done
    raw_by_default
    tag="$CNNFAST_CUDA_LAUNCH"
    "$PY" -m cnnfast.cli bench --device cuda "${filters[@]}" --json "$out/bench-cuda-$tag.json" \
        --deadline "$(left 30)" --plot "$out/roofline-cuda-$tag.png" 2> "$out/bench-cuda-$tag-stderr.txt" \
        | tee "$out/bench-cuda-$tag.txt"
    rc=${PIPESTATUS[0]}
    tail -n 5 "$out/bench-cuda-$tag-stderr.txt"
    exit "$rc"
    ;;
tiles)
    filters=()
    for name in "$@"; do filters+=(--shape "$name"); done
    raw_by_default
    "$PY" -m cnnfast.cli bench --device cuda "${filters[@]}" --algo direct --tiles --json "$out/bench-cuda-tiles.json" \
        --deadline "$(left 30)" 2> "$out/bench-cuda-tiles-stderr.txt" | tee "$out/bench-cuda-tiles.txt"
    rc=${PIPESTATUS[0]}
    tail -n 5 "$out/bench-cuda-tiles-stderr.txt"
    exit "$rc"
    ;;
planes)
    # every setting's table into planes.txt (after a '== setting' line), their rows into one planes.json; on Numba's
    # dispatcher (the raw path's PTX cache is keyed by the source, not by a constant set at run time)
    export CNNFAST_CUDA_LAUNCH=numba
    rc=0
    runs=$(mktemp -d)
    # (depthwise.PLANES=8: the defaults)
    for setting in depthwise.PLANES=1 depthwise.PLANES=8 depthwise.ROWS=1 depthwise.GROUP=1 depthwise.PLANE_BLOCKS=2 \
                   depthwise_filter.FILTER_ROWS=8 depthwise_filter.FILTER_ROWS=32; do
        if [ $(( deadline - SECONDS )) -lt 90 ]; then  # (each setting's run took ~40-70 s, estimated)
            echo "== $setting: skipped, GPU_DEADLINE=$deadline reached" | tee -a "$out/planes.txt"
            rc=3
            continue
        fi
        echo "== $setting" | tee -a "$out/planes.txt" >> "$out/planes-stderr.txt"
        "$PY" - "$setting" bench --device cuda --shape depthwise --algo depthwise --json "$runs/$setting.json" \
            2>> "$out/planes-stderr.txt" <<'EOF' | tee -a "$out/planes.txt"
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
    "$PY" - "$runs" "$out/planes.json" <<'EOF'
import glob, json, os, sys
runs = {os.path.basename(p)[:-len(".json")]: json.load(open(p)) for p in sorted(glob.glob(f"{sys.argv[1]}/*.json"))}
json.dump(runs, open(sys.argv[2], "w"), indent=1)
EOF
    exit "$rc"
    ;;
esac
