"""What fusing the output head into the KD loss saves (#23): extra peak memory of head + loss +
backward, as a multiple of one float32 (B*T, V) logits tensor, and the time, fused against today's
path, for each objective, on this CPU.

    python bench/bench_fused.py                      # a Qwen-like shape: H 896, V 151,936, 4,096 tokens
    python bench/bench_fused.py --losses fkl,rkl

Both start from the student's and teacher's last hidden states and head weights (what the models
hold anyway). "today" = the head's logits for both models, then losses.distill_loss_chunked (what
train.py runs); "fused" = losses.fused_distill_loss. Each case runs in a fresh process (peak RSS is
per process). The student head's weight gradient (V x H floats) is part of both: with H = 896 and
4,096 tokens it is 0.22 of one logits tensor, so the ratio means something only where B*T is several
times H.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import losses  # noqa: E402
from bench_losses import rss_bytes  # noqa: E402  (this folder is the script's: on the path)


def measure_one(name, impl, N, H, V):
    """Runs in a child process: prints {"extra": bytes, "seconds": s}."""
    torch.manual_seed(0)
    student_hidden = torch.randn(1, N, H, requires_grad=True)
    head = (torch.randn(V, H) / H**0.5).requires_grad_()
    teacher_hidden, teacher_head = torch.randn(1, N, H), torch.randn(V, H) / H**0.5
    labels = torch.randint(0, V, (1, N))
    labels[:, : N // 8] = -100  # a prompt
    before = rss_bytes()
    start = time.perf_counter()
    if impl == "fused":
        loss, _, _ = losses.fused_distill_loss(name, student_hidden, head, teacher_hidden, teacher_head, labels,
                                               tau=2.0)
    else:
        student_logits = student_hidden @ head.t()                   # (1, N, V)
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_head.t()
        loss = losses.distill_loss_chunked(name, student_logits, teacher_logits, labels, tau=2.0, reduction="sum")
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"extra": peak - before, "seconds": seconds, "loss": float(loss)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", default=",".join(losses.LOSSES))
    p.add_argument("--N", type=int, default=4096, help="response tokens (B*T)")
    p.add_argument("--H", type=int, default=896)
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--one", nargs=2, metavar=("LOSS", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return measure_one(*args.one, args.N, args.H, args.V)
    logits_bytes = args.N * args.V * 4
    print(f"N={args.N} H={args.H} V={args.V}: one float32 logits tensor = {logits_bytes / 2**30:.2f} GiB; the head's "
          f"weight gradient = {args.V * args.H * 4 / logits_bytes:.2f} of it")
    print("| objective | today (head + chunked loss): extra peak / logits | fused: extra peak / logits | "
          "time fused / today | same loss |")
    print("|---|---|---|---|---|")
    for name in args.losses.split(","):
        result = {}
        for impl in ("today", "fused"):
            cmd = [sys.executable, __file__, "--one", name, impl, "--N", str(args.N), "--H", str(args.H),
                   "--V", str(args.V)]
            result[impl] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        same = abs(result["fused"]["loss"] - result["today"]["loss"]) <= 1e-4 * abs(result["today"]["loss"])
        print(f"| {name} | {result['today']['extra'] / logits_bytes:.2f}x | {result['fused']['extra'] / logits_bytes:.2f}x"
              f" | {result['fused']['seconds'] / result['today']['seconds']:.2f} | {'yes' if same else 'NO'} |",
              flush=True)


if __name__ == "__main__":
    main()
