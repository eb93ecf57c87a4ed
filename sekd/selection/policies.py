"""Selection policies m_t (docs/method.md §5): which positions of each sequence get teacher supervision.

A policy maps scores u [B,T] (-inf where invalid) and the valid mask to `Draws`: per sequence, the selected
positions in draw order with one weight each (repeats allowed for sampling policies), which the objective
turns into L_i = sum_j w_j l(t_j) / K_i. Options (k, Q, S, tau, coverage) are bound at build time,
`generator` and `step` come at call time. Each declares what it is (`PolicyPiece`): `random` (row i's
numbers come from its per-sample `keys`, sekd/core/rng.py `RowKeys`, or from keys drawn from the CPU
`generator`; no global RNG), `stepped` (it reads the optimizer step) and `stateful` (GLS's queue, kept in
the checkpoint; it sees every rank's scores through `gather`, so its state is the same on every rank).
Stateless policies are plain functions registered as a `Policy`, acting row by row.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor

from sekd.core.registry import NoOptions, Registry, at_least, in_range, positive
from sekd.core.rng import RowKeys, categorical, row_keys
from sekd.selection import references as R

POLICIES: Registry[PolicyPiece] = Registry("policy", call_time=("generator", "step", "keys", "gather"))


@dataclass
class Draws:
    """Selected positions per sequence: index/weight/mask [B,K], padded where mask is False."""

    index: Tensor
    weight: Tensor
    mask: Tensor

    def count(self) -> Tensor:
        """sum_t m_t per sequence (number of draws).  [B]"""
        return self.mask.sum(-1).to(self.weight.dtype)

    def dense(self, T: int) -> Tensor:
        """m_t * w_t laid on positions, repeats summed.  [B,T]"""
        out = torch.zeros(self.index.shape[0], T, dtype=self.weight.dtype, device=self.weight.device)
        return out.scatter_add_(1, self.index, self.weight * self.mask)

    @staticmethod
    def from_mask(m: Tensor, order: Tensor | None = None) -> "Draws":
        """Unit-weight draws from a boolean mask [B,T]; `order` [B,T] ranks them (default: position)."""
        B, T = m.shape
        K = int(m.sum(-1).max().item()) if m.numel() else 0
        key = torch.arange(T, device=m.device).expand(B, T).float() if order is None else order.float()
        key = key.masked_fill(~m, float("inf"))
        index = key.argsort(dim=-1, stable=True)[:, :K]
        mask = torch.gather(m, 1, index)
        return Draws(index, torch.ones(B, K, device=m.device), mask)

    @staticmethod
    def cat(a: "Draws", b: "Draws") -> "Draws":
        """a's draws then b's, per sequence, packed to the left (padding at the end).  [B,Ka+Kb]"""
        index = torch.cat([a.index, b.index], 1)
        weight = torch.cat([a.weight, b.weight.to(a.weight.dtype)], 1)
        mask = torch.cat([a.mask, b.mask], 1)
        K = int(mask.sum(-1).max().item()) if mask.numel() else 0
        order = (~mask).to(torch.int8).argsort(dim=-1, stable=True)[:, :K]
        return Draws(index.gather(1, order), weight.gather(1, order), mask.gather(1, order))


# ---- what a policy declares -----------------------------------------------------------------


@runtime_checkable
class PolicyPiece(Protocol):
    """(u [B,T], valid [B,T], *, generator, step, [keys], [gather]) -> Draws, and what the policy declares
    about itself: a random one also takes `keys` (per-row RowKeys), a stateful one `gather`."""

    @property
    def name(self) -> str: ...

    @property
    def random(self) -> bool:  # draws (per-row keys, or keys drawn from the generator)
        ...

    @property
    def stepped(self) -> bool:  # reads the optimizer step
        ...

    @property
    def stateful(self) -> bool:  # keeps state for the checkpoint (state_dict / load_state_dict)
        ...

    def __call__(
        self, u: Tensor, valid: Tensor, *, generator: torch.Generator | None = None, step: int = 0
    ) -> Draws: ...


@dataclass(frozen=True)
class Policy:
    """A stateless registered policy: a plain function and its declared traits."""

    name: str
    fn: Callable[..., Draws]
    random: bool = False
    stepped: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    reference: Callable[..., Tensor] | None = None  # E[m_t w_t] in float64 (sekd/selection/references.py)
    example: Mapping[str, Any] = field(default_factory=dict)  # options the conformance kit runs it with
    stateful: ClassVar[bool] = False

    def __call__(self, u: Tensor, valid: Tensor, **kw: Any) -> Draws:
        return self.fn(u, valid, **{**self.options, **kw})

    def bind(self, **options: Any) -> "Policy":
        return replace(self, options=dict(options))


def policy(
    name: str,
    options: type = NoOptions,
    *,
    random: bool = False,
    stepped: bool = False,
    reference: Callable[..., Tensor] | None = None,
    example: Mapping[str, Any] | None = None,
) -> Callable[[Any], Any]:
    """Register a function as the stateless policy `name` (returns the `Policy`), or a class as a stateful
    one (returned as it is; the class declares random/stepped/stateful, and state_dict/load_state_dict).
    `reference`: the expected weight per position in float64 (sekd/selection/references.py); `example`:
    options the conformance kit runs it with (required options need one)."""

    def add(fn: Any) -> Any:
        if isinstance(fn, type):
            return _register_class(
                name, fn, options, random=random, stepped=stepped, reference=reference, example=example
            )
        piece = Policy(name, fn, random=random, stepped=stepped, reference=reference, example=dict(example or {}))
        POLICIES.register(name, options=options)(piece)
        return piece

    return add


def _register_class(name: str, cls: Any, options: type, **declared: Any) -> Any:
    """A stateful policy class: its traits are its own; what the decorator adds must agree with them."""
    for trait in ("random", "stepped", "stateful"):
        if not isinstance(getattr(cls, trait, None), bool):
            raise ValueError(f"policy {name!r}: class {cls.__name__} must declare `{trait}: ClassVar[bool]`")
        if trait in declared and declared[trait] and not getattr(cls, trait):
            raise ValueError(f"policy {name!r}: @policy says {trait}=True, class {cls.__name__} says False")
    if cls.stateful and not (
        callable(getattr(cls, "state_dict", None)) and callable(getattr(cls, "load_state_dict", None))
    ):
        raise ValueError(f"policy {name!r}: a stateful class needs state_dict and load_state_dict")
    cls.name = name
    reference = declared["reference"] if declared["reference"] is not None else getattr(cls, "reference", None)
    cls.reference = staticmethod(reference) if reference is not None else None  # a function, not a method
    cls.example = dict(declared["example"] or getattr(cls, "example", None) or {})
    POLICIES.register(name, options=options)(cls)
    return cls


def as_policy(fn: Callable[..., Draws]) -> PolicyPiece:
    """A registered policy as it is; an undeclared callable as a stateless, deterministic `Policy`."""
    return fn if isinstance(fn, PolicyPiece) else Policy(getattr(fn, "__name__", "policy"), fn)


def call_policy(
    policy: PolicyPiece,
    u: Tensor,
    valid: Tensor,
    *,
    generator: torch.Generator | None = None,
    step: int = 0,
    keys: RowKeys | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> Draws:
    """Call `policy` with the call-time keywords it declares it uses: `keys` if random, `gather` if stateful."""
    kw: dict[str, Any] = {"generator": generator, "step": step}
    if policy.random and keys is not None:
        kw["keys"] = keys
    if policy.stateful and gather is not None:
        kw["gather"] = gather
    return policy(u, valid, **kw)


# ---- options, declared at registration (checked by POLICIES.check_kwargs / build) --------------


@dataclass(frozen=True)
class BudgetOptions:
    """k: the fraction of each sequence's valid positions to select, in (0, 1]."""

    k: float

    def __post_init__(self):
        in_range("k", self.k, 0, 1, open_lo=True)


