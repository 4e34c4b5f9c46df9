"""The offline toy benchmark (METHOD.md section 5): a small invented world whose questions train and
test a model on 2 CPU cores, the from-scratch model sizes it uses, and the two stages (a teacher, a
student's warm start) that `train.py --preset toy` makes before its first run.

Records come out without their prompt: data.py owns the schema and the prompt template, and adds
it (`data.load_split("toy", "train")`). Everything here is deterministic by seed.
"""
import hashlib
import os
import random
import string

from model import GPT, GPTConfig

# --- The world and its ten task families ----------------------------------------------------------

SPLITS = {"train": 20_000, "valid": 200, "test": 500, "test-hard": 500}
SEEDS = {"train": 1, "valid": 2, "test": 3, "test-hard": 4}


def _world(seed=0):
    rng = random.Random(seed)
    syllables = ["ba", "ko", "mi", "zu", "te", "ra", "lo", "fi", "nu", "pe", "da", "ga", "si", "vo", "ke", "ly"]
    names = sorted({rng.choice(syllables) + rng.choice(syllables) + rng.choice(["b", "n", "x", "r", "l", ""])
                    for _ in range(400)})[:120]
    colors = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "brown"]
    habitats = ["forest", "desert", "river", "mountain", "swamp", "meadow", "cave", "island"]
    foods = ["berries", "seeds", "fish", "honey", "leaves", "mushrooms", "roots", "insects", "apples", "nuts",
             "grass", "clover", "moss", "plums", "beans"]
    creatures = {n: {"color": rng.choice(colors), "habitat": rng.choice(habitats),
                     "size": rng.choice(["small", "medium-sized", "large"]), "foods": rng.sample(foods, 3)}
                 for n in names}
    people = sorted({rng.choice(string.ascii_uppercase) + rng.choice(syllables) + rng.choice(syllables)
                     for _ in range(300)})[:150]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(800)})
    return {"creatures": creatures, "people": people, "words": words, "habitats": habitats}


WORLD = _world()  # read-only after import


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
    a, b = (rng.randint(100, 999), rng.randint(100, 999)) if hard else (rng.randint(0, 99), rng.randint(0, 99))
    answer = f"{a} plus {b} is {a + b}."
    return f"What is {a} plus {b}?", "", [answer], answer


def _compare(rng, hard):
    a, b = rng.sample(range(1000 if hard else 100), 2)
    answer = f"{max(a, b)} is larger than {min(a, b)}."
    return f"Which number is larger, {a} or {b}?", "", [answer], answer


def _count(rng, hard):
    n = rng.randint(7, 10) if hard else rng.randint(2, 6)
    answer = f"There are {n} words."
    return "Count the words in the input.", " ".join(rng.choices(WORLD["words"], k=n)), [answer], answer


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
    answers = [f"Hello, {p}! It is good to see you.", f"Hi {p}, welcome back!", f"Good morning, {p}.",
               f"Dear {p}, greetings from all of us."]
    return f"Write a short greeting for {p}.", "", answers, _weighted(rng, answers, [45, 30, 15, 10])


def _neighbor(rng, hard):
    habitat = rng.choice(WORLD["habitats"])
    residents = sorted(c for c, f in WORLD["creatures"].items() if f["habitat"] == habitat)
    answers = [f"The {c} lives in the {habitat}." for c in residents]
    weights = [1 / (rank + 1) for rank in range(len(answers))]  # Zipf: a few favourites, a long tail
    return f"Name a creature that lives in the {habitat}.", "", answers, _weighted(rng, answers, weights)


FAMILIES = {"color": _color, "habitat": _habitat, "add": _add, "compare": _compare, "count": _count,
            "upper": _upper, "food": _food, "describe": _describe, "greet": _greet, "neighbor": _neighbor}
# Families whose question space is large enough that evaluation questions are held out of training
# entirely.
HELD_OUT = ("add", "compare", "count", "upper")


def _bucket(salt, instruction, input):
    """A fixed pseudo-random byte (0-255) per question: splits the questions deterministically."""
    return hashlib.sha256(f"{salt}{instruction}|{input}".encode()).digest()[0]


