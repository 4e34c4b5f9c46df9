"""Evaluation: sampled responses, ROUGE-L against the references, mean +- std over seeds (METHOD.md
section 4).

    python evaluate.py --model runs/toy/fkl-tau3/best --benchmarks toy,toy-hard --seeds 10,20,30
    python evaluate.py --model runs/gpt2/fkl-tau3/best    # dolly, self-inst, vicuna, sinst, uinst
    python evaluate.py summarize runs/toy    # Table 1 / Table 2 layout, heatmap and tau curves
    python evaluate.py compare runs/toy runs/toy-dataset --names teacher,dataset  # grids by tau

Decoding follows the protocol: ancestral sampling at decode temperature 1 (not the KD temperature
tau: the two are separate settings), no top-k, top-p 1, no_repeat_ngram_size 6, at most 256 new
tokens.
"""
import argparse
import functools
import json
import math
import os
import shlex
import statistics
import sys
from pathlib import Path

# Deterministic CPU runs (see train.py)
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
import torch
from tqdm import tqdm

import checks
import data
import plots
from checkpoint import StopOnSignal
from files import atomic_write
from losses import LOSSES, ce_loss
from model import GPT

PROTOCOL = dict(temperature=1.0, top_k=0, top_p=1.0, no_repeat_ngram_size=6, max_new_tokens=256)
SEEDS = (10, 20, 30, 40, 50)
PAPER_AVERAGE = ("dolly", "sinst", "uinst")  # Table 1 averages these three
# The protocol's n-gram block counts GPT-2 BPE tokens (~4 bytes of English each). With the toy's
# byte tokenizer, 6 bytes would forbid copying any 6-letter piece of the prompt - a creature's name,
# say - so the same block there is 6 x 4 = 24 bytes.
BYTES_PER_BPE_TOKEN = 4


def protocol_ngram_size(tokenizer, tokens=PROTOCOL["no_repeat_ngram_size"]):
    """no_repeat_ngram_size in this tokenizer's units: as given for BPE, x4 for the byte-level
    tokenizer."""
    return tokens * BYTES_PER_BPE_TOKEN if tokenizer.byte_level else tokens


def decoding_settings(tokenizer, **overrides):
    """The protocol's decoding settings for this tokenizer, with overrides (e.g. temperature=0:
    greedy)."""
    return {**PROTOCOL, "no_repeat_ngram_size": protocol_ngram_size(tokenizer), **overrides}


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imported on first use: loading it takes a second
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction, references):
    """ROUGE-L F-measure x 100 (stemming on), the best over the references."""
    return 100 * max(_rouge_scorer().score(ref, prediction)["rougeL"].fmeasure for ref in references)


@torch.no_grad()
def sample(model, tokenizer, records, seed, batch_size=32, max_prompt_len=256, progress=True, desc="generating",
           **decoding):
    """One sampled continuation per record, in order: (its tokens before the first EOS, whether EOS
    came before max_new_tokens), decoded with decoding_settings(tokenizer, **decoding). Prompts are
    sorted by length so batches carry little padding; batch b samples from a generator seeded by
    (seed, b), so the same seed gives the same samples."""
    decoding = decoding_settings(tokenizer, **decoding)
    device = next(model.parameters()).device
    allowed = tokenizer.token_mask(model.cfg.vocab_size)  # None when every output id is a token
    encoded = [data.encode_example(tokenizer, r["prompt"], max_prompt_len=max_prompt_len) for r in records]
    order = sorted((i for i, e in enumerate(encoded) if e is not None),
                   key=lambda i: len(encoded[i][0]))
    # a prompt that cannot fit gets an empty response, which scores 0
    samples = [([], True)] * len(records)
    batches = range(0, len(order), batch_size)
    for b, start in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
        rows = order[start:start + batch_size]
        input_ids, mask = data.collate_prompts([encoded[i][0] for i in rows], tokenizer.pad_id)
        generator = torch.Generator(device).manual_seed(seed * 100_003 + b)
        new = model.generate(input_ids.to(device), mask.to(device), eos_token_id=tokenizer.eos_id, allowed=allowed,
                             generator=generator, **decoding)
        for i, tokens in zip(rows, new.tolist()):
            ended = tokenizer.eos_id in tokens
            # cut at the first EOS
            samples[i] = (tokens[: tokens.index(tokenizer.eos_id)] if ended else tokens, ended)
    return samples