@dataclass(frozen=True)
class CurriculumOptions(BudgetOptions):
    """S: optimizer steps over which the window moves from the easiest positions to top_k's, >= 1."""

    S: int = 4000

    def __post_init__(self):
        super().__post_init__()
        at_least("S", self.S, 1)


@dataclass(frozen=True)
class GLSOptions(BudgetOptions):
    """Q: length of the FIFO queue of earlier scores that sets the threshold, >= 1."""

    Q: int = 30_000

    def __post_init__(self):
        super().__post_init__()
        at_least("Q", self.Q, 1)


@dataclass(frozen=True)
class PosRSOptions(BudgetOptions):
    """tau > 0 smooths q ~ u^(1/tau); coverage in [0, 1] is the share of the budget taken by top_k first."""

    tau: float = 1.0
    coverage: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        positive("tau", self.tau)
        in_range("coverage", self.coverage, 0, 1)


# ---- helpers --------------------------------------------------------------------------------


def check_k(k: float) -> float:
    """Budget k in (0, 1]."""
    if not 0.0 < float(k) <= 1.0:
        raise ValueError(f"policy budget k={k!r}; must be in (0, 1]")
    return float(k)


def n_select(valid: Tensor, k: float) -> Tensor:
    """n_sel = ceil(k * n_valid), at least 1 when n_valid >= 1.  [B]"""
    n_valid = valid.sum(-1)
    n = torch.ceil(n_valid.double() * k - 1e-9).long()
    return torch.minimum(n.clamp_min(1), n_valid)


