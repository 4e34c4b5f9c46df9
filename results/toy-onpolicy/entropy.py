"""Why do on-policy steps hurt at τ = 1? An ad-hoc look (not part of the tooling): on the first 128
training prompts of the toy preset, for the warm start and for FKL/RKL students of the study,

  - the student's mean next-token entropy (nats) on the teacher's fixed responses: how flat it is;
  - the teacher's mean entropy and NLL on the student's own sampled answers (temperature 1, seeded):
    how sure the teacher is where the student goes, and how likely it finds the student's tokens.

    python results/toy-onpolicy/entropy.py      # from the project root, after the study's runs
"""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.getcwd())
import data  # noqa: E402
import config  # noqa: E402
import train  # noqa: E402
from model import GPT  # noqa: E402

STUDENTS = {"warm start": ["runs/toy/student-init"]}
for loss in ("fkl", "rkl"):
    for grid, ratio in (("runs/toy", 0), ("runs/toy-gen0.5", 0.5), ("runs/toy-gen1", 1)):
        for tau in (1, 2):
            STUDENTS[f"{loss.upper()}, λ = {ratio}, τ = {tau}"] = [
                f"{grid}/{loss}-tau{tau}-seed{seed}" for seed in (1, 2, 3)]


def token_stats(model, batch):
    """(mean entropy, mean NLL of the labels) over the response positions of `batch`."""
    input_ids, attention_mask, labels = batch
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids, attention_mask).float(), -1)   # (B, T, V)
    keep = labels != -100
    entropy = -(logp.exp() * logp).sum(-1)[keep].mean()
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].mean()
    return float(entropy), float(nll)


def sampled_answers(model, examples, tokenizer):
    prompts = [prompt for prompt, _ in examples]
    input_ids, attention_mask = data.collate_prompts(prompts, tokenizer.pad_id)
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    with torch.no_grad():
        new = model.eval().generate(input_ids, attention_mask, max_new_tokens=256,
                                    eos_token_id=tokenizer.eos_id, generator=generators)
    eos = tokenizer.eos_id
    return [(prompt, row[:row.index(eos) + 1] if eos in row else row)
            for prompt, row in zip(prompts, new.tolist())]


def main():
    args = config.parse_args(["--preset", "toy", "--loss", "fkl", "--device", "cpu"])
    run = train.load_run(args)
    tokenizer, teacher, train_set = run.tokenizer, run.teacher, run.train_set
    examples = train_set[:128]
    fixed = data.collate_train(examples, tokenizer.pad_id)
    print(f"teacher entropy on its own responses: {token_stats(teacher, fixed)[0]:.3f}\n")
    print("| student | its entropy on teacher responses | teacher entropy on its samples | "
          "teacher NLL of its samples |\n|---|---|---|---|")
    for name, runs in STUDENTS.items():
        rows = []
        for run in runs:
            student = GPT.from_pretrained(f"{run}/best", dtype=torch.float32, device="cpu").eval()
            own = data.collate_train(sampled_answers(student, examples, tokenizer),
                                     tokenizer.pad_id)
            rows.append((token_stats(student, fixed)[0], *token_stats(teacher, own)))
        cells = [f"{statistics.fmean(column):.3f}" for column in zip(*rows)]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
