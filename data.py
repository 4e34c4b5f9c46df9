"""Data: tokenizers, the five instruction-following benchmarks, the offline toy benchmark, and
batching.

Every example, whatever its source, is one jsonl record in one schema:
    {"instruction": str, "input": str, "output": [reference, ...], "prompt": str}
`prompt` is the Alpaca-style template of METHOD.md section 4; training uses output[0] as the
response.

    python data.py prepare [--benchmarks dolly,self-inst,vicuna,sinst,uinst,toy] [--force]

The teacher-generated training responses of the paper's setting are made by responses.py.
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import string
from pathlib import Path

import numpy as np
import tiktoken
import torch

DATA_DIR = "data"
RESPONSE_MARKER = "### Response:\n"
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n" + RESPONSE_MARKER)
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                     "provides further context. Write a response that appropriately completes the "
                     "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                     + RESPONSE_MARKER)
# The regex GPT-2 (and OPT) split text with before BPE
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def build_prompt(instruction, input=""):
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


# ==================================================================================================
# Tokenizers: a tiktoken.Encoding, plus an id remap for OPT


class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text, eos_id, pad_id, vocab_size.

    tiktoken returns BPE *ranks*; GPT-2's ids are those ranks, OPT numbers the same tokens
    differently, so an optional table maps ranks to model ids and back. No BOS is added (METHOD.md
    section 4)."""

    def __init__(self, encoding, eos_id, vocab_size, rank_to_id=None, source=None,
                 byte_level=False):
        self.encoding, self.vocab_size = encoding, vocab_size
        self.eos_id = self.pad_id = eos_id  # GPT-2 and OPT pad with EOS
        # every token is one byte (the toy's tokenizer): ~4x a BPE token's count
        self.byte_level = byte_level
        # the directory holding vocab.json + merges.txt (None: the byte tokenizer)
        self.source = source
        self.rank_to_id = rank_to_id  # np.ndarray or None (identity)
        if rank_to_id is not None:
            self.id_to_rank = np.full(max(vocab_size, int(rank_to_id.max()) + 1), -1,
                                      dtype=np.int64)
            self.id_to_rank[rank_to_id] = np.arange(len(rank_to_id))

    def encode(self, text):
        ranks = self.encoding.encode(text, allowed_special="all")
        return ranks if self.rank_to_id is None else self.rank_to_id[ranks].tolist()

    def decode(self, ids):
        ids = [int(i) for i in ids]
        if self.rank_to_id is not None:
            ranks = self.id_to_rank[[i for i in ids if 0 <= i < len(self.id_to_rank)]]
            # ids with no token (e.g. OPT's <pad>/<unk>) decode to nothing
            ids = ranks[ranks >= 0].tolist()
        return self.encoding.decode(ids, errors="replace")

    def id_to_bytes(self):
        """{model id: the bytes it stands for}, over the whole vocabulary and the special tokens."""
        table = {}
        for rank in range(self.encoding.n_vocab):
            try:
                token = self.encoding.decode_single_token_bytes(rank)
            except KeyError:  # a rank with no token
                continue
            table[rank if self.rank_to_id is None else int(self.rank_to_id[rank])] = token
        return table

    def save_pretrained(self, directory):
        """Write vocab.json + merges.txt next to a checkpoint, so it carries its own tokenizer."""
        os.makedirs(directory, exist_ok=True)
        if self.source is not None:
            for f in ("vocab.json", "merges.txt"):
                if os.path.abspath(os.path.join(self.source,
                                                f)) != os.path.abspath(os.path.join(directory, f)):
                    shutil.copyfile(os.path.join(self.source, f), os.path.join(directory, f))
            return
        # the byte tokenizer as a GPT-2-style BPE with no merges: byte b has id b, then
        # <|endoftext|>
        vocab = {c: b for b, c in _bytes_to_unicode().items()} | {"<|endoftext|>": self.eos_id}
        Path(directory, "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False),
                                                 encoding="utf-8")
        Path(directory, "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def byte_tokenizer():
    """The toy benchmark's tokenizer: the 256 bytes, then <|endoftext|> = 256 (EOS and padding)."""
    encoding = tiktoken.Encoding("tempkd-bytes", pat_str=GPT2_PATTERN,
                                 mergeable_ranks={bytes([b]): b for b in range(256)},
                                 special_tokens={"<|endoftext|>": 256})
    return Tokenizer(encoding, eos_id=256, vocab_size=257, byte_level=True)


def _bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map, in which vocab.json and merges.txt are
    written: printable bytes map to themselves, the other 68 to the characters from U+0100 up, in
    byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def load_tokenizer(name_or_path):
    """"toy" -> the byte tokenizer; otherwise a directory or hub id holding GPT-2-style vocab.json +
    merges.txt."""
    if name_or_path in ("toy", "bytes"):
        return byte_tokenizer()
    from hf_files import resolve_checkpoint
    tokenizer_files = ["vocab.json", "merges.txt", "config.json"]
    directory = resolve_checkpoint(name_or_path,
                                   lambda files: [f for f in tokenizer_files if f in files])
    for f in tokenizer_files[:2]:
        if not os.path.isfile(os.path.join(directory, f)):
            raise FileNotFoundError(f"tokenizer file {f} missing in {directory} (GPT-2/OPT "
                                    "checkpoints ship it)")
    vocab = json.loads(Path(directory, "vocab.json").read_text(encoding="utf-8"))
    merges = Path(directory, "merges.txt").read_text(encoding="utf-8").split("\n")
    char_of = _bytes_to_unicode()
    byte_of = {c: b for b, c in char_of.items()}
    to_bytes = lambda token: bytes(byte_of[c] for c in token)
    # Ranks = merge priority: the 256 single bytes (ordered as the vocabulary orders them), then
    # each merge's result in merges.txt order. For GPT-2 this reproduces its ids exactly.
    singles = sorted(char_of.items(), key=lambda bc: vocab[bc[1]])
    ranks = {bytes([b]): r for r, (b, _) in enumerate(singles)}
    rank_to_token = [c for _, c in singles]
    for line in merges:
        if line and not line.startswith("#version"):
            left, right = line.split(" ")
            merged = to_bytes(left + right)
            if merged not in ranks:
                if left + right not in vocab:
                    raise ValueError(f"merges.txt merge {line!r} produces a token missing from "
                                     "vocab.json")
                ranks[merged] = len(ranks)
                rank_to_token.append(left + right)
    # Special tokens: vocabulary entries like <|endoftext|> or </s> that no merge produces
    specials = [t for t in vocab if t.startswith("<") and t.endswith(">") and len(t) > 2
                and (any(c not in byte_of for c in t) or to_bytes(t) not in ranks)]
    special_ranks = {t: len(ranks) + i for i, t in enumerate(specials)}
    rank_to_id = np.array([vocab[t] for t in rank_to_token + specials], dtype=np.int64)
    config_path = Path(directory, "config.json")
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    eos_id = config.get("eos_token_id", vocab.get("<|endoftext|>", vocab.get("</s>")))
    encoding = tiktoken.Encoding(f"tempkd-{os.path.basename(os.path.normpath(directory))}",
                                 pat_str=GPT2_PATTERN,
                                 mergeable_ranks=ranks, special_tokens=special_ranks)
    identity = bool((rank_to_id == np.arange(len(rank_to_id))).all())
    vocab_size = max(config.get("vocab_size", 0), max(vocab.values()) + 1)
    byte_level = len(ranks) == 256  # no merges: the byte tokenizer saved next to a toy checkpoint
    return Tokenizer(encoding, eos_id, vocab_size, None if identity else rank_to_id,
                     source=directory, byte_level=byte_level)


# ==================================================================================================
# Reading and writing the jsonl schema


def atomic_write(path, write):
    """Call write(tmp_path), then rename over `path`: a crash never leaves a half-written file
    behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_dir(path, write):
    """Call write(tmp_dir), then put the directory in place of `path` (best/, a stage's output):
    readers see the old directory or the new one, whole, never a half-written one."""
    tmp, old = f"{path}.tmp{os.getpid()}", f"{path}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if os.path.isdir(path):
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def read_jsonl(path, check=None):
    """Records (JSON objects) of a jsonl file, each passed through check(record, "file, line N")
    when given; a malformed line raises an error naming the file and line number."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist (run `python data.py prepare` to download "
                                "the benchmarks)")
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {number}: malformed json ({e.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}, line {number}: a record must be a JSON object, got "
                                     f"{type(record).__name__}")
                records.append(check(record, f"{path}, line {number}") if check else record)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start} of a line cannot be "
                         "decoded)") from None
    return records