def rank_desc(u: Tensor) -> Tensor:
    """Rank of each position by descending u, ties broken by lower position.  [B,T] -> [B,T]"""
    order = u.argsort(dim=-1, descending=True, stable=True)
    return order.argsort(-1)


def masked_rank(u: Tensor, valid: Tensor) -> Tensor:
    """rank_desc with every valid position ahead of every invalid one.  [B,T] -> [B,T]"""
    return rank_desc(u.float().masked_fill(~valid, float("-inf")))


def nonneg_scores(u: Tensor, valid: Tensor, who: str) -> Tensor:
    """u on valid positions, 0 elsewhere; float round-off below 0 clamped, real negatives an error.  [B,T]"""
    x = u.double().masked_fill(~valid, 0.0)
    tol = 1e-5 * max(1.0, float(x.abs().max())) if x.numel() else 0.0
    if bool((x < -tol).any()):
        raise ValueError(
            f"policy {who!r} samples positions with q(t) proportional to u(t), so u must be >= 0; "
            f"got min u = {float(x.min()):.4g}. Use a non-negative signal (or normalization=minmax, not zscore)."
        )
    return x.clamp_min(0.0)


# ---- deterministic policies -----------------------------------------------------------------


@policy("all", NoOptions, reference=R.all_positions)
def all_positions(u: Tensor, valid: Tensor, *, generator: torch.Generator | None = None, step: int = 0) -> Draws:
    """m_t = valid(t): Full KD."""
    return Draws.from_mask(valid)


@policy("top_k", BudgetOptions, reference=R.top_k, example={"k": 0.4})
def top_k(u: Tensor, valid: Tensor, *, k: float, generator: torch.Generator | None = None, step: int = 0) -> Draws:
    """m_t = 1 for the ceil(k * n_valid) largest u(t) of each sequence (ties: lower position)."""
    rank = masked_rank(u, valid)
    m = (rank < n_select(valid, check_k(k)).unsqueeze(-1)) & valid
    return Draws.from_mask(m, order=rank)


