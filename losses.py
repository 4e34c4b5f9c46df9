"""Every distillation objective of the study, with the KD temperature tau (METHOD.md sections 1-3).

Read `distill_loss` first: it is the whole method in five lines. Both logit vectors are divided by
tau before the log-softmax - the one place where tau enters -

    p = softmax(z_teacher / tau)        q = softmax(z_student / tau)

then the objective compares them at every response position, and the values are averaged over the
response tokens. Every objective below is a plain function of the two log-probability matrices
`log_p`, `log_q` (N, V), one row per response token, returning one value per token (N,). `target`
(N,) holds each row's ground-truth next token; only DRKL and CE use it. Values are the true
divergences (>= 0, 0 when p = q).

At the bottom, a memory optimisation computes the same value and gradient: `distill_loss_chunked`,
from the logits with about one extra copy of them instead of several (train.py --no-fused-loss;
bench/bench_losses.py measures it). What training runs by default, the output head fused into the loss
so no (B, T, V) logits exist, is fused_loss.py.
"""
import inspect
import math

import torch
import torch.nn.functional as F

LOG_ZERO = -1e30  # log 0 (a -inf logit): keeps 0 * log 0 = 0 in values and gradients, never NaN


def distill_loss(name, student_logits, teacher_logits, labels, tau=1.0, tau_sq=False,
                 reduction="mean", **hparams):
    """The KD loss `name` between (B, T, V) logits of any float dtype, at temperature tau.

    labels (B, T): the next token at response positions, -100 elsewhere (prompt, padding). The
    value is the token mean over the response positions of the whole batch (reduction="sum": the
    sum, for callers that normalise over several micro-batches). hparams: the objective's own
    (None = its default). tau_sq multiplies by tau^2 (Hinton's convention; off, as in the paper)."""
    hparams = check_inputs(name, student_logits, teacher_logits, labels, tau, reduction, hparams)
    response = labels != -100                                    # (B, T): the positions that count
    log_p = log_probs(teacher_logits.detach()[response], tau)    # (N, V) teacher at temperature tau
    log_q = log_probs(student_logits[response], tau)             # (N, V) student at temperature tau
    per_token = LOSSES[name](log_p, log_q, labels[response], **hparams)  # (N,)
    loss = per_token.sum() / response.sum().clamp(min=1) if reduction == "mean" else per_token.sum()
    return loss * tau**2 if tau_sq else loss


def log_probs(logits, tau):
    """(n, V) logits of any float dtype -> float32 log-probabilities at temperature tau. A -inf
    logit (a masked vocabulary entry) gets probability 0 and a finite log, so 0 * log 0 = 0 in
    values and gradients, never NaN."""
    out = F.log_softmax(logits.float() / tau, dim=-1)
    return out.masked_fill(torch.isneginf(out), LOG_ZERO)


def hyperparameters(**domains):
    """Declare an objective's hyper-parameters with their domains, written as intervals: "[0, 1)",
    "(0, inf)". check_objective reads them; one not declared here is refused for that objective."""
    def declare(objective):
        objective.domains = domains
        return objective
    return declare


