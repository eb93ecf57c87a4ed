"""Float64 references of the built-in pieces, written the obvious way (no fast code), declared at registration.

The semantics per kind (sekd/testing checks each piece against its reference):
- signal: u(t) per position, (s [N,V], t [N,V] | None, y [N], *, temperature) -> [N];
- criterion: the dense D per position over the positions passed in (one batch),
  (s, t, y, *, temperature, row [N], u [N], **options) -> [N]; the gradient is autograd's through it;
- class sampler: the target distribution in expectation, (t [N,V], *, temperature, **options) -> [N,V];
- policy: the expected weight m_t w_t laid on positions, (u [B,T], valid, *, step, **options) -> [B,T]
  (deterministic: exact; random: E over the draws; stateful: a fresh instance's first call).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CE_RATIO_EPS = 1e-6


def log_softmax64(z: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(z / T) in float64, as z/T - log sum exp(z/T) with the max taken out.  [N,V]"""
    z = z.double() / temperature
    z = z - z.max(-1, keepdim=True).values
    return z - z.exp().sum(-1, keepdim=True).log()


def entropy64(z: Tensor) -> Tensor:
    logp = log_softmax64(z)
    return -(logp.exp() * logp).sum(-1)


def ce64(z: Tensor, y: Tensor, temperature: float) -> Tensor:
    return -log_softmax64(z, temperature).gather(-1, y.long().unsqueeze(-1)).squeeze(-1)


def kl64(za: Tensor, zb: Tensor, temperature: float) -> Tensor:
    """KL(softmax(za/T) || softmax(zb/T)), 0 log 0 = 0.  [N]"""
    la, lb = log_softmax64(za, temperature), log_softmax64(zb, temperature)
    p = la.exp()
    return (p * torch.where(p > 0, la - lb, torch.zeros_like(la))).sum(-1)


# ---- signals: (s, t, y, *, temperature) -> u [N] ------------------------------------------------


def student_entropy(s, t, y, *, temperature=1.0):
    return entropy64(s)


def teacher_entropy(s, t, y, *, temperature=1.0):
    return entropy64(t)


def student_ce(s, t, y, *, temperature=1.0):
    return ce64(s, y, temperature)


def teacher_ce(s, t, y, *, temperature=1.0):
    return ce64(t, y, temperature)


def kl(s, t, y, *, temperature=1.0):
    return kl64(t, s, temperature)


def reverse_kl(s, t, y, *, temperature=1.0):
    return kl64(s, t, temperature)


def kl_plus_student_entropy(s, t, y, *, temperature=1.0):
    return kl64(t, s, temperature) + entropy64(s)


def ce_ratio(s, t, y, *, temperature=1.0):
    return ce64(s, y, temperature) / (ce64(t, y, temperature) + CE_RATIO_EPS)


def ce_ratio_plus_student_entropy(s, t, y, *, temperature=1.0):
    """The paper's runs: the entropy over ln|V|."""
    return ce_ratio(s, t, y, temperature=temperature) + entropy64(s) / math.log(s.shape[-1])


def ce_ratio_plus_student_entropy_unscaled(s, t, y, *, temperature=1.0):
    return ce_ratio(s, t, y, temperature=temperature) + entropy64(s)


# ---- criteria: (s, t, y, *, temperature, row, u, **options) -> D [N] ---------------------------


def forward_kl_d(s, t, y, *, temperature=1.0, row=None, u=None):
    return kl64(t, s, temperature)


def reverse_kl_d(s, t, y, *, temperature=1.0, row=None, u=None):
    return kl64(s, t, temperature)


