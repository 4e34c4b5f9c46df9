"""--student-gen-ratio (beyond the paper): on-policy steps, where KD is taken on the student's own
responses."""
import json
import math
import os
import subprocess

import pytest
import torch

import config
import data
import distributed
import train
from conftest import ROOT
from losses import LOSSES
from model import GPT
from test_train import TINY, assert_trained, make_teacher, run_torchrun, weights


def common(teacher, *extra):
    # --max-len 320: sampled responses of up to 64 tokens
    return ["--preset", "toy", "--teacher", str(teacher), "--student", "toy-tiny", "--loss", "fkl",
            "--tau", "2", "--batch-size", "8", "--epochs", "1", "--max-len", "320", *TINY, *extra]


def logged_steps(run_dir):
    return [json.loads(line) for line in open(run_dir / "log.jsonl") if '"loss"' in line]


def test_ratio_zero_never_samples_and_trains_as_without_the_flag(tmp_path, monkeypatch):
    teacher = make_teacher(tmp_path)
    train.main([*common(teacher, "--max-steps", "3"), "--out", str(tmp_path / "plain")])
    monkeypatch.setattr(distributed.Student, "for_sampling",
                        lambda self: pytest.fail("sampled at ratio 0"))
    train.main([*common(teacher, "--max-steps", "3", "--student-gen-ratio", "0"), "--out",
                str(tmp_path / "zero")])
    plain, zero = weights(tmp_path / "plain"), weights(tmp_path / "zero")
    assert_trained(plain)
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert "on_policy" not in logged_steps(tmp_path / "zero")[0]


def test_ratio_one_takes_kd_only_on_the_students_sampled_tokens(tmp_path, monkeypatch):
    """Every KD label is a token the student sampled (its response cut at EOS, EOS included), placed
    right after the example's own prompt; CE stays on the fixed responses."""
    teacher = make_teacher(tmp_path)
    generated, kd_calls, ce_labels = [], [], []
    generate, fused = GPT.generate, train.fused_distill_loss

    def recording_generate(self, input_ids, attention_mask, **kw):
        new = generate(self, input_ids, attention_mask, **kw)
        # the on-policy call, not validation
        if self.training is False and isinstance(kw.get("generator"), list):
            prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
            generated.append((prompts, new.tolist()))
        return new

    def recording_loss(loss, hidden, head, teacher_hidden, teacher_head, labels, **kw):
        # on-policy, two calls a micro-batch: CE on the fixed responses (no teacher), KD on the sampled ones
        (ce_labels if teacher_hidden is None else kd_calls).append(labels.clone())
        return fused(loss, hidden, head, teacher_hidden, teacher_head, labels, **kw)

    monkeypatch.setattr(GPT, "generate", recording_generate)
    monkeypatch.setattr(train, "fused_distill_loss", recording_loss)
    out = tmp_path / "on"
    train.main([*common(teacher, "--max-steps", "3", "--student-gen-ratio", "1",
                        "--micro-batch-size", "4"),
                "--out", str(out)])
    assert len(generated) == 3 and len(kd_calls) == 6  # one sampling per step, KD per micro-batch
    eos = data.load_tokenizer(str(teacher)).eos_id  # the toy BPE's
    for step, (prompts, rows) in enumerate(generated):
        for half in range(2):
            labels = kd_calls[2 * step + half]
            for row in range(4):
                prompt, sampled = prompts[4 * half + row], rows[4 * half + row]
                expected = sampled[:sampled.index(eos) + 1] if eos in sampled else sampled
                covered = (labels[row] != -100).nonzero().flatten().tolist()
                # position i predicts token i+1: the first covered position is the prompt's last
                # token
                assert covered == list(range(len(prompt) - 1, len(prompt) - 1 + len(expected)))
                assert labels[row, covered].tolist() == expected
    # CE: the fixed responses of the same examples
    for step in range(3):
        for half in range(2):
            assert not torch.equal(ce_labels[2 * step + half], kd_calls[2 * step + half])
    steps = logged_steps(out)
    assert all(s["on_policy"] for s in steps) and steps[-1]["on_policy_share"] == 1.0
    lengths = [sum(len(r[:r.index(eos) + 1] if eos in r else r) for r in rows) / 8
               for _, rows in generated]
    assert [s["sampled_len"] for s in steps] == pytest.approx(lengths)
    assert_trained(weights(out))



def test_every_objective_trains_on_policy(tmp_path):
    """λ = 1 with each objective of losses.py at τ = 2: every step on-policy, a finite KD loss, and
    the student's weights move."""
    teacher = make_teacher(tmp_path)
    for loss in LOSSES:
        out = tmp_path / loss
        argv = [*common(teacher, "--max-steps", "2", "--student-gen-ratio", "1"), "--out", str(out)]
        argv[argv.index("--loss") + 1] = loss
        train.main(argv)
        steps = logged_steps(out)
        assert [s["on_policy"] for s in steps] == [True, True], loss
        assert all(math.isfinite(s["kd"]) for s in steps), loss
        assert_trained(weights(out))

