"""Knowledge distillation with a temperature (and the teacher's SFT), in one process or under torchrun.

    python train.py --preset toy --loss fkl --tau 3          # offline: toy teacher, KD, evaluation
    torchrun --nproc_per_node 8 train.py --loss fkl --tau 3  # the paper's GPT-2 setting (default)
    torchrun --nproc_per_node 8 train.py --preset opt --loss rkl --tau 2.5
    python train.py --mode sft --student gpt2-xl --lr 5e-5 --epochs 10 --out runs/gpt2/teacher

Read it top to bottom: one optimizer step (`loss_step`, `train_step`), the loop over steps
(`train`), what a run is made of (`load_run`), and `main`. The KD loss itself, with tau, is in
losses.py. The plumbing lives in files named for it: config.py (presets, flags, the door),
distributed.py (DDP/FSDP), checkpoint.py (last.pt, signals, the log), toy.py (the toy benchmark),
on_policy.py (beyond the paper: on-policy steps).
"""
import contextlib
import functools
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

# Deterministic CPU runs: MKL otherwise picks its number of threads from the machine's momentary
# load, so sums run in another order and a run's last digits change with what else the machine does.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
import torch
from tqdm import tqdm

import checkpoint
import checks
import config
import data
import distributed
import evaluate
import files
import lora
import on_policy
import plots
import responses
import toy
from fused_loss import fused_distill_loss
from losses import HPARAMS, logits_distill_loss
from model import GPT


# --- One optimizer step ---------------------------------------------------------------------------

def loss_step(args, student, teacher, batch, kd_batch, autocast, n_ids, ce_weight, kd_weight):
    """One micro-batch -> (loss, ce, kd): loss = ce_weight * ce + kd_weight * kd, what backward()
    takes; ce, the student's cross-entropy on the batch's fixed responses, and kd, its KD loss against
    the frozen teacher (0 in SFT), each summed over its response tokens. A batch is (input_ids,
    attention_mask, labels), labels -100 outside the response. KD is taken on `kd_batch`: the batch
    itself (the paper's step), or the student's own responses to its prompts (on_policy.py), over
    the tokenizer's n_ids ids (an embedding's rows beyond are padding: METHOD.md section 4).

    Both models stop before their heads: fused_loss.fused_distill_loss makes the logits piece by piece,
    so no (B, T, V) tensor exists (--no-fused-loss: all logits, then distill_loss_chunked). Both
    compute losses.distill_loss - read that one: tau, the objective, the sum."""
    hparams = {k: getattr(args, k) for k in HPARAMS}  # None: the objective's default
    mask = lambda batch: None if args.compile else batch[1]  # compiled: right padding needs only the causal flag

    def student_loss(batch, teacher_hidden, teacher_head, ce_weight, kd_weight):  # one student forward -> (loss, kd, ce)
        input_ids, _, labels = batch
        loss_from_hidden = fused_distill_loss if args.fused_loss else logits_distill_loss
        head = lambda hidden, head: loss_from_hidden(args.loss, hidden, head, teacher_hidden, teacher_head, labels,
                                                     tau=args.tau, n_ids=n_ids, kd_weight=kd_weight, ce_weight=ce_weight,
                                                     tau_sq=args.tau_sq, compiled=args.compile_loss, **hparams)
        with autocast(), torch.set_grad_enabled(bool(ce_weight or kd_weight)):
            return student(input_ids, mask(batch), head=head)  # the loss is computed in place of the head

    if teacher is None:  # SFT
        loss, _, ce = student_loss(batch, None, None, ce_weight, 0.0)
        return loss, ce, torch.zeros(())
    with torch.no_grad(), autocast():
        teacher_hidden, teacher_head = teacher(kd_batch[0], mask(kd_batch), head=lambda hidden, head: (hidden, head))
    if kd_batch is batch:  # the paper's step: CE and KD on the same sequences, one student forward
        loss, kd, ce = student_loss(batch, teacher_hidden, teacher_head, ce_weight, kd_weight)
        return loss, ce, kd
    loss_ce, _, ce = student_loss(batch, None, None, ce_weight, 0.0)  # on-policy: CE on the fixed responses,
    loss_kd, kd, _ = student_loss(kd_batch, teacher_hidden, teacher_head, 0.0, kd_weight)  # KD on its own
    return loss_ce + loss_kd, ce, kd


