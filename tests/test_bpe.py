"""bpe.py and the toy's BPE vocabulary (#24): merges on hand-computed corpora (counts, the tie rule, the
stop), the same vocabulary every time, the split pattern equal to GPT-2's on the toy's text, and the
saved vocab.json + merges.txt read back by our loader and by Hugging Face's tokenizers (GPT-2's BPE) with the
same ids."""
import re

import pytest

import bpe
import data
import toy


def test_merges_by_count_then_by_the_pair_that_sorts_first_until_no_pair_repeats():
    # pieces: "ab", " ab" x2, " abc": (a, b) occurs 4 times, (" ", a) 3, (b, c) 1
    assert bpe.train(["ab ab ab abc"], 300) == [(b"a", b"b"), (b" ", b"ab")]  # then (" ab", c) occurs once: stop
    # pieces "xy", " xy", " zw" x2: (x, y), (" ", z), (z, w) all occur twice; b" " sorts before b"x" and b"z"
    assert bpe.train(["xy xy zw zw"], 300) == [(b" ", b"z"), (b" z", b"w"), (b"x", b"y")]
    assert bpe.train(["xy xy zw zw"], 258) == [(b" ", b"z"), (b" z", b"w")]  # the size caps the merges
    # (a, a) counts 3 in "aaaa" (overlapping), merged from the left: (aa, aa), which occurs once
    assert bpe.train(["aaaa"], 300) == [(b"a", b"a")]
    assert bpe.ranks([(b"a", b"b"), (b" ", b"ab")])[b" ab"] == 257


def test_the_split_pattern_is_gpt2s_on_the_toy_text():
    regex = pytest.importorskip("regex")  # a test dependency (requirements-dev.txt): never skipped in CI
    texts = [r["prompt"] + r["output"][0] for r in data.toy_split("valid")] + ["It's 12 o'clock,  you'll see!\n\n"]
    for text in texts:
        assert re.findall(bpe.SPLIT, text) == regex.findall(data.GPT2_PATTERN, text)


def test_the_toy_vocabulary_is_made_the_same_way_every_time_and_round_trips():
    tokenizer = data.toy_tokenizer()
    assert tokenizer.vocab_size == tokenizer.n_ids == toy.VOCAB_SIZE and tokenizer.eos_id == toy.VOCAB_SIZE - 1
    texts = [r["prompt"] + r["output"][0] for r in data.toy_split("train")]
    assert bpe.train(texts, toy.VOCAB_SIZE - 1) == tokenizer.merges  # trained again: the same merges
    for record in data.toy_split("test-hard")[:200]:  # held-out text, numbers never seen in training
        text = record["prompt"] + record["output"][0]
        assert tokenizer.decode(tokenizer.encode(text)) == text
    words = ["The", " creature", " lives", " forest", " berries", "Hello"]  # whole words, one token each
    assert all(len(tokenizer.encode(w)) == 1 for w in words)


def test_the_saved_files_load_in_our_loader_and_in_hugging_faces_tokenizers_with_the_same_ids(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers  # what transformers' fast GPT-2 tokenizer runs
    tokenizer = data.toy_tokenizer()
    tokenizer.save_pretrained(str(tmp_path))
    ours = data.load_tokenizer(str(tmp_path))
    theirs = Tokenizer(models.BPE.from_file(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    theirs.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    assert theirs.token_to_id("<|endoftext|>") == tokenizer.eos_id == ours.eos_id
    for record in data.toy_split("valid") + data.toy_split("test-hard")[:100]:
        text = record["prompt"] + record["output"][0]
        ids = tokenizer.encode(text)
        assert ours.encode(text) == ids
        assert theirs.encode(text).ids == ids, text


def test_each_toy_preset_has_its_vocabulary_and_stages_and_a_byte_runs_toy_is_refused(tmp_path, monkeypatch):
    import config
    from test_evaluate import tiny_toy_model
    monkeypatch.chdir(tmp_path)
    args = config.parse_args(["--preset", "toy-bytes", "--loss", "fkl"])
    assert args.toy_vocab == "bytes" and toy.stages_needed(args) == toy.stage_dirs("toy-bytes")
    assert toy.stage_argv("runs/toy-bytes/teacher", "data")[:2] == ["--preset", "toy-bytes"]
    assert config.tokenizer_for("toy-teacher", args.toy_vocab).n_ids == 257
    assert config.tokenizer_for("toy-teacher", "bpe").n_ids == toy.VOCAB_SIZE
    for stage in ("teacher", "student-init"):  # the byte toy's stages where the BPE toy's belong (before #24)
        tiny_toy_model(tmp_path / f"runs/toy/{stage}/best")
        (tmp_path / f"runs/toy/{stage}/finished.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"runs/toy/teacher/best has a 257-token vocabulary, not the 2048 of "
                                         r"--toy-vocab bpe.*runs/toy-bytes"):
        config.parse_args(["--preset", "toy", "--loss", "fkl"])
