#!/usr/bin/env bash
# The GPU checks, in one go: a short bf16 KD run under torchrun with its tokens/s, peak memory and
# MFU (bench/kd_run_report.py), model.py against transformers in bf16 (bench/bench_model.py), then
# the test suite twice: with the GPU hidden (the suite's CPU semantics, as CI runs it) and with it
# visible. Offline: the models are from-scratch sizes on the toy benchmark's byte vocabulary.
#
#   bash bench/gpu_check.sh [REPORT_DIR]      # default: runs/gpu-check
set -uo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
REPORT=${1:-runs/gpu-check}
KD_RUN=${KD_RUN:-runs/gpu-check-kd}  # the KD run's directory (its last.pt is ~1 GB)
PYTHON=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$REPORT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$REPORT/gpu.txt"

# A GPT-2-small-bodied student, a ~680M-parameter teacher (24 x 1536), bf16, 64 sequences a step
timeout 120 torchrun --standalone --nproc_per_node 1 "$HERE/train.py" --preset toy \
  --teacher scratch:24x1536 --student scratch:12x768 --responses dataset --dtype bfloat16 \
  --batch-size 64 --train-examples 6400 --max-steps 60 --log-every 1 --valid-examples 4 \
  --valid-max-new-tokens 8 --eval-benchmarks "" --out "$KD_RUN" > "$REPORT/kd.log" 2>&1
echo "kd run: exit $?"
cp "$KD_RUN/log.jsonl" "$REPORT/kd-log.jsonl"
$PYTHON "$HERE/bench/kd_run_report.py" "$KD_RUN" | tee "$REPORT/kd_report.txt"
timeout 120 $PYTHON "$HERE/bench/bench_model.py" --device cuda --dtype bfloat16 --batch 16 \
  --seq 1024 | tee "$REPORT/bench_model.txt"

# The suite: first as CI runs it (no GPU), then with the GPU visible
(cd "$HERE" && CUDA_VISIBLE_DEVICES="" timeout 180 $PYTHON -m pytest -q -p no:cacheprovider \
  -n 8 tests > "$REPORT/suite-cpu.log" 2>&1; echo "suite, GPU hidden: exit $?")
tail -3 "$REPORT/suite-cpu.log"
(cd "$HERE" && timeout 150 $PYTHON -m pytest -q -p no:cacheprovider -n 8 --timeout 120 tests \
  > "$REPORT/suite-gpu.log" 2>&1; echo "suite, GPU visible: exit $?")
grep -E "^(FAILED|ERROR)|passed|failed" "$REPORT/suite-gpu.log" | tail -30
