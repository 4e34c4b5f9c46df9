"""losses.py against float64 re-computations from explicit probabilities, the paper's gradient
identities, and the properties each objective must have. Nothing here is shared with losses.py."""
import math

import pytest
import torch

import losses
from conftest import assert_float32_close
from losses import LOSSES, ce_loss, distill_loss, distill_loss_chunked

torch.set_default_dtype(torch.float32)
NAMES = list(LOSSES)
# the plain form (what a reader meets first) and the chunked engine (what train.py uses) must both
# pass
IMPLEMENTATIONS = pytest.mark.parametrize("distill", [distill_loss, distill_loss_chunked],
                                          ids=["plain", "chunked"])


def batch(B=3, T=7, V=11, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(B, T, V, generator=g)).requires_grad_()
    teacher = scale * torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100   # a prompt
    labels[-1, 5:] = -100  # padding
    return student, teacher, labels


# ---- float64 references, written out from explicit probability vectors ---------------------------

def kl64(a, b):
    return sum(a[i] * math.log(a[i] / b[i]) for i in range(len(a)) if a[i] > 0)


def reference_token(name, p, q, t, hp):
    """One token's value from probability lists p (teacher), q (student), the target t."""
    V = len(p)
    if name == "fkl":
        return kl64(p, q)
    if name == "rkl":
        return kl64(q, p)
    if name == "sym":
        w = hp.get("weight", 0.5)
        return w * kl64(p, q) + (1 - w) * kl64(q, p)
    if name == "js":
        b = hp.get("beta", 0.5)
        m = [b * p[i] + (1 - b) * q[i] for i in range(V)]
        return b * kl64(p, m) + (1 - b) * kl64(q, m)
    if name == "sfkl":
        a = hp.get("alpha", 0.1)
        return kl64(p, [a * p[i] + (1 - a) * q[i] for i in range(V)])
    if name == "srkl":
        a = hp.get("alpha", 0.1)
        return kl64(q, [a * q[i] + (1 - a) * p[i] for i in range(V)])
    if name == "akl":
        mu = hp.get("mu", 0.5)
        order = sorted(range(V), key=lambda i: -p[i])
        head, mass = {order[0]}, 0.0
        for i in order:
            mass += p[i]
            if mass <= mu:
                head.add(i)
        e = [abs(p[i] - q[i]) for i in range(V)]
        g_head = sum(e[i] for i in head) / sum(e)
        return g_head * kl64(p, q) + (1 - g_head) * kl64(q, p)
    if name == "ab":
        a, b = hp.get("alpha", 0.2), hp.get("beta", 0.7)
        return -1 / (a * b) * sum(p[i] ** a * q[i] ** b - a / (a + b) * p[i] ** (a + b)
                                  - b / (a + b) * q[i] ** (a + b) for i in range(V))
    if name == "drkl":
        g = hp.get("gamma", 0.5)
        q_hat = [q[i] / (1 - q[t]) for i in range(V) if i != t]
        p_hat = [p[i] / (1 - p[t]) for i in range(V) if i != t]
        return kl64([q[t], 1 - q[t]], [p[t], 1 - p[t]]) + g * kl64(q_hat, p_hat)
    if name == "tvd":
        return 0.5 * sum(abs(p[i] - q[i]) for i in range(V))
    raise KeyError(name)


def softmax64(row, tau):
    z = [x / tau for x in row]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    return [x / sum(e) for x in e]


def reference_loss(name, student, teacher, labels, tau, hp=None):
    values = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] != -100:
                p = softmax64(teacher[b, t].double().tolist(), tau)
                q = softmax64(student[b, t].double().tolist(), tau)
                values.append(reference_token(name, p, q, int(labels[b, t]), hp or {}))
    return sum(values) / len(values)


@IMPLEMENTATIONS
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.5, 4.0])
def test_each_objective_equals_float64_reference(name, tau, distill):
    student, teacher, labels = batch(seed=int(tau * 10))
    got = distill(name, student, teacher, labels, tau=tau).item()
    want = reference_loss(name, student, teacher, labels, tau)
    assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (got, want)


@pytest.mark.parametrize("name,hp",
                         [("sym", dict(weight=0.3)), ("js", dict(beta=0.2)),
                          ("sfkl", dict(alpha=0.4)),
                                     ("srkl", dict(alpha=0.3)), ("akl", dict(mu=0.8)),
                          ("ab", dict(alpha=0.5, beta=1.3)),
                                     ("ab", dict(alpha=-0.3, beta=1.0)), ("drkl", dict(gamma=0.9))])