def generate_responses(model, tokenizer, records, seed, batch_size=32, max_prompt_len=256,
                       progress=True, desc="generating", **decoding):
    """One sampled response per record, in order, as stripped text (see `sample`)."""
    samples = sample(model, tokenizer, records, seed, batch_size, max_prompt_len, progress, desc,
                     **decoding)
    return [tokenizer.decode(tokens).strip() for tokens, _ in samples]


def score(records, responses):
    """Mean ROUGE-L over examples; every example counts."""
    if not records:
        raise ValueError("no examples to score: ROUGE-L over nothing would read as 0.0")
    return statistics.fmean(rouge_l(p, r["output"]) for p, r in zip(responses, records))


def validation_score(model, tokenizer, records, seed=0, greedy=False, batch_size=32, max_new_tokens=256):
    """ROUGE-L on a validation split, for train.py's per-epoch model selection (sampled, no n-gram
    blocking, as the reference does during training; greedy=True decodes greedily instead)."""
    was_training = model.training
    model.eval()
    responses = generate_responses(model, tokenizer, records, seed, batch_size, progress=False,
                                   temperature=0.0 if greedy else 1.0, no_repeat_ngram_size=0,
                                   max_new_tokens=max_new_tokens)
    model.train(was_training)
    return score(records, responses)


