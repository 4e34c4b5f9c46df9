"""train.py: DDP equivalence, exact resume, the toy preset end to end, and the errors raised before
any work."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import config
import data
import evaluate
import toy
import train
from conftest import ROOT
from model import GPT

# The mechanics tests train on the dataset's responses; tests/test_responses.py covers the
# teacher's.
TINY = ["--data", "toy", "--responses", "dataset", "--train-examples", "64", "--valid-examples", "4",
        "--valid-max-new-tokens", "8", "--eval-benchmarks", "", "--log-every", "1"]


def make_teacher(tmp_path):
    """A tiny from-scratch toy teacher saved like a real one (config, weights, tokenizer files)."""
    out = tmp_path / "teacher"
    train.main(["--preset", "toy", "--mode", "sft", "--student", "toy-tiny", "--batch-size", "16", "--epochs", "1",
                "--out", str(out), *[a for a in TINY if a not in ("--responses", "dataset")]])
    return out / "best"


def weights(run_dir):
    return torch.load(os.path.join(run_dir, "last.pt"), map_location="cpu",
                      weights_only=True)["model"]


def assert_trained(state, seed=1, size="toy-tiny"):
    """The weights moved away from the student's initialisation (train.py seeds it with --seed)."""
    torch.manual_seed(seed)
    start = train.load_model(size, torch.float32, "cpu", state["tok_emb.weight"].shape[0]).state_dict()
    assert all(not torch.equal(state[k], v) for k, v in start.items() if k.endswith(".weight")), \
        "a layer never moved"


def run_torchrun(nproc, argv, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(ROOT, "train.py"), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def test_two_process_ddp_equals_one_process(tmp_path):
    teacher = make_teacher(tmp_path)
    # gloo on CPU for both (--device cpu), also on a machine with a GPU
    common = ["--preset", "toy", "--teacher", str(teacher), "--student", "toy-tiny", "--loss",
              "rkl", "--tau", "2", "--batch-size", "8", "--micro-batch-size", "2", "--epochs", "1",
              "--max-steps", "4", "--device", "cpu", *TINY]
    run_torchrun(2, [*common, "--out", str(tmp_path / "ddp")], tmp_path)
    train.main([*common, "--out", str(tmp_path / "single")])
    ddp, single = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    assert_trained(single)
    for key in single:
        assert torch.allclose(ddp[key], single[key], atol=1e-5), key


def test_micro_batching_does_not_change_the_step(tmp_path):
    teacher = make_teacher(tmp_path)
    # float32 also on a GPU (bfloat16 rounds micro-batches' sums differently)
    common = ["--preset", "toy", "--teacher", str(teacher), "--student", "toy-tiny", "--loss",
              "fkl", "--tau", "3", "--batch-size", "8", "--epochs", "1", "--max-steps", "3",
              "--dtype", "float32", *TINY]
    train.main([*common, "--out", str(tmp_path / "whole")])
    train.main([*common, "--micro-batch-size", "1", "--out", str(tmp_path / "micro")])
    whole, micro = weights(tmp_path / "whole"), weights(tmp_path / "micro")
    assert_trained(whole)
    assert all(torch.allclose(whole[k], micro[k], atol=1e-5) for k in whole)


def test_kill_and_resume_equals_a_straight_run(tmp_path):
    teacher = make_teacher(tmp_path)
    common = ["--preset", "toy", "--teacher", str(teacher), "--student", "toy-tiny", "--loss", "js", "--tau", "2.5",
              "--batch-size", "8", "--epochs", "2", *TINY]
    train.main([*common, "--out", str(tmp_path / "straight"), "--max-steps", "12"])
    train.main([*common, "--out", str(tmp_path / "cut"), "--max-steps", "5"])  # stops mid-epoch 0
    with pytest.raises(SystemExit, match="holds another run's checkpoint"):
        train.main([*common, "--out", str(tmp_path / "cut"), "--max-steps", "12"])
    # crosses epoch 0 -> 1
    train.main([*common, "--out", str(tmp_path / "cut"), "--max-steps", "12", "--resume"])
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "cut")
    assert_trained(straight)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps = [json.loads(l)["step"] for l in open(tmp_path / "cut" / "log.jsonl") if '"loss"' in l]
    assert steps == list(range(1, 13))
    with pytest.raises(SystemExit, match=r"different settings.*tau=2.5 -> 3.0"):
        train.main([*common[:-len(TINY)], "--tau", "3", *TINY, "--out", str(tmp_path / "cut"),
                    "--max-steps", "14",
                    "--resume"])
    checkpoint = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    # (out, in)
    checkpoint["model"]["blocks.0.fc_in.weight"] = checkpoint["model"]["blocks.0.fc_in.weight"].t()
    torch.save(checkpoint, tmp_path / "cut" / "last.pt")
    with pytest.raises(SystemExit,
                       match=r"last.pt does not fit this model.*size mismatch for "
                             r"blocks.0.fc_in.weight"):
        train.main([*common, "--out", str(tmp_path / "cut"), "--max-steps", "14", "--resume"])


