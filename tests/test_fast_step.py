"""The compiled training step (#23, --compile): lengths padded to buckets and attention by the causal flag
alone give the masked, unpadded step's loss and gradients; a compiled toy run trains like an eager one
with a handful of graphs; --compile with --fsdp is refused at the door."""
import contextlib
import re
import types

import pytest
import torch

import data
import train
from losses import HPARAMS
from test_fused import assert_close_through_a_network, models
from test_train import TINY, make_teacher, weights


def examples(seed=0, n=4, n_ids=37):
    g = torch.Generator().manual_seed(seed)
    draw = lambda k: torch.randint(1, n_ids, (k,), generator=g).tolist()
    return [(draw(3 + i), draw(4 + 2 * i)) for i in range(n)]  # rows of different lengths: right padding


@pytest.mark.parametrize("name", ["fkl", "rkl", "js"])
def test_bucketed_causal_only_batches_give_the_masked_steps_loss_and_gradients(name):
    student, teacher = models(tied=False)
    results = []
    for compiled, bucket in ((False, 1), (True, 16)):
        args = types.SimpleNamespace(loss=name, tau=2.0, tau_sq=False, kd_ratio=0.7, fused_loss=True, compile=compiled, compile_loss=compiled,
                                     **dict.fromkeys(HPARAMS))
        batch = data.collate_train(examples(), pad_id=0, bucket=bucket)
        assert batch[0].shape[1] % bucket == 0 and (bucket == 1 or batch[0].shape[1] > 14)
        student.zero_grad()
        loss, ce, kd = train.loss_step(args, student, teacher, batch, batch, contextlib.nullcontext, 37, 0.3 / 20,
                                       0.7 / 20)
        loss.backward()
        results.append([loss.detach(), ce, kd] + [p.grad.clone() for p in student.parameters()])
    for a, b in zip(*results):
        assert_close_through_a_network(a, b)


def test_a_compiled_toy_run_trains_like_an_eager_one_with_a_few_graphs(tmp_path, capsys):
    teacher = make_teacher(tmp_path)
    common = ["--preset", "toy", "--teacher", str(teacher), "--student", "toy-tiny", "--loss", "fkl", "--tau", "2",
              "--batch-size", "8", "--epochs", "1", "--max-steps", "4", *TINY]
    train.main([*common, "--out", str(tmp_path / "eager")])
    capsys.readouterr()
    train.main([*common, "--compile", "--out", str(tmp_path / "compiled")])
    graphs = int(re.search(r"torch.compile: (\d+) graphs compiled", capsys.readouterr().out).group(1))
    # a graph per length bucket (--max-len 512 / 4: at most 4) and grad mode (the teacher's forward has none)
    assert 1 <= graphs <= 8
    eager, compiled = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert all(torch.allclose(eager[k], compiled[k], atol=1e-5) for k in eager)


def test_compile_with_fsdp_is_refused_at_the_door(monkeypatch):
    import config
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match="--compile with --fsdp is not supported"):
        config.parse_args(["--preset", "toy", "--fsdp", "--compile"])