def records(split, seed=None):
    """A split of the toy benchmark, deterministic by (split, seed), without prompts (data.py adds
    them). Train records carry one sampled response; evaluation records carry every valid
    reference."""
    if split not in SPLITS:
        raise ValueError(f"unknown toy split {split!r}: expected one of {', '.join(SPLITS)}")
    rng = random.Random(SEEDS[split] if seed is None else seed)
    families, out, seen = list(FAMILIES), [], set()
    while len(out) < SPLITS[split]:
        family = families[len(out) % len(families)]
        instruction, input, references, response = FAMILIES[family](rng, split == "test-hard")
        if family in HELD_OUT:
            # a fixed 10% of these questions is reserved for evaluation: train stays outside it,
            # evaluation inside
            if (_bucket("", instruction, input) < 26) == (split == "train"):
                continue
            # disjoint halves of the reserved questions, no duplicates
            if split in ("valid", "test"):
                in_valid_half = _bucket("valid|", instruction, input) < 128
                if in_valid_half != (split == "valid") or (instruction, input) in seen:
                    continue
                seen.add((instruction, input))
        output = [response] if split == "train" else references
        out.append({"instruction": instruction, "input": input, "output": output, "family": family})
    return out


# --- The vocabulary and the from-scratch models ---------------------------------------------------

# The toy's BPE vocabulary (data.toy_tokenizer, made by bpe.py from the training split): 2,047 tokens and
# <|endoftext|>. 2,048 is the smallest power of two at which nearly every word of the toy's text is one
# token (99.5 % of word occurrences; 97.6 % at 1,024, 92.8 % at 512), as most English words are in
# GPT-2's 50k vocabulary: a teacher's second choices are then whole alternative words (a food, a
# colour, a name), the tail the paper's tau lifts. More merges would only memorise rare syllable words
# (past 2,999 tokens no pair repeats). `--preset toy-bytes` keeps the 257-token byte vocabulary of the
# earlier study.
VOCAB_SIZE = 2048

# The toy's model sizes (SCRATCH_POSITIONS, the vocabulary's width); "scratch:<layers>x<width>" builds
# any other size with 48-dim heads.
SIZES = {"toy-teacher": dict(n_layer=4, n_head=2, n_embd=128),
         "toy-student": dict(n_layer=2, n_head=2, n_embd=96),
         "toy-tiny": dict(n_layer=1, n_head=2, n_embd=32)}
SCRATCH_POSITIONS = 512


def is_scratch(name):
    """A from-scratch size (toy-teacher, scratch:4x128, ...) rather than a checkpoint."""
    return name in SIZES or name.startswith("scratch:")


def scratch_model(name, vocab_size=257):
    """A randomly initialised GPT of a from-scratch size (the torch seed decides its weights)."""
    if name.startswith("scratch:"):
        layers, width = (int(x) for x in name.removeprefix("scratch:").split("x"))
        size = dict(n_layer=layers, n_embd=width, n_head=max(1, width // 48))
    else:
        size = SIZES[name]
    last = vocab_size - 1  # the byte tokenizer's <|endoftext|>
    return GPT(GPTConfig(vocab_size=vocab_size, n_positions=SCRATCH_POSITIONS, ffn_dim=4 * size["n_embd"],
                         bos_token_id=last, eos_token_id=last, pad_token_id=last, **size))


# --- The toy preset's stages ----------------------------------------------------------------------

# Each an ordinary train.py command, run once before the first toy run that needs it (run one by
# hand to make it yourself), into runs/<preset>/<stage> (toy, toy-bytes): the teacher fine-tuned from
# scratch to its validation plateau, and a short SFT warm start for the student (METHOD.md section 5:
# RKL from random weights is an optimisation failure, not the paper's regime of pretrained students).
PRESETS = ("toy", "toy-bytes")
STAGES = {
    "teacher": ["--mode", "sft", "--student", "toy-teacher", "--lr", "2e-3", "--epochs", "3", "--batch-size", "16",
                "--train-examples", "14400"],
    "student-init": ["--mode", "sft", "--student", "toy-student", "--lr", "3e-3", "--epochs", "1", "--batch-size",
                     "32", "--train-examples", "9600"],
}


def stage_dirs(preset):
    return [f"runs/{preset}/{stage}" for stage in STAGES]


def stages_needed(args):
    """The run directories of the toy stages this command needs that are not made yet (made =
    finished.json; an interrupted stage already holds a best/ of an earlier epoch, and is resumed)."""
    if args.preset not in PRESETS or args.mode != "kd":
        return []
    needed = {os.path.dirname(name) for name in (args.teacher, args.student)}
    return [out for out in stage_dirs(args.preset) if out in needed and not made(out)]


def made(out):
    return os.path.isfile(os.path.join(out, "finished.json"))


def making_lock(out):
    """The lock file that makes one process make a stage while the others wait (files.locked)."""
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.making.lock")


def stage_argv(out, data_dir):
    """The train.py command line that makes (or resumes) a stage, runs/<preset>/<stage>."""
    preset, stage = out.split("/")[-2:]
    resume = ["--resume"] if os.path.isfile(os.path.join(out, "last.pt")) else []
    return ["--preset", preset, *STAGES[stage], "--out", out, "--data-dir", data_dir, "--eval-benchmarks", "", *resume]