def test_hyper_parameters_reach_the_objective(name, hp):
    student, teacher, labels = batch(seed=5)
    got = distill_loss(name, student, teacher, labels, tau=2.0, **hp).item()
    want = reference_loss(name, student, teacher, labels, 2.0, hp)
    assert abs(got - want) <= 1e-6 * max(1, abs(got))


def test_ce_is_next_token_cross_entropy():
    student, _, labels = batch(seed=1)
    want = torch.nn.functional.cross_entropy(student.double().reshape(-1, 11), labels.reshape(-1),
                                             ignore_index=-100)
    assert abs(ce_loss(student, labels).item() - want.item()) <= 1e-6


# ---- the paper's gradient identities, via autograd -----------------------------------------------

def per_token_grad(name, student, teacher, labels, tau):
    student = student.detach().requires_grad_()
    distill_loss(name, student, teacher, labels, tau=tau, reduction="sum").backward()
    return student.grad


@IMPLEMENTATIONS
@pytest.mark.parametrize("tau", [0.7, 1.0, 3.0])
def test_fkl_gradient_is_eq2(tau, distill):
    student, teacher, labels = batch(seed=2)
    grad = per_token_grad("fkl", student, teacher, labels, tau).double()
    p, q = (teacher.double() / tau).softmax(-1), (student.detach().double() / tau).softmax(-1)
    want = (q - p) / tau * (labels != -100)[..., None]
    assert_float32_close(grad, want)


@IMPLEMENTATIONS
@pytest.mark.parametrize("tau", [0.7, 1.0, 3.0])
def test_rkl_gradient_is_eq3_and_eq4(tau, distill):
    student, teacher, labels = batch(seed=3)
    grad = per_token_grad("rkl", student, teacher, labels, tau).double()
    zs, zt = student.detach().double(), teacher.double()
    p, q = (zt / tau).softmax(-1), (zs / tau).softmax(-1)
    L = (q * (q.log() - p.log())).sum(-1, keepdim=True)
    eq3 = q * ((q / p).log() - L) / tau
    delta = zs - zt
    eq4 = q / tau**2 * (delta - (q * delta).sum(-1, keepdim=True))
    mask = (labels != -100)[..., None]
    assert_float32_close(grad, eq3 * mask)
    assert_float32_close(grad, eq4 * mask)


def test_prop_2_1_both_gradients_tend_to_the_logit_gap():
    student, teacher, labels = batch(seed=4, V=13)
    student = (student - student.mean(-1, keepdim=True)).detach()  # centred logits
    teacher = teacher - teacher.mean(-1, keepdim=True)
    tau, V = 1e3, 13
    limit = ((student - teacher) / V * (labels != -100)[..., None]).double()
    for name in ("fkl", "rkl"):
        scaled = tau**2 * per_token_grad(name, student, teacher, labels, tau).double()
        assert (scaled - limit).abs().max() <= 0.01 * limit.abs().max(), name


# ---- properties ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_nonnegative_and_zero_at_equality_even_after_a_shift(name):
    student, teacher, labels = batch(seed=6)
    for tau in (0.5, 1.0, 3.0):
        assert distill_loss(name, student, teacher, labels, tau=tau).item() >= -1e-7
        # a constant shift: same q
        same = distill_loss(name, teacher + 7.5, teacher, labels, tau=tau).item()
        assert abs(same) <= 1e-5, (name, tau, same)


def test_ab_limits_are_continuous_and_special_cases():
    student, teacher, labels = batch(seed=7)
    ab = lambda a, b: distill_loss("ab", student, teacher, labels, tau=1.5, alpha=a, beta=b).item()
    fkl = distill_loss("fkl", student, teacher, labels, tau=1.5).item()
    rkl = distill_loss("rkl", student, teacher, labels, tau=1.5).item()
    assert abs(ab(1, 0) - fkl) <= 1e-6 and abs(ab(0, 1) - rkl) <= 1e-6
    eps = 1e-3
    for exact, near in [((0, 0), (eps, eps)), ((0, 0.7), (eps, 0.7)), ((0.6, 0), (0.6, eps)),
                        ((0.5, -0.5), (0.5, -0.5 + eps)), ((1, 0), (1, eps)), ((0, 1), (eps, 1))]:
        assert abs(ab(*exact) - ab(*near)) <= 0.01 * abs(ab(*exact)), (exact, near)