def test_toy_preset_end_to_end(tmp_path, monkeypatch):
    """--preset toy with tiny sizes: teacher SFT and student warm start are made first, then KD,
    then evaluation."""
    monkeypatch.chdir(tmp_path)
    preset = dict(config.PRESETS["toy"], train_examples=64, valid_examples=4, eval_seeds="10,20")
    monkeypatch.setitem(config.PRESETS, "toy", preset)
    monkeypatch.setattr(toy, "STAGES", {
        "teacher": ["--mode", "sft", "--student", "toy-tiny", "--lr", "1e-2", "--epochs", "40", "--batch-size", "8",
                    "--train-examples", "16"],
        "student-init": ["--mode", "sft", "--student", "toy-tiny", "--lr", "3e-3", "--epochs", "1", "--batch-size",
                         "16", "--train-examples", "32"]})
    monkeypatch.setattr(toy, "SPLITS", dict(toy.SPLITS, test=6, **{"test-hard": 6}))
    train.main(["--preset", "toy", "--loss", "fkl", "--tau", "3", "--batch-size", "16",
                "--valid-max-new-tokens", "8"])
    run = tmp_path / "runs/toy/fkl-tau3"
    for path in ("best/config.json", "best/model.safetensors", "best/vocab.json", "log.jsonl", "args.json",
                 "last.pt", "best/eval/results.json", "best/eval/predictions-toy-seed10.jsonl"):
        assert (run / path).is_file(), path
    results = json.loads((run / "best/eval/results.json").read_text())["benchmarks"]
    assert set(results) == {"toy", "toy-hard"} and set(results["toy"]["scores"]) == {"10", "20"}
    log = [json.loads(l) for l in open(run / "log.jsonl")]
    assert any("val_rouge" in r for r in log)
    assert all(r["kd"] is not None for r in log if "loss" in r)
    # the teacher made for the run learned its training data: far above an untrained model
    teacher = GPT.from_pretrained(str(tmp_path / "runs/toy/teacher/best"))
    tokenizer = data.load_tokenizer(str(tmp_path / "runs/toy/teacher/best"))
    seen = data.toy_split("train")[:16:2]
    answers = evaluate.generate_responses(teacher, tokenizer, seen, seed=0, temperature=0.0, max_new_tokens=48,
                                          progress=False)
    trained = evaluate.score(seen, answers)
    assert trained > 20, trained  # an untrained model scores ~0
    assert (tmp_path / "runs/toy/student-init/best/model.safetensors").is_file()
    # the paper's setting by default: KD on the teacher's own responses, made once into the cache
    assert json.loads((run / "args.json").read_text())["responses"] == "teacher"
    cached = list(tmp_path.glob("data/responses/toy/*/train.jsonl"))
    assert len(cached) == 1 and cached[0].read_bytes().count(b"\n") == 64


