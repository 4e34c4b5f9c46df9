"""What fusing the output head into the KD loss saves (#23): extra peak memory of head + loss +
backward, as a multiple of one float32 (B*T, V) logits tensor, and the time against the unfused path,
for each objective and for two peers, on this CPU.

    python bench/bench_fused.py                      # a Qwen-like shape: H 896, V 151,936, 4,096 tokens
    python bench/bench_fused.py --losses fkl,rkl --impls chunked,fused
    python bench/bench_fused.py --losses sfkl --paired 5   # time only: unfused and fused alternately, one process
    pip install -r requirements-bench.txt            # the peers: liger (JSD), torchtune (FKL)

Every case starts from the student's and teacher's last hidden states and head weights (what the
models hold anyway) and runs in a fresh process (peak RSS is per process):
  plain     the heads' logits, then losses.distill_loss (the readable form, plain autograd)
  chunked   the heads' logits, then losses.distill_loss_chunked (train.py --no-fused-loss; until #23)
  fused     fused_loss.fused_distill_loss, compiled (what train.py runs; timed after a first call that compiles)
  eager     the same, not compiled (--no-compile)
  frozen    the same with the student's head frozen, as in a LoRA student: no (V, H) weight gradient
  liger     Liger's LigerFusedLinearJSDLoss, its pure-torch chunked path (compiled=False: its Triton
            kernels do not run on CPU), default chunk of 1,024 rows; JSD only
  torchtune torchtune's ForwardKLWithChunkedOutputLoss on 8 chunks of output logits, as its KD recipes
            make them (each chunk's logits from the head); FKL only
The student head's weight gradient (V x H floats) is part of all but `frozen`: with H = 896 and 4,096
tokens it is 0.22 of one logits tensor, so the ratio means something only where B*T is several times H.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fused_loss  # noqa: E402
import losses  # noqa: E402
from bench_losses import peak_bytes, reset_peak, rss_bytes  # noqa: E402  (this folder is on the path)


def peer_loss(impl):
    """The peers' losses, imported from their files (torchtune's package __init__ pulls in datasets etc.)."""
    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, temperature=2.0, compiled=False)
    import importlib.util
    where = os.path.join(os.path.dirname(importlib.util.find_spec("torchtune").origin), "modules", "loss", "kd_losses.py")
    spec = importlib.util.spec_from_file_location("torchtune_kd_losses", where)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ForwardKLWithChunkedOutputLoss(num_output_chunks=8)


def step_inputs(N, H, V, train_head=True):
    """The student's and teacher's last hidden states (1, N, H) and head weights (V, H), random, and labels with a prompt."""
    torch.manual_seed(0)
    student_hidden = torch.randn(1, N, H, requires_grad=True)
    head = torch.randn(V, H).div_(H**0.5).requires_grad_(train_head)
    teacher_hidden, teacher_head = torch.randn(1, N, H), torch.randn(V, H).div_(H**0.5)
    labels = torch.randint(0, V, (1, N))
    labels[:, : N // 8] = -100  # a prompt
    return student_hidden, head, teacher_hidden, teacher_head, labels


def unfused_loss(loss_fn, name, student_hidden, head, teacher_hidden, teacher_head, labels):
    """The heads' logits (1, N, V), then loss_fn (distill_loss or distill_loss_chunked) on them."""
    student_logits = student_hidden @ head.t()
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_head.t()
    return loss_fn(name, student_logits, teacher_logits, labels, tau=2.0, reduction="sum")


def measure_one(name, impl, N, H, V, pieces):
    """Runs in a child process: prints {"extra": bytes, "seconds": s, "loss": value}."""
    student_hidden, head, teacher_hidden, teacher_head, labels = step_inputs(N, H, V, train_head=impl != "frozen")
    loss_fn = peer_loss(impl) if impl in ("liger", "torchtune") else None
    fused = lambda: fused_loss.fused_distill_loss(name, student_hidden, head, teacher_hidden, teacher_head, labels,
                                                  tau=2.0, compiled=impl != "eager", **pieces)[0]
    compile_seconds = None
    if impl in ("fused", "frozen"):  # as in training, compiled once before the steps that are measured
        start = time.perf_counter()
        fused().backward()
        compile_seconds = time.perf_counter() - start
        student_hidden.grad = head.grad = None
    reset_peak()
    before = rss_bytes()
    start = time.perf_counter()
    if impl in ("fused", "frozen", "eager"):
        loss = fused()
    elif impl == "liger":
        loss = loss_fn(student_hidden.view(N, H), head, teacher_hidden.view(N, H), teacher_head, labels.view(N))
    elif impl == "torchtune":  # its recipes' logits: one (B, T/8, V) tensor per chunk of positions
        student_chunks = [chunk @ head.t() for chunk in student_hidden.chunk(8, dim=1)]
        with torch.no_grad():
            teacher_chunks = [chunk @ teacher_head.t() for chunk in teacher_hidden.chunk(8, dim=1)]
        loss = loss_fn(student_chunks, teacher_chunks, labels)
    else:
        loss = unfused_loss(losses.distill_loss if impl == "plain" else losses.distill_loss_chunked, name, student_hidden,
                            head, teacher_hidden, teacher_head, labels)
    loss.backward()
    seconds = time.perf_counter() - start
    print(json.dumps({"extra": peak_bytes() - before, "seconds": seconds, "loss": float(loss.detach()),
                      "first_call_seconds": compile_seconds}))


