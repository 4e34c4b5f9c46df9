"""The output head fused into the KD loss (#23; what train.py runs by default): losses.distill_loss's
value and gradient from the models' last hidden states and head weights, making the logits a piece at a
time so no (B, T, V) tensor exists. Read losses.py first: distill_loss is the method, the objectives are
plain functions of log p and log q; this file is how to compute the same thing in little memory
(tests/test_fused.py checks it against distill_loss; bench/bench_fused.py measures it).
"""
import collections
import math

import torch

from losses import LOG_ZERO, LOSSES, ce, check_objective, defaults, kl, log_of, log_probs


# With 128k-152k-token vocabularies the logits, not the weights, decide what fits. fused_distill_loss
# takes the models' last hidden states and head weights instead of logits: it makes the logits a
# piece at a time (the student's and the teacher's), applies tau and the objective, and turns each
# piece's gradient into the gradient of the student's hidden states and head weight at once. No
# (B, T, V) tensor exists.
#
# Which pieces: ~8 MB of logits is a chunk of whole rows (response tokens) when the vocabulary is
# small: 1,024 rows of the toy's 2,048 ids. At 152k ids it would be 13 rows, and a product of 13 rows
# by the (V, H) head streams the whole head from memory to do little arithmetic - four times a chunk
# (both models' logits, the two gradients). Then the pieces are tiles of 512 ids for a block of
# 1,024 rows instead (2 MB), in passes: first each row's log-sum-exps (so a tile's log-probabilities
# are exact), then the gradient tile by tile. More products in all (6 to 10 head-sized ones where the
# unfused path makes 4), each large enough to run at the machine's speed (bench/bench_fused.py
# measures both). Tiles serve the objectives whose value is a sum over the vocabulary of a function
# of (log p_v, log q_v) (SUMS_OVER_VOCAB), and DRKL, which is such a sum over the ids other than the
# target plus a term of the target's probabilities (_drkl_from_sums), and AKL, SYM with a weight per row
# from its head, which is found on tiles without sorting rows (_akl_weight). A tile's element-wise work
# is a few plain functions (_tile_sums, _tile_kd_sums, _tile_gradient, _radix_tile) that torch.compile
# makes into a loop or two (compiled=True, what train.py runs): that leaves the head's products, 80-90 %
# of the time.
#
# The gradient of a tile needs each row's S = sum_v dKD/dlog q_v. Where a formula gives S from sums
# the first pass adds up as it goes - power(a, b) = (sum_v q_v^a p_v^b, the mean of log q_v - log p_v
# under the weights q_v^a p_v^b) - there is no pass to add S up (6 products, not 8): FKL's S is
# -sum_v p_v = -1; RKL's sum_v q_v (log q_v - log p_v + 1) = RKL + 1; SYM's their mix; AB's terms are
# powers of p and q. JS, the skew KLs and TVD need p and q at every id for it (8 products; TVD's pass 3
# takes from pass 2 the one thing it needs of the teacher, a sign an id: 7). GRAD_SUM: the objective's
# hyper-parameters -> (the pairs (a, b) whose sums S needs besides (1, 0) and (0, 1), those whose means
# it needs, S from power).

SUMS_OVER_VOCAB = ("fkl", "rkl", "sym", "js", "sfkl", "srkl", "ab", "tvd")
TILED = SUMS_OVER_VOCAB + ("drkl", "akl")


def _ab_grad_sum(alpha, beta):
    """AB's S, each case's terms of `ab` differentiated w.r.t. log q_v (tested against autograd)."""
    a, b = alpha, beta
    if a == 0:      # sum_v q^b (log q - log p);  a = b = 0: sum_v (log q - log p)
        return [(b, 0)], [(b, 0)], lambda power: power(b, 0)[0] * power(b, 0)[1]
    if b == 0:      # (sum_v q^a - sum_v p^a) / a
        return [(a, 0), (0, a)], [], lambda power: (power(a, 0)[0] - power(0, a)[0]) / a
    if a + b == 0:  # (V - sum_v (p / q)^a) / a
        return [(0, 0), (-a, a)], [], lambda power: (power(0, 0)[0] - power(-a, a)[0]) / a
    return [(a + b, 0), (b, a)], [], lambda power: (power(a + b, 0)[0] - power(b, a)[0]) / a  # -(sum p^a q^b - sum q^(a+b)) / a


GRAD_SUM = {"fkl": lambda: ([], [], lambda power: -power(0, 1)[0]),
            "rkl": lambda: ([], [(1, 0)], lambda power: power(1, 0)[1] + 1),
            "sym": lambda weight: ([], [(1, 0)], lambda power: (1 - weight) * (power(1, 0)[1] + 1) - weight),
            "ab": _ab_grad_sum}


# Passes 2 and 3 make dKD/dlog q at every tile; through autograd that costs 1.2-3 times the derivative
# written out (and torch.compile cannot fuse it), so here it is for all but AB (tested against autograd):
# (log_p, log_q) of a tile, the hyper-parameters -> (each row's value, dKD/dlog q).
def _fkl_tile(log_p, log_q):  # d/dlog q_v = -p_v   (JS at beta = 0)
    return kl(log_p, log_q), -log_p.exp()


