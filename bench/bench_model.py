"""Speed of model.py against transformers, on this machine's CPU (or GPU with --device cuda).

    python bench/bench_model.py            # GPT-2-small shape, random weights

Prints, from one process:
  - train step (forward + backward of next-token CE) tokens/s, ours / transformers;
  - sampled generation tokens/s, batch 8, 128 prompt + 128 new tokens, ours / transformers.generate;
  - "CPU MFU": train-step FLOP/s / the FLOP/s of a large float32 matmul on the same machine.
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
    comparison fair). Returns the medians."""
    ours(), theirs()  # warm-up
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        for fn, times in ((ours, t_ours), (theirs, t_theirs)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(t_ours), statistics.median(t_theirs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    import transformers
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024,
                                  vocab_size=50257,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    theirs = transformers.GPT2LMHeadModel(cfg).to(args.device)
    with tempfile.TemporaryDirectory() as d:
        theirs.save_pretrained(d)
        ours = GPT.from_pretrained(d, device=args.device)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, transformers "
          f"{transformers.__version__}")

    # ---- train step: forward + backward of CE ----------------------------------------------------
    ids = torch.randint(0, 50257, (args.batch, args.seq), device=args.device)
    def step(model, hf):
        logits = model(ids).logits if hf else model(ids)
        F.cross_entropy(logits[:, :-1].reshape(-1, 50257), ids[:, 1:].reshape(-1)).backward()
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
    a, b = torch.randn(2048, 2048, device=args.device), torch.randn(2048, 2048, device=args.device)
    t_mm = min(time_pair(lambda: a @ b, lambda: a @ b, 5))
    peak = 2 * 2048**3 / t_mm
    print(f"MFU         train step {flops / t_ours / 1e9:6.1f} GFLOP/s, fp32 matmul "
          f"{peak / 1e9:6.1f} GFLOP/s, MFU {100 * flops / t_ours / peak:.0f}%  (goal >= 60%)")

    # ---- sampled generation ----------------------------------------------------------------------
    ours.eval(); theirs.eval()
    prompt = torch.randint(0, 50256, (8, 128), device=args.device)
    mask = torch.ones_like(prompt)
    gen_ours = lambda: ours.generate(prompt, mask, max_new_tokens=128, temperature=1.0,
                                     generator=torch.Generator(args.device).manual_seed(0))
    gen_theirs = lambda: theirs.generate(prompt, attention_mask=mask, max_new_tokens=128,
                                         min_new_tokens=128,
                                         do_sample=True, top_k=0, top_p=1.0, pad_token_id=50256)
    with torch.no_grad():
        t_ours, t_theirs = time_pair(gen_ours, gen_theirs, args.repeats)
    print(f"generation  ours {8 * 128 / t_ours:8.0f} tok/s   transformers "
          f"{8 * 128 / t_theirs:8.0f} tok/s   ratio {t_theirs / t_ours:.2f}x  (goal >= 1.5x)")


if __name__ == "__main__":
    main()