def time_paired(name, N, H, V, pieces, repeats):
    """Time alone, in one process: the unfused step (chunked) and the fused one alternately, `repeats` pairs after
    one fused call that compiles, so that drift of a shared VM falls on both alike; prints each pair's ratio and
    the median."""
    inputs = step_inputs(N, H, V)
    student_hidden, head = inputs[:2]
    unfused = lambda: unfused_loss(losses.distill_loss_chunked, name, *inputs)
    fused = lambda: fused_loss.fused_distill_loss(name, *inputs, tau=2.0, compiled=True, **pieces)[0]

    def seconds(step):
        start = time.perf_counter()
        step().backward()
        student_hidden.grad = head.grad = None
        return time.perf_counter() - start
    seconds(fused)  # compiles
    ratios = []
    for i in range(repeats):
        pair = seconds(unfused), seconds(fused)
        ratios.append(pair[1] / pair[0])
        print(f"{name} pair {i + 1}: unfused {pair[0]:.1f} s, fused {pair[1]:.1f} s, fused / unfused {ratios[-1]:.3f}", flush=True)
    print(f"{name}: median fused / unfused {sorted(ratios)[len(ratios) // 2]:.3f} over {repeats} pairs "
          f"({sum(r <= 1.2 for r in ratios)} of {repeats} at or under 1.2)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", default=",".join(losses.LOSSES))
    p.add_argument("--N", type=int, default=4096, help="response tokens (B*T)")
    p.add_argument("--H", type=int, default=896)
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--impls", default="chunked,fused,frozen", help="of: plain, chunked, fused, eager, frozen, liger, "
                   "torchtune (chunked is the time baseline: always include it)")
    p.add_argument("--chunk-size", type=int, help="fused: rows a piece (default: chosen by fused_loss.py)")
    p.add_argument("--vocab-tile", type=int, help="fused: ids a vocabulary tile (default: chosen by fused_loss.py)")
    p.add_argument("--paired", type=int, metavar="PAIRS", help="time only: unfused and fused steps alternately in one "
                   "process, this many pairs (the per-row runs above each take a fresh process, for peak memory)")
    p.add_argument("--one", nargs=2, metavar=("LOSS", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    pieces = {k: v for k, v in (("chunk_size", args.chunk_size), ("vocab_tile", args.vocab_tile)) if v}
    if args.one:
        return measure_one(*args.one, args.N, args.H, args.V, pieces)
    if args.paired:
        for name in args.losses.split(","):
            time_paired(name, args.N, args.H, args.V, pieces, args.paired)
        return
    logits_bytes = args.N * args.V * 4
    print(f"N={args.N} H={args.H} V={args.V}: one float32 logits tensor = {logits_bytes / 2**30:.2f} GiB; the head's "
          f"weight gradient = {args.V * args.H * 4 / logits_bytes:.2f} of it")
    impls = args.impls.split(",")
    print("| objective | " + " | ".join(f"{impl}: extra peak / logits" for impl in impls)
          + " | " + " | ".join(f"time {impl} / chunked" for impl in impls if impl != "chunked") + " |")
    print("|---" * (1 + 2 * len(impls) - ("chunked" in impls)) + "|")
    for name in args.losses.split(","):
        result = {}
        for impl in impls:
            if (impl == "liger" and name != "js") or (impl == "torchtune" and name != "fkl"):
                continue  # each peer has one objective
            cmd = [sys.executable, __file__, "--one", name, impl, "--N", str(args.N), "--H", str(args.H),
                   "--V", str(args.V)] + [f"--{k.replace('_', '-')}={v}" for k, v in pieces.items()]
            # Two runs. Memory: glibc told to return every freed block of 128 kB or more, since otherwise it
            # raises its mmap threshold after the first large free and keeps freed chunks, so RSS would count
            # memory the process no longer holds. Time: glibc as it is, since under that setting every
            # temporary of a piece is a fresh mapping whose pages fault in again.
            for measure, env in (("extra", dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")), ("seconds", None)):
                run = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if run.returncode:
                    why = (run.stderr.strip().splitlines() or [f"killed by signal {-run.returncode} (out of memory?)"])[-1]
                    raise SystemExit(f"error: {name} {impl} failed: {why}")
                out = json.loads(run.stdout)
                result.setdefault(impl, {})[measure] = out[measure]
                if measure == "seconds" and out["first_call_seconds"]:  # the call that compiled
                    result[impl]["first_call_seconds"] = out["first_call_seconds"]
        cell = lambda impl, value: value if impl in result else "-"
        memory = [cell(i, f"{result.get(i, {}).get('extra', 0) / logits_bytes:.3f}x") for i in impls]
        times = [cell(i, f"{result.get(i, {}).get('seconds', 0) / result['chunked']['seconds']:.2f}")
                 for i in impls if i != "chunked"]
        print(f"| {name} | " + " | ".join(memory) + " | " + " | ".join(times) + " |", flush=True)
        print(json.dumps({name: result}), file=sys.stderr, flush=True)  # the raw bytes and seconds


if __name__ == "__main__":
    main()
