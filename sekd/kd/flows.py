"""The selective objective of docs/method.md §2 from hidden states: chunked importance and a selective LM
head (docs/method.md §9, "Chunked scoring", "Selective LM head").

The same loss as the dense `selective_kd_loss` on the logits the heads would give, but no [B,T,V] tensor
ever exists: u(t) from the heads over chunks of valid positions (no grad); m_t, w_t = policy(u) with the
dense flow's per-row keys; the student head with gradient only at the selected positions, C at a time.
A pointwise criterion runs chunk by chunk; a batch-level one (`weighted`, `atkd`) first runs its prepare
step over all selected positions. tests/kd/test_protocols.py holds both flows equal for every registered
criterion x policy x class sampler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from sekd.kd.objective import (
    LossInputs,
    Selector,
    StepOut,
    draw_classes,
    draw_positions,
    normalizers,
    position_metrics,
    token_ce,
    valid_order,
)
from sekd.core.rng import PositionKeys, RowKeys
from sekd.selection import signals as S
from sekd.selection.classes import SparseTarget
from sekd.selection.criteria import ChunkD, Selected, sparse_divergence
from sekd.core.tensors import IGNORE

# ---- heads ----------------------------------------------------------------------------------


def compute_dtype(W: Tensor, device: torch.device | str) -> torch.dtype:
    """What a matmul with W computes in on `device`: autocast's dtype where autocast is on (it leaves float64
    alone), else W's own."""
    dev = torch.device(device).type
    if torch.is_autocast_enabled(dev) and W.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    return W.dtype


class LinearLike(Protocol):
    """An LM head as the flows read it: an nn.Linear, or anything with its weight (and maybe bias)."""

    weight: Tensor


@dataclass
class Head:
    """An LM head cut to the shared vocabulary: z = h W[:V]^T + b[:V].  [N,d] -> [N,V]"""

    weight: Tensor  # [V_head, d] (may be tied to the input embedding)
    bias: Tensor | None
    vocab: int

    @staticmethod
    def of(module: LinearLike, vocab: int) -> "Head":
        """From an nn.Linear-like module (`model.get_output_embeddings()`)."""
        W = module.weight
        if vocab > W.shape[0]:
            raise ValueError(f"vocab={vocab} is wider than the LM head ({W.shape[0]} rows)")
        return Head(W, getattr(module, "bias", None), vocab)

    def cast(self, dtype: torch.dtype) -> "Head":
        """The head's V rows in `dtype`, detached (no grad flows through it): cast once per step. Under autocast
        each F.linear with the float32 weight would cast the whole [V,d] afresh, once per chunk."""
        W = self.weight.detach()[: self.vocab]
        b = self.bias.detach()[: self.vocab] if self.bias is not None else None
        return Head(W.to(dtype), b.to(dtype) if b is not None else None, self.vocab)

    def for_compute(self, device: torch.device) -> "Head":
        """This head as the chunk loops use it: cast once to autocast's dtype where autocast is on (and the
        weight is not already in it); itself otherwise."""
        dtype = compute_dtype(self.weight, device)
        return self if dtype == self.weight.dtype else self.cast(dtype)

    def __call__(self, h: Tensor) -> Tensor:
        b = self.bias[: self.vocab] if self.bias is not None else None
        return F.linear(h, self.weight[: self.vocab], b)

    def into(self, out: Tensor, h: Tensor) -> Tensor:
        """out := h W[:V]^T + b[:V] in a reused block: in place where h, W and out share the compute dtype;
        else the logits in the compute dtype (autocast's: the numbers F.linear gives) in a reused block of
        that dtype, copied in. No [C,V] allocation per chunk; W is cast here only if it was not beforehand
        (`for_compute`).  [C,d] -> out [C,V]"""
        W = self.weight.detach()[: self.vocab]
        b = self.bias.detach()[: self.vocab] if self.bias is not None else None
        dtype = compute_dtype(W, h.device)
        if h.dtype == W.dtype == out.dtype == dtype:
            torch.mm(h, W.t(), out=out)
            return out.add_(b) if b is not None else out
        W, h = W.to(dtype), h.to(dtype)
        b = b.to(dtype) if b is not None else None
        z = SCRATCH.blocks(2, h.shape[0], self.vocab, dtype, h.device)[0] if out.dtype != dtype else out
        if b is None:
            torch.mm(h, W.t(), out=z)
        else:
            torch.addmm(b, h, W.t(), out=z)  # as F.linear: the bias added inside the product
        return z if z is out else out.copy_(z)


