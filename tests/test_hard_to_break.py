"""Hard to break, part two (#21): runs that share a response cache, a toy stage or an --out; a signal
in every long stage (teacher responses, training, validation, evaluation; a second signal); nothing
chosen on nothing; output ids beyond the tokenizer; the error as the last thing on screen; shared
files readable by others."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

import checks
import config
import data
import evaluate
import files
import responses
import train
from conftest import ROOT
from model import GPT, GPTConfig
from test_evaluate import tiny_toy_model
from test_train import weights

# A tiny KD run on the teacher's responses (one chunk of 64 prompts), one step
KD = ["--preset", "toy", "--student", "toy-tiny", "--loss", "fkl", "--tau", "2", "--data", "toy", "--batch-size", "8",
      "--epochs", "1", "--max-steps", "1", "--valid-examples", "2", "--valid-max-new-tokens", "4",
      "--eval-benchmarks", "", "--train-examples", "64"]


def start(argv, cwd, log):
    """train.py in a process of its own, its output into `log`."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=cwd,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def wait_for(condition, seconds=120):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


# --- Runs that share files ------------------------------------------------------------------------

def test_two_runs_racing_on_one_response_cache_make_one_file_and_both_train_on_it(tmp_path):
    teacher = tmp_path / "teacher"
    tiny_toy_model(teacher)
    common = [*KD, "--teacher", str(teacher), "--data-dir", str(tmp_path / "data")]
    where = responses.cache_dir(str(tmp_path / "data"), "toy", responses.fingerprint(str(teacher)))
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    # both start while the cache's lock is held (as by a third run making it): both wait, then race
    with files.locked(where / ".lock"):
        runs = [start([*common, "--out", str(tmp_path / name)], tmp_path, log) for name, log in zip("ab", logs)]
        wait_for(lambda: all("waiting: another process is making" in log.read_text() for log in logs))
        assert not (where / "train.jsonl").exists()
    assert [run.wait(timeout=300) for run in runs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    made = (where / "train.jsonl").read_bytes()
    responses.main(["--teacher", str(teacher), "--benchmark", "toy", "--limit", "64", "--data-dir",
                    str(tmp_path / "fresh")])  # the same responses made alone
    fresh = responses.cache_dir(str(tmp_path / "fresh"), "toy", responses.fingerprint(str(teacher)))
    assert made == (fresh / "train.jsonl").read_bytes() and made.count(b"\n") == 64
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)  # both trained, on the same file


def test_a_busy_out_is_refused_in_one_line_and_freed_when_its_holder_dies(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    tiny_toy_model(teacher)
    run = [*KD, "--teacher", str(teacher), "--responses", "dataset", "--out", str(tmp_path / "run")]
    with files.locked(tmp_path / "run" / ".lock"):  # what a running train.py holds
        with pytest.raises(SystemExit) as stop:
            checks.run_cli(lambda: train.main(run))
        assert stop.value.code == checks.BUSY
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --out") and "is in use" in err and "\n" not in err
        # the same from another process, whose claim is the kernel's too
        refused = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *run], capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode == checks.BUSY and "is in use" in refused.stderr
    # kill -9 of a run before its first last.pt: the kernel frees its claim, and a fresh run starts a fresh log
    long = [*run[:run.index("--max-steps")], *run[run.index("--max-steps") + 2:], "--train-examples", "4000",
            "--log-every", "1", "--out", str(tmp_path / "killed")]  # 500 steps before the first last.pt
    killed = start(long, tmp_path, tmp_path / "killed.log")
    wait_for(lambda: (tmp_path / "killed/log.jsonl").is_file() and (tmp_path / "killed/log.jsonl").read_text())
    killed.kill()
    killed.wait()
    assert not (tmp_path / "killed/last.pt").exists()
    train.main([*run[:-1], str(tmp_path / "killed")])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "killed/log.jsonl") if '"loss"' in line]
    assert steps == [1]


