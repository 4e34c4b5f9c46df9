#!/usr/bin/env bash
# #23's GPU measurements, first things first (a few minutes of GPU time): the KD step's tokens/s, peak memory
# and MFU (bench/kd_run_report.py) before and after --compile, on the benchmark of bench/gpu_check.sh
# (a GPT-2-small-bodied student, a ~680M teacher, bf16, random weights), then one modern preset at real shapes
# (Qwen2.5-1.5B -> 0.5B, random weights, fused loss, with and without LoRA). Offline: from-scratch sizes and
# tiny local configs, no hub. Unmeasured so far: no GPU was lent to the session that wrote it.
#
#   bash bench/gpu_kd_step.sh [REPORT_DIR]      # default: runs/gpu-kd-step
set -uo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
REPORT=${1:-runs/gpu-kd-step}
PYTHON=${PYTHON:-python3}
mkdir -p "$REPORT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$REPORT/gpu.txt"
COMMON=(--preset toy --responses dataset --dtype bfloat16 --train-examples 6400 --log-every 1 --valid-examples 4
        --valid-max-new-tokens 8 --eval-benchmarks "")
run() {  # name, then train.py flags
  local name=$1; shift
  timeout 240 torchrun --standalone --nproc_per_node 1 "$HERE/train.py" "${COMMON[@]}" "$@" \
    --out "$REPORT/$name" > "$REPORT/$name.log" 2>&1
  echo "$name: exit $?"; grep -h "torch.compile" "$REPORT/$name.log"
  $PYTHON "$HERE/bench/kd_run_report.py" "$REPORT/$name" | tee "$REPORT/$name.report"
}
GPT2=(--teacher scratch:24x1536 --student scratch:12x768 --batch-size 64 --max-steps 60)
run eager "${GPT2[@]}" --no-compile
run compiled "${GPT2[@]}" --compile
# Qwen2.5 shapes (0.5B student, 1.5B teacher) from their configs, random weights: the fused loss at V = 151,936
$PYTHON - "$REPORT" <<'PY'
import sys, os
sys.path.insert(0, os.getcwd())
import data, torch
from model import GPT, config_from_hf
shapes = {"qwen-0.5b": (896, 24, 14, 2, 4864), "qwen-1.5b": (1536, 28, 12, 2, 8960)}
for name, (h, layers, heads, kv, mlp) in shapes.items():
    hf = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": h, "num_hidden_layers": layers,
          "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": mlp,
          "max_position_embeddings": 32768, "tie_word_embeddings": True, "rope_theta": 1e6,
          "bos_token_id": 2047, "eos_token_id": 2047}
    torch.manual_seed(0)
    model = GPT(config_from_hf(hf)).to(torch.bfloat16)
    out = os.path.join(sys.argv[1], name)
    model.save_pretrained(out)
    data.toy_tokenizer().save_pretrained(out)  # the toy's text, ids < 2,048 of the 151,936 rows
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # a Qwen checkpoint reads tokenizer.json
    tok = Tokenizer(models.BPE.from_file(os.path.join(out, "vocab.json"), os.path.join(out, "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(os.path.join(out, "tokenizer.json"))
    assert data.load_tokenizer(out).encode("Hello, Ba!") == data.toy_tokenizer().encode("Hello, Ba!")
PY
QWEN=(--teacher "$REPORT/qwen-1.5b" --student "$REPORT/qwen-0.5b" --batch-size 16 --micro-batch-size 4
      --max-steps 30 --max-len 512)
run qwen-full "${QWEN[@]}"
run qwen-lora "${QWEN[@]}" --lora-rank 64
