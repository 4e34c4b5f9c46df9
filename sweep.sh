#!/usr/bin/env bash
# The paper's grid: every objective x every KD temperature, each best checkpoint evaluated over the
# preset's sampling seeds, then the tables and plots of `python evaluate.py summarize`.
#
#   bash sweep.sh                                  # PRESET=gpt2 on every GPU of this machine
#   PRESET=toy bash sweep.sh                       # the offline toy study, 3 seeds, on 2 CPU cores
#   PRESET=toy RESPONSES=dataset bash sweep.sh     # on dataset responses, into runs/toy-dataset
#   PRESET=opt NPROC=8 LOSSES="fkl rkl" TAUS="1 3" bash sweep.sh
#   DRY_RUN=1 bash sweep.sh                        # print every command, run nothing
#   PRESET=toy STUDENT_GEN_RATIO=0.5 LOSSES="fkl rkl" TAUS="1 2 3" bash sweep.sh  # on-policy steps
#
# Finished runs (finished.json) are not trained again, evaluated ones (best/eval/results.json) not
# evaluated again, and interrupted ones resume, so the same command continues an interrupted sweep.
# Sweeps can run side by side (one per GPU, say): a cell another process is training is skipped, and
# the teacher's responses and the toy's stages are made by one process while the others wait. EXTRA="--micro-batch-size 4" passes flags to every
# train.py call.
# RESPONSES=teacher (the paper's setting, default) trains on the teacher's responses: the first run
# samples them once (shared out over its NPROC processes) into data/responses/, and every later run
# reads that file; runs are sequential, so none races to make them.
# STUDENT_GEN_RATIO (default 0, the paper's off-policy setting; beyond the paper) is train.py's
# --student-gen-ratio: the share of steps whose KD loss is taken on the student's own sampled
# responses; its runs go to runs/<preset>-gen<ratio>.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)  # run directories are relative to where you call it from

fail() { echo "error: $*" >&2; exit 2; }
PRESET=${PRESET:-gpt2}
case "$PRESET" in gpt2|opt|toy|toy-bytes|qwen2.5|llama3.2|smollm2|qwen3) ;;
  *) fail "PRESET must be gpt2, opt, toy, toy-bytes, qwen2.5, llama3.2, smollm2 or qwen3, got '$PRESET'" ;; esac
LOSSES=${LOSSES:-"fkl rkl sym js sfkl srkl akl ab drkl tvd"}
TAUS=${TAUS:-"1 1.5 2 2.5 3 3.5 4"}
TAU1_ONLY=${TAU1_ONLY:-"ab drkl"}          # the paper reports these at tau = 1 only
RESPONSES=${RESPONSES:-teacher}
STUDENT_GEN_RATIO=${STUDENT_GEN_RATIO:-0}
[[ "$STUDENT_GEN_RATIO" =~ ^(0*\.[0-9]+|0+(\.[0-9]*)?|1(\.0*)?)$ ]] ||
  fail "STUDENT_GEN_RATIO must be a number in [0, 1], got '$STUDENT_GEN_RATIO'"
case "$RESPONSES" in
  teacher) RUNS_NAME=runs/$PRESET ;;
  dataset) RUNS_NAME=runs/$PRESET-dataset ;;
  *) fail "RESPONSES must be teacher or dataset, got '$RESPONSES'" ;;
esac
GEN=()
if [[ ! "$STUDENT_GEN_RATIO" =~ ^[0.]+$ ]]; then  # on-policy steps: a grid of its own
  GEN=(--student-gen-ratio "$STUDENT_GEN_RATIO")
  RUNS_NAME=$RUNS_NAME-gen$STUDENT_GEN_RATIO
fi
RUNS=${RUNS:-$RUNS_NAME}
EXTRA=${EXTRA:-}
PYTHON=${PYTHON:-python}
# Each preset's teacher and student (config.py's PRESETS; tests/test_train.py checks the two agree),
# benchmarks, processes and seeds
case "$PRESET" in
  gpt2) TEACHER=MiniLLM/teacher-gpt2-1.5B; STUDENT=gpt2 ;;
  opt) TEACHER=runs/opt/teacher/best; STUDENT=facebook/opt-1.3b ;;
  toy) TEACHER=runs/toy/teacher/best; STUDENT=runs/toy/student-init/best ;;
  toy-bytes) TEACHER=runs/toy-bytes/teacher/best; STUDENT=runs/toy-bytes/student-init/best ;;
  qwen2.5) TEACHER=runs/qwen2.5/teacher/best; STUDENT=Qwen/Qwen2.5-0.5B ;;
  llama3.2) TEACHER=runs/llama3.2/teacher/best; STUDENT=meta-llama/Llama-3.2-1B ;;
  smollm2) TEACHER=runs/smollm2/teacher/best; STUDENT=HuggingFaceTB/SmolLM2-360M ;;
  qwen3) TEACHER=runs/qwen3/teacher/best; STUDENT=Qwen/Qwen3-0.6B-Base ;;
esac
if [ "$PRESET" = toy ] || [ "$PRESET" = toy-bytes ]; then
  BENCHMARKS=${BENCHMARKS:-toy,toy-hard}
  NPROC=${NPROC:-1}
  SEEDS=${SEEDS:-"1 2 3"}                  # training seeds: the toy study's three
  EVAL_SEEDS=${EVAL_SEEDS:-10,20,30}       # sampling seeds of the evaluation
