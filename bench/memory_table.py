"""Memory of a KD step for each modern preset at its real shapes: our GPT built on the meta device from each
model's published config (no weights, no download), so the parameter counts are the model's own. Writes
the tables of docs/models.md; --check measures the same formula's terms on small shapes on this CPU.

    python bench/memory_table.py                 # the tables (computed)
    python bench/memory_table.py --check         # the formula against measured peaks of small KD steps (CPU)

The formula (bytes; P student parameters, P_t trainable ones, Q teacher parameters, N tokens in one
micro-batch, V the vocabulary, H / L / F / D the student's width, layers, MLP width, head width):
  weights      4 P (the student trains in fp32 under bf16 autocast) + 2 Q (the teacher in bf16)
  training     16 P_t: each trainable weight's fp32 gradient and AdamW's two moments (12 bytes), and the
               fp32 master weight already counted; LoRA: P_t = the adapters only
  logits       unfused: 3.3 x one fp32 (N, V) tensor (the student's and teacher's logits, the logits'
               gradient and the chunked loss's buffer; measured, bench/bench_fused.py);
               fused: a few MB-sized pieces, and the head's (V, H) fp32 weight gradient unless frozen
  activations  N L a bytes, a = what autograd keeps per token and layer (activation_words below: the
               norms' inputs, the projections' inputs, q/k/v and attention's output, the MLP's hidden
               activations) x 2 bytes in bf16 (4 on CPU), plus one block's worth (N a) for the gradients
               backward holds while it crosses a block; checkpointing keeps only each block's fp32 input
               (4 H) and adds one block's recomputed activations.
"""
import argparse
import json
import os
import subprocess
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig, config_from_hf  # noqa: E402

ROPE = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
# (model_type, vocab rows, hidden, layers, heads, kv heads, head_dim, MLP width, tied): METHOD.md's sources,
# the released config.json files
SHAPES = {
    "Qwen/Qwen2.5-0.5B": ("qwen2", 151936, 896, 24, 14, 2, 64, 4864, True),
    "Qwen/Qwen2.5-1.5B": ("qwen2", 151936, 1536, 28, 12, 2, 128, 8960, True),
    "Qwen/Qwen2.5-7B": ("qwen2", 152064, 3584, 28, 28, 4, 128, 18944, False),
    "meta-llama/Llama-3.2-1B": ("llama", 128256, 2048, 16, 32, 8, 64, 8192, True),
    "meta-llama/Llama-3.2-3B": ("llama", 128256, 3072, 28, 24, 8, 128, 8192, True),
    "meta-llama/Llama-3.1-8B": ("llama", 128256, 4096, 32, 32, 8, 128, 14336, False),
    "HuggingFaceTB/SmolLM2-360M": ("llama", 49152, 960, 32, 15, 5, 64, 2560, True),
    "HuggingFaceTB/SmolLM2-1.7B": ("llama", 49152, 2048, 24, 32, 32, 64, 8192, True),
    "Qwen/Qwen3-0.6B-Base": ("qwen3", 151936, 1024, 28, 16, 8, 128, 3072, True),
    "Qwen/Qwen3-4B-Base": ("qwen3", 151936, 2560, 36, 32, 8, 128, 9728, True),
}
PRESETS = {"qwen2.5": ("Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-0.5B"),
           "llama3.2": ("meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-1B"),
           "smollm2": ("HuggingFaceTB/SmolLM2-1.7B", "HuggingFaceTB/SmolLM2-360M"),
           "qwen3": ("Qwen/Qwen3-4B-Base", "Qwen/Qwen3-0.6B-Base")}
UNFUSED_LOGITS = 3.3  # one fp32 logits tensor's multiple a step holds without the fused loss (bench_fused.py)
CHUNK_BYTES = 2 * 8 * 2**20  # the fused loss's temporaries: a few ~8 MB row chunks, or more 2 MB tiles


def model_of(name):
    kind, vocab, hidden, layers, heads, kv, head_dim, mlp, tied = SHAPES[name]
    hf = {"model_type": kind, "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
          "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim, "intermediate_size": mlp,
          "max_position_embeddings": 32768, "tie_word_embeddings": tied, "bos_token_id": 0, "eos_token_id": 0,
          **(ROPE if kind == "llama" else {"rope_theta": 1e6})}
    with torch.device("meta"):
        return GPT(config_from_hf(hf))