class Scratch:
    """Reused [C,V] blocks for the chunk loops, kept from step to step per (device, dtype). On CPU a fresh
    block per chunk is page faults (blocks above glibc's mmap threshold are mapped and unmapped each time)
    or heap holes that the small tensors made between them keep from closing; one allocation serves every
    chunk of every step. `blocks` hands out views, valid until its next call."""

    def __init__(self) -> None:
        self._blocks: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}

    def blocks(self, k: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device | str) -> list[Tensor]:
        key, need = (torch.device(device), dtype), rows * cols
        have = self._blocks.get(key, [])
        if len(have) < k or have[0].numel() < need:
            self._blocks.pop(key, None)  # the old blocks go before the new ones come
            have = [torch.empty(need, dtype=dtype, device=device) for _ in range(max(k, len(have)))]
            self._blocks[key] = have
        return [b[:need].view(rows, cols) for b in have[:k]]

    def clear(self) -> None:
        self._blocks.clear()

    def release(self, device: torch.device) -> None:
        """Hand a GPU's blocks back to its caching allocator (which reuses memory without page faults, and
        can give it to the backward pass meanwhile); a CPU's blocks are kept for the next step."""
        if device.type != "cpu":
            for key in [k for k in self._blocks if k[0] == device]:
                del self._blocks[key]


SCRATCH = Scratch()


def chunks(n: int, size: int) -> list[slice]:
    """[0, n) in consecutive slices of at most `size`."""
    if size < 1:
        raise ValueError(f"chunk_size={size!r}; must be >= 1")
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


