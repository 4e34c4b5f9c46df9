"""model.py against transformers: logits, greedy generation, KV cache, checkpoint formats, hub
download, errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_hf_model
from hubserver import StandInHub
from model import GPT, GPTConfig

OPT_350M_STYLE = dict(word_embed_proj_dim=16, do_layer_norm_before=False)  # projection + post-norm
# (kind, checkpoint layout, overrides): safetensors single file / sharded, .bin single / sharded /
# unprefixed keys
VARIANTS = [("gpt2", dict(safe=True), {}), ("gpt2", dict(safe=True, shard="20KB"), {}),
            ("gpt2", dict(safe=False, shards=3), {}),
            ("gpt2", dict(safe=False, strip_prefix=True), {}),
            ("opt", dict(safe=True), {}), ("opt", dict(safe=False, shards=4), {}),
            ("opt", dict(safe=False, strip_prefix=True), {}),
            ("opt", dict(safe=True), OPT_350M_STYLE)]


def padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, :4] = 0   # left padding
    mask[2, 9:] = 0   # right padding
    mask[3, :2] = 0
    return ids, mask


def hf_logits(hf, ids, mask):
    # transformers' GPT-2 does not derive positions from the mask by itself; OPT does. Give GPT-2
    # the same ones.
    positions = (mask.cumsum(-1) - 1).clamp(min=0) if hf.config.model_type == "gpt2" else None
    with torch.no_grad():
        return hf(ids, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("kind,layout,overrides", VARIANTS)
def test_logits_match_transformers_on_padded_batch(hf_model_dir, kind, layout, overrides):
    path, hf = hf_model_dir(kind, **layout, **overrides)
    files = os.listdir(path)
    assert any(f.endswith(".bin") for f in files) != layout["safe"]
    if "shard" in layout or layout.get("shards", 1) > 1:
        assert any(f.endswith(".index.json") for f in files), "the sharded variant must be sharded"
    ours = GPT.from_pretrained(path)
    ids, mask = padded_batch()
    with torch.no_grad():
        logits = ours(ids, mask)
    assert logits.shape == (4, 12, 97) and logits.dtype == torch.float32
    ref = hf_logits(hf, ids, mask)
    real = mask.bool()
    assert (logits - ref)[real].abs().max() <= 1e-4
    # a padded row gives the same logits at its real positions as the same tokens unpadded
    for row in range(4):
        alone = ours(ids[row][real[row]][None])[0]
        assert torch.allclose(logits[row][real[row]], alone, atol=1e-5)


def sharpened_with_left_padded_prompts(hf, path):
    """The transformers model sharpened (so greedy decoding does not just repeat one token) and saved
    again, ours loaded from it, and a batch of left-padded prompts (generation takes no other)."""
    with torch.no_grad():
        hf.get_input_embeddings().weight.mul_(8)
    hf.save_pretrained(path)
    ids, mask = padded_batch(1)
    mask[2] = 1
    mask[2, :3] = 0
    return GPT.from_pretrained(path), ids, mask


@pytest.mark.parametrize("kind", ["gpt2", "opt"])
def test_greedy_generate_matches_transformers(hf_model_dir, kind):
    path, hf = hf_model_dir(kind)
    ours, ids, mask = sharpened_with_left_padded_prompts(hf, path)
    eos = hf.config.eos_token_id
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=eos,
                      eos_token_id=eos)[:, ids.shape[1]:]
    out = ours.generate(ids, mask, max_new_tokens=10, temperature=0, eos_token_id=eos)
    assert len(set(out.flatten().tolist())) > 2, "degenerate test: the model only repeats itself"
    assert out.tolist() == ref.tolist()


def test_kv_cache_logits_equal_full_recompute(hf_model_dir):
    ours = GPT.from_pretrained(hf_model_dir("opt")[0])
    ids, mask = padded_batch(2)
    mask[2] = 1
    full = ours(ids, mask)
    S, H = ids.shape[1], ours.cfg.n_head
    cache = torch.zeros(ours.cfg.n_layer, 2, 4, H, S, ours.cfg.n_embd // H)
    with torch.no_grad():
        steps = [ours(ids[:, :5], mask[:, :5], cache=cache)]
        for t in range(5, S):  # one token at a time, positions = real tokens so far
            pos = mask[:, :t].sum(1, keepdim=True)
            steps.append(ours(ids[:, t:t + 1], mask[:, :t + 1], cache=cache, cache_pos=t,
                              positions=pos))
    cached = torch.cat(steps, 1)
    assert (cached - full)[mask.bool()].abs().max() <= 1e-5


def test_sampling_is_reproducible_and_blocks_repeated_ngrams(hf_model_dir):
    ours = GPT.from_pretrained(hf_model_dir("gpt2")[0])
    ids, mask = padded_batch(3)
    mask[2] = 1
    run = lambda seed, **kw: ours.generate(ids, mask, max_new_tokens=24,
                                           generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    # greedy would loop; the block forbids any repeated bigram
    out = run(3, no_repeat_ngram_size=2, temperature=0)
    for row, m in zip(torch.cat([ids, out], 1), torch.cat([mask, torch.ones_like(out)], 1)):
        tokens = row[m.bool()].tolist()
        bigrams = list(zip(tokens, tokens[1:]))
        assert len(bigrams) == len(set(bigrams))
    top1 = run(4, top_k=1)  # top-k = 1 is greedy
    assert torch.equal(top1, run(5, temperature=0))


def test_generate_stops_when_every_row_emitted_eos():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, n_positions=32, n_layer=1, n_head=2, n_embd=8,
                          ffn_dim=16)).eval()
    # EOS = 5 likely but not certain: the final layer norm's bias adds 2 to its logit (adding to
    # EOS's embedding would not: the normalised hidden state sums to ~0 against a constant shift)
    with torch.no_grad():
        eos = model.tok_emb.weight[5]
        model.ln_f.bias.copy_(2 * eos / eos.norm() ** 2)
    out = model.generate(torch.ones(6, 3, dtype=torch.long), max_new_tokens=20, eos_token_id=5,
                         generator=torch.Generator().manual_seed(0))
    first_eos = [row.index(5) for row in out.tolist()]  # (raises if a row never emitted EOS)
    for row, first in zip(out.tolist(), first_eos):
        assert all(t == 5 for t in row[first:]), "a finished row is padded with EOS"
    assert len(set(first_eos)) > 1, "rows finish at different steps"
    # the loop ends at the step the last row emits EOS, well before max_new_tokens
    assert out.shape[1] == max(first_eos) + 1 < 20


@pytest.mark.parametrize("kind,overrides", [("gpt2", {}), ("opt", {}), ("opt", OPT_350M_STYLE)])
def test_save_pretrained_round_trips_into_transformers(tmp_path, kind, overrides):
    import transformers
    ref = tiny_hf_model(kind, **overrides)
    src = tmp_path / "src"
    ref.save_pretrained(src)
    ours = GPT.from_pretrained(str(src))
    ours.save_pretrained(str(tmp_path / "out"))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = padded_batch(4)
    assert (hf_logits(back, ids, mask) - hf_logits(ref, ids, mask))[mask.bool()].abs().max() <= 1e-5
    again = GPT.from_pretrained(str(tmp_path / "out"))
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                 again.state_dict().values()))


def test_bf16_load_keeps_one_copy(hf_model_dir):
    import gc
    path = hf_model_dir("gpt2")[0]
    gc.collect()
    before = {id(t) for t in gc.get_objects() if torch.is_tensor(t)}
    model = GPT.from_pretrained(path, dtype=torch.bfloat16)
    gc.collect()
    new = [t for t in gc.get_objects() if torch.is_tensor(t) and id(t) not in before]
    params = list(model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in params)
    # one copy: the load leaves no float32 tensor alive, and each parameter owns exactly its own
    # bf16 bytes
    stayed = [tuple(t.shape) for t in new if t.dtype != torch.bfloat16]
    assert not stayed, "a copy in another dtype stayed alive"
    assert sum(p.untyped_storage().nbytes() for p in params) == 2 * sum(p.numel() for p in params)
    assert len({p.data_ptr() for p in params}) == len(params)
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.float32


def test_hub_download_through_a_local_http_server(hf_model_dir, tmp_path):
    path, hf = hf_model_dir("opt", safe=False, shards=3)
    with StandInHub({("model", "tiny/opt"): path}) as hub:
        code = ("import sys, torch; sys.path.insert(0, %r); import model; m = "
                "model.GPT.from_pretrained('tiny/opt'); print(m(torch.tensor([[5, 6, 7, 8]]))[0, "
                "-1, :4].tolist())" % ROOT)
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"))
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        got = json.loads(result.stdout.strip().splitlines()[-1])
        downloaded = [p for method, p in hub.requests if method == "GET" and "/resolve/" in p]
    with torch.no_grad():
        want = hf(torch.tensor([[5, 6, 7, 8]])).logits[0, -1, :4]
    assert torch.allclose(torch.tensor(got), want, atol=1e-5)
    assert any(p.endswith(".index.json") for p in downloaded)
    assert any(p.endswith(".bin") for p in downloaded)
    assert list((tmp_path / "hf").rglob("config.json")), "files land in the HF_HOME cache"
    # a repo the hub does not know -> one clear message
    with StandInHub({}) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf2"))
        code = ("import sys; sys.path.insert(0, %r); import model; "
                "model.GPT.from_pretrained('nobody/nothing')" % ROOT)
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, timeout=120)
    assert result.returncode != 0
    assert "neither a local directory nor a reachable hub model" in result.stderr


def test_bad_checkpoints_give_one_clear_message(hf_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GPT.from_pretrained(str(tmp_path / "nope"))
    path, _ = hf_model_dir("gpt2")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(FileNotFoundError, match="no weights file"):
        GPT.from_pretrained(str(empty))
    (empty / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="lacks the field 'vocab_size'"):
        GPT.from_pretrained(str(empty))
    (empty / "config.json").write_text('{"model_type": "gpt2",')  # cut off mid-download
    with pytest.raises(ValueError, match="config.json in .* is not valid JSON"):
        GPT.from_pretrained(str(empty))
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        GPT.from_pretrained(path)
    path, _ = hf_model_dir("opt", safe=False)
    config = json.load(open(os.path.join(path, "config.json")))
    json.dump({**config, "model_type": "mamba"}, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"config.json in .*opt-\d+ has model_type 'mamba': tempkd loads"):
        GPT.from_pretrained(path)
    json.dump({**config, "num_hidden_layers": "two"}, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"config.json in .* n_layer must be a whole number >= 1, got 'two'"):
        GPT.from_pretrained(path)
    json.dump({**config, "ffn_dim": 64}, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="shape mismatch"):
        GPT.from_pretrained(path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        GPT.from_pretrained(path)


def test_sampling_follows_the_distribution_and_never_picks_masked_tokens():
    from model import sample_next
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.log().expand(20_000, 5).clone()  # log 0 = -inf: a masked token
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, generator=g), minlength=5).float() / 20_000
    assert (counts - probs).abs().max() < 0.015 and counts[4] == 0
    hot = torch.bincount(sample_next(logits, temperature=0.5, generator=g),
                         minlength=5).float() / 20_000
    sharpened = probs**2 / (probs**2).sum()  # temperature 0.5 squares the probabilities
    assert (hot - sharpened).abs().max() < 0.015
    top2 = torch.bincount(sample_next(logits, top_k=2, generator=g), minlength=5).float() / 20_000
    assert (top2 - torch.tensor([0.625, 0.375, 0, 0, 0])).abs().max() < 0.015
    nucleus = torch.bincount(sample_next(logits, top_p=0.7, generator=g),
                             minlength=5).float() / 20_000
    # 0.5 + 0.3 reaches 0.7
    assert (nucleus - torch.tensor([0.625, 0.375, 0, 0, 0])).abs().max() < 0.015


def test_bf16_loading_peak_memory_is_about_one_bf16_model(tmp_path):
    """Loading a float32 checkpoint in bf16 materialises each tensor once, in bf16: the peak of
    anonymous memory (RssAnon, sampled by a thread; the file's mapped pages are page cache, not
    ours) stays near the bf16 model's size, where loading the float32 state dict first and
    converting would need 3x that."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=1000, n_positions=64, n_layer=8, n_head=8, n_embd=512, ffn_dim=2048)
    GPT(cfg).save_pretrained(str(tmp_path))  # ~100 MB of float32 weights
    bf16_bytes = sum(p.numel() for p in GPT(cfg).parameters()) * 2
    code = """
import sys, threading, time, torch
sys.path.insert(0, %r)
import model
def anon():
    line = next(l for l in open('/proc/self/status') if l.startswith('RssAnon'))
    return int(line.split()[1]) * 1024
with torch.device('meta'):  # absorb torch's one-off lazy initialisation before the baseline
    model.GPT(model.GPTConfig(n_layer=1, n_embd=64, n_head=1, vocab_size=10))
before, peak, done = anon(), [0], False
def sample():
    while not done:
        peak[0] = max(peak[0], anon())
        time.sleep(0.0005)
thread = threading.Thread(target=sample)
thread.start()
m = model.GPT.from_pretrained(%r, dtype=torch.bfloat16)
done = True
thread.join()
print(max(peak[0], anon()) - before)
""" % (ROOT, str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    extra = int(result.stdout.strip().splitlines()[-1])
    assert extra < 1.5 * bf16_bytes, (extra / 2**20, bf16_bytes / 2**20)
