"""model.py on the modern families (#22), against transformers itself: tiny random Llama (grouped-query
attention, tied and untied heads, with and without Llama 3's RoPE scaling; SmolLM2 is a Llama), Qwen2
(biases on q, k, v) and Qwen3 (head_dim != hidden / heads, RMSNorm on q and k), every weight perturbed
so that norms and biases matter: logits under left and right padding, greedy generation, KV-cache
decoding, save_pretrained read back by transformers, bf16."""
import json
import os

import pytest
import torch

from model import GPT
from test_model import padded_batch, sharpened_with_left_padded_prompts

LLAMA3_SCALING = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
FAMILIES = {
    "llama-gqa-tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-untied-llama3": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False,
                                          rope_parameters=LLAMA3_SCALING)),
    "llama-old-rope-keys": ("llama", dict(num_key_value_heads=4, rope_theta=500000.0,
                                          rope_scaling={k: v for k, v in LLAMA3_SCALING.items() if k != "rope_theta"})),
    "qwen2": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen3": ("qwen3", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
}


def tiny_family_model(name, **extra):
    """A tiny random model of one family, from transformers, with every weight perturbed."""
    import transformers
    kind, overrides = FAMILIES[name]
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "qwen3": transformers.Qwen3Config}[kind]
    settings = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = config_class(**{**settings, **overrides, **extra})
    torch.manual_seed(0)
    model = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
             "qwen3": transformers.Qwen3ForCausalLM}[kind](config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norms away from 1, biases away from 0
    return model.eval()


@pytest.fixture
def family_dir(tmp_path):
    def make(name, **extra):
        model = tiny_family_model(name, **extra)
        path = tmp_path / name
        model.save_pretrained(path)
        return str(path), model
    return make


def hf_logits(hf, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # the positions ours derives from the mask
    with torch.no_grad():
        return hf(ids, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers_under_padding(family_dir, name):
    path, hf = family_dir(name)
    ours = GPT.from_pretrained(path)
    ids, mask = padded_batch()
    with torch.no_grad():
        logits = ours(ids, mask)
    real = mask.bool()
    assert (logits - hf_logits(hf, ids, mask))[real].abs().max() <= 1e-4
    for row in range(4):  # a padded row = the same tokens unpadded
        assert torch.allclose(logits[row][real[row]], ours(ids[row][real[row]][None])[0], atol=1e-5)
    cfg = ours.cfg
    head_dim = getattr(hf.config, "head_dim", None) or hf.config.hidden_size // hf.config.num_attention_heads
    assert (cfg.n_kv_head, cfg.head_dim, cfg.tie_embeddings) == (hf.config.num_key_value_heads, head_dim,
                                                                 hf.config.tie_word_embeddings)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_generation_and_the_kv_cache_match(family_dir, name):
    path, hf = family_dir(name)
    ours, ids, mask = sharpened_with_left_padded_prompts(hf, path)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=2,
                      eos_token_id=2)[:, ids.shape[1]:]  # (a finished row is padded with EOS, as ours pads it)
    out = ours.generate(ids, mask, max_new_tokens=10, temperature=0, eos_token_id=2)
    assert len(set(out.flatten().tolist())) > 2, "degenerate test: the model only repeats itself"
    assert out.tolist() == ref.tolist()
    # decoding one token at a time through the KV cache (which holds the KV heads only) = the full forward
    full = ours(ids, mask)
    S, cfg = ids.shape[1], ours.cfg
    cache = torch.zeros(cfg.n_layer, 2, 4, cfg.n_kv_head, S, cfg.head_dim)
    with torch.no_grad():
        steps = [ours(ids[:, :5], mask[:, :5], cache=cache)]
        for t in range(5, S):
            steps.append(ours(ids[:, t:t + 1], mask[:, :t + 1], cache=cache, cache_pos=t,
                              positions=mask[:, :t].sum(1, keepdim=True)))
    assert (torch.cat(steps, 1) - full)[mask.bool()].abs().max() <= 1e-5


@pytest.mark.parametrize("name", list(FAMILIES))
def test_save_pretrained_is_read_back_by_transformers(family_dir, name, tmp_path):
    import transformers
    path, hf = family_dir(name)
    ours = GPT.from_pretrained(path)
    ours.save_pretrained(str(tmp_path / "ours"))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    ids, mask = padded_batch(2)
    real = mask.bool()
    assert (hf_logits(again, ids, mask) - hf_logits(hf, ids, mask))[real].abs().max() <= 1e-5
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == hf.config.model_type
    assert saved["tie_word_embeddings"] == hf.config.tie_word_embeddings
    # and ours reads its own files back exactly
    back = GPT.from_pretrained(str(tmp_path / "ours"))
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))


