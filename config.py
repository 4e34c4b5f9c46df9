"""train.py's settings: the presets, the command line (argparse, each default beside its source),
the door that checks a command line before any model or dataset loads, and what a resumed run must
share with the run that wrote its last.pt."""
import argparse
import functools
import os
import re
import shlex

import torch

import checkpoint
import checks
import data
import toy
from losses import HPARAMS, LOSSES, check_objective

# The paper's setting (GPT-2 XL -> GPT-2 on Dolly, METHOD.md section 4) is the default of every flag
# below. A preset overrides some of them, and a flag given on the command line overrides both.
# `--help` prints this table.
PRESETS = {
    "gpt2": dict(),
    "opt": dict(teacher="runs/opt/teacher/best", student="facebook/opt-1.3b", lr=5e-5),
    # Offline, sized for 2 CPU cores (results/toy): the toy's BPE vocabulary (toy.VOCAB_SIZE); toy-bytes,
    # the byte vocabulary of the earlier study. Each preset's teacher and the student's warm start are made
    # first, once, by toy.STAGES, into runs/<preset>/.
    "toy": dict(teacher="runs/toy/teacher/best", student="runs/toy/student-init/best", data="toy", lr=1e-3,
                epochs=1, batch_size=8, train_examples=1_200, valid_examples=100,
                eval_benchmarks="toy,toy-hard", eval_seeds="10,20,30", toy_vocab="bpe"),
    "toy-bytes": dict(teacher="runs/toy-bytes/teacher/best", student="runs/toy-bytes/student-init/best", data="toy",
                      lr=1e-3, epochs=1, batch_size=8, train_examples=1_200, valid_examples=100,
                      eval_benchmarks="toy,toy-hard", eval_seeds="10,20,30", toy_vocab="bytes"),
    # Beyond the paper: the families people distil today (docs/models.md), base models as torchtune pairs
    # them. The teacher is first fine-tuned on Dolly (TEACHER_SFT below), as in the paper. lr as OPT's
    # (5e-5): full fine-tuning of a 0.1-1B pretrained student; the rest is the paper's protocol.
    "qwen2.5": dict(teacher="runs/qwen2.5/teacher/best", student="Qwen/Qwen2.5-0.5B", lr=5e-5),
    "llama3.2": dict(teacher="runs/llama3.2/teacher/best", student="meta-llama/Llama-3.2-1B", lr=5e-5),
    "smollm2": dict(teacher="runs/smollm2/teacher/best", student="HuggingFaceTB/SmolLM2-360M", lr=5e-5),
    "qwen3": dict(teacher="runs/qwen3/teacher/best", student="Qwen/Qwen3-0.6B-Base", lr=5e-5),
}
# The base model each preset's teacher is fine-tuned from, on Dolly, before distillation:
#   python train.py --preset <preset> --mode sft --student <base> --lr 5e-5 --epochs 10 --out runs/<preset>/teacher
TEACHER_SFT = {"gpt2": "gpt2-xl", "opt": "facebook/opt-6.7b", "qwen2.5": "Qwen/Qwen2.5-1.5B",
               "llama3.2": "meta-llama/Llama-3.2-3B", "smollm2": "HuggingFaceTB/SmolLM2-1.7B",
               "qwen3": "Qwen/Qwen3-4B-Base"}
# What a resumed run must share with the run that wrote its last.pt (the rest may change: --max-steps,
# --save-every, logging, the device).
RESUME_MUST_MATCH = ("mode", "loss", "tau", "kd_ratio", "tau_sq", *HPARAMS, "student_gen_ratio", "lora_rank", "lora_alpha",
                     "teacher",
                     "student", "data", "responses", "teacher_fingerprint", "epochs", "batch_size", "lr", "min_lr",
                     "weight_decay", "seed", "train_examples")


def parse_args(argv=None, description=None):
    """argv -> the run's settings, checked (description: what --help prints above the flags)."""
    p = build_parser(description)
    preset = p.parse_known_args(argv)[0].preset
    p.set_defaults(**PRESETS[preset])  # the preset's table replaces the defaults; flags given still win
    return resolve_args(p.parse_args(argv))


