"""Random draws that are the same on every device.

Every random number of a run comes from a CPU `torch.Generator` (seeded by the run, or per cache
sample): uniforms are drawn on the CPU, where they do not depend on the device, and moved to the
tensor's device; a categorical draw is then an inverse CDF computed there. So a CUDA run draws what
a CPU run draws for the same seed (up to logits that differ in rounding), and no CPU generator ever
meets a CUDA tensor inside torch (which refuses the pair).
"""
from __future__ import annotations

import torch
from torch import Tensor

# float64 CDF rows are built this many elements at a time (a [P,V] teacher distribution in float64
# would double its memory); draws do not depend on the chunking
_CDF_ELEMENTS = 1 << 24


def check_cpu_generator(generator: torch.Generator | None, who: str) -> None:
    """Refuse a generator that is not a CPU one: the draws would depend on the device."""
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"{who}: the generator is on {generator.device}; random draws take a CPU generator "
                         "(the uniforms are drawn there and moved to the tensor's device)")


def uniform(shape, generator: torch.Generator | None, device, dtype: torch.dtype = torch.float32,
            who: str = "uniform") -> Tensor:
    """U[0,1) of `shape` from the CPU `generator` (the global CPU one when None), on `device`."""
    check_cpu_generator(generator, who)
    return torch.rand(shape, generator=generator, dtype=dtype, device="cpu").to(device)


def categorical(probs: Tensor, n: int, generator: torch.Generator | None, who: str = "categorical") -> Tensor:
    """n i.i.d. draws with replacement per row of `probs` (>= 0, any positive row sum), by inverse CDF:
    draw v where cdf(v-1) <= u * sum < cdf(v), u ~ U[0,1) from the CPU generator. A class of
    probability 0 is never drawn. A row summing to 0 draws uniformly.  [P,V] -> [P,n] long, on probs' device."""
    P, V = probs.shape
    u = uniform((P, n), generator, probs.device, torch.float64, who)  # [P,n]
    out = torch.empty(P, n, dtype=torch.long, device=probs.device)
    rows = max(1, _CDF_ELEMENTS // max(V, 1))
    for a in range(0, P, rows):
        p = probs[a : a + rows].double()
        p = torch.where(p.sum(-1, keepdim=True) > 0, p, torch.ones_like(p))  # empty rows: uniform
        cdf = p.cumsum(-1)  # [r,V]
        idx = torch.searchsorted(cdf, u[a : a + rows] * cdf[:, -1:], right=True)  # [r,n]
        # u * sum can round up to the sum: that draw belongs to the last class of positive probability
        last = V - 1 - (p > 0).flip(-1).long().argmax(-1, keepdim=True)  # [r,1]
        out[a : a + rows] = torch.minimum(idx, last)
    return out