def evaluate(model, tokenizer, benchmarks, seeds=SEEDS, batch_size=32, out_dir=None, data_dir=data.DATA_DIR,
             max_examples=None, stop=None, **decoding):
    """Score every benchmark over every seed. Writes predictions-<bench>-seed<k>.jsonl and
    results.json to out_dir when given. Returns {benchmark: {"scores": {seed: rouge}, "mean", "std",
    "n"}}.

    With out_dir, each finished (benchmark, seed) is kept in out_dir/progress.json as it ends: after a
    signal (`stop`, checkpoint.StopOnSignal) the evaluation ends once the unit in progress is written,
    and the same call continues from there."""
    settings = decoding_settings(tokenizer, **decoding)
    done = _read_progress(out_dir, settings) if out_dir else {}
    results = {}
    for benchmark in benchmarks:
        records = data.load_split(benchmark, "test", data_dir)[:max_examples]
        if not records:
            raise ValueError(f"benchmark {benchmark}: its test split holds no examples to score")
        scores = {}
        for seed in seeds:
            if f"{seed}" in done.get(benchmark, {}).get("scores", {}) and done[benchmark]["n"] == len(records):
                scores[seed] = done[benchmark]["scores"][f"{seed}"]  # scored before a signal stopped the run
                continue
            responses = generate_responses(model, tokenizer, records, seed, batch_size, desc=f"{benchmark} seed {seed}",
                                           **decoding)
            per_example = [rouge_l(p, r["output"]) for p, r in zip(responses, records)]
            scores[seed] = statistics.fmean(per_example)
            if out_dir:
                data.write_jsonl(os.path.join(out_dir, f"predictions-{benchmark}-seed{seed}.jsonl"),
                                 [{"prompt": r["prompt"], "prediction": p, "references": r["output"], "rougeL": s}
                                  for r, p, s in zip(records, responses, per_example)])
                done[benchmark] = {"n": len(records), "scores": {**done.get(benchmark, {}).get("scores", {}),
                                                                 f"{seed}": scores[seed]}}
                _write(os.path.join(out_dir, "progress.json"), {"decoding": settings, "benchmarks": done})
            if stop is not None and stop.signalled:
                kept = sum(len(d["scores"]) for d in done.values())
                stop.exit(f"{out_dir} keeps {kept} of {len(benchmarks) * len(seeds)} benchmark x seed scores")
        values = list(scores.values())
        results[benchmark] = {"scores": scores, "mean": statistics.fmean(values),
                              "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(records)}
    if out_dir:
        _write(os.path.join(out_dir, "results.json"), {"benchmarks": results, "decoding": settings, "seeds": list(seeds)})
        Path(out_dir, "progress.json").unlink(missing_ok=True)
    return results


def _write(path, payload):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = json.dumps(payload, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _read_progress(out_dir, settings):
    """{benchmark: {"n", "scores": {seed: score}}} of an evaluation a signal stopped, if it decoded
    with the same settings (else nothing: it starts over)."""
    path = Path(out_dir, "progress.json")
    try:
        progress = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return progress["benchmarks"] if progress.get("decoding") == settings else {}


def results_table(results):
    lines = ["| benchmark | ROUGE-L (mean ± std) | seeds | n |", "|---|---|---|---|"]
    for benchmark, r in results.items():
        per_seed = ", ".join(f"{s:.2f}" for s in r["scores"].values())
        lines.append(f"| {benchmark} | {r['mean']:.2f} ± {r['std']:.2f} | {per_seed} | {r['n']} |")
    return "\n".join(lines)


def evaluate_checkpoint(model_dir, benchmarks, seeds, data_dir, device, stop=None):
    """train.py's last act: score its best/ (written to best/eval/) and print the table."""
    model = GPT.from_pretrained(str(model_dir), device=device)
    tokenizer = data.load_tokenizer(str(model_dir))
    results = evaluate(model, tokenizer, benchmarks, seeds, out_dir=os.path.join(model_dir, "eval"),
                       data_dir=data_dir, stop=stop)
    print(f"\n{os.path.dirname(model_dir)}: ROUGE-L of best/ (sampled, decode temperature 1)\n"
          + results_table(results))


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
# summarize: every run's results -> the paper's tables and plots


def collect_runs(runs_dir, eval_name="eval"):
    """[(run directory name, args, results)] for each run under runs_dir with args.json and
    best/<eval_name>/results.json (eval_name: e.g. eval-greedy for a second decoding setting)."""
    runs = []
    for args_path in sorted(Path(runs_dir).rglob("args.json")):
        results_path = args_path.parent / "best" / eval_name / "results.json"
        if results_path.is_file():
            runs.append((args_path.parent.name, json.loads(args_path.read_text()),
                         json.loads(results_path.read_text())["benchmarks"]))
    return runs


def _grid(runs):
    """{(objective, tau): {benchmark: [one list of per-sampling-seed scores per run]}}: the runs of
    a cell are its training seeds. SFT runs (the teacher, a student's warm start) are rows of their
    own, named by their directory."""
    grid = {}
    for name, args, results in runs:
        key = (name, None) if args.get("mode") == "sft" else (args["loss"], float(args["tau"]))
        cell = grid.setdefault(key, {})
        for benchmark, r in results.items():
            cell.setdefault(benchmark, []).append(list(r["scores"].values()))
    return grid


def _run_scores(cell, benchmarks):
    """One score per run (training seed): its mean over sampling seeds, averaged over
    `benchmarks`."""
    if not all(b in cell for b in benchmarks) or len({len(cell[b]) for b in benchmarks}) != 1:
        return []
    return [statistics.fmean(statistics.fmean(cell[b][i]) for b in benchmarks)
            for i in range(len(cell[benchmarks[0]]))]


def _average(cell, benchmarks):
    runs = _run_scores(cell, benchmarks)
    return statistics.fmean(runs) if runs else math.nan


def _spread(cell, benchmarks):
    """The std over training seeds; for a single run, over its sampling seeds (0 if it has one of
    each)."""
    runs = _run_scores(cell, benchmarks)
    if len(runs) > 1:
        return statistics.stdev(runs)
    if not runs:
        return math.nan
    per_seed = [statistics.fmean(seeds) for seeds in zip(*(cell[b][0] for b in benchmarks))]
    return statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0


def summarize(runs_dir, out_dir=None, eval_name="eval"):
    """Markdown tables in the layout of the paper's Table 1 (objective: tau=1 vs best tau) and the
    full objective x tau grid with per-benchmark columns; a heatmap and tau curves as PNG when
    matplotlib exists. Mean ± std: the mean over every training and sampling seed, the std over
    training seeds (a cell with one training run: over its sampling seeds)."""
    runs = collect_runs(runs_dir, eval_name)
    grid = _grid(runs)
    if not grid:
        raise FileNotFoundError(f"no finished runs (args.json + best/{eval_name}/results.json) "
                                f"under {runs_dir}")
    benchmarks = sorted({b for cell in grid.values() for b in cell})
    averaged = list(PAPER_AVERAGE) if set(PAPER_AVERAGE) <= set(benchmarks) else benchmarks
    sft_rows = sorted(o for o, t in grid if t is None)
    order = list(LOSSES)  # the paper's order of the objectives
    objectives = sorted({o for o, t in grid if t is not None},
                        key=lambda o: order.index(o) if o in order else 99)
    taus = sorted({t for o, t in grid if t is not None})
    fmt = lambda cell, bs: f"{_average(cell, bs):.2f} ± {_spread(cell, bs):.2f}"
    seeds = max(len(runs) for cell in grid.values() for runs in cell.values())
    lines = [f"## Table 1 layout: ROUGE-L averaged over {', '.join(averaged)}; mean ± std over "
             f"{seeds} training seed(s)", "",
             "| objective | τ = 1 | best τ | at best τ | Δ vs τ = 1 |", "|---|---|---|---|---|"]
    for name in sft_rows:  # the teacher, and e.g. the student's warm start, as reference rows
        lines.append(f"| {name} | {fmt(grid[(name, None)], averaged)} | | | |")
    for o in objectives:
        scores = {t: _average(grid[(o, t)], averaged) for t in taus if (o, t) in grid}
        best = max(scores, key=lambda t: -math.inf if math.isnan(scores[t]) else scores[t])
        at_one = fmt(grid[(o, 1.0)], averaged) if (o, 1.0) in grid else "nan"
        gain = scores[best] - scores.get(1.0, math.nan)
        lines.append(f"| {o} | {at_one} | {best:g} | {fmt(grid[(o, best)], averaged)} | "
                     f"{gain:+.2f} |")
    lines += ["", "## Every run: objective × τ, mean ± std over training seeds", "",
              "| objective | τ | " + " | ".join(benchmarks) + " | average |",
              "|---|---|" + "---|" * (len(benchmarks) + 1)]
    for (o, t), cell in sorted(grid.items(),
                               key=lambda kv: (kv[0][1] is not None, kv[0][0], kv[0][1] or 0)):
        row = " | ".join(fmt(cell, [b]) if b in cell else "" for b in benchmarks)
        lines.append(f"| {o} | {'' if t is None else f'{t:g}'} | {row} | {fmt(cell, averaged)} |")
    lines += claims(runs, averaged)
    table = "\n".join(lines)
    out_dir = Path(out_dir or runs_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.md").write_text(table + "\n")
    values = [[_average(grid[(o, t)], averaged) if (o, t) in grid else math.nan for t in taus]
              for o in objectives]
    spreads = [[_spread(grid[(o, t)], averaged) if (o, t) in grid else math.nan for t in taus]
               for o in objectives]
    # the SFT rows (teacher, warm start) go in the title: as curves they would squash the students'
    title = ", ".join(f"{o} {_average(grid[(o, t)], averaged):.1f}" for o, t in grid if t is None)
    if objectives:  # (a directory of SFT runs only has rows, and no tau to plot)
        plots.tau_grid(objectives, taus, values, spreads, title, out_dir)
    return table


def scores_by_seed(runs, averaged):
    """The KD runs' scores cell by cell: (objective, tau) -> {training seed: ROUGE-L averaged over
    the `averaged` benchmarks} (a run that lacks one of them is left out)."""
    by_seed = {}
    for _, args, results in runs:
        if args.get("mode") != "sft" and all(b in results for b in averaged):
            value = statistics.fmean(statistics.fmean(results[b]["scores"].values())
                                     for b in averaged)
            by_seed.setdefault((args["loss"], float(args["tau"])), {})[args.get("seed")] = value
    return by_seed


def grid_by_seed(runs_dir, eval_name="eval"):
    """scores_by_seed of one grid's KD runs, ROUGE-L averaged over the paper's benchmarks where the
    grid has them all (else over every benchmark it has)."""
    runs = [r for r in collect_runs(runs_dir, eval_name) if r[1].get("mode") != "sft"]
    benchmarks = sorted({b for _, _, results in runs for b in results})
    return scores_by_seed(runs, [b for b in PAPER_AVERAGE if b in benchmarks] or benchmarks)


def best_tau(cells):
    """{tau: {seed: score}} -> the tau with the best mean over seeds (as in Table 1); a tie goes to
    the smaller tau."""
    return max(sorted(cells), key=lambda t: statistics.fmean(cells[t].values()))


def paired(a, b):
    """a - b over the training seeds both cells ({seed: score}) have, as
    "mean ± std (k of n seeds > 0)"."""
    diffs = [a[s] - b[s] for s in sorted(a) if s in b]
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    agree = sum(d > 0 for d in diffs)
    return f"{statistics.fmean(diffs):+.2f} ± {std:.2f} ({agree} of {len(diffs)} seeds > 0)"


def claims(runs, averaged):
    """The paper's four claims checked per training seed: each comparison is a paired difference
    between two cells' runs of the same seed, reported as mean ± std over seeds and how many seeds
    agree with the paper. The best τ of an objective is the one with the best mean over seeds (as
    in Table 1)."""
    by_seed = scores_by_seed(runs, averaged)
    if not {("fkl", 1.0), ("rkl", 1.0)} <= set(by_seed):
        return []
    # objective -> its best tau, in the paper's order of objectives
    best = {o: best_tau({t: seeds for (obj, t), seeds in by_seed.items() if obj == o})
            for o in sorted({o for o, _ in by_seed}, key=list(LOSSES).index)}
    fkl, rkl = ("fkl", best["fkl"]), ("rkl", best["rkl"])
    gains = [f"{o} {paired(by_seed[(o, best[o])], by_seed[(o, 1.0)])}" for o in best
             if (o, 1.0) in by_seed and best[o] != 1.0]
    return ["",
            "## The paper's claims, per training seed (paired differences of the same seed's runs)",
            "",
            "1. RKL > FKL at τ = 1: RKL − FKL = "
            f"{paired(by_seed[('rkl', 1.0)], by_seed[('fkl', 1.0)])}",
            f"2. FKL at its best τ ({fkl[1]:g}) > RKL at its best τ ({rkl[1]:g}): FKL − RKL = "
            f"{paired(by_seed[fkl], by_seed[rkl])}",
            "3. gain of the best τ over τ = 1: "
            + ("; ".join(gains) or "no objective's best τ is above 1"),
            "4. best τ (paper: 2.5-3.5): " + ", ".join(f"{o} {t:g}" for o, t in best.items())]


def compare(runs_dirs, names, objectives=("fkl", "rkl"), eval_name="eval", out_dir=None,
            taus=None):
    """Several grids side by side (teacher vs dataset responses, on-policy ratios, ...): for each
    objective, ROUGE-L (averaged as in summarize) at every τ of every grid, mean ± std over training
    seeds; then, per grid, τ = 1, the best τ, and the gain of the best τ over τ = 1 as a paired
    difference of the same training seed's runs (mean ± std, and how many seeds gain). taus: only
    these τ values, so that grids run over different τ sets pick their best τ from the same set.
    Writes compare.md and compare.png (compare-<eval_name>.* for another decoding) to out_dir when
    given. Returns the markdown."""
    by_seed = []  # per grid: {(objective, tau): {training seed: averaged ROUGE-L}}
    for runs_dir in runs_dirs:
        cells = {(o, t): seeds for (o, t), seeds in grid_by_seed(runs_dir, eval_name).items()
                 if o in objectives and (taus is None or t in taus)}
        if not cells:
            raise FileNotFoundError(f"no finished runs of {', '.join(objectives)} under {runs_dir}")
        by_seed.append(cells)
    taus = sorted({t for cells in by_seed for _, t in cells})
    fmt = lambda seeds: (f"{statistics.fmean(seeds.values()):.2f} ± "
                         f"{statistics.stdev(seeds.values()):.2f}" if len(seeds) > 1
                         else f"{statistics.fmean(seeds.values()):.2f} (1 seed)")
    columns = [(o, i) for o in objectives for i in range(len(by_seed))]
    lines = [f"## ROUGE-L by τ ({eval_name}); mean ± std over training seeds", "",
             "| τ | " + " | ".join(f"{o.upper()}, {names[i]}" for o, i in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for t in taus:
        row = [fmt(by_seed[i][(o, t)]) if (o, t) in by_seed[i] else "" for o, i in columns]
        lines.append(f"| {t:g} | " + " | ".join(row) + " |")
    lines += ["", "## Best τ against τ = 1, per grid (gain: paired per training seed)", "",
              "| objective | grid | τ = 1 | best τ | at best τ | gain over τ = 1 |",
              "|---|---|---|---|---|---|"]
    for o, i in columns:
        cells = {t: seeds for (obj, t), seeds in by_seed[i].items() if obj == o}
        if 1.0 not in cells:
            continue
        best = best_tau(cells)
        gain = paired(cells[best], cells[1.0]) if best != 1.0 else "none: τ = 1 is best"
        lines.append(f"| {o.upper()} | {names[i]} | {fmt(cells[1.0])} | {best:g} | "
                     f"{fmt(cells[best])} | {gain} |")
    table = "\n".join(lines)
    if out_dir:
        stem = Path(out_dir) / ("compare" if eval_name == "eval" else f"compare-{eval_name}")
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".md").write_text(table + "\n")
        curves = {f"{o.upper()}, {names[i]}": [(t, statistics.fmean(v.values()),
                                                 statistics.stdev(v.values()) if len(v) > 1 else 0)
                                                for (obj, t), v in sorted(by_seed[i].items())
                                                if obj == o]
                  for o, i in columns}
        plots.compare_curves(curves, f"ROUGE-L ({eval_name})", stem.with_suffix(".png"))
    return table


def over_teachers(runs_dirs, names, eval_name="eval", out_dir=None):
    """Do the claims survive a new teacher? runs_dirs: one FKL/RKL grid per teacher (the same warm
    start and training seeds). Each teacher's best τ of FKL and of RKL is chosen on its own runs; the
    comparisons are paired per training seed, per teacher and pooled over teacher x seed (mean ± std,
    and how many pairs agree with the paper). Writes teachers.md to out_dir when given."""
    per_teacher, pooled = [], {}
    for i, runs_dir in enumerate(runs_dirs):
        by_seed = grid_by_seed(runs_dir, eval_name)
        best = {o: best_tau({t: seeds for (obj, t), seeds in by_seed.items() if obj == o})
                for o in ("fkl", "rkl") if (o, 1.0) in by_seed}
        if len(best) < 2:
            raise FileNotFoundError(f"{runs_dir}: no FKL and RKL runs at τ = 1")
        comparisons = {"RKL − FKL at τ = 1 (claim 1)": (by_seed[("rkl", 1.0)], by_seed[("fkl", 1.0)]),
                       "FKL at its best τ − RKL at its best τ (claim 2)": (by_seed[("fkl", best["fkl"])],
                                                                          by_seed[("rkl", best["rkl"])]),
                       "FKL: best τ − τ = 1": (by_seed[("fkl", best["fkl"])], by_seed[("fkl", 1.0)]),
                       "RKL: best τ − τ = 1": (by_seed[("rkl", best["rkl"])], by_seed[("rkl", 1.0)])}
        per_teacher.append((names[i], best, {k: paired(a, b) for k, (a, b) in comparisons.items()}))
        for k, (a, b) in comparisons.items():
            pooled.setdefault(k, ({}, {}))
            pooled[k][0].update({(i, seed): v for seed, v in a.items()})
            pooled[k][1].update({(i, seed): v for seed, v in b.items()})
    keys = list(pooled)
    lines = [f"## The claims over {len(runs_dirs)} teachers ({eval_name}; each teacher's best τ chosen on its own "
             "runs; paired per training seed)", "",
             "| teacher | best τ FKL | best τ RKL | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for name, best, diffs in per_teacher:
        lines.append(f"| {name} | {best['fkl']:g} | {best['rkl']:g} | " + " | ".join(diffs[k] for k in keys) + " |")
    lines.append("| pooled, teacher × seed | | | " + " | ".join(paired(*pooled[k]) for k in keys) + " |")
    table = "\n".join(lines).replace("seeds > 0", "pairs > 0")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "teachers.md").write_text(table + "\n")
    return table


def _grids_parser(command, description, writes):
    """The command line of a subcommand that reads several grids of runs."""
    parser = argparse.ArgumentParser(prog=f"evaluate.py {command}", description=description)
    parser.add_argument("runs_dirs", nargs="+")
    parser.add_argument("--names", help="one label per grid, comma-separated (default: the directories)")
    parser.add_argument("--eval-name", default="eval", help="e.g. eval-greedy")
    parser.add_argument("--out", help=f"where {writes} go")
    return parser


def _grid_names(args):
    """The grids' labels, after checking that every grid is a directory and each has one label."""
    for runs_dir in args.runs_dirs:
        if not os.path.isdir(runs_dir):
            checks.fail(f"{runs_dir}: no such directory of runs")
    names = args.names.split(",") if args.names else args.runs_dirs
    if len(names) != len(args.runs_dirs):
        checks.fail(f"--names gives {len(names)} labels for {len(args.runs_dirs)} grids")
    return names


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        parser = _grids_parser("compare", "several grids side by side, by tau", "compare.md and compare.png")
        parser.add_argument("--objectives", default="fkl,rkl")
        parser.add_argument("--taus", help="only these τ values, comma-separated (default: all)")
        args = parser.parse_args(argv[1:])
        names = _grid_names(args)
        objectives = args.objectives.split(",")
        if unknown := [o for o in objectives if o not in LOSSES]:
            checks.fail(f"--objectives: unknown objective {unknown[0]!r}")
        try:
            taus = {float(t) for t in args.taus.split(",")} if args.taus else None
        except ValueError:
            checks.fail(f"--taus: {args.taus!r} is not a comma-separated list of numbers")
        print(compare(args.runs_dirs, names, objectives, args.eval_name, args.out, taus))
        return
    if argv[:1] == ["teachers"]:
        parser = _grids_parser("teachers", "the claims over several teachers' FKL/RKL grids (one grid each)",
                               "teachers.md")
        args = parser.parse_args(argv[1:])
        print(over_teachers(args.runs_dirs, _grid_names(args), args.eval_name, args.out))
        return
    if argv[:1] == ["summarize"]:
        parser = argparse.ArgumentParser(prog="evaluate.py summarize",
                                         description="collect runs into tables")
        parser.add_argument("runs_dir")
        parser.add_argument("--out", default=None, help="where summary.md and the PNGs go (default: runs_dir)")
        parser.add_argument("--eval-name", default="eval",
                            help="read best/<eval-name>/results.json of every run")
        args = parser.parse_args(argv[1:])
        if not os.path.isdir(args.runs_dir):
            checks.fail(f"{args.runs_dir}: no such directory of runs")
        print(summarize(args.runs_dir, args.out, args.eval_name))
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, nargs="+",
                        help="checkpoint directories or hub ids, evaluated in turn")
    parser.add_argument("--tokenizer", default=None, help="default: the model's own vocab.json + merges.txt")
    parser.add_argument("--benchmarks", default="dolly,self-inst,vicuna,sinst,uinst")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-examples", type=int, default=None, help="score only the first N examples")
    parser.add_argument("--decode-temperature", type=float, default=1.0,
                        help="sampling temperature (the protocol's 1.0; 0 = greedy); unrelated to "
                             "the KD tau")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=None,
                        help="default: the protocol's 6 BPE tokens (24 bytes with the toy's byte tokenizer)")
    parser.add_argument("--max-new-tokens", type=int, default=PROTOCOL["max_new_tokens"])
    parser.add_argument("--data-dir", default=data.DATA_DIR)
    parser.add_argument("--out", default=None, help="default: <model>/<eval-name> (one --model only)")
    parser.add_argument("--eval-name", default="eval", help="e.g. eval-greedy next to the protocol's eval/")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if a GPU is visible, else cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    if args.out and len(args.model) > 1:
        parser.error("--out takes one --model; with several, results go to <model>/<eval-name>")
    outs = {name: args.out or (os.path.join(name, args.eval_name) if os.path.isdir(name)
                               else os.path.join(args.eval_name, name)) for name in args.model}
    for name in args.model:  # the door (checks.py): before any model loads
        checks.checkpoint("--model", name)
        checks.writable("--out" if args.out else "--model", outs[name])  # where its files go
    if args.tokenizer and not os.path.isdir(args.tokenizer) and checks.looks_local(args.tokenizer):
        checks.fail(f"--tokenizer {args.tokenizer}: no such directory")
    benchmarks = data.check_benchmarks("--benchmarks", args.benchmarks, args.data_dir)
    if not benchmarks:
        checks.fail("--benchmarks names no benchmark")
    seeds = checks.seeds("--seeds", args.seeds)
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--max-examples", args.max_examples, 1),
                             ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--no-repeat-ngram-size", args.no_repeat_ngram_size, 0)):
        checks.at_least(flag, value, low)
    checks.finite("--decode-temperature", args.decode_temperature, low=0)
    checks.device("--device", args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ngram = {}  # the protocol's default unless given
    if args.no_repeat_ngram_size is not None:
        ngram = {"no_repeat_ngram_size": args.no_repeat_ngram_size}
    with StopOnSignal(command=shlex.join(["python", "evaluate.py", *argv])) as stop:
        for name in args.model:
            model = GPT.from_pretrained(name, dtype=getattr(torch, args.dtype), device=device)
            tokenizer = data.load_tokenizer(args.tokenizer or name)
            results = evaluate(model, tokenizer, benchmarks, seeds, args.batch_size, outs[name], args.data_dir,
                               args.max_examples, stop, temperature=args.decode_temperature,
                               max_new_tokens=args.max_new_tokens, **ngram)
            print(f"{name}\n{results_table(results)}\npredictions and results.json in {outs[name]}")


if __name__ == "__main__":
    checks.run_cli(main)
