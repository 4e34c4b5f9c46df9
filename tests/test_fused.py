"""fused_loss.fused_distill_loss (#23, the output head fused into the loss): from hidden states and head
weights, the same value and the same gradients (hidden states, head weight) as the plain distill_loss
and CE on the full logits, for every objective, several tau, tied and untied heads, heads wider than the
tokenizer, and a kd/CE mix, both in chunks of whole rows and in tiles of the vocabulary; bf16 inputs
stay finite."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import assert_float32_close
import fused_loss
import losses
from fused_loss import GRAD_SUM, SUMS_OVER_VOCAB, TILED, fused_distill_loss
from losses import LOSSES, ce_loss, distill_loss


def setting(seed=0, V=40, n_ids=37, tied=False):
    g = torch.Generator().manual_seed(seed)
    B, T, H = 2, 6, 8
    student_hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    head = (torch.randn(V, H, generator=g) / 2).requires_grad_()
    teacher_hidden = torch.randn(B, T, 12, generator=g)
    teacher_head = torch.randn(V + 5, 12, generator=g)  # a wider teacher: cut to n_ids too
    labels = torch.randint(0, n_ids, (B, T), generator=g)
    labels[0, :2] = -100  # prompt positions
    labels[1, 4:] = -100  # padding
    return student_hidden, head, teacher_hidden, teacher_head, labels


def assert_close(got, want):
    """float32 rounding, with room for the tiled path's other order of adding up each row's terms: 1e-5
    of the largest entry (ab at tau = 10 loses ~7e-6 to cancellation in float32 on either path, against a
    float64 computation; a wrong tile offset or a missing term is off by ~1e-1)."""
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def plain(name, student_hidden, head, teacher_hidden, teacher_head, labels, tau, n_ids, kd_weight, ce_weight):
    student_logits = student_hidden @ head[:n_ids].t()
    teacher_logits = teacher_hidden @ teacher_head[:n_ids].t()
    kd = distill_loss(name, student_logits, teacher_logits, labels, tau=tau, reduction="sum")
    ce = ce_loss(student_logits, labels, reduction="sum")
    return kd_weight * kd + ce_weight * ce, kd, ce


PIECES = {"rows": dict(chunk_size=3), "vocab": dict(chunk_size=5, vocab_tile=7)}  # rows a block; 7 of 37 ids a tile


@pytest.mark.parametrize("name,split", [(name, "rows") for name in LOSSES] + [(name, "vocab") for name in TILED])
@pytest.mark.parametrize("tau", [1.0, 2.5, 10.0])
def test_fused_equals_the_plain_form_in_value_and_gradient(name, split, tau):
    inputs = setting()
    want, want_kd, want_ce = plain(name, *inputs, tau, 37, 0.7, 0.3)
    want.backward()
    want_grads = [inputs[0].grad.clone(), inputs[1].grad.clone()]
    inputs[0].grad = inputs[1].grad = None
    got, kd, ce = fused_distill_loss(name, *inputs, tau=tau, n_ids=37, kd_weight=0.7, ce_weight=0.3, **PIECES[split])
    got.backward()
    for a, b in ((got, want), (kd, want_kd), (ce, want_ce), (inputs[0].grad, want_grads[0]),
                 (inputs[1].grad, want_grads[1])):
        assert_close(a.detach(), b.detach())
    assert not bool(inputs[1].grad[37:].any())  # rows beyond the tokenizer: no gradient


@pytest.mark.parametrize("name", list(LOSSES))
def test_the_objectives_that_sum_over_the_vocabulary_are_the_listed_ones(name):
    """What the tiled path relies on: for the SUMS_OVER_VOCAB objectives the value on the whole
    vocabulary is the sum of the values on two parts of it (log-probabilities normalised over the
    whole); AKL and DRKL are not (DRKL takes tiles through a form of its own, fused_loss._drkl_from_sums;
    AKL whole rows). GRAD_SUM's formulas give the sum of the gradient w.r.t. log q (autograd), from sums
    of powers of p and q computed here from the whole rows; AB's in its general case and its four limits."""
    g = torch.Generator().manual_seed(1)
    log_p = torch.randn(5, 30, generator=g).mul(2).log_softmax(-1)
    log_q = torch.randn(5, 30, generator=g).mul(2).log_softmax(-1).requires_grad_()
    target = torch.randint(0, 30, (5,), generator=g)
    whole = LOSSES[name](log_p, log_q, target)
    parts = LOSSES[name](log_p[:, :11], log_q[:, :11], target.clamp(max=10)) + \
        LOSSES[name](log_p[:, 11:], log_q[:, 11:], (target - 11).clamp(min=0))
    assert torch.allclose(whole, parts, atol=1e-6) == (name in SUMS_OVER_VOCAB)

    def power(a, b):  # sum_v q^a p^b and the mean of log q - log p under those weights, from the whole rows
        weights = (a * log_q + b * log_p).detach().exp()
        return weights.sum(-1), (weights * (log_q - log_p).detach()).sum(-1) / weights.sum(-1)
    settings = {"sym": ({}, {"weight": 0.3}), "ab": ({}, {"alpha": 0.5, "beta": 0.3}, {"alpha": 0.0, "beta": 0.7},
                {"alpha": 0.5, "beta": 0.0}, {"alpha": 0.4, "beta": -0.4}, {"alpha": 0.0, "beta": 0.0})}
    for hparams in settings.get(name, ({},)) if name in GRAD_SUM else ():
        grad = torch.autograd.grad(LOSSES[name](log_p, log_q, target, **hparams).sum(), log_q)[0]
        _, _, grad_sum = GRAD_SUM[name](**{**losses.defaults(LOSSES[name]), **hparams})
        assert torch.allclose(grad.sum(-1), grad_sum(power), atol=1e-5)