def jsonl_text(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    text = jsonl_text(records)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def normalize(record, where="record"):
    """A MiniLLM-format record -> our schema: `<n>` becomes a newline, a string output becomes a
    one-item list, and the prompt is rebuilt with our exact template."""
    missing = [k for k in ("instruction", "output") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing} (has {sorted(record)})")
    output = record["output"]
    if not isinstance(record["instruction"], str) or not isinstance(record.get("input") or "", str):
        raise ValueError(f"{where}: instruction and input must be strings")
    if not (isinstance(output, str) and output.strip()) and not (
            isinstance(output, list) and output and all(isinstance(o, str) for o in output)):
        raise ValueError(f"{where}: output must be a non-empty string or a non-empty list of "
                         f"strings, got {output!r}")
    fix = lambda text: text.replace("<n>", "\n")
    outputs = output if isinstance(output, list) else [output]
    instruction, input = fix(record["instruction"]).strip(), fix(record.get("input") or "").strip()
    return {"instruction": instruction, "input": input, "output": [fix(o).strip() for o in outputs],
            "prompt": build_prompt(instruction, input)}


# ==================================================================================================
# The five benchmarks, as prepared by MiniLLM (METHOD.md section 4)

# name -> (hub dataset repo, {our split: file in the repo}, how many examples to keep)
BENCHMARKS = {
    "dolly": ("MiniLLM/dolly", {"raw": "raw.jsonl", "test": "valid.jsonl"}, None),
    "self-inst": ("MiniLLM/self-inst", {"test": "valid.jsonl"}, None),
    "vicuna": ("MiniLLM/Vicuna", {"test": "valid.jsonl"}, None),
    "sinst": ("MiniLLM/sinst", {"test": "11_/valid.jsonl"}, None),
    "uinst": ("MiniLLM/uinst", {"test": "11_/valid.jsonl"}, 10_000),
}
DOLLY_VALID_SIZE, DOLLY_SPLIT_SEED = 500, 1234


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _verified(directory):
    """True if directory holds a manifest whose files all exist with the recorded checksums."""
    manifest = os.path.join(directory, "manifest.json")
    if not os.path.isfile(manifest):
        return False
    files = json.loads(Path(manifest).read_text())["files"]
    return all(os.path.isfile(os.path.join(directory, f)) and _sha256(os.path.join(directory,
                                                                                   f)) == h
               for f, h in files.items())


def _write_benchmark(directory, splits):
    for split, records in splits.items():
        write_jsonl(os.path.join(directory, f"{split}.jsonl"), records)
    manifest = {"files": {f"{s}.jsonl": _sha256(os.path.join(directory,
                                                             f"{s}.jsonl")) for s in splits},
                "counts": {s: len(r) for s, r in splits.items()}}
    atomic_write(os.path.join(directory, "manifest.json"),
                 lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))


