"""Teacher SFT and knowledge distillation, in one process or under torchrun (DDP, optional FSDP).
Distillation is off-policy, on fixed responses, as in the paper; --student-gen-ratio mixes in
on-policy steps (beyond the paper).

    python train.py --preset toy --loss fkl --tau 3          # offline: toy teacher, KD, evaluation
    torchrun --nproc_per_node 8 train.py --loss fkl --tau 3  # the paper's GPT-2 setting (default)
    torchrun --nproc_per_node 8 train.py --preset opt --loss rkl --tau 2.5
    python train.py --mode sft --student gpt2-xl --lr 5e-5 --epochs 10 --out runs/gpt2/teacher

One optimizer step, top to bottom, is `train_step` below: teacher forward (frozen, no grad),
student forward, loss = (1 - kd_ratio) * CE + kd_ratio * KD (losses.py: distill_loss), backward
over micro-batches, clip, AdamW, cosine lr.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

# Deterministic CPU runs: MKL otherwise picks its number of threads from the machine's momentary
# load, so sums run in another order and a run's last digits change with what else the machine does.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
import torch
import torch.distributed as dist
from tqdm import tqdm

import checks
import data
import evaluate
import plots
import responses
from losses import HPARAMS, LOSSES, ce_loss, check_objective, distill_loss_chunked
from model import GPT, GPTConfig

# From-scratch model sizes for the toy benchmark (byte vocabulary, SCRATCH_POSITIONS);
# "scratch:<layers>x<width>" builds any other size with 48-dim heads.
SIZES = {"toy-teacher": dict(n_layer=4, n_head=2, n_embd=128),
         "toy-student": dict(n_layer=2, n_head=2, n_embd=96),
         "toy-tiny": dict(n_layer=1, n_head=2, n_embd=32)}
SCRATCH_POSITIONS = 512

# The paper's setting (GPT-2 XL -> GPT-2 on Dolly, METHOD.md section 4) is the default of every flag
# below. A preset overrides some of them, and a flag given on the command line overrides both.
# `--help` prints this table.
PRESETS = {
    "gpt2": dict(),
    "opt": dict(teacher="runs/opt/teacher/best", student="facebook/opt-1.3b", lr=5e-5),
    # Offline, sized for 2 CPU cores: a 3-seed grid of every objective in about 2 hours (README,
    # "The toy benchmark"). The teacher and the student's warm start are made first, once, by
    # TOY_STAGES.
    "toy": dict(teacher="runs/toy/teacher/best", student="runs/toy/student-init/best", data="toy",
                lr=1e-3, epochs=1, batch_size=8, train_examples=1_200, valid_examples=100,
                eval_benchmarks="toy,toy-hard", eval_seeds="10,20,30"),
}
# The toy preset's two stages, each an ordinary train.py command, run once before the first toy run
# that needs it (run one by hand to make it yourself): the teacher fine-tuned from scratch to its
# validation plateau, and a short SFT warm start for the student (METHOD.md section 5: RKL from
# random weights is an optimisation failure, not the paper's regime of pretrained students).
TOY_STAGES = {
    "runs/toy/teacher": ["--mode", "sft", "--student", "toy-teacher", "--lr", "2e-3",
                         "--epochs", "3", "--batch-size", "16", "--train-examples", "14400"],
    "runs/toy/student-init": ["--mode", "sft", "--student", "toy-student", "--lr", "3e-3",
                              "--epochs", "1", "--batch-size", "32", "--train-examples", "9600"],
}


def parse_args(argv=None):
    p = build_parser()
    preset = p.parse_known_args(argv)[0].preset
    # the preset's table replaces the defaults; flags given still win
    p.set_defaults(**PRESETS[preset])
    return resolve_args(p.parse_args(argv))


def build_parser():
    presets = "\n".join(f"  {name}: " + (", ".join(f"{k}={v}" for k, v in table.items())
                                         or "the defaults (the paper's GPT-2 setting)")
                        for name, table in PRESETS.items())
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="presets (override the defaults above; flags override "
                                       "presets):\n" + presets)
    p.add_argument("--preset", choices=list(PRESETS), default="gpt2",
                   help="a table of defaults, listed below")
    p.add_argument("--mode", choices=["kd", "sft"], default="kd", help="kd: distil the teacher "
                   "into the student; sft: fine-tune --student on the data with cross-entropy only "
                   "(how a teacher is made)")
    p.add_argument("--loss", default="fkl", help=f"KD objective: {', '.join(LOSSES)}")
    p.add_argument("--tau", type=float, default=1.0,
                   help="KD temperature, applied to teacher and student logits")
    for name in HPARAMS:
        takes = ", ".join(f"{loss} {objective.domains[name]}" for loss, objective in LOSSES.items()
                          if name in objective.domains)
        p.add_argument(f"--{name}", type=float,
                       help=f"hyper-parameter of {takes} (default: the objective's)")
    p.add_argument("--kd-ratio", type=float, default=1.0,
                   help="loss = (1 - r) CE + r KD (1: pure distillation)")
    p.add_argument("--tau-sq", action="store_true",
                   help="multiply the KD loss by tau^2 (Hinton); off in the paper")
    p.add_argument("--student-gen-ratio", type=float, default=0.0,
                   help="beyond the paper: the share of steps whose KD loss is taken on the "
                   "student's own sampled responses to the batch's prompts (on-policy, as TRL's "
                   "GKD lmbda); 0: the paper's off-policy")
    p.add_argument("--teacher", default="MiniLLM/teacher-gpt2-1.5B", help="hub id or checkpoint "
                   "directory (default: GPT-2 XL fine-tuned on Dolly, as published by MiniLLM)")
    p.add_argument("--student", default="gpt2",
                   help="hub id, checkpoint directory, or a from-scratch size: "
                   + ", ".join(SIZES))
    p.add_argument("--data", default="dolly",
                   help="benchmark (dolly, toy) or a jsonl file of prompts and responses")
    p.add_argument("--responses", choices=["teacher", "dataset"],
                   help="what the student learns from: teacher = the fine-tuned teacher's own "
                   "responses to the training prompts, sampled once and cached (the paper's "
                   "setting; default for --mode kd on a benchmark); dataset = the benchmark's "
                   "responses (the reference code's default)")
    p.add_argument("--valid-data", help="benchmark whose valid split selects the best epoch "
                   "(default: --data, or dolly when --data is a jsonl file)")
    p.add_argument("--data-dir", default=data.DATA_DIR)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32,
                   help="global batch (all processes, all micro-batches)")
    p.add_argument("--micro-batch-size", type=int,
                   help="sequences per forward pass (default: all of a process's)")
    p.add_argument("--lr", type=float, default=5e-4,
                   help="peak learning rate (GPT-2 student; OPT: 5e-5)")
    p.add_argument("--min-lr", type=float, default=1e-7, help="end of the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW's, none on biases and layer norms")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", help="run directory (default: runs/<preset>/<loss>-tau<tau>)")
    p.add_argument("--device", choices=["cuda", "cpu"],
                   help="where to train (default: cuda when a GPU is visible, else cpu; under "
                   "torchrun, cuda uses nccl and one GPU per process, cpu uses gloo)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="autocast dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--teacher-dtype", choices=["float32", "bfloat16"],
                   help="teacher weights (default as --dtype)")
    p.add_argument("--resume", action="store_true", help="continue exactly from <out>/last.pt")
    p.add_argument("--fsdp", action="store_true", help="shard the student with FSDP (multi-GPU)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (the "
                   "schedule still spans --epochs), validate and save best/ and last.pt, so "
                   "--resume continues")
    p.add_argument("--save-every", type=int, default=0, help="also write last.pt every N steps")
    p.add_argument("--train-examples", type=int, help="use the first N training examples")
    p.add_argument("--valid-examples", type=int,
                   help="score validation ROUGE-L on the first N examples")
    p.add_argument("--valid-greedy", action="store_true",
                   help="greedy validation decoding (default: sampled)")
    p.add_argument("--valid-max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-len", type=int, default=256)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-benchmarks", default="",
                   help="after training, evaluate best/ on these (comma-separated)")
    p.add_argument("--eval-seeds", default="10,20,30,40,50",
                   help="sampling seeds of that evaluation")
    return p


def resolve_args(args):
    """The settings that follow from others, then the door (check_args)."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.responses is None:  # the paper's setting wherever a teacher can answer the prompts
        on_benchmark = args.mode == "kd" and not args.data.endswith(".jsonl")
        args.responses = "teacher" if on_benchmark else "dataset"
    if args.responses == "teacher" and (args.mode == "sft" or is_scratch(args.teacher or "")):
        raise SystemExit("error: --responses teacher needs --mode kd and a teacher checkpoint (SFT "
                         "trains on the dataset's responses): pass --responses dataset")
    args.teacher_fingerprint = None  # set by train() when it reads or makes the teacher's responses
    if args.valid_data is None:
        args.valid_data = "dolly" if args.data.endswith(".jsonl") else args.data
    if args.out is None:
        name = "teacher" if args.mode == "sft" else f"{args.loss}-tau{args.tau:g}"
        name += "-dataset" if args.mode == "kd" and args.responses == "dataset" else ""
        name += f"-gen{args.student_gen_ratio:g}" if args.student_gen_ratio else ""
        args.out = os.path.join("runs", args.preset, name)
    check_args(args)
    return args