@pytest.mark.parametrize("name,hparams", [("fkl", {}), ("rkl", {}), ("sym", {}), ("sym", {"weight": 0.0}), ("sym", {"weight": 1.0}),
                                          ("js", {}), ("js", {"beta": 0.8}), ("js", {"beta": 0.0}), ("js", {"beta": 1.0}),
                                          ("sfkl", {}), ("sfkl", {"alpha": 0.0}), ("sfkl", {"alpha": 0.9}),
                                          ("srkl", {}), ("srkl", {"alpha": 0.0}), ("srkl", {"alpha": 0.9}), ("tvd", {}),
                                          ("akl", {}), ("akl", {"mu": 0.9}), ("akl", {"mu": 0.0})])
def test_the_written_out_derivatives_are_autograds(name, hparams):
    """DLOG_Q (what the tiled path takes instead of autograd, for all but AB; AKL's is SYM with each row's weight
    from its head): each row's value and dKD/dlog q equal the objective's value and autograd's gradient, on rows
    far apart (logits x 30, as at tau 0.1) and rows where p = q at some ids (TVD's kink: both give 0 there)."""
    g = torch.Generator().manual_seed(2)
    log_p = (torch.randn(6, 40, generator=g) * torch.tensor([1.0, 1, 1, 30, 30, 1])[:, None]).log_softmax(-1)
    log_q = (torch.randn(6, 40, generator=g) * torch.tensor([1.0, 1, 1, 30, 30, 1])[:, None]).log_softmax(-1)
    log_q[5, :10] = log_p[5, :10]  # p = q at ten ids of the last row
    log_q = log_q.requires_grad_()
    want = LOSSES[name](log_p, log_q, None, **hparams)
    want_grad = torch.autograd.grad(want.sum(), log_q)[0]
    hparams = {**losses.defaults(LOSSES[name]), **hparams}
    if name == "akl":
        hparams = {"weight": losses.akl_head_weight(log_p, log_q.detach(), hparams["mu"])}
    value, dlog_q = fused_loss.DLOG_Q[name](log_p, log_q.detach(), **hparams)
    assert bool(dlog_q.isfinite().all())
    assert torch.allclose(value, want.detach(), rtol=1e-6, atol=1e-7)
    assert torch.allclose(dlog_q, want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(TILED) + ["none"])