def activation_words(cfg):
    """Numbers autograd keeps per token and layer in one of our pre-norm blocks (model.py): each norm's
    input and normalised value (2 H) and the projection reading its output (H); q, k and v (repeated to
    every query head under grouped-query attention), attention's output and the output projection's
    input (5 q); the MLP's fc_in output, the activation's output and (gated) the product fc_out reads."""
    q = cfg.n_head * cfg.head_dim
    mlp = 4 * cfg.ffn_dim if cfg.gated_mlp else 2 * cfg.ffn_dim
    return 3 * cfg.n_embd + 5 * q + 3 * cfg.n_embd + mlp


def lora_parameters(cfg, rank):
    q, kv, F = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.ffn_dim
    spans = [q, kv, cfg.n_embd, *([F, F] if cfg.gated_mlp else [F]), cfg.n_embd]  # B's rows
    inputs = [cfg.n_embd, cfg.n_embd, q, *([cfg.n_embd] * (2 if cfg.gated_mlp else 1)), F]  # A's columns
    return cfg.n_layer * rank * (sum(spans) + sum(inputs))


def kd_step_bytes(student, teacher_params, tokens, fused, lora_rank, checkpointing, act_bytes=2, weight_bytes=(4, 2)):
    """The formula's terms for one micro-batch of `tokens` (a dict of bytes)."""
    cfg, P = student.cfg, sum(p.numel() for p in student.parameters())
    trainable = lora_parameters(cfg, lora_rank) if lora_rank else P
    per_layer = 4 * cfg.n_embd if checkpointing else act_bytes * activation_words(cfg)
    one_block = act_bytes * activation_words(cfg) * tokens
    # backward holds one block's gradients of its activations at a time, and checkpointing one block's
    # recomputed activations on top
    transient = one_block * (2 if checkpointing else 1)
    head = 0 if lora_rank else 4 * cfg.vocab_size * cfg.n_embd
    logits = (CHUNK_BYTES + head) if fused else UNFUSED_LOGITS * 4 * tokens * cfg.vocab_size
    return {"weights": weight_bytes[0] * P + weight_bytes[1] * teacher_params + 4 * (trainable if lora_rank else 0),
            "training": 12 * trainable, "logits": logits,
            "activations": tokens * cfg.n_layer * per_layer + transient}


SETTINGS = {"full, unfused (until #23)": (False, 0, False), "full, fused": (True, 0, False),
            "full, fused + checkpointing": (True, 0, True), "LoRA 64, fused": (True, 64, False),
            "LoRA 64, fused + checkpointing": (True, 64, True)}


def table(tokens):
    gb = lambda n: f"{n / 1e9:.1f}"
    rows = [f"| preset | setting | weights | grads + AdamW | logits / loss | activations | total (GB) | fits |",
            "|---|---|---|---|---|---|---|---|"]
    for preset, (teacher, student) in PRESETS.items():
        s, t = model_of(student), model_of(teacher)
        for setting, (fused, rank, ckpt) in SETTINGS.items():
            terms = kd_step_bytes(s, sum(p.numel() for p in t.parameters()), tokens, fused, rank, ckpt)
            total = sum(terms.values()) * 1.1  # allocator slack
            fits = next((f"{card} GB" for card in (24, 40, 80) if total <= card * 1e9), "> 80 GB: --fsdp")
            rows.append(f"| {preset} | {setting} | {gb(terms['weights'])} | {gb(terms['training'])} | "
                        f"{gb(terms['logits'])} | {gb(terms['activations'])} | {gb(total)} | {fits} |")
    return "\n".join(rows)