def kl(log_a, log_b):
    """KL(a || b) = sum_v a_v (log a_v - log b_v), per row."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def log_of(x):
    """math.log(x), -inf at 0."""
    return math.log(x) if x > 0 else -math.inf


@hyperparameters()
def fkl(log_p, log_q, target=None):
    """Forward KL:  KL(p || q) = sum_v p_v (log p_v - log q_v)
    d/dz_s = (q - p) / tau                                                          (Eq. 2)"""
    return kl(log_p, log_q)


@hyperparameters()
def rkl(log_p, log_q, target=None):
    """Reverse KL:  KL(q || p) = sum_v q_v (log q_v - log p_v)                         (Eq. 3, 4)
    d/dz_s,i = q_i (log(q_i/p_i) - KL) / tau = q_i (D_i - E_q[D]) / tau^2,  D = z_s - z_t"""
    return kl(log_q, log_p)


@hyperparameters(weight="[0, 1]")
def sym(log_p, log_q, target=None, weight=0.5):
    """Symmetric KL:  w KL(p || q) + (1 - w) KL(q || p),  w = 0.5."""
    return weight * kl(log_p, log_q) + (1 - weight) * kl(log_q, log_p)


@hyperparameters(beta="[0, 1]")
def js(log_p, log_q, target=None, beta=0.5):
    """Generalized Jensen-Shannon (GKD):
        m = beta p + (1 - beta) q,   beta KL(p || m) + (1 - beta) KL(q || m)
    At the end points the value would be 0; as in GKD, beta = 0 means FKL and beta = 1 means RKL."""
    if beta == 0 or beta == 1:
        return kl(log_p, log_q) if beta == 0 else kl(log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


@hyperparameters(alpha="[0, 1)")  # alpha = 1 compares p with itself; > 1 is no distribution
def sfkl(log_p, log_q, target=None, alpha=0.1):
    """Skew forward KL (DistiLLM):  KL(p || alpha p + (1 - alpha) q),  alpha = 0.1 (the teacher's
    weight in the mix)."""
    return kl(log_p, torch.logaddexp(log_p + log_of(alpha), log_q + log_of(1 - alpha)))


@hyperparameters(alpha="[0, 1)")
def srkl(log_p, log_q, target=None, alpha=0.1):
    """Skew reverse KL (DistiLLM):  KL(q || alpha q + (1 - alpha) p),  alpha = 0.1 (the student's
    weight in the mix). The gradient flows through q in both places."""
    return kl(log_q, torch.logaddexp(log_q + log_of(alpha), log_p + log_of(1 - alpha)))


@hyperparameters(mu="[0, 1]")
def akl(log_p, log_q, target=None, mu=0.5):
    """Adaptive KL (Wu et al. 2025):  g_head KL(p || q) + g_tail KL(q || p)
    Head = the teacher's most likely tokens whose cumulative mass (inclusive) is <= mu, plus always
    the top-1; tail = the rest. With e = |p - q| (student detached):
        g_head = sum_head e / sum_all e,   g_tail = 1 - g_head"""
    g_head = akl_head_weight(log_p, log_q.detach(), mu)
    return g_head * kl(log_p, log_q) + (1 - g_head) * kl(log_q, log_p)


def akl_head_weight(log_p, log_q, mu):
    """AKL's g_head, per row."""
    p = log_p.exp()
    head = _akl_head(p, mu)
    gap = (p - log_q.exp()).abs()
    total = gap.sum(-1)
    # total = 0 means p = q: both KLs are 0 and any weights will do
    return torch.where(total > 0, (gap * head).sum(-1) / total.clamp_min(1e-30), 0.5)


def _akl_head(p, mu):
    """AKL's head (bool, like p): each row's most likely ids whose cumulative mass is <= mu, and the top-1."""
    if mu >= 1:  # every id, however float32 rounds the cumulative sum near 1
        return torch.ones_like(p, dtype=torch.bool)
    p_sorted, order = p.sort(-1, descending=True)
    head_sorted = p_sorted.cumsum(-1) <= mu
    head_sorted[:, 0] = True
    return torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)  # to vocabulary order


@hyperparameters(alpha="(-inf, inf)", beta="(-inf, inf)")  # any finite pair: limits cover zeros
def ab(log_p, log_q, target=None, alpha=0.2, beta=0.7):
    """Alpha-beta divergence (ABKD, Wang et al. 2025), alpha = 0.2, beta = 0.7:
        -1/(alpha beta) sum_v [ p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b) ]
    and its limits, each the continuous limit of the general formula (Cichocki et al. 2011):
        a = b = 0:  1/2 sum (log q - log p)^2
        a = 0:      1/b^2 sum [ q^b log(q^b/p^b) - q^b + p^b ]      (a=0, b=1: RKL)
        b = 0:      1/a^2 sum [ p^a log(p^a/q^a) - p^a + q^a ]      (a=1, b=0: FKL)
        a + b = 0:  1/a^2 sum [ log(q^a/p^a) + p^a/q^a - 1 ]
    (Written with 1/b, 1/a these would not be continuous; only the squares are the limits of the
    general formula.)"""
    a, b = alpha, beta
    if a == 0 and b == 0:
        return 0.5 * ((log_q - log_p) ** 2).sum(-1)
    if a == 0:
        q_b, p_b = (b * log_q).exp(), (b * log_p).exp()
        return (q_b * b * (log_q - log_p) - q_b + p_b).sum(-1) / b**2
    if b == 0:
        p_a, q_a = (a * log_p).exp(), (a * log_q).exp()
        return (p_a * a * (log_p - log_q) - p_a + q_a).sum(-1) / a**2
    if a + b == 0:
        return (a * (log_q - log_p) + (a * (log_p - log_q)).exp() - 1).sum(-1) / a**2
    cross = (a * log_p + b * log_q).exp()
    p_ab, q_ab = ((a + b) * log_p).exp(), ((a + b) * log_q).exp()
    return -(cross - a / (a + b) * p_ab - b / (a + b) * q_ab).sum(-1) / (a * b)