def test_compiled_tiles_equal_the_plain_form(name):
    """compiled=True (torch.compile of each tile's element-wise work; what train.py runs on the tiled path):
    the same value and gradients as distill_loss and CE, for every tiled objective and without a teacher."""
    inputs = setting()
    kd_weight, teacher = (0.0, (None, None)) if name == "none" else (0.7, inputs[2:4])
    want, _, want_ce = plain("fkl" if name == "none" else name, *inputs, 2.5, 37, kd_weight, 0.3)
    got, _, ce = fused_distill_loss("fkl" if name == "none" else name, inputs[0], inputs[1], *teacher, inputs[4],
                                    tau=2.5, n_ids=37, kd_weight=kd_weight, ce_weight=0.3, compiled=True, **PIECES["vocab"])
    assert_close(got.detach(), want.detach())
    assert_close(ce, want_ce.detach())
    for a, b in zip(torch.autograd.grad(got, inputs[:2]), torch.autograd.grad(want, inputs[:2])):
        assert_close(a, b)


def test_compiled_tiles_compile_once_for_a_run():
    """What changes from one training step to the next - the loss weights (a token mean divides by the
    batch's token count), the number of response rows - compiles nothing new."""
    import torch._dynamo.utils
    graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]

    def call(seed, tau, kd_weight, prompt=2):  # labels -100 on `prompt` more positions: fewer rows
        inputs = setting(seed)
        inputs[4][0, 2:2 + prompt] = -100
        fused_distill_loss("js", *inputs, tau=tau, n_ids=37, kd_weight=kd_weight, ce_weight=1 - kd_weight,
                           compiled=True, **PIECES["vocab"])[0].backward()
    start = graphs()
    call(0, 1.5, 0.5)  # 6 rows: one block; tiles of 7 ids, then 2
    call(1, 1.5, 0.5, prompt=0)  # 8 rows: 5, then 3
    before = graphs()
    assert before > start
    call(2, 1.5, 0.25, prompt=1)
    call(3, 1.5, 0.125, prompt=3)
    assert graphs() == before


def test_the_tiled_path_takes_the_objectives_hyperparameters():
    """sym's weight enters both its value and the formula for S (GRAD_SUM); js's beta its value; ab's
    alpha and beta its value and which of its five formulas for S; drkl's gamma its form from row sums."""
    for name, hparams in (("sym", {"weight": 0.3}), ("js", {"beta": 0.8}), ("ab", {"alpha": 0.5, "beta": 0.3}),
                          ("ab", {"alpha": 0.0, "beta": 0.7}), ("ab", {"alpha": 0.5, "beta": 0.0}),
                          ("ab", {"alpha": 0.4, "beta": -0.4}), ("ab", {"alpha": 0.0, "beta": 0.0}),
                          ("drkl", {"gamma": 0.2})):
        inputs = setting()
        logits = [inputs[0] @ inputs[1][:37].t(), inputs[2] @ inputs[3][:37].t()]
        want = distill_loss(name, *logits, inputs[4], tau=2.0, reduction="sum", **hparams)
        got, _, _ = fused_distill_loss(name, *inputs, tau=2.0, n_ids=37, **PIECES["vocab"], **hparams)
        assert_close(got.detach(), want.detach())
        for a, b in zip(torch.autograd.grad(got, inputs[:2]), torch.autograd.grad(want, inputs[:2])):
            assert_close(a, b)


def test_a_large_vocabulary_takes_tiles_by_itself_and_a_small_one_whole_rows(monkeypatch):
    """The automatic choice (no chunk_size, vocab_tile): whole rows while ~8 MB holds >= 256 of them,
    tiles beyond (V = 10,000: 209 rows), DRKL and AKL too; the value and gradient as plain."""
    calls = []
    for piece in ("_whole_rows", "_vocab_tiles"):
        real = getattr(fused_loss, piece)
        monkeypatch.setattr(fused_loss, piece, lambda *a, real=real, piece=piece, **k: calls.append(piece) or real(*a, **k))
    for name, V, path in (("rkl", 10_000, "_vocab_tiles"), ("drkl", 10_000, "_vocab_tiles"), ("akl", 10_000, "_vocab_tiles"),
                          ("rkl", 8_000, "_whole_rows"), ("akl", 8_000, "_whole_rows")):
        calls.clear()
        inputs = setting(V=V, n_ids=V)
        want, _, _ = plain(name, *inputs, 2.0, V, 1.0, 0.5)
        want_grads = torch.autograd.grad(want, inputs[:2])
        got, _, _ = fused_distill_loss(name, *inputs, tau=2.0, kd_weight=1.0, ce_weight=0.5)
        assert set(calls) == {path}
        assert_close(got.detach(), want.detach())
        for a, b in zip(torch.autograd.grad(got, inputs[:2]), want_grads):
            assert_close(a, b)


