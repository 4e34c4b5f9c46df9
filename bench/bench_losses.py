"""Memory and speed of losses.py against a naive, unchunked implementation of the same objectives.

    python bench/bench_losses.py                 # B=4, T=512, V=50257, float32 logits, on this CPU
    python bench/bench_losses.py --losses fkl,rkl

For each objective, in a fresh process (peak RSS is per process): the extra peak memory of loss +
backward, divided by the size of one float32 logits tensor (goal <= 2x), and the time of ours /
naive. "ours" = losses.distill_loss_chunked (train.py --no-fused-loss); "naive" = losses.distill_loss, the
plain form: the same per-token formula on the whole (B*T, V) batch under plain autograd, where every
intermediate of every position stays alive until backward.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import losses  # noqa: E402


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak():
    """Linux: the process's peak RSS (VmHWM) starts again from its current RSS, so a measured peak is not
    a transient of the set-up (a temporary freed before the measurement began)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes():
    """The peak RSS since the last reset_peak()."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measure_one(name, impl, B, T, V):
    """Runs in a child process: prints {"extra": bytes, "seconds": s}."""
    torch.manual_seed(0)
    student = torch.randn(B, T, V, requires_grad=True)
    teacher = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    labels[:, : T // 8] = -100  # a prompt
    reset_peak()
    before = rss_bytes()
    start = time.perf_counter()
    loss_fn = losses.distill_loss_chunked if impl == "ours" else losses.distill_loss
    loss = loss_fn(name, student, teacher, labels, tau=2.0)
    loss.backward()
    seconds = time.perf_counter() - start
    print(json.dumps({"extra": peak_bytes() - before, "seconds": seconds}))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", default=",".join(losses.LOSSES))
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--V", type=int, default=50257)
    p.add_argument("--one", nargs=2, metavar=("LOSS", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return measure_one(*args.one, args.B, args.T, args.V)
    logits_bytes = args.B * args.T * args.V * 4
    print(f"B={args.B} T={args.T} V={args.V}: one float32 logits tensor = "
          f"{logits_bytes / 2**20:.0f} MiB")
    print("| objective | ours: extra peak / logits | naive: extra peak / logits | time ours / "
          "naive |")
    print("|---|---|---|---|")
    for name in args.losses.split(","):
        result = {}
        for impl in ("ours", "naive"):
            cmd = [sys.executable, __file__, "--one", name, impl, "--B", str(args.B), "--T",
                   str(args.T), "--V", str(args.V)]
            result[impl] = json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                                     check=True).stdout)
        print(f"| {name} | {result['ours']['extra'] / logits_bytes:.2f}x | "
              f"{result['naive']['extra'] / logits_bytes:.2f}x | "
              f"{result['ours']['seconds'] / result['naive']['seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