else
  BENCHMARKS=${BENCHMARKS:-dolly,self-inst,vicuna,sinst,uinst}
  NPROC=${NPROC:-$($PYTHON -c "import torch; print(max(torch.cuda.device_count(), 1))")}
  SEEDS=${SEEDS:-"1"}                      # training seeds
  EVAL_SEEDS=${EVAL_SEEDS:-10,20,30,40,50} # the protocol's sampling seeds
fi
# Every setting is checked before the first run (also with DRY_RUN): a typo never runs half a grid
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || fail "NPROC must be a whole number >= 1, got '$NPROC'"
[[ -n "${LOSSES// /}" && -n "${TAUS// /}" && -n "${SEEDS// /}" ]] ||
  fail "LOSSES, TAUS and SEEDS must not be empty"
PYTHONPATH="$HERE" $PYTHON - "$LOSSES" "$TAUS" "$SEEDS" "$EVAL_SEEDS" "$BENCHMARKS" <<'CHECK' || exit 2
import math, sys
import checks, data, losses
names, taus, seeds, eval_seeds, benchmarks = sys.argv[1:]
bad = [loss for loss in names.split() if loss not in losses.LOSSES]
if bad:
    checks.fail(f"LOSSES: unknown objective {bad[0]!r}: choose from {' '.join(losses.LOSSES)}")
for tau in taus.split():
    try:
        ok = math.isfinite(float(tau)) and float(tau) > 0
    except ValueError:
        ok = False
    if not ok:
        checks.fail(f"TAUS: {tau!r} is not a number > 0")
for seed in seeds.split():
    if not seed.isdigit():
        checks.fail(f"SEEDS: {seed!r} is not a whole number")
checks.seeds("EVAL_SEEDS", eval_seeds)
if not data.check_benchmarks("BENCHMARKS", benchmarks, data_dir=data.DATA_DIR, split=None):
    checks.fail("BENCHMARKS names no benchmark")
CHECK
is_one() { awk -v t="$1" 'BEGIN { exit !(t + 0 == 1) }'; }  # numerically: "1", "1.0" and "1.00" alike

run() {  # print, then run unless DRY_RUN is set
  echo "+ $*"
  if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}

if [ "$NPROC" -gt 1 ]; then LAUNCH=(torchrun --nproc_per_node "$NPROC"); else LAUNCH=("$PYTHON"); fi

evaluate() {  # evaluate() MODEL_DIR: the protocol's sampled ROUGE-L over every benchmark and seed
  if [ -f "$1/eval/results.json" ]; then echo "= $1 already evaluated"; return; fi
  run "$PYTHON" "$HERE/evaluate.py" --model "$1" --benchmarks "$BENCHMARKS" --seeds "$EVAL_SEEDS" \
    --out "$1/eval"
}

for seed in $SEEDS; do
  for loss in $LOSSES; do
    for tau in $TAUS; do
      if [[ " $TAU1_ONLY " == *" $loss "* ]] && ! is_one "$tau"; then continue; fi
      out="$RUNS/$loss-tau$tau-seed$seed"
      # only a whole run is skipped
      if [ ! -f "$out/finished.json" ] || [ ! -f "$out/best/config.json" ]; then
        resume=()
        if [ -f "$out/last.pt" ]; then resume=(--resume); fi
        # train.py evaluates best/ itself when it finishes (one process start less per run)
        status=0
        # shellcheck disable=SC2086
        run "${LAUNCH[@]}" "$HERE/train.py" --preset "$PRESET" --loss "$loss" --tau "$tau" \
          --seed "$seed" --out "$out" --responses "$RESPONSES" --eval-benchmarks "$BENCHMARKS" \
          --eval-seeds "$EVAL_SEEDS" "${GEN[@]}" "${resume[@]}" $EXTRA || status=$?
        if [ "$status" = 75 ]; then  # another sweep is running this cell (train.py's claim on --out)
          echo "= $out is busy: another process is training it, skipped"
          continue
        elif [ "$status" != 0 ]; then
          exit "$status"
        fi
      fi
      evaluate "$out/best"  # a run trained earlier without its evaluation
    done
  done
done

# The teacher's row of the tables: a local teacher directory is scored in place; a hub teacher into
# $RUNS/teacher.
if [ -d "$TEACHER" ]; then
  evaluate "$TEACHER"
else
  if [ -z "${DRY_RUN:-}" ]; then
    mkdir -p "$RUNS/teacher/best"
    echo "{\"mode\": \"sft\", \"student\": \"$TEACHER\"}" > "$RUNS/teacher/args.json"
  fi
  if [ ! -f "$RUNS/teacher/best/eval/results.json" ]; then
    run "$PYTHON" "$HERE/evaluate.py" --model "$TEACHER" --benchmarks "$BENCHMARKS" \
      --seeds "$EVAL_SEEDS" --out "$RUNS/teacher/best/eval"
  fi
fi
# A student made by SFT inside the project (the toy's warm start) gets a row too: what distillation
# starts from.
if [ -d "$STUDENT" ]; then evaluate "$STUDENT"; fi
run "$PYTHON" "$HERE/evaluate.py" summarize "$RUNS"
