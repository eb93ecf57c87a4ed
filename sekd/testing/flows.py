"""The dense-vs-chunked comparison shared by sekd's tests and a user's: small float64 heads and a batch,
both flows on them (`both`), and the comparison (`assert_same`: loss, weight, draws, u, every gradient).

Heads have V + PAD rows (Qwen-style padding) cut to V; the batch has invalid positions and a row whose
first positions are all invalid; `cached_targets` are sparse targets for every valid position.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from sekd.kd.flows import chunked_kd_loss
from sekd.kd.objective import IGNORE, LossInputs, Selector, selective_kd_loss
from sekd.selection.classes import SparseTarget

B, T, D_S, D_T, V, PAD = 3, 13, 6, 8, 17, 3  # heads have V + PAD rows (Qwen-style padding), cut to V


def heads(seed: int = 0, bias: bool = True) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """A student head (trainable) and a frozen teacher head, float64, [V + PAD, d]."""
    g = torch.Generator().manual_seed(seed)
    head_s = torch.nn.Linear(D_S, V + PAD, bias=bias, dtype=torch.float64)
    head_t = torch.nn.Linear(D_T, V + PAD, bias=bias, dtype=torch.float64).requires_grad_(False)
    with torch.no_grad():
        for p in [*head_s.parameters(), *head_t.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 1.5)
    return head_s, head_t


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states h_s [B,T,D_S], h_t [B,T,D_T] (float64) and labels [B,T] with IGNORE positions."""
    g = torch.Generator().manual_seed(seed + 100)
    h_s = torch.randn(B, T, D_S, generator=g, dtype=torch.float64)
    h_t = torch.randn(B, T, D_T, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < 0.25] = IGNORE
    y[1, :4] = IGNORE
    return h_s, h_t, y


def cached_targets(seed: int = 3, K: int = 6) -> SparseTarget:
    """Sparse targets for every valid position of `batch(seed)`, row-major; with padded slots."""
    _, _, y = batch(seed)
    P = int((y != IGNORE).sum())
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(P)])
    mask = torch.rand(P, K, generator=g) < 0.7
    mask[:, 0] = True
    probs = torch.rand(P, K, generator=g).masked_fill(~mask, 0.0)
    return SparseTarget(ids, probs / probs.sum(-1, keepdim=True), mask)


def both(
    selector_fn: Callable[[], Selector],
    *,
    lam: float = 1.0,
    temperature: float = 1.0,
    normalization: str = "per_sequence",
    chunk_size: int = 7,
    seed: int = 0,
    cached: SparseTarget | None = None,
    gen_seed: int = 5,
    teacher: bool = True,
    step: int = 0,
    rows: Sequence[int] | None = None,
    flows: Sequence[str] = ("dense", "chunked"),
) -> list[tuple[Any, tuple[torch.Tensor, ...]]]:
    """[(dense), (chunked)]: each flow's StepOut and grads (h_s, W, b) of loss_sum / weight, on a fresh
    selector from `selector_fn` (so a stateful policy starts the same in both)."""
    head_s, head_t = heads(seed)
    h_s, h_t_all, y = batch(seed)
    h_t = h_t_all if teacher else None
    results: list[tuple[Any, tuple[torch.Tensor, ...]]] = []
    for flow in flows:
        head_s.zero_grad()
        h = h_s.clone().requires_grad_()
        kw: dict[str, Any] = dict(lam=lam, temperature=temperature, normalization=normalization, cached=cached)
        kw.update(generator=torch.Generator().manual_seed(gen_seed), step=step, rows=rows)
        if flow == "dense":
            s_logits = F.linear(h, head_s.weight, head_s.bias)[..., :V]
            t_logits = F.linear(h_t, head_t.weight, head_t.bias)[..., :V] if h_t is not None else None
            out = selective_kd_loss(s_logits, t_logits, y, LossInputs(selector_fn(), **kw))
        else:
            inputs = LossInputs(selector_fn(), **kw)
            teacher_head = head_t if h_t is not None else None
            out = chunked_kd_loss(h, head_s, h_t, teacher_head, y, inputs, vocab=V, chunk_size=chunk_size)
        (out.loss_sum / max(out.weight, 1e-12)).backward()
        assert h.grad is not None and head_s.weight.grad is not None
        b_grad = head_s.bias.grad if head_s.bias is not None else None
        results.append(
            (out, (h.grad, head_s.weight.grad.clone(), b_grad.clone() if b_grad is not None else h.new_zeros(0)))
        )
    return results


def assert_same(dense: Any, chunked: Any, exact_draws: bool = True, what: str = "") -> None:
    """The chunked flow's loss, weight, counts, draws, u and gradients equal the dense flow's (float64)."""
    (d, d_grads), (c, c_grads) = dense, chunked
    at = f" ({what})" if what else ""
    assert c.loss_sum.dtype == torch.float64, f"chunked loss is {c.loss_sum.dtype}, not float64{at}"
    assert c.weight == d.weight, f"chunked weight {c.weight} != dense weight {d.weight}{at}"
    for key in ("positions_valid", "positions_selected"):
        assert c.metrics[key] == d.metrics[key], f"{key}: chunked {c.metrics[key]} != dense {d.metrics[key]}{at}"
    checks = [("u", c.u, d.u, 1e-6, 1e-6), ("loss_sum", c.loss_sum, d.loss_sum, 1e-10, 1e-12)]
    if exact_draws:
        checks[:0] = [("draws.index", c.draws.index, d.draws.index, 0, 0)]
        checks[1:1] = [("draws.weight", c.draws.weight, d.draws.weight, 0, 0)]
    checks += [(f"grad {n}", gc, gd, 1e-9, 1e-12) for n, gc, gd in zip(("h_s", "W", "b"), c_grads, d_grads)]
    for name, got, want, rtol, atol in checks:
        if want is None:
            continue
        try:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        except AssertionError as err:
            first = " ".join(line.strip() for line in str(err).strip().splitlines()[:4])
            raise AssertionError(f"chunked flow != dense flow in {name}{at}: {first}") from None
