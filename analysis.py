"""The paper's gradient analysis on real logits: what the KD temperature does to FKL and RKL.

    python analysis.py --teacher runs/toy/teacher/best --student runs/toy/student-init/best

On teacher-forced training sequences, at every response position and for every tau:
  - the teacher's non-target mass 1 - p_t under p^tau (the "dark knowledge" tau exposes);
  - the FKL gradient (Eq. 2)  g = (q - p) / tau  and the RKL gradient (Eq. 4)  g = q (D - E_q[D]) /
    tau^2, D = z_s - z_t, each split into its target entry and its non-target entries (L2 norms);
  - the cosine similarity of the two gradients;
  - Prop. 2.1: with logits centred over the vocabulary, tau^2 g tends to (z_s - z_t) / V for both;
    we report || tau^2 g - D_c / V || / || D_c / V ||.
Writes analysis.md (a table) and analysis.png next to --out.
"""
import argparse
import json
import math
import os

# Deterministic CPU runs (see train.py)
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
import torch

import checks
import data
import plots

TAUS = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 10.0, 100.0, 1000.0)


def kd_gradients(student_logits, teacher_logits, tau):
    """Closed-form per-token gradients w.r.t. the student logits, (N, V) each, in float64."""
    z_s, z_t = student_logits.double(), teacher_logits.double()
    p, q = (z_t / tau).softmax(-1), (z_s / tau).softmax(-1)
    delta = z_s - z_t
    fkl = (q - p) / tau                                                       # Eq. 2
    rkl = q * (delta - (q * delta).sum(-1, keepdim=True)) / tau**2           # Eq. 4
    return fkl, rkl


def gradient_stats(student_logits, teacher_logits, targets, tau):
    """Means over positions of the quantities in the module docstring, for one tau. Logits (N, V),
    targets (N,)."""
    fkl, rkl = kd_gradients(student_logits, teacher_logits, tau)
    is_target = torch.zeros_like(fkl, dtype=torch.bool).scatter(-1, targets[:, None], True)
    p_t = (teacher_logits.double() / tau).softmax(-1).gather(-1, targets[:, None])[:, 0]
    split = lambda g: (g.gather(-1, targets[:, None])[:, 0].abs(),
                       g.masked_fill(is_target, 0).norm(dim=-1))
    (fkl_t, fkl_nt), (rkl_t, rkl_nt) = split(fkl), split(rkl)
    cosine = torch.nn.functional.cosine_similarity(fkl, rkl, dim=-1)
    V = student_logits.shape[-1]
    centred = lambda z: z.double() - z.double().mean(-1, keepdim=True)
    limit = (centred(student_logits) - centred(teacher_logits)) / V
    fkl_c, rkl_c = kd_gradients(centred(student_logits), centred(teacher_logits), tau)
    gap = lambda g: ((tau**2 * g - limit).norm(dim=-1) / limit.norm(dim=-1).clamp_min(1e-300))
    mean = lambda x: float(x.mean())
    return {"tau": tau, "teacher_non_target_mass": mean(1 - p_t),
            "fkl_target": mean(fkl_t), "fkl_non_target": mean(fkl_nt),
            "rkl_target": mean(rkl_t), "rkl_non_target": mean(rkl_nt),
            "cosine_fkl_rkl": mean(cosine), "prop21_gap_fkl": mean(gap(fkl_c)),
            "prop21_gap_rkl": mean(gap(rkl_c))}


@torch.no_grad()
def response_logits(teacher, student, tokenizer, records, batch_size=16):
    """Teacher and student logits (N, V) at every response position of the records, and the targets
    (N,)."""
    encoded = data.encode_dataset(tokenizer, records, where="analysis")
    device = next(student.parameters()).device
    zs, zt, targets = [], [], []
    for start in range(0, len(encoded), batch_size):
        batch = data.collate_train(encoded[start:start + batch_size], tokenizer.pad_id)
        input_ids, mask, labels = (t.to(device) for t in batch)
        keep = labels != -100
        zs.append(student(input_ids, mask)[keep].cpu())
        zt.append(teacher(input_ids, mask)[keep].cpu())
        targets.append(labels[keep].cpu())
    return torch.cat(zs), torch.cat(zt), torch.cat(targets)


def table(rows):
    header = ["τ", "teacher non-target mass", "FKL ‖g‖ target", "FKL ‖g‖ non-target",
              "RKL ‖g‖ target",
              "RKL ‖g‖ non-target", "cos(FKL, RKL)", "Prop 2.1 gap FKL", "Prop 2.1 gap RKL"]
    keys = ["tau", "teacher_non_target_mass", "fkl_target", "fkl_non_target", "rkl_target",
            "rkl_non_target",
            "cosine_fkl_rkl", "prop21_gap_fkl", "prop21_gap_rkl"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = (f"{r[k]:g}" if k == "tau" else f"{r[k]:.4g}" for k in keys)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    from model import GPT
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--data", default="toy", help="benchmark whose training split provides the sequences")
    p.add_argument("--data-dir", default=data.DATA_DIR)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--taus", default=",".join(f"{t:g}" for t in TAUS))
    p.add_argument("--out", default=None, help="folder for analysis.md / analysis.png (default: the student's)")
    args = p.parse_args(argv)
    configs = {flag: checks.checkpoint(flag, getattr(args, flag[2:])) or {} for flag in ("--teacher", "--student")}
    data.check_benchmark("--data", args.data, args.data_dir, split="train")
    checks.at_least("--examples", args.examples, 1)
    try:
        taus = [float(t) for t in args.taus.split(",")]
    except ValueError:
        checks.fail(f"--taus must be comma-separated numbers, got {args.taus!r}")
    if not all(math.isfinite(tau) and tau > 0 for tau in taus):
        checks.fail(f"--taus: every tau must be a finite number > 0, got {args.taus!r}")
    checks.writable("--out", args.out or args.student)
    tokenizer = data.load_tokenizer(args.student)
    checks.same_vocabulary(data.load_tokenizer(args.teacher), tokenizer, args.teacher, args.student)
    widths = {flag: config.get("vocab_size") for flag, config in configs.items()}  # (the door's parse)
    if None not in widths.values() and len(set(widths.values())) > 1:
        checks.fail(f"--teacher has {widths['--teacher']} output ids, --student {widths['--student']}: the "
                    "analysis compares their distributions id by id over one width")
    teacher, student = GPT.from_pretrained(args.teacher), GPT.from_pretrained(args.student)
    records = data.load_split(args.data, "train", args.data_dir)[: args.examples]
    zs, zt, targets = response_logits(teacher, student, tokenizer, records)
    rows = [gradient_stats(zs, zt, targets, tau) for tau in taus]
    out = args.out or args.student
    os.makedirs(out, exist_ok=True)
    text = table(rows)
    with open(os.path.join(out, "analysis.md"), "w") as f:
        f.write(f"Gradient analysis on {len(targets)} response tokens of {args.data} (teacher "
                f"{args.teacher}, student {args.student})\n\n{text}\n")
    with open(os.path.join(out, "analysis.json"), "w") as f:
        json.dump(rows, f, indent=1)
    plots.gradient_analysis(rows, os.path.join(out, "analysis.png"))
    print(text)


if __name__ == "__main__":
    checks.run_cli(main)
