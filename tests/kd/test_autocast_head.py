"""The selective LM head under bf16 autocast (sekd/kd/flows.py `SelectedHeadLoss`, `Head`; docs/method.md §9).

Under autocast the heads compute in bfloat16 over float32 master weights. The weight is cast to bfloat16
once per step (not once per chunk), and the weight gradient is accumulated into float32 in place: no
[V,d]-sized tensor is allocated per chunk, in the forward logits, the scoring pass, dz W or dz^T h.

Allocations are counted with the profiler's memory events (`profile_memory=True`), not a TorchDispatchMode:
a dispatch mode sees the tensors an op returns, but not what a kernel allocates inside it (on CPU a
mixed-dtype in-place add, float32 += bfloat16, casts the bfloat16 operand to a float32 temporary of its
full size inside `add_`); the profiler sees every allocation of the CPU allocator.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from sekd.kd.flows import Head, chunked_kd_loss
from sekd.kd.objective import IGNORE, LossInputs, Selector
from sekd.selection.criteria import CRITERIA
from sekd.selection.policies import POLICIES
from sekd.selection.signals import SIGNALS

B, T, D, D_T, V, PAD = 2, 40, 64, 48, 257, 3  # C <= 16 positions a chunk: [C,V] blocks stay below [V,d]
BIG = V * D * 2  # bytes of a bfloat16 [V,d] tensor: the smallest [V,d]-sized allocation


def setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    head_s = torch.nn.Linear(D, V + PAD, bias=True)
    head_t = torch.nn.Linear(D_T, V + PAD, bias=True).requires_grad_(False)
    with torch.no_grad():
        for p in [*head_s.parameters(), *head_t.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    h_s = torch.randn(B, T, D, generator=g)
    h_t = torch.randn(B, T, D_T, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, -1] = IGNORE
    return head_s, head_t, h_s, h_t, y


CASES = {  # (selector, lam): the closed-form path (forward KL, lam = 1) and autograd paths
    "closed_form": (
        lambda: Selector(SIGNALS.get("student_entropy"), POLICIES.build("top_k", k=0.8), CRITERIA.build("forward_kl")),
        1.0,
    ),
    "autograd_lam": (
        lambda: Selector(SIGNALS.get("student_entropy"), POLICIES.build("top_k", k=0.8), CRITERIA.build("forward_kl")),
        0.6,
    ),
    "autograd_dkd": (lambda: Selector(None, POLICIES.build("all"), CRITERIA.build("dkd")), 1.0),
}


def step(case: str, chunk_size: int, autocast: bool):
    """One chunked step, forward and backward; -> (loss, grad h, grad W, grad b)."""
    head_s, head_t, h_s, h_t, y = setup()
    sel, lam = CASES[case]
    h = h_s.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = chunked_kd_loss(
            h, head_s, h_t, head_t, y, LossInputs(sel(), lam=lam, temperature=1.0), vocab=V, chunk_size=chunk_size
        )
        (out.loss_sum / out.weight).backward()
    return out.loss_sum.detach(), h.grad, head_s.weight.grad, head_s.bias.grad


def big_allocations(fn) -> int:
    """How many allocations of at least a bfloat16 [V,d]'s bytes `fn` makes (every CPU allocation counted)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(1 for e in prof.events() if e.self_cpu_memory_usage >= BIG)


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_weight_sized_allocation_per_chunk_under_autocast(case):
    """[V,d]-sized allocations per step under bf16 autocast do not grow with the number of chunks: the ~60
    selected positions in chunks of 8, 4 or 2 (8 to 40 chunks) allocate the same (the heads built in `setup`,
    the float32 gradient buffer, the weight cast once, the once-per-step staging blocks). Chunks stay at
    most 8 positions so that the [C,V] blocks of the autograd path are below a [V,d]'s size."""
    counts = {c: big_allocations(lambda: step(case, c, autocast=True)) for c in (8, 4, 2)}
    assert len(set(counts.values())) == 1, counts
    assert counts[2] <= 10, counts  # a handful per step, not per chunk