def test_mixtures_and_their_end_points():
    student, teacher, labels = batch(seed=8)
    f = lambda name, **hp: distill_loss(name, student, teacher, labels, tau=2.0, **hp).item()
    assert abs(f("sym") - 0.5 * (f("fkl") + f("rkl"))) <= 1e-6
    # symmetric at 0.5
    assert abs(f("js") - distill_loss("js", teacher, student, labels, tau=2.0).item()) <= 1e-6
    assert abs(f("sfkl", alpha=1e-7) - f("fkl")) <= 1e-5 and abs(f("srkl",
                                                                   alpha=1e-7) - f("rkl")) <= 1e-5
    assert f("sfkl", alpha=0.0) == pytest.approx(f("fkl"), abs=1e-6)
    assert f("js", beta=0.0) == pytest.approx(f("fkl")) and f("js",
                                                              beta=1.0) == pytest.approx(f("rkl"))
    # small beta: proportional to FKL
    assert f("js", beta=1e-4) / 1e-4 == pytest.approx(f("fkl"), rel=1e-2)


def test_rkl_decomposes_exactly_and_drkl_with_gamma_one_minus_qt_reproduces_it():
    student, teacher, labels = batch(seed=9)
    rows = labels.reshape(-1) != -100
    log_q = torch.log_softmax(student.detach().reshape(-1, 11)[rows].double() / 2, -1)
    log_p = torch.log_softmax(teacher.reshape(-1, 11)[rows].double() / 2, -1)
    target = labels.reshape(-1)[rows]
    q_t = log_q.exp().gather(-1, target[:, None])[:, 0]
    rkl = losses.rkl(log_p, log_q)
    binary = losses.drkl(log_p, log_q, target, gamma=0.0)
    non_target = (losses.drkl(log_p, log_q, target, gamma=1.0) - binary)
    assert torch.allclose(rkl, binary + (1 - q_t) * non_target, atol=1e-12, rtol=0)
    assert torch.allclose(rkl, losses.drkl(log_p, log_q, target, gamma=1 - q_t), atol=1e-12, rtol=0)


def test_akl_weights_sum_to_one_and_top1_is_in_the_head():
    V = 9
    p = torch.tensor([[0.9] + [0.1 / (V - 1)] * (V - 1)])  # top-1 alone exceeds mu
    q = torch.full((1, V), 1.0 / V)
    # with the top-1 token as the whole head, g_head = |0.9 - 1/9| / sum|p - q|
    e = (p - q).abs()
    g_head = (e[0, 0] / e.sum()).item()
    want = g_head * losses.fkl(p.log(), q.log()) + (1 - g_head) * losses.rkl(p.log(), q.log())
    assert torch.allclose(losses.akl(p.log(), q.log(), mu=0.5), want)
    same = losses.akl(p.log(), p.log())  # p = q: the 0/0 guard keeps it 0, not NaN
    assert same.item() == 0.0


def test_akl_head_at_mu_1_is_every_id():
    """mu = 1: the head is every id, so AKL is FKL (g_head = 1), also for rows whose float32 cumulative mass
    ends above 1 (rows 6-8 here: 1.0000002), which the sort's `<= mu` would cut short by their last id."""
    log_p = (torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 3).log_softmax(-1)
    assert bool((log_p.exp().sort(-1, descending=True)[0].cumsum(-1)[:, -1] > 1).any())
    log_q = torch.zeros(64, 1000).log_softmax(-1)
    assert bool((losses.akl_head_weight(log_p, log_q, 1.0) == 1).all())


@pytest.mark.parametrize("name", NAMES + ["ce"])
def test_chunked_equals_unchunked_values_and_gradients(name):
    student, teacher, labels = batch(B=2, T=9, V=17, seed=10)
    results = []
    for chunk in (1, 4, 10_000):
        s = student.detach().requires_grad_()
        loss = ce_loss(s, labels, chunk_size=chunk) if name == "ce" else \
            distill_loss_chunked(name, s, teacher, labels, tau=2.0, chunk_size=chunk)
        loss.backward()
        results.append((loss.item(), s.grad))
    for value, grad in results[:2]:
        assert value == pytest.approx(results[2][0], abs=1e-6)
        assert torch.allclose(grad, results[2][1], atol=1e-7)


def test_sum_reduction_and_tau_squared():
    student, teacher, labels = batch(seed=11)
    n = int((labels != -100).sum())
    mean = distill_loss("fkl", student, teacher, labels, tau=3.0)
    assert distill_loss("fkl", student, teacher, labels, tau=3.0,
                        reduction="sum").item() == pytest.approx(n * mean.item())
    assert distill_loss("fkl", student, teacher, labels, tau=3.0,
                        tau_sq=True).item() == pytest.approx(9 * mean.item())


# ---- numerics ------------------------------------------------------------------------------------

