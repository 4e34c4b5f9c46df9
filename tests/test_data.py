"""data.py: tokenizer parity with transformers, benchmark download + normalisation through a local
stand-in hub, the prompt template, masking, the toy benchmark, and bad input."""
import collections
import json
import os
import random

import pytest
import regex

import data
import toy
from hubserver import StandInHub

CORPUS = ["The quick brown fox jumps over the lazy dog. It's 2024, and we'll see 1234 foxes!",
          "Distillation with temperature: forward KL vs reverse KL.\n\nNew lines\tand tabs   and "
          "spaces.",
          "Ünïcödé façade — naïve café 東京 🙂 résumé; don't stop; they've gone; I'm here; "
          "you'd know.",
          "def f(x):\n    return x ** 2  # squares\n" * 3]
TEXTS = CORPUS + ["", " ", "   leading spaces", "trailing spaces   ", "\n\n\n",
                  "a<|endoftext|>b <|endoftext|>",
                  "numbers 3.14159 and 1,000,000 and 0042", "mixed CASE words AND Ünïcode ÅÄÖ",
                  "🙂🙂 emoji 🙂",
                  "tabs\tand\r\nwindows newlines", "### Response:\n"]
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def write_bpe(directory, n_merges=300, opt_style=False):
    """Learn a small byte-level BPE on CORPUS and write vocab.json + merges.txt + config.json (the
    test's own implementation; the byte map comes from transformers, the reference)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    byte_map = bytes_to_unicode()
    words = collections.Counter(tuple(byte_map[b] for b in w.encode()) for text in CORPUS
                                for w in regex.findall(GPT2_PATTERN, text))
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    tokens = list(byte_map.values()) + [a + b for a, b in merges] + ["<|endoftext|>"]
    if opt_style:  # OPT: the same tokens renumbered, specials first
        shuffled = tokens[:]
        random.Random(0).shuffle(shuffled)
        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3,
                 **{t: i + 4 for i, t in enumerate(shuffled)}}
        config = {"model_type": "gpt2", "bos_token_id": 2, "eos_token_id": 2,
                  "vocab_size": len(vocab)}
    else:
        vocab = {t: i for i, t in enumerate(tokens)}
        eos = vocab["<|endoftext|>"]
        config = {"model_type": "gpt2", "bos_token_id": eos, "eos_token_id": eos,
                  "vocab_size": len(vocab)}
    os.makedirs(directory, exist_ok=True)
    json.dump(vocab, open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8"),
              ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    json.dump(config, open(os.path.join(directory, "config.json"), "w"))
    return vocab


@pytest.mark.parametrize("opt_style", [False, True])
def test_tokenizer_matches_transformers(tmp_path, opt_style):
    from transformers import AutoTokenizer
    vocab = write_bpe(tmp_path, opt_style=opt_style)
    ours = data.load_tokenizer(str(tmp_path))
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        if opt_style and "<|endoftext|>" in text:
            continue  # OPT marks </s>, not <|endoftext|>, as special
        want = ref.encode(text, add_special_tokens=False)
        assert ours.encode(text) == want, text
        assert ours.decode(ours.encode(text)) == text
    corpus = " ".join(CORPUS)
    assert len(ours.encode(corpus)) < len(corpus.encode()) / 2, "the BPE must actually merge"
    assert ours.eos_id == (2 if opt_style else vocab["<|endoftext|>"])
    assert ours.pad_id == ours.eos_id
    assert ours.vocab_size == len(vocab)
    if not opt_style:
        want = ref.encode("x", add_special_tokens=False) + [vocab["<|endoftext|>"]]
        assert ours.encode("x<|endoftext|>") == want


def test_tokenizer_downloads_from_the_hub(tmp_path):
    import subprocess, sys
    write_bpe(tmp_path / "repo")
    with StandInHub({("model", "tiny/tok"): str(tmp_path / "repo")}) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"))
        code = "import data; print(data.load_tokenizer('tiny/tok').encode('The quick brown fox'))"
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, timeout=120,
                                cwd=os.path.dirname(data.__file__))
    assert result.returncode == 0, result.stderr
    want = data.load_tokenizer(str(tmp_path / "repo")).encode("The quick brown fox")
    assert json.loads(result.stdout.strip().splitlines()[-1]) == want


def test_byte_tokenizer_round_trips_and_saves_as_a_bpe_transformers_reads(tmp_path):
    from transformers import AutoTokenizer
    tok = data.byte_tokenizer()
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("ab") == [97, 98] and tok.eos_id == 256 and tok.vocab_size == 257
    assert tok.encode("<|endoftext|>") == [256]
    tok.save_pretrained(str(tmp_path))  # a checkpoint carries its tokenizer
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "eos_token_id": 256,
                                                      "bos_token_id": 256}))
    loaded, ref = data.load_tokenizer(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert loaded.eos_id == 256


def test_prompt_template_exact_text():
    assert data.build_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert data.build_prompt("Sum these.", "1 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n### "
        "Instruction:\nSum these.\n\n### Input:\n1 2\n\n### Response:\n")


def test_labels_cover_exactly_the_response_and_eos():
    tok = data.byte_tokenizer()
    examples = [data.encode_example(tok, "P: abc\n", "xy"),
                data.encode_example(tok, "P:\n", "hello")]
    input_ids, mask, labels = data.collate_train(examples, tok.pad_id)
    seq0 = tok.encode("P: abc\nxy") + [256]
    assert input_ids[0].tolist() == seq0[:-1] + [256] * (input_ids.shape[1] - len(seq0) + 1)
    # position i predicts token i+1: labels are "xy<eos>" at the positions before them, -100
    # elsewhere
    assert labels[0].tolist() == [-100] * 6 + tok.encode("xy") + [256]
    # the longer row: 7 prompt + 2 response + EOS tokens, minus the last
    assert input_ids.shape[1] == 9
    assert labels[1].tolist() == [-100] * 2 + tok.encode("hello") + [256] + [-100]
    assert mask[0].all() and mask[1].tolist() == [1] * 8 + [0]
    prompts, prompt_mask = data.collate_prompts([[1, 2, 3], [4]], pad_id=256)
    assert prompts.tolist() == [[1, 2, 3], [256, 256, 4]] and prompt_mask.tolist() == [[1, 1, 1],
                                                                                       [0, 0, 1]]


def test_long_prompts_keep_the_response_marker_and_unfittable_ones_are_counted(capsys):
    tok = data.byte_tokenizer()
    prompt = data.build_prompt("x" * 600)
    prompt_ids, response_ids = data.encode_example(tok, prompt, "ok", max_prompt_len=256,
                                                   max_len=300)
    assert len(prompt_ids) == 256 and tok.decode(prompt_ids).endswith("### Response:\n")
    assert response_ids == tok.encode("ok") + [256]
    long_response = data.encode_example(tok, "short\n", "y" * 1000, max_len=100)
    assert len(long_response[0]) + len(long_response[1]) == 100
    records = [{"prompt": "no marker " * 100, "output": ["a"]},
               {"prompt": data.build_prompt("fine"), "output": ["b"]}]
    encoded = data.encode_dataset(tok, records, max_prompt_len=64, where="fixture")
    assert len(encoded) == 1 and "fixture: skipped 1 of 2 examples" in capsys.readouterr().out


# ---- the benchmarks, through the real download code and a stand-in hub ---------------------------

def write_fixture_repos(root):
    """Small files that copy the MiniLLM schemas: string vs list output, <n> newlines, empty
    input."""
    def jsonl(path, records):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    raw = [{"instruction": f"Question {i}<n>second line", "input": "" if i % 2 else f"context {i}",
            "output": f"Answer {i}.<n>More.", "prompt": "ignored",
            "category": "open_qa"} for i in range(600)]
    jsonl(f"{root}/dolly/raw.jsonl", raw)
    jsonl(f"{root}/dolly/valid.jsonl",
          [{"instruction": "Test q", "input": "", "output": "Test a"}] * 3)
    jsonl(f"{root}/self-inst/valid.jsonl", [{"instruction": "Write", "input": "x", "output": "y"}])
    jsonl(f"{root}/vicuna/valid.jsonl", [{"instruction": "Chat", "input": "", "output": "z"}])
    jsonl(f"{root}/sinst/11_/valid.jsonl",
          [{"instruction": "Def", "input": "In", "output": ["ref one", "ref two"]}])
    jsonl(f"{root}/uinst/11_/valid.jsonl",
          [{"instruction": f"U{i}", "input": "", "output": ["r"]} for i in range(12)])
    return {("dataset", "MiniLLM/dolly"): f"{root}/dolly",
            ("dataset", "MiniLLM/self-inst"): f"{root}/self-inst",
            ("dataset", "MiniLLM/Vicuna"): f"{root}/vicuna",
            ("dataset", "MiniLLM/sinst"): f"{root}/sinst",
            ("dataset", "MiniLLM/uinst"): f"{root}/uinst"}


def test_prepare_downloads_and_normalises_every_benchmark(tmp_path):
    import subprocess, sys
    repos = write_fixture_repos(str(tmp_path / "hub"))
    out = tmp_path / "data"
    code = ("import data; data.BENCHMARKS['uinst'] = data.BENCHMARKS['uinst'][:2] + (10,); "
            f"data.prepare(['dolly', 'self-inst', 'vicuna', 'sinst', 'uinst'], {str(out)!r})")
    with StandInHub(repos) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"))
        run = lambda: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                     text=True,
                                     timeout=120, cwd=os.path.dirname(data.__file__))
        first = run()
        assert first.returncode == 0, first.stderr
        n_requests = len(hub.requests)
        second = run()  # idempotent: verified files are not fetched again
        assert second.returncode == 0 and "already prepared" in second.stdout
        assert len(hub.requests) == n_requests
    train = data.read_jsonl(out / "dolly/train.jsonl")
    valid = data.read_jsonl(out / "dolly/valid.jsonl")
    assert len(train) == 100 and len(valid) == 500
    assert len(data.read_jsonl(out / "dolly/test.jsonl")) == 3
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in valid}
    some = next(r for r in train if r["input"] == "")
    assert some["instruction"].endswith("\nsecond line")
    assert some["output"][0] == some["output"][0].replace("<n>", "\n")
    assert some["prompt"] == data.build_prompt(some["instruction"])
    assert "\nMore." in some["output"][0]
    with_input = next(r for r in train if r["input"])
    assert with_input["prompt"] == data.build_prompt(with_input["instruction"], with_input["input"])
    assert data.read_jsonl(out / "sinst/test.jsonl")[0]["output"] == ["ref one", "ref two"]
    assert len(data.read_jsonl(out / "uinst/test.jsonl")) == 10
    assert set(data.read_jsonl(out / "vicuna/test.jsonl")[0]) == {"instruction", "input", "output",
                                                                  "prompt"}


# ---- the toy benchmark ---------------------------------------------------------------------------

def test_toy_is_deterministic_and_splits_are_disjoint(tmp_path):
    data.prepare(["toy"], str(tmp_path / "a"))
    data.prepare(["toy"], str(tmp_path / "b"))
    for split in toy.SPLITS:
        assert open(tmp_path / "a/toy" / f"{split}.jsonl",
                    "rb").read() == open(tmp_path / "b/toy" / f"{split}.jsonl", "rb").read()
    splits = {s: data.toy_split(s) for s in toy.SPLITS}
    assert {s: len(r) for s, r in splits.items()} == toy.SPLITS
    families = collections.Counter(r["family"] for r in splits["train"])
    # every family, in equal shares (the generator takes them in turn)
    share = toy.SPLITS["train"] // len(toy.FAMILIES)
    assert families == {f: share for f in toy.FAMILIES}
    key = lambda r: (r["instruction"], r["input"])
    train_keys = {key(r) for r in splits["train"]}
    for split in ("valid", "test", "test-hard"):
        held = [r for r in splits[split] if r["family"] in toy.HELD_OUT]
        assert held and not {key(r) for r in held} & train_keys, split
    valid_keys = {key(r) for r in splits["valid"] if r["family"] in toy.HELD_OUT}
    assert not valid_keys & {key(r) for r in splits["test"] if r["family"] in toy.HELD_OUT}
    # open-ended families: several references in evaluation, one sampled answer (of unequal
    # frequency) in training
    describe = [r for r in splits["test"] if r["family"] == "describe"]
    assert all(len(r["output"]) == 3 for r in describe)
    greetings = collections.Counter(r["output"][0].split()[0] for r in splits["train"]
                                    if r["family"] == "greet")
    assert greetings.most_common(1)[0][1] > 2 * min(greetings.values()), greetings
    assert all(len(r["output"]) == 1 for r in splits["train"])
    hard = [r for r in splits["test-hard"] if r["family"] == "count"]
    seen = [r for r in splits["train"] if r["family"] == "count"]
    assert min(len(r["input"].split()) for r in hard) > max(len(r["input"].split()) for r in seen)


# ---- bad input -----------------------------------------------------------------------------------

def test_malformed_and_incomplete_jsonl_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 3: malformed json"):
        data.read_jsonl(str(path))
    path.write_text('{"instruction": "a", "output": "b"}\n{"input": "x"}\n')
    with pytest.raises(ValueError, match=r"line 2: missing field\(s\) \['instruction', 'output'\]"):
        data.load_split(str(path), "train")
    with pytest.raises(FileNotFoundError, match="python data.py prepare"):
        data.load_split("dolly", "train", str(tmp_path))
    with pytest.raises(ValueError, match="unknown benchmark 'dolly2'"):
        data.prepare(["dolly2"], str(tmp_path))
