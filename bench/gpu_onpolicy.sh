#!/usr/bin/env bash
# What on-policy steps cost on a GPU: gpu_check.sh's bf16 KD run (a ~680M teacher, a
# GPT-2-small-bodied student, 64 sequences a step) at --student-gen-ratio 0, 0.5 and 1, timed end to
# end. The runs differ only in λ, so (wall time at λ - wall time at 0) / on-policy steps is what one
# on-policy step adds: the student's sampling (KV cache, up to --max-len - --max-prompt-len = 256
# tokens; a from-scratch student rarely says EOS, so this is near the worst case) and the teacher's
# scoring of the samples. Then one λ = 1 run with --fsdp (sampling from the gathered copy) and the
# on-policy tests with the GPU visible.
#
#   bash bench/gpu_onpolicy.sh [REPORT_DIR]      # default: runs/gpu-onpolicy
set -uo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
REPORT=${1:-runs/gpu-onpolicy}
STEPS=${STEPS:-40}
PYTHON=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$REPORT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$REPORT/gpu.txt"

kd_run() {  # kd_run NAME EXTRA_FLAGS...: one timed run into $REPORT/NAME
  local name=$1; shift
  rm -rf "${REPORT:?}/$name"
  local start=$SECONDS
  timeout 200 torchrun --standalone --nproc_per_node 1 "$HERE/train.py" --preset toy \
    --teacher scratch:24x1536 --student scratch:12x768 --responses dataset --dtype bfloat16 \
    --batch-size 64 --train-examples 6400 --max-steps "$STEPS" --log-every 1 --valid-examples 4 \
    --valid-max-new-tokens 8 --eval-benchmarks "" --out "$REPORT/$name" "$@" \
    > "$REPORT/$name.log" 2>&1
  echo "$name: exit $?, $((SECONDS - start)) s wall" | tee -a "$REPORT/walls.txt"
  rm -f "$REPORT/$name/last.pt"  # ~1 GB, not needed for the report
}

rm -f "$REPORT/walls.txt"
kd_run lambda0 --student-gen-ratio 0
kd_run lambda0.5 --student-gen-ratio 0.5
kd_run lambda1 --student-gen-ratio 1
kd_run lambda1-fsdp --student-gen-ratio 1 --fsdp --max-steps 10

$PYTHON - "$REPORT" <<'EOF' | tee "$REPORT/onpolicy_report.txt"
import json, re, sys
from pathlib import Path
report = Path(sys.argv[1])
walls = dict(re.match(r"(\S+): exit (\d+), (\d+) s wall", line).group(1, 3)
             for line in (report / "walls.txt").read_text().splitlines())
base = int(walls["lambda0"])
for name, wall in walls.items():
    rows = [json.loads(l) for l in (report / name / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r]
    on = sum(bool(r.get("on_policy")) for r in steps)
    lens = [r["sampled_len"] for r in steps if r.get("sampled_len")]  # each step's mean
    line = f"{name}: {len(steps)} steps, {on} on-policy, {int(wall)} s wall"
    if lens:
        line += f", mean sampled length {sum(lens) / len(lens):.0f} tokens"
    if on and "fsdp" not in name:
        line += f"; +{(int(wall) - base) / on:.2f} s per on-policy step over λ = 0"
    peak = max((r.get("peak_mem_gib", 0) for r in steps), default=0)
    print(line + f", peak {peak:.2f} GiB")
EOF

(cd "$HERE" && timeout 150 $PYTHON -m pytest -q -p no:cacheprovider tests/test_on_policy.py \
  > "$REPORT/tests-onpolicy-gpu.log" 2>&1; echo "on-policy tests, GPU visible: exit $?")
tail -3 "$REPORT/tests-onpolicy-gpu.log"
