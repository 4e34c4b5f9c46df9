"""The paper's training data: the fine-tuned teacher's own responses, sampled once and cached.

The paper distils on fixed *teacher-generated* responses (its Appendix A): the teacher is fine-tuned
on the benchmark, answers every training prompt once, and the student learns from those (prompt,
teacher response) pairs - off-policy, never sampled from the student. `train.py --responses teacher`
(the default) makes them on first use, and every later run of the grid reads the same file:

    data/responses/<benchmark>/<teacher fingerprint>/train.jsonl      a record per prompt, in order
    data/responses/<benchmark>/<teacher fingerprint>/provenance.json  teacher, seed, decoding, ...

    python responses.py --teacher runs/toy/teacher/best --benchmark toy --limit 1200  # beforehand

The fingerprint is a hash of the teacher's config.json and weight files, so a retrained teacher at
the same path gets new responses. Decoding is the protocol's sampling (temperature 1, no top-k,
top-p 1, at most 256 new tokens) without n-gram blocking, cut at the first EOS. Prompts are answered
in chunks of CHUNK and chunk k samples with its own seed, so the file is the same whether it was
made in one go, resumed after a crash, extended to more prompts later, or shared out over torchrun
processes (each answers every world_size-th chunk; rank 0 writes them in order).
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import shlex
import sys
from pathlib import Path

# Deterministic CPU runs (see train.py)
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
import torch.distributed as dist
from tqdm import tqdm

import checks
import data
import evaluate
import files
from checkpoint import StopOnSignal
from files import atomic_write
from hf_files import resolve_checkpoint, weight_files

SEED = 0     # chunk k samples with seed SEED * 1_000_003 + k
CHUNK = 64   # prompts per chunk: the unit of resuming and of sharing out over processes
DECODING = dict(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=256, no_repeat_ngram_size=0)
# What must agree between a cached file and a run for the run to use it (the rest is information).
# The dtype is part of it: the same teacher sampling in another precision answers otherwise.
MUST_MATCH = ("teacher_fingerprint", "teacher_dtype", "benchmark", "seed", "chunk", "decoding",
              "max_prompt_len")


def default_dtype(device_type):
    """The precision a model runs in when --dtype is not given: bfloat16 on a GPU (half the memory,
    the tensor cores' format), float32 on a CPU (where bfloat16 matmuls are slow). One rule for
    train.py and this file, so that both sample the teacher alike into the same cache."""
    return "bfloat16" if device_type.startswith("cuda") else "float32"


def fingerprint(teacher_name):
    """sha256 over the teacher checkpoint's config.json and weight files (a directory or a hub
    id)."""
    pick = lambda files: ["config.json", *weight_files(files, teacher_name)]
    directory = resolve_checkpoint(teacher_name, pick)
    digest = hashlib.sha256()
    for name in pick(os.listdir(directory)):
        digest.update(name.encode() + b"\0")
        with open(os.path.join(directory, name), "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def cache_dir(data_dir, benchmark, teacher_fingerprint, teacher_dtype="float32", max_prompt_len=256):
    """Where one teacher's responses to one benchmark's training prompts live. A jsonl file given as
    --data is named by its content too. Settings that change the answers besides the teacher (its
    dtype while sampling, the prompt cut) name the folder when they differ from the defaults, so runs
    with other settings keep their caches side by side instead of refusing each other's."""
    if benchmark.endswith(".jsonl"):
        content = hashlib.sha256(Path(benchmark).read_bytes()).hexdigest()
        benchmark = f"{Path(benchmark).stem}-{content[:12]}"
    name = teacher_fingerprint[:16] + (f"-{teacher_dtype}" if teacher_dtype != "float32" else "")
    name += f"-prompt{max_prompt_len}" if max_prompt_len != 256 else ""
    return Path(data_dir, "responses", benchmark, name)