def train_step(args, student, teacher, micro_batches, optimizer, lr, world_size, autocast, n_ids):
    """Forward and backward every micro-batch of this process, then one clipped AdamW step.

    Each loss of a step is the token mean over the whole global batch: each micro-batch's *sum* is
    divided by the global number of tokens it is taken on, so the step does not depend on how the
    batch is split into micro-batches or processes. (DDP averages gradients over processes, hence
    the factor world_size.)"""
    tokens = lambda batches: torch.tensor(float(sum(int((labels != -100).sum()) for _, _, labels in batches)))
    n_ce, n_kd = distributed.all_sum(tokens(b for b, _ in micro_batches), tokens(kd for _, kd in micro_batches))
    sums = [0.0, 0.0]  # CE and KD, summed over this process's tokens, for the log
    for i, (batch, kd_batch) in enumerate(micro_batches):  # one all-reduce, after the last:
        with distributed.gradient_sync(student, i == len(micro_batches) - 1 or world_size == 1):
            # the mix, each loss a token mean over the global batch (kd_ratio = 1: pure distillation; SFT: CE)
            kd_ratio = 0.0 if teacher is None else args.kd_ratio
            ce_weight, kd_weight = (1 - kd_ratio) / float(n_ce.clamp(min=1)), kd_ratio / float(n_kd.clamp(min=1))
            loss, ce, kd = loss_step(args, student, teacher, batch, kd_batch, autocast, n_ids, ce_weight, kd_weight)
            (loss * world_size).backward()
        sums = [sums[0] + ce.item(), sums[1] + kd.item()]
    for group in optimizer.param_groups:
        group["lr"] = lr
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a sharded norm
        grad_norm = grad_norm.full_tensor()
    if not torch.isfinite(grad_norm):  # every process sees the same norm, so all stop together
        raise SystemExit(f"error: the loss or its gradient is not finite (gradient norm {float(grad_norm)}); the "
                         "weights were not updated with it. Lower --lr, or check the data and the teacher")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ce_mean, kd_mean = (distributed.all_sum(torch.tensor(sums))[0] / torch.stack([n_ce, n_kd]).clamp(min=1)).tolist()
    total = ce_mean if args.mode == "sft" else (1 - args.kd_ratio) * ce_mean + args.kd_ratio * kd_mean
    return {"ce": ce_mean, "kd": kd_mean if args.mode == "kd" else None, "loss": total, "lr": lr,
            "grad_norm": float(grad_norm), "tokens": int(n_kd)}


# --- The loop -------------------------------------------------------------------------------------

