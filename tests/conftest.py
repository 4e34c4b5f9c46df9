import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)


def tiny_hf_model(kind, **overrides):
    """A tiny random GPT-2 or OPT from transformers itself: the reference our model must match."""
    import transformers
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=96,
                                      eos_token_id=96, **overrides)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.OPTConfig(vocab_size=97, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, ffn_dim=48, dropout=0.0, attention_dropout=0.0,
                                     activation_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                                     **overrides)
        model = transformers.OPTForCausalLM(cfg)
    # random init leaves biases / layer norms at 0 / 1; perturb them so a mis-mapped bias cannot hide
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def hf_model_dir(tmp_path):
    """Factory: save a tiny transformers model to a temp dir and return (dir, model)."""
    def make(kind, safe=True, shard=None, **overrides):
        model = tiny_hf_model(kind, **overrides)
        path = tmp_path / f"{kind}-{'st' if safe else 'bin'}-{shard}-{len(overrides)}"
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(path, safe_serialization=safe, **kwargs)
        return str(path), model
    return make