def prepare(names, data_dir=DATA_DIR, force=False):
    """Download and normalise the benchmarks into data_dir/<name>/{train,valid,test}.jsonl
    (idempotent)."""
    from hf_files import resolve_checkpoint
    unknown = [name for name in names if name not in BENCHMARKS and name != "toy"]
    if unknown or not names:  # checked before the first download
        raise ValueError(f"--benchmarks: unknown benchmark {(unknown or [''])[0]!r}: choose from "
                         f"{', '.join([*BENCHMARKS, 'toy'])}")
    for name in names:
        directory = os.path.join(data_dir, name)
        if not force and _verified(directory):
            print(f"{name}: already prepared in {directory}")
            continue
        # generated, not downloaded: written out so it can be read like the others
        if name == "toy":
            _write_benchmark(directory, {s: toy_split(s) for s in TOY_SPLITS})
            continue
        repo, files, limit = BENCHMARKS[name]
        local = resolve_checkpoint(repo, lambda available: [files[s] for s in files],
                                   repo_type="dataset")
        splits = {}
        for split, file in files.items():
            path = os.path.join(local, file)
            splits[split] = [normalize(r, f"{path}, record {i + 1}")
                             for i, r in enumerate(read_jsonl(path)[:limit])]
        if "raw" in splits:  # Dolly: a fixed, seeded validation split of raw.jsonl; the rest trains
            raw = splits.pop("raw")
            order = list(range(len(raw)))
            random.Random(DOLLY_SPLIT_SEED).shuffle(order)
            splits["valid"] = [raw[i] for i in sorted(order[:DOLLY_VALID_SIZE])]
            splits["train"] = [raw[i] for i in sorted(order[DOLLY_VALID_SIZE:])]
        _write_benchmark(directory, splits)
        print(f"{name}: " + ", ".join(f"{s} {len(r)}" for s, r in splits.items()) + " -> "
                                                                                    f"{directory}")