def params_table():
    gb = lambda n: f"{n / 1e9:.1f}"
    rows = ["| preset | role | model | parameters | bf16 weights (GB) | full AdamW fine-tuning, fp32 (GB) | "
            "fp32 logits, 1,024 tokens (GB) |", "|---|---|---|---|---|---|---|"]
    for preset, (teacher, student) in PRESETS.items():
        for role, name in (("teacher (SFT)", teacher), ("student", student)):
            n, vocab = sum(p.numel() for p in model_of(name).parameters()), SHAPES[name][1]
            rows.append(f"| {preset} | {role} | {name} | {n / 1e9:.2f}B | {gb(2 * n)} | {gb(16 * n)} | "
                        f"{gb(4 * 1024 * vocab)} |")
    return "\n".join(rows)


# --- The check: measured peaks of small KD steps on this CPU (fp32, no autocast) -----------------------

SMALL = dict(model_type="qwen2", vocab_size=32768, n_positions=1024, n_layer=4, n_head=4, n_kv_head=2, n_embd=256,
             ffn_dim=1024, activation="silu", norm="rmsnorm", positions="rope", gated_mlp=True, bias=False)


def measure_one(fused, rank, checkpointing, B, T):
    """In a child process: peak RSS of one KD forward + backward above the models, and the formula's
    prediction of the same (its logits and activations terms, and the gradients)."""
    import lora
    import train
    from losses import HPARAMS
    torch.manual_seed(0)
    student, teacher = GPT(GPTConfig(**SMALL)), GPT(GPTConfig(**SMALL)).requires_grad_(False)
    if rank:
        lora.add(student, rank, 2.0 * rank)
    student.checkpointing = checkpointing
    ids = torch.randint(0, SMALL["vocab_size"], (B, T))
    labels = ids.roll(-1, 1)
    labels[:, : T // 8] = -100
    batch = (ids, torch.ones_like(ids), labels)
    args = types.SimpleNamespace(loss="fkl", tau=2.0, tau_sq=False, fused_loss=fused, compile=False,
                                 **dict.fromkeys(HPARAMS))
    from bench_losses import peak_bytes, reset_peak, rss_bytes
    reset_peak()
    before = rss_bytes()
    loss, _, _ = train.loss_step(args, student, teacher, batch, batch, lambda: torch.autocast("cpu", enabled=False),
                                 SMALL["vocab_size"], 0.0, 1.0 / B / T)
    loss.backward()
    peak = peak_bytes()
    terms = kd_step_bytes(student, 0, B * T, fused, rank, checkpointing, act_bytes=4)
    grads = 4 * sum(p.numel() for p in student.parameters() if p.requires_grad)
    predicted = terms["logits"] + terms["activations"] + grads - (4 * SMALL["vocab_size"] * SMALL["n_embd"]
                                                                  if fused and not rank else 0)  # head grad once
    print(json.dumps({"measured": peak - before, "predicted": predicted}))


def check(B, T):
    print(f"Small Qwen-like shapes (H 256, 4 layers, V 32,768), {B} x {T} tokens, fp32 on CPU: peak RSS of one KD "
          "forward + backward above the models, against the formula (logits + activations + gradients)")
    print("| setting | measured (MB) | formula (MB) | formula / measured |")
    print("|---|---|---|---|")
    for setting, (fused, rank, ckpt) in SETTINGS.items():
        rank = min(rank, 8)
        cmd = [sys.executable, __file__, "--one", str(int(fused)), str(rank), str(int(ckpt)), "--B", str(B),
               "--T", str(T)]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # RSS = what is held (bench_fused.py says why)
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode:
            raise SystemExit(f"error: {setting}: {run.stderr.strip().splitlines()[-1]}")
        r = json.loads(run.stdout)
        print(f"| {setting.replace('64', str(rank))} | {r['measured'] / 1e6:.0f} | {r['predicted'] / 1e6:.0f} | "
              f"{r['predicted'] / r['measured']:.2f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="measure small shapes on this CPU against the formula")
    p.add_argument("--tokens", type=int, default=4096, help="tokens in one micro-batch (the tables)")
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--one", nargs=3, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return measure_one(bool(args.one[0]), args.one[1], bool(args.one[2]), args.B, args.T)
    if args.check:
        return check(args.B, args.T)
    print(params_table())
    print()
    print(f"A KD step, one micro-batch of {args.tokens:,} tokens (GB; total with 10 % allocator slack):")
    print(table(args.tokens))


if __name__ == "__main__":
    main()
