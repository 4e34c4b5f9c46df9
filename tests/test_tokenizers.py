"""data.load_tokenizer on tokenizer.json in the shape of each modern release (#22), against the
`tokenizers` library (what transformers' fast tokenizers run): Llama 3 (a split pattern with digits in
threes, ignore_merges, <|begin_of_text|> prepended, specials after the vocabulary), Qwen (single digits,
NFC, no BOS, specials after the vocabulary), SmolLM2 (a digits pre-tokenizer before GPT-2's regex,
specials at ids 0-16), each trained here on a small corpus; ids compared on varied text and decoded back.
A hand-made BPE checks the one place tiktoken differs: it looks a whole piece up in the vocabulary first."""
import json

import pytest

import data

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
CORPUS = ["Distillation with temperature: forward KL vs reverse KL, at tau = 2.5 and 3.0 over 12345 steps.",
          "Ünïcödé façade — naïve café 東京 🙂 résumé; don't stop; they've said I'll go, you'd know.",
          "def f(x):\n    return x ** 2  # squares\n\n\tTabs and  double  spaces 1000000 2024-11-30",
          "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! 3.14159 0042 x=1+2"] * 20
TEXTS = ["", " ", "   leading spaces", "trailing spaces   ", "a\n\nb\r\nc", "numbers 3.14159 and 1,000,000 and 0042",
         "mixed CASE words and 12345678901", "🙂🙂 emoji 🙂 东京 日本語のテキスト",
         "cafe\u0301 and e\u0301te\u0301 decomposed", "Ångström, naïve, résumé", "tabs\tand\r\nwindows newlines",
         "### Response:\n", "I'll've they'd we're", "x" * 40, *CORPUS[:4]]


def build(shape, directory):
    """A tokenizer trained on CORPUS in one release's shape, saved as that release ships it."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=shape == "smollm2")
    if shape == "smollm2":
        split = pre_tokenizers.Digits(individual_digits=True)
    else:
        split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN if shape == "llama3" else QWEN_PATTERN), "isolated")
    tokenizer = Tokenizer(models.BPE(ignore_merges=shape == "llama3"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    if shape == "qwen":
        tokenizer.normalizer = normalizers.NFC()
    first = [f"<|special_{i}|>" for i in range(17)] if shape == "smollm2" else []  # SmolLM2: ids 0-16
    first[:1] = ["<|endoftext|>"] if first else []
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=first, show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    after = {"llama3": ["<|begin_of_text|>", "<|end_of_text|>"], "qwen": ["<|endoftext|>", "<|im_start|>",
                                                                          "<|im_end|>"], "smollm2": []}[shape]
    tokenizer.add_special_tokens(after)
    if shape == "llama3":
        bos = tokenizer.token_to_id("<|begin_of_text|>")
        tokenizer.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                                 special_tokens=[("<|begin_of_text|>", bos)])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    eos = tokenizer.token_to_id({"llama3": "<|end_of_text|>"}.get(shape, "<|endoftext|>"))
    model_type = {"llama3": "llama", "qwen": "qwen2", "smollm2": "llama"}[shape]
    padded = tokenizer.get_vocab_size() + 13  # an embedding wider than the tokenizer, as released
    (directory / "config.json").write_text(json.dumps({"model_type": model_type, "eos_token_id": eos,
                                                       "vocab_size": padded}))
    return tokenizer


@pytest.mark.parametrize("shape", ["llama3", "qwen", "smollm2"])
def test_ids_match_the_reference_tokenizer_and_decode_back(shape, tmp_path):
    import transformers
    reference = build(shape, tmp_path / shape)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / shape / "tokenizer.json"))
    ours = data.load_tokenizer(str(tmp_path / shape))
    special = {"llama3": "<|end_of_text|>", "qwen": "<|im_end|>", "smollm2": "<|endoftext|>"}[shape]
    for text in [*TEXTS, f"before{special}after {special} again"]:
        want = reference.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == want == fast.encode(text, add_special_tokens=False), text
        assert ours.decode(want) == reference.decode(want, skip_special_tokens=False), text
    # the release's BOS convention, EOS, and the ids that are tokens
    with_bos = reference.encode("hello", add_special_tokens=True).ids
    assert ([ours.bos_id] if ours.bos_id is not None else []) + ours.encode("hello") == with_bos
    assert ours.eos_id == reference.token_to_id({"llama3": "<|end_of_text|>"}.get(shape, "<|endoftext|>"))
    assert ours.n_ids == reference.get_vocab_size() and ours.vocab_size == reference.get_vocab_size() + 13
    if shape == "smollm2":
        assert reference.token_to_id("<|endoftext|>") == 0 and ours.eos_id == 0
    # a training sequence starts with the BOS where the release has one
    prompt, _ = data.encode_example(ours, data.build_prompt("Say hi"), "hi")
    assert (prompt[0] == ours.bos_id) == (shape == "llama3")


@pytest.mark.parametrize("ignore_merges", [True, False])
def test_a_whole_piece_in_the_vocabulary_is_spelled_as_the_tokenizer_spells_it(ignore_merges, tmp_path):
    """vocab has "abc" (made by ab + c), but "bc" merges first: the merge rules alone spell "abc" as
    a, bc (Qwen, SmolLM2); looking the whole piece up first (Llama 3's ignore_merges, and tiktoken)
    gives abc. (Within a longer piece Llama 3's spelling is tiktoken's by construction: its
    tokenizer.json was converted from tiktoken ranks. So only whole pieces are checked there.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    for token in ("bc", "ab", "abc"):
        vocab[token] = len(vocab)
    merges = [("b", "c"), ("a", "b"), ("ab", "c")]
    reference = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    reference.decoder = decoders.ByteLevel()
    reference.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 0}))
    ours = data.load_tokenizer(str(tmp_path))
    for text in ("abc", "abc.abc", "abc\nabc") if ignore_merges else ("abc", "abc abcabc ab bc", "xabc", "abcabc"):
        want = reference.encode(text).ids
        assert ours.encode(text) == want, text
    assert (reference.encode("abc").ids == [vocab["abc"]]) == ignore_merges  # the two spellings differ


def test_what_tiktoken_cannot_represent_is_refused_naming_the_file(tmp_path):
    reference = build("qwen", tmp_path / "q")
    spec = json.loads((tmp_path / "q/tokenizer.json").read_text())
    spec["normalizer"] = {"type": "NFKC"}
    (tmp_path / "q/tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"q/tokenizer.json: the normalizer \['NFKC'\] cannot be represented"):
        data.load_tokenizer(str(tmp_path / "q"))
    spec["normalizer"], spec["model"]["byte_fallback"] = None, True
    (tmp_path / "q/tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="only byte-level BPE without byte fallback"):
        data.load_tokenizer(str(tmp_path / "q"))
    assert reference  # (built in the release's shape before it was broken)


def test_a_checkpoint_carries_its_tokenizer_json(tmp_path):
    build("llama3", tmp_path / "src")
    ours = data.load_tokenizer(str(tmp_path / "src"))
    ours.save_pretrained(str(tmp_path / "best"))
    (tmp_path / "best/config.json").write_text((tmp_path / "src/config.json").read_text())
    again = data.load_tokenizer(str(tmp_path / "best"))
    assert (tmp_path / "best/tokenizer.json").read_bytes() == (tmp_path / "src/tokenizer.json").read_bytes()
    assert again.encode(TEXTS[5]) == ours.encode(TEXTS[5]) and again.bos_id == ours.bos_id
