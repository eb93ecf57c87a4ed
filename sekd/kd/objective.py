"""The selective objective of docs/method.md §2, dense flow (the reference every faster flow must equal).

    l(t) = lam * T^2 * D_C(p_t, q_t) + (1 - lam) * CE(x_{t+1}, q_t)
    L_i  = sum_t m_t w_t l(t) / sum_t m_t
    L    = sum_i s_i L_i / sum_i s_i        (or, with batch_tokens, over all selected positions)

The step returns the loss *sum* and the weight it is normalized by, so the trainer can divide the
accumulated gradients once per optimizer step: the loss of an effective batch then does not depend
on how it was split into micro-batches. Both flows (this one and sekd/kd/flows.py) take one `LossInputs`,
draw positions with `draw_positions` and divide each sequence's weighted losses by its `normalizers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from sekd.selection import signals as S
from sekd.selection.classes import ClassSampler, SparseTarget
from sekd.selection.criteria import Criterion, as_criterion, sparse_divergence
from sekd.core.rng import PositionKeys, RowKeys, step_keys
from sekd.selection.policies import Draws, PolicyPiece, as_policy, call_policy
from sekd.core.tensors import IGNORE, upcast


@runtime_checkable
class Stateful(Protocol):
    """A policy's checkpointed state (GLS's queue)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Selector:
    """The position axis, class axis and criterion of one run, built once from config. Each piece says
    what it is (its protocol); an undeclared callable is taken as the most careful kind (`as_policy`,
    `as_criterion`), and a criterion that cannot consume the class axis' sparse target is refused here."""

    signal: S.Signal | None
    policy: PolicyPiece
    criterion: Criterion
    signal_normalization: str = "sum"
    classes: ClassSampler | None = None  # None: C_t = V (the dense teacher distribution)

    @classmethod
    def of(
        cls,
        signal: S.Signal | None,
        policy: Callable[..., Draws],
        criterion: Callable[..., Tensor],
        signal_normalization: str = "sum",
        classes: ClassSampler | None = None,
    ) -> Selector:
        """From registry entries (which the registries hand out as plain callables): the policy and criterion
        taken for what they declare (`as_policy`, `as_criterion`); the signal must be a registered `Signal`."""
        if signal is not None and not isinstance(signal, S.Signal):
            raise TypeError(f"{signal!r} is not a registered signal")
        return cls(signal, as_policy(policy), as_criterion(criterion), signal_normalization, classes)

    def __post_init__(self) -> None:
        self.policy = as_policy(self.policy)
        self.criterion = as_criterion(self.criterion)
        if self.classes is not None:
            sparse_divergence(self.criterion, f"classes {self.classes.name!r}", self.classes.form_of())
        elif "u" in self.criterion.needs and self.signal is None:
            raise ValueError(f"criterion {self.criterion.name!r} needs a signal: it reads u(t)")

    @property
    def random(self) -> bool:
        """Whether any piece draws (the random signal, a sampling policy, a class sampler)."""
        return bool(
            (self.signal is not None and self.signal.random)
            or self.policy.random
            or (self.classes is not None and self.classes.random)
        )

    def keys(
        self, B: int, *, generator: torch.Generator | None, step: int, rows: Sequence[int] | Tensor | None
    ) -> RowKeys | None:
        """The micro-batch's per-row keys (sekd/core/rng.py `step_keys`) when a piece draws, else None."""
        return step_keys(B, generator=generator, step=step, rows=rows) if self.random else None

    @property
    def needs_teacher_everywhere(self) -> bool:
        return self.signal is not None and self.signal.needs_teacher

    def state_dict(self) -> dict[str, Any]:
        """Training state of a stateful policy (GLS's queue); {} for stateless ones."""
        policy = self.policy
        return {"policy": policy.state_dict()} if policy.stateful and isinstance(policy, Stateful) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        policy = self.policy
        if policy.stateful and isinstance(policy, Stateful) and "policy" in state:
            policy.load_state_dict(state["policy"])


@dataclass
class LossInputs:
    """What one micro-batch's loss takes besides the model's outputs and the labels: the same for the dense
    flow (`selective_kd_loss`) and the chunked one (sekd/kd/flows.py `chunked_kd_loss`).

    `cached`: class-axis targets of every valid position, row-major (the offline teacher cache); with it, no
    teacher logits are needed unless the signal asks for them. `rows`: the global sample index of each row;
    every draw of row i is keyed by (the generator's seed, `step`, rows[i]) (sekd/core/rng.py `RowKeys`), so
    it does not depend on the batch, the rank or the chunking; without rows, fresh keys come from
    `generator`. `gather`: concatenates a tensor across ranks (None in one process); a stateful policy (GLS)
    sees the whole global batch's scores through it."""

    selector: Selector
    lam: float
    temperature: float
    normalization: str = "per_sequence"
    generator: torch.Generator | None = None
    step: int = 0  # the optimizer step (curriculum's window, the draws' keys)
    cached: SparseTarget | None = None
    rows: Sequence[int] | Tensor | None = None
    gather: Callable[[Tensor], Tensor] | None = None

    def row_keys(self, B: int) -> RowKeys | None:
        """The micro-batch's per-row keys when a piece of the selector draws, else None."""
        return self.selector.keys(B, generator=self.generator, step=self.step, rows=self.rows)