def test_two_toy_main_commands_at_once_make_each_stage_once(tmp_path):
    """The toy stages (a tiny teacher and warm start here) are made by one process; the other waits,
    then uses them."""
    small = ["--valid-examples", "2", "--valid-max-new-tokens", "4"]
    stages = {"teacher": ["--mode", "sft", "--student", "toy-tiny", "--lr", "1e-2", "--epochs", "4", "--batch-size",
                          "8", "--train-examples", "16", "--log-every", "1", *small],
              "student-init": ["--mode", "sft", "--student", "toy-tiny", "--epochs", "1", "--batch-size", "16",
                               "--train-examples", "32", *small]}
    code = ("import sys, toy, train; toy.STAGES = " + repr(stages) + "; train.main(sys.argv[1:])")
    argv = ["--preset", "toy", "--loss", "fkl", "--tau", "3", "--batch-size", "16", "--valid-examples", "2",
            "--valid-max-new-tokens", "4", "--train-examples", "64", "--eval-benchmarks", ""]
    runs = [subprocess.Popen([sys.executable, "-c", code, *argv, "--out", f"runs/toy/{name}"], cwd=tmp_path,
                             stdout=open(tmp_path / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                             env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")) for name in "ab"]
    assert [run.wait(timeout=300) for run in runs] == [0, 0], (tmp_path / "a.log").read_text()[-2000:]
    steps = [json.loads(line)["step"] for line in open(tmp_path / "runs/toy/teacher/log.jsonl") if '"loss"' in line]
    assert steps == list(range(1, 9))  # made once: 4 epochs of 2 steps, each logged once
    assert (tmp_path / "runs/toy/a/finished.json").is_file() and (tmp_path / "runs/toy/b/finished.json").is_file()


# --- A signal in every long stage -----------------------------------------------------------------

def signal_on(module, name, signum, call=1, times=1):
    """Wrap module.name so that its call-th call sends `signum` to this process (`times` times) first."""
    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return real(*args, **kwargs)
    return wrapped


def test_a_signal_while_the_teacher_answers_keeps_the_chunks_made_and_the_same_command_continues(
        tmp_path, monkeypatch, capsys):
    teacher = tmp_path / "teacher"
    tiny_toy_model(teacher)
    make = ["--teacher", str(teacher), "--benchmark", "toy", "--limit", "128"]
    responses.main([*make, "--data-dir", str(tmp_path / "straight")])
    with monkeypatch.context() as m:
        m.setattr(responses, "answer_chunk", signal_on(responses, "answer_chunk", signal.SIGTERM))
        with pytest.raises(SystemExit) as stop:
            responses.main([*make, "--data-dir", str(tmp_path / "cut")])
    assert stop.value.code == 143
    err = capsys.readouterr().err
    assert "responses to 64 prompts" in err and "Continue with:\n  python responses.py --teacher" in err
    responses.main([*make, "--data-dir", str(tmp_path / "cut")])
    fingerprint = responses.fingerprint(str(teacher))
    straight, cut = (responses.cache_dir(str(tmp_path / d), "toy", fingerprint) / "train.jsonl" for d in ("straight", "cut"))
    assert cut.read_bytes() == straight.read_bytes() and straight.read_bytes().count(b"\n") == 128


def test_a_signal_during_the_last_validation_saves_stops_and_the_resume_finishes_the_run(tmp_path, monkeypatch,
                                                                                       capsys):
    teacher = tmp_path / "teacher"
    tiny_toy_model(teacher)
    run = [*KD, "--teacher", str(teacher), "--responses", "dataset", "--max-steps", "3"]
    train.main([*run, "--out", str(tmp_path / "straight")])
    with monkeypatch.context() as m:
        m.setattr(evaluate, "validation_score", signal_on(evaluate, "validation_score", signal.SIGTERM))
        with pytest.raises(SystemExit) as stop:
            train.main([*run, "--out", str(tmp_path / "cut")])
    assert stop.value.code == 143 and "--resume" in capsys.readouterr().err
    assert (tmp_path / "cut/best").is_dir() and not (tmp_path / "cut/finished.json").exists()
    assert torch.load(tmp_path / "cut/last.pt", weights_only=True)["state"]["step"] == 3
    train.main([*run, "--out", str(tmp_path / "cut"), "--resume"])  # after the last step: finish only
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "cut")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert (tmp_path / "cut/best/model.safetensors").read_bytes() == (tmp_path / "straight/best/model.safetensors").read_bytes()


def test_a_second_signal_stops_at_once_but_never_tears_a_save(tmp_path, monkeypatch):
    teacher = tmp_path / "teacher"
    tiny_toy_model(teacher)
    run = [*KD, "--teacher", str(teacher), "--responses", "dataset", "--max-steps", "6", "--save-every", "2"]
    # the second signal arrives while last.pt is being written: the write ends, then the run stops
    real_save = torch.save

    def save_with_a_signal(obj, path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(obj, path, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(torch, "save", save_with_a_signal)
        with pytest.raises(SystemExit) as stop:
            train.main([*run, "--out", str(tmp_path / "saving")])
    assert stop.value.code == 143
    assert torch.load(tmp_path / "saving/last.pt", weights_only=True)["state"]["step"] == 2
    # two signals during a step: it stops at once, without the step and without touching last.pt
    with monkeypatch.context() as m:
        m.setattr(train, "train_step", signal_on(train, "train_step", signal.SIGINT, call=4, times=2))
        with pytest.raises(SystemExit) as stop:
            train.main([*run, "--out", str(tmp_path / "step")])
    assert stop.value.code == 130
    assert torch.load(tmp_path / "step/last.pt", weights_only=True)["state"]["step"] == 2


def test_a_signal_during_evaluation_keeps_each_finished_benchmark_and_seed(tmp_path, monkeypatch, capsys):
    tiny_toy_model(tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--benchmarks", "toy,toy-hard", "--seeds", "10,20",
            "--max-examples", "4", "--max-new-tokens", "8"]
    evaluate.main([*args, "--out", str(tmp_path / "straight")])
    with monkeypatch.context() as m:
        m.setattr(evaluate, "generate_responses", signal_on(evaluate, "generate_responses", signal.SIGTERM, call=2))
        with pytest.raises(SystemExit) as stop:
            evaluate.main([*args, "--out", str(tmp_path / "cut")])
    assert stop.value.code == 143 and "keeps 2 of 4 benchmark x seed scores" in capsys.readouterr().err
    assert not (tmp_path / "cut/results.json").exists()
    calls = []
    with monkeypatch.context() as m:  # the same command continues: the two finished units are not redone
        real = evaluate.generate_responses
        m.setattr(evaluate, "generate_responses", lambda *a, **k: calls.append(1) or real(*a, **k))
        evaluate.main([*args, "--out", str(tmp_path / "cut")])
    assert len(calls) == 2
    straight, cut = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("straight", "cut"))
    assert cut == straight and not (tmp_path / "cut/progress.json").exists()


# --- Nothing chosen on nothing --------------------------------------------------------------------

def test_a_run_whose_model_is_no_longer_finite_saves_no_best_and_does_not_finish(tmp_path):
    teacher = tmp_path / "teacher"
    tiny_toy_model(teacher)
    with pytest.raises(SystemExit, match="weights or outputs are not finite"):
        train.main([*KD, "--teacher", str(teacher), "--responses", "dataset", "--lr", "1e30",
                    "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run/best").exists() and not (tmp_path / "run/finished.json").exists()


def test_no_responses_are_cached_for_prompts_cut_to_nothing(tmp_path):
    teacher = tmp_path / "teacher"
    tiny_toy_model(teacher)
    with pytest.raises(SystemExit, match="--max-prompt-len 8 cannot hold any training prompt"):
        responses.main(["--teacher", str(teacher), "--benchmark", "toy", "--limit", "64", "--max-prompt-len", "8",
                        "--data-dir", str(tmp_path / "data")])
    assert not list((tmp_path / "data").rglob("train.jsonl"))


def test_output_ids_without_a_token_are_never_sampled_nor_decoded(tmp_path):
    """An embedding wider than its tokenizer (OPT, Qwen): the extra rows are padding. Here they are
    made the likeliest outputs, yet sampling never emits them, and decoding drops any it is given."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, n_positions=512, n_layer=1, n_head=2, n_embd=16, ffn_dim=32,
                          bos_token_id=256, eos_token_id=256, pad_token_id=256))
    with torch.no_grad():  # every position's output is ln_f's bias, and the padding rows point along it
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
        model.tok_emb.weight[257:] = 1.0  # logit 16 there, ~0 elsewhere
    tokenizer = data.byte_tokenizer()
    records = data.load_split("toy", "test")[:6]
    unmasked = model.generate(*data.collate_prompts([tokenizer.encode(r["prompt"]) for r in records], 256),
                              max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    assert bool((unmasked >= 257).any())  # without the mask they would be sampled
    samples = evaluate.sample(model, tokenizer, records, seed=0, max_new_tokens=8, progress=False)
    assert all(t < 257 for tokens, _ in samples for t in tokens)
    assert tokenizer.decode([104, 105, 290, 299]) == "hi"


# --- What the user sees, and what others can read -------------------------------------------------

def test_an_error_under_a_live_progress_bar_is_the_last_line_on_screen(capsys):
    from tqdm import tqdm
    bars = []

    def failing():
        bars.append(tqdm(total=10, desc="working"))
        bars[0].update(3)
        raise ValueError("data.jsonl, line 3: broken")
    with pytest.raises(SystemExit):
        checks.run_cli(failing)
    err = capsys.readouterr().err
    assert err.endswith("\nerror: data.jsonl, line 3: broken\n"), err[-200:]
    bars[0].close()  # closed already: draws nothing more
    assert capsys.readouterr().err == ""


def test_files_follow_the_umask_and_another_prompt_limit_gets_its_own_cache(tmp_path):
    teacher = tmp_path / "teacher"
    tiny_toy_model(teacher)
    previous = os.umask(0o022)
    try:
        common = [*KD, "--teacher", str(teacher), "--data-dir", str(tmp_path / "data")]
        train.main([*common, "--out", str(tmp_path / "a")])
        train.main([*common, "--max-prompt-len", "200", "--out", str(tmp_path / "b")])  # not refused
    finally:
        os.umask(previous)
    for path in ("a/best/model.safetensors", "a/best/config.json", "a/last.pt"):
        assert stat.S_IMODE((tmp_path / path).stat().st_mode) == 0o644, path
    caches = sorted(p.parent.name for p in (tmp_path / "data").rglob("train.jsonl"))
    assert len(caches) == 2 and caches[1] == caches[0] + "-prompt200"


def test_resume_drops_a_torn_last_log_line_and_names_a_broken_one(tmp_path):
    teacher = tmp_path / "teacher"
    tiny_toy_model(teacher)
    run = [*KD, "--teacher", str(teacher), "--responses", "dataset", "--log-every", "1", "--out", str(tmp_path / "r")]
    train.main([*run[:run.index("--max-steps") + 1], "2", *run[run.index("--max-steps") + 2:]])
    log = tmp_path / "r/log.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "lo')  # a kill in mid-write
    train.main([*run[:run.index("--max-steps") + 1], "4", *run[run.index("--max-steps") + 2:], "--resume"])
    steps = [json.loads(line)["step"] for line in open(log) if '"loss"' in line]
    assert steps == [1, 2, 3, 4]
    log.write_text("not json\n" + log.read_text())
    with pytest.raises(ValueError, match=r"r/log.jsonl, line 1: not a JSON log line"):
        train.main([*run[:run.index("--max-steps") + 1], "5", *run[run.index("--max-steps") + 2:], "--resume"])


def test_summarize_a_directory_with_only_the_teachers_run(tmp_path):
    run = tmp_path / "runs/teacher"
    (run / "best/eval").mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"mode": "sft"}))
    (run / "best/eval/results.json").write_text(json.dumps(
        {"benchmarks": {"toy": {"scores": {"10": 60.0, "20": 62.0}, "mean": 61.0, "std": 1.4, "n": 4}}}))
    table = evaluate.summarize(str(tmp_path / "runs"))
    assert "| teacher | 61.00" in table and (tmp_path / "runs/summary.md").is_file()


def test_the_door_checks_the_batch_against_the_processes_before_dividing(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="--batch-size 1 must be a multiple of the 2 processes"):
        config.parse_args(["--preset", "toy", "--student", "toy-tiny", "--teacher", "toy-tiny", "--responses",
                           "dataset", "--batch-size", "1"])


def test_evaluate_and_responses_refuse_a_device_they_cannot_use_and_check_where_they_write(tmp_path, monkeypatch):
    tiny_toy_model(tmp_path / "model")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda, but no GPU is visible"):
        evaluate.main(["--model", str(tmp_path / "model"), "--benchmarks", "toy", "--device", "cuda"])
    with pytest.raises(SystemExit, match="--device cuda, but no GPU is visible"):
        responses.main(["--teacher", str(tmp_path / "model"), "--benchmark", "toy", "--device", "cuda"])
    asked = []
    monkeypatch.setattr(checks, "writable", lambda flag, path: asked.append(path) or checks.fail("stop here"))
    for main, argv in ((evaluate.main, ["--model", str(tmp_path / "model"), "--benchmarks", "toy"]),
                       (responses.main, ["--teacher", str(tmp_path / "model"), "--benchmark", "toy",
                                         "--data-dir", str(tmp_path / "data")])):
        with pytest.raises(SystemExit, match="stop here"):
            main(argv)
    assert asked == [str(tmp_path / "model" / "eval"), str(tmp_path / "data" / "responses" / "toy")]


def test_sweep_skips_a_cell_another_process_is_training(tmp_path):
    """train.py exits with checks.BUSY for a cell another sweep holds; sweep.sh says so and goes on."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/bash\nif [ \"$1\" = - ]; then exec {sys.executable} \"$@\"; fi\n"
                    f"echo \"$@\" >> {tmp_path}/calls\n"
                    "case \"$1\" in */train.py) [[ \"$*\" == *tau2-* ]] && exit 75; exit 0 ;; esac\n")
    fake.chmod(0o755)
    env = {**os.environ, "PRESET": "toy", "LOSSES": "fkl", "TAUS": "1 2", "SEEDS": "1", "PYTHON": str(fake),
           "RUNS": str(tmp_path / "runs")}
    result = subprocess.run(["bash", os.path.join(ROOT, "sweep.sh")], env=env, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "fkl-tau2-seed1 is busy: another process is training it, skipped" in result.stdout
    evaluated = [line for line in (tmp_path / "calls").read_text().splitlines() if "evaluate.py --model" in line]
    assert any("fkl-tau1-seed1/best" in line for line in evaluated)
    assert not any("fkl-tau2-seed1" in line for line in evaluated)


def test_sweep_compares_tau_as_a_number(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PRESET": "toy", "RUNS": str(tmp_path / "runs"), "TAUS": "1.0 2.0",
           "LOSSES": "fkl ab drkl", "SEEDS": "1"}
    result = subprocess.run(["bash", os.path.join(ROOT, "sweep.sh")], env=env, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cells = {line.split("--out ")[1].split()[0].rsplit("/", 1)[1] for line in result.stdout.splitlines()
             if "train.py" in line}
    assert cells == {"fkl-tau1.0-seed1", "fkl-tau2.0-seed1", "ab-tau1.0-seed1", "drkl-tau1.0-seed1"}
