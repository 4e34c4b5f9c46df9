"""Tokens/s, peak memory and MFU of a finished train.py KD run, from its log.jsonl and args.json.

    torchrun --nproc_per_node 1 train.py --preset toy --teacher scratch:24x1024 \
        --student scratch:12x768 --responses dataset --dtype bfloat16 --max-steps 60 \
        --log-every 1 --out runs/gpu-kd
    python bench/kd_run_report.py runs/gpu-kd

tokens/s: the median over logged steps after the first 10 (warm-up), real (non-padding) tokens of
all processes. MFU: model FLOP/s of those tokens / the FLOP/s of a large matmul in the run's dtype
measured here (8192^2 on GPU, close to the card's dense peak; 2048^2 on CPU). Model FLOPs per token:
the student's forward and backward, 6 N_student, and the teacher's forward, 2 N_teacher, N being
the parameters of the matrix products (the tied head included, position tables not). Attention's
own FLOPs are left out, so the figure is a lower bound.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import responses  # noqa: E402
import toy  # noqa: E402
import train  # noqa: E402
from model import GPT, config_from_hf  # noqa: E402


def matmul_params(name, vocab_size):
    """Parameters of the matrix products of a from-scratch size or a checkpoint directory."""
    if toy.is_scratch(name):
        with torch.device("meta"):
            model = train.load_model(name, torch.float32, "meta", vocab_size)
    else:
        cfg = config_from_hf(json.loads(Path(name, "config.json").read_text()))
        with torch.device("meta"):
            model = GPT(cfg)
    return sum(p.numel() for n, p in model.named_parameters()
               if p.dim() == 2 and "pos_emb" not in n)


def matmul_flops(device, dtype):
    """FLOP/s of a large square matmul in `dtype` on `device`: the best of 5 after a warm-up."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a train.py --mode kd run directory")
    p.add_argument("--warmup", type=int, default=10, help="logged steps left out at the start")
    args = p.parse_args()
    run = Path(args.run)
    settings = json.loads((run / "args.json").read_text())
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r and r["step"] > args.warmup]
    if not steps:
        raise SystemExit(f"error: {run}/log.jsonl has no step after {args.warmup}: run longer")
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steps)
    vocab = 257 if toy.is_scratch(settings["student"]) else None
    n_student = matmul_params(settings["student"], vocab)
    n_teacher = matmul_params(settings["teacher"], vocab)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, settings.get("dtype") or responses.default_dtype(device))
    peak = matmul_flops(device, dtype)
    model_flops = tokens_per_s * (6 * n_student + 2 * n_teacher)
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    memory = max((r.get("peak_mem_gib", 0) for r in rows), default=0)
    print(f"{card}, {dtype}: student {n_student / 1e6:.1f}M, teacher {n_teacher / 1e6:.1f}M "
          f"matmul parameters; {tokens_per_s:,.0f} tokens/s (median of {len(steps)} steps); "
          f"peak memory {memory:.2f} GiB; model {model_flops / 1e12:.1f} TFLOP/s of a measured "
          f"{peak / 1e12:.0f} TFLOP/s matmul: MFU {100 * model_flops / peak:.1f}%")


if __name__ == "__main__":
    main()
