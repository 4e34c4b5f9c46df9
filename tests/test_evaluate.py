"""evaluate.py: ROUGE-L against hand-computed values, an end-to-end run on a tiny model, and
summarize."""
import json
from pathlib import Path

import pytest
import torch

import checks
import data
import evaluate
from model import GPT, GPTConfig


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": P = R = 5/6
    assert evaluate.rouge_l("the cat sat on the mat",
                            ["the cat is on the mat"]) == pytest.approx(100 * 5 / 6)
    # P = 2/2, R = 2/4 -> F = 2PR/(P+R) = 2/3
    assert evaluate.rouge_l("quick fox", ["the quick brown fox"]) == pytest.approx(100 * 2 / 3)
    assert evaluate.rouge_l("running dogs", ["run dog"]) == pytest.approx(100.0)  # Porter stemming
    # best reference
    assert evaluate.rouge_l("a b c", ["x y z", "a b z"]) == pytest.approx(100 * 2 / 3)
    assert evaluate.rouge_l("", ["anything here"]) == 0.0
    assert evaluate.score([{"output": ["a b"]}, {"output": ["c"]}],
                          ["a b", ""]) == pytest.approx(50.0)


def tiny_toy_model(directory):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, n_positions=512, n_layer=1, n_head=2, n_embd=16,
                          ffn_dim=32,
                          bos_token_id=256, eos_token_id=256, pad_token_id=256))
    model.save_pretrained(str(directory))
    data.byte_tokenizer().save_pretrained(str(directory))
    return model


def test_evaluate_end_to_end_on_the_toy_test_set(tmp_path, capsys):
    tiny_toy_model(tmp_path / "model")
    run = lambda seeds, out: evaluate.main(["--model", str(tmp_path / "model"), "--benchmarks",
                                            "toy,toy-hard",
                                            "--seeds", seeds, "--max-examples", "6",
                                            "--max-new-tokens", "12",
                                            "--batch-size", "4", "--out", str(tmp_path / out)])
    run("1,2", "a")
    printed = capsys.readouterr().out
    assert "| toy | " in printed and "| toy-hard | " in printed
    run("1", "b")
    def read(out, seed):
        path = tmp_path / out / f"predictions-toy-seed{seed}.jsonl"
        return [r["prediction"] for r in data.read_jsonl(str(path))]
    assert read("a", 1) == read("b", 1)  # same seed, same predictions
    assert read("a", 1) != read("a", 2)  # another seed, other predictions
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    toy = results["benchmarks"]["toy"]
    # the protocol's 6-token n-gram block, in bytes for the byte tokenizer
    assert toy["n"] == 6 and set(toy["scores"]) == {"1", "2"}
    assert results["decoding"]["no_repeat_ngram_size"] == 24
    assert toy["mean"] == pytest.approx(sum(toy["scores"].values()) / 2)


def test_summarize_builds_the_paper_tables(tmp_path):
    def fake_run(name, loss, tau, toy_scores, mode="kd"):
        run = tmp_path / name
        (run / "best" / "eval").mkdir(parents=True)
        (run / "args.json").write_text(json.dumps({"loss": loss, "tau": tau, "mode": mode}))
        (run / "best" / "eval" / "results.json").write_text(json.dumps(
            {"benchmarks": {"toy": {"scores": dict(enumerate(toy_scores)), "mean": 0, "std": 0,
                                    "n": 1}}}))
    fake_run("teacher", "fkl", 1.0, [50.0], mode="sft")
    fake_run("student-init", "fkl", 1.0, [10.0], mode="sft")  # another SFT run: a row of its own
    fake_run("fkl-1", "fkl", 1.0, [20.0, 22.0])
    fake_run("fkl-3", "fkl", 3.0, [30.0, 32.0])
    fake_run("fkl-3-seed2", "fkl", 3.0, [34.0, 36.0])  # a second training seed: run means 31 and 35
    fake_run("rkl-1", "rkl", 1.0, [25.0, 25.0])
    fake_run("rkl-3", "rkl", 3.0, [24.0, 24.0])
    table = evaluate.summarize(str(tmp_path))
    # one training run: the std over its sampling seeds; two: the std of the run means, sqrt(8) =
    # 2.83
    assert "| fkl | 21.00 ± 1.41 | 3 | 33.00 ± 2.83 | +12.00 |" in table
    assert "| rkl | 25.00 ± 0.00 | 1 | 25.00 ± 0.00 | +0.00 |" in table
    assert "| teacher | 50.00 ± 0.00 |" in table and "| student-init | 10.00 ± 0.00 |" in table
    assert "| fkl | 3 | 33.00 ± 2.83 | 33.00 ± 2.83 |" in table and "2 training seed(s)" in table
    assert (tmp_path / "summary.md").read_text().strip() == table.strip()
    assert (tmp_path / "heatmap.png").stat().st_size > 0
    assert (tmp_path / "tau_curves.png").stat().st_size > 0


