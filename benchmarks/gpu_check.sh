#!/usr/bin/env bash
# The GPU check of issue 18, one command, within 8 minutes (so that it can be
# run twice in a 15-minute lease). It writes DIR/gpu.md (results/gpu.md's
# layout) and the logs and JSON it is made from into DIR:
#
#   1. devices and versions;
#   2. ResNet-20, batch 128, float / bsq (8 bits everywhere) / finetune, the
#      dataset on the device: the step, a 390-step epoch through the rolled
#      lax.scan (3 dispatches of 130), compile time, the host pass, peak GPU
#      memory;
#   3. main.py on the real Fashion-MNIST (all 60,000 training images), every
#      stage for 1-2 epochs: wall time per stage and the final table;
#   4. the part of the test suite that is not CPU-specific, on the GPU, with
#      the counts (in the time that is left; what finished is counted).
#
# Here (the development machine), once, to gather what travels:
#   bash benchmarks/gpu_check.sh --prepare
# fills .gpu_carry/ (ignored by git): the wheels of the Python packages the
# GPU machine lacks (ml_collections, tensorboardX; pure Python) and the four
# Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist). Then, on the
# GPU machine (device tool: carry [".gpu_carry"]):
#   bash benchmarks/gpu_check.sh --out "$OUT"
# and copy $OUT/gpu.md to results/gpu.md. A CPU dry run of the same script at
# tiny sizes (what tests/test_gpu_check.py runs):
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/gpu_check
#
# jax: the GPU machine has Python 3.12 with jax 0.11.2 (CUDA 13), flax, optax,
# orbax-checkpoint and chex of its own; the project pins jax 0.10.2. The code
# uses only APIs that both versions have (the pmapped epoch, jax.sharding,
# Device.memory_stats); the script installs nothing over the machine's jax
# stack (the carried wheels go into their own folder on PYTHONPATH), and
# gpu.md records every version. tests/conftest.py sets JAX_PLATFORMS=cpu and
# CUDA_VISIBLE_DEVICES="" only where unset, so the tests here set both.
# Environment: GPU_CHECK_BUDGET_S (all steps, default 450), GPU_CHECK_BENCH_S
# (step 2, 170), GPU_CHECK_PIPE_S (step 3, 150), PYTHON (default python3).
# A step cut short by its time still reports what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."

CARRY=.gpu_carry
OUT= DRY=0 PREPARE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=${2:-}; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --prepare) PREPARE=1; shift ;;
    *) echo "error: unknown argument $1; usage: $0 --prepare | [--dry-run] --out DIR" >&2
       exit 2 ;;
  esac
done
PY=${PYTHON:-python3}

