"""LoRA students (#23, lora.py, --lora-rank): a new adapter (B = 0) leaves the model's outputs exactly;
only A and B get gradients; the update lands on q and v (not k), attention's output and the MLP, which
transformers confirms when the same update is added to its own q_proj / v_proj / o_proj / gate / up / down
by hand; the merged checkpoint, loaded by transformers, gives the unmerged model's logits; and a LoRA run
trains only A and B, resumes exactly, and gives the same weights on one process, under DDP and FSDP,
on-policy too."""
import pytest
import torch

import lora
import train
from model import GPT
from test_families import family_dir, hf_logits  # noqa: F401 (a fixture)
from test_model import padded_batch
from test_train import TINY, make_teacher, run_torchrun, weights


def with_random_updates(model, rank=3, alpha=5.0):
    lora.add(model, rank, alpha)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora.B." in name:
                p.normal_(0, 0.3)
    return model


def test_a_new_adapter_changes_nothing_and_only_a_and_b_train(family_dir):
    path, _ = family_dir("llama-gqa-tied")
    base, student = GPT.from_pretrained(path), lora.add(GPT.from_pretrained(path), 4, 8.0)
    ids, mask = padded_batch(2)
    assert torch.equal(base(ids, mask), student(ids, mask))  # B = 0: the base model exactly
    with_random_updates(student)
    student(ids, mask).logsumexp(-1).sum().backward()
    trained = {name for name, p in student.named_parameters() if p.grad is not None}
    assert trained == {name for name, _ in student.named_parameters() if ".lora." in name}
    assert all(bool(student.get_parameter(name).grad.any()) for name in trained)
    # targets: q and v of the fused qkv, attention's output, gate and up of the fused fc_in, fc_out
    spans = {name: m.spans for name, m in student.named_modules() if isinstance(m, lora.LoRA)}
    cfg = student.cfg
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    assert spans["blocks.0.attn.qkv.lora"] == [(0, q), (q + kv, q + 2 * kv)]
    assert spans["blocks.0.fc_in.lora"] == [(0, cfg.ffn_dim), (cfg.ffn_dim, 2 * cfg.ffn_dim)]
    assert len(spans) == 4 * cfg.n_layer


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen3"])
def test_the_update_is_transformers_own_projections_plus_b_a_and_the_merged_checkpoint_loads(family_dir, name,
                                                                                           tmp_path):
    import transformers
    path, hf = family_dir(name)
    student = with_random_updates(GPT.from_pretrained(path))
    ids, mask = padded_batch(2)
    real = mask.bool()
    with torch.no_grad():
        ours = student(ids, mask)
        # the same update added by hand to transformers' separate projections (weights (out, in))
        for i, layer in enumerate(hf.model.layers):
            block = student.blocks[i]
            pairs = [(layer.self_attn.q_proj, block.attn.qkv.lora, 0), (layer.self_attn.v_proj, block.attn.qkv.lora, 1),
                     (layer.self_attn.o_proj, block.attn.proj.lora, 0), (layer.mlp.gate_proj, block.fc_in.lora, 0),
                     (layer.mlp.up_proj, block.fc_in.lora, 1), (layer.mlp.down_proj, block.fc_out.lora, 0)]
            for linear, adapter, span in pairs:
                linear.weight += adapter.scale * adapter.B[span] @ adapter.A[span]
        assert (hf_logits(hf, ids, mask) - ours)[real].abs().max() <= 1e-5
    student.save_pretrained(str(tmp_path / "merged"))  # what best/ holds
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert (hf_logits(merged, ids, mask) - ours)[real].abs().max() <= 1e-5
    assert not any("lora" in k for k in GPT.from_pretrained(str(tmp_path / "merged")).state_dict())


def test_a_lora_run_trains_only_a_and_b_resumes_exactly_and_runs_on_policy(tmp_path):
    teacher = make_teacher(tmp_path)
    common = ["--preset", "toy", "--teacher", str(teacher), "--student", "toy-tiny", "--loss", "fkl", "--tau", "2",
              "--batch-size", "8", "--epochs", "2", "--lora-rank", "4", "--lr", "1e-2", *TINY]
    train.main([*common, "--out", str(tmp_path / "straight"), "--max-steps", "10"])
    train.main([*common, "--out", str(tmp_path / "cut"), "--max-steps", "4"])
    train.main([*common, "--out", str(tmp_path / "cut"), "--max-steps", "10", "--resume"])
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "cut")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    torch.manual_seed(1)  # the student's initialisation (--seed 1), before its adapters
    start = train.load_model("toy-tiny", torch.float32, "cpu", straight["tok_emb.weight"].shape[0]).state_dict()
    for key, value in straight.items():
        if ".lora.A." in key or ".lora.B." in key:
            assert not torch.equal(value, start.get(key, torch.zeros_like(value))), key
        else:
            assert torch.equal(value, start[key]), f"{key} is frozen but moved"
    best = GPT.from_pretrained(str(tmp_path / "straight" / "best"))  # merged: an ordinary checkpoint
    assert set(best.state_dict()) == set(start) and not torch.equal(best.blocks[0].fc_out.weight,
                                                                   start["blocks.0.fc_out.weight"])
    with pytest.raises(SystemExit, match=r"different settings.*lora_rank=4 -> 8"):
        train.main([*common[:-len(TINY)], "--lora-rank", "8", *TINY, "--out", str(tmp_path / "cut"),
                    "--max-steps", "12", "--resume"])
    train.main([*common, "--student-gen-ratio", "1", "--max-steps", "2", "--out", str(tmp_path / "on")])
    on = weights(tmp_path / "on")
    assert not torch.equal(on["blocks.0.fc_out.lora.B.0"], torch.zeros_like(on["blocks.0.fc_out.lora.B.0"]))


def test_a_lora_run_is_the_same_on_one_process_under_ddp_and_under_fsdp(tmp_path):
    teacher = make_teacher(tmp_path)
    common = ["--preset", "toy", "--teacher", str(teacher), "--student", "toy-tiny", "--loss", "rkl", "--tau", "2",
              "--batch-size", "8", "--micro-batch-size", "2", "--epochs", "1", "--max-steps", "3", "--lora-rank", "4",
              "--lr", "1e-2", "--device", "cpu", *TINY]
    train.main([*common, "--out", str(tmp_path / "single")])
    run_torchrun(2, [*common, "--out", str(tmp_path / "ddp")], tmp_path)
    run_torchrun(2, [*common, "--fsdp", "--out", str(tmp_path / "fsdp")], tmp_path)
    single = weights(tmp_path / "single")
    for other in ("ddp", "fsdp"):
        state = weights(tmp_path / other)
        assert set(state) == set(single)
        for key in single:
            assert torch.allclose(state[key], single[key], atol=1e-5), (other, key)
    b = single["blocks.0.attn.qkv.lora.B.0"]
    assert bool(b.any())


def test_lora_flags_are_checked_at_the_door():
    import config
    with pytest.raises(SystemExit, match="--lora-rank must be"):
        config.parse_args(["--preset", "toy", "--lora-rank", "-1"])
    with pytest.raises(SystemExit, match="--lora-alpha scales"):
        config.parse_args(["--preset", "toy", "--lora-alpha", "16"])
    assert config.parse_args(["--preset", "toy", "--lora-rank", "8"]).lora_alpha == 16.0