def test_summarize_checks_the_claims_with_per_seed_paired_differences(tmp_path):
    scores = {("fkl", 1.0): [20, 22, 21], ("fkl", 2.0): [30, 26, 28], ("rkl", 1.0): [25, 23, 27],
              ("rkl", 2.0): [24, 24, 24]}
    for (loss, tau), per_seed in scores.items():
        for seed, value in enumerate(per_seed, 1):
            run = tmp_path / f"{loss}-tau{tau:g}-seed{seed}"
            (run / "best" / "eval").mkdir(parents=True)
            (run / "args.json").write_text(json.dumps({"loss": loss, "tau": tau, "mode": "kd",
                                                       "seed": seed}))
            (run / "best" / "eval" / "results.json").write_text(json.dumps(
                {"benchmarks": {"toy": {"scores": {"10": value - 1, "20": value + 1}, "mean": 0,
                                        "std": 0, "n": 1}}}))
    table = evaluate.summarize(str(tmp_path))
    # by hand: RKL - FKL at tau 1 = 5, 1, 6; FKL at tau 2 (its best) - RKL at tau 1 (its best) = 5,
    # 3, 1; FKL's gain 10, 4, 7; sample std of (5, 1, 6) = sqrt(7)
    assert "1. RKL > FKL at τ = 1: RKL − FKL = +4.00 ± 2.65 (3 of 3 seeds > 0)" in table
    assert ("2. FKL at its best τ (2) > RKL at its best τ (1): FKL − RKL = +3.00 ± 2.00 "
            "(3 of 3 seeds > 0)") in table
    assert "3. gain of the best τ over τ = 1: fkl +7.00 ± 3.00 (3 of 3 seeds > 0)\n" in table
    assert "4. best τ (paper: 2.5-3.5): fkl 2, rkl 1" in table


def fake_grid(root, scores):
    """Runs with args.json and best/eval/results.json only: {(loss, tau): [score per seed 1, 2, ...]}."""
    for (loss, tau), per_seed in scores.items():
        for seed, value in enumerate(per_seed, 1):
            run = root / f"{loss}-tau{tau:g}-seed{seed}"
            (run / "best" / "eval").mkdir(parents=True)
            (run / "args.json").write_text(json.dumps({"loss": loss, "tau": tau, "mode": "kd", "seed": seed}))
            (run / "best" / "eval" / "results.json").write_text(json.dumps(
                {"benchmarks": {"toy": {"scores": {"10": value - 1, "20": value + 1}, "mean": 0, "std": 0, "n": 1}}}))


