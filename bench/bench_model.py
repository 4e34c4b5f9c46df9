"""Speed of model.py against transformers, on this machine's CPU (or GPU with --device cuda).

    python bench/bench_model.py            # GPT-2-small shape, random weights
    python bench/bench_model.py --device cuda --dtype bfloat16 --batch 16 --seq 1024

Prints, from one process:
  - train step (forward + backward of next-token CE) tokens/s, ours / transformers;
  - sampled generation tokens/s, batch 8, 128 prompt + 128 new tokens, ours / transformers.generate;
  - MFU: train-step FLOP/s / the FLOP/s of a large matmul in the same dtype on the same machine
    (on CPU a 2048^2 float32 one; on GPU an 8192^2 one, close to the card's dense peak).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT  # noqa: E402


def time_pair(ours, theirs, repeats):
    """Seconds per call of each, timed alternately (a shared CPU drifts; alternating keeps the
    comparison fair). Returns the medians. On GPU each call is waited for (kernels run
    asynchronously: without the wait the timer would measure the launches)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    ours(), theirs()  # warm-up
    sync()
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        for fn, times in ((ours, t_ours), (theirs, t_theirs)):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(t_ours), statistics.median(t_theirs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="autocast dtype of the train step and the reference matmul (GPU: bfloat16)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    autocast = lambda: torch.autocast(args.device.split(":")[0], dtype=dtype,
                                      enabled=dtype != torch.float32)
    import transformers
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024,
                                  vocab_size=50257, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    theirs = transformers.GPT2LMHeadModel(cfg).to(args.device)
    with tempfile.TemporaryDirectory() as d:
        theirs.save_pretrained(d)
        ours = GPT.from_pretrained(d, device=args.device)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device {args.device} ({card}), {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"transformers {transformers.__version__}")

    # ---- train step: forward + backward of CE ----------------------------------------------------
    ids = torch.randint(0, 50257, (args.batch, args.seq), device=args.device)
    def step(model, hf):
        with autocast():
            logits = model(ids).logits if hf else model(ids)
        F.cross_entropy(logits[:, :-1].reshape(-1, 50257).float(),
                        ids[:, 1:].reshape(-1)).backward()
        model.zero_grad(set_to_none=True)
    ours.train(); theirs.train()
    t_ours, t_theirs = time_pair(lambda: step(ours, False), lambda: step(theirs, True),
                                 args.repeats)
    tokens = args.batch * args.seq
    print(f"train step  ours {tokens / t_ours:8.0f} tok/s   transformers {tokens / t_theirs:8.0f} "
          f"tok/s   ratio {t_theirs / t_ours:.2f}x  (goal >= 1.2x)")

    # ---- CPU MFU: the train step's FLOP/s against a big matmul -----------------------------------
    n_matmul = sum(p.numel() for n, p in ours.named_parameters()
                   if p.dim() == 2 and "pos_emb" not in n)
    # PaLM's count; tok_emb = the head
    flops = tokens * (6 * n_matmul + 12 * cfg.n_layer * args.seq * cfg.n_embd)
    n = 8192 if args.device.startswith("cuda") else 2048
    a = torch.randn(n, n, device=args.device, dtype=dtype)
    b = torch.randn(n, n, device=args.device, dtype=dtype)
    t_mm = min(time_pair(lambda: a @ b, lambda: a @ b, 5))
    peak = 2 * n**3 / t_mm
    print(f"MFU         train step {flops / t_ours / 1e9:6.1f} GFLOP/s, {args.dtype} {n}^2 matmul "
          f"{peak / 1e9:6.1f} GFLOP/s, MFU {100 * flops / t_ours / peak:.0f}%  (goal >= 60%)")
    if args.device.startswith("cuda"):
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated")

    # ---- sampled generation ----------------------------------------------------------------------
    ours.eval(); theirs.eval()
    prompt = torch.randint(0, 50256, (8, 128), device=args.device)
    mask = torch.ones_like(prompt)
    gen_ours = lambda: ours.generate(prompt, mask, max_new_tokens=128, temperature=1.0,
                                     generator=torch.Generator(args.device).manual_seed(0))
    gen_theirs = lambda: theirs.generate(prompt, attention_mask=mask, max_new_tokens=128,
                                         min_new_tokens=128, do_sample=True, top_k=0, top_p=1.0,
                                         pad_token_id=50256)
    with torch.no_grad():
        t_ours, t_theirs = time_pair(gen_ours, gen_theirs, args.repeats)
    print(f"generation  ours {8 * 128 / t_ours:8.0f} tok/s   transformers "
          f"{8 * 128 / t_theirs:8.0f} tok/s   ratio {t_theirs / t_ours:.2f}x  (goal >= 1.5x)")


if __name__ == "__main__":
    main()
