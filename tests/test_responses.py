"""responses.py and train.py --responses: the teacher's responses are made once, cached, reused,
resumed, shared out over processes, and refused when another teacher made them."""
import json
import shutil

import pytest
import torch

import config
import data
import responses
import train
from test_evaluate import tiny_toy_model
from test_train import run_torchrun, weights

KD = ["--preset", "toy", "--student", "toy-tiny", "--loss", "fkl", "--tau", "2", "--data", "toy",
      "--batch-size", "8",
      "--epochs", "1", "--max-steps", "1", "--valid-examples", "2", "--valid-max-new-tokens", "4",
      "--eval-benchmarks", "", "--max-len", "512"]


def only_cache(data_dir):
    files = sorted(data_dir.glob("responses/toy/*/train.jsonl"))
    assert len(files) == 1, files
    return files[0]


def test_made_once_reused_equal_to_a_fresh_generation_resumed_and_extended(tmp_path, monkeypatch):
    teacher = tmp_path / "teacher"
    tiny_toy_model(teacher)  # untrained: some answers end with EOS, others run to the 256-token cap
    common = [*KD, "--teacher", str(teacher), "--data-dir", str(tmp_path / "data"),
              "--train-examples", "100"]
    train.main([*common, "--out", str(tmp_path / "first")])
    cache = only_cache(tmp_path / "data")
    made = cache.read_bytes()
    # (split on "\n" only: the untrained teacher's answers hold characters such as U+2028 that
    # splitlines() splits on)
    records = [json.loads(line) for line in made.decode().split("\n")[:-1]]
    source = data.toy_split("train")
    assert len(records) == 128  # 100 asked for, answered in whole chunks of 64
    assert [r["prompt"] for r in records] == [r["prompt"] for r in source[:128]]
    # the teacher's, not the dataset's
    assert sum(r["output"] != s["output"] for r, s in zip(records, source)) > 120
    assert all(r["teacher_tokens"] <= 256 and (r["teacher_eos"] or r["teacher_tokens"] == 256)
               for r in records)
    provenance = json.loads((cache.parent / "provenance.json").read_text())
    assert provenance["n_prompts"] == 128 and provenance["seed"] == responses.SEED
    assert provenance["decoding"] == dict(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=256,
                                          no_repeat_ngram_size=0)
    assert provenance["no_eos"] == sum(not r["teacher_eos"] for r in records) > 0
    assert provenance["empty"] == sum(r["output"] == [""] for r in records)
    run_args = json.loads((tmp_path / "first/args.json").read_text())
    assert run_args["teacher_fingerprint"] == provenance["teacher_fingerprint"]

    # a second run reads the file: no sampling at all
    def no_generation(*a, **k):
        raise AssertionError("the cached responses were generated again")
    with monkeypatch.context() as m:
        m.setattr(responses, "answer_chunk", no_generation)
        train.main([*common, "--out", str(tmp_path / "second")])
    assert cache.read_bytes() == made
    # training read the teacher's responses: a run on a jsonl of those records ends with the same
    # weights
    data.write_jsonl(str(tmp_path / "teacher.jsonl"),
                     [{k: r[k] for k in ("instruction", "input", "output", "prompt")}
                                                       for r in records[:100]])
    train.main([*KD, "--teacher", str(teacher), "--data", str(tmp_path / "teacher.jsonl"),
                "--valid-data", "toy",
                "--train-examples", "100", "--out", str(tmp_path / "from-file")])
    assert all(torch.equal(a, b) for a, b in zip(weights(tmp_path / "first").values(),
                                                 weights(tmp_path / "from-file").values()))

    # a fresh generation with the same seed, from the command line, writes the same bytes
    shutil.rmtree(tmp_path / "data/responses")
    make = lambda limit: responses.main(["--teacher", str(teacher), "--benchmark", "toy", "--limit",
                                         str(limit),
                                         "--data-dir", str(tmp_path / "data")])
    make(100)
    assert only_cache(tmp_path / "data").read_bytes() == made
    # a torn last line (a crash mid-write) is dropped with the rest of its chunk and made again
    torn = made[: made.index(b"\n", len(made) * 3 // 4) - 20]
    cache.write_bytes(torn)
    make(100)
    assert cache.read_bytes() == made
    # more prompts later: the file grows, the first responses stay as they were
    make(130)
    grown = cache.read_bytes()
    assert grown.startswith(made) and grown.count(b"\n") == 192


def test_fingerprint_follows_the_weights_not_the_path(tmp_path):
    tiny_toy_model(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert responses.fingerprint(str(tmp_path / "a")) == responses.fingerprint(str(tmp_path / "b"))
    torch.manual_seed(1)
    model = tiny_toy_model(tmp_path / "c")
    with torch.no_grad():
        model.ln_f.bias.add_(1e-3)
    model.save_pretrained(str(tmp_path / "c"))
    assert responses.fingerprint(str(tmp_path / "c")) != responses.fingerprint(str(tmp_path / "a"))


def test_a_cache_made_by_another_teacher_is_refused_in_one_line(tmp_path):
    teacher, other = tmp_path / "teacher", tmp_path / "other"
    tiny_toy_model(teacher)
    model = tiny_toy_model(other)
    with torch.no_grad():
        model.tok_emb.weight.mul_(2)
    model.save_pretrained(str(other))
    common = [*KD, "--data-dir", str(tmp_path / "data"), "--train-examples", "16"]
    train.main([*common, "--teacher", str(teacher), "--out", str(tmp_path / "a")])
    made = only_cache(tmp_path / "data").parent
    # the cache copied to where the other teacher's responses would be (a copied or renamed cache
    # folder)
    shutil.copytree(made, made.parent / responses.fingerprint(str(other))[:16])
    with pytest.raises(SystemExit, match=r"holds responses of teacher .*/teacher \(fingerprint "
                       r"\w{16}\), but this run's teacher is .*/other \(fingerprint \w{16}\); "
                       r"they differ in teacher_fingerprint") as error:
        train.main([*common, "--teacher", str(other), "--out", str(tmp_path / "b")])
    assert "\n" not in str(error.value)
    # the same teacher sampled in another dtype (responses.py --dtype bfloat16, the default on a
    # GPU) answers differently
    shutil.rmtree(tmp_path / "data/responses")
    responses.main(["--teacher", str(teacher), "--benchmark", "toy", "--limit", "16",
                    "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--dtype", "bfloat16"])
    bf16 = only_cache(tmp_path / "data").parent
    fp32 = bf16.parent / bf16.name.removesuffix("-bfloat16")
    assert bf16.name.endswith("-bfloat16")  # the dtype is part of the cache's key: a folder of its own
    train.main([*common, "--teacher", str(teacher), "--device", "cpu", "--dtype", "float32",
                "--out", str(tmp_path / "c")])  # not refused: it makes and uses its own
    assert (fp32 / "train.jsonl").is_file()
    # bf16 responses copied where the float32 ones belong are still refused, by their provenance
    shutil.rmtree(fp32)
    shutil.copytree(bf16, fp32)
    with pytest.raises(SystemExit, match=r"they differ in teacher_dtype"):
        train.main([*common, "--teacher", str(teacher), "--device", "cpu", "--dtype", "float32",
                    "--out", str(tmp_path / "d")])



def test_one_default_dtype_for_training_and_sampling():
    # train.py (--dtype, --teacher-dtype) and responses.py (--dtype) default to this one rule, so a
    # cache made by either without --dtype is the other's too
    assert [responses.default_dtype(d) for d in ("cuda", "cuda:1", "cpu")] == [
        "bfloat16", "bfloat16", "float32"]

def test_two_gloo_processes_make_one_file_equal_to_the_one_process_file(tmp_path):
    teacher = tmp_path / "teacher"
    tiny_toy_model(teacher)
    # two chunks: one for each process
    common = [*KD, "--teacher", str(teacher), "--train-examples", "128", "--device", "cpu"]
    run_torchrun(2, [*common, "--data-dir", str(tmp_path / "two"), "--out", str(tmp_path / "ddp")],
                 tmp_path)
    train.main([*common, "--data-dir", str(tmp_path / "one"), "--out", str(tmp_path / "single")])
    two, one = only_cache(tmp_path / "two"), only_cache(tmp_path / "one")
    assert two.read_bytes() == one.read_bytes() and one.read_bytes().count(b"\n") == 128
    # no leftovers
    # (.lock: the empty file the writer's lock is taken on; the lock itself is the kernel's)
    assert sorted(p.name for p in two.parent.iterdir()) == [".lock", "provenance.json", "train.jsonl"]
    ddp, single = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    assert all(torch.allclose(ddp[k], single[k], atol=1e-5) for k in single)


def test_dataset_responses_train_on_the_benchmark_as_before(tmp_path):
    teacher = tmp_path / "teacher"
    tiny_toy_model(teacher)
    common = [*KD, "--teacher", str(teacher), "--data-dir", str(tmp_path / "data"),
              "--train-examples", "64"]
    train.main([*common, "--responses", "dataset", "--out", str(tmp_path / "dataset")])
    assert not (tmp_path / "data/responses").exists()  # nothing generated
    data.write_jsonl(str(tmp_path / "toy.jsonl"), data.toy_split("train")[:64])
    train.main([*common, "--data", str(tmp_path / "toy.jsonl"), "--valid-data", "toy", "--out",
                str(tmp_path / "file")])
    assert all(torch.equal(a, b) for a, b in zip(weights(tmp_path / "dataset").values(),
                                                 weights(tmp_path / "file").values()))
    args = json.loads((tmp_path / "dataset/args.json").read_text())
    assert args["responses"] == "dataset" and args["teacher_fingerprint"] is None
    with pytest.raises(SystemExit, match="--responses teacher needs --mode kd"):
        config.parse_args(["--preset", "toy", "--mode", "sft", "--responses", "teacher"])


def test_a_hub_teacher_is_fingerprinted_by_its_downloaded_files(tmp_path):
    import os
    import subprocess
    import sys
    from conftest import ROOT
    from hubserver import StandInHub
    tiny_toy_model(tmp_path / "teacher")
    with StandInHub({("model", "tiny/teacher"): str(tmp_path / "teacher")}) as hub:
        code = ("import sys; sys.path.insert(0, %r); import responses; "
                "print(responses.fingerprint('tiny/teacher'))"
                % ROOT)
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"))
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == responses.fingerprint(str(tmp_path / "teacher"))
