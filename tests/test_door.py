"""The door: bad input to any entry point stops before any work with one line naming the flag or
file (exit status non-zero, no traceback); a run never ends in silent nonsense; SIGTERM / Ctrl-C
leave a checkpoint that resumes exactly."""
import json
import os
import signal
import subprocess

import pytest
import torch

import analysis
import checks
import data
import evaluate
import responses
import train
from conftest import ROOT
from test_evaluate import tiny_toy_model
from model import GPT, GPTConfig
from test_train import weights


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Checkpoints and files the bad inputs refer to."""
    root = tmp_path_factory.mktemp("door")
    tiny_toy_model(root / "teacher")
    from test_data import write_bpe
    write_bpe(root / "bpe-teacher")  # another tokenizer
    tiny_toy_model(root / "bpe-teacher-model")
    for f in ("vocab.json", "merges.txt"):
        (root / "bpe-teacher-model" / f).write_bytes((root / "bpe-teacher" / f).read_bytes())
    (root / "bad-config").mkdir()
    (root / "bad-config/config.json").write_text("{not json")
    (root / "no-weights").mkdir()
    (root / "no-weights/config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (root / "no-config").mkdir()
    tiny_toy_model(root / "truncated")  # a download cut short: the weights file ends early
    weights_file = root / "truncated" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-100])
    (root / "a-file").write_text("")
    lines = {"null-output": '{"instruction": "a", "output": ["x"]}\n{"instruction": "b", "output": null}\n',
             "list-line": '{"instruction": "a", "output": "x"}\n[1, 2]\n',
             "empty-output": '{"instruction": "a", "output": ""}\n',
             "bad-json": '{"instruction": "a", "output": "x"}\n{"instruction": \n'}
    for name, text in lines.items():
        (root / f"{name}.jsonl").write_text(text)
    latin1 = '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1")
    (root / "latin1.jsonl").write_bytes(latin1)
    (root / "empty.jsonl").write_text("\n")
    for name, config in (("list-config", [1, 2]), ("llama-config", {"model_type": "mistral"}),
                         ("string-size", {"model_type": "gpt2", "vocab_size": 257, "n_positions": 512,
                                          "n_layer": "two", "n_head": 2, "n_embd": 16})):
        tiny_toy_model(root / name)
        (root / name / "config.json").write_text(json.dumps(config))
    wide = GPT(GPTConfig(vocab_size=300, n_positions=512, n_layer=1, n_head=2, n_embd=16, ffn_dim=32,
                         bos_token_id=256, eos_token_id=256, pad_token_id=256))
    wide.save_pretrained(str(root / "wide"))
    data.byte_tokenizer().save_pretrained(str(root / "wide"))  # one tokenizer, a wider embedding
    (root / "resume/").mkdir()
    (root / "resume/last.pt").write_bytes(b"not a checkpoint")
    return root


def train_argv(world, *extra):
    return ["--preset", "toy", "--teacher", str(world / "teacher"), "--student", "toy-tiny", "--loss", "fkl",
            "--responses", "dataset", "--out", str(world / "never"), *extra]


def toy_eval(world):
    return ["--model", str(world / "teacher"), "--benchmarks", "toy"]


# (entry point, argv builder, what the one line must name)
CASES = [
    ("train", lambda w: train_argv(w, "--epochs", "0"), "--epochs must be >= 1"),
    ("train", lambda w: train_argv(w, "--batch-size", "-4"), "--batch-size must be >= 1"),
    ("train", lambda w: train_argv(w, "--batch-size", "10", "--micro-batch-size", "4"),
     "must be a multiple"),
    ("train", lambda w: train_argv(w, "--lr", "inf"), "--lr must be a finite number >= 0"),
    ("train", lambda w: train_argv(w, "--lr=-1e-3"), "--lr must be a finite number >= 0"),
    ("train", lambda w: train_argv(w, "--min-lr", "nan"), "--min-lr must be a finite number"),
    ("train", lambda w: train_argv(w, "--weight-decay", "-0.1"), "--weight-decay must be"),
    ("train", lambda w: train_argv(w, "--log-every", "0"), "--log-every must be >= 1"),
    ("train", lambda w: train_argv(w, "--train-examples", "0"), "--train-examples must be >= 1"),
    ("train", lambda w: train_argv(w, "--valid-examples", "0"), "--valid-examples must be >= 1"),
    ("train", lambda w: train_argv(w, "--max-steps", "0"), "--max-steps must be >= 1"),
    ("train", lambda w: train_argv(w, "--max-len", "600"),
     "--max-len 600 exceeds --student toy-tiny's 512"),
    ("train", lambda w: train_argv(w, "--max-prompt-len", "300", "--max-len", "300"),
     "must exceed --max-prompt-len"),
    ("train", lambda w: train_argv(w, "--tau", "0"), "tau must be a finite number > 0"),
    ("train", lambda w: train_argv(w, "--tau", "nan"), "tau must be a finite number > 0"),
    ("train", lambda w: train_argv(w, "--tau", "-2"), "tau must be a finite number > 0"),
    ("train", lambda w: train_argv(w, "--loss", "kl"), "unknown loss 'kl'"),
    ("train", lambda w: train_argv(w, "--loss", "sfkl", "--alpha", "1.5"),
     "sfkl: alpha must be in [0, 1)"),
    ("train", lambda w: train_argv(w, "--loss", "drkl", "--gamma", "-1"),
     "drkl: gamma must be in (0, inf)"),
    ("train", lambda w: train_argv(w, "--loss", "ab", "--alpha", "nan"),
     "ab: alpha must be in (-inf, inf)"),
    ("train", lambda w: train_argv(w, "--alpha", "0.3"), "fkl has no hyper-parameter 'alpha'"),
    ("train", lambda w: train_argv(w, "--kd-ratio", "1.5"),
     "--kd-ratio must be a finite number in [0, 1]"),
    ("train", lambda w: train_argv(w, "--mode", "sft", "--beta", "0.2"),
     "--beta is a KD hyper-parameter"),
    ("train", lambda w: train_argv(w, "--teacher", "runs/nope/best"),
     "--teacher runs/nope/best: no such directory"),
    ("train", lambda w: train_argv(w, "--teacher", "./typo"),
     "--teacher ./typo: no such directory"),
    ("train", lambda w: train_argv(w, "--teacher", str(w / "bad-config")),
     "config.json is not valid JSON"),
    ("train", lambda w: train_argv(w, "--teacher", str(w / "no-weights")), "no weights file"),
    ("train", lambda w: train_argv(w, "--teacher", str(w / "no-config")), "no config.json"),
    ("train", lambda w: train_argv(w, "--student", "scratch:4xq"), "scratch:<layers>x<width>"),
    ("train", lambda w: train_argv(w, "--teacher", str(w / "truncated")),
     "model.safetensors is not a readable"),
    ("train", lambda w: train_argv(w, "--data", "dolly2"), "--data: unknown benchmark 'dolly2'"),
    ("train", lambda w: train_argv(w, "--data", str(w / "missing.jsonl")),
     "missing.jsonl: no such file"),
    ("train", lambda w: train_argv(w, "--valid-data", "dolly"), "dolly/valid.jsonl is missing"),
    ("train", lambda w: train_argv(w, "--eval-benchmarks", "toy,nope"), "unknown benchmark 'nope'"),
    ("train", lambda w: train_argv(w, "--eval-seeds", "10,10"), "--eval-seeds repeats a seed"),
    ("train", lambda w: train_argv(w, "--eval-seeds", "10,x"),
     "--eval-seeds must be comma-separated integers"),
    ("train", lambda w: train_argv(w, "--out", str(w / "a-file" / "run")), "cannot write there"),
    ("train", lambda w: train_argv(w, "--teacher", str(w / "bpe-teacher-model"), "--student", str(w / "teacher")),
     "incompatible vocabularies"),
    ("train", lambda w: train_argv(w, "--teacher", str(w / "bpe-teacher-model")),  # toy-tiny takes its tokenizer
     "has 257 output ids, fewer than its tokenizer's 438"),
    ("train", lambda w: train_argv(w, "--resume"), "--resume, but"),
    ("train", lambda w: train_argv(w, "--resume", "--out", str(w / "resume")),
     "is not a readable checkpoint"),
    ("train",
     lambda w: train_argv(w, "--data", str(w / "null-output.jsonl"), "--valid-data", "toy"),
     "null-output.jsonl, line 2: output must be a non-empty string"),
    ("train", lambda w: train_argv(w, "--data", str(w / "list-line.jsonl"), "--valid-data", "toy"),
     "list-line.jsonl, line 2: a record must be a JSON object"),
    ("train",
     lambda w: train_argv(w, "--data", str(w / "empty-output.jsonl"), "--valid-data", "toy"),
     "empty-output.jsonl, line 1: output must be a non-empty string"),
    ("train", lambda w: train_argv(w, "--data", str(w / "bad-json.jsonl"), "--valid-data", "toy"),
     "bad-json.jsonl, line 2: malformed json"),
    ("train", lambda w: train_argv(w, "--data", str(w / "latin1.jsonl"), "--valid-data", "toy"),
     "latin1.jsonl, line 1 is not UTF-8"),
    ("train", lambda w: train_argv(w, "--fsdp"), "--fsdp shards the student over torchrun's processes"),
    ("train", lambda w: train_argv(w, "--valid-data", "toy-hard"), "toy-hard is a test set"),
    ("train", lambda w: train_argv(w, "--max-prompt-len", "10"), "--max-prompt-len 10 cannot hold any prompt"),
    ("train", lambda w: train_argv(w, "--data", str(w / "empty.jsonl"), "--valid-data", "toy"),
     "empty.jsonl: the file holds no records"),
    ("train", lambda w: train_argv(w, "--teacher", str(w / "list-config")), "config.json holds a JSON list"),
    ("train", lambda w: train_argv(w, "--teacher", str(w / "llama-config")),
     "llama-config: config.json has model_type 'mistral': tempkd loads"),
    ("evaluate", lambda w: ["--model", str(w / "string-size"), "--benchmarks", "toy"],
     "string-size: config.json n_layer must be a whole number >= 1, got 'two'"),
    ("evaluate", lambda w: [*toy_eval(w)[:-1], str(w / "empty.jsonl")], "empty.jsonl: the file holds no records"),
    ("evaluate", lambda w: ["--model", str(w / "list-config"), "--benchmarks", "toy"], "holds a JSON list"),
    ("analysis", lambda w: ["--teacher", str(w / "wide"), "--student", str(w / "teacher")],
     "--teacher has 300 output ids, --student 257"),
    ("evaluate", lambda w: [*toy_eval(w), "--decode-temperature", "-1"], "--decode-temperature"),
    ("evaluate", lambda w: [*toy_eval(w), "--seeds", "1,1"], "--seeds repeats a seed"),
    ("evaluate", lambda w: ["--model", str(w / "teacher"), "--benchmarks", "nope"],
     "unknown benchmark 'nope'"),
    ("evaluate", lambda w: ["--model", str(w / "teacher"), "--benchmarks", "dolly"],
     "run `python data.py prepare`"),
    ("evaluate", lambda w: ["--model", "./missing"], "--model ./missing: no such directory"),
    ("evaluate", lambda w: ["--model", str(w / "truncated"), "--benchmarks", "toy"],
     "is not a readable safetensors"),
    ("evaluate", lambda w: [*toy_eval(w), "--max-new-tokens", "0"],
     "--max-new-tokens must be >= 1"),
    ("evaluate", lambda w: [*toy_eval(w), "--batch-size", "0"], "--batch-size must be >= 1"),
    ("evaluate", lambda w: ["summarize", str(w / "no-runs")], "no such directory of runs"),
    ("data", lambda w: ["prepare", "--benchmarks", "dolly2"], "unknown benchmark 'dolly2'"),
    ("data", lambda w: ["prepare", "--data-dir", str(w / "a-file" / "data")], "--data-dir"),
    ("analysis",
     lambda w: ["--teacher", str(w / "teacher"), "--student", str(w / "teacher"), "--taus", "0,1"],
     "--taus: every tau must be a finite number > 0"),
    ("analysis",
     lambda w: ["--teacher", str(w / "teacher"), "--student", str(w / "teacher"), "--taus", "x"],
     "--taus must be comma-separated numbers"),
    ("analysis",
     lambda w: ["--teacher", str(w / "bpe-teacher-model"), "--student", str(w / "teacher")],
     "incompatible vocabularies"),
    ("analysis",
     lambda w: ["--teacher", str(w / "teacher"), "--student", str(w / "teacher"), "--examples",
                "0"],
     "--examples must be >= 1"),
    ("responses", lambda w: ["--teacher", str(w / "teacher"), "--benchmark", "toy", "--limit", "0"],
     "--limit"),
    ("responses", lambda w: ["--teacher", str(w / "teacher"), "--benchmark", "nope"],
     "unknown benchmark 'nope'"),
    ("responses", lambda w: ["--teacher", "./missing", "--benchmark", "toy"],
     "--teacher ./missing: no such"),
]
MAINS = {"train": train.main, "evaluate": evaluate.main, "data": data.main, "analysis": analysis.main,
         "responses": responses.main}


@pytest.mark.parametrize("entry, argv, names", CASES,
                         ids=[f"{e}-{i}" for i, (e, _, _) in enumerate(CASES)])
def test_bad_input_stops_at_the_door_with_one_line(entry, argv, names, world, tmp_path, monkeypatch,
                                                   capsys):
    monkeypatch.chdir(tmp_path)  # relative paths (data/, runs/) land in an empty folder
    with pytest.raises(SystemExit) as stop:
        checks.run_cli(lambda: MAINS[entry](argv(world)))
    code = stop.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err.strip()
    assert code != 0 and message.startswith("error: ") and "\n" not in message, message
    assert names in message, message
    assert not (world / "never").exists(), "nothing is written for a refused command"


@pytest.mark.parametrize("env, names", [(dict(PRESET="nope"), "PRESET must be gpt2, opt, toy, toy-bytes, qwen2.5"),
                                        (dict(LOSSES="fkl kl"), "LOSSES: unknown objective 'kl'"),
                                        (dict(TAUS="1 0"), "TAUS: '0' is not a number > 0"),
                                        (dict(TAUS="1 x"), "TAUS: 'x' is not a number > 0"),
                                        (dict(SEEDS="1 x"), "SEEDS: 'x' is not a whole number"),
                                        (dict(RESPONSES="teachers"),
                                         "RESPONSES must be teacher or dataset"),
                                        (dict(STUDENT_GEN_RATIO="1.5"),
                                         "STUDENT_GEN_RATIO must be a number in [0, 1]"),
                                        (dict(NPROC="two"), "NPROC must be a whole number >= 1"),
                                        (dict(EVAL_SEEDS="10,x"), "EVAL_SEEDS must be comma-separated integers"),
                                        (dict(EVAL_SEEDS="10,10"), "EVAL_SEEDS repeats a seed"),
                                        (dict(BENCHMARKS="toy,nope"), "BENCHMARKS: unknown benchmark 'nope'"),
                                        (dict(TAUS="1 inf"), "TAUS: 'inf' is not a number > 0")])
def test_sweep_checks_its_settings_before_the_first_run_also_in_a_dry_run(env, names, tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PRESET": "toy", "RUNS": str(tmp_path / "runs"), **env}
    result = subprocess.run(["bash", os.path.join(ROOT, "sweep.sh")], env=env, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode != 0 and names in result.stderr, result.stderr
    assert "train.py" not in result.stdout, "no run is printed or started"


KD = ["--preset", "toy", "--student", "toy-tiny", "--loss", "rkl", "--tau", "2", "--data", "toy", "--responses",
      "dataset", "--train-examples", "64", "--valid-examples", "4", "--valid-max-new-tokens", "8",
      "--eval-benchmarks", "", "--log-every", "1", "--batch-size", "8", "--epochs", "2"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_writes_last_pt_and_the_resumed_run_equals_a_straight_one(
        signum, world, tmp_path, monkeypatch, capsys):
    common = [*KD, "--teacher", str(world / "teacher")]
    handler_before = signal.getsignal(signum)
    train.main([*common, "--out", str(tmp_path / "straight")])
    step = train.train_step
    calls = []

    def signalled_at_step_5(*args, **kwargs):  # the signal arrives while step 5 is being computed
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signum)
        return step(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", signalled_at_step_5)
    cut = [*common, "--out", str(tmp_path / "cut")]
    with pytest.raises(SystemExit) as stop:
        train.main(cut)
    assert stop.value.code == 128 + signum
    err = capsys.readouterr().err
    assert "Continue with:" in err and "train.py" in err and "--resume" in err
    # step 5 was finished
    assert torch.load(tmp_path / "cut/last.pt", weights_only=True)["state"]["step"] == 5
    assert signal.getsignal(signum) is handler_before  # the handler is restored
    monkeypatch.setattr(train, "train_step", step)
    train.main([*cut, "--resume"])
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "cut")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "cut/log.jsonl")
             if '"loss"' in line]
    assert steps == list(range(1, 17))  # no step logged twice
    assert (tmp_path / "cut/finished.json").is_file()


def test_a_non_finite_loss_stops_the_run_and_leaves_no_best_and_no_finished(world, tmp_path,
                                                                            monkeypatch):
    real = train.fused_distill_loss
    calls = []

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss, kd, ce = real(*args, **kwargs)
        return (loss * float("nan"), kd, ce) if len(calls) == 3 else (loss, kd, ce)
    monkeypatch.setattr(train, "fused_distill_loss", nan_at_step_3)
    with pytest.raises(SystemExit, match="the loss or its gradient is not finite"):
        train.main([*KD, "--teacher", str(world / "teacher"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run/best").exists() and not (tmp_path / "run/finished.json").exists()


def test_max_steps_validates_and_saves_best_but_is_not_finished_and_stale_temp_files_go(world,
                                                                                        tmp_path):
    out = tmp_path / "run"
    train.main([*KD, "--teacher", str(world / "teacher"), "--out", str(out), "--max-steps", "3"])
    assert (out / "best/model.safetensors").is_file() and not (out / "finished.json").exists()
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log if "val_rouge" in r] == [3]
    (out / "last.pt.tmp999").write_bytes(b"half")  # what a kill -9 during a write leaves
    (out / "best.tmp999").mkdir()
    train.main([*KD, "--teacher", str(world / "teacher"), "--out", str(out), "--resume"])
    assert not list(out.glob("*.tmp*")) and (out / "finished.json").is_file()


def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="'runs/teacher' does not exist"):
        from model import GPT
        # one slash, but runs/ is a folder here: a path, not a hub id
        GPT.from_pretrained("runs/teacher")


def test_a_broken_last_pt_is_named_before_any_model_loads_without_torchs_unsafe_advice(world, tmp_path,
                                                                                        monkeypatch, capsys):
    """Cut short or overwritten: the door sees it from the archive's structure alone. Corrupt inside
    (the archive whole, its pickle not): named when last.pt is read, once, still before any model
    loads. Never the advice to re-run torch.load with weights_only=False."""
    import zipfile
    import toy
    from model import GPT
    run = [*KD, "--teacher", str(world / "teacher"), "--out", str(tmp_path / "run")]
    train.main([*run, "--max-steps", "2"])
    last = tmp_path / "run/last.pt"
    whole = last.read_bytes()
    with zipfile.ZipFile(last) as archive:
        pickle = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    local_extra = int.from_bytes(whole[pickle.header_offset + 28:pickle.header_offset + 30], "little")
    start = pickle.header_offset + 30 + len(pickle.filename.encode()) + local_extra
    corrupt = whole[:start] + b"\x80\x02c" + b"os\nsystem\n" + whole[start + 13:]  # a pickle that imports code

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the broken last.pt was named")
    monkeypatch.setattr(GPT, "from_pretrained", no_model)
    monkeypatch.setattr(toy, "scratch_model", no_model)
    for broken in (whole[: len(whole) // 2], whole[:-30], b"", corrupt):
        last.write_bytes(broken)
        with pytest.raises(SystemExit) as stop:
            checks.run_cli(lambda: train.main([*run, "--max-steps", "4", "--resume"]))
        message = str(stop.value.code)
        assert message.startswith("error: ") and "\n" not in message, message
        assert "last.pt is not a readable checkpoint" in message and "weights_only" not in message, message