def load_split(benchmark, split, data_dir=DATA_DIR):
    """Records of one split. The toy benchmark is generated in memory; `toy-hard` is the toy's hard
    test. A path to a jsonl file (e.g. teacher-generated responses) is read as is."""
    if benchmark.endswith(".jsonl"):
        return read_jsonl(benchmark, normalize)
    if benchmark == "toy-hard":
        benchmark, split = "toy", "test-hard"
    if benchmark == "toy":
        return toy_split(split)
    return read_jsonl(os.path.join(data_dir, benchmark, f"{split}.jsonl"))


# ==================================================================================================
# The offline toy benchmark (METHOD.md section 5): a small procedurally generated world,
# deterministic by seed

TOY_SPLITS = {"train": 20_000, "valid": 200, "test": 500, "test-hard": 500}
TOY_SEEDS = {"train": 1, "valid": 2, "test": 3, "test-hard": 4}


def _toy_world(seed=0):
    rng = random.Random(seed)
    syllables = ["ba", "ko", "mi", "zu", "te", "ra", "lo", "fi", "nu", "pe", "da", "ga", "si", "vo",
                 "ke", "ly"]
    names = sorted({rng.choice(syllables) + rng.choice(syllables) + rng.choice(["b", "n", "x", "r",
                                                                                "l", ""])
                    for _ in range(400)})[:120]
    colors = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver",
              "brown"]
    habitats = ["forest", "desert", "river", "mountain", "swamp", "meadow", "cave", "island"]
    foods = ["berries", "seeds", "fish", "honey", "leaves", "mushrooms", "roots", "insects",
             "apples", "nuts",
             "grass", "clover", "moss", "plums", "beans"]
    creatures = {n: {"color": rng.choice(colors), "habitat": rng.choice(habitats),
                     "size": rng.choice(["small", "medium-sized", "large"]),
                     "foods": rng.sample(foods, 3)}
                 for n in names}
    people = sorted({rng.choice(string.ascii_uppercase) + rng.choice(syllables)
                     + rng.choice(syllables) for _ in range(300)})[:150]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
                    for _ in range(800)})
    return {"creatures": creatures, "people": people, "words": words, "habitats": habitats}


WORLD = _toy_world()


def _weighted(rng, options, weights):
    return rng.choices(options, weights)[0]


# Each family: (rng, hard) -> (instruction, input, references, sampled response). Deterministic
# families have one reference. Open-ended ones have several valid answers of unequal frequency, so a
# teacher trained on samples learns a distribution with real secondary mass for tau to expose.
def _color(rng, hard):
    c = rng.choice(list(WORLD["creatures"]))
    answer = f"The {c} is {WORLD['creatures'][c]['color']}."
    return f"What color is the {c}?", "", [answer], answer