def check_args(args):
    """The door (see checks.py): every flag inside its domain, every path there, before any model
    or data loads."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        on_this_machine = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if gpus == 0:
            checks.fail("--device cuda, but no GPU is visible (CUDA_VISIBLE_DEVICES?)")
        if on_this_machine > gpus:
            checks.fail(f"torchrun starts {on_this_machine} processes here, but this machine has "
                        f"{gpus} GPU(s), one per process: use --nproc_per_node {gpus}, or "
                        "--device cpu")
    for flag in ("epochs", "batch_size", "micro_batch_size", "max_steps", "train_examples",
                 "valid_examples", "valid_max_new_tokens", "max_prompt_len", "log_every"):
        checks.at_least("--" + flag.replace("_", "-"), getattr(args, flag), 1)
    checks.at_least("--save-every", args.save_every, 0)
    micro_batch_size = args.micro_batch_size or args.batch_size // world_size
    if args.batch_size % (world_size * micro_batch_size):
        checks.fail(f"--batch-size {args.batch_size} must be a multiple of processes "
                    f"({world_size}) x --micro-batch-size ({micro_batch_size})")
    for flag in ("lr", "min_lr", "weight_decay"):
        checks.finite("--" + flag.replace("_", "-"), getattr(args, flag), low=0)
    if args.max_len <= args.max_prompt_len:
        checks.fail(f"--max-len {args.max_len} must exceed --max-prompt-len {args.max_prompt_len}")
    hparams = {k: getattr(args, k) for k in HPARAMS if getattr(args, k) is not None}
    if args.mode == "kd":
        checks.finite("--kd-ratio", args.kd_ratio, low=0, high=1)
        checks.finite("--student-gen-ratio", args.student_gen_ratio, low=0, high=1)
        try:
            check_objective(args.loss, args.tau, **hparams)
        except ValueError as e:
            checks.fail(f"--loss {args.loss} --tau {args.tau:g}: {e}")
    elif hparams:
        checks.fail(f"--{next(iter(hparams))} is a KD hyper-parameter: --mode sft takes none")
    elif args.student_gen_ratio:
        checks.fail("--student-gen-ratio is a KD setting: --mode sft trains on the data")
    # the toy stages this command makes first: their checkpoints are checked by the size made
    to_make = {f"{out}/best": stage[stage.index("--student") + 1]
               for out, stage in toy_stages_to_make(args)}
    models = [("--student", args.student)]
    models += [("--teacher", args.teacher)] if args.mode == "kd" else []
    for flag, name in models:
        if not name:
            checks.fail(f"{flag} is required")
        name = to_make.get(name, name)
        if is_scratch(name):
            if name.startswith("scratch:") and not re.fullmatch(r"scratch:[1-9]\d*x[1-9]\d*", name):
                checks.fail(f"{flag} {name}: write a from-scratch size as "
                            "scratch:<layers>x<width>, e.g. scratch:4x128")
            positions = SCRATCH_POSITIONS
        else:
            positions = checks.checkpoint(flag, name)
        if positions and args.max_len > positions:
            checks.fail(f"--max-len {args.max_len} exceeds {flag} {name}'s {positions} positions")
        if positions and args.max_prompt_len + args.valid_max_new_tokens > positions:
            checks.fail(f"--max-prompt-len + --valid-max-new-tokens exceed {flag} {name}'s "
                        f"{positions} positions")
    checks.benchmark("--data", args.data, args.data_dir, split="train")
    checks.benchmark("--valid-data", args.valid_data, args.data_dir, split="valid")
    checks.benchmarks("--eval-benchmarks", args.eval_benchmarks, args.data_dir)
    checks.seeds("--eval-seeds", args.eval_seeds)
    checks.writable("--out", args.out)
    if args.mode == "kd":
        checks.same_vocabulary(load_tokenizer_for(to_make.get(args.teacher, args.teacher)),
                               load_tokenizer_for(to_make.get(args.student, args.student)),
                               args.teacher, args.student)
    if os.path.isfile(os.path.join(args.out, "last.pt")) and not args.resume:
        raise SystemExit(f"error: {args.out} holds another run's checkpoint (last.pt): pass "
                         "--resume to continue it, or choose another --out")
    if args.resume and not os.path.isfile(os.path.join(args.out, "last.pt")):
        raise SystemExit(f"error: --resume, but {args.out}/last.pt does not exist")


# ==================================================================================================
# Models, data, distributed set-up


def setup_distributed(device_type):
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (also across nodes with
    --nnodes); plain `python train.py` is a world of one. device_type: --device."""
    global USES_GLOO
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_type)
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local)
    dist.init_process_group("gloo")
    USES_GLOO = True
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