@hyperparameters(gamma="(0, inf)")
def drkl(log_p, log_q, target, gamma=0.5):
    """Diversity-aware RKL (Luong et al. 2026):  KL(b_q || b_p) + gamma KL(q^ || p^)
    b = (x_t, 1 - x_t) splits target / non-target mass; q^, p^ are the non-target distributions
    renormalised. RKL is exactly the same sum with gamma = 1 - q_t; fixing gamma removes the
    non-target term's push on the target logit and strengthens the non-target supervision."""
    is_target = torch.zeros_like(log_q, dtype=torch.bool).scatter(-1, target[:, None], True)
    lq_t, lp_t = log_q.gather(-1, target[:, None])[:, 0], log_p.gather(-1, target[:, None])[:, 0]
    # log(1 - q_t) as the log-sum-exp of the non-target log-probs: log1mexp(log q_t), exact even
    # when q_t ~ 1
    lq_rest = log_q.masked_fill(is_target, -math.inf).logsumexp(-1)
    lp_rest = log_p.masked_fill(is_target, -math.inf).logsumexp(-1)
    binary = lq_t.exp() * (lq_t - lp_t) + lq_rest.exp() * (lq_rest - lp_rest)
    log_q_hat = (log_q - lq_rest[:, None]).masked_fill(is_target, LOG_ZERO)
    log_p_hat = (log_p - lp_rest[:, None]).masked_fill(is_target, LOG_ZERO)
    return binary + gamma * kl(log_q_hat, log_p_hat)


@hyperparameters()
def tvd(log_p, log_q, target=None):
    """Total variation distance:  1/2 sum_v |p_v - q_v|."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def ce(log_p, log_q, target):
    """Next-token cross-entropy  -log q_target  (SFT, and the (1 - kd_ratio) part of the KD loss;
    tau = 1)."""
    return -log_q.gather(-1, target[:, None])[:, 0]


LOSSES = {"fkl": fkl, "rkl": rkl, "sym": sym, "js": js, "sfkl": sfkl, "srkl": srkl, "akl": akl,
          "ab": ab, "drkl": drkl, "tvd": tvd}
HPARAMS = tuple(sorted({name for objective in LOSSES.values() for name in objective.domains}))


def check_objective(name, tau, **hparams):
    """The objective's contract, one check for the command line and for distill_loss: a known name,
    a finite tau > 0, and only the objective's own hyper-parameters, each inside its domain."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    domains = LOSSES[name].domains
    for key, value in hparams.items():
        if key not in domains:
            takes = ", ".join(domains) or "none"
            raise ValueError(f"{name} has no hyper-parameter {key!r} (it takes {takes})")
        if not (isinstance(value, (int, float)) and _inside(value, domains[key])):
            raise ValueError(f"{name}: {key} must be in {domains[key]}, got {value!r}")


def defaults(objective):
    """An objective's hyper-parameters at their defaults, from its signature."""
    parameters = inspect.signature(objective).parameters
    return {name: parameters[name].default for name in objective.domains}