def _rkl_tile(log_p, log_q):  # d/dlog q_v = q_v (log q_v - log p_v + 1)   (JS at beta = 1, SRKL at alpha = 0)
    return kl(log_q, log_p), log_q.exp() * (log_q - log_p + 1)


def _sym_tile(log_p, log_q, weight):  # d/dlog q_v = -weight p_v + (1 - weight) q_v (log q_v - log p_v + 1)
    """weight: a number, or one per row (n,) (AKL's, from its head: _akl_weight)."""
    (fkl_value, fkl_dlog_q), (rkl_value, rkl_dlog_q) = _fkl_tile(log_p, log_q), _rkl_tile(log_p, log_q)
    column = weight[:, None] if torch.is_tensor(weight) else weight
    return weight * fkl_value + (1 - weight) * rkl_value, fkl_dlog_q.mul_(column).add_(rkl_dlog_q.mul_(1 - column))


def _js_tile(log_p, log_q, beta):  # d/dlog q_v = (1 - beta) q_v (log q_v - log m_v)
    if beta == 0 or beta == 1:  # FKL, RKL
        return _fkl_tile(log_p, log_q) if beta == 0 else _rkl_tile(log_p, log_q)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
    q_part = log_q.exp() * (log_q - log_m)
    return beta * kl(log_p, log_m) + (1 - beta) * q_part.sum(-1), q_part.mul_(1 - beta)


def _sfkl_tile(log_p, log_q, alpha):  # m = alpha p + (1 - alpha) q:  d/dlog q_v = -(1 - alpha) p_v q_v / m_v
    """In linear space, where p / m <= 1 / alpha (compiled: 2.4x faster a tile than logaddexp's log m, measured);
    an id where p and q both underflow adds 0, as it does in log space. alpha = 0: FKL (p / q need not be finite)."""
    if alpha == 0:
        return _fkl_tile(log_p, log_q)
    p, q = log_p.exp(), log_q.exp()
    p_over_m = p / (alpha * p + (1 - alpha) * q).clamp_min(1e-45)
    return torch.xlogy(p, p_over_m).sum(-1), p_over_m.mul_(q).mul_(alpha - 1)


def _srkl_tile(log_p, log_q, alpha):  # m = alpha q + (1 - alpha) p:  d/dlog q_v = q_v (log q_v - log m_v + 1 - alpha q_v / m_v)
    if alpha == 0:  # RKL (q / m = q / p need not be finite)
        return _rkl_tile(log_p, log_q)
    log_m = torch.logaddexp(log_q + log_of(alpha), log_p + log_of(1 - alpha))
    q, log_ratio = log_q.exp(), log_q - log_m
    return (q * log_ratio).sum(-1), log_ratio.exp().mul_(-alpha).add_(log_ratio).add_(1).mul_(q)


def _tvd_tile(log_p, log_q):  # d/dlog q_v = sign(q_v - p_v) q_v / 2
    q, p = log_q.exp(), log_p.exp()
    return 0.5 * (p - q).abs().sum(-1), (q - p).sign_().mul_(q).mul_(0.5)


# TVD's derivative needs of the teacher only the sign of q_v - p_v: pass 2 keeps it, a bit an id (20 MB
# for a block of 1,024 rows at 152k ids), so pass 3 makes no teacher logits (7 products, not 8). Where
# q_v = p_v > 0 the sign is 0, which a bit cannot say: pass 3 makes such a tile's teacher logits again.
def _tvd_signs(log_p, log_q):
    """(n, tile) -> ([q_v > p_v] packed 8 ids a byte (n, ceil(tile / 8)) uint8, whether the tile has a tie q_v = p_v > 0)."""
    q, p = log_q.exp(), log_p.exp()
    above = torch.nn.functional.pad(q > p, (0, -q.shape[1] % 8)).view(len(q), -1, 8)  # (n, k, 8)
    signs = above[:, :, 0].to(torch.uint8)
    for bit in range(1, 8):  # one shift a bit: compiled, 40x faster than a sum over the last axis (measured)
        signs |= above[:, :, bit].to(torch.uint8) << bit
    return signs, ((q == p) & (q > 0)).any()


def _tvd_from_signs(signs, log_q):
    """_tvd_tile's dKD/dlog q from the signs _tvd_signs kept (no tie in the tile): +-q_v / 2."""
    bit = torch.arange(8, dtype=torch.uint8, device=log_q.device)
    above = ((signs[:, :, None] >> bit) & 1).view(len(log_q), -1)[:, :log_q.shape[1]]  # (n, tile) 0 or 1
    return (above.float() - 0.5).mul_(log_q.exp())


DLOG_Q = {"fkl": _fkl_tile, "rkl": _rkl_tile, "sym": _sym_tile, "js": _js_tile, "sfkl": _sfkl_tile, "srkl": _srkl_tile,
          "tvd": _tvd_tile, "akl": _sym_tile}  # AKL: SYM with each row's weight (_akl_weight)