def auto_chunk_size(vocab: int, device_type: str) -> int:
    """Positions per chunk so that one float32 [C,V] block is <= 32 MiB on CPU or 512 MiB on a GPU. The blocks
    are reused (`SCRATCH`), so larger chunks cost memory, not page faults; below ~50 positions at V = 152K the
    head's matmuls get thin and slow on CPU. On a GPU each chunk also moves a fixed amount whatever its size
    (the [V,d] float32 weight gradient read and written, the bf16 product, W read twice: ~5 GB at V = 152K,
    d = 2048, ~1.5 ms at an H100's 3.35 TB/s) while its three matmuls, 6 C V d flops, grow with C (~1.2 ms at
    C = 440 and ~700 TFLOP/s): 512 MiB (C ~ 880) halves that fixed cost's share, for ~2 GiB of blocks (three
    float32, two bf16 under autocast), handed back to the allocator after each step."""
    budget = 2**25 if device_type == "cpu" else 2**29
    return max(1, budget // (4 * vocab))


def accumulation_dtype(h: Tensor, head: Head) -> torch.dtype:
    """Losses in float64 for float64 inputs (the reference tests), else float32 (as `upcast`)."""
    return torch.float64 if h.dtype == head.weight.dtype == torch.float64 else torch.float32


# ---- position axis: chunked scoring ---------------------------------------------------------


@torch.no_grad()
def chunked_importance(
    sel: Selector,
    h_s: Tensor,
    student: Head,
    h_t: Tensor | None,
    teacher: Head | None,
    labels: Tensor,
    valid: Tensor,
    *,
    generator: torch.Generator | None,
    temperature: float,
    chunk_size: int,
    keys: RowKeys | None = None,
) -> Tensor | None:
    """u(t) on [B,T] as `signals.importance`, from heads over chunks of valid positions; never [B,T,V]."""
    sig, how = sel.signal, sel.signal_normalization
    if sig is None:
        return None
    if sig.random:  # T uniforms per row from its key, exactly as the dense flow
        # a random signal reads no logits
        return S.importance(sig, None, None, labels, valid, generator=generator, normalization=how, keys=keys)  # type: ignore[arg-type]
    if how not in S.NORMALIZATIONS:
        raise ValueError(f"signal normalization {how!r}; allowed: {', '.join(S.NORMALIZATIONS)}")
    if sig.needs_teacher and (h_t is None or teacher is None):
        raise ValueError(f"signal {sig.name!r} needs teacher logits at every position")
    rows, cols = valid.nonzero(as_tuple=True)  # flat valid positions                [P]
    y = labels[rows, cols]
    teacher_at = TeacherAt(teacher, h_t, rows, cols) if sig.needs_teacher else None
    # written into in place: a small tensor kept per chunk would land in the holes the [C,V] blocks leave on the
    # CPU heap, and the heap would grow with the number of chunks
    terms = torch.empty(len(sig.terms), rows.numel(), device=labels.device)  #     [n_terms,P]
    acc = accumulation_dtype(h_s, student)
    for sl in chunks(rows.numel(), chunk_size):
        r, c = rows[sl], cols[sl]
        z_s, z_t = SCRATCH.blocks(2, len(r), student.vocab, acc, h_s.device)  #    [C,V] x 2
        t = teacher_at.into(z_t, sl) if teacher_at is not None else None
        terms[:, sl] = S.importance_terms(sig, student.into(z_s, h_s[r, c]), t, y[sl], temperature=temperature)
    u = torch.zeros(valid.shape, dtype=torch.float32, device=labels.device)
    for term in terms:
        x = torch.zeros_like(u)
        x[rows, cols] = term
        u = u + S.normalize(x, valid, how)
    return u.masked_fill(~valid, float("-inf"))


@dataclass
class TeacherAt:
    """The selective teacher head: z_t at the positions (rows[sl], cols[sl]) of h_t, no grad.  -> [C,V]"""

    head: Head | None  # None without a teacher: asking for its logits is then an error
    h: Tensor | None  # [B,T,d_t]
    rows: Tensor
    cols: Tensor

    def parts(self) -> tuple[Head, Tensor]:
        if self.head is None or self.h is None:
            raise ValueError("lam > 0 needs teacher logits or cached class targets")
        return self.head, self.h

    @torch.no_grad()
    def __call__(self, sl: slice) -> Tensor:
        head, h = self.parts()
        return head(h[self.rows[sl], self.cols[sl]])

    def into(self, out: Tensor, sl: slice) -> Tensor:
        """The same logits written into a reused block (`Head.into`)."""
        head, h = self.parts()
        return head.into(out, h[self.rows[sl], self.cols[sl]])


# ---- the selective student head with chunked gradients --------------------------------------


ChunkGrad = Callable[[Tensor, slice, bool], tuple[Tensor, Tensor | None]]  # (h_c, sl, grad?) -> loss_c, dz_c


# rows of the [V,d] weight gradient per block of `AddProduct`: the product block (and, on CPU, its float32
# staging copy) stays in cache on CPU; a GPU wants few, large matmuls
_PRODUCT_ELEMENTS = 1 << 20
_PRODUCT_ELEMENTS_GPU = 1 << 26


def _add_casts_in_kernel(device: torch.device) -> bool:
    """Whether g.add_(x) with x in another dtype casts inside the kernel. CUDA's TensorIterator does; the
    CPU's first casts x to a temporary of its full size."""
    return device.type == "cuda"


class AddProduct:
    """g[:V] += dz^T h with dz, h in a lower dtype than g (bf16 logits over fp32 master weights), the product
    rounded to dz's dtype as autograd's would be and added in g's: in blocks of rows into one reused product
    block (and on CPU a staging block in g's dtype: copy_ casts without allocating, a mixed add_ does not), so
    no [V,d] tensor is allocated per chunk. Built once per call."""

    def __init__(self, g: Tensor, vocab: int, dtype: torch.dtype) -> None:
        d = g.shape[1]
        budget = _PRODUCT_ELEMENTS if g.device.type == "cpu" else _PRODUCT_ELEMENTS_GPU
        self.g, self.vocab, self.rows = g, vocab, max(1, min(vocab, budget // max(d, 1)))
        self.product = torch.empty(self.rows, d, dtype=dtype, device=g.device)  #                [R,d]
        self.stage = None if _add_casts_in_kernel(g.device) else torch.empty_like(self.product, dtype=g.dtype)

    def __call__(self, dz: Tensor, h: Tensor) -> None:
        """dz [C,V], h [C,d], both in the product's dtype."""
        for a in range(0, self.vocab, self.rows):
            n = min(self.rows, self.vocab - a)
            x = torch.mm(dz[:, a : a + n].t(), h, out=self.product[:n])  #                     [n,d]
            if self.stage is not None:
                x = self.stage[:n].copy_(x)
            self.g[a : a + n].add_(x)


class SelectedHeadLoss(torch.autograd.Function):
    """sum over chunks of loss_c(z_c), z_c = h_c W[:V]^T + b[:V]; d/dh, d/dW computed per chunk in forward.

    `chunk_grad` gives each chunk's loss and the logits' gradient dz_c [C,V] (closed form where the criterion
    declares one, `ClosedFormChunks`; else autograd, `AutogradChunks`); then d/dh_c = dz_c W, and
    d/dW += dz_c^T h_c is accumulated in place into one [V,d] buffer, never a fresh [V,d] gradient per chunk
    to add afterwards. `W_c`: W[:V] already in the compute dtype (autocast's, `Head.for_compute`), else it is
    cast here once: under autocast dz is bf16 over fp32 master weights, and the weight gradient is the bf16
    product added into float32 (`AddProduct`), with no [V,d] allocation per chunk."""

    @staticmethod
    def forward(
        ctx: Any,
        h: Tensor,
        W: Tensor,
        b: Tensor | None,
        vocab: int,
        chunk_grad: ChunkGrad,
        parts: list[slice],
        W_c: Tensor | None = None,
    ) -> Tensor:
        need_h, need_W, need_b = ctx.needs_input_grad[:3]
        need = need_h or need_W or need_b
        Wv = W.detach()[:vocab]  #                                                   [V,d]
        g_h = torch.zeros_like(h) if need_h else None  #                            [N,d]
        g_W = torch.zeros_like(W) if need_W else None  #                            [V_head,d]
        g_b = torch.zeros_like(b) if need_b and b is not None else None
        total = torch.zeros(
            (), dtype=torch.float64 if h.dtype == W.dtype == torch.float64 else torch.float32, device=h.device
        )  # sum_n c_n l(t_n)
        W_as = {Wv.dtype: Wv, **({W_c.dtype: W_c} if W_c is not None else {})}  # W[:V] per dtype, cast once
        add_product: AddProduct | None = None
        for sl in parts:
            h_c = h[sl].detach()  #                                                  [C,d]
            loss_c, dz = chunk_grad(h_c, sl, need)  #                               [], [C,V] (None: no grad)
            total += loss_c
            if dz is None:
                continue
            if g_h is not None:
                if dz.dtype not in W_as:
                    W_as[dz.dtype] = Wv.to(dz.dtype)
                g_h[sl] = dz @ W_as[dz.dtype]
            if g_W is not None:
                if dz.dtype == h_c.dtype == g_W.dtype:
                    g_W[:vocab].addmm_(dz.t(), h_c)
                elif dz.dtype == g_W.dtype:
                    g_W[:vocab].addmm_(dz.t(), h_c.to(dz.dtype))
                else:  # bf16 logits over fp32 master weights: the product in bf16, added in fp32
                    if add_product is None:
                        add_product = AddProduct(g_W, vocab, dz.dtype)
                    add_product(dz, h_c.to(dz.dtype))
            if g_b is not None:
                g_b[:vocab] += dz.sum(0).to(g_b.dtype)
        ctx.grads = (g_h, g_W, g_b)
        return total

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        grads = ctx.grads
        del ctx.grads
        return (*(x.mul_(g) if x is not None else None for x in grads), None, None, None, None)


ChunkLoss = Callable[[Tensor, slice], Tensor]  # (s_c [C,V], sl) -> one chunk's loss or D  [] or [C]


@dataclass
class AutogradChunks:
    """Each chunk's loss on fresh logits, and dz from autograd (any criterion)."""

    head: Head
    loss_chunk: ChunkLoss

    def __call__(self, h_c: Tensor, sl: slice, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        z_c = self.head(h_c)  #                                                      [C,V]
        if not need_grad:
            return self.loss_chunk(z_c, sl).detach(), None
        z_c.requires_grad_()
        with torch.enable_grad():
            loss_c = self.loss_chunk(z_c, sl)  # sum_n c_n l(t_n)                   []
            (dz,) = torch.autograd.grad(loss_c, z_c)
        return loss_c.detach(), dz


@dataclass
class ClosedFormChunks:
    """Each chunk's loss sum_n c_n T^2 D_n and dz = c_n T^2 dD_n/dz from the criterion's closed form, in three
    blocks reused for every chunk (SCRATCH; under autocast two more in the compute dtype: the logits' product,
    dz): no autograd, no [C,V] allocation per chunk."""

    head: Head
    with_grad: Callable[..., tuple[Tensor, Tensor]]  # the criterion's closed form
    teacher_at: TeacherAt
    c: Tensor  # c_n  [N]
    temperature: float

    def __call__(self, h_c: Tensor, sl: slice, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        z_s, z_t, work = SCRATCH.blocks(3, h_c.shape[0], self.head.vocab, self.c.dtype, h_c.device)  # [C,V] x 3
        D, dz = self.with_grad(self.head.into(z_s, h_c), self.teacher_at.into(z_t, sl), self.temperature, work)
        w = self.c[sl] * self.temperature**2  #                                      [C]
        loss_c = (w * D).sum()
        if not need_grad:
            return loss_c, None
        dz = dz.mul_(w.unsqueeze(-1))
        dtype = compute_dtype(self.head.weight, h_c.device)
        if dz.dtype != dtype:  # the matmuls in the compute dtype, as autograd's dz would be; in a reused block
            dz = SCRATCH.blocks(2, h_c.shape[0], self.head.vocab, dtype, h_c.device)[1].copy_(dz)
        return loss_c, dz


@dataclass
class WeightedLoss:
    """One chunk's sum_n c_n l(t_n), l = lam T^2 D_C(p, q) + (1 - lam) CE, from its student logits.  [C,V] -> []"""

    D: ChunkLoss | None  # D_C on a chunk (`chunk_divergence`); None where lam = 0
    y: Tensor  # x_{t+1} at the selected positions                                [N]
    c: Tensor  # c_n                                                              [N]
    lam: float
    temperature: float

    def __call__(self, s_c: Tensor, sl: slice) -> Tensor:
        ell = torch.zeros(s_c.shape[0], dtype=self.c.dtype, device=s_c.device)  #  [C]
        if self.D is not None:
            ell = ell + self.lam * self.temperature**2 * self.D(s_c, sl)
        if self.lam < 1:
            ell = ell + (1 - self.lam) * token_ce(s_c, self.y[sl])
        return (self.c[sl] * ell).sum()


@dataclass
class CachedDivergence:
    """D_C on a chunk against the offline cache's targets (C_t and p~, indexed by valid-position order)."""

    D: Callable[..., Tensor]  # the criterion's sparse form
    cached: SparseTarget
    order: Tensor  # each selected position's index in valid order                [N]
    temperature: float

    def __call__(self, s: Tensor, sl: slice) -> Tensor:
        return self.D(s, self.cached.take(self.order[sl]).to(s.device), self.temperature)


@dataclass
class DrawnDivergence:
    """D_C on a chunk against the class selector's targets, drawn from the teacher's logits at the chunk with
    the positions' keys (the same numbers whatever the chunking)."""

    sel: Selector
    D: Callable[..., Tensor]  # the criterion's sparse form
    teacher_at: TeacherAt
    temperature: float
    generator: torch.Generator | None
    keys: PositionKeys | None

    def __call__(self, s: Tensor, sl: slice) -> Tensor:
        keys = self.keys.take(sl) if self.keys is not None else None
        target = draw_classes(
            self.sel, self.teacher_at(sl), s, temperature=self.temperature, generator=self.generator, keys=keys
        )
        return self.D(s, target, self.temperature)


@dataclass
class FullDivergence:
    """D on a chunk over the full vocabulary, against the teacher's logits there (a batch-level criterion
    already prepared)."""

    D: ChunkD
    teacher_at: TeacherAt

    def __call__(self, s: Tensor, sl: slice) -> Tensor:
        return self.D(s, self.teacher_at(sl), sl)


# ---- the step ------------------------------------------------------------------------------


def chunked_kd_loss(
    h_s: Tensor,
    head_s: LinearLike,
    h_t: Tensor | None,
    head_t: LinearLike | None,
    labels: Tensor,
    inputs: LossInputs,
    *,
    vocab: int,
    chunk_size: int = 1024,
) -> StepOut:
    """`selective_kd_loss` on z = head(h)[..., :vocab], never holding [B,T,V]: O(chunk_size x V) logits at once.

    h_s [B,T,d] student final hidden states (with grad), head_s its output Linear (weight [V_s,d], maybe
    tied); h_t [B,T,d_t] / head_t the teacher's (no grad), or None (the teacher cache in `inputs.cached`).
    """
    sel, valid = inputs.selector, labels != IGNORE  # valid(t)                     [B,T]
    student = Head.of(head_s, vocab)
    student_c = student.for_compute(h_s.device)  # the heads in the compute dtype, cast once per step, not per chunk
    teacher = Head.of(head_t, vocab).for_compute(h_s.device) if head_t is not None and h_t is not None else None
    keys = inputs.row_keys(labels.shape[0])  # per-row keys when something draws
    u = chunked_importance(
        sel,
        h_s.detach(),
        student_c,
        h_t,
        teacher,
        labels,
        valid,
        generator=inputs.generator,
        temperature=inputs.temperature,
        chunk_size=chunk_size,
        keys=keys,
    )  # u(t)  [B,T]
    draws = draw_positions(inputs, u, valid, keys)  # m_t, w_t as draws            [B,K]
    mw = draws.dense(labels.shape[1])  # m_t * w_t                                   [B,T]
    rows, cols = (mw != 0).nonzero(as_tuple=True)  # positions that carry weight  [N]
    n_sel = draws.count().to(labels.device)  # sum_t m_t                          [B]
    acc = accumulation_dtype(h_s, student)
    norm, weight = normalizers(n_sel, inputs.normalization, acc)  # n_sel_i or 1  [B]; sum_i s_i or n_sel
    c = mw[rows, cols].to(acc) / norm[rows]  # c_n: m_t w_t / n_sel_i, or m_t w_t               [N]
    at = Positions(labels, rows, cols, u, keys)
    chunk_grad, parts = chunk_gradients(inputs, student_c, TeacherAt(teacher, h_t, rows, cols), at, c, chunk_size)
    W_c = student_c.weight if student_c is not student else None
    loss_sum = SelectedHeadLoss.apply(h_s[rows, cols], student.weight, student.bias, vocab, chunk_grad, parts, W_c)
    SCRATCH.release(h_s.device)
    metrics = position_metrics(valid, n_sel) | head_positions(inputs, valid, rows.numel())
    return StepOut(loss_sum, weight, draws, u, metrics)


@dataclass
class Positions:
    """The selected positions (rows, cols) of a batch and what the loss reads there."""

    labels: Tensor  # [B,T]
    rows: Tensor  # [N]
    cols: Tensor  # [N]
    u: Tensor | None  # u(t) [B,T], None without a signal
    keys: RowKeys | None  # the rows' keys when something draws
    y: Tensor = field(init=False)  # x_{t+1} at each selected position             [N]

    def __post_init__(self) -> None:
        self.y = self.labels[self.rows, self.cols]


def chunk_gradients(
    inputs: LossInputs, student: Head, teacher_at: TeacherAt, at: Positions, c: Tensor, chunk_size: int
) -> tuple[ChunkGrad, list[slice]]:
    """How each chunk of the selected positions gets its loss and logits' gradient, and the chunks: from the
    criterion's closed form where it applies (`closed_form_applies`), else by autograd on sum_n c_n l(t_n)
    (`WeightedLoss`), in one chunk where the criterion must see every position at once."""
    sel, n = inputs.selector, at.rows.numel()
    parts = chunks(n, chunk_size)
    with_grad = sel.criterion.closed_form  # None where it declares none (closed_form_applies checks it too)
    if with_grad is not None and closed_form_applies(
        sel, lam=inputs.lam, cached=inputs.cached, teacher=teacher_at.head
    ):
        return ClosedFormChunks(student, with_grad, teacher_at, c, inputs.temperature), parts
    D: ChunkLoss | None = None
    if inputs.lam > 0:
        D, one_chunk = chunk_divergence(inputs, teacher_at, at, parts)
        parts = [slice(0, n)] if one_chunk else parts
    return AutogradChunks(student, WeightedLoss(D, at.y, c, inputs.lam, inputs.temperature)), parts


def closed_form_applies(sel: Selector, *, lam: float, cached: SparseTarget | None, teacher: Head | None) -> bool:
    """Whether each chunk's dz comes from the criterion's closed form (no autograd): pure KD (lam = 1) over the
    full vocabulary against the teacher's own logits, with a pointwise criterion that declares one and takes
    no options."""
    crit = sel.criterion
    return (
        lam == 1
        and cached is None
        and sel.classes is None
        and teacher is not None
        and crit.coupling == "pointwise"
        and crit.closed_form is not None
        and not crit.options
    )


def chunk_divergence(
    inputs: LossInputs, teacher_at: TeacherAt, at: Positions, parts: list[slice]
) -> tuple[ChunkLoss, bool]:
    """D_C(p_t, q_t) on one chunk of selected positions, as `objective.divergence`: (s_c [C,V], sl) -> [C];
    and whether it must run as one chunk (a criterion that declares it sees all positions at once)."""
    sel, temperature = inputs.selector, inputs.temperature
    crit = sel.criterion
    if inputs.cached is not None:  # C_t and p~ from the offline cache, indexed by valid-position order
        order = valid_order(at.labels)[at.rows, at.cols]  #                          [N]
        D = sparse_divergence(crit, "the teacher cache", inputs.cached.form)
        return CachedDivergence(D, inputs.cached, order, temperature), False
    if sel.classes is not None:  # C_t subset of V, drawn from the teacher's logits at the chunk
        D = sparse_divergence(crit, f"classes {sel.classes.name!r}", sel.classes.form_of())
        keys = PositionKeys(at.keys, at.rows, at.cols, at.labels.shape[1]) if at.keys is not None else None
        return DrawnDivergence(sel, D, teacher_at, temperature, inputs.generator, keys), False
    u_sel = at.u[at.rows, at.cols] if at.u is not None else None
    d = crit.over(Selected(at.y, at.rows, u_sel, teacher_at, tuple(parts), temperature))  # batch-level: prepared
    return FullDivergence(d, teacher_at), crit.coupling == "all"


def head_positions(inputs: LossInputs, valid: Tensor, n: int) -> dict[str, float]:
    """How many positions each LM head ran at (the selective head's saving, vs B*T for the dense flow)."""
    sel, n_valid = inputs.selector, int(valid.sum())
    scored = sel.signal is not None and not sel.signal.random
    teacher = n_valid if sel.needs_teacher_everywhere else 0
    if inputs.lam > 0 and inputs.cached is None:
        first_pass = sel.classes is None and "teacher" in sel.criterion.needs  # a prepare step's teacher pass
        teacher += n * (2 if first_pass else 1)
    return {"head_positions_student": float(n + (n_valid if scored else 0)), "head_positions_teacher": float(teacher)}