@pytest.mark.parametrize("vocab_tile", [1, 4])
def test_drkl_on_tiles_where_a_tile_holds_only_the_target_and_where_the_student_is_sure(vocab_tile):
    """DRKL's tiles add up the ids other than the target: with tiles of one id, and with 37 ids in
    tiles of 4 (the last holds id 36 alone), a tile - the first one too - can hold nothing but the
    target; and a student sure of the target (q_t ~ 1 - 1e-9: log(1 - q_t) from the other ids' sum,
    not from 1 - q_t). Value and gradients as distill_loss on whole rows."""
    student_hidden, head, teacher_hidden, teacher_head, labels = setting()
    labels[0, 2], labels[0, 3], labels[1, 0] = 0, 36, 36
    with torch.no_grad():
        head[36] = student_hidden[1, 0] * 8  # the student's logit of id 36 at position (1, 0) far above the rest
    for tau in (1.0, 3.0):
        want, want_kd, _ = plain("drkl", student_hidden, head, teacher_hidden, teacher_head, labels, tau, 37, 1.0, 0.2)
        got, kd, _ = fused_distill_loss("drkl", student_hidden, head, teacher_hidden, teacher_head, labels, tau=tau,
                                        n_ids=37, ce_weight=0.2, chunk_size=5, vocab_tile=vocab_tile)
        assert_close(kd, want_kd.detach())
        for a, b in zip(torch.autograd.grad(got, [student_hidden, head]),
                        torch.autograd.grad(want, [student_hidden, head])):
            assert bool(a.isfinite().all())
            assert_close(a, b)


@pytest.mark.parametrize("mu", [0.0, 0.3, 0.5, 0.8, 0.9, 1.0])
@pytest.mark.parametrize("tile", [1, 7, 64])
def test_akl_head_on_tiles_is_the_sorted_rows(mu, tile):
    """AKL's weight on tiles (_akl_weight: a radix select on the teacher's logits, 3 passes) equals
    losses.akl_head_weight's on whole rows (a sort): rows near uniform (the head takes many ids), far apart
    (logits x 30: the top-1 alone), a student equal to the teacher at some ids, and a row whose teacher
    gives 5 ids one logit at the head's edge - the sort takes as many of them as fit under mu, and since
    the student gives them one logit too, which ones does not matter - and its float32 bits in different
    first 11 bits (negative, positive logits)."""
    g = torch.Generator().manual_seed(3)
    n, V, tau = 6, 37, 1.5
    scale = torch.tensor([0.1, 1.0, 1.0, 30.0, 1.0, 1.0])[:, None]
    z, t = torch.randn(n, V, generator=g) * scale, torch.randn(n, V, generator=g) * scale
    z[2, :9] = t[2, :9]  # the student equals the teacher at 9 ids
    # 10 ids of 0.765 in all, then 5 ids tied at 0.01 (the student gives them one logit too), then the rest:
    # at mu = 0.8 the head takes 3 of the 5
    t[4] = tau * torch.cat([torch.linspace(0.0745, 0.0785, 10), torch.full((5,), 0.01), torch.linspace(0.008, 0.0088, 22)]).log()
    z[4, 10:15] = -0.5
    lse, teacher_lse = (z / tau).logsumexp(-1), (t / tau).logsumexp(-1)
    tiles = [slice(c, min(c + tile, V)) for c in range(0, V, tile)]
    got = fused_loss._akl_weight(tiles, lambda cols: z[:, cols], lambda cols: t[:, cols], lse, teacher_lse, tau, mu)
    want = losses.akl_head_weight((t / tau).log_softmax(-1), (z / tau).log_softmax(-1), mu)
    p = (t / tau).softmax(-1)
    assert p[4, :10].sum() + 3 * p[4, 10] <= 0.8 < p[4, :10].sum() + 4 * p[4, 10]  # the tie straddles mu = 0.8
    if mu == 1:  # every id is in the head (float32 may round the whole mass above 1: not a reason to drop one)
        assert bool((want == 1).all())
    assert torch.allclose(got.float(), want, atol=1e-6)