@policy("random", BudgetOptions, random=True, reference=R.uniform_k, example={"k": 0.4})
def random_positions(
    u: Tensor,
    valid: Tensor,
    *,
    k: float,
    generator: torch.Generator | None = None,
    step: int = 0,
    keys: RowKeys | None = None,
) -> Draws:
    """ceil(k * n_valid) valid positions uniformly without replacement (row i: T uniforms of its key)."""
    B, T = valid.shape
    keys = row_keys(B, keys=keys, generator=generator, who="random policy")
    noise = keys.uniform([T] * B, "random policy", valid.device).masked_fill(~valid, -1.0)  # [B,T]
    rank = rank_desc(noise)
    m = (rank < n_select(valid, check_k(k)).unsqueeze(-1)) & valid
    return Draws.from_mask(m, order=rank)


@policy("curriculum", CurriculumOptions, stepped=True, reference=R.curriculum_window, example={"k": 0.4, "S": 2000})
def curriculum(
    u: Tensor, valid: Tensor, *, k: float, S: int = 4000, generator: torch.Generator | None = None, step: int = 0
) -> Draws:
    """pi = min(1, step / S); the n_sel positions at ascending-u ranks [floor((n_valid - n_sel) pi), +n_sel).

    Ascending order is the exact reverse of top_k's descending order, so pi = 1 gives top_k's draws.
    """
    if S <= 0:
        raise ValueError(f"curriculum S={S!r}; must be > 0")
    pi = min(1.0, max(0.0, step / S))
    rank = masked_rank(u, valid)  # descending, ties by lower position        [B,T]
    n_valid = valid.sum(-1, keepdim=True)  #                                     [B,1]
    n_sel = n_select(valid, check_k(k)).unsqueeze(-1)  #                          [B,1]
    asc = n_valid - 1 - rank  # ascending rank of valid positions               [B,T]
    start = torch.floor((n_valid - n_sel).double() * pi + 1e-9).long()  #        [B,1]
    m = (asc >= start) & (asc < start + n_sel) & valid
    return Draws.from_mask(m, order=rank)


@policy("gls", GLSOptions, reference=R.gls_first_call, example={"k": 0.4, "Q": 40})
class GLS:
    """Global-level selection: m_t = 1[u(t) >= tau], tau = the (1 - k) quantile of a FIFO queue of the
    last Q valid scores (numpy's default 'linear' quantile).

    Order: threshold first, then enqueue. The batch is judged against the scores of earlier batches
    only, so it never sets its own threshold; while the queue is empty (the first batch, or until a
    batch with a valid position arrives) GLS falls back to top_k. A sequence may get no position.
    """

    name: ClassVar[str] = "gls"
    random: ClassVar[bool] = False
    stepped: ClassVar[bool] = False
    stateful: ClassVar[bool] = True  # the queue goes into the checkpoint
    reference: ClassVar[Callable[..., Tensor] | None]  # a fresh GLS's first call: top_k (set by @policy)
    example: ClassVar[dict[str, Any]]

    def __init__(self, *, k: float, Q: int = 30_000):
        if int(Q) < 1:
            raise ValueError(f"gls Q={Q!r}; must be >= 1")
        self.k = check_k(k)
        self.Q = int(Q)
        self.queue = torch.empty(0, dtype=torch.float32)  # last Q valid scores, oldest first

    def threshold(self) -> float:
        """tau = quantile(queue, 1 - k), or -inf while the queue is empty."""
        if self.queue.numel() == 0:
            return float("-inf")
        return float(torch.quantile(self.queue.double(), 1.0 - self.k, interpolation="linear"))

    def push(self, scores: Tensor) -> None:
        """Append scores [N] (in position order) and keep the last Q."""
        q = torch.cat([self.queue, scores.detach().float().cpu().reshape(-1)])
        self.queue = q[-self.Q :].clone()

    def __call__(
        self,
        u: Tensor,
        valid: Tensor,
        *,
        generator: torch.Generator | None = None,
        step: int = 0,
        gather: Callable[[Tensor], Tensor] | None = None,
    ) -> Draws:
        """m_t = 1[u(t) >= tau] against earlier batches (top_k while the queue is empty); then enqueue the
        scores of the whole global micro-batch: `gather` concatenates every rank's row-major valid scores
        in rank order (identity in one process), so every rank pushes the same scores and keeps one queue."""
        if self.queue.numel() == 0:
            draws = top_k(u, valid, k=self.k)
        else:
            m = (u.double() >= self.threshold()) & valid
            draws = Draws.from_mask(m, order=masked_rank(u, valid))
        local = u[valid].detach().float()  # row-major valid scores                   [N]
        self.push(gather(local) if gather is not None else local)  # all ranks'        [N_global]
        return draws

    def state_dict(self) -> dict[str, Any]:
        return {"queue": self.queue.clone(), "k": self.k, "Q": self.Q}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["Q"]) != self.Q:
            raise ValueError(f"gls checkpoint has Q={state['Q']}, this run Q={self.Q}")
        self.queue = state["queue"].detach().float().cpu()[-self.Q :].clone()


