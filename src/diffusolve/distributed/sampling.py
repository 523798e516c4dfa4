"""Sharded sampling: ``n`` samples of a model as resumable shards, split over the ranks.

Sample ``i`` starts from the prior noise of seed ``seed + i`` and every stochastic step
draws from that seed too (the per-sample seeds of :func:`diffusolve.sample` and
``process.prior_sample``), and its condition is ``cond_of(i)``. Shards are produced in
batches fixed by the configuration, so the samples are bitwise the same whichever rank
writes a shard and however many ranks there are (on the same hardware and thread count:
a network's float rounding may depend on them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .context import DistContext
from .shards import ShardReport, run_sharded

__all__ = ["sample_shards", "seeded_producer"]


def seeded_producer(
    model: Any,
    shape: tuple[int, ...],
    grid: Tensor,
    solver: Any,
    *,
    seed: int = 0,
    cond_of: Callable[[Tensor], Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Callable[[int, int], dict[str, Tensor]]:
    """``produce(start, stop)`` for :func:`~diffusolve.distributed.run_sharded`: samples
    ``start .. stop-1`` of ``model`` on ``grid`` with ``solver``, sample ``i`` from seed
    ``seed + i`` and condition ``cond_of(indices)`` (``None``: unconditional). Returns
    ``{"samples": [k, *shape] on the CPU}`` (and ``"labels"`` when the condition is an int
    tensor).
    """
    from ..solvers import sample

    def produce(start: int, stop: int) -> dict[str, Tensor]:
        seeds = list(range(seed + start, seed + stop))
        idx = torch.arange(start, stop)
        cond = None if cond_of is None else cond_of(idx)
        x = model.process.prior_sample(
            (stop - start, *shape), noise=seeds, dtype=dtype, device=device
        )
        with torch.no_grad():
            y = sample(model, x, grid, solver, cond=cond, noise=seeds, progress=False)
        out = {"samples": y.detach().to("cpu")}
        if isinstance(cond, Tensor) and not cond.is_floating_point():
            out["labels"] = cond.detach().to("cpu", torch.int64)
        return out

    return produce


def sample_shards(
    model: Any,
    out: str | Path,
    *,
    n: int,
    shape: tuple[int, ...],
    steps: int | Tensor = 20,
    solver: Any = "dpmpp_2m",
    seed: int = 0,
    shard_size: int = 1000,
    batch_size: int | None = None,
    cond_of: Callable[[Tensor], Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    grid_kind: str | None = None,
    config: dict[str, Any] | None = None,
    force: bool = False,
    ctx: DistContext | None = None,
    max_new_shards: int | None = None,
    on_shard: Callable[[int, str], None] | None = None,
) -> ShardReport:
    """Write ``n`` samples of ``model`` under ``out`` as shards with a manifest, resuming a
    run of the same configuration, this rank doing its share (round-robin over shards).

    ``config`` describes the model and anything else the caller wants checked on resume (a
    model name, guidance, ...); the solver with its options, the grid, the seed, the dtype
    and the sizes are added here. See :func:`~diffusolve.distributed.run_sharded` for the
    folder, the checks and the report.

    Example:
        >>> import tempfile, torch
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import vp_linear
        >>> model = Gaussian(torch.zeros(2), torch.ones(2), process=vp_linear())
        >>> with tempfile.TemporaryDirectory() as d:
        ...     r = sample_shards(model, d, n=6, shape=(2,), steps=5, solver="ddim", shard_size=4)
        >>> r.written, r.checksum is not None
        ([0, 1], True)
    """
    from ..process import make_grid
    from ..solvers import get_solver

    solver = get_solver(solver) if isinstance(solver, str) else solver
    kind = grid_kind or solver.natural_grid
    grid = make_grid(model.process, steps, kind) if isinstance(steps, int) else steps
    produce = seeded_producer(
        model, shape, grid, solver, seed=seed, cond_of=cond_of, dtype=dtype, device=device
    )
    full = {
        **(config or {}),
        "solver": solver.name,
        "solver_options": solver.options(),
        "grid": [float(t) for t in grid],
        "grid_kind": kind if isinstance(steps, int) else "given",
        "seeds": f"sample i: seed {seed} + i (noise and stochastic steps)",
        "seed": seed,
        "dtype": str(dtype).replace("torch.", ""),
        "shape": list(shape),
    }
    return run_sharded(
        out,
        produce,
        n=n,
        shard_size=shard_size,
        batch_size=batch_size,
        config=full,
        force=force,
        ctx=ctx,
        max_new_shards=max_new_shards,
        on_shard=on_shard,
    )
