"""Several processes, one run: torchrun's process group, the gradient sync of micro-batches, the
student under DDP or FSDP (FSDP shards its parameters, gradients and optimizer state:
docs/training.md, "Memory"), and how a process leaves.

A plain `python train.py` is a world of one and none of this does anything.
"""
import contextlib
import os
import sys

import torch
import torch.distributed as dist

import lora

from model import GPT


def setup(device_type):
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (also across nodes with
    --nnodes); plain `python train.py` is a world of one. device_type: --device (cuda: nccl, one GPU
    per process; cpu: gloo)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_type)
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def finish():
    """Wait for every process, then end the process group (a torchrun world of one included)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave(device_type):
    """The last thing a torchrun worker on gloo (CPU) does: leave without interpreter teardown.

    A collective issued during backward holds a Python object (autograd's contextvars snapshot) and
    is freed by one of gloo's C++ threads, which needs the GIL for that. If the thread gets there
    only after the interpreter began finalizing (a loaded machine), CPython < 3.14 ends the thread
    inside a C++ destructor and the whole process aborts: SIGABRT, "terminate called without an
    active exception". DDP and FSDP keep the process group alive past destroy_process_group(), so
    its threads are never joined. Everything is written and closed by the time this is called."""
    if "RANK" in os.environ and device_type != "cuda":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _several():
    return dist.is_initialized() and dist.get_world_size() > 1


def _collective_device():
    """NCCL takes only GPU tensors; gloo takes CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(*values):
    """Each tensor summed over every process (as it is in a world of one), on the device it came from."""
    if not _several():
        return values
    summed = []
    for value in values:
        on_wire = value.to(_collective_device())
        dist.all_reduce(on_wire)
        summed.append(on_wire.to(value.device))
    return tuple(summed)


def any_process(flag):
    """True on every process if `flag` is true on any (itself in a world of one)."""
    if not _several():
        return flag
    on_wire = torch.tensor([float(flag)], device=_collective_device())
    dist.all_reduce(on_wire, op=dist.ReduceOp.MAX)
    return bool(on_wire.item())


def from_main(value):
    """Rank 0's float on every process (the value itself in a world of one)."""
    if not _several():
        return value
    on_wire = torch.tensor([value], device=_collective_device())
    dist.broadcast(on_wire, 0)
    return float(on_wire)


@contextlib.contextmanager
def gradient_sync(model, enabled):
    """Skip the gradient all-reduce of all but the last micro-batch (DDP's no_sync, FSDP2's
    switch)."""
    if hasattr(model, "no_sync") and not enabled:  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync") and not enabled:  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:  # a single process, or the micro-batch whose backward does synchronise
        yield


class Student:
    """The student twice: `raw`, the plain model, and `trained`, what the loop calls: the same
    model, DDP's wrapper, or FSDP's sharded model. What differs between them (whole state dicts, a
    whole model to validate or sample from) is here."""

    def __init__(self, model, args, device, world_size):
        self.raw, self.sharded, self.device = model, args.fsdp, device
        if args.fsdp:
            self.trained = wrap_fsdp(model, device)
        elif world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        else:
            self.trained = model

    def state_dicts(self, optimizer):
        """(model, optimizer) state dicts of the whole student; under FSDP every process must call
        (a gather)."""
        if self.sharded:
            return gather_fsdp_state(self.trained), gather_fsdp_optim(self.trained, optimizer)
        return self.raw.state_dict(), optimizer.state_dict()

    def load_state_dicts(self, checkpoint, optimizer):
        if self.sharded:
            load_fsdp_state(self.trained, optimizer, checkpoint)
        else:
            self.raw.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])

    def for_sampling(self):
        """A plain model with the current weights on this process, to sample from (under FSDP a
        gathered copy, on every process: generation stops when its own rows end, so it cannot run in
        lock step through FSDP)."""
        if not self.sharded:
            return self.raw
        state = gather_fsdp_state(self.trained, on_every_process=True)
        return clone_from_state(self.raw, state, self.device)

    def whole(self, is_main):
        """A plain model to validate and save on rank 0 (under FSDP a gathered copy; every process
        must call)."""
        if not self.sharded:
            return self.raw
        state = gather_fsdp_state(self.trained)
        return clone_from_state(self.raw, state, self.device) if is_main else None


def wrap_fsdp(model, device):
    """FSDP2: each block, then the whole model, shards its parameters over the processes (CPU works
    too, on gloo)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full_state_options(cpu_offload=True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def gather_fsdp_state(fsdp_model, on_every_process=False):
    """The unsharded model state dict: on rank 0 only, gathered shard by shard and kept on CPU (to
    save or validate; the other processes get an empty dict), or with on_every_process on every
    process, on its device (to sample from)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(fsdp_model, options=_full_state_options(cpu_offload=not on_every_process))


def gather_fsdp_optim(fsdp_model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(fsdp_model, optimizer, options=_full_state_options())


def load_fsdp_state(fsdp_model, optimizer, checkpoint):
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    set_model_state_dict(fsdp_model, checkpoint["model"], options=_full_state_options())
    set_optimizer_state_dict(fsdp_model, optimizer, checkpoint["optimizer"], options=_full_state_options())


def clone_from_state(model, state, device):
    """A plain (unsharded) copy of the student under FSDP: to validate and save (rank 0), or to
    sample on-policy responses from (every process)."""
    copy = GPT(model.cfg)
    if model.lora_settings:  # a LoRA student: the same updates, to load A and B into
        lora.add(copy, *model.lora_settings)
    copy = copy.to(next(iter(state.values())).device)
    copy.load_state_dict(state)
    return copy.to(device)