KEPT_FOR_PASS_3 = {"tvd": (_tvd_signs, _tvd_from_signs)}  # (what pass 2 keeps of the teacher, dKD/dlog q from it)


def _autograd_dlog_q(objective):
    """(log_p, log_q, **hparams) -> the objective's value and dKD/dlog q of a tile, through autograd (AB)."""
    def value_and_dlog_q(log_p, log_q, **hparams):
        with torch.enable_grad():
            log_q = log_q.detach().requires_grad_()
            value = objective(log_p, log_q, None, **hparams)
            return value.detach(), torch.autograd.grad(value.sum(), log_q)[0]
    return value_and_dlog_q


# What the tiled path takes for an objective: GRAD_SUM's entry (or None), DRKL's form (or None),
# (log_p, log_q, **hparams) -> (value, dKD/dlog q) of a tile, the hyper-parameters, KEPT_FOR_PASS_3's entry (or
# None), and AKL's mu (or None: not AKL)
TileForms = collections.namedtuple("TileForms", "grad_sum drkl value_and_dlog_q hparams kept akl_mu")


def fused_distill_loss(name, student_hidden, student_head, teacher_hidden, teacher_head, labels, tau=1.0,
                       n_ids=None, kd_weight=1.0, ce_weight=0.0, tau_sq=False, chunk_size=None, vocab_tile=None,
                       compiled=False, **hparams):
    """kd_weight * sum KD + ce_weight * sum CE over the response tokens, from hidden states (B, T, H)
    and head weights (V, H) of any float dtype; the logits are made a piece at a time, cut to the
    tokenizer's n_ids ids (None: all), in float32. Returns (loss, kd_sum, ce_sum), the last two
    detached, for the log (CE is summed even at ce_weight 0; KD is 0 without a teacher, kd_weight 0).
    Same value and gradient as distill_loss on the full logits (tested); the teacher's side needs no
    gradient. chunk_size: rows a piece; vocab_tile: ids a tile (set: tiles, where the objective allows);
    both None: chosen as above. compiled: torch.compile the tiles' element-wise work (_tile_ops; one
    compilation per objective, tau and tile shape, then ~4x faster on a CPU)."""
    hparams = {k: v for k, v in hparams.items() if v is not None}
    check_objective(name, tau, **hparams)
    hparams = {**defaults(LOSSES[name]), **hparams}  # GRAD_SUM, DLOG_Q and _drkl_from_sums take them all
    n_ids = n_ids or student_head.shape[0]
    rows = (labels.reshape(-1) != -100).nonzero()[:, 0]
    per_token = lambda log_p, log_q, target: LOSSES[name](log_p, log_q, target, **hparams)
    if teacher_hidden is None or not kd_weight:
        per_token, teacher_hidden, teacher_head = None, student_hidden.detach(), student_head.detach()
    # ~8 MB of float32 per (chunk, V) temporary and 2 MB tiles on a CPU (its cache); a GPU wants fewer,
    # larger pieces (kernel launches, not cache, set its speed there; sizes not measured on one)
    cpu = student_hidden.device.type == "cpu"
    whole_rows = max(1, (2**21 if cpu else 2**25) // n_ids)
    few_rows = chunk_size is None and whole_rows < 256  # a chunk too thin for the head's products to pay
    if (per_token is None or name in TILED) and (vocab_tile or few_rows):
        # AKL's blocks are half as many rows on a CPU: its head's histograms are (rows, 2,048) float64, and a
        # block of 512 measured as fast (peak extra memory 0.25x -> 0.24x of a logits tensor at Qwen's shape)
        rows_a_block = (512 if name == "akl" else 1024) if cpu else 4096
        chunk_size, vocab_tile = chunk_size or rows_a_block, vocab_tile or (512 if cpu else 2048)
    else:  # whole rows
        chunk_size, vocab_tile = chunk_size or whole_rows, None
    kd_weight = kd_weight * (tau**2 if tau_sq else 1)
    forms = None if per_token is None or vocab_tile is None else TileForms(
        # AKL: pass 1 adds up what SYM's S needs (RKL's sums); its weight per row comes after (_akl_weight)
        grad_sum=GRAD_SUM[name](**hparams) if name in GRAD_SUM else GRAD_SUM["rkl"]() if name == "akl" else None,
        drkl=(lambda *sums: _drkl_from_sums(*sums, **hparams)) if name == "drkl" else None,
        value_and_dlog_q=DLOG_Q.get(name) or _autograd_dlog_q(LOSSES[name]), hparams=hparams,
        kept=KEPT_FOR_PASS_3.get(name), akl_mu=hparams["mu"] if name == "akl" else None)
    ops = _tile_ops(compiled and vocab_tile is not None, compile_kd=forms is None or name in DLOG_Q)
    loss, kd, ce = _FusedHead.apply(student_hidden, student_head, teacher_hidden.detach(), teacher_head.detach(),
                                    labels.reshape(-1), rows, per_token, forms, tau, n_ids, kd_weight, ce_weight,
                                    chunk_size, vocab_tile, ops)
    return loss, kd * (tau**2 if tau_sq else 1), ce


class _FusedHead(torch.autograd.Function):
    """The loss, with its gradient w.r.t. the student's hidden states and head weight computed in
    forward, a block of response rows at a time: each piece's logits gradient g (n, tile) becomes
    g @ W (the hidden states') and g^T h (the head's)."""

    @staticmethod
    def forward(ctx, hidden, head, teacher_hidden, teacher_head, targets, rows, per_token, forms, tau, n_ids,
                kd_weight, ce_weight, chunk_size, vocab_tile, ops):
        H = hidden.shape[-1]
        flat, teacher_flat = hidden.detach().reshape(-1, H), teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        weight, teacher_weight = head.detach()[:n_ids], teacher_head[:n_ids]
        want, want_head = ctx.needs_input_grad[0] or ctx.needs_input_grad[1], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device) if want else None
        # a frozen head (a LoRA student) needs no (V, H) gradient
        grad_head = torch.zeros(head.shape, dtype=torch.float32, device=head.device) if want_head else None
        sums = torch.zeros(2, dtype=torch.float32, device=flat.device)  # KD, CE
        for start in range(0, len(rows), chunk_size):
            idx = rows[start:start + chunk_size]
            h, teacher_h, target = flat[idx], teacher_flat[idx], targets[idx]
            if vocab_tile is None:
                pieces = _whole_rows(h, weight, teacher_h, teacher_weight, target, per_token, tau, kd_weight,
                                     ce_weight, want, sums)
            else:
                pieces = _vocab_tiles(h, weight, teacher_h, teacher_weight, target, forms, tau, kd_weight,
                                      ce_weight, want, sums, vocab_tile, ops)
            for cols, g in pieces:                                                 # g: (n, tile) float32
                grad_hidden.index_add_(0, idx, g @ weight[cols].float())           # (n, H)
                if want_head:
                    grad_head[:n_ids][cols].addmm_(g.t(), h.float())           # (tile, H), in place
        ctx.grads, ctx.dtypes, ctx.shape = (grad_hidden, grad_head), (hidden.dtype, head.dtype), hidden.shape
        loss = kd_weight * sums[0] + ce_weight * sums[1]
        kd_sum, ce_sum = sums[0].clone(), sums[1].clone()
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return loss, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _kd, _ce):
        grad_hidden, grad_head = ctx.grads
        ctx.grads = (None, None)
        if grad_hidden is None:
            return (None,) * 15
        grad_hidden = grad_hidden.mul_(grad_loss).view(ctx.shape).to(ctx.dtypes[0])  # in place: no second copy
        grad_head = None if grad_head is None else grad_head.mul_(grad_loss).to(ctx.dtypes[1])
        return (grad_hidden, grad_head) + (None,) * 13