class CountProducts(TorchDispatchMode):
    """Counts the matrix products run under it (the head's: logits, and the two gradients)."""
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default)
        return func(*args, **(kwargs or {}))


def test_tvd_keeps_the_signs_for_pass_3_and_makes_the_teachers_logits_again_where_p_equals_q():
    """TVD's pass 3 takes sign(q - p) from pass 2 (a bit an id) instead of the teacher's logits: 7 products a
    tile, not JS's 8, same value and gradients. Where q_v = p_v > 0 the sign is 0, which the bit cannot
    hold: a teacher that is the student with two ids' head rows swapped ties at all other ids of a row,
    so each tile's teacher logits are made again, and the gradient is still distill_loss's (without that
    it is off by ~0.04)."""
    inputs = setting()
    tiles = 2 * 6  # 8 response rows in blocks of 5, 37 ids in tiles of 7
    for name, products in (("js", 8), ("tvd", 7)):
        want, _, _ = plain(name, *inputs, 2.5, 37, 0.7, 0.3)
        with CountProducts() as counted:
            got, _, _ = fused_distill_loss(name, *inputs, tau=2.5, n_ids=37, kd_weight=0.7, ce_weight=0.3, **PIECES["vocab"])
        assert counted.count == products * tiles
        for a, b in zip(torch.autograd.grad(got, inputs[:2]), torch.autograd.grad(want, inputs[:2])):
            assert_close(a, b)
    student_hidden, head, _, _, labels = inputs
    teacher_head = head.detach().clone()
    teacher_head[[3, 4]] = teacher_head[[4, 3]]
    inputs = (student_hidden, head, student_hidden.detach().clone(), teacher_head, labels)
    want, _, _ = plain("tvd", *inputs, 2.5, 37, 0.7, 0.3)
    with CountProducts() as counted:
        got, _, _ = fused_distill_loss("tvd", *inputs, tau=2.5, n_ids=37, kd_weight=0.7, ce_weight=0.3, **PIECES["vocab"])
    assert counted.count == 8 * tiles
    for a, b in zip(torch.autograd.grad(got, inputs[:2]), torch.autograd.grad(want, inputs[:2])):
        assert_close(a, b)


@pytest.mark.parametrize("name", ["fkl", "js", "ab", "drkl"])
def test_many_tiles_keep_float32_accuracy(name):
    """Each row's sums over a vocabulary of 50,000 ids in 98 tiles (log-sum-exps, a mean, powers): the value
    and gradients within 1e-5 of a float64 computation; the plain form in float32 is within ~3e-6, the tiles
    ~6e-6. Running sums kept in float32 round at every tile and miss by 1e-5 (DRKL) to 5e-5 (AB). (TVD is
    not here: its gradient jumps where p_v = q_v, so any rounding may flip a term's sign.)"""
    g = torch.Generator().manual_seed(3)
    N, H, V = 48, 64, 50_000
    student_hidden = torch.randn(1, N, H, dtype=torch.float64, generator=g, requires_grad=True)
    head = (torch.randn(V, H, dtype=torch.float64, generator=g) / 4).requires_grad_()
    teacher_hidden, teacher_head = torch.randn(1, N, H, dtype=torch.float64, generator=g), torch.randn(V, H, dtype=torch.float64, generator=g) / 4
    labels = torch.randint(0, V, (1, N), generator=g)
    want = distill_loss(name, student_hidden @ head.t(), teacher_hidden @ teacher_head.t(), labels, reduction="sum")
    want_grads = torch.autograd.grad(want, [student_hidden, head])
    hidden, weight = student_hidden.detach().float().requires_grad_(), head.detach().float().requires_grad_()
    got, _, _ = fused_distill_loss(name, hidden, weight, teacher_hidden.float(), teacher_head.float(), labels,
                                   chunk_size=N, vocab_tile=512)
    assert abs(float(got.detach()) - float(want.detach())) <= 1e-5 * abs(float(want.detach()))
    for a, b in zip(torch.autograd.grad(got, [hidden, weight]), want_grads):
        assert float((a.double() - b).abs().max()) <= 1e-5 * float(b.abs().max())