def test_the_claims_over_teachers_pick_each_teachers_best_tau_and_pool_teacher_by_seed_pairs(tmp_path):
    fake_grid(tmp_path / "a", {("fkl", 1.0): [20, 22], ("fkl", 2.0): [30, 26], ("fkl", 3.0): [25, 25],
                               ("rkl", 1.0): [25, 23], ("rkl", 2.0): [24, 24]})
    fake_grid(tmp_path / "b", {("fkl", 1.0): [21, 21], ("fkl", 2.0): [22, 22], ("fkl", 3.0): [27, 25],
                               ("rkl", 1.0): [20, 26], ("rkl", 2.0): [26, 28]})
    table = evaluate.over_teachers([str(tmp_path / "a"), str(tmp_path / "b")], ["a", "b"], out_dir=tmp_path)
    # by hand: a: best tau FKL 2, RKL 1; claim 1 (RKL - FKL at 1) = 5, 1; claim 2 = 30-25, 26-23 = 5, 3
    #          b: best tau FKL 3, RKL 2; claim 1 = -1, 5; claim 2 = 27-26, 25-28 = 1, -3
    # pooled claim 1: 5, 1, -1, 5 -> mean 2.5, sample std 3.0, 3 of 4 > 0; claim 2: 5, 3, 1, -3 -> 1.5, 3.42, 3 of 4
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["a"].startswith("| a | 2 | 1 | +3.00 ± 2.83 (2 of 2 pairs > 0) | +4.00 ± 1.41 (2 of 2 pairs > 0)")
    assert rows["b"].startswith("| b | 3 | 2 | +2.00 ± 4.24 (1 of 2 pairs > 0) | -1.00 ± 2.83 (1 of 2 pairs > 0)")
    assert rows["pooled, teacher × seed"].startswith(
        "| pooled, teacher × seed | | | +2.50 ± 3.00 (3 of 4 pairs > 0) | +1.50 ± 3.42 (3 of 4 pairs > 0)")
    assert (tmp_path / "teachers.md").read_text().strip() == table


def test_compare_puts_grids_side_by_side_with_paired_gains(tmp_path):
    grids = {"off": {("fkl", 1.0): [20, 22, 21], ("fkl", 2.0): [30, 26, 28],
                     ("rkl", 1.0): [25, 23, 27]},
             "on": {("fkl", 1.0): [30, 31, 32], ("fkl", 2.0): [29, 30, 31],
                    ("rkl", 1.0): [20, 20, 20], ("rkl", 2.0): [21, 19, 23]}}
    for grid, scores in grids.items():
        for (loss, tau), per_seed in scores.items():
            for seed, value in enumerate(per_seed, 1):
                run = tmp_path / grid / f"{loss}-tau{tau:g}-seed{seed}"
                (run / "best" / "eval").mkdir(parents=True)
                (run / "args.json").write_text(json.dumps({"loss": loss, "tau": tau, "mode": "kd",
                                                           "seed": seed}))
                (run / "best" / "eval" / "results.json").write_text(json.dumps(
                    {"benchmarks": {"toy": {"scores": {"10": value - 2, "20": value + 2}}}}))
    table = evaluate.compare([str(tmp_path / "off"), str(tmp_path / "on")], ["λ=0", "λ=1"],
                             out_dir=str(tmp_path / "cmp"))
    # by hand: means and sample stds over the three seeds; an absent cell stays empty
    assert "| τ | FKL, λ=0 | FKL, λ=1 | RKL, λ=0 | RKL, λ=1 |" in table
    assert "| 1 | 21.00 ± 1.00 | 31.00 ± 1.00 | 25.00 ± 2.00 | 20.00 ± 0.00 |" in table
    assert "| 2 | 28.00 ± 2.00 | 30.00 ± 1.00 |  | 21.00 ± 2.00 |" in table
    # FKL off-policy gains 10, 4, 7 at its best tau 2; on-policy tau 1 is best; RKL on: +1, -1, +3
    assert ("| FKL | λ=0 | 21.00 ± 1.00 | 2 | 28.00 ± 2.00 | +7.00 ± 3.00 (3 of 3 seeds > 0) |"
            in table)
    assert "| FKL | λ=1 | 31.00 ± 1.00 | 1 | 31.00 ± 1.00 | none: τ = 1 is best |" in table
    assert ("| RKL | λ=1 | 20.00 ± 0.00 | 2 | 21.00 ± 2.00 | +1.00 ± 2.00 (2 of 3 seeds > 0) |"
            in table)
    assert (tmp_path / "cmp" / "compare.md").read_text().strip() == table.strip()
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="--names gives 1 labels for 2 grids"):
        checks.run_cli(lambda: evaluate.main(["compare", str(tmp_path / "off"),
                                              str(tmp_path / "on"), "--names", "x"]))
    with pytest.raises(SystemExit, match="--taus: '1,two' is not a comma-separated list"):
        checks.run_cli(lambda: evaluate.main(["compare", str(tmp_path / "off"), "--taus", "1,two"]))