# ---- sampling policies (Pos RS-KD) ----------------------------------------------------------


def _sample(w: Tensor, n: Tensor, keys: RowKeys) -> tuple[Tensor, Tensor]:
    """n_i draws i.i.d. with replacement from q ∝ w of row i (rows with n_i = 0 may have w = 0); row i's
    uniforms are the first n_i of its key's stream.  w [B,T] >= 0, n [B] -> index [B,K], mask [B,K]"""
    B, T = w.shape
    K = int(n.max().item()) if n.numel() else 0
    if K == 0 or T == 0:
        z = torch.zeros(B, 0, dtype=torch.long, device=w.device)
        return z, z.bool()
    u = keys.uniform(n.tolist(), "pos_rs draws", w.device, torch.float64)  # padding 0: masked below  [B,K]
    index = categorical(w.detach(), K, None, who="pos_rs draws", u=u)  # on w's device; empty rows uniform
    mask = torch.arange(K, device=w.device).unsqueeze(0) < n.unsqueeze(-1)
    return index, mask


def _pos_rs(
    u: Tensor, valid: Tensor, *, k: float, tau: float, coverage: float, keys: RowKeys, star: bool, who: str
) -> Draws:
    """Shared body of pos_rs / pos_rs_star; see their docstrings."""
    check_k(k)
    if tau <= 0:
        raise ValueError(f"{who} tau={tau!r}; must be > 0")
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"{who} coverage={coverage!r}; must be in [0, 1]")
    x = nonneg_scores(u, valid, who)  # u(t) >= 0, 0 off valid                    [B,T]
    # w(t) = u(t)^(1/tau), scaled by the row max (q is scale-free); all-zero rows -> uniform over valid
    logw = torch.log(x) / tau
    logw = logw - logw.amax(-1, keepdim=True).nan_to_num(0.0, neginf=0.0)
    w = logw.exp().masked_fill(~valid, 0.0)
    w = torch.where(w.sum(-1, keepdim=True) > 0, w, valid.double())  #            [B,T]

    n_valid = valid.sum(-1)  #                                                      [B]
    K = n_select(valid, k)  # draws per sequence, n_sel                             [B]
    n_cov = torch.minimum(torch.floor(K.double() * coverage + 1e-9).long(), (K - 1).clamp_min(0))
    rank = masked_rank(x.float(), valid)
    D = (rank < n_cov.unsqueeze(-1)) & valid  # deterministic top-u part            [B,T]
    R = valid & ~D  # the rest, sampled                                              [B,T]
    wR = w.masked_fill(~R, 0.0)
    W, W_R = w.sum(-1), wR.sum(-1)  #                                               [B]
    n_s = K - n_cov  # sampled draws, >= 1 when n_valid >= 1                         [B]

    qR = torch.where(W_R.unsqueeze(-1) > 0, wR, R.double())  # all-zero R: uniform on R  [B,T]
    qR = qR / qR.sum(-1, keepdim=True).clamp_min(1e-300)  # q_R(t)                  [B,T]
    index, mask = _sample(qR, n_s, keys)  #                                    [B,Ks]
    q_R = qR.gather(1, index)  # q_R(t_j)                                           [B,Ks]
    Kf, nv, ns = K.double().unsqueeze(-1), n_valid.double().unsqueeze(-1), n_s.double().clamp_min(1).unsqueeze(-1)
    if star:  # unbiased for mean_t l(t): D exactly, R by importance weights
        w_D = (Kf / nv.clamp_min(1)).expand_as(D).double()
        w_s = Kf / (ns * nv.clamp_min(1) * q_R.clamp_min(1e-300))
    else:  # unbiased for sum_t w(t) l(t) / sum_t w(t)
        w_D = Kf * w / W.clamp_min(1e-300).unsqueeze(-1)
        w_s = (Kf * (W_R / W.clamp_min(1e-300)).unsqueeze(-1) / ns).expand_as(q_R)
    det = Draws.from_mask(D, order=rank)
    det.weight = w_D.gather(1, det.index).float()
    sampled = Draws(index, torch.where(mask, w_s, torch.zeros_like(w_s)).float(), mask)
    return Draws.cat(det, sampled)