@pytest.mark.parametrize("split", list(PIECES))
def test_a_frozen_head_and_no_gradient_at_all(split):
    """A LoRA student's head is frozen: only the hidden states get a gradient, the same as plain; under
    no_grad the value alone (the tiled path then adds up KD without its gradient passes)."""
    for name in ("fkl", "js"):
        student_hidden, head, teacher_hidden, teacher_head, labels = setting()
        head = head.detach()
        want, _, _ = plain(name, student_hidden, head, teacher_hidden, teacher_head, labels, 2.0, 37, 1.0, 0.5)
        got, _, _ = fused_distill_loss(name, student_hidden, head, teacher_hidden, teacher_head, labels, tau=2.0,
                                       n_ids=37, ce_weight=0.5, **PIECES[split])
        assert_close(torch.autograd.grad(got, student_hidden)[0], torch.autograd.grad(want, student_hidden)[0])
        with torch.no_grad():
            value, kd, _ = fused_distill_loss(name, student_hidden, head, teacher_hidden, teacher_head, labels,
                                              tau=2.0, n_ids=37, ce_weight=0.5, **PIECES[split])
        assert_close(value, want.detach())


def test_a_tied_head_gets_both_gradients_and_pure_kd_needs_no_ce():
    torch.manual_seed(0)
    embedding = torch.randn(40, 8, requires_grad=True)  # the head is the embedding (tied)
    ids = torch.randint(0, 40, (2, 6))
    student_hidden = embedding[ids] * 2
    _, _, teacher_hidden, teacher_head, labels = setting()
    want, _, _ = plain("rkl", student_hidden, embedding, teacher_hidden, teacher_head, labels, 2.0, 40, 1.0, 0.0)
    want_grad = torch.autograd.grad(want, embedding)[0]
    student_hidden = embedding[ids] * 2
    got, _, ce = fused_distill_loss("rkl", student_hidden, embedding, teacher_hidden, teacher_head, labels, tau=2.0)
    assert_float32_close(torch.autograd.grad(got, embedding)[0], want_grad)
    # CE (ce_weight 0) is summed for the log all the same, with no gradient in the loss
    assert_float32_close(ce, ce_loss((student_hidden @ embedding.t()).detach(), labels, reduction="sum"))


@pytest.mark.parametrize("split", list(PIECES))
def test_without_a_teacher_it_is_the_cross_entropy(split):  # SFT
    student_hidden, head, _, _, labels = setting()
    want = ce_loss(student_hidden @ head.t(), labels, reduction="sum")
    want_grad = torch.autograd.grad(want, [student_hidden, head])
    got, kd, ce = fused_distill_loss("fkl", student_hidden, head, None, None, labels, kd_weight=0.0, ce_weight=1.0,
                                     **PIECES[split])
    for a, b in zip(torch.autograd.grad(got, [student_hidden, head]), want_grad):
        assert_close(a, b)
    assert_close(ce, want.detach())
    assert float(kd) == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,split", [("fkl", "rows"), ("fkl", "vocab"), ("js", "vocab")])
def test_half_precision_inputs_give_finite_float32_losses_for_extreme_tau(dtype, name, split):
    student_hidden, head, teacher_hidden, teacher_head, labels = setting()
    for tau in (0.1, 100.0):
        hidden = (student_hidden.detach() * 30).to(dtype).requires_grad_()
        loss, _, _ = fused_distill_loss(name, hidden, head.detach().to(dtype).requires_grad_(),
                                        teacher_hidden.to(dtype) * 30, teacher_head.to(dtype), labels, tau=tau,
                                        ce_weight=0.5, **PIECES[split])
        loss.backward()
        assert loss.dtype == torch.float32 and bool(loss.isfinite()) and bool(hidden.grad.isfinite().all())