def train(args, commands=("the same command", "the same command with --resume")):
    """One run: set-up, then optimizer steps in epochs (validation and best/ at each epoch's end,
    last.pt after it), then loss.png, finished.json and the evaluation of best/. A signal in any of
    these stages finishes its unit of work, saves and stops (checkpoint.StopOnSignal); `commands`:
    what continues the run before its first step, and after it."""
    out = Path(args.out)
    with contextlib.ExitStack() as held:
        stop = held.enter_context(checkpoint.StopOnSignal(command=commands[0]))
        run = load_run(args, stop)  # a signal while the teacher answers keeps the chunks made so far
        held.enter_context(checkpoint.claim(out, args, run.is_main))  # --out is this run's: a second is refused
        stop.command = commands[1]
        state, per_process = run.state, args.batch_size // run.world_size
        steps_per_epoch = len(run.train_set) // args.batch_size
        total_steps = steps_per_epoch * args.epochs
        stop_at = min(total_steps, args.max_steps or total_steps)
        progress = checkpoint.Progress(args, out, state, stop_at, run.is_main)  # the bar and log.jsonl
        save = lambda: checkpoint.save(out / "last.pt", args, state, run.student, run.optimizer, run.is_main, stop)
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # counted over the process
        while state["step"] < stop_at:
            epoch = state["epoch"]
            order = epoch_order(len(run.train_set), epoch, args.seed, run.rank, run.world_size)
            for step_in_epoch in range(state["step"] - epoch * steps_per_epoch, steps_per_epoch):
                indices = order[step_in_epoch * per_process:(step_in_epoch + 1) * per_process]  # this process's share
                examples = [run.train_set[i] for i in indices]
                # beyond the paper: on some steps KD is taken on the student's own responses
                kd_examples = on_policy.kd_examples(args, run.student, examples, indices, state["step"], run.tokenizer)
                micro_batches = data.micro_batches(examples, kd_examples, args.micro_batch_size or per_process,
                                                   run.tokenizer.pad_id, run.device, run.bucket)
                lr = cosine_lr(state["step"], total_steps, args.lr, args.min_lr)
                stats = train_step(args, run.student.trained, run.teacher, micro_batches, run.optimizer, lr,
                                   run.world_size, run.autocast, run.tokenizer.n_ids)
                if args.student_gen_ratio:
                    stats.update(on_policy.stats(examples, kd_examples, state))
                state["step"] += 1
                progress.step(state, epoch, stats, micro_batches, run.world_size, run.device)
                if state["step"] >= stop_at or stop.check():
                    break
                if args.save_every and state["step"] % args.save_every == 0:
                    save()
            if stop.requested:  # an epoch that just ended is validated by the resumed run
                save()
                break
            if state["step"] % steps_per_epoch == 0:  # an epoch ended
                state["epoch"] = epoch + 1
            if state["step"] % steps_per_epoch == 0 or state["step"] == stop_at:  # or --max-steps
                validate_and_keep_best(args, run, state, progress)
            save()
            if stop.check():  # a signal during the validation
                break
        progress.close()
        if run.is_main and (graphs := torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before):
            tqdm.write(f"torch.compile: {graphs} graphs compiled")
        finish(args, run, state, stop, total_steps)
    return out


def validate_and_keep_best(args, run, state, progress):
    """Validation ROUGE-L (sampled answers to the valid records) and CE (on their encoded
    sequences), on rank 0; best/ keeps the epoch with the best ROUGE-L (Hugging Face layout)."""
    model = run.student.whole(run.is_main)  # under FSDP a gathered copy: every process calls
    if run.is_main:
        records, encoded = run.valid
        rouge = evaluate.validation_score(model, run.tokenizer, records, seed=args.seed, greedy=args.valid_greedy,
                                          max_new_tokens=args.valid_max_new_tokens)
        val_loss = evaluate.validation_ce(model, encoded, run.tokenizer.pad_id)
        improved = rouge > state["best_rouge"]
        if not math.isfinite(val_loss) or not all(bool(p.isfinite().all()) for p in model.parameters()):
            raise SystemExit(f"error: step {state['step']}: the model's weights or outputs are not finite (validation "
                             f"CE {val_loss}); best/ keeps the last finite one, if any (lower --lr?)")
        if improved:
            state["best_rouge"] = rouge
            files.atomic_dir(os.path.join(args.out, "best"),
                       lambda tmp: (model.save_pretrained(tmp), run.tokenizer.save_pretrained(tmp)))
        progress.write({"epoch": state["epoch"], "step": state["step"], "val_rouge": rouge, "val_loss": val_loss,
                        "best": improved})
        tqdm.write(f"epoch {state['epoch']}: validation ROUGE-L {rouge:.2f}, CE {val_loss:.4f}"
                   + (" (best so far, saved best/)" if improved else ""))
    state["best_rouge"] = distributed.from_main(state["best_rouge"])  # every process agrees (it is in last.pt)


