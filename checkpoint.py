"""What a run leaves on disk and how it survives being stopped: last.pt (written atomically, checked
at the door, read once, restored exactly), preemption signals, the temporary files a killed run
leaves behind, and the progress bar with its log.jsonl."""
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import time
import zipfile
from pathlib import Path

import torch
from tqdm import tqdm

import checks
import distributed
import files
from files import atomic_write


# --- last.pt --------------------------------------------------------------------------------------

def save(path, args, state, student, optimizer, is_main, stop=None):
    """Everything a resumed run needs: weights, optimizer, step/epoch/best score, settings, RNG
    states. Under FSDP every process must call (the whole state is gathered); rank 0 writes, and a
    second signal (`stop`) waits for the write to end."""
    model_state, optim_state = student.state_dicts(optimizer)
    if not is_main:
        return
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    checkpoint = {"model": model_state, "optimizer": optim_state, "state": dict(state), "args": vars(args),
                  "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": cuda_rng}}
    with stop.saving() if stop else contextlib.nullcontext():
        atomic_write(str(path), lambda tmp: torch.save(checkpoint, tmp))


@contextlib.contextmanager
def claim(out, args, is_main):
    """Hold a run directory for this run, from its first write into it to its end: a second run into
    it is refused in one line with exit status checks.BUSY. The kernel releases the claim when the
    process ends, however it ends (files.locked). Then: the temporary files a killed run left are
    cleaned, and a fresh run writes its args.json. (Rank 0 does all this for a torchrun world.)"""
    if not is_main:
        yield
        return
    lock = files.locked(os.path.join(out, ".lock"), wait=False)
    try:
        lock.__enter__()
    except files.Busy:
        checks.busy(f"--out {out} is in use: another run is writing into it (choose another --out, or wait)")
    try:
        clean_stale_files(Path(out))
        if not args.resume:
            Path(out, "args.json").write_text(json.dumps(vars(args), indent=1))
        yield
    finally:
        lock.__exit__(None, None, None)


def check_free(flag, out):
    """The door's look: refuse at once a run directory another run holds (see claim)."""
    lock = os.path.join(out, ".lock")
    if os.path.isfile(lock):
        try:
            with files.locked(lock, wait=False):
                pass
        except files.Busy:
            checks.busy(f"{flag} {out} is in use: another run is writing into it (choose another {flag}, or wait)")


def check_file(flag, path):
    """The door's cheap look at a last.pt, before any model loads: torch.save writes a zip archive
    whose directory sits at its end, so a truncated or overwritten file shows here without reading
    its tensors."""
    bad = f"{flag}: {path} is not a readable checkpoint (truncated or corrupt?): delete it to start again, or restore it"
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        checks.fail(bad)
    size = os.path.getsize(path)
    if not any(e.filename.endswith("data.pkl") for e in entries) or any(
            e.header_offset + e.compress_size > size for e in entries):
        checks.fail(bad)


