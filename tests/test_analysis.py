"""analysis.py: its closed-form gradients and statistics against autograd through losses.py, on a
tiny model."""
import torch

import analysis
import data
import losses
from conftest import assert_float32_close
from model import GPT, GPTConfig


def tiny_pair():
    torch.manual_seed(0)
    make = lambda width: GPT(GPTConfig(vocab_size=257, n_positions=512, n_layer=1, n_head=2,
                                       n_embd=width,
                                       ffn_dim=2 * width, bos_token_id=256, eos_token_id=256,
                                       pad_token_id=256)).eval()
    teacher, student = make(32), make(16)
    with torch.no_grad():  # spread the random logits so that tau has something to do
        teacher.tok_emb.weight.mul_(20)
        student.tok_emb.weight.mul_(20)
    return teacher, student


def test_analysis_numbers_equal_autograd_gradients_on_a_tiny_model():
    teacher, student = tiny_pair()
    records = data.toy_split("train")[:4]
    zs, zt, targets = analysis.response_logits(teacher, student, data.byte_tokenizer(), records)
    assert zs.shape == zt.shape and zs.shape[0] == targets.shape[0] > 50
    labels = targets[None]  # one "sequence" of all response positions
    for tau in (1.0, 2.5, 4.0):
        fkl, rkl = analysis.kd_gradients(zs, zt, tau)
        auto = {}
        for name in ("fkl", "rkl"):
            s = zs[None].clone().requires_grad_()
            losses.distill_loss(name, s, zt[None], labels, tau=tau, reduction="sum").backward()
            auto[name] = s.grad[0].double()
        assert_float32_close(auto["fkl"], fkl)  # autograd's side is the float32 one
        assert_float32_close(auto["rkl"], rkl)
        stats = analysis.gradient_stats(zs, zt, targets, tau)
        g = auto["fkl"]
        target_part = g.gather(-1, targets[:, None])[:, 0].abs().mean()
        rest = g.clone()
        rest[torch.arange(len(targets)), targets] = 0
        assert abs(stats["fkl_target"] - target_part) < 1e-7
        assert abs(stats["fkl_non_target"] - rest.norm(dim=-1).mean()) < 1e-7
        cos = torch.nn.functional.cosine_similarity(auto["fkl"], auto["rkl"], dim=-1).mean()
        assert abs(stats["cosine_fkl_rkl"] - cos) < 1e-6
        p_t = torch.softmax(zt.double() / tau, -1)[torch.arange(len(targets)), targets]
        assert abs(stats["teacher_non_target_mass"] - (1 - p_t).mean()) < 1e-9


def test_higher_tau_exposes_more_non_target_mass_and_prop_2_1_converges():
    teacher, student = tiny_pair()
    zs, zt, _ = analysis.response_logits(teacher, student, data.byte_tokenizer(),
                                         data.toy_split("train")[:3])
    # where the target is the teacher's top token, its mass can only fall as tau grows
    targets = zt.argmax(-1)
    rows = [analysis.gradient_stats(zs, zt, targets, tau) for tau in (1.0, 3.0, 100.0, 1000.0)]
    masses = [r["teacher_non_target_mass"] for r in rows]
    assert masses == sorted(masses) and masses[-1] > 0.99  # p^tau flattens towards uniform
    assert rows[-1]["prop21_gap_fkl"] < 0.01 and rows[-1]["prop21_gap_rkl"] < 0.01
    assert rows[-1]["cosine_fkl_rkl"] > 0.999  # FKL and RKL become the same objective
    assert rows[0]["prop21_gap_fkl"] > rows[-1]["prop21_gap_fkl"]
    assert "| 1000 |" in analysis.table(rows)