def _whole_rows(h, weight, teacher_h, teacher_weight, target, per_token, tau, kd_weight, ce_weight, want, sums):
    """A chunk of whole rows: adds its KD and CE sums to `sums`, yields its logits' gradient (n, V)."""
    with torch.enable_grad():
        z = (h @ weight.t()).float().requires_grad_(want)  # (n, V) the student's logits of this chunk
        log_q = log_probs(z, tau)
        kd = z.new_zeros(())
        if per_token is not None:
            log_p = log_probs((teacher_h @ teacher_weight.t()).float(), tau)  # the teacher's, no gradient
            kd = per_token(log_p, log_q, target).sum()
        # CE at tau 1, with a gradient only where it trains (else it is summed for the log alone)
        ce_value = ce(None, log_probs(z if ce_weight else z.detach(), 1.0), target).sum()
        value = kd_weight * kd + ce_weight * ce_value
    sums += torch.stack([kd.detach(), ce_value.detach()])
    if want and value.requires_grad:
        yield slice(None), torch.autograd.grad(value, z)[0]


def _vocab_tiles(h, weight, teacher_h, teacher_weight, target, forms, tau, kd_weight, ce_weight, want, sums, tile, ops):
    """A block of rows, the vocabulary in tiles of `tile` ids: adds the block's KD and CE sums to
    `sums`, yields each tile's logits gradient (n, tile). With log q_v = z_v / tau - lse (per row), the
    objective's gradient w.r.t. the student's logits is

        dKD/dz_v = (dKD/dlog q_v - q_v S) / tau,    S = sum_u dKD/dlog q_u   (per row)

    and CE's is softmax(z)_v - [v = target]. Pass 1 adds up each row's log-sum-exps and what the formulas
    for S (GRAD_SUM) and DRKL's form need; pass 2 adds up S where no formula gives it (and KD's value);
    pass 3 makes the tiles' gradients (TVD's from the signs pass 2 kept, without the teacher's logits).
    forms: the objective's TileForms, None without KD; ops: the element-wise work on a tile (_tile_ops)."""
    tiles = [slice(c, min(c + tile, len(weight))) for c in range(0, len(weight), tile)]
    grad_sum, drkl_from_sums = (forms.grad_sum, forms.drkl) if forms else (None, None)
    student_logits = lambda cols: (h @ weight[cols].t()).float()                    # (n, tile)
    teacher_logits = lambda cols: (teacher_h @ teacher_weight[cols].t()).float()  # (n, tile), no gradient
    in_tile = lambda cols: (target >= cols.start) & (target < cols.stop)  # (n,) bool: the row's target is in it
    def at_target(cols):  # (rows, ids): the entries of a tile that are their row's target
        rows = in_tile(cols).nonzero()[:, 0]
        return rows, target[rows] - cols.start
    # Pass 1 adds up, per row, log sum_v exp(a u_v + b w_v) for pairs (a, b), with u = z / tau, w = t / tau:
    # (1, 0) is the student's log-sum-exp at tau, (0, 1) the teacher's; for the pairs a formula for S
    # needs (GRAD_SUM) and DRKL's (1, 0), also the mean of u - w under those weights. DRKL's are over the
    # ids other than the target. The running sums are float64: a float32 log-sum-exp near 15 rounds by
    # ~1e-6 at each of the hundreds of tiles it adds up
    means = (grad_sum[1] if grad_sum else []) + ([(1, 0)] if drkl_from_sums else [])
    pairs = [(1, 0)] + ([(0, 1)] + (grad_sum[0] if grad_sum else []) + means if forms else [])
    per_row = lambda fill: torch.full((len(h),), fill, dtype=torch.float64, device=h.device)
    log_sum, mean = {pair: per_row(-math.inf) for pair in pairs}, {pair: per_row(0.0) for pair in means}
    lse_1, target_logit, teacher_target_logit = per_row(-math.inf), per_row(0.0), per_row(0.0)
    for cols in tiles:  # pass 1: those sums; the log-sum-exp at 1 (CE) and the target's logits
        z, here = student_logits(cols), at_target(cols)
        t = teacher_logits(cols) if forms else None
        target_logit[here[0]] = z[here].double()
        if forms:
            teacher_target_logit[here[0]] = t[here].double()
        column = torch.where(in_tile(cols), target - cols.start, -1) if drkl_from_sums else None
        tile_lse_1, tile_sums, tile_means = ops.sums(z, t, tau, pairs, means, column)
        lse_1 = torch.logaddexp(lse_1, tile_lse_1.double())
        for pair, tile_sum in tile_sums.items():
            tile_sum = tile_sum.double()
            new_sum = torch.logaddexp(log_sum[pair], tile_sum)
            if pair in mean:  # each tile's mean, weighted by its share of the weights (clamped: a tile
                # holding nothing but a target, the first one too, has sum -inf)
                old, add = (log_sum[pair] - new_sum.clamp_min(LOG_ZERO)).exp(), (tile_sum - new_sum.clamp_min(LOG_ZERO)).exp()
                mean[pair] = mean[pair] * old + tile_means[pair].double() * add
            log_sum[pair] = new_sum
    sums[1] += (lse_1 - target_logit).sum()
    lse, teacher_lse = log_sum[1, 0], log_sum.get((0, 1))

    def power(a, b):  # per row: sum_v q_v^a p_v^b and the mean of log q_v - log p_v under those weights
        return (log_sum[a, b] - a * lse - b * teacher_lse).exp(), mean[a, b] - lse + teacher_lse if (a, b) in mean else None

    if drkl_from_sums:
        value, drkl_gradient, lse = drkl_from_sums(lse, teacher_lse, mean[1, 0], target_logit, teacher_target_logit, tau)
        sums[0] += value.sum()
    S = None if grad_sum is None else grad_sum[2](power).float()
    lse_1, lse, teacher_lse = (None if x is None else x.float() for x in (lse_1, lse, teacher_lse))  # for the tiles
    kd_form = None if forms is None or drkl_from_sums else (forms.value_and_dlog_q, forms.hparams)
    if forms and forms.akl_mu is not None:  # AKL is SYM with each row's weight, from its head: 3 passes more
        akl_weight = _akl_weight(tiles, student_logits, teacher_logits, lse, teacher_lse, tau, forms.akl_mu, ops.radix).float()
        S = GRAD_SUM["sym"](akl_weight)[2](power).float()  # from pass 1's RKL sums, which SYM's and RKL's forms share
        kd_form = (forms.value_and_dlog_q, {"weight": akl_weight})

    pass_2 = kd_form is not None and (grad_sum is None or not want)
    keep, from_kept = forms.kept if forms and forms.kept and pass_2 and want else (None, None)
    kept, ties = [], []  # per tile: what pass 2 kept of the teacher for pass 3 (TVD's signs), whether it must not be used
    if pass_2:  # KD's value, and S where no formula gave it
        added = torch.zeros(len(h), device=h.device)
        for cols in tiles:
            value, tile_S, tile_kept = ops.kd_sums(*kd_form, student_logits(cols), teacher_logits(cols), lse, teacher_lse, tau, keep)
            sums[0] += value
            added += tile_S
            if keep:
                kept.append(tile_kept[0])
                ties.append(tile_kept[1])
        S = added if S is None else S
        ties = torch.stack(ties).tolist() if keep else ties  # one look from the host a block, not one a tile
    if not want or (not forms and not ce_weight):  # no gradient to make (forms is None without KD)
        return
    scales = torch.tensor([kd_weight / tau, ce_weight], device=h.device)  # a tensor: a new weight compiles nothing
    for i, cols in enumerate(tiles):  # pass 3: each tile's gradient
        z, here = student_logits(cols), at_target(cols)
        if drkl_from_sums:  # its value came from pass 1
            value, g = None, drkl_gradient(z, teacher_logits(cols), here).mul_(kd_weight / tau)
            g += (z - lse_1[:, None]).exp_().mul_(ce_weight) if ce_weight else 0
        else:
            use_kept = bool(kept) and not ties[i]  # a tile with a tie makes its teacher logits again
            t = teacher_logits(cols) if kd_form and not use_kept else None
            this_kept = kept[i] if use_kept else None
            value, g = ops.gradient(*(kd_form or (None, None)), z, t, lse, teacher_lse, S, lse_1 if ce_weight else None, tau,
                                    scales, from_kept, this_kept, with_value=not pass_2)
        sums[0] += 0 if value is None else value.sum()  # KD's value, unless pass 1 or 2 added it up
        if ce_weight:
            g[here] -= ce_weight
        yield cols, g