def read(path):
    """last.pt as a dict, read once (weights_only: tensors and plain containers, never code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt inside. Not passed on: torch's advice to unpickle with weights_only=False
        raise SystemExit(f"error: {path} is not a readable checkpoint (truncated or corrupt? {type(e).__name__}): "
                         "delete it to start again, or restore it")


def restore(checkpoint, path, student, optimizer):
    """Put a read last.pt back: weights, optimizer, RNG states. Returns the loop's state."""
    try:
        student.load_state_dicts(checkpoint, optimizer)
    except RuntimeError as e:  # e.g. another student, or a last.pt from before model.Linear stored (in, out)
        detail = " ".join(str(e).split())[:300]
        raise SystemExit(f"error: {path} does not fit this model (another student, or an older tempkd): {detail}")
    torch.set_rng_state(checkpoint["rng"]["torch"])
    random.setstate(checkpoint["rng"]["python"])
    if torch.cuda.is_available() and checkpoint["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return checkpoint["state"]


# --- Preemption, and what a killed run leaves behind ----------------------------------------------

class StopOnSignal:
    """The preemption contract of every long stage (teacher responses, training, validation,
    evaluation). SIGTERM (how clusters preempt a job) or SIGINT (Ctrl-C): the stage finishes its unit
    of work (a chunk of responses, an optimizer step, a validation, one benchmark and seed of an
    evaluation), saves it, says how to continue, and exits with 128 + the signal's number (143 for
    SIGTERM, 130 for Ctrl-C), as a killed process would. A second signal stops at once, except that
    a file being written inside `saving()` is finished first: what is saved stays whole.

    Use it as `with StopOnSignal(...) as stop:`, and call `stop.check()` between units (under
    torchrun every process must: any one signalled stops them all, at the same unit)."""

    def __init__(self, command=None):
        self.command = command  # what continues the stage in progress (its owner updates it)
        self.signum, self.requested, self.in_save, self.second = None, False, False, None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            tqdm.write(f"{signal.Signals(signum).name}: finishing this unit of work, then saving and stopping "
                       "(a second signal stops at once)")
        elif self.in_save:
            self.second = signum  # honoured when the write ends
        else:
            self._stop_now(signum)

    def _stop_now(self, signum):
        checks.close_progress_bars()
        print(f"{signal.Signals(signum).name} again: stopped at once; what was saved before stays", file=sys.stderr,
              flush=True)
        raise SystemExit(128 + signum)

    @contextlib.contextmanager
    def saving(self):
        """A write that a second signal must not interrupt."""
        self.in_save = True
        try:
            yield
        finally:
            self.in_save = False
        if self.second is not None:
            self._stop_now(self.second)

    @property
    def signalled(self):
        """Has this process been signalled? (No collective: for work that one process does alone.)"""
        return self.signum is not None

    def check(self):
        """Has any process been signalled? (A collective under torchrun: every process calls it.)"""
        self.requested = distributed.any_process(self.signum is not None)
        return self.requested

    def exit(self, kept, is_main=True):
        """Leave with 128 + the signal's number, saying what is kept and the command that continues."""
        if is_main:
            checks.close_progress_bars()
            name = signal.Signals(self.signum or signal.SIGTERM).name
            command = self.command or "the same command"
            print(f"{name}: stopped; {kept}. Continue with:\n  {command}", file=sys.stderr, flush=True)
        raise SystemExit(128 + (self.signum or signal.SIGTERM))


def clean_stale_files(out):
    """A run killed while writing leaves last.pt.tmp<pid> / best.tmp<pid> behind (atomic_write,
    atomic_dir), or, between two renames, best.old<pid> without best/: put that back, remove the
    rest."""
    if not out.is_dir():
        return
    for path in out.iterdir():
        if ".tmp" in path.name or ".old" in path.name:
            if path.name.startswith("best.old") and not (out / "best").exists():
                path.rename(out / "best")
            elif path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


# --- What a run shows and logs --------------------------------------------------------------------

class Progress:
    """The tqdm bar, and on rank 0 log.jsonl."""

    def __init__(self, args, out, state, stop_at, is_main):
        self.args, self.stop_at, self.is_main = args, stop_at, is_main
        self.bar = tqdm(total=stop_at, initial=state["step"], disable=not is_main, desc=f"{args.mode} {out.name}")
        resumed_at = state["step"] if args.resume else None
        self.log = open_log(out / "log.jsonl", resumed_at) if is_main else None
        self.started = time.time()

    def step(self, state, epoch, stats, micro_batches, world_size, device):
        """After an optimizer step: its tokens/s (real tokens, all processes) and, on GPU, the peak
        memory so far join `stats`; the bar moves; every --log-every steps, a log line."""
        elapsed, self.started = time.time() - self.started, time.time()
        batches = [b for batch, kd_batch in micro_batches for b in ((batch,) if kd_batch is batch else (batch, kd_batch))]
        tokens = sum(int(attention_mask.sum()) for _, attention_mask, _ in batches)
        stats["tokens_per_s"] = tokens * world_size / max(elapsed, 1e-9)
        if device.type == "cuda":  # this process's high-water mark of allocated GPU memory
            stats["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        self.bar.update(1)
        postfix = dict(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}", tok_s=f"{stats['tokens_per_s']:.0f}")
        if "on_policy_share" in stats:
            postfix["on_policy"] = f"{stats['on_policy_share']:.2f}"
        self.bar.set_postfix(postfix)
        if state["step"] % self.args.log_every == 0 or state["step"] == self.stop_at:
            self.write({"step": state["step"], "epoch": epoch, **stats})

    def write(self, record):
        if self.is_main:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()

    def close(self):
        self.bar.close()
        if self.is_main:
            self.log.close()


def open_log(path, resumed_at):
    """log.jsonl: a fresh run starts a fresh one (a run killed before its first last.pt leaves an old
    one behind); a resumed run keeps the lines up to last.pt's step (a killed run logged later steps,
    which the resumed run logs again). A torn last line (a kill in mid-write) is dropped; a broken
    line before it is named."""
    if resumed_at is None or not path.is_file():
        return open(path, "w")
    lines, kept = path.read_text(encoding="utf-8", errors="replace").splitlines(), []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}, line {number}: not a JSON log line: repair or delete the line, then --resume")
        if record.get("step", 0) <= resumed_at:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a")
