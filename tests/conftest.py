import json
import os
import sys

import pytest
# Deterministic CPU runs (see train.py)
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)


def assert_float32_close(got, want):
    """`got` (computed in float32) equals the float64 reference `want` up to float32 rounding: a few
    ulps of its largest entry. An absolute bound fails on CPUs whose SIMD width sums in another
    order once entries reach ~2."""
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def tiny_hf_model(kind, **overrides):
    """A tiny random GPT-2 or OPT from transformers itself: the reference our model must match."""
    import transformers
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=96, eos_token_id=96, **overrides)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.OPTConfig(vocab_size=97, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, ffn_dim=48, dropout=0.0, attention_dropout=0.0,
                                     activation_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                                     **overrides)
        model = transformers.OPTForCausalLM(cfg)
    # random init leaves biases / layer norms at 0 / 1; perturb them so a mis-mapped bias cannot
    # hide
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def write_bin_checkpoint(model, path, shards=1, strip_prefix=False):
    """The legacy .bin layout (transformers 5 only writes safetensors, but hub repos such as gpt2
    and facebook/opt-* still hold pytorch_model.bin): torch.save'd state dicts, sharded with an
    index when shards > 1. strip_prefix drops "transformer." / "model." as in the original GPT-2 /
    OPT uploads."""
    for f in os.listdir(path):
        if f.endswith((".safetensors", ".safetensors.index.json")):
            os.remove(os.path.join(path, f))
    state = {}
    for key, tensor in model.state_dict().items():
        if strip_prefix:
            key = key.removeprefix("transformer.").removeprefix("model.")
        state[key] = tensor.clone()
    keys = list(state)
    if shards == 1:
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
        return
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, os.path.join(path, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture
def hf_model_dir(tmp_path):
    """Factory: save a tiny transformers model to a temp dir and return (dir, model). safe=False
    writes the .bin layout (sharded into `shards` files, keys without prefix if strip_prefix)."""
    count = iter(range(1000))

    def make(kind, safe=True, shard=None, shards=1, strip_prefix=False, **overrides):
        model = tiny_hf_model(kind, **overrides)
        path = tmp_path / f"{kind}-{next(count)}"
        model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
        if not safe:
            write_bin_checkpoint(model, path, shards, strip_prefix)
        return str(path), model
    return make