if [ "$PREPARE" = 1 ]; then
  grep -qxF "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
  mkdir -p "$CARRY/whl" "$CARRY/fashion-mnist"
  # Versions as requirements.txt pins them; both are pure-Python wheels, and
  # their own needs (absl-py, PyYAML, numpy, packaging, protobuf) are there.
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp -d "$CARRY/whl" \
    "$(grep -i '^ml_collections==' requirements.txt)" \
    "$(grep -i '^tensorboardX==' requirements.txt)" || exit 1
  cp /usr/share/datasets/fashion-mnist/*-ubyte* "$CARRY/fashion-mnist/" || {
    echo "error: no Fashion-MNIST in /usr/share/datasets/fashion-mnist; apt-get install -y dataset-fashion-mnist" >&2
    exit 1; }
  du -sh "$CARRY"
  echo "on the GPU machine, carrying $CARRY: bash benchmarks/gpu_check.sh --out \"\$OUT\""
  exit 0
fi
[ -n "$OUT" ] || { echo "error: --out DIR is required" >&2; exit 2; }
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
stamp() { echo "== $* ($(( $(date +%s) - START )) s)"; }

if ls "$CARRY"/whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/gpu_check_site "$CARRY"/whl/*.whl \
    && export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
# Fashion-MNIST: FASHION_DIR, else the carried files, else Debian's folder
# (the dry run: made-up files unless FASHION_DIR is set).
FASHION=()
if [ -n "${FASHION_DIR:-}" ]; then
  FASHION=(--fashion-dir "$FASHION_DIR")
elif [ "$DRY" = 0 ] && [ -d "$CARRY/fashion-mnist" ]; then
  FASHION=(--fashion-dir "$CARRY/fashion-mnist")
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  DRYFLAG=--dry-run
  BENCH_S=120 PIPE_S=120
  TESTS="tests/test_bitplanes.py -k encode"
  TEST_ENV=(JAX_PLATFORMS=cpu)
else
  DRYFLAG=
  # Seconds for steps 2 and 3 (a rerun can move them); the tests get the rest.
  BENCH_S=${GPU_CHECK_BENCH_S:-170} PIPE_S=${GPU_CHECK_PIPE_S:-150}
  # Not here: what needs 8 forced CPU devices, several processes over gloo,
  # the CPU allocator and CPU speed trials, main.py's input checks (no
  # device work), this check itself, and what needs tensorflow-datasets
  # (CIFAR and ImageNet loading: not on that machine, too large to carry).
  TESTS="tests/test_epoch_loops.py tests/test_train.py tests/test_layers.py
    tests/test_bitplanes.py tests/test_optim.py tests/test_scheme.py
    tests/test_stream.py tests/test_budget.py tests/test_export.py
    tests/test_conv.py tests/test_bf16_planes.py tests/test_configs.py
    tests/test_imagenet.py
    --deselect tests/test_train.py::test_same_parameters_on_one_and_eight_devices
    --deselect tests/test_stream.py::test_too_few_images_and_missing_imagenet_are_one_line_errors
    --deselect tests/test_imagenet.py::test_imagenet_config_runs_bsq_host_pass_finetune_on_8_devices"
  # Several test processes share the GPU: no preallocation.
  TEST_ENV=(JAX_PLATFORMS=cuda CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_PREALLOCATE=false)
fi

stamp "1. devices and versions"
timeout 120 "$PY" benchmarks/gpu_check.py versions --out "$OUT" || echo "versions: exit $?"
command -v nvidia-smi >/dev/null && nvidia-smi

stamp "2. ResNet-20 step and epoch"
timeout $(( BENCH_S + 30 )) "$PY" benchmarks/gpu_check.py bench --out "$OUT" \
  --budget-s "$BENCH_S" $DRYFLAG || echo "bench: exit $?"

stamp "3. Fashion-MNIST through main.py"
"$PY" benchmarks/gpu_check.py pipeline --out "$OUT" "${FASHION[@]}" \
  --budget-s "$PIPE_S" $DRYFLAG >/dev/null || echo "pipeline: exit $?"

stamp "4. tests"
TIMED_OUT=
TEST_S=$(( $(left) - 20 ))
XDIST=
if [ "$DRY" = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
  XDIST="-n 4 --dist loadfile"
fi
if [ "$TEST_S" -gt 10 ]; then
  # -o addopts: not pyproject's `-n auto`, which needs pytest-xdist (not
  # always on that machine) and would start workers for the dry run's few.
  # shellcheck disable=SC2086
  env "${TEST_ENV[@]}" timeout "$TEST_S" "$PY" -m pytest -v -p no:cacheprovider \
    -o addopts= $XDIST $TESTS > "$OUT/tests.log" 2>&1
  rc=$?
  [ "$rc" = 124 ] && TIMED_OUT=--tests-timed-out
  tail -n 3 "$OUT/tests.log"
else
  echo "no time left for the tests" > "$OUT/tests.log"
fi

stamp "5. report"
"$PY" benchmarks/gpu_check.py report --out "$OUT" $TIMED_OUT \
  --command "bash benchmarks/gpu_check.sh $DRYFLAG --out $OUT" \
  --tests "$(echo $TESTS)" > /dev/null
stamp "done: $OUT/gpu.md"
sleep 1  # lets tee write the last lines