def test_errors_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="unknown loss 'kl'"):
        config.parse_args(["--preset", "toy", "--loss", "kl"])
    with pytest.raises(SystemExit, match="tau must be a finite number > 0"):
        config.parse_args(["--preset", "toy", "--tau", "0"])
    with pytest.raises(SystemExit,
                       match=r"data/dolly/train.jsonl is missing: run `python data.py prepare`"):
        config.parse_args(["--loss", "fkl", "--tau", "3"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/last.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="holds another run's checkpoint"):
        config.parse_args(["--preset", "toy", "--out", str(tmp_path / "busy")])
    with pytest.raises(SystemExit, match="must be a multiple"):
        train.train(config.parse_args(["--preset", "toy", "--mode", "sft", "--student", "toy-tiny",
                                      "--batch-size", "10",
                                      "--micro-batch-size", "4", "--out", str(tmp_path / "x")]))
    # a teacher with another tokenizer
    other = tmp_path / "other-teacher"
    from test_data import write_bpe
    from test_evaluate import tiny_toy_model
    tiny_toy_model(other)
    write_bpe(tmp_path / "bpe")
    for f in ("vocab.json", "merges.txt"):
        (other / f).write_bytes((tmp_path / "bpe" / f).read_bytes())
    tiny_toy_model(tmp_path / "byte-student")  # (a from-scratch student would take the teacher's tokenizer)
    with pytest.raises(SystemExit, match="incompatible vocabularies"):
        train.train(config.parse_args(["--preset", "toy", "--teacher", str(other), "--student",
                                      str(tmp_path / "byte-student"), "--out", str(tmp_path / "y")]))


def test_device_cuda_needs_a_gpu_per_process(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit, match=r"--device cuda, but no GPU is visible"):
        config.parse_args(["--preset", "toy", "--device", "cuda"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match=r"torchrun starts 2 processes here, but this machine has "
                       r"1 GPU\(s\), one per process: use --nproc_per_node 1, or --device cpu"):
        config.parse_args(["--preset", "toy", "--device", "cuda"])


def test_fsdp_two_processes_equal_one_process_also_across_a_resume(tmp_path):
    teacher = make_teacher(tmp_path)
    common = ["--preset", "toy", "--teacher", str(teacher), "--student", "toy-tiny", "--loss",
              "sfkl", "--tau", "2", "--batch-size", "8", "--micro-batch-size", "2", "--epochs",
              "1", "--device", "cpu", *TINY]
    run_torchrun(2, [*common, "--fsdp", "--max-steps", "3", "--out", str(tmp_path / "fsdp")],
                 tmp_path)
    run_torchrun(2,
                 [*common, "--fsdp", "--max-steps", "6", "--resume", "--out",
                  str(tmp_path / "fsdp")], tmp_path)
    train.main([*common, "--max-steps", "6", "--out", str(tmp_path / "single")])
    sharded, single = weights(tmp_path / "fsdp"), weights(tmp_path / "single")
    assert set(sharded) == set(single)
    for key in single:
        assert torch.allclose(sharded[key], single[key], atol=1e-5), key


def test_sweep_dry_run_prints_the_grid_and_skips_finished_runs(tmp_path):
    env = dict(os.environ, DRY_RUN="1", PRESET="toy", LOSSES="fkl ab", TAUS="1 3", SEEDS="1 2",
               RUNS=str(tmp_path / "runs"))
    finished = tmp_path / "runs/fkl-tau3-seed2"
    (finished / "best/eval").mkdir(parents=True)
    (finished / "finished.json").write_text("{}")
    (finished / "best/eval/results.json").write_text("{}")
    (finished / "best/config.json").write_text("{}")  # a whole run: sweep.sh skips it
    # cwd: the preset's teacher and student paths are relative, and a real sweep may have made them
    # in ROOT
    result = subprocess.run(["bash", os.path.join(ROOT, "sweep.sh")], env=env, capture_output=True,
                            text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    trained = [l for l in lines if l.startswith("+") and "/train.py " in l]
    # evaluated in-process
    assert all("--eval-benchmarks toy,toy-hard --eval-seeds " in l for l in trained)
    # fkl at tau 1 and 3, ab at tau 1 only (the paper reports AB at tau = 1), for 2 seeds, minus the
    # finished run
    assert len(trained) == 5 and not any("--loss ab --tau 3" in l for l in trained)
    assert not any("fkl-tau3-seed2" in l for l in trained)
    assert "= " + str(finished / "best") + " already evaluated" in result.stdout
    assert sum("/evaluate.py --model " in l for l in lines) == 6  # 5 students + the toy teacher
    assert lines[-1].startswith("+ python " + os.path.join(ROOT, "evaluate.py") + " summarize")
    assert not (tmp_path / "runs/fkl-tau1-seed1").exists(), "a dry run creates nothing"
    # the toy study's default: the whole grid (8 objectives x 7 tau + AB and DRKL at tau 1) x 3
    # training seeds
    env = {k: v for k, v in env.items() if k not in ("LOSSES", "TAUS", "SEEDS")}
    result = subprocess.run(["bash", os.path.join(ROOT, "sweep.sh")], env=env, capture_output=True,
                            text=True,
                            timeout=120, cwd=tmp_path)
    trained = [l for l in result.stdout.splitlines() if l.startswith("+") and "/train.py " in l]
    # minus the finished run
    assert len(trained) == 58 * 3 - 1 and sum("--seed 3 " in l for l in trained) == 58


def test_kd_between_hugging_face_checkpoints_on_a_jsonl_dataset(tmp_path):
    """The paper-scale path in miniature: teacher and student are HF-layout GPT-2 directories
    sharing a BPE tokenizer, the data a jsonl file of fixed responses; the distilled student loads
    back into transformers."""
    import shutil
    import transformers
    from test_data import write_bpe
    vocab = write_bpe(tmp_path / "tok")
    for name, width in (("teacher", 64), ("student", 32)):
        cfg = transformers.GPT2Config(vocab_size=len(vocab), n_positions=512, n_embd=width,
                                      n_layer=2, n_head=2,
                                      bos_token_id=vocab["<|endoftext|>"],
                                      eos_token_id=vocab["<|endoftext|>"])
        torch.manual_seed(len(name))
        transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / name)
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(tmp_path / "tok" / f, tmp_path / name / f)
    data.write_jsonl(str(tmp_path / "train.jsonl"), data.toy_split("train")[:16])
    out = tmp_path / "run"
    train.main(["--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"),
                "--data", str(tmp_path / "train.jsonl"), "--valid-data", "toy", "--loss", "rkl",
                "--tau", "2",
                "--batch-size", "8", "--epochs", "1", "--lr", "1e-3", "--valid-examples", "4",
                "--valid-max-new-tokens", "8", "--eval-benchmarks", "", "--out", str(out)])
    args = json.loads((out / "args.json").read_text())
    assert args["preset"] == "gpt2" and args["epochs"] == 1 and args["loss"] == "rkl"
    distilled = transformers.AutoModelForCausalLM.from_pretrained(out / "best").eval()
    ours = GPT.from_pretrained(str(out / "best"))
    ids = torch.tensor([data.load_tokenizer(str(out / "best")).encode("What color is the fidar?")])
    with torch.no_grad():
        assert torch.allclose(distilled(ids).logits, ours(ids), atol=1e-5)
    before = load_file(str(tmp_path / "student" / "model.safetensors"))
    after = load_file(str(out / "best" / "model.safetensors"))
    assert not torch.equal(before["transformer.h.0.mlp.c_fc.weight"],
                           after["transformer.h.0.mlp.c_fc.weight"])


@pytest.mark.parametrize("preset", list(config.PRESETS))
def test_sweep_uses_the_presets_teacher_and_student_without_importing_train(preset, tmp_path):
    parser = config.build_parser()
    parser.set_defaults(**config.PRESETS[preset])
    teacher, student = parser.get_default("teacher"), parser.get_default("student")
    if preset == "toy":  # a student made here by SFT (the warm start) is evaluated where it lies
        (tmp_path / student).mkdir(parents=True)
    env = dict(os.environ, DRY_RUN="1", PRESET=preset, LOSSES="fkl", TAUS="1", SEEDS="1", NPROC="1",
               RUNS=str(tmp_path / "runs"))
    result = subprocess.run(["bash", os.path.join(ROOT, "sweep.sh")], env=env, capture_output=True,
                            text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    models = [line.split("--model ")[1].split()[0] for line in result.stdout.splitlines()
              if "/evaluate.py --model" in line]
    assert teacher in models, (teacher, models)  # the teacher's row of the tables
    assert (student in models) == (preset == "toy")