def test_compare_restricts_tau_and_names_files_by_decoding(tmp_path):
    # one grid over tau 1, 2, 3 and a second decoding (eval-greedy) of the same runs
    for tau, (sampled, greedy) in {1.0: (20, 40), 2.0: (30, 35), 3.0: (34, 30)}.items():
        run = tmp_path / "grid" / f"fkl-tau{tau:g}-seed1"
        (run / "best").mkdir(parents=True)
        (run / "args.json").write_text(json.dumps({"loss": "fkl", "tau": tau, "seed": 1}))
        for eval_name, value in (("eval", sampled), ("eval-greedy", greedy)):
            (run / "best" / eval_name).mkdir()
            (run / "best" / eval_name / "results.json").write_text(json.dumps(
                {"benchmarks": {"toy": {"scores": {"10": value}}}}))
    out = tmp_path / "cmp"
    # without tau 3 the best tau is 2 (+10 over tau 1), with it 3 (+14)
    table = evaluate.compare([str(tmp_path / "grid")], ["g"], ("fkl",), out_dir=str(out),
                             taus={1.0, 2.0})
    assert "| 3 |" not in table
    assert ("| FKL | g | 20.00 (1 seed) | 2 | 30.00 (1 seed) | +10.00 ± 0.00 (1 of 1 seeds > 0) |"
            in table)
    greedy = evaluate.compare([str(tmp_path / "grid")], ["g"], ("fkl",), "eval-greedy", str(out))
    assert "| FKL | g | 40.00 (1 seed) | 1 | 40.00 (1 seed) | none: τ = 1 is best |" in greedy
    # the greedy table sits beside the sampled one instead of overwriting it
    assert (out / "compare.md").read_text().strip() == table.strip()
    assert (out / "compare-eval-greedy.md").read_text().strip() == greedy.strip()
    assert (out / "compare-eval-greedy.png").stat().st_size > 0


def test_protocol_ngram_block_is_six_bpe_tokens(tmp_path):
    from test_data import write_bpe
    assert evaluate.protocol_ngram_size(data.byte_tokenizer()) == 24
    # as saved next to a toy checkpoint
    data.byte_tokenizer().save_pretrained(str(tmp_path / "bytes"))
    assert evaluate.protocol_ngram_size(data.load_tokenizer(str(tmp_path / "bytes"))) == 24
    write_bpe(tmp_path / "bpe")  # a BPE with merges counts in its own tokens
    assert evaluate.protocol_ngram_size(data.load_tokenizer(str(tmp_path / "bpe"))) == 6


def test_several_models_with_a_second_decoding_setting_and_its_summary(tmp_path):
    """Greedy decoding (METHOD.md section 5: reported next to sampling) of two runs into
    best/eval-greedy/, summarized on its own; greedy output cannot depend on the sampling seed."""
    runs = tmp_path / "runs"
    for name, loss in (("fkl-tau1", "fkl"), ("rkl-tau1", "rkl")):
        tiny_toy_model(runs / name / "best")
        (runs / name / "args.json").write_text(json.dumps({"loss": loss, "tau": 1.0, "mode": "kd"}))
    models = [str(runs / name / "best") for name in ("fkl-tau1", "rkl-tau1")]
    common = ["--benchmarks", "toy", "--seeds", "1,2", "--max-examples", "4", "--max-new-tokens",
              "8"]
    evaluate.main(["--model", *models, *common, "--decode-temperature", "0", "--eval-name",
                   "eval-greedy"])
    for model in models:
        results = json.loads((Path(model) / "eval-greedy" / "results.json").read_text())
        assert results["decoding"]["temperature"] == 0
        def read(seed):
            path = f"{model}/eval-greedy/predictions-toy-seed{seed}.jsonl"
            return [r["prediction"] for r in data.read_jsonl(path)]
        assert read(1) == read(2)
    assert not (Path(models[0]) / "eval").exists()
    table = evaluate.summarize(str(runs), str(tmp_path / "greedy"), eval_name="eval-greedy")
    assert "| fkl | 1 |" in table and "| rkl | 1 |" in table
    assert (tmp_path / "greedy" / "summary.md").is_file()
    with pytest.raises(FileNotFoundError, match="best/eval/results.json"):
        evaluate.summarize(str(runs))  # the protocol's eval/ was never written
    with pytest.raises(SystemExit):
        evaluate.main(["--model", *models, *common, "--out", str(tmp_path / "x")])