# The element-wise work on one tile, in functions of tensors and constants alone, so that torch.compile
# can make each one or two loops over the tile (_tile_ops): eager torch writes a tile-sized temporary
# per operation, ~4x the time on a CPU (measured: a JS tile's three passes 15 ms eager, 2.2 ms compiled;
# its products 38 ms). u = z / tau and w = t / tau are the student's and the teacher's logits at tau.
def _tile_sums(z, t, tau, pairs, means, target_column=None):
    """Pass 1 on a tile (n, tile): per row, the log-sum-exp of z (CE's, at tau 1), log sum_v exp(a u_v + b w_v)
    for each pair (a, b), and for the pairs in `means` the mean of u - w under those weights; where
    target_column (n,) is given (DRKL: the target's column in the tile, or -1), over the other ids."""
    u, w = z / tau, None if t is None else t / tau
    if target_column is not None:
        at_target = torch.arange(z.shape[1], device=z.device) == target_column[:, None]
        u, w = u.masked_fill(at_target, -math.inf), w.masked_fill(at_target, -math.inf)
    log_sums, tile_means = {}, {}
    for a, b in pairs:
        x = _exponent(a, b, u, w)
        log_sums[a, b] = x.logsumexp(-1)
        if (a, b) in means:  # clamped: a tile holding nothing but a target has sum -inf
            tile_means[a, b] = ((x - log_sums[a, b].clamp_min(LOG_ZERO)[:, None]).exp() * (z - t)).sum(-1) / tau
    return z.logsumexp(-1), log_sums, tile_means