@dataclass
class StepOut:
    loss_sum: Tensor  # sum_i s_i L_i (or sum of selected l(t) for batch_tokens), with grad
    weight: float  # what loss_sum is normalized by over the effective batch
    draws: Draws
    u: Tensor | None  # [B,T] scores, -inf where invalid
    metrics: dict[str, float]


# ---- the dense flow ---------------------------------------------------------------------------


def selective_kd_loss(s_logits: Tensor, t_logits: Tensor | None, labels: Tensor, inputs: LossInputs) -> StepOut:
    """The loss sum of §2 on full logits [B,T,V] (the student's with grad; the teacher's, or None with the
    teacher cache): u(t), then m_t w_t from the policy, then l(t) at the selected positions, each weighed by
    m_t w_t and summed per sequence, divided by its normalizer (`normalizers`)."""
    sel, valid = inputs.selector, labels != IGNORE  # valid(t)                       [B,T]
    keys = inputs.row_keys(labels.shape[0])  # per-row keys when something draws
    u = None
    if sel.signal is not None:
        u = S.importance(
            sel.signal,
            s_logits.detach(),
            t_logits,
            labels,
            valid,
            generator=inputs.generator,
            keys=keys,
            normalization=sel.signal_normalization,
            temperature=inputs.temperature,
        )  # u(t)  [B,T]
    draws = draw_positions(inputs, u, valid, keys)  # m_t, w_t as draws            [B,K]
    mw = draws.dense(labels.shape[1])  # m_t * w_t                                   [B,T]
    rows, cols = (mw != 0).nonzero(as_tuple=True)  # positions that carry weight  [N]
    ell = selected_loss(s_logits, t_logits, labels, rows, cols, u, inputs, keys)  # l(t)  [N]
    n_sel = draws.count().to(ell.device)  # sum_t m_t                               [B]
    norm, weight = normalizers(n_sel, inputs.normalization, ell.dtype)  # n_sel_i or 1  [B]; sum_i s_i or n_sel
    per_row = torch.zeros(norm.shape, dtype=ell.dtype, device=ell.device).index_add(0, rows, mw[rows, cols] * ell)
    return StepOut((per_row / norm).sum(), weight, draws, u, position_metrics(valid, n_sel))


def draw_positions(inputs: LossInputs, u: Tensor | None, valid: Tensor, keys: RowKeys | None) -> Draws:
    """m_t, w_t: the policy over the scores u(t) (zeros without a signal), as draws.  -> [B,K]"""
    scores = u if u is not None else torch.zeros(valid.shape, device=valid.device)
    return call_policy(
        inputs.selector.policy,
        scores,
        valid,
        generator=inputs.generator,
        step=inputs.step,
        keys=keys,
        gather=inputs.gather,
    )


def normalizers(n_sel: Tensor, normalization: str, dtype: torch.dtype) -> tuple[Tensor, float]:
    """What each sequence's weighted losses m_t w_t l(t) are divided by in the loss sum, and the weight the step
    divides the summed loss by: per_sequence, n_sel_i = sum_t m_t (at least 1) and sum_i s_i (s_i = 1 where row
    i has a selected position), so the loss sum is sum_i s_i L_i; batch_tokens, 1 and the number of selected
    positions.  n_sel [B] -> [B], float"""
    if normalization == "per_sequence":
        return n_sel.to(dtype).clamp_min(1), float((n_sel > 0).sum())
    if normalization == "batch_tokens":
        return torch.ones(n_sel.shape, dtype=dtype, device=n_sel.device), float(n_sel.sum())
    raise ValueError(f"train.normalization={normalization!r}; allowed: per_sequence, batch_tokens")


def position_metrics(valid: Tensor, n_sel: Tensor) -> dict[str, float]:
    return {"positions_valid": float(valid.sum()), "positions_selected": float(n_sel.sum())}


def selected_loss(
    s_logits: Tensor,
    t_logits: Tensor | None,
    labels: Tensor,
    rows: Tensor,
    cols: Tensor,
    u: Tensor | None,
    inputs: LossInputs,
    keys: RowKeys | None,
) -> Tensor:
    """l(t) at the selected positions (rows, cols); where covering every position is cheaper
    (`covering_positions`), l at every position, read in place, the few unselected ones dropped.  -> [N]"""
    B, T = labels.shape
    cover = covering_positions(inputs.selector, rows, B, T, inputs.cached)
    if cover is None:
        return per_position_loss(s_logits, t_logits, labels, rows, cols, u, inputs, keys)
    u_every = u.nan_to_num(neginf=0.0) if u is not None else None  # finite where unselected: no nan grads
    ell = per_position_loss(s_logits, t_logits, labels.clamp_min(0), *cover, u_every, inputs, None)
    return ell[rows * T + cols]