def test_half_ratio_two_processes_equal_one_process_ddp_and_fsdp(tmp_path):
    teacher = make_teacher(tmp_path)
    argv = common(teacher, "--max-steps", "4", "--student-gen-ratio", "0.5", "--micro-batch-size",
                  "2", "--device", "cpu")  # gloo on CPU for all three, also on a GPU machine
    train.main([*argv, "--out", str(tmp_path / "single")])
    run_torchrun(2, [*argv, "--out", str(tmp_path / "ddp")], tmp_path)
    run_torchrun(2, [*argv, "--fsdp", "--out", str(tmp_path / "fsdp")], tmp_path)
    single = weights(tmp_path / "single")
    flags = [s["on_policy"] for s in logged_steps(tmp_path / "single")]
    assert True in flags and False in flags, flags  # both kinds of step happened
    for run in ("ddp", "fsdp"):
        assert [s["on_policy"] for s in logged_steps(tmp_path / run)] == flags
        # the same responses were sampled
        assert [s["sampled_len"] for s in logged_steps(tmp_path / run)] == \
            [s["sampled_len"] for s in logged_steps(tmp_path / "single")]
        other = weights(tmp_path / run)
        for key in single:
            assert torch.allclose(other[key], single[key], atol=1e-5), (run, key)


def test_ce_on_fixed_and_kd_on_sampled_responses_two_processes_equal_one(tmp_path):
    """kd_ratio < 1 on on-policy steps: two student forwards per micro-batch (CE on the fixed
    responses, KD on the sampled ones) before one backward, under DDP and FSDP as in one process."""
    teacher = make_teacher(tmp_path)
    shared = ["--max-steps", "2", "--student-gen-ratio", "1", "--micro-batch-size", "2",
              "--device", "cpu"]
    argv = common(teacher, *shared, "--kd-ratio", "0.5")
    train.main([*argv, "--out", str(tmp_path / "single")])
    train.main([*common(teacher, *shared, "--kd-ratio", "1"), "--out", str(tmp_path / "kd-only")])
    run_torchrun(2, [*argv, "--out", str(tmp_path / "ddp")], tmp_path)
    run_torchrun(2, [*argv, "--fsdp", "--out", str(tmp_path / "fsdp")], tmp_path)
    single, kd_only = weights(tmp_path / "single"), weights(tmp_path / "kd-only")
    assert not all(torch.equal(single[k], kd_only[k]) for k in single), "CE changed nothing"
    for run in ("ddp", "fsdp"):
        other = weights(tmp_path / run)
        for key in single:
            assert torch.allclose(other[key], single[key], atol=1e-5), (run, key)


def test_half_ratio_kill_and_resume_equals_a_straight_run(tmp_path):
    teacher = make_teacher(tmp_path)
    argv = common(teacher, "--student-gen-ratio", "0.5")
    train.main([*argv, "--max-steps", "6", "--out", str(tmp_path / "straight")])
    train.main([*argv, "--max-steps", "3", "--out", str(tmp_path / "cut")])
    train.main([*argv, "--max-steps", "6", "--resume", "--out", str(tmp_path / "cut")])
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "cut")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    def drawn(run):  # what each step drew and sampled, and the share so far (kept in last.pt)
        return [(s["step"], s["on_policy"], s["sampled_len"],
                 s["on_policy_share"]) for s in logged_steps(run)]
    assert drawn(tmp_path / "cut") == drawn(tmp_path / "straight")
    assert {on for _, on, _, _ in drawn(tmp_path / "straight")} == {True, False}
    with pytest.raises(SystemExit, match=r"different settings.*student_gen_ratio=0.5 -> 1.0"):
        train.main([*common(teacher, "--student-gen-ratio", "1"), "--max-steps", "8", "--resume",
                    "--out", str(tmp_path / "cut")])


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_a_ratio_outside_zero_one_is_refused_at_the_door(value):
    with pytest.raises(SystemExit,
                       match=rf"--student-gen-ratio must be a finite number in \[0, 1\], got "
                             rf"{value}"):
        config.parse_args(["--preset", "toy", "--student-gen-ratio", value])


def test_sft_takes_no_ratio():
    with pytest.raises(SystemExit, match="--student-gen-ratio is a KD setting"):
        config.parse_args(["--preset", "toy", "--mode", "sft", "--student", "toy-tiny",
                          "--student-gen-ratio", "0.5"])


def test_sweep_puts_an_on_policy_grid_in_its_own_directory(tmp_path):
    env = dict(os.environ, DRY_RUN="1", PRESET="toy", LOSSES="fkl rkl", TAUS="1 2", SEEDS="1",
               STUDENT_GEN_RATIO="0.5")
    result = subprocess.run(["bash", os.path.join(ROOT, "sweep.sh")], env=env, capture_output=True,
                            text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trained = [line for line in result.stdout.splitlines() if "/train.py " in line]
    assert len(trained) == 4
    assert all("--student-gen-ratio 0.5" in line and " --out runs/toy-gen0.5/" in line
               for line in trained)
    assert result.stdout.splitlines()[-1].endswith("summarize runs/toy-gen0.5")