@IMPLEMENTATIONS
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_for_extreme_logits_all_taus_and_half_precision(name, dtype, distill):
    student, teacher, labels = batch(B=2, T=5, V=13, seed=12)
    student = (student.detach() * 5e3).clamp(-1e4, 1e4)
    teacher = (teacher * 5e3).clamp(-1e4, 1e4)
    student[0, 3, 2], teacher[0, 3, 2] = 1e4, -1e4
    for tau in (0.1, 1.0, 100.0):
        s = student.to(dtype).requires_grad_()
        loss = distill(name, s, teacher.to(dtype), labels, tau=tau)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all(), (name, dtype, tau)


@IMPLEMENTATIONS
@pytest.mark.parametrize("name", NAMES + ["ce"])
def test_neg_inf_vocabulary_columns_contribute_nothing(name, distill):
    student, teacher, labels = batch(B=2, T=5, V=11, seed=13)
    pad = torch.full((2, 5, 5), -math.inf)  # e.g. a vocabulary padded to a multiple of 8
    wide_s = torch.cat([student.detach(), pad], -1).requires_grad_()
    wide_t = torch.cat([teacher, pad], -1)
    narrow_s = student.detach().requires_grad_()
    run = lambda s, t: ce_loss(s, labels) if name == "ce" else distill(name, s, t, labels, tau=2.0)
    wide, narrow = run(wide_s, wide_t), run(narrow_s, teacher)
    wide.backward()
    narrow.backward()
    assert torch.isfinite(wide) and wide.item() == pytest.approx(narrow.item(), abs=1e-6)
    assert torch.isfinite(wide_s.grad).all() and (wide_s.grad[..., 11:] == 0).all()
    assert torch.allclose(wide_s.grad[..., :11], narrow_s.grad, atol=1e-7)


# ---- bad input -----------------------------------------------------------------------------------

def test_bad_input_is_named():
    student, teacher, labels = batch()
    with pytest.raises(ValueError, match="unknown loss 'kl'"):
        distill_loss("kl", student, teacher, labels)
    for tau in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="tau must be a finite number > 0"):
            distill_loss("fkl", student, teacher, labels, tau=tau)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        distill_loss("fkl", student, teacher[..., :10], labels)
    with pytest.raises(ValueError,
                       match="fkl has no hyper-parameter 'temperature' \\(it takes none\\)"):
        distill_loss("fkl", student, teacher, labels, temperature=2)
    # not silently ignored
    with pytest.raises(ValueError, match="fkl has no hyper-parameter 'alpha'"):
        distill_loss("fkl", student, teacher, labels, alpha=0.3)
    for name, hp, domain in (("sfkl", dict(alpha=1.5), r"\[0, 1\)"),
                             ("drkl", dict(gamma=-0.1), r"\(0, inf\)"),
                             ("ab", dict(alpha=float("nan")), r"\(-inf, inf\)"),
                             ("sym", dict(weight=2), r"\[0, 1\]")):
        with pytest.raises(ValueError, match=f"{name}: {next(iter(hp))} must be in {domain}"):
            distill_loss(name, student, teacher, labels, **hp)
    with pytest.raises(ValueError, match="labels"):
        distill_loss("fkl", student, teacher, labels[:, :3])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        distill_loss("drkl", student, teacher, labels.masked_fill(labels == labels.max(), 11))


@IMPLEMENTATIONS
@pytest.mark.parametrize("name", NAMES)
def test_all_positions_masked_gives_zero_and_zero_gradient(name, distill):
    student, teacher, labels = batch()
    loss = distill(name, student, teacher, torch.full_like(labels, -100))
    loss.backward()
    assert loss.item() == 0.0 and (student.grad == 0).all()


def test_a_second_backward_is_refused_not_silently_wrong():
    student, teacher, labels = batch()
    loss = distill_loss_chunked("fkl", student, teacher, labels, tau=2.0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice is not supported"):
        loss.backward()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tau", [0.5, 3.0])
def test_chunked_engine_equals_the_plain_form_in_value_and_gradient(name, tau):
    student, teacher, labels = batch(B=3, T=7, V=19, seed=11)
    # a masked vocabulary entry (never a target: its probability is 0)
    teacher[..., 4] = float("-inf")
    labels = labels.masked_fill(labels == 4, 5)
    grads, values = [], []
    for distill in (distill_loss, distill_loss_chunked):
        s = student.detach().requires_grad_()
        loss = distill(name, s, teacher, labels, tau=tau)
        loss.backward()
        values.append(loss.item())
        grads.append(s.grad)
    assert values[0] == pytest.approx(values[1], rel=1e-6, abs=1e-7)
    assert torch.allclose(grads[0], grads[1], atol=1e-7, rtol=1e-5)
