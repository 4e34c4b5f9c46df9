"""The door: each command line (train.py, evaluate.py, responses.py, analysis.py, data.py) is
checked right after argparse and before any model or dataset loads, with the helpers here and the
ones that live beside what they check (data.check_benchmark, checkpoint.check_file,
losses.check_objective). Bad input stops with one line that names the flag or file, never a
traceback and never a run that trains on nonsense and exits 0.

What only reading a file can show (a truncated weights file, a corrupt last.pt, a bad jsonl line) is
raised where the file is read, as ValueError / FileNotFoundError with the file named; `run_cli`
turns those into the same one line (set TEMPKD_TRACEBACK=1 to see the traceback instead).
"""
import json
import math
import os
import sys

from hf_files import looks_local, weight_files
from model import config_from_hf


BUSY = 75  # the exit status of a command refused because another process holds what it needs (EX_TEMPFAIL)


def fail(message):
    raise SystemExit(f"error: {message}")


def busy(message):
    """Refuse in one line with exit status BUSY (sweep.sh skips such a cell instead of failing)."""
    close_progress_bars()
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(BUSY)


def close_progress_bars():
    """Close every live tqdm bar, so that the error after it stands on its own line and is the last
    thing on screen (a live bar has no newline yet, and redraws itself after what is printed)."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def run_cli(main):
    """Run a command line's main(): our errors about inputs end in one line and exit status 2; any
    error leaves no progress bar drawn after it."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        close_progress_bars()
        if os.environ.get("TEMPKD_TRACEBACK"):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except (SystemExit, KeyboardInterrupt):
        close_progress_bars()
        raise


def at_least(flag, value, low):
    """An integer flag (None = unset) that must be >= low."""
    if value is not None and not value >= low:
        fail(f"{flag} must be >= {low}, got {value}")


def finite(flag, value, low=None, high=None):
    """A float flag that must be a finite number in [low, high]."""
    if value is None:
        return
    too_low, too_high = low is not None and value < low, high is not None and value > high
    if not math.isfinite(value) or too_low or too_high:
        bounds = (f"in [{low}, {high}]" if high is not None
                  else f">= {low}" if low is not None else "finite")
        fail(f"{flag} must be a finite number {bounds}, got {value}")


def seeds(flag, text):
    """"10,20,30" -> [10, 20, 30]: integers, each once."""
    try:
        values = [int(s) for s in str(text).split(",")]
    except ValueError:
        fail(f"{flag} must be comma-separated integers, got {text!r}")
    if len(set(values)) != len(values):
        fail(f"{flag} repeats a seed: {text!r}")
    return values


def checkpoint(flag, name):
    """A checkpoint directory that exists and holds a readable config.json and weights, or a hub id
    (checked when it is downloaded). A path that looks local but does not exist is not sent to the
    hub. Returns the config.json it read, parsed once for every later look at the door (None for a hub
    id: not known before it is downloaded)."""
    if os.path.isdir(name):
        try:
            config = json.loads(open(os.path.join(name, "config.json"), encoding="utf-8").read())
        except FileNotFoundError:
            fail(f"{flag} {name}: no config.json in that directory")
        except (ValueError, UnicodeDecodeError) as e:
            fail(f"{flag} {name}: config.json is not valid JSON ({e})")
        try:
            weight_files(os.listdir(name), name)
        except FileNotFoundError as e:
            fail(f"{flag} {e}")
        try:  # the whole config, as from_pretrained will read it: family, sizes, their types
            config_from_hf(config)
        except (ValueError, KeyError) as e:
            fail(f"{flag} {name}: config.json {'lacks the field ' if isinstance(e, KeyError) else ''}{e}")
        return config
    if looks_local(name):
        fail(f"{flag} {name}: no such directory")
    return None


def device(flag, name):
    """--device cuda needs a visible GPU."""
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        fail(f"{flag} cuda, but no GPU is visible (CUDA_VISIBLE_DEVICES?): use {flag} cpu")


def writable(flag, path):
    """A directory we can create or write into (its nearest existing ancestor is writable)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        fail(f"{flag} {path}: cannot write there ({probe} is not a writable directory)")


def same_vocabulary(teacher_tokenizer, student_tokenizer, teacher_name, student_name):
    """Token-level KD compares distributions id by id: every id must stand for the same bytes in
    both tokenizers, and EOS must be the same id."""
    teacher_table, student_table = teacher_tokenizer.id_to_bytes(), student_tokenizer.id_to_bytes()
    if teacher_table != student_table or teacher_tokenizer.eos_id != student_tokenizer.eos_id:
        differ = sorted(i for i in set(teacher_table) | set(student_table)
                        if teacher_table.get(i) != student_table.get(i))
        more = "..." if len(differ) > 3 else ""
        where = f"ids {differ[:3]}{more} differ" if differ else "EOS ids differ"
        fail(f"teacher {teacher_name} and student {student_name} have incompatible vocabularies "
             f"({where}): token-level KD needs one shared tokenizer")