def _inside(value, interval):
    """value is a finite number in an interval written as in math, "[0, 1)" or "(0, inf)"."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return math.isfinite(value) and above and below


def check_inputs(name, student_logits, teacher_logits, labels, tau, reduction, hparams):
    """distill_loss's contract: the objective (check_objective), matching shapes, labels inside the
    vocabulary. Returns the hyper-parameters that were set (None = the objective's default)."""
    hparams = {k: v for k, v in hparams.items() if v is not None}
    check_objective(name, tau, **hparams)
    if teacher_logits is None or teacher_logits.shape != student_logits.shape:
        got = None if teacher_logits is None else tuple(teacher_logits.shape)
        vocab = ("" if got is None or got[-1] == student_logits.shape[-1]
                 else " (teacher/student vocabulary mismatch)")
        raise ValueError(f"teacher logits {got} must match student logits "
                         f"{tuple(student_logits.shape)}{vocab}")
    _check_labels(student_logits, labels, reduction)
    return hparams


def _check_labels(logits, labels, reduction):
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match the logits' (B, T) "
                         f"{tuple(logits.shape[:-1])}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    targets = labels[labels != -100]
    if len(targets) and (targets.min() < 0 or targets.max() >= logits.shape[-1]):
        raise ValueError(f"labels hold token ids outside the vocabulary [0, {logits.shape[-1]}) "
                         "(other than -100 = ignore)")


# ==================================================================================================
# Memory optimisation: the same loss in chunks (train.py --no-fused-loss)
#
# The plain form above keeps several (N, V) float32 tensors alive for autograd (log_p, log_q, the
# objective's intermediates): for GPT-2's 50,257-token vocabulary that is several times the logits.
# distill_loss_chunked walks the response positions in chunks of ~8 MB, computes each chunk's value
# *and* its gradient at once, and keeps only the gradient, in one logits-sized float32 buffer that
# backward hands to autograd without a copy. Same value, same gradient (tests/test_losses.py),
# about one extra copy of the logits (bench/bench_losses.py).


def distill_loss_chunked(name, student_logits, teacher_logits, labels, tau=1.0, tau_sq=False,
                         reduction="mean", chunk_size=None, **hparams):
    """distill_loss, computed chunk by chunk (same arguments; chunk_size rows a chunk, default
    ~8 MB)."""
    hparams = check_inputs(name, student_logits, teacher_logits, labels, tau, reduction, hparams)
    per_token = lambda log_p, log_q, target: LOSSES[name](log_p, log_q, target, **hparams)
    loss = _token_loss(per_token, student_logits, teacher_logits, labels, tau, reduction, chunk_size)
    return loss * tau**2 if tau_sq else loss


def ce_loss(student_logits, labels, reduction="mean", chunk_size=None):
    """Next-token cross-entropy over the response positions, token mean (same reduction as
    distill_loss), computed in chunks like distill_loss_chunked."""
    _check_labels(student_logits, labels, reduction)
    return _token_loss(ce, student_logits, None, labels, 1.0, reduction, chunk_size)


def _token_loss(per_token, student_logits, teacher_logits, labels, tau, reduction, chunk_size):
    V = student_logits.shape[-1]
    rows = (labels.reshape(-1) != -100).nonzero()[:, 0]  # the response positions, (N,)
    chunk_size = chunk_size or max(1, 2**21 // V)  # ~8 MB of float32 per (chunk, V) temporary
    teacher = None if teacher_logits is None else teacher_logits.detach().reshape(-1, V)
    total = _ChunkedSum.apply(student_logits, teacher, labels.reshape(-1), rows, per_token, tau, chunk_size)
    return total / max(len(rows), 1) if reduction == "mean" else total


class _ChunkedSum(torch.autograd.Function):
    """sum over `rows` of per_token(log_p, log_q, target); its gradient w.r.t. the student is
    computed in forward."""

    @staticmethod
    def forward(ctx, student_logits, teacher, targets, rows, per_token, tau, chunk_size):
        student = student_logits.detach().reshape(-1, student_logits.shape[-1])  # (B*T, V), a view
        want_grad = ctx.needs_input_grad[0]
        # The one logits-sized buffer, float32 whatever the input dtype (fp16 would overflow here)
        grad = None
        if want_grad:
            grad = torch.zeros(student.shape, dtype=torch.float32, device=student.device)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, len(rows), chunk_size):
            idx = rows[start:start + chunk_size]
            s = student[idx].float().requires_grad_(want_grad)  # (n, V): a float32 copy of a chunk
            with torch.enable_grad():
                log_p = None if teacher is None else log_probs(teacher[idx], tau)
                value = per_token(log_p, log_probs(s, tau), targets[idx]).sum()
            if want_grad:
                grad[idx] = torch.autograd.grad(value, s)[0]
            total += value.detach()
        # Kept on ctx, not save_for_backward, so backward hands the buffer itself to autograd
        ctx.grad, ctx.shape, ctx.dtype = grad, student_logits.shape, student_logits.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grad is None:  # the buffer was handed out by a first backward pass
            raise RuntimeError("backward through distill_loss_chunked/ce_loss twice is not supported")
        grad, ctx.grad = ctx.grad, None
        grad = grad.mul_(grad_output).view(ctx.shape)  # in place: no second logits-sized copy
        if torch.finfo(ctx.dtype).bits < 32:  # saturate, not overflow: fp16 cannot hold |g| > 65504
            limit = torch.finfo(ctx.dtype).max
            grad = grad.clamp_(-limit, limit).to(ctx.dtype)
        return grad, None, None, None, None, None, None


def logits_distill_loss(name, student_hidden, student_head, teacher_hidden, teacher_head, labels, tau=1.0,
                        n_ids=None, kd_weight=1.0, ce_weight=0.0, tau_sq=False, compiled=False, **hparams):
    """fused_distill_loss's arguments and results, computed from the whole logits (B, T, V) with
    distill_loss_chunked and ce_loss (train.py --no-fused-loss; `compiled` is for the fused tiles alone)."""
    n_ids = n_ids or student_head.shape[0]
    student_logits = F.linear(student_hidden, student_head[:n_ids]).float()  # (B, T, V)
    ce_sum = ce_loss(student_logits if ce_weight else student_logits.detach(), labels, reduction="sum")
    kd_sum = torch.zeros((), device=student_logits.device)
    if teacher_hidden is not None and kd_weight:
        teacher_logits = F.linear(teacher_hidden, teacher_head[:n_ids]).float()  # (B, T, V)
        kd_sum = distill_loss_chunked(name, student_logits, teacher_logits, labels, tau=tau, tau_sq=tau_sq,
                                      reduction="sum", **hparams)
    return ce_weight * ce_sum + kd_weight * kd_sum, kd_sum.detach(), ce_sum.detach()