def teacher_responses(teacher, tokenizer, records, needed, where, provenance, max_prompt_len=256, rank=0,
                      world_size=1, stop=None):
    """The first `needed` records (None: all) with output = [the teacher's sampled response].

    `records` is the whole training split: prompts are answered in whole chunks, so the file never
    depends on how many examples the first run asked for. Responses already in `where` are read, the
    missing chunks generated (shared out over the processes when world_size > 1) and appended. Every
    process returns the same list.

    One writer: rank 0 holds the folder's lock (files.locked) from before anyone reads the file to
    the last chunk written, so a run started beside it waits, then reads what it made. `stop`
    (checkpoint.StopOnSignal): on a signal the round of chunks in progress is written, then the run
    stops; the same command continues from there."""
    with files.locked(where / ".lock", on_wait=lambda: print(f"waiting: another process is making the teacher's "
                                                             f"responses in {where}", flush=True)) \
            if rank == 0 else contextlib.nullcontext():
        if world_size > 1:
            dist.barrier()  # rank 0 holds the lock before any process reads the file
        return _fill_cache(teacher, tokenizer, records, needed, where, provenance, max_prompt_len, rank,
                           world_size, stop)


def _fill_cache(teacher, tokenizer, records, needed, where, provenance, max_prompt_len, rank, world_size, stop):
    path, meta = Path(where, "train.jsonl"), Path(where, "provenance.json")
    provenance = {**provenance, "seed": SEED, "chunk": CHUNK, "decoding": DECODING, "max_prompt_len": max_prompt_len}
    if meta.is_file():
        check_provenance(json.loads(meta.read_text()), provenance, meta)
    elif path.is_file():
        raise SystemExit(f"error: {path} has no provenance.json beside it, so its teacher is unknown: delete {where}")
    needed = len(records) if needed is None else min(needed, len(records))
    to_answer = min(math.ceil(needed / CHUNK) * CHUNK, len(records))  # whole chunks
    answered = read_complete_chunks(path, records)
    if world_size > 1:
        dist.barrier()  # everyone has read the file before rank 0 trims or extends it
    todo = list(range(len(answered) // CHUNK, math.ceil(to_answer / CHUNK)))
    if todo:
        check_prompts_fit(tokenizer, records[:to_answer], max_prompt_len)
    if todo and rank == 0:
        text = data.jsonl_text(answered)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:  # a torn last line or half a chunk
            atomic_write(str(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        write_provenance(meta, provenance, answered)
    bar = tqdm(total=to_answer - len(answered), desc="teacher responses", disable=rank != 0 or not todo)
    for first in range(0, len(todo), world_size):
        round_ = todo[first:first + world_size]  # chunk round_[r] is answered by process r
        my_chunk = answer_chunk(teacher, tokenizer, records, round_[rank], max_prompt_len) if rank < len(round_) else []
        chunks = [my_chunk]
        if world_size > 1:
            chunks = [None] * world_size
            dist.all_gather_object(chunks, my_chunk)
        new = [record for chunk in chunks for record in chunk]
        answered += new
        if rank == 0:
            with stop.saving() if stop else contextlib.nullcontext():
                with open(path, "a", encoding="utf-8") as f:
                    f.write(data.jsonl_text(new))
                    f.flush()
                    os.fsync(f.fileno())
                write_provenance(meta, provenance, answered)
        bar.update(len(new))
        if stop is not None and first + world_size < len(todo) and stop.check():
            bar.close()
            stop.exit(f"{path} keeps the teacher's responses to {len(answered)} prompts", rank == 0)
    bar.close()
    return answered[:needed]


def check_prompts_fit(tokenizer, records, max_prompt_len):
    """A prompt cut to fit --max-prompt-len keeps its "### Response:" marker; a limit too small for
    the marker leaves nothing to answer, and would cache empty responses."""
    if not any(data.encode_example(tokenizer, r["prompt"], max_prompt_len=max_prompt_len) for r in records):
        marker = len(tokenizer.encode(data.RESPONSE_MARKER))
        raise SystemExit(f"error: --max-prompt-len {max_prompt_len} cannot hold any training prompt (the response "
                         f"marker alone takes {marker} tokens): raise it")


def answer_chunk(teacher, tokenizer, records, k, max_prompt_len):
    """The teacher's sampled responses to chunk k of the records, each with its length in tokens and
    whether it ended with EOS (False: cut at max_new_tokens)."""
    chunk = records[k * CHUNK:(k + 1) * CHUNK]
    samples = evaluate.sample(teacher, tokenizer, chunk, seed=SEED * 1_000_003 + k,
                              max_prompt_len=max_prompt_len, progress=False, **DECODING)
    return [{**record, "output": [tokenizer.decode(tokens).strip()], "teacher_tokens": len(tokens),
             "teacher_eos": eos}
            for record, (tokens, eos) in zip(chunk, samples)]


def read_complete_chunks(path, records):
    """The whole chunks already in the file; a torn last line or a half-written chunk is dropped
    (and redone)."""
    answered = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").split("\n"):
            try:
                answered.append(json.loads(line))
            except json.JSONDecodeError:  # the empty string after the last newline, or a torn line
                break
    if len(answered) < len(records):
        answered = answered[: len(answered) // CHUNK * CHUNK]
    for i, (got, source) in enumerate(zip(answered, records)):
        if got.get("prompt") != source["prompt"]:
            raise SystemExit(f"error: {path}, line {i + 1} answers another prompt than training "
                             f"example {i + 1}: the training data changed since it was made; "
                             "delete the file to make it anew")
    return answered[: len(records)]


def check_provenance(cached, this_run, meta):
    """A cache made by another teacher, or with other sampling settings, is refused in one line
    naming both."""
    differ = [k for k in MUST_MATCH if cached.get(k) != this_run[k]]
    if differ:
        raise SystemExit(f"error: {meta} holds responses of teacher {cached.get('teacher')} "
                         f"(fingerprint {str(cached.get('teacher_fingerprint'))[:16]}), but this "
                         f"run's teacher is {this_run['teacher']} (fingerprint "
                         f"{this_run['teacher_fingerprint'][:16]}); they differ in "
                         f"{', '.join(differ)}: delete {meta.parent} or use --responses dataset")


def write_provenance(meta, provenance, answered):
    counts = {"n_prompts": len(answered), "empty": sum(not r["output"][0] for r in answered),
              "no_eos": sum(not r.get("teacher_eos", True) for r in answered)}
    atomic_write(str(meta),
                      lambda tmp: Path(tmp).write_text(json.dumps({**provenance, **counts},
                                                                  indent=1)))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the fine-tuned teacher: checkpoint directory or hub id")
    parser.add_argument("--benchmark", default="dolly", help="benchmark whose training prompts it answers")
    parser.add_argument("--limit", type=int, default=None, help="only the first N training prompts (whole chunks)")
    parser.add_argument("--max-prompt-len", type=int, default=256)
    parser.add_argument("--data-dir", default=data.DATA_DIR)
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if a GPU is visible, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="the teacher's weights while it samples "
                        "(default, as train.py: bfloat16 on GPU, float32 on CPU); part of the cache's key")
    args = parser.parse_args(argv)
    checks.checkpoint("--teacher", args.teacher)  # the door (checks.py)
    data.check_benchmark("--benchmark", args.benchmark, args.data_dir, split="train")
    checks.at_least("--limit", args.limit, 1)
    checks.at_least("--max-prompt-len", args.max_prompt_len, 1)
    checks.device("--device", args.device)
    checks.writable("--data-dir", os.path.join(args.data_dir, "responses", args.benchmark))
    import torch
    from model import GPT
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or default_dtype(device)
    teacher = GPT.from_pretrained(args.teacher, dtype=getattr(torch, dtype), device=device)
    tokenizer = data.load_tokenizer(args.teacher)  # the checkpoint's own files (a toy teacher's too)
    teacher_fingerprint = fingerprint(args.teacher)
    where = cache_dir(args.data_dir, args.benchmark, teacher_fingerprint, dtype, args.max_prompt_len)
    records = data.load_split(args.benchmark, "train", args.data_dir)
    provenance = {"teacher": args.teacher, "teacher_fingerprint": teacher_fingerprint,
                  "benchmark": args.benchmark, "teacher_dtype": dtype}
    with StopOnSignal(command=shlex.join(["python", "responses.py", *argv])) as stop:
        teacher_responses(teacher, tokenizer, records, args.limit, where, provenance, args.max_prompt_len, stop=stop)
    print(f"{where / 'train.jsonl'}\n{(where / 'provenance.json').read_text()}")


if __name__ == "__main__":
    checks.run_cli(main)