def finish(args, run, state, stop, total_steps):
    """After the loop: loss.png; on a signal, how to resume and exit 130/143; else finished.json (what
    sweep.sh skips) and the evaluation of best/. A run resumed after its last step comes straight
    here: it writes finished.json and evaluates, or continues the evaluation a signal stopped."""
    out = Path(args.out)
    if run.is_main:
        plots.loss_curves(out)
    if stop.check():
        stop.exit(f"{out}/last.pt holds every finished step", run.is_main)
    if run.is_main:
        if state["step"] >= total_steps and (out / "best" / "config.json").is_file():
            (out / "finished.json").write_text(json.dumps({"step": state["step"], "best_rouge": state["best_rouge"]}))
        if args.eval_benchmarks and (out / "best").is_dir():
            evaluate.evaluate_checkpoint(out / "best", args.eval_benchmarks.split(","),
                                         [int(s) for s in args.eval_seeds.split(",")], args.data_dir, run.device, stop)
    distributed.finish()


# --- What a run is made of ------------------------------------------------------------------------

@dataclass
class Run:
    """Everything one run trains with (made by load_run)."""
    rank: int
    world_size: int
    is_main: bool
    device: torch.device
    autocast: object           # a context manager factory: bf16 autocast on GPU, or nothing
    tokenizer: data.Tokenizer
    student: distributed.Student
    teacher: GPT               # None in SFT
    optimizer: torch.optim.Optimizer
    train_set: list            # [(prompt_ids, response_ids)]
    valid: tuple               # (validation records, their encoded sequences)
    state: dict                # step, epoch, best_rouge: what last.pt resumes
    bucket: int                # training lengths are padded to a multiple of it (compiled: a few shapes)