def _tile_kd_sums(value_and_dlog_q, hparams, z, t, lse, teacher_lse, tau, keep=None):
    """Pass 2 on a tile: its share of KD's value (summed over the rows), of each row's S (n,), and what
    keep(log_p, log_q) keeps of the teacher for pass 3 (or None)."""
    log_p, log_q = t / tau - teacher_lse[:, None], z / tau - lse[:, None]
    value, dlog_q = value_and_dlog_q(log_p, log_q, **hparams)
    return value.sum(), dlog_q.sum(-1), None if keep is None else keep(log_p, log_q)


def _tile_gradient(value_and_dlog_q, hparams, z, t, lse, teacher_lse, S, lse_1, tau, scales, from_kept=None, kept=None,
                   with_value=True):
    """Pass 3 on a tile: (each row's share of KD's value, the tile's gradient (n, tile) of
    kd_weight KD + ce_weight CE w.r.t. z but for CE's -ce_weight at the target), scales = (kd_weight /
    tau, ce_weight); without value_and_dlog_q no KD, without lse_1 (CE's log-sum-exp) no CE; kept: what
    pass 2 kept of the teacher, for from_kept(kept, log q) instead of t; with_value False (pass 2 added it
    up): no value, so the compiled loop does not compute it."""
    value, g = None, None
    if value_and_dlog_q is not None:
        log_q = z / tau - lse[:, None]
        if kept is None:
            value, dlog_q = value_and_dlog_q(t / tau - teacher_lse[:, None], log_q, **hparams)
        else:
            dlog_q = from_kept(kept, log_q)
        g = dlog_q.sub_(log_q.exp_().mul_(S[:, None])).mul_(scales[0])
    if lse_1 is not None:
        ce_part = (z - lse_1[:, None]).exp_().mul_(scales[1])
        g = ce_part if g is None else g.add_(ce_part)
    return value if with_value else None, g