def test_activation_checkpointing_gives_the_same_gradients_and_the_same_run(tmp_path):
    """Recomputing each block in backward instead of keeping its activations changes no number: the
    same gradients for one batch, and the same weights after a short KD run (--activation-checkpointing)."""
    import train
    import toy
    from test_evaluate import tiny_toy_model
    from test_train import weights
    torch.manual_seed(0)
    model = toy.scratch_model("scratch:3x48")
    ids = torch.randint(0, 257, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.checkpointing = checkpointing
        model(ids, mask).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    tiny_toy_model(tmp_path / "teacher")
    common = ["--preset", "toy", "--teacher", str(tmp_path / "teacher"), "--student", "toy-tiny", "--loss", "js",
              "--tau", "2", "--responses", "dataset", "--train-examples", "64", "--batch-size", "8", "--max-steps", "3",
              "--valid-examples", "2", "--valid-max-new-tokens", "4", "--eval-benchmarks", ""]
    train.main([*common, "--out", str(tmp_path / "plain")])
    train.main([*common, "--activation-checkpointing", "--out", str(tmp_path / "checkpointed")])
    plain, checkpointed = weights(tmp_path / "plain"), weights(tmp_path / "checkpointed")
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def assert_close_through_a_network(got, want):
    """float32 rounding, carried through two blocks' backward: 1e-5 of the tensor's largest entry."""
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def models(tied, seed=0):
    """A student and a teacher of different widths, with embedding rows past the tokenizer's 37 ids
    (padding), the teacher's fewer than the student's."""
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    make = lambda vocab, width: GPT(GPTConfig(vocab_size=vocab, n_positions=32, n_layer=2, n_head=2, n_embd=width,
                                              ffn_dim=4 * width, tie_embeddings=tied)).float()
    return make(44, 16), make(40, 24).eval().requires_grad_(False)


def batch(seed, B=3, T=10, n_ids=37):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, n_ids, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 7:] = 0  # right padding
    labels = torch.cat([input_ids[:, 1:], torch.full((B, 1), -100)], 1)
    labels[:, :3] = -100  # the prompt
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


@pytest.mark.parametrize("name,split", [(name, "rows") for name in LOSSES] + [("rkl", "vocab"), ("js", "vocab"), ("drkl", "vocab")])
@pytest.mark.parametrize("tied", [True, False])
def test_the_training_step_is_the_same_fused_and_from_logits(name, split, tied, monkeypatch):
    """train.loss_step with the fused head (the default) and with --no-fused-loss: the same loss, log
    sums and gradient of every student weight, at two tau, with a CE mix, and on an on-policy step;
    also with the fused loss made to take tiles (7 ids, blocks of 5 rows) inside the models' forward."""
    import contextlib
    import functools
    import types
    import train
    from losses import HPARAMS
    if split == "vocab":
        monkeypatch.setattr(train, "fused_distill_loss", functools.partial(fused_distill_loss, **PIECES[split]))
    student, teacher = models(tied)
    on, kd_on = batch(1), batch(2, T=12)
    for tau, kd_ratio, kd_batch in ((1.0, 1.0, on), (3.0, 0.6, on), (2.0, 0.5, kd_on)):
        args = types.SimpleNamespace(loss=name, tau=tau, tau_sq=False, kd_ratio=kd_ratio, compile=False, compile_loss=False,
                                     **dict.fromkeys(HPARAMS))
        results = []
        for fused in (True, False):
            args.fused_loss = fused
            student.zero_grad()
            loss, ce, kd = train.loss_step(args, student, teacher, on, kd_batch, contextlib.nullcontext, 37,
                                           (1 - kd_ratio) / 20, kd_ratio / 20)
            loss.backward()
            results.append([loss.detach(), ce, kd] + [p.grad.clone() for p in student.parameters()])
        for a, b in zip(results[0][:3], results[1][:3]):  # sums over ~20 tokens of terms ~log V: tiles make
            assert abs(float(a - b)) <= 1e-5 * max(abs(float(b)), 1.0)  # each row's log q another way, ~1e-7 each
        for a, b in zip(results[0][3:], results[1][3:]):
            assert_close_through_a_network(a, b)


def test_sft_step_is_the_same_fused_and_from_logits():
    import contextlib
    import types
    import train
    student, _ = models(tied=False)
    from losses import HPARAMS
    args = types.SimpleNamespace(loss="fkl", tau=1.0, tau_sq=False, kd_ratio=1.0, compile=False, compile_loss=False, **dict.fromkeys(HPARAMS))
    sft_batch, results = batch(1), []
    for fused in (True, False):
        args.fused_loss = fused
        student.zero_grad()
        loss, ce, _ = train.loss_step(args, student, None, sft_batch, sft_batch, contextlib.nullcontext, 37, 0.05, 0.0)
        loss.backward()
        results.append([loss.detach(), ce] + [p.grad.clone() for p in student.parameters()])
    for a, b in zip(*results):
        assert_close_through_a_network(a, b)