USES_GLOO = False  # set by setup_distributed: how the process leaves (the end of this file)


def is_scratch(name):
    """A from-scratch size (toy-teacher, scratch:4x128, ...) rather than a checkpoint."""
    return name in SIZES or name.startswith("scratch:")


def load_model(name, dtype, device, vocab_size=257):
    """A checkpoint (directory or hub id), or a from-scratch size for the toy benchmark."""
    if is_scratch(name):
        if name.startswith("scratch:"):
            layers, width = (int(x) for x in name.removeprefix("scratch:").split("x"))
            size = dict(n_layer=layers, n_embd=width, n_head=max(1, width // 48))
        else:
            size = SIZES[name]
        last = vocab_size - 1  # the byte tokenizer's <|endoftext|>
        cfg = GPTConfig(vocab_size=vocab_size, n_positions=SCRATCH_POSITIONS,
                        ffn_dim=4 * size["n_embd"], bos_token_id=last, eos_token_id=last,
                        pad_token_id=last, **size)
        return GPT(cfg).to(device=device, dtype=dtype)
    return GPT.from_pretrained(name, dtype=dtype, device=device)


@functools.lru_cache  # the door compares the tokenizers, train() uses the student's: built once
def load_tokenizer_for(name):
    return data.byte_tokenizer() if is_scratch(name) else data.load_tokenizer(name)


def optimizer_for(model, lr, weight_decay):
    """AdamW with weight decay, except on biases and layer norms. (Chosen by name, not by shape:
    FSDP shows parameters as flat shards.)"""
    no_decay = lambda name: name.endswith(".bias") or ".ln_" in name or "ln_f." in name
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if not no_decay(n)], "weight_decay": weight_decay},
              {"params": [p for n, p in params if no_decay(n)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def cosine_lr(step, total_steps, lr, min_lr):
    """Cosine decay from lr to min_lr over the run, no warm-up (METHOD.md section 4)."""
    angle = math.pi * min(step, total_steps) / max(total_steps, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(angle))


def epoch_order(n_examples, epoch, seed, rank, world_size):
    """This process's example indices for one epoch: DistributedSampler's seeded shuffle, the tail
    dropped so every step is a full global batch. Rank r takes every world_size-th index, so a
    global batch holds the same examples for any number of processes."""
    sampler = torch.utils.data.DistributedSampler(range(n_examples), num_replicas=world_size,
                                                  rank=rank, shuffle=True, seed=seed,
                                                  drop_last=True)
    sampler.set_epoch(epoch)
    return list(sampler)


# ==================================================================================================
# One optimizer step


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


def loss_step(args, student, teacher, batch, autocast, kd_batch=None):
    """One micro-batch -> (ce, kd): the student's next-token cross-entropy on the batch's fixed
    responses and its KD loss against the frozen teacher, each summed over response tokens (kd is
    None in SFT). KD is taken on `kd_batch` when one is given (on-policy: the student's own
    responses to the same prompts), else on `batch`. CE keeps a gradient only when the mix uses it
    (kd_ratio < 1); in pure KD it is computed for the log."""
    input_ids, attention_mask, labels = batch
    with autocast(), torch.set_grad_enabled(kd_batch is None or args.kd_ratio < 1):
        student_logits = student(input_ids, attention_mask)                        # (b, T, V)
    if teacher is None:
        return ce_loss(student_logits, labels, reduction="sum"), None
    with torch.set_grad_enabled(args.kd_ratio < 1):
        logits = student_logits if args.kd_ratio < 1 else student_logits.detach()
        ce = ce_loss(logits, labels, reduction="sum")
    if kd_batch is not None:  # on-policy: the student reads its own response, the teacher grades it
        input_ids, attention_mask, labels = kd_batch
        with autocast():
            student_logits = student(input_ids, attention_mask)                    # (b, T', V)
    with torch.no_grad(), autocast():
        teacher_logits = teacher(input_ids, attention_mask)                        # (b, T, V)
    hparams = {k: getattr(args, k) for k in HPARAMS}  # None: the objective's default
    kd = distill_loss_chunked(args.loss, student_logits, teacher_logits, labels, tau=args.tau,
                              tau_sq=args.tau_sq, reduction="sum", **hparams)
    return ce, kd


def train_step(args, student, teacher, micro_batches, optimizer, lr, world_size, autocast):
    """Forward/backward every micro-batch of this process, then one clipped AdamW step. Returns
    log values.

    Each loss of a step is the token mean over the whole global batch: each micro-batch's *sum* is
    divided by the global number of tokens it is taken on, so the result does not depend on how
    the batch is split into micro-batches or processes. (DDP averages gradients over processes,
    hence the factor world_size.)"""
    def tokens(batches):  # response tokens (labels) in these batches
        return torch.tensor(float(sum(int((labels != -100).sum()) for _, _, labels in batches)))
    n_ce = tokens(batch for batch, _ in micro_batches)  # CE's: the fixed responses
    n_kd = tokens(kd_batch or batch for batch, kd_batch in micro_batches)  # KD's: fixed or sampled
    if world_size > 1:
        dist.all_reduce(n_ce)
        dist.all_reduce(n_kd)
    sums = {"ce": 0.0, "kd": 0.0}
    for i, (batch, kd_batch) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with gradient_sync(student, last or world_size == 1):  # one all-reduce, after the last
            ce, kd = loss_step(args, student, teacher, batch, autocast, kd_batch=kd_batch)
            if kd is None:  # SFT
                loss = ce / n_ce.clamp(min=1)
            else:  # the mix (kd_ratio = 1: pure KD)
                loss = ((1 - args.kd_ratio) * ce / n_ce.clamp(min=1)
                        + args.kd_ratio * kd / n_kd.clamp(min=1))
            (loss * world_size).backward()
        sums["ce"] += ce.item()
        sums["kd"] += kd.item() if kd is not None else 0.0
    for group in optimizer.param_groups:
        group["lr"] = lr
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a sharded norm
        grad_norm = grad_norm.full_tensor()
    if not torch.isfinite(grad_norm):  # every process sees the same norm, so all stop together
        raise SystemExit(f"error: the loss or its gradient is not finite (gradient norm "
                         f"{float(grad_norm)}); the weights were not updated with it. Lower --lr, "
                         "or check the data and the teacher")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    logged = torch.tensor([sums["ce"], sums["kd"]])
    if world_size > 1:
        dist.all_reduce(logged)
    ce_mean, kd_mean = (logged / torch.stack([n_ce, n_kd]).clamp(min=1)).tolist()
    total = ce_mean
    if args.mode == "kd":
        total = (1 - args.kd_ratio) * ce_mean + args.kd_ratio * kd_mean
    return {"ce": ce_mean, "kd": kd_mean if args.mode == "kd" else None, "loss": total, "lr": lr,
            "grad_norm": float(grad_norm), "tokens": int(n_kd)}


# ==================================================================================================
# Beyond the paper: on-policy steps (--student-gen-ratio), where the student answers the prompts


def on_policy_responses(args, student, examples, example_ids, step, tokenizer):
    """None on an off-policy step; on an on-policy one, the student's own response to each example's
    prompt -> [(prompt_ids, response_ids + [EOS])], like the fixed examples.

    Whether a step is on-policy is one seeded draw per global batch, a function of (seed, step)
    alone: every process draws the same, and the step saved in last.pt is all a resumed run needs
    to draw it again. Responses are sampled without gradient at temperature 1 (the protocol's
    decoding, no n-gram block) up to --max-len - --max-prompt-len tokens and cut at EOS. Each row
    draws from its own generator, seeded by (seed, step, example index), so a response does not
    depend on the process or micro-batch its example falls in."""
    step_key = args.seed * 1_000_003 + step  # seeds this step's draw and its rows' generators
    draw = random.Random(step_key).random()
    if args.mode != "kd" or not draw < args.student_gen_ratio:
        return None
    model = student.for_sampling()
    device = next(model.parameters()).device
    prompts = [prompt for prompt, _ in examples]
    input_ids, attention_mask = data.collate_prompts(prompts, tokenizer.pad_id)
    generators = [torch.Generator(device).manual_seed(step_key * 100_003 + i) for i in example_ids]
    eos = tokenizer.eos_id
    with torch.no_grad():
        new = model.eval().generate(input_ids.to(device), attention_mask.to(device),
                                    max_new_tokens=args.max_len - args.max_prompt_len,
                                    eos_token_id=eos, generator=generators)
    model.train()
    return [(prompt, row[:row.index(eos) + 1] if eos in row else row)
            for prompt, row in zip(prompts, new.tolist())]


# ==================================================================================================
# The run


def load_run(args, rank, world_size, device, teacher_dtype):
    """What a run trains on: (tokenizer, student, teacher, train_set, valid), valid being the
    validation records and their encoded sequences. The student is initialised from --seed on
    every process; the teacher is frozen; the training responses are fixed: by default the
    fine-tuned teacher's own answers to the training prompts, as in the paper, made by the first
    run and cached for all (responses.py)."""
    tokenizer = load_tokenizer_for(args.student)  # the same as the teacher's (checked at the door)
    records = data.load_split(args.data, "train", args.data_dir)
    if len(records[: args.train_examples]) < args.batch_size:
        raise SystemExit(f"error: {len(records[: args.train_examples])} training examples do not "
                         f"fill one batch of {args.batch_size}")
    valid = data.load_split(args.valid_data, "valid", args.data_dir)[: args.valid_examples]
    valid_set = data.encode_dataset(tokenizer, valid, args.max_prompt_len, args.max_len,
                                    where="valid")

    torch.manual_seed(args.seed)  # same initialisation on every process
    student = load_model(args.student, torch.float32, device, tokenizer.vocab_size)
    teacher = None
    if args.mode == "kd":
        teacher = load_model(args.teacher, teacher_dtype, device, tokenizer.vocab_size)
        teacher = teacher.eval().requires_grad_(False)
        if teacher.cfg.vocab_size != student.cfg.vocab_size:
            raise SystemExit(f"error: teacher vocabulary ({teacher.cfg.vocab_size}) != student "
                             f"vocabulary ({student.cfg.vocab_size}): incompatible models")
    if args.responses == "teacher":
        args.teacher_fingerprint = responses.fingerprint(args.teacher)
        where = responses.cache_dir(args.data_dir, args.data, args.teacher_fingerprint)
        provenance = {"teacher": args.teacher, "teacher_fingerprint": args.teacher_fingerprint,
                      "benchmark": args.data,
                      "teacher_dtype": str(teacher_dtype).removeprefix("torch.")}
        records = responses.teacher_responses(teacher, tokenizer, records, args.train_examples,
                                              where, provenance, args.max_prompt_len, rank,
                                              world_size)
    train_set = data.encode_dataset(tokenizer, records[: args.train_examples], args.max_prompt_len,
                                    args.max_len, where="train")
    if len(train_set) < args.batch_size:
        raise SystemExit(f"error: {len(train_set)} training examples do not fill one batch of "
                         f"{args.batch_size}")
    return tokenizer, student, teacher, train_set, (valid, valid_set)


def on_policy_stats(sampled, state, world_size):
    """What the log says of on-policy training: was this step on-policy, the share of such steps so
    far (counted in `state`, so in last.pt), and the mean length in tokens of the sampled responses
    (EOS included)."""
    state["on_policy_steps"] = state.get("on_policy_steps", 0) + (sampled is not None)
    lengths = torch.tensor([float(sum(len(r) for _, r in sampled or [])),
                            float(len(sampled or []))])
    if world_size > 1:
        dist.all_reduce(lengths)
    return {"on_policy": sampled is not None,
            "on_policy_share": state["on_policy_steps"] / (state["step"] + 1),
            "sampled_len": float(lengths[0] / lengths[1]) if lengths[1] else None}


def micro_batches_of(examples, sampled, micro_batch_size, pad_id, device):
    """This process's examples of one step -> [(batch, kd_batch)], one per micro-batch, each batch
    (input_ids, attention_mask, labels). kd_batch is None off-policy (KD is taken on the batch), and
    on an on-policy step the `sampled` responses to the same prompts, collated the same way."""
    def collate(chunk):
        return tuple(t.to(device) for t in data.collate_train(chunk, pad_id))
    micro_batches = []
    for j in range(0, len(examples), micro_batch_size):
        batch = collate(examples[j:j + micro_batch_size])
        kd_batch = None if sampled is None else collate(sampled[j:j + micro_batch_size])
        micro_batches.append((batch, kd_batch))
    return micro_batches


def train(args):
    rank, world_size, device = setup_distributed(args.device)
    is_main = rank == 0
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or responses.default_dtype(device.type))
    teacher_dtype = getattr(torch, args.teacher_dtype) if args.teacher_dtype else dtype
    per_process = args.batch_size // world_size
    micro_batch_size = args.micro_batch_size or per_process
    tokenizer, student, teacher, train_set, valid = load_run(args, rank, world_size, device,
                                                              teacher_dtype)
    steps_per_epoch = len(train_set) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    student = Student(student.train(), args, device, world_size)  # .trained: what the loop calls
    optimizer = optimizer_for(student.trained, args.lr, args.weight_decay)
    autocast = contextlib.nullcontext
    if on_gpu and dtype != torch.float32:
        autocast = functools.partial(torch.autocast, "cuda", dtype=dtype)

    state = {"step": 0, "epoch": 0, "best_rouge": -1.0}
    out = Path(args.out)
    if is_main:
        clean_stale_files(out)
    if args.resume:
        state = load_checkpoint(out / "last.pt", args, student, optimizer)
    elif is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=1))
    stop_at = min(total_steps, args.max_steps or total_steps)
    progress = Progress(args, out, state, stop_at, is_main)  # the bar and log.jsonl
    stop = StopOnSignal(world_size, device)  # SIGTERM / Ctrl-C: finish the step, save, exit
    try:
        while state["step"] < stop_at:
            epoch = state["epoch"]
            order = epoch_order(len(train_set), epoch, args.seed, rank, world_size)
            for step_in_epoch in range(state["step"] - epoch * steps_per_epoch, steps_per_epoch):
                first = step_in_epoch * per_process
                indices = order[first:first + per_process]  # this process's share of the batch
                examples = [train_set[i] for i in indices]
                sampled = on_policy_responses(args, student, examples, indices, state["step"],
                                              tokenizer)  # None: off-policy, the paper's setting
                micro_batches = micro_batches_of(examples, sampled, micro_batch_size,
                                                 tokenizer.pad_id, device)
                lr = cosine_lr(state["step"], total_steps, args.lr, args.min_lr)
                stats = train_step(args, student.trained, teacher, micro_batches, optimizer, lr,
                                   world_size, autocast)
                if args.student_gen_ratio:
                    stats.update(on_policy_stats(sampled, state, world_size))
                state["step"] += 1
                progress.step(state, epoch, stats, micro_batches, world_size, device)
                if state["step"] >= stop_at or stop.check():
                    break
                if args.save_every and state["step"] % args.save_every == 0:
                    save_checkpoint(out / "last.pt", args, state, student, optimizer, is_main)
            if stop.requested:  # an epoch that just ended is validated by the resumed run
                save_checkpoint(out / "last.pt", args, state, student, optimizer, is_main)
                break
            if state["step"] % steps_per_epoch == 0:  # an epoch ended
                state["epoch"] = epoch + 1
            if state["step"] % steps_per_epoch == 0 or state["step"] == stop_at:  # or --max-steps
                validate_and_keep_best(args, student, tokenizer, valid, state, progress)
            save_checkpoint(out / "last.pt", args, state, student, optimizer, is_main)
    finally:
        stop.restore()
    progress.close()
    if is_main:
        plots.loss_curves(out)
    if stop.requested:
        stop.exit(out, is_main)
    if is_main:
        if state["step"] >= total_steps and (out / "best" / "config.json").is_file():
            finished = {"step": state["step"], "best_rouge": state["best_rouge"]}
            (out / "finished.json").write_text(json.dumps(finished))  # what sweep.sh skips
        if args.eval_benchmarks and (out / "best").is_dir():
            run_final_evaluation(args, out, device)
    if dist.is_initialized():  # torchrun, a world of one included
        dist.barrier()
        dist.destroy_process_group()
    return out