# AKL's head is each row's likeliest ids under the teacher, up to a cumulative mass of mu (and the likeliest
# one); losses.akl sorts whole rows to find it. On tiles it is found without sorting, by a radix select on
# the teacher's logits: their float32 bits, made into integers of the same order (_order_key), are read 11,
# 11, then 10 bits a pass. Each pass adds up the teacher's mass of the ids still in question by their next
# bits (a histogram per row), finds the bin where the cumulative mass from the top passes mu, and keeps
# only that bin in question. After 32 bits a bin is one logit value: ids tied there (the same p) are in
# the head in the share the mass allows, where the sort would take some of them. The last pass makes the
# student's logits too, for g = sum_v |p_v - q_v| over the head and over all. 3 passes, 4 products.
RADIX_BITS = (11, 11, 10)


def _order_key(t):
    """float32 (n, tile) -> int64 in [0, 2^32), in the same order (the bits of a negative float count down)."""
    bits = t.view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -1 - bits, bits + 2**31)


def _akl_weight(tiles, student_logits, teacher_logits, lse, teacher_lse, tau, mu, radix_tile=None):
    """(n,) float64 AKL's weight of FKL per row, g_head / (g_head + g_tail) (losses.akl_head_weight on whole
    rows), from the tiles in 3 passes; radix_tile: _radix_tile, compiled or not (TileOps)."""
    radix_tile = radix_tile or _radix_tile
    n, device = len(lse), lse.device
    mu = math.inf if mu >= 1 else mu  # every id (as losses._akl_head): float32 may round the whole mass above 1
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)
    above = zeros(n)                                           # the mass of the ids known to be in the head
    prefix = torch.zeros(n, dtype=torch.int64, device=device)  # the bits read so far of the ids in question
    in_question = torch.ones(n, dtype=torch.bool, device=device)  # False: the rest are all head or all tail
    head_gap, all_gap, read = zeros(n), zeros(n), 0
    for bits in RADIX_BITS:
        shift, last, bins = 32 - read - bits, read + bits == 32, 2**bits
        # per row and bin of the next bits: the teacher's mass; in the last pass also ids and their |p - q|
        # (float32: they add up few ids, those in question); the last pass's bins replace this one's
        mass = count = gap = None
        mass = zeros(n * bins)
        if last:
            count, gap = (torch.zeros(n * bins, device=device) for _ in range(2))
        for cols in tiles:  # the last pass makes the student's logits too, for |p - q|
            where, *added = radix_tile(teacher_logits(cols), student_logits(cols) if last else None, lse, teacher_lse,
                                       tau, prefix, in_question, shift, bits)
            for total, tile_sum in zip((mass, count, gap), added[:3]):
                total.scatter_add_(0, where, tile_sum)
            if last:
                all_gap += added[3]
                head_gap += added[4]
        del where, added  # the last tile's, 8-16 MB at 1,024 rows
        # Per row, the mass over each bin (the head so far and the higher bins), from the top bin down: the
        # crossing bin is the highest whose mass at or over passes mu (-1: none, so all in question are head),
        # compared in float32 as the sort's cumulative sums are (a float64 sum can pass mu = 1 where float32's
        # does not). Made in place: at 1,024 rows it is 16 MB.
        head_and_question = above + mass.view(n, bins).sum(-1)                          # (n,)
        over = mass.view(n, bins).cumsum_(-1).neg_().add_(head_and_question[:, None])  # (n, bins)
        crossing = (head_and_question.float() > mu).long() + (over[:, :-1].float() > mu).sum(-1) - 1
        at_crossing = lambda x: x.gather(1, crossing.clamp_min(0)[:, None])[:, 0]  # (n,) x at the crossing bin
        at_or_over = torch.where(crossing > 0, over.gather(1, (crossing - 1).clamp_min(0)[:, None])[:, 0], head_and_question)
        above = torch.where(crossing >= 0, at_crossing(over), head_and_question)
        prefix, in_question, read = (prefix << bits) + crossing, in_question & (crossing >= 0), read + bits
    # the last bins are single values: of the crossing one's k ids (tied, p each), as many are in the head
    # as fit under mu, at least one if none is above (the top-1); its gap counts in that share
    count, gap = count.view(n, bins), gap.view(n, bins)
    suffix_gap = torch.cat([gap.double().flip(-1).cumsum(-1).flip(-1), zeros(n, 1)], -1)
    head_gap += suffix_gap.gather(1, (crossing + 1)[:, None])[:, 0]
    k, bin_mass, bin_gap = at_crossing(count).double(), at_or_over - above, at_crossing(gap).double()
    p_each = bin_mass / k.clamp_min(1)
    fits = lambda j: (above + j * p_each).float() <= mu  # j of them under mu, as the sort compares
    fit = ((mu - above) / p_each.clamp_min(1e-300)).floor().clamp(0, None)
    fit = torch.where(fits(fit + 1), fit + 1, torch.where(fits(fit) | (fit == 0), fit, fit - 1))  # float32's say
    fit = torch.minimum(torch.where(above > 0, fit, fit.clamp_min(1)), k)
    head_gap += torch.where(in_question, bin_gap * fit / k.clamp_min(1), 0)
    return torch.where(all_gap > 0, head_gap / all_gap.clamp_min(1e-300), 0.5)


