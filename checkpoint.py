"""What a run leaves on disk and how it survives being stopped: last.pt (written atomically, checked
at the door, read once, restored exactly), preemption signals, the temporary files a killed run
leaves behind, and the progress bar with its log.jsonl."""
import json
import os
import random
import shutil
import signal
import sys
import time
import zipfile

import torch
from tqdm import tqdm

import checks
from files import atomic_write


# --- last.pt --------------------------------------------------------------------------------------

def save(path, args, state, student, optimizer, is_main):
    """Everything a resumed run needs: weights, optimizer, step/epoch/best score, settings, RNG
    states. Under FSDP every process must call (the whole state is gathered); rank 0 writes."""
    model_state, optim_state = student.state_dicts(optimizer)
    if not is_main:
        return
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    checkpoint = {"model": model_state, "optimizer": optim_state, "state": dict(state), "args": vars(args),
                  "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": cuda_rng}}
    atomic_write(str(path), lambda tmp: torch.save(checkpoint, tmp))


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
    """SIGTERM (how clusters preempt a job) or SIGINT (Ctrl-C): finish the current optimizer step,
    write last.pt, say how to resume, exit non-zero. A second signal stops at once. Under torchrun
    the processes agree each step (any one signalled stops them all), so they write the same
    last.pt."""

    def __init__(self, world_size, device, resume_command):
        self.world_size, self.device, self.signum, self.requested = world_size, device, None, False
        self.resume_command = resume_command
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this step, then writing last.pt")

    def check(self):
        flag = torch.tensor([float(self.signum is not None)], device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.requested = bool(flag.item())
        return self.requested

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def exit(self, out, is_main):
        """Leave with 128 + the signal's number (143 for SIGTERM, 130 for Ctrl-C), as a killed
        process would."""
        if is_main:
            command = self.resume_command or f"the same command with --resume (run directory {out})"
            name = signal.Signals(self.signum or signal.SIGTERM).name
            print(f"{name}: stopped; {out}/last.pt holds every finished step. Resume with:\n  {command}",
                  file=sys.stderr, flush=True)
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
    """log.jsonl, fresh, or on resume without the lines of steps after last.pt (a killed run logged
    them; the resumed run logs them again)."""
    if resumed_at is not None and path.is_file():
        lines = path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= resumed_at]
        path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a")