@policy(
    "pos_rs", PosRSOptions, random=True, reference=R.pos_rs_expected, example={"k": 0.4, "tau": 0.7, "coverage": 0.3}
)
def pos_rs(
    u: Tensor,
    valid: Tensor,
    *,
    k: float,
    tau: float = 1.0,
    coverage: float = 0.0,
    generator: torch.Generator | None = None,
    step: int = 0,
    keys: RowKeys | None = None,
) -> Draws:
    """Pos RS-KD: K = n_sel draws i.i.d. from q(t) = w(t) / sum_j w(j), w = u^(1/tau); weight 1 each.

    E[L_i] = sum_t w(t) l(t) / sum_t w(t): weighted KD (tau = 1: w = u). With `coverage` c, the
    floor(c * K) positions of largest u (at most K - 1) are taken once with weight K w(t)/W, and the
    rest of the draws come from q restricted to the other positions R with weight K (W_R/W) / n_s;
    the estimator stays unbiased for the same weighted KD. A row whose u are all 0 samples uniformly.
    """
    keys = row_keys(u.shape[0], keys=keys, generator=generator, who="pos_rs")
    return _pos_rs(u, valid, k=k, tau=tau, coverage=coverage, keys=keys, star=False, who="pos_rs")


@policy(
    "pos_rs_star",
    PosRSOptions,
    random=True,
    reference=R.pos_rs_star_expected,
    example={"k": 0.4, "tau": 2.0, "coverage": 0.5},
)
def pos_rs_star(
    u: Tensor,
    valid: Tensor,
    *,
    k: float,
    tau: float = 1.0,
    coverage: float = 0.0,
    generator: torch.Generator | None = None,
    step: int = 0,
    keys: RowKeys | None = None,
) -> Draws:
    """Pos RS-KD*: pos_rs's draws, each weighted 1 / (n_valid q(t)); E[L_i] = mean_t l(t) (Full KD).

    Unbiased where q(t) > 0 on every valid position (u > 0; tau does not change the support). With
    `coverage` c the top floor(c * K) positions get weight K / n_valid and each of the n_s sampled
    draws K / (n_s n_valid q_R(t)), which keeps the estimator unbiased for Full KD.
    """
    keys = row_keys(u.shape[0], keys=keys, generator=generator, who="pos_rs_star")
    return _pos_rs(u, valid, k=k, tau=tau, coverage=coverage, keys=keys, star=True, who="pos_rs_star")