def _radix_tile(t, z, lse, teacher_lse, tau, prefix, in_question, shift, bits):
    """A tile (n, tile) of a pass of _akl_weight: each id's histogram bin (its row * 2^bits + its next bits,
    flattened) and, for that bin, the teacher's mass p_v if the id is in question (else 0); given the
    student's logits z (the last pass), also 1 and |p_v - q_v| where in question, and per row sum_v |p_v - q_v|
    over all ids and over those known to be in the head."""
    key, p = _order_key(t), (t / tau - teacher_lse[:, None]).exp()
    high = key >> (shift + bits)  # the bits read so far
    asked = (high == prefix[:, None]) & in_question[:, None]
    where = (key >> shift & 2**bits - 1) + torch.arange(0, len(t) * 2**bits, 2**bits, device=t.device)[:, None]
    mass = torch.where(asked, p, 0).double().view(-1)
    if z is None:
        return where.view(-1), mass
    gap = (p - (z / tau - lse[:, None]).exp()).abs()
    return (where.view(-1), mass, asked.float().view(-1), torch.where(asked, gap, 0).view(-1),
            gap.sum(-1).double(), torch.where(high > prefix[:, None], gap, 0).sum(-1).double())


TileOps = collections.namedtuple("TileOps", "sums kd_sums gradient radix")


def _tile_ops(compiled, compile_kd):
    """The tile functions, through torch.compile where asked (and, for KD, where the objective has its
    derivative written out: autograd does not compile). torch keeps the compiled code per function, so
    wrapping them again at each call costs nothing; a new tau or tile shape compiles again."""
    ops = TileOps(_tile_sums, _tile_kd_sums, _tile_gradient, _radix_tile)
    if not compiled:
        return ops
    return TileOps(torch.compile(ops.sums), *(torch.compile(f) if compile_kd else f for f in ops[1:3]), torch.compile(ops.radix))


def _exponent(a, b, u, w):
    """a u + b w (n, tile), without copies where a or b is 0 or 1, and with no 0 * (-inf) at DRKL's target."""
    if a == 0 and b == 0:
        return torch.zeros_like(u)
    if b == 0:
        return u if a == 1 else a * u
    if a == 0:
        return w if b == 1 else b * w
    return a * u + b * w


def _drkl_from_sums(lse_rest, teacher_lse_rest, mean_rest, target_logit, teacher_target_logit, tau, gamma):
    """DRKL on tiles (per row, from pass 1's sums over the ids other than the target: their log-sum-exps
    at tau, E_q^[u - w]; and the targets' logits): its value, a function making a tile's gradient w.r.t.
    the student's logits, and the student's log-sum-exp over all ids. With u = z / tau, w = t / tau,
    B = KL(b_q || b_p) a function of q_t alone and K = KL(q^ || p^), q^ = softmax over the non-target ids:

        K = E_q^[u - w] - lse_rest + lse_rest_t       dB/du_v = q_t log(q_t (1 - p_t) / (p_t (1 - q_t))) ([v = t] - q_v)
        dK/du_v = q^_v (log q^_v - log p^_v - K)  (0 at the target)

    the same values as `drkl` on whole rows (tested), in one pass fewer than an objective whose S is added up."""
    u_t, w_t = target_logit / tau, teacher_target_logit / tau
    lse, teacher_lse = torch.logaddexp(lse_rest, u_t), torch.logaddexp(teacher_lse_rest, w_t)
    lq_t, lp_t = u_t - lse, w_t - teacher_lse                      # log q_t, log p_t
    lq_rest, lp_rest = lse_rest - lse, teacher_lse_rest - teacher_lse  # log(1 - q_t), log(1 - p_t)
    kl_hat = mean_rest - lse_rest + teacher_lse_rest
    value = lq_t.exp() * (lq_t - lp_t) + lq_rest.exp() * (lq_rest - lp_rest) + gamma * kl_hat
    binary_slope = lq_t.exp() * (lq_t - lp_t - lq_rest + lp_rest)  # dB/du_v = binary_slope ([v = t] - q_v)
    # float32 (the sums may come in float64) for the tiles
    shift, lse_rest_32, lse_32, binary_slope = (x.float() for x in (lse_rest - teacher_lse_rest + kl_hat, lse_rest, lse, binary_slope))

    def gradient(z, t, at_target):  # (n, tile) dDRKL/du; at_target: the (rows, ids) of the targets in the tile
        u, w = z / tau, t / tau
        q_hat = (u - lse_rest_32[:, None]).exp().index_put_(at_target, u.new_zeros(()))
        g = q_hat.mul_(u - w - shift[:, None]).mul_(gamma)
        g -= (u - lse_32[:, None]).exp_().mul_(binary_slope[:, None])
        g[at_target] += binary_slope[at_target[0]]
        return g

    return value, gradient, lse
