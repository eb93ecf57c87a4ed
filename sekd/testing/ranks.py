"""2 ranks equal 1 process: two spawned gloo processes (CPU), each importing the pieces' modules by name (so
a piece from a user's module is registered there too), run the chunked flow on their half of the batch's
rows, keyed by global sample index, with `gather` across ranks, for two steps (a stateful policy's second
step reads its queue). Their loss sums, weights and head gradients add up to one process's on the whole
batch and every row draws what it draws there. A criterion coupled over the batch (coupling="batch", e.g.
AT-KD's split) is defined per micro-batch: each rank equals one process on that rank's rows.
All pieces of one check share one spawn.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from sekd.kd.flows import chunked_kd_loss
from sekd.kd.objective import LossInputs
from sekd.selection.criteria import CRITERIA
from sekd.testing.combos import DEFAULTS, LAM, STEP, TEMPERATURE, Combo, build_policy, selector
from sekd.testing.flows import V, batch, heads

IDX = [40, 3, 17]  # the batch's rows' global sample indices
HALVES = [slice(0, 2), slice(2, 3)]  # rank 0 holds rows 0-1, rank 1 row 2
Job = tuple[str, str, Mapping[str, Any] | None]  # (kind, name, options)


def job_combo(kind: str, name: str, options: Mapping[str, Any] | None) -> Combo:
    axis = {"signal": "signal", "policy": "policy", "criterion": "criterion", "class_sampler": "classes"}[kind]
    return Combo(**{**DEFAULTS, axis: name}, options={axis: dict(options)} if options is not None else {})


def run_rows(c: Combo, part: slice, gather: Callable | None) -> list[dict[str, Any]]:
    """Two steps of the chunked flow on rows `part` of the batch: loss_sum, weight, dW, per-row draws."""
    head_s, head_t = heads(3)
    h_s, h_t, y = (x[part] for x in batch(3))
    sel = selector(c)
    sel.policy = build_policy(c.policy, c.opts("policy"), warm=False)  # its state comes from these steps only
    out = []
    for step in (STEP, STEP + 1):
        head_s.zero_grad()
        kw: dict[str, Any] = dict(lam=LAM, temperature=TEMPERATURE, step=step, rows=IDX[part], gather=gather)
        inputs = LossInputs(sel, generator=torch.Generator().manual_seed(5), **kw)
        res = chunked_kd_loss(h_s.clone().requires_grad_(), head_s, h_t, head_t, y, inputs, vocab=V, chunk_size=3)
        res.loss_sum.backward()
        assert head_s.weight.grad is not None
        d = res.draws
        draws = [(d.index[i][d.mask[i]].tolist(), d.weight[i][d.mask[i]].tolist()) for i in range(d.index.shape[0])]
        out.append(
            {"loss": res.loss_sum.detach(), "weight": res.weight, "grad": head_s.weight.grad.clone(), "draws": draws}
        )
    return out


def rank_main(rank: int, root: str, modules: Sequence[str], jobs: Sequence[Job]) -> None:
    """One spawned rank: import the pieces' modules, run every job on this rank's rows, save the results."""
    from sekd.distributed.process_group import Dist

    torch.set_num_threads(1)
    for module in modules:
        importlib.import_module(module)
    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=2)
    try:
        dist = Dist(rank=rank, world_size=2)
        results = [run_rows(job_combo(*job), HALVES[rank], dist.all_gather_cat) for job in jobs]
        torch.save(results, Path(root) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def spawn(modules: Sequence[str], jobs: Sequence[Job]) -> list[list[list[dict[str, Any]]]]:
    """Both ranks' results: [rank][job][step]."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="sekd-ranks-") as root:
        old = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            mp.spawn(rank_main, args=(root, list(modules), list(jobs)), nprocs=2, join=True)
        except Exception as err:  # a rank raised: its traceback's last line says what
            last = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
            raise AssertionError(f"2 ranks: a rank failed running {[j[:2] for j in jobs]}: {last}") from None
        finally:
            os.environ.pop("OMP_NUM_THREADS") if old is None else os.environ.__setitem__("OMP_NUM_THREADS", old)
        return [torch.load(Path(root) / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def compare(job: Job, ranks: Sequence[list[dict[str, Any]]]) -> None:
    """The ranks' results for one job against one process (the whole batch, or each rank's rows)."""
    kind, name, options = job
    c = job_combo(kind, name, options)
    what = f"2 ranks ({c.label()})"
    if CRITERIA.get(c.criterion).coupling == "batch":  # defined per micro-batch: rank r = its rows alone
        for r, part in enumerate(HALVES):
            _same([ranks[r]], run_rows(c, part, None), f"{what}, rank {r} against its rows in one process")
        return
    _same(ranks, run_rows(c, slice(None), None), what)


def _same(ranks: Sequence[list[dict[str, Any]]], one: list[dict[str, Any]], what: str) -> None:
    for step, want in enumerate(one):
        got = [r[step] for r in ranks]
        at = f"{what}, step {step + 1}"
        weight = sum(g["weight"] for g in got)
        assert weight == want["weight"], f"{at}: the ranks' weights add to {weight}, one process has {want['weight']}"
        draws = [row for g in got for row in g["draws"]]
        assert draws == want["draws"], f"{at}: the ranks draw {draws}, one process {want['draws']}"
        for key, rtol in (("loss", 1e-10), ("grad", 1e-9)):
            try:
                torch.testing.assert_close(sum(g[key] for g in got), want[key], rtol=rtol, atol=1e-12)
            except AssertionError as err:
                raise AssertionError(
                    f"{at}: the ranks' {key} sum != one process's: {str(err).splitlines()[0]}"
                ) from None


def check_ranks(jobs: Sequence[Job], modules: Sequence[str]) -> None:
    """Every job under 2 gloo ranks (one spawn for all of them) equals one process."""
    results = spawn(modules, jobs)
    for i, job in enumerate(jobs):
        compare(job, [results[0][i], results[1][i]])