def validate_and_keep_best(args, student, tokenizer, valid, state, progress):
    """Validation ROUGE-L (sampled answers to the valid records) and CE (on their encoded
    sequences), on rank 0; best/ keeps the epoch with the best ROUGE-L (HF layout)."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    model = student.whole(is_main)
    if is_main:
        records, encoded = valid
        rouge = evaluate.validation_score(model, tokenizer, records, seed=args.seed,
                                          greedy=args.valid_greedy,
                                          max_new_tokens=args.valid_max_new_tokens)
        val_loss = validation_ce(model, encoded, tokenizer.pad_id)
        improved = rouge > state["best_rouge"]
        if improved:
            if not all(bool(p.isfinite().all()) for p in model.parameters()):
                raise SystemExit(f"error: step {state['step']}: the model's weights are not "
                                 "finite; best/ keeps the last finite one (lower --lr?)")
            state["best_rouge"] = rouge
            save = lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp))
            data.atomic_dir(os.path.join(args.out, "best"), save)
        progress.write({"epoch": state["epoch"], "step": state["step"], "val_rouge": rouge,
                        "val_loss": val_loss, "best": improved})
        tqdm.write(f"epoch {state['epoch']}: validation ROUGE-L {rouge:.2f}, CE {val_loss:.4f}"
                   + (" (best so far, saved best/)" if improved else ""))
    if world_size > 1:  # every process agrees on the best score (it is part of last.pt)
        best = torch.tensor([state["best_rouge"]])
        dist.broadcast(best, 0)
        state["best_rouge"] = float(best)


def validation_ce(model, encoded, pad_id, batch_size=16):
    """The token mean of next-token cross-entropy on encoded (prompt, response) pairs."""
    device = next(model.parameters()).device
    total, n_tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            x, m, y = data.collate_train(encoded[i:i + batch_size], pad_id)
            logits = model(x.to(device), m.to(device))
            total += float(ce_loss(logits, y.to(device), reduction="sum"))
            n_tokens += int((y != -100).sum())
    return total / max(n_tokens, 1)


# ==================================================================================================
# Preemption, and what a killed run leaves behind


class StopOnSignal:
    """SIGTERM (how clusters preempt a job) or SIGINT (Ctrl-C): finish the current optimizer step,
    write last.pt, say how to resume, exit non-zero. A second signal stops at once. Under torchrun
    the processes agree each step (any one signalled stops them all), so they write the same
    last.pt."""

    def __init__(self, world_size, device):
        self.world_size, self.device, self.signum, self.requested = world_size, device, None, False
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this step, then writing last.pt")

    def check(self):
        flag = torch.tensor([float(self.signum is not None)], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.requested = bool(flag.item())
        return self.requested

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def exit(self, out, is_main):
        """Leave with 128 + the signal's number (143 for SIGTERM, 130 for Ctrl-C), as a killed
        process would."""
        if is_main:
            command = RESUME_COMMAND or f"the same command with --resume (run directory {out})"
            name = signal.Signals(self.signum or signal.SIGTERM).name
            print(f"{name}: stopped; {out}/last.pt holds every finished step. Resume with:\n"
                  f"  {command}", file=sys.stderr, flush=True)
        raise SystemExit(128 + (self.signum or signal.SIGTERM))


RESUME_COMMAND = None  # set by main(): the command line that continues this run


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


class Progress:
    """What a run shows and logs: the tqdm bar, and on rank 0 log.jsonl."""

    def __init__(self, args, out, state, stop_at, is_main):
        self.args, self.stop_at, self.is_main = args, stop_at, is_main
        self.bar = tqdm(total=stop_at, initial=state["step"], disable=not is_main,
                        desc=f"{args.mode} {out.name}")
        resumed_at = state["step"] if args.resume else None
        self.log = open_log(out / "log.jsonl", resumed_at) if is_main else None
        self.started = time.time()

    def step(self, state, epoch, stats, micro_batches, world_size, device):
        """After an optimizer step: its tokens/s (real tokens, all processes) and, on GPU, the peak
        memory so far join `stats`; the bar moves; every --log-every steps, a log line."""
        elapsed, self.started = time.time() - self.started, time.time()
        tokens = sum(int(b[1].sum()) for pair in micro_batches for b in pair if b)
        stats["tokens_per_s"] = tokens * world_size / max(elapsed, 1e-9)
        if device.type == "cuda":  # this process's high-water mark of allocated GPU memory
            stats["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        self.bar.update(1)
        postfix = dict(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}",
                       tok_s=f"{stats['tokens_per_s']:.0f}")
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


# ==================================================================================================
# Checkpoints: last.pt for resuming, written atomically


def save_checkpoint(path, args, state, student, optimizer, is_main):
    model_state, optim_state = student.state_dicts(optimizer)
    if not is_main:
        return
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    checkpoint = {"model": model_state, "optimizer": optim_state, "state": dict(state),
                  "args": vars(args), "rng": {"torch": torch.get_rng_state(),
                                              "python": random.getstate(), "cuda": cuda_rng}}
    data.atomic_write(str(path), lambda tmp: torch.save(checkpoint, tmp))


RESUME_MUST_MATCH = ("mode", "loss", "tau", "kd_ratio", "tau_sq", *HPARAMS, "student_gen_ratio",
                     "teacher", "student", "data", "responses", "teacher_fingerprint", "epochs",
                     "batch_size", "lr", "min_lr", "weight_decay", "seed", "train_examples")


def load_checkpoint(path, args, student, optimizer):
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not a checkpoint at all
        raise SystemExit(f"error: {path} is not a readable checkpoint (truncated or corrupt?): "
                         "delete it and start again, or restore it "
                         f"({' '.join(str(e).split())[:200]})")
    # a last.pt from before the flag: off-policy
    saved = {"student_gen_ratio": 0.0, **checkpoint["args"]}
    changed = [k for k in RESUME_MUST_MATCH if saved.get(k) != getattr(args, k)]
    if changed:
        raise SystemExit(f"error: --resume with different settings than {path} was written with: "
                         + ", ".join(f"{k}={saved.get(k)!r} -> {getattr(args, k)!r}"
                                     for k in changed))
    try:
        student.load_state_dicts(checkpoint, optimizer)
    # e.g. a last.pt from before model.Linear stored its weights (in, out)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise SystemExit(f"error: {path} does not fit this model (another student, or an older "
                         f"tempkd): {detail}")
    torch.set_rng_state(checkpoint["rng"]["torch"])
    random.setstate(checkpoint["rng"]["python"])
    if torch.cuda.is_available() and checkpoint["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return checkpoint["state"]


# ==================================================================================================
# The student under DDP or FSDP (FSDP shards its parameters, gradients and optimizer state; README,
# "Memory")


class Student:
    """The student twice: `raw`, the plain model, and `trained`, what the loop calls: the same
    model, DDP's wrapper, or FSDP's sharded model. What differs between them (whole state dicts, a
    whole model to validate) is here."""

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
    options = _full_state_options(cpu_offload=not on_every_process)
    return get_model_state_dict(fsdp_model, options=options)


def gather_fsdp_optim(fsdp_model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(fsdp_model, optimizer, options=_full_state_options())


def load_fsdp_state(fsdp_model, optimizer, checkpoint):
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)
    set_model_state_dict(fsdp_model, checkpoint["model"], options=_full_state_options())
    set_optimizer_state_dict(fsdp_model, optimizer, checkpoint["optimizer"],
                             options=_full_state_options())


def clone_from_state(model, state, device):
    """A plain (unsharded) copy of the student under FSDP: to validate and save (rank 0), or to
    sample on-policy responses from (every process)."""
    copy = GPT(model.cfg).to(next(iter(state.values())).device)
    copy.load_state_dict(state)
    return copy.to(device)


# ==================================================================================================
# After training


def run_final_evaluation(args, out, device):
    model = GPT.from_pretrained(str(out / "best"), device=device)
    tokenizer = data.load_tokenizer(str(out / "best"))
    results = evaluate.evaluate(model, tokenizer, args.eval_benchmarks.split(","),
                                [int(s) for s in args.eval_seeds.split(",")],
                                out_dir=str(out / "best" / "eval"),
                                data_dir=args.data_dir)
    print(f"\n{out}: ROUGE-L of best/ (sampled, decode temperature 1)\n"
          + evaluate.results_table(results))


def toy_stages_to_make(args):
    """[(run directory, argv)] of the toy stages this command needs and that are not made yet (made
    = finished.json; an interrupted stage already holds a best/ of an earlier epoch, and is
    resumed)."""
    if args.preset != "toy" or args.mode != "kd":
        return []
    needed = {os.path.dirname(name) for name in (args.teacher, args.student)}
    return [(out, stage) for out, stage in TOY_STAGES.items()
            if out in needed and not os.path.isfile(os.path.join(out, "finished.json"))]


def make_toy_stages(args, argv):
    """Explicit steps before the toy run: the teacher, then the student's warm start, each an
    ordinary train.py command. An interrupted stage resumes when the same command is run again."""
    global RESUME_COMMAND
    RESUME_COMMAND = shlex.join(["python", "train.py", *argv])
    for out, stage in toy_stages_to_make(args):
        stage_argv = ["--preset", "toy", *stage, "--out", out, "--data-dir", args.data_dir,
                      "--eval-benchmarks", ""]
        stage_argv += ["--resume"] if os.path.isfile(os.path.join(out, "last.pt")) else []
        print(f"{out}/best does not exist yet: making it first (python train.py "
              f"{shlex.join(stage_argv)})")
        train(parse_args(stage_argv))


def main(argv=None):
    global RESUME_COMMAND
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        make_toy_stages(args, argv)
        RESUME_COMMAND = shlex.join(["python", "train.py", *argv,
                                     *([] if args.resume else ["--resume"])])
    elif toy_stages_to_make(args):
        raise SystemExit("error: run `python train.py --preset toy` once in a single process to "
                         "make the toy teacher and student before using torchrun")
    else:
        RESUME_COMMAND = "the same torchrun command with --resume"
    train(args)


if __name__ == "__main__":
    checks.run_cli(main)
    if USES_GLOO:
        # A torchrun worker on gloo (CPU) leaves without interpreter teardown. A collective issued
        # during backward holds a Python object (autograd's contextvars snapshot) and is freed by
        # one of gloo's C++ threads, which needs the GIL for that. If the thread gets there only
        # after the interpreter began finalizing (a loaded machine), CPython < 3.14 ends the thread
        # inside a C++ destructor and the whole process aborts: SIGABRT, "terminate called without
        # an active exception". DDP and FSDP keep the process group alive past
        # destroy_process_group(), so its threads are never joined. Everything is written and closed
        # by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