def _habitat(rng, hard):
    c = rng.choice(list(WORLD["creatures"]))
    answer = f"The {c} lives in the {WORLD['creatures'][c]['habitat']}."
    return f"Where does the {c} live?", "", [answer], answer


def _add(rng, hard):
    a, b = (rng.randint(100, 999), rng.randint(100, 999)) if hard else (rng.randint(0, 99),
                                                                        rng.randint(0, 99))
    answer = f"{a} plus {b} is {a + b}."
    return f"What is {a} plus {b}?", "", [answer], answer


def _compare(rng, hard):
    a, b = rng.sample(range(1000 if hard else 100), 2)
    answer = f"{max(a, b)} is larger than {min(a, b)}."
    return f"Which number is larger, {a} or {b}?", "", [answer], answer


def _count(rng, hard):
    n = rng.randint(7, 10) if hard else rng.randint(2, 6)
    answer = f"There are {n} words."
    return "Count the words in the input.", " ".join(rng.choices(WORLD["words"],
                                                                 k=n)), [answer], answer


def _upper(rng, hard):
    text = " ".join(rng.choices(WORLD["words"], k=rng.randint(4, 5) if hard else rng.randint(1, 3)))
    return "Rewrite the input in capital letters.", text, [text.upper()], text.upper()


def _food(rng, hard):
    c = rng.choice(list(WORLD["creatures"]))
    answers = [f"The {c} likes {food}." for food in WORLD["creatures"][c]["foods"]]
    return f"Name a food that the {c} likes.", "", answers, _weighted(rng, answers, [6, 3, 1])


def _describe(rng, hard):
    c = rng.choice(list(WORLD["creatures"]))
    f = WORLD["creatures"][c]
    answers = [f"The {c} is a {f['size']} {f['color']} creature that lives in the {f['habitat']}.",
               f"A {f['color']} animal from the {f['habitat']}, the {c} is {f['size']}.",
               f"The {c} lives in the {f['habitat']}. It is {f['color']} and {f['size']}."]
    return f"Describe the {c}.", "", answers, _weighted(rng, answers, [5, 3, 2])


def _greet(rng, hard):
    p = rng.choice(WORLD["people"])
    answers = [f"Hello, {p}! It is good to see you.", f"Hi {p}, welcome back!",
               f"Good morning, {p}.",
               f"Dear {p}, greetings from all of us."]
    return f"Write a short greeting for {p}.", "", answers, _weighted(rng, answers,
                                                                      [45, 30, 15, 10])


def _neighbor(rng, hard):
    habitat = rng.choice(WORLD["habitats"])
    residents = sorted(c for c, f in WORLD["creatures"].items() if f["habitat"] == habitat)
    answers = [f"The {c} lives in the {habitat}." for c in residents]
    # Zipf: a few favourites, a long tail
    weights = [1 / (rank + 1) for rank in range(len(answers))]
    return f"Name a creature that lives in the {habitat}.", "", answers, _weighted(rng, answers,
                                                                                   weights)


TOY_FAMILIES = {"color": _color, "habitat": _habitat, "add": _add, "compare": _compare,
                "count": _count,
                "upper": _upper, "food": _food, "describe": _describe, "greet": _greet,
                "neighbor": _neighbor}
# Families whose question space is large enough that evaluation questions are held out of training
# entirely.
TOY_HELD_OUT = ("add", "compare", "count", "upper")


def _bucket(salt, instruction, input):
    """A fixed pseudo-random byte (0-255) per question: splits the questions deterministically."""
    return hashlib.sha256(f"{salt}{instruction}|{input}".encode()).digest()[0]


