"""Each modern preset's path end to end, offline (#22): its teacher's base model and its student as
tiny random checkpoints saved by transformers, in the release's file layout (Llama: tokenizer.json only;
Qwen, SmolLM2: vocab.json + merges.txt + tokenizer.json; SmolLM2's specials at ids 0-16; Qwen3 with q/k
norms and head_dim != hidden / heads; embeddings padded past the tokenizer, the teacher's and the
student's differently), served under their real hub names by the local stand-in hub. Then, as a user
would: teacher SFT -> the teacher's responses -> KD -> evaluation, each a command of its own."""
import json
import os
import subprocess
import sys

import pytest
import torch

import config
from conftest import ROOT
from hubserver import GATED, StandInHub
from test_tokenizers import build

SHAPES = {"qwen2.5": ("qwen", "qwen2", {}), "llama3.2": ("llama3", "llama", {}), "smollm2": ("smollm2", "llama", {}),
          "qwen3": ("qwen", "qwen3", {"head_dim": 16})}


def release(preset, role, directory):
    """A tiny random model of the preset's family with a tokenizer in the release's shape and layout."""
    import transformers
    shape, kind, extra = SHAPES[preset]
    tokenizer = build(shape, directory)
    if shape != "llama3":  # the BPE files beside tokenizer.json, as Qwen and SmolLM2 ship them
        tokenizer.model.save(str(directory))
    eos = json.loads((directory / "config.json").read_text())["eos_token_id"]
    rows = tokenizer.get_vocab_size() + (32 if role == "teacher" else 16)  # padded past the tokenizer, unequally
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "qwen3": transformers.Qwen3Config}[kind]
    cfg = config_class(vocab_size=rows, hidden_size=32 if role == "teacher" else 16, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, bos_token_id=tokenizer.token_to_id("<|begin_of_text|>") or eos,
                       eos_token_id=eos, tie_word_embeddings=role == "student", **extra)
    torch.manual_seed(len(role))
    model_class = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                   "qwen3": transformers.Qwen3ForCausalLM}[kind]
    model_class(cfg).save_pretrained(directory)


def run(argv, env, cwd):
    result = subprocess.run([sys.executable, *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("preset", list(SHAPES))
def test_a_presets_path_runs_end_to_end_from_the_hub(preset, tmp_path):
    import transformers
    from model import GPT
    base, student = config.TEACHER_SFT[preset], config.PRESETS[preset]["student"]
    for role, name in (("teacher", base), ("student", student)):
        release(preset, role, tmp_path / "hub" / name)
    assert sorted(os.listdir(tmp_path / "hub" / student)) == (
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"] if preset == "llama3.2"
        else ["config.json", "generation_config.json", "merges.txt", "model.safetensors", "tokenizer.json",
              "vocab.json"])
    small = ["--data", "toy", "--valid-data", "toy", "--train-examples", "64", "--batch-size", "8", "--epochs", "1",
             "--max-steps", "2", "--valid-examples", "2", "--valid-max-new-tokens", "4", "--max-prompt-len", "128",
             "--max-len", "256", "--eval-benchmarks", ""]
    repos = {("model", base): str(tmp_path / "hub" / base), ("model", student): str(tmp_path / "hub" / student),
             ("model", "meta-llama/Llama-3.1-8B"): GATED}
    with StandInHub(repos) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
        train = os.path.join(ROOT, "train.py")
        run([train, "--preset", preset, "--mode", "sft", "--student", base, "--lr", "1e-3", *small,
             "--out", f"runs/{preset}/teacher"], env, tmp_path)  # the teacher, fine-tuned first
        run([train, "--preset", preset, "--loss", "fkl", "--tau", "2", *small], env, tmp_path)  # responses, KD
        run([os.path.join(ROOT, "evaluate.py"), "--model", f"runs/{preset}/fkl-tau2/best", "--benchmarks", "toy",
             "--seeds", "10", "--max-examples", "4", "--max-new-tokens", "8"], env, tmp_path)
        gated = subprocess.run([sys.executable, train, "--preset", preset, "--teacher", "meta-llama/Llama-3.1-8B",
                                *small], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert gated.returncode != 0 and "is a gated repository (401)" in gated.stderr.strip().splitlines()[-1]
    best = tmp_path / "runs" / preset / "fkl-tau2" / "best"
    assert "tokenizer.json" in os.listdir(best) and (best / "eval/results.json").is_file()
    cache = list((tmp_path / "data/responses/toy").glob("*/train.jsonl"))
    assert len(cache) == 1 and cache[0].read_bytes().count(b"\n") == 64  # the fine-tuned teacher's answers
    # the distilled student is an ordinary checkpoint of its family: transformers loads it, same logits
    again = transformers.AutoModelForCausalLM.from_pretrained(str(best)).eval()
    ids = torch.tensor([[5, 9, 23, 41, 7]])
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, GPT.from_pretrained(str(best))(ids), atol=1e-5)