def _tckd_nckd(s: Tensor, t: Tensor, y: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """TCKD = KL of the binary [p(y), 1 - p(y)]; NCKD = KL of the distributions renormalized over v != y."""
    p, q = log_softmax64(t, temperature).exp(), log_softmax64(s, temperature).exp()
    at_y = torch.nn.functional.one_hot(y.long(), s.shape[-1]).bool()
    py, qy = p[at_y], q[at_y]
    tckd = py * (py.log() - qy.log()) + (1 - py) * ((1 - py).log() - (1 - qy).log())
    p_hat = (p / (1 - py).unsqueeze(-1)).masked_fill(at_y, 0.0)
    q_hat = (q / (1 - qy).unsqueeze(-1)).masked_fill(at_y, 1.0)
    nckd = (p_hat * torch.where(p_hat > 0, p_hat.log() - q_hat.log(), torch.zeros_like(p_hat))).sum(-1)
    return tckd, nckd


def dkd_d(s, t, y, *, temperature=1.0, alpha=1.0, beta=8.0, row=None, u=None):
    tckd, nckd = _tckd_nckd(s, t, y, temperature)
    return alpha * tckd + beta * nckd


def atkd_d(s, t, y, *, temperature=1.0, hard_fraction=0.5, easy_weight=0.2, row=None, u=None):
    """Hard: the ceil(hard_fraction * P) largest 1 - p_t(y) (ties: lower index) of the positions passed in."""
    tckd, nckd = _tckd_nckd(s, t, y, temperature)
    u_t = 1 - log_softmax64(t.detach(), temperature).exp().gather(-1, y.long().unsqueeze(-1)).squeeze(-1)
    P = u_t.numel()
    n_hard = min(P, max(1, math.ceil(hard_fraction * P - 1e-9))) if P and hard_fraction > 0 else 0
    hard = torch.zeros(P, dtype=torch.bool)
    for i in sorted(range(P), key=lambda i: (-float(u_t[i]), i))[:n_hard]:
        hard[i] = True
    return torch.where(hard, (1 - easy_weight) * (tckd + nckd), easy_weight * nckd)


def weighted_d(s, t, y, *, temperature=1.0, row=None, u=None):
    """n_i u_t KL_t / sum_{t' in row i} u_t' (the plain KL where a row's u are all 0)."""
    row = torch.zeros_like(y) if row is None else row
    w = u.detach().double().clamp_min(0.0)
    out = kl64(t, s, temperature)
    for r in row.unique().tolist():
        at = row == r
        W = float(w[at].sum())
        if W > 0:
            out = torch.where(at, out * int(at.sum()) * w / W, out)
    return out


# ---- class samplers: (t [N,V], *, temperature, **options) -> E[p~] [N,V] --------------------------


def teacher_distribution(t, *, temperature=1.0, n_draws=64):
    """rs_kd: c_v / N over N draws from p_t has expectation p_t (unbiased for Full KD)."""
    return log_softmax64(t, temperature).exp()


def truncated_distribution(t, *, temperature=1.0, top=64, normalization="renormalized"):
    """top_k_truncation: p_t on its `top` largest classes, renormalized over them, or as it is (`raw`)."""
    p = log_softmax64(t, temperature).exp()
    keep = torch.zeros_like(p, dtype=torch.bool)
    for n in range(p.shape[0]):
        for v in sorted(range(p.shape[1]), key=lambda v: -float(p[n, v]))[: min(top, p.shape[1])]:
            keep[n, v] = True
    p = p.masked_fill(~keep, 0.0)
    return p / p.sum(-1, keepdim=True) if normalization == "renormalized" else p


def _largest(x: Tensor, n: int, k: int) -> list[int]:
    """Row n's k largest classes, by a plain sort."""
    return sorted(range(x.shape[1]), key=lambda v: -float(x[n, v]))[: min(k, x.shape[1])]


def _on(p: Tensor, keep: Tensor, normalization: str) -> Tensor:
    """p on the kept classes: renormalized, raw, or raw with the rest's mass as one more column."""
    kept = p.masked_fill(~keep, 0.0)
    if normalization == "renormalized":
        return kept / kept.sum(-1, keepdim=True)
    if normalization == "raw":
        return kept
    return torch.cat([kept, p.masked_fill(keep, 0.0).sum(-1, keepdim=True)], 1)


def head_and_tail_draws(t, *, temperature=1.0, top=8, n_draws=16):
    """rs_kd_tail: p_t exactly on the head, and p_tail c_v / N on the tail draws, whose expectation is p_t."""
    return log_softmax64(t, temperature).exp()


def tail_distribution(t, *, temperature=1.0, top=64):
    """top_k_tail: p_t on its `top` largest classes, and the tail column 1 - their sum."""
    p = log_softmax64(t, temperature).exp()
    keep = torch.zeros_like(p, dtype=torch.bool)
    for n in range(p.shape[0]):
        keep[n, _largest(p, n, top)] = True
    return _on(p, keep, "tail")


def student_top_distribution(t, *, student, temperature=1.0, top=64, normalization="renormalized"):
    """student_top_k: p_t on the student's `top` largest classes (renormalized, raw, or with the tail)."""
    keep = torch.zeros_like(t, dtype=torch.bool)
    for n in range(t.shape[0]):
        keep[n, _largest(student, n, top)] = True
    return _on(log_softmax64(t, temperature).exp(), keep, normalization)


def union_top_distribution(t, *, student, temperature=1.0, top=64, normalization="renormalized"):
    """union_top_k: p_t on the union of the teacher's and the student's `top` largest classes."""
    keep = torch.zeros_like(t, dtype=torch.bool)
    for n in range(t.shape[0]):
        keep[n, _largest(t, n, top) + _largest(student, n, top)] = True
    return _on(log_softmax64(t, temperature).exp(), keep, normalization)


def nucleus_distribution(t, *, temperature=1.0, p=0.9, max_k=64):
    """top_p: p_t renormalized over the fewest most likely classes holding `p` of it, at most `max_k`."""
    probs = log_softmax64(t, temperature).exp()
    out = torch.zeros_like(probs)
    for n in range(probs.shape[0]):
        covered = 0.0
        for v in sorted(range(probs.shape[1]), key=lambda v: -float(probs[n, v]))[: min(max_k, probs.shape[1])]:
            out[n, v] = probs[n, v]
            covered += float(probs[n, v])
            if covered >= p:
                break
    return out / out.sum(-1, keepdim=True)


# ---- policies: (u [B,T], valid, *, step, **options) -> E[m_t w_t] [B,T] ---------------------------


def n_selected(n_valid: int, k: float) -> int:
    return min(n_valid, max(1, math.ceil(n_valid * k - 1e-9))) if n_valid else 0


def _by_rank(u: Tensor, valid: Tensor, pick) -> Tensor:
    """1 at the positions pick(order, n_valid) names, order = valid positions by descending u (ties: lower t)."""
    out = torch.zeros(u.shape, dtype=torch.float64)
    for b in range(u.shape[0]):
        at = [i for i in range(u.shape[1]) if valid[b, i]]
        order = sorted(at, key=lambda i: (-float(u[b, i]), i))
        for i in pick(order, len(at)):
            out[b, i] = 1.0
    return out


def all_positions(u, valid, *, step=0):
    return valid.double()


def top_k(u, valid, *, step=0, k):
    return _by_rank(u, valid, lambda order, n: order[: n_selected(n, k)])


def uniform_k(u, valid, *, step=0, k):
    """random: n_sel of n_valid uniformly, so each valid position with probability n_sel / n_valid."""
    n = valid.sum(-1, keepdim=True).double()
    n_sel = torch.tensor([[n_selected(int(m), k)] for m in n.flatten().tolist()], dtype=torch.float64)
    return torch.where(valid, n_sel / n.clamp_min(1), torch.zeros_like(n))


def curriculum_window(u, valid, *, step=0, k, S=4000):
    """The n_sel positions at ascending ranks [floor((n_valid - n_sel) pi), + n_sel), pi = min(1, step / S)."""
    pi = min(1.0, max(0.0, step / S))

    def window(order, n):
        n_sel = n_selected(n, k)
        start = math.floor((n - n_sel) * pi + 1e-9)
        return order[::-1][start : start + n_sel]

    return _by_rank(u, valid, window)


def _pos_rs_weights(u: Tensor, valid: Tensor, tau: float) -> Tensor:
    w = torch.where(valid, u.double().clamp_min(0.0) ** (1.0 / tau), torch.zeros_like(u, dtype=torch.float64))
    return torch.where(w.sum(-1, keepdim=True) > 0, w, valid.double())  # all-zero rows: uniform


def pos_rs_expected(u, valid, *, step=0, k, tau=1.0, coverage=0.0):
    """E[sum_j w_j 1[t_j = t]] = K w(t) / W, w = u^(1/tau): unbiased for the weighted KD sum_t w l / W."""
    w = _pos_rs_weights(u, valid, tau)
    K = torch.tensor([[n_selected(int(n), k)] for n in valid.sum(-1).tolist()], dtype=torch.float64)
    return K * w / w.sum(-1, keepdim=True).clamp_min(1e-300)


def pos_rs_star_expected(u, valid, *, step=0, k, tau=1.0, coverage=0.0):
    """K / n_valid at every valid position (u > 0): unbiased for Full KD's mean_t l(t)."""
    n = valid.sum(-1, keepdim=True).double()
    K = torch.tensor([[n_selected(int(m), k)] for m in n.flatten().tolist()], dtype=torch.float64)
    return torch.where(valid, K / n.clamp_min(1), torch.zeros_like(n))


def gls_first_call(u, valid, *, step=0, k, Q=30_000):
    """GLS, fresh: the queue is empty, so the first batch is top_k's."""
    return top_k(u, valid, step=step, k=k)