def toy_split(split, seed=None):
    """A split of the toy benchmark, deterministic by (split, seed). Train records carry one sampled
    response; evaluation records carry every valid reference."""
    if split not in TOY_SPLITS:
        raise ValueError(f"unknown toy split {split!r}: expected one of {', '.join(TOY_SPLITS)}")
    rng = random.Random(TOY_SEEDS[split] if seed is None else seed)
    families, records, seen = list(TOY_FAMILIES), [], set()
    while len(records) < TOY_SPLITS[split]:
        family = families[len(records) % len(families)]
        instruction, input, references, response = TOY_FAMILIES[family](rng, split == "test-hard")
        if family in TOY_HELD_OUT:
            # a fixed 10% of these questions is reserved for evaluation: train stays outside it,
            # evaluation inside
            if (_bucket("", instruction, input) < 26) == (split == "train"):
                continue
            # disjoint halves of the reserved questions, no duplicates
            if split in ("valid", "test"):
                if (_bucket("valid|", instruction,
                            input) < 128) != (split == "valid") or (instruction, input) in seen:
                    continue
                seen.add((instruction, input))
        output = [response] if split == "train" else references
        records.append({"instruction": instruction, "input": input, "output": output,
                        "prompt": build_prompt(instruction, input), "family": family})
    return records


# ==================================================================================================
# Batching


def encode_example(tokenizer, prompt, response=None, max_prompt_len=256, max_len=512):
    """Tokenize one example. Returns (prompt_ids, response_ids) with EOS ending the response, or
    None when the prompt cannot fit. A long prompt is cut before the "### Response:" marker, never
    the marker itself; the response is cut so that prompt + response <= max_len."""
    prompt_ids = tokenizer.encode(prompt)
    if len(prompt_ids) > max_prompt_len:
        marker = tokenizer.encode(RESPONSE_MARKER)
        body = []
        if prompt.endswith(RESPONSE_MARKER):
            body = tokenizer.encode(prompt[: len(prompt) - len(RESPONSE_MARKER)])
        if not body or len(marker) >= max_prompt_len:
            return None
        prompt_ids = body[: max_prompt_len - len(marker)] + marker
    if response is None:
        return prompt_ids, []
    response_ids = (tokenizer.encode(response) + [tokenizer.eos_id])[: max_len - len(prompt_ids)]
    return (prompt_ids, response_ids) if response_ids else None


def encode_dataset(tokenizer, records, max_prompt_len=256, max_len=512, with_response=True,
                   where="dataset"):
    """Tokenize records; prompts that cannot fit are skipped with a printed count, never
    silently."""
    encoded, skipped = [], 0
    for record in records:
        response = record["output"][0] if with_response else None
        example = encode_example(tokenizer, record["prompt"], response, max_prompt_len, max_len)
        if example is None:
            skipped += 1
        else:
            encoded.append(example)
    if skipped:
        print(f"{where}: skipped {skipped} of {len(records)} examples whose prompt cannot fit in "
              f"{max_prompt_len} tokens")
    return encoded


def collate_train(examples, pad_id):
    """[(prompt_ids, response_ids)] -> right-padded input_ids, attention_mask, labels, each (B, T).
    Position i predicts token i+1; labels hold that token on response and EOS targets and -100
    elsewhere."""
    seqs = [p + r for p, r in examples]
    T = max(len(s) for s in seqs) - 1
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for row, ((prompt, _), seq) in enumerate(zip(examples, seqs)):
        n = len(seq) - 1
        input_ids[row, :n] = torch.tensor(seq[:-1])
        attention_mask[row, :n] = 1
        start = len(prompt) - 1  # the position whose next token is the first response token
        labels[row, start:n] = torch.tensor(seq[start + 1:])
    return input_ids, attention_mask, labels


def collate_prompts(prompts, pad_id):
    """[prompt_ids] -> left-padded input_ids and attention_mask (B, T) for generation."""
    T = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, T - len(p):] = torch.tensor(p)
        attention_mask[row, T - len(p):] = 1
    return input_ids, attention_mask


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="download and normalise the benchmarks")
    prep.add_argument("--benchmarks", default="dolly,self-inst,vicuna,sinst,uinst,toy")
    prep.add_argument("--data-dir", default=DATA_DIR)
    prep.add_argument("--force", action="store_true",
                      help="redo benchmarks that are already prepared")
    args = parser.parse_args(argv)
    import checks
    checks.writable("--data-dir", args.data_dir)
    prepare([b for b in args.benchmarks.split(",") if b], args.data_dir, args.force)


if __name__ == "__main__":
    from checks import run_cli
    run_cli(main)
