"""Memory of each modern preset at its real shapes: our GPT built on the meta device from each model's
published config (no weights, no download), so the parameter counts are the model's own. Writes the
table of docs/models.md.

    python bench/memory_table.py

Per model: parameters; bf16 weights; full fine-tuning with AdamW in fp32 (weights, gradients, two moments:
16 bytes a parameter, activations not counted); and one 1,024-token sequence of fp32 logits at the model's
vocabulary width (a KD step holds the teacher's and the student's, and the student's gradient)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, config_from_hf  # noqa: E402

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


def parameters(name):
    kind, vocab, hidden, layers, heads, kv, head_dim, mlp, tied = SHAPES[name]
    hf = {"model_type": kind, "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
          "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim, "intermediate_size": mlp,
          "max_position_embeddings": 32768, "tie_word_embeddings": tied, "bos_token_id": 0, "eos_token_id": 0,
          **(ROPE if kind == "llama" else {"rope_theta": 1e6})}
    with torch.device("meta"):
        model = GPT(config_from_hf(hf))
    return sum(p.numel() for p in model.parameters()), vocab


def main():
    gb = lambda n: f"{n / 1e9:.1f}"
    rows = ["| preset | role | model | parameters | bf16 weights (GB) | full AdamW fine-tuning, fp32 (GB) | "
            "fp32 logits, 1,024 tokens (GB) |", "|---|---|---|---|---|---|---|"]
    for preset, (teacher, student) in PRESETS.items():
        for role, name in (("teacher (SFT)", teacher), ("student", student)):
            n, vocab = parameters(name)
            rows.append(f"| {preset} | {role} | {name} | {n / 1e9:.2f}B | {gb(2 * n)} | {gb(16 * n)} | "
                        f"{gb(4 * 1024 * vocab)} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