@pytest.mark.parametrize("case", sorted(CASES))
def test_autocast_gradients_match_float32(case):
    """bf16 autocast against the float32 computation, both chunked.

    bfloat16 keeps 8 significand bits: each rounding is a relative error <= 2^-9 ~ 2e-3. The logits z = h W^T
    see three (h, W, the product), each |dz| = |c (q - p)| then carries the error of the logits, and the
    gradients dz W and dz^T h three more (dz, W or h, the product): about 6-8 roundings, some correlated,
    i.e. ~1.5e-2 relative per element in the worst case and ~5e-3 in norm for random errors. We bound the
    relative Frobenius error of each gradient by 3e-2 (measured here: 5.8e-3 to 8.6e-3 over h, W, b and the
    three cases), and the loss by 5e-3 (a sum of many positions' divergences, whose roundings average out;
    measured 3e-5 to 2e-4). A per-chunk bug (a chunk's dz or product lost, doubled or mis-cast) is an O(1)
    error and fails this by far."""
    ref = step(case, 8, autocast=False)
    got = step(case, 8, autocast=True)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32  # master weights' grads stay fp32
    torch.testing.assert_close(got[0], ref[0], rtol=5e-3, atol=0)
    for name, g, r in zip(("h", "W", "b"), got[1:], ref[1:]):
        rel = float((g.float() - r).norm() / r.norm())
        assert rel < 3e-2, (name, rel)
        assert g.shape == r.shape and torch.isfinite(g).all()


def test_autocast_chunking_does_not_change_the_step():
    """Under autocast the chunks only split the same computation: 2 or 1000 positions a chunk give the same
    loss within float32 summation order. The gradients move by bf16 rounding only: the weight gradient is
    each chunk's bf16 product summed in float32 (2^-9 relative per product, as autograd's per-micro-batch
    products would be), and a bf16 matmul of 2 rows may round a logit one ulp apart from one of 78 rows
    (another kernel, another summation order), which moves that position's dz. Measured: 0 on h (the
    closed form's h gradient here), 2.2e-3 on W and b; bounded in norm by 1e-2."""
    a, b = step("closed_form", 2, autocast=True), step("closed_form", 1000, autocast=True)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=0)
    for name, g, r in zip(("h", "W", "b"), a[1:], b[1:]):
        rel = float((g - r).norm() / r.norm())
        assert rel < 1e-2, (name, rel)


def test_head_into_matches_autocast_linear():
    """`Head.into` under autocast computes F.linear's bf16 logits (the same numbers), with a head whose weight
    was cast beforehand (`Head.cast`) or not."""
    head_s, _, h_s, _, _ = setup()
    head = Head.of(head_s, V)
    h = h_s[0, :5]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(h, head_s.weight[:V], head_s.bias[:V]).float()
        for hd in (head, head.cast(torch.bfloat16)):
            out = torch.empty(5, V)
            assert torch.equal(hd.into(out, h), ref)
    out = torch.empty(5, V)  # no autocast: float32, in place
    torch.testing.assert_close(head.into(out, h), torch.nn.functional.linear(h, head_s.weight[:V], head_s.bias[:V]))


def test_weight_gradient_without_staging_matches():
    """The path for devices that cast inside the add kernel (CUDA: g_W += the bf16 product, no float32
    staging block) gives the same numbers as the CPU path with staging."""
    import sekd.kd.flows as flows

    ref = step("closed_form", 4, autocast=True)
    orig = flows._add_casts_in_kernel
    flows._add_casts_in_kernel = lambda device: True
    try:
        got = step("closed_form", 4, autocast=True)
    finally:
        flows._add_casts_in_kernel = orig
    for g, r in zip(got[1:], ref[1:]):
        assert torch.equal(g, r)