def build_parser(description=None):
    presets = "\n".join(f"  {name}: " + (", ".join(f"{k}={v}" for k, v in table.items())
                                         or "the defaults (the paper's GPT-2 setting)")
                        for name, table in PRESETS.items())
    p = argparse.ArgumentParser(prog="train.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="presets (override the defaults above; flags override presets):\n" + presets)
    p.add_argument("--preset", choices=list(PRESETS), default="gpt2", help="a table of defaults, listed below")
    p.add_argument("--toy-vocab", choices=["bpe", "bytes"], default="bpe", help="the vocabulary of a from-scratch "
                   "size (toy-teacher, toy-student, ...): the toy's BPE (toy.VOCAB_SIZE ids) or the 257 bytes; one "
                   "distilled from a teacher checkpoint takes the teacher's")
    p.add_argument("--mode", choices=["kd", "sft"], default="kd", help="kd: distil the teacher into the student; "
                   "sft: fine-tune --student on the data with cross-entropy only (how a teacher is made)")
    p.add_argument("--loss", default="fkl", help=f"KD objective: {', '.join(LOSSES)}")
    p.add_argument("--tau", type=float, default=1.0, help="KD temperature, applied to teacher and student logits")
    for name in HPARAMS:
        takes = ", ".join(f"{loss} {objective.domains[name]}" for loss, objective in LOSSES.items()
                          if name in objective.domains)
        p.add_argument(f"--{name}", type=float, help=f"hyper-parameter of {takes} (default: the objective's)")
    p.add_argument("--kd-ratio", type=float, default=1.0, help="loss = (1 - r) CE + r KD (1: pure distillation)")
    p.add_argument("--tau-sq", action="store_true", help="multiply the KD loss by tau^2 (Hinton); off in the paper")
    p.add_argument("--student-gen-ratio", type=float, default=0.0, help="beyond the paper: the share of steps "
                   "whose KD loss is taken on the student's own sampled responses to the batch's prompts "
                   "(on-policy, as TRL's GKD lmbda); 0: the paper's off-policy")
    p.add_argument("--teacher", default="MiniLLM/teacher-gpt2-1.5B", help="hub id or checkpoint directory "
                   "(default: GPT-2 XL fine-tuned on Dolly, as published by MiniLLM)")
    p.add_argument("--student", default="gpt2",
                   help="hub id, checkpoint directory, or a from-scratch size: " + ", ".join(toy.SIZES))
    p.add_argument("--data", default="dolly", help="benchmark (dolly, toy) or a jsonl file of prompts and responses")
    p.add_argument("--responses", choices=["teacher", "dataset"], help="what the student learns from: teacher = "
                   "the fine-tuned teacher's own responses to the training prompts, sampled once and cached (the "
                   "paper's setting; default for --mode kd on a benchmark); dataset = the benchmark's responses "
                   "(the reference code's default)")
    p.add_argument("--valid-data", help="benchmark whose valid split selects the best epoch "
                   "(default: --data, or dolly when --data is a jsonl file)")
    p.add_argument("--data-dir", default=data.DATA_DIR)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (all processes, all micro-batches)")
    p.add_argument("--micro-batch-size", type=int, help="sequences per forward pass (default: all of a process's)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (GPT-2 student; OPT: 5e-5)")
    p.add_argument("--min-lr", type=float, default=1e-7, help="end of the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's, none on biases and layer norms")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", help="run directory (default: runs/<preset>/<loss>-tau<tau>)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="where to train (default: cuda when a GPU is "
                   "visible, else cpu; under torchrun, cuda uses nccl and one GPU per process, cpu uses gloo)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="autocast dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--teacher-dtype", choices=["float32", "bfloat16"], help="teacher weights (default as --dtype)")
    p.add_argument("--resume", action="store_true", help="continue exactly from <out>/last.pt")
    p.add_argument("--fsdp", action="store_true", help="shard the student with FSDP (multi-GPU)")
    p.add_argument("--activation-checkpointing", action="store_true", help="keep only each student block's input "
                   "and recompute the block in backward: less activation memory for ~1/3 more compute")
    p.add_argument("--lora-rank", type=int, default=0, help="train a LoRA student of this rank: only low-rank "
                   "updates of q, v, attention's output and the MLP train, merged into best/ (0: all weights; "
                   "torchtune's KD recipes: 64)")
    p.add_argument("--lora-alpha", type=float, help="LoRA's scale is alpha / rank (default 2 x rank, as "
                   "torchtune's recipes: 64/128)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile each transformer "
                   "block for the training step, lengths padded to multiples of --max-len / 4, attention by the causal "
                   "flag alone, and the fused loss's vocabulary tiles (default: on a GPU; on CPU only the tiles, 4x less element-wise "
                   "time; the blocks cost more than they save there)")
    p.add_argument("--fused-loss", action=argparse.BooleanOptionalAction, default=True, help="apply the output "
                   "head inside the KD loss, piece by piece, so no (B, T, V) logits exist (fused_loss.fused_distill_loss); "
                   "--no-fused-loss makes the logits and calls distill_loss_chunked: the same loss to float rounding")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (the schedule still "
                   "spans --epochs), validate and save best/ and last.pt, so --resume continues")
    p.add_argument("--save-every", type=int, default=0, help="also write last.pt every N steps")
    p.add_argument("--train-examples", type=int, help="use the first N training examples")
    p.add_argument("--valid-examples", type=int, help="score validation ROUGE-L on the first N examples")
    p.add_argument("--valid-greedy", action="store_true", help="greedy validation decoding (default: sampled)")
    p.add_argument("--valid-max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-len", type=int, default=256)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-benchmarks", default="", help="after training, evaluate best/ on these (comma-separated)")
    p.add_argument("--eval-seeds", default="10,20,30,40,50", help="sampling seeds of that evaluation")
    return p


def resolve_args(args):
    """The settings that follow from others, then the door (check_args)."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.responses is None:  # the paper's setting wherever a teacher can answer the prompts
        on_benchmark = args.mode == "kd" and not args.data.endswith(".jsonl")
        args.responses = "teacher" if on_benchmark else "dataset"
    if args.responses == "teacher" and (args.mode == "sft" or toy.is_scratch(args.teacher or "")):
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
    check_numbers(args)
    to_make, widths = check_models(args)
    data.check_benchmark("--data", args.data, args.data_dir, split="train")
    data.check_benchmark("--valid-data", args.valid_data, args.data_dir, split="valid")
    data.check_benchmarks("--eval-benchmarks", args.eval_benchmarks, args.data_dir)
    checks.seeds("--eval-seeds", args.eval_seeds)
    checks.writable("--out", args.out)
    checkpoint.check_free("--out", args.out)
    if args.responses == "teacher":  # where the teacher's responses are cached
        checks.writable("--data-dir", os.path.join(args.data_dir, "responses"))
    teacher = to_make.get(args.teacher, args.teacher) if args.mode == "kd" else None
    tokenizer = tokenizer_for(to_make.get(args.student, args.student), args.toy_vocab, teacher)
    if args.mode == "kd":  # last: a hub model's tokenizer is downloaded for it
        checks.same_vocabulary(tokenizer_for(teacher, args.toy_vocab), tokenizer, args.teacher, args.student)
    for flag, width in widths.items():
        name = args.student if flag == "--student" else args.teacher
        if width is not None and width < tokenizer.n_ids:  # wider is padding, cut off; narrower cannot be
            checks.fail(f"{flag} {name} has {width} output ids, fewer than its tokenizer's {tokenizer.n_ids}")
    stages = [name for name in (args.teacher, args.student) if args.preset in toy.PRESETS and name not in to_make
              and name in (PRESETS[args.preset]["teacher"], PRESETS[args.preset]["student"])]
    toy_ids = tokenizer_for("toy-tiny", args.toy_vocab).n_ids
    if stages and tokenizer.n_ids != toy_ids:  # e.g. a runs/toy made before the toy had its BPE vocabulary
        checks.fail(f"{stages[0]} has a {tokenizer.n_ids}-token vocabulary, not the {toy_ids} of --toy-vocab "
                    f"{args.toy_vocab}: it was made by an earlier version; move runs/{args.preset} away (a runs/toy "
                    "from before the BPE toy is the byte toy's: runs/toy-bytes) or delete it")
    marker = len(tokenizer.encode(data.RESPONSE_MARKER))
    if args.max_prompt_len <= marker:
        checks.fail(f"--max-prompt-len {args.max_prompt_len} cannot hold any prompt: the '### Response:' marker "
                    f"alone takes {marker} tokens")
    last = os.path.join(args.out, "last.pt")
    if os.path.isfile(last) and not args.resume:
        checks.fail(f"{args.out} holds another run's checkpoint (last.pt): pass --resume to continue it, or "
                    "choose another --out")
    if args.resume and not os.path.isfile(last):
        checks.fail(f"--resume, but {last} does not exist")
    if args.resume:
        checkpoint.check_file("--resume", last)


def check_numbers(args):
    """Devices, sizes, rates and the objective."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.device == "cuda":
        gpus, on_this_machine = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if gpus == 0:
            checks.fail("--device cuda, but no GPU is visible (CUDA_VISIBLE_DEVICES?)")
        if on_this_machine > gpus:
            checks.fail(f"torchrun starts {on_this_machine} processes here, but this machine has {gpus} GPU(s), "
                        f"one per process: use --nproc_per_node {gpus}, or --device cpu")
    for flag in ("epochs", "batch_size", "micro_batch_size", "max_steps", "train_examples", "valid_examples",
                 "valid_max_new_tokens", "max_prompt_len", "log_every"):
        checks.at_least("--" + flag.replace("_", "-"), getattr(args, flag), 1)
    checks.at_least("--save-every", args.save_every, 0)
    checks.at_least("--lora-rank", args.lora_rank, 0)
    if args.lora_alpha is not None and not args.lora_rank:
        checks.fail("--lora-alpha scales a LoRA student's update: give --lora-rank too")
    args.lora_alpha = float(2 * args.lora_rank) if args.lora_alpha is None and args.lora_rank else args.lora_alpha
    if args.lora_rank:
        checks.finite("--lora-alpha", args.lora_alpha, low=0)
    if args.batch_size % world_size:  # before dividing by it
        checks.fail(f"--batch-size {args.batch_size} must be a multiple of the {world_size} processes")
    if args.fsdp and "RANK" not in os.environ:
        checks.fail("--fsdp shards the student over torchrun's processes: start with torchrun --nproc_per_node N")
    if args.fsdp and args.compile:
        checks.fail("--compile with --fsdp is not supported yet (FSDP's hooks around compiled blocks are untested "
                    "here): use --no-compile")
    args.compile = False if args.fsdp else args.compile  # None: decided by the device (train.py: load_run)
    micro_batch_size = args.micro_batch_size or args.batch_size // world_size
    if args.batch_size % (world_size * micro_batch_size):
        checks.fail(f"--batch-size {args.batch_size} must be a multiple of processes ({world_size}) x "
                    f"--micro-batch-size ({micro_batch_size})")
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


def check_models(args):
    """Teacher and student: checkpoints there (or a from-scratch size), long enough for --max-len. A
    toy stage this command makes first is checked by the size it makes. Returns ({its best/: that
    size}, {flag: the checkpoint's output width, None when not known yet})."""
    stage = lambda out: toy.STAGES[os.path.basename(out)]
    to_make = {f"{out}/best": stage(out)[stage(out).index("--student") + 1] for out in toy.stages_needed(args)}
    models = [("--student", args.student)] + ([("--teacher", args.teacher)] if args.mode == "kd" else [])
    widths = {}
    for flag, name in models:
        if not name:
            checks.fail(f"{flag} is required")
        name = to_make.get(name, name)
        if toy.is_scratch(name):
            if name.startswith("scratch:") and not re.fullmatch(r"scratch:[1-9]\d*x[1-9]\d*", name):
                checks.fail(f"{flag} {name}: write a from-scratch size as scratch:<layers>x<width>, e.g. scratch:4x128")
            positions, widths[flag] = toy.SCRATCH_POSITIONS, None
        elif flag == "--teacher" and name == PRESETS[args.preset].get("teacher") and not os.path.exists(name) \
                and args.preset in TEACHER_SFT:
            checks.fail(f"--teacher {name} does not exist yet: fine-tune the teacher first (python train.py --preset "
                        f"{args.preset} --mode sft --student {TEACHER_SFT[args.preset]} --lr 5e-5 --epochs 10 --out "
                        f"{os.path.dirname(name)})")
        else:
            hf = checks.checkpoint(flag, name) or {}  # parsed once: positions and width come from it
            positions = hf.get("n_positions") or hf.get("max_position_embeddings")
            widths[flag] = hf.get("vocab_size")
        if positions and args.max_len > positions:
            checks.fail(f"--max-len {args.max_len} exceeds {flag} {name}'s {positions} positions")
        if positions and args.max_prompt_len + args.valid_max_new_tokens > positions:
            checks.fail(f"--max-prompt-len + --valid-max-new-tokens exceed {flag} {name}'s {positions} positions")
    return to_make, widths


@functools.lru_cache  # the door compares the tokenizers, train() uses the student's: built once
def tokenizer_for(name, toy_vocab="bpe", teacher=None):
    """A model's tokenizer: a checkpoint's files; for a from-scratch size, the files of the teacher
    checkpoint it is distilled from, else the toy's vocabulary (--toy-vocab)."""
    if not toy.is_scratch(name):
        return data.load_tokenizer(name)
    if teacher and not toy.is_scratch(teacher):
        return data.load_tokenizer(teacher)
    return data.toy_tokenizer() if toy_vocab == "bpe" else data.byte_tokenizer()


def check_resume(saved_args, args, path):
    """A resumed run trains on exactly the settings that wrote last.pt, or is refused in one line."""
    saved = {"student_gen_ratio": 0.0, "lora_rank": 0, "lora_alpha": None, **saved_args}  # from before the flags
    changed = [k for k in RESUME_MUST_MATCH if saved.get(k) != getattr(args, k)]
    if changed:
        raise SystemExit(f"error: --resume with different settings than {path} was written with: "
                         + ", ".join(f"{k}={saved.get(k)!r} -> {getattr(args, k)!r}" for k in changed))


def commands(argv, args):
    """(the command as given, the command that resumes it): what continues a run that a signal
    stopped before its first step (teacher responses, a toy stage) and after it (printed when it
    stops)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return "the same torchrun command", "the same torchrun command with --resume"
    given = ["python", "train.py", *argv]
    return shlex.join(given), shlex.join(given + ([] if args.resume else ["--resume"]))