@pytest.mark.parametrize("name", ["llama-untied-llama3", "qwen3"])
def test_bf16_logits_are_finite_and_close(family_dir, name):
    path, _ = family_dir(name)
    full, half = GPT.from_pretrained(path), GPT.from_pretrained(path, dtype=torch.bfloat16)
    ids, mask = padded_batch(3)
    with torch.no_grad():
        a, b = full(ids, mask), half(ids, mask)
    assert b.dtype == torch.float32 and bool(b.isfinite().all())
    assert (a - b)[mask.bool()].abs().max() < 0.5


def test_what_cannot_be_represented_is_refused_in_one_line(family_dir):
    path, _ = family_dir("llama-gqa-tied")
    config = json.load(open(os.path.join(path, "config.json")))
    for change, message in ((dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
                             "uses RoPE type 'yarn'"),
                            (dict(attention_bias=True), "sets attention_bias = True")):
        json.dump({**config, **change}, open(os.path.join(path, "config.json"), "w"))
        with pytest.raises(ValueError, match=message):
            GPT.from_pretrained(path)


def test_eos_may_be_a_list_and_is_written_back(family_dir, tmp_path):
    path, _ = family_dir("llama-gqa-tied", eos_token_id=[2, 5])
    ours = GPT.from_pretrained(path)
    assert ours.cfg.eos_token_id == [2, 5]
    ours.save_pretrained(str(tmp_path / "ours"))
    assert json.loads((tmp_path / "ours/config.json").read_text())["eos_token_id"] == [2, 5]


def test_a_teacher_wider_than_the_shared_tokenizer_distils_over_its_ids_also_on_two_processes(tmp_path,
                                                                                              monkeypatch):
    """A teacher with 300 output rows and a from-scratch student (as wide), one byte tokenizer (257 tokens): KD compares
    both distributions over the 257 ids (the padding rows, made the teacher's likeliest here, are cut
    before tau), trains, and 2 gloo processes give the weights of 1. A narrower model is refused."""
    import data
    import train
    from model import GPTConfig
    from test_train import run_torchrun, weights
    torch.manual_seed(0)
    wide = GPT(GPTConfig(vocab_size=300, n_positions=512, n_layer=1, n_head=2, n_embd=16, ffn_dim=32,
                         bos_token_id=256, eos_token_id=256, pad_token_id=256))
    with torch.no_grad():
        wide.tok_emb.weight[257:] = 5 * wide.tok_emb.weight[:257].mean(0)  # what the padding rows would win
    wide.save_pretrained(str(tmp_path / "wide"))
    data.byte_tokenizer().save_pretrained(str(tmp_path / "wide"))
    common = ["--preset", "toy", "--teacher", str(tmp_path / "wide"), "--student", "toy-tiny", "--loss", "rkl",
              "--tau", "2", "--responses", "dataset", "--train-examples", "64", "--batch-size", "8", "--max-steps",
              "3", "--valid-examples", "2", "--valid-max-new-tokens", "4", "--eval-benchmarks", "", "--device", "cpu"]
    widths, fused = [], train.fused_distill_loss  # the heads' rows, and the ids the loss keeps of them
    monkeypatch.setattr(train, "fused_distill_loss", lambda name, s, head, t, teacher_head, *a, **k: widths.append(
        (head.shape[0], teacher_head.shape[0], k["n_ids"])) or fused(name, s, head, t, teacher_head, *a, **k))
    train.main([*common, "--out", str(tmp_path / "one")])
    assert set(widths) == {(300, 300, 257)}  # the student takes the teacher's tokenizer and its 300 rows
    run_torchrun(2, [*common, "--out", str(tmp_path / "two")], tmp_path)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
    narrow = GPT(GPTConfig(vocab_size=200, n_positions=512, n_layer=1, n_head=2, n_embd=16, ffn_dim=32,
                           bos_token_id=256, eos_token_id=256, pad_token_id=256))  # the same tokenizer, too few rows
    narrow.save_pretrained(str(tmp_path / "narrow"))
    data.byte_tokenizer().save_pretrained(str(tmp_path / "narrow"))
    with pytest.raises(SystemExit, match="has 200 output ids, fewer than its tokenizer's 257"):
        train.main([*common[:3], str(tmp_path / "narrow"), *common[4:], "--out", str(tmp_path / "n")])