def token_ce(s_logits: Tensor, targets: Tensor) -> Tensor:
    """CE(x_{t+1}, q_t) = -log q_t(x_{t+1}).  [N,V],[N] -> [N]"""
    return F.cross_entropy(upcast(s_logits), targets, reduction="none")


def per_position_loss(
    s_logits: Tensor,
    t_logits: Tensor | None,
    labels: Tensor,
    rows: Tensor,
    cols: Tensor,
    u: Tensor | None,
    inputs: LossInputs,
    keys: RowKeys | None,
) -> Tensor:
    """l(t) = lam T^2 D_C(p_t, q_t) + (1 - lam) CE(x_{t+1}, q_t) at positions (rows, cols).  -> [N]"""
    lam, temperature = inputs.lam, inputs.temperature
    s_sel, y_sel = at_positions(s_logits, rows, cols), labels[rows, cols]  #   [N,V], [N]
    ell = torch.zeros(y_sel.shape, dtype=upcast(s_sel).dtype, device=y_sel.device)
    if lam > 0:
        pkeys = PositionKeys(keys, rows, cols, labels.shape[1]) if keys is not None else None
        ell = ell + lam * temperature**2 * divergence(s_sel, t_logits, labels, rows, cols, u, inputs, pkeys)
    if lam < 1:
        ell = ell + (1 - lam) * token_ce(s_sel, y_sel)
    return ell


def divergence(
    s_sel: Tensor,
    t_logits: Tensor | None,
    labels: Tensor,
    rows: Tensor,
    cols: Tensor,
    u: Tensor | None,
    inputs: LossInputs,
    keys: PositionKeys | None,
) -> Tensor:
    """D_C(p_t, q_t) at the selected positions (rows, cols), all at once.  -> [N]"""
    sel, temperature = inputs.selector, inputs.temperature
    crit = sel.criterion
    if inputs.cached is not None:  # C_t and p~ from the offline cache, indexed by valid-position order
        D = sparse_divergence(crit, "the teacher cache", inputs.cached.form)
        return D(s_sel, inputs.cached.take(valid_order(labels)[rows, cols]).to(s_sel.device), temperature)
    if t_logits is None:
        raise ValueError("lam > 0 needs teacher logits or cached class targets")
    t_sel = at_positions(t_logits, rows, cols)  #                                 [N,V]
    if sel.classes is not None:  # C_t subset of V: the criterion's sparse form (Selector checked it has one)
        D = sparse_divergence(crit, f"classes {sel.classes.name!r}", sel.classes.form_of())
        target = draw_classes(sel, t_sel, s_sel, temperature=temperature, generator=inputs.generator, keys=keys)
        return D(s_sel, target, temperature)
    u_sel = u[rows, cols] if u is not None else None
    return crit(s_sel, t_sel, labels[rows, cols], temperature=temperature, row=rows, u=u_sel)


def at_positions(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """x[rows, cols]: [B,T,...] -> [N,...]. Where (rows, cols) is every position in row-major order (Full KD on
    packed text), the same rows as a view instead of an [N,V] copy."""
    B, T = x.shape[:2]
    if rows.numel() == B * T:  # nonzero() lists positions row-major: all of them is the flat order
        return x.reshape(B * T, *x.shape[2:])
    return x[rows, cols]


def covering_positions(
    sel: Selector, rows: Tensor, B: int, T: int, cached: SparseTarget | None
) -> tuple[Tensor, Tensor] | None:
    """Every position, row-major, when computing l there and dropping the unselected is cheaper than copying the
    selected logits out: Full KD on packed text selects all but each row's last position (it has no target), and
    [B,T,V] logits are a [B*T,V] view while x[rows, cols] is an [N,V] copy (and, backward, an index_put). Only
    for a pointwise criterion over the full vocabulary (no class draws, no cache, nothing batch-level)."""
    if cached is not None or sel.classes is not None or sel.criterion.coupling != "pointwise":
        return None
    if rows.numel() < B * T - B:  # at most one unselected position per row
        return None
    every = torch.arange(B * T, device=rows.device)
    return every // T, every % T


def draw_classes(
    sel: Selector,
    t_sel: Tensor,
    s_sel: Tensor,
    *,
    temperature: float,
    generator: torch.Generator | None,
    keys: PositionKeys | None,
) -> SparseTarget:
    """The class selector's targets at positions t_sel [N,V] (the student's logits there, s_sel, detached, for a
    selector that chooses by them); a random one draws from the positions' keys."""
    if sel.classes is None:
        raise ValueError("no class selector: C_t = V takes no class draws")
    kw: dict = {"keys": keys} if sel.classes.random and keys is not None else {}
    if sel.classes.needs_student:
        kw["student"] = s_sel.detach()
    return sel.classes(t_sel, temperature=temperature, generator=generator, **kw)


def valid_order(labels: Tensor) -> Tensor:
    """Each valid position's index in row-major valid order (the teacher cache's order), -1 elsewhere.  [B,T]"""
    valid = labels != IGNORE
    order = torch.full(labels.shape, -1, dtype=torch.long, device=labels.device)
    order[valid] = torch.arange(int(valid.sum()), device=labels.device)
    return order