def load_run(args, stop=None):
    """Everything a run trains with. The student is initialised from --seed on every process; the
    teacher is frozen; the training responses are fixed: by default the fine-tuned teacher's own
    answers to the training prompts, as in the paper, made by the first run and cached for all
    (responses.py). With --resume, last.pt is read once and its settings checked before any model
    loads."""
    rank, world_size, device = distributed.setup(args.device)
    dtype = getattr(torch, args.dtype or responses.default_dtype(device.type))
    teacher_dtype = getattr(torch, args.teacher_dtype) if args.teacher_dtype else dtype
    out, saved = Path(args.out), None
    if args.responses == "teacher":
        args.teacher_fingerprint = responses.fingerprint(args.teacher)
    if args.resume:
        saved = checkpoint.read(out / "last.pt")
        config.check_resume(saved["args"], args, out / "last.pt")
    tokenizer = config.tokenizer_for(args.student, args.toy_vocab, args.teacher if args.mode == "kd" else None)
    records = data.load_split(args.data, "train", args.data_dir)
    too_few = lambda n: SystemExit(f"error: {n} training examples do not fill one batch of {args.batch_size}")
    if len(records[: args.train_examples]) < args.batch_size:
        raise too_few(len(records[: args.train_examples]))
    valid = data.load_split(args.valid_data, "valid", args.data_dir)[: args.valid_examples]
    if not valid:  # a best/ chosen on nothing would be no choice at all
        raise SystemExit(f"error: --valid-data {args.valid_data}: its valid split holds no examples")
    valid_set = data.encode_dataset(tokenizer, valid, args.max_prompt_len, args.max_len, where="valid")
    torch.manual_seed(args.seed)  # the same initialisation on every process
    student = load_model(args.student, torch.float32, device, tokenizer.vocab_size)
    teacher = None
    if args.mode == "kd":
        teacher = load_model(args.teacher, teacher_dtype, device, tokenizer.vocab_size).eval().requires_grad_(False)
    if args.responses == "teacher":
        where = responses.cache_dir(args.data_dir, args.data, args.teacher_fingerprint,
                                    str(teacher_dtype).removeprefix("torch."), args.max_prompt_len)
        provenance = {"teacher": args.teacher, "teacher_fingerprint": args.teacher_fingerprint,
                      "benchmark": args.data, "teacher_dtype": str(teacher_dtype).removeprefix("torch.")}
        records = responses.teacher_responses(teacher, tokenizer, records, args.train_examples, where, provenance,
                                              args.max_prompt_len, rank, world_size, stop)
    train_set = data.encode_dataset(tokenizer, records[: args.train_examples], args.max_prompt_len, args.max_len,
                                    where="train")
    if len(train_set) < args.batch_size:
        raise too_few(len(train_set))
    student = lora.add(student, args.lora_rank, args.lora_alpha) if args.lora_rank else student  # frozen, but A, B
    student.checkpointing = args.activation_checkpointing
    args.compile_loss = args.compile is not False  # the fused loss's tiles compile on a CPU too (docs/training.md)
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    if args.compile:  # the step's forwards: one graph per length bucket (printed after the loop)
        for model in filter(None, (student, teacher)):
            model.compiled_blocks = [torch.compile(block, dynamic=False) for block in model.blocks]
    student = distributed.Student(student.train(), args, device, world_size)  # .trained: what the loop calls
    optimizer = optimizer_for(student.trained, args.lr, args.weight_decay, fused=device.type == "cuda")
    state = {"step": 0, "epoch": 0, "best_rouge": -1.0}
    if saved:
        state = checkpoint.restore(saved, out / "last.pt", student, optimizer)
    on_gpu_bf16 = device.type == "cuda" and dtype != torch.float32
    autocast = functools.partial(torch.autocast, "cuda", dtype=dtype) if on_gpu_bf16 else contextlib.nullcontext
    bucket = max(1, args.max_len // 4) if args.compile else 1
    return Run(rank, world_size, rank == 0, device, autocast, tokenizer, student, teacher, optimizer,
               train_set, (valid, valid_set), state, bucket)


def load_model(name, dtype, device, vocab_size=257):
    """A checkpoint (directory or hub id), or a from-scratch size of the toy benchmark."""
    if toy.is_scratch(name):
        return toy.scratch_model(name, vocab_size).to(device=device, dtype=dtype)
    return GPT.from_pretrained(name, dtype=dtype, device=device)


def optimizer_for(model, lr, weight_decay, fused=False):
    """AdamW on what trains, with weight decay except on biases and norms (by name: FSDP shards shapes)."""
    no_decay = lambda name: name.endswith(".bias") or ".ln_" in name or "ln_f." in name or "_norm." in name  # q/k norms
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if not no_decay(n)], "weight_decay": weight_decay},
              {"params": [p for n, p in params if no_decay(n)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)  # fused: one kernel for all tensors (GPU)


def cosine_lr(step, total_steps, lr, min_lr):
    """Cosine decay from lr to min_lr over the run, no warm-up (METHOD.md section 4)."""
    angle = math.pi * min(step, total_steps) / max(total_steps, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(angle))


def epoch_order(n_examples, epoch, seed, rank, world_size):
    """This process's example indices for one epoch: DistributedSampler's seeded shuffle, the tail
    dropped so every step is a full global batch. Rank r takes every world_size-th index, so a
    global batch holds the same examples for any number of processes."""
    sampler = torch.utils.data.DistributedSampler(range(n_examples), num_replicas=world_size, rank=rank,
                                                  shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return list(sampler)


# --- main -----------------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = config.parse_args(argv, description=__doc__)  # checked at the door, before any work
    rerun, resume = config.commands(argv, args)  # what continues this run if a signal stops it
    if toy.stages_needed(args) and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise SystemExit("error: run `python train.py --preset toy` once in a single process to make the toy "
                         "teacher and student before using torchrun")
    for out in toy.stages_needed(args):  # --preset toy: its teacher and warm start, made once
        with files.locked(toy.making_lock(out), on_wait=lambda: print(f"waiting: another process is making {out}")):
            if not toy.made(out):  # else another process made it while this one waited
                stage_argv = toy.stage_argv(out, args.data_dir)
                print(f"{out}/best does not exist yet: making it first (python train.py {shlex.join(stage_argv)})")
                train(config.parse_args(stage_argv), commands=(rerun, rerun))
    train(args, commands=(rerun, resume))
    distributed.leave(args.device)  # a torchrun worker on CPU leaves here (distributed.py says why)


if __name__ == "__main__":
    checks.run_cli(main)
