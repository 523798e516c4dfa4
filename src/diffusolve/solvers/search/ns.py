"""Non-stationary linear solvers: every point a fitted combination of all outputs so far.

Every deterministic single-evaluation-per-step solver we ship (DDIM, DPM-Solver(++),
UniPC, DEIS, the USF decision plans, with ``final="denoise"`` or ``"zero"``) is, on a fixed
grid, *linear* in the start and the model outputs: the ``k``-th evaluation point is
``x_k = c[k][0] x_T + sum_{j<k} c[k][j+1] D_j`` with ``D_j = D(x_j, t_j)``, and the result
is such a combination of ``x_T, D_0, ..., D_{n-1}`` (``n`` = the NFE). The coefficients
depend on the grid alone. The non-stationary solver ``ns`` (the family of
Shaul et al., *Bespoke Non-Stationary Solvers for Fast Sampling of Diffusion and Flow
Models*, ICML 2024) keeps exactly this form and makes every coefficient free:
``coefficients[k]`` (``k = 0 .. n-1``) holds the ``k + 2`` numbers of the point at
``grid[k + 1]`` (``k < n - 1``) or, for the last row, of the result, which the loop's
``final="denoise"`` returns after its evaluation at ``grid[-1]``.

* :func:`linearize` turns a schedule into the ``ns`` schedule that reproduces it (to
  rounding): a dry run on basis vectors reads the coefficients off.
* :func:`fit` starts there and fits the coefficients, and the evaluation times (in
  ``lambda``, as :class:`~diffusolve.solvers.search.GridParam`), by L-BFGS with autograd
  through the model on the proxy's loss (``proxy.loss``: the mean relative L2 error to the
  references of the calibration sets, or for an :class:`~diffusolve.solvers.search.FDProxy`
  the Frechet distance of the outputs' features to real data): about ``n^2 / 2 + 2n`` numbers, so a few hundred calibration samples
  determine them. A validation proxy (other priors or noise) picks the iterate and stops
  the fit (``patience``); the start itself is a candidate, so the result is never worse
  than the start there.

Without ``coefficients`` the solver is DDIM (the first-order exponential integrator in data
prediction), so ``ns`` runs on any grid like every registered solver; with them it needs a
grid of ``len(coefficients) - 1`` steps and ``final="denoise"``.

A fitted solver is only as general as its calibration data: fit it for the model (the
mixture family, the network) it will sample, and measure it on other priors or noise
(``diffusolve search --fit`` reports held-out errors). It is not a convergent method: more
steps need another fit.

Example:
    >>> import torch
    >>> from diffusolve.models import Gaussian
    >>> from diffusolve.process import make_grid, vp_linear
    >>> from diffusolve.solvers.search import Schedule, linearize
    >>> prior = Gaussian(torch.zeros(2), torch.eye(2), process=vp_linear())
    >>> sch = Schedule.for_solver(prior.process, make_grid(prior.process, 4), "dpmpp_2m")
    >>> ns = linearize(sch, prior.process)
    >>> ns.solver, ns.nfe, [len(r) for r in dict(ns.options)["coefficients"]]
    ('ns', 5, [2, 3, 4, 5, 6])
    >>> xT = prior.process.prior_sample((3, 2), torch.Generator().manual_seed(0),
    ...                                 dtype=torch.float64)
    >>> bool(torch.allclose(ns.sample(prior, xT), sch.sample(prior, xT), atol=1e-12))
    True
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...process import Process
from ..base import BoundModel, Solver, StepContext, register
from ..ddim import DDIM
from ..loop import sample
from .evolve import Z_MAX, GridParam, Proxy
from .schedule import Schedule

__all__ = ["NS", "linearize", "fit", "FitResult", "combine", "FIT_LOG_FORMAT"]

_DDIM = DDIM(eta=0.0)  # what ns is without coefficients
SHAUL_2024 = (
    "Shaul, Singer, Chen, Le, Thabet, Pumarola & Lipman, Bespoke Non-Stationary Solvers for "
    "Fast Sampling of Diffusion and Flow Models, ICML 2024"
)
FIT_LOG_FORMAT = "diffusolve-ns-fit-log/1"


def combine(row: Sequence[Any], basis: Sequence[Tensor]) -> Tensor:
    """``row[0] * basis[0] + row[1] * basis[1] + ...`` (floats or 0-d tensors)."""
    out = row[0] * basis[0]
    for c, b in zip(row[1:], basis[1:], strict=True):
        out = out + c * b
    return out


def _check_rows(rows: Any) -> tuple[tuple[float, ...], ...]:
    if not isinstance(rows, tuple | list):
        raise TypeError(f"coefficients must be a tuple of rows, got {type(rows).__name__}")
    out = []
    for k, row in enumerate(rows):
        if not isinstance(row, tuple | list) or len(row) != k + 2:
            raise ValueError(
                f"coefficients row {k} must hold {k + 2} numbers (the start and the {k + 1} "
                f"outputs before it), got {row!r}"
            )
        vals = []
        for v in row:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"coefficients row {k} holds {v!r}; give finite numbers")
            vals.append(float(v))
        out.append(tuple(vals))
    if len(out) == 1:
        raise ValueError("an ns solver with coefficients needs at least two rows (NFE >= 2)")
    return tuple(out)


@register("ns", citation=SHAUL_2024)
@dataclass(frozen=True)
class NS(Solver):
    """The non-stationary linear solver (see the module docstring).

    Options:
        coefficients: one row per model evaluation (row ``k`` has ``k + 2`` numbers: the
            weights of ``x_T`` and of the outputs ``D_0 .. D_k``); the last row is the
            result. Empty: DDIM on any grid.

    Example:
        >>> NS(coefficients=((1.0, 0.0), (0.0, 0.0, 1.0))).nfe(1)
        1
    """

    coefficients: tuple[tuple[float, ...], ...] = ()

    multistep = True
    citation = SHAUL_2024
    SEARCH = {}

    def __post_init__(self) -> None:
        if self.coefficients != ():
            object.__setattr__(self, "coefficients", _check_rows(self.coefficients))

    @property
    def min_steps(self) -> int:
        return len(self.coefficients) - 1 if self.coefficients else 1

    def _check(self, ctx: StepContext) -> None:
        if ctx.n != len(self.coefficients) - 1:
            raise ValueError(
                f"this ns solver has {len(self.coefficients)} coefficient rows, for a grid of "
                f"{len(self.coefficients) - 1} steps and a final denoise; the grid has {ctx.n} "
                "steps (a Schedule carries its own grid)"
            )
        if ctx.final != "denoise":
            raise ValueError(
                f"an ns solver with coefficients returns its last row's combination through "
                f"final='denoise'; got final={ctx.final!r}"
            )

    def init(self, model: BoundModel, x: Tensor) -> tuple[Tensor, ...] | None:
        return (x,) if self.coefficients else None

    def step(
        self,
        model: BoundModel,
        x: Tensor,
        t: Tensor,
        t_next: Tensor,
        state: tuple[Tensor, ...] | None,
        ctx: StepContext,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        if not self.coefficients:
            return _DDIM.step(model, x, t, t_next, None, ctx)
        self._check(ctx)
        basis = (*state, model(x, t))  # type: ignore[misc]
        return combine(self.coefficients[ctx.i], basis), basis

    def finish(self, model: BoundModel, x: Tensor, t: Tensor, state: Any) -> Tensor:
        if not self.coefficients:
            return model(x, t)
        return combine(self.coefficients[-1], (*state, model(x, t)))


# ---------------------------------------------------------------------------- linearize
class _BasisModel:
    """A model whose ``j``-th call returns the basis vector ``e_{j+1}``; it records where it
    was called."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.calls: list[tuple[Tensor, float]] = []

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        j = len(self.calls)
        self.calls.append((x[0].clone(), float(t.flatten()[0])))
        out = torch.zeros_like(x)
        if j + 1 < x.shape[-1]:
            out[..., j + 1] = 1.0
        return out


def linearize(schedule: Schedule, process: Process) -> Schedule:
    """The ``ns`` schedule that reproduces ``schedule`` (same evaluation times and NFE).

    ``schedule`` must be deterministic, end with ``final="denoise"`` or ``"zero"``, and
    evaluate the model at strictly decreasing times (one evaluation per step: not Heun or
    singlestep DPM-Solver, which evaluate twice at a time). The coefficients are read off a
    dry run on basis vectors: the solve is linear in the start and the outputs on a fixed
    grid.
    """
    schedule.check_process(process)
    solver = schedule.solver_object()
    if solver.stochastic:
        raise ValueError(f"{solver.name} is stochastic; only deterministic solves are linear")
    if schedule.final not in ("denoise", "zero"):
        raise ValueError(
            f"linearize needs final='denoise' or 'zero' (the result after the last "
            f"evaluation), the schedule has final={schedule.final!r}"
        )
    k = schedule.nfe + 1
    stub = _BasisModel(process)
    e0 = torch.zeros(1, k, dtype=torch.float64)
    e0[0, 0] = 1.0
    out = sample(
        stub, e0, schedule.grid_tensor(), solver, final=schedule.final, dtype=torch.float64
    )
    times = [t for _, t in stub.calls]
    if len(times) != schedule.nfe or any(b >= a for a, b in zip(times, times[1:], strict=False)):
        raise ValueError(
            f"{solver.name} evaluates at times {times}; linearize needs one evaluation per "
            "grid time, at strictly decreasing times"
        )
    points = [x for x, _ in stub.calls[1:]] + [out[0]]
    rows = tuple(tuple(p[: i + 2].tolist()) for i, p in enumerate(points))
    info = {"linearized": schedule.to_dict()}
    return Schedule.for_solver(process, times, NS(coefficients=rows), "denoise", info=info)


# ---------------------------------------------------------------------------- fit
@dataclass
class FitResult:
    """The fitted schedule, the start (linearized), their proxies (and validation errors)
    and the per-iteration trace."""

    schedule: Schedule
    start: Schedule
    proxy_before: float
    proxy_after: float
    validation_before: float | None
    validation_after: float | None
    iterations: int
    seconds: float
    trace: list[dict[str, Any]] = field(default_factory=list)


def _loss(proxy: Proxy, sets: list[tuple[Any, Tensor, Any]], rows: list[Tensor], times: Tensor):
    """The proxy's differentiable loss of the outputs on its sets."""
    outs = []
    for model, x, _ in sets:
        bound = BoundModel(model)
        basis = [x]
        for k in range(len(rows)):
            xk = x if k == 0 else combine(list(rows[k - 1]), basis)
            basis.append(bound(xk, times[k]))
        outs.append(combine(list(rows[-1]), basis))
    return proxy.loss(outs)


def _schedule(process: Process, times: Tensor, rows: list[Tensor], info: dict) -> Schedule:
    coefs = tuple(tuple(float(v) for v in r.detach()) for r in rows)
    grid = [float(v) for v in times.detach()]
    return Schedule.for_solver(process, grid, NS(coefficients=coefs), "denoise", info=dict(info))


def fit(
    proxy: Proxy,
    start: Schedule,
    *,
    validation: Proxy | None = None,
    iterations: int = 30,
    inner: int = 10,
    times: bool = True,
    patience: int = 6,
    log: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool | None = None,
    info: dict[str, Any] | None = None,
) -> FitResult:
    """Fit an ``ns`` schedule on ``proxy``, starting from ``start`` (see the module
    docstring).

    Args:
        proxy: the calibration sets (the model must be differentiable in ``x``, and in
            ``t`` when ``times``).
        start: any schedule :func:`linearize` accepts (or an ``ns`` schedule).
        validation: other calibration data: the result is the iterate (the start
            included) with the lowest error there, and the fit stops after ``patience``
            iterations without a new best. Without it: the lowest proxy.
        iterations: outer L-BFGS iterations (each ``inner`` function evaluations at most,
            strong-Wolfe line search).
        times: fit the evaluation times too (``t_max`` stays the first); ``False`` keeps
            the start's.
        log: a JSONL log (a header, then one line per iteration with its schedule);
            ``resume=True`` continues from the last logged iterate (the L-BFGS memory
            starts afresh, so a resumed fit is a continuation, not a replay).
        progress: a tqdm bar (default: when stderr is a terminal).
        info: provenance stored in the result's ``info``.
    """
    if iterations < 0 or inner < 1:
        raise ValueError(f"need iterations >= 0 and inner >= 1, got {iterations}, {inner}")
    process = proxy.process
    begin = time.perf_counter()
    lin = start if start.solver == "ns" else linearize(start, process)
    cur = lin
    header = {
        "format": FIT_LOG_FORMAT,
        "kind": "header",
        "fingerprint": proxy.fingerprint(),
        "validation": validation.fingerprint() if validation is not None else None,
        "start": lin.to_dict(),
        "times": bool(times),
        "inner": int(inner),
    }
    trace: list[dict[str, Any]] = []
    file = None
    if log is not None:
        file, trace = _open_fit_log(Path(log), header, resume)
        if trace:
            cur = Schedule.from_dict(trace[-1]["schedule"])
    before = proxy.schedule_error(lin)
    val_before = validation.schedule_error(lin) if validation is not None else None
    score0 = val_before if validation is not None else before
    best = (score0, lin, before, val_before)
    for rec in trace:
        s = rec["validation"] if validation is not None else rec["proxy"]
        if s is not None and s < best[0]:
            best = (s, Schedule.from_dict(rec["schedule"]), rec["proxy"], rec["validation"])
    stale = 0
    if trace:
        last_best = min(
            range(len(trace)),
            key=lambda i: trace[i]["validation" if validation is not None else "proxy"] or math.inf,
        )
        stale = len(trace) - 1 - last_best

    n = cur.nfe
    rows = [
        torch.tensor(r, dtype=torch.float64, requires_grad=True)
        for r in dict(cur.options)["coefficients"]
    ]
    grid = cur.grid_tensor()
    param = GridParam(process, n - 1)
    exact_start = abs(float(grid[0]) - process.t_max) <= 1e-12 * max(1.0, abs(process.t_max))
    fit_times = bool(times) and n > 1 and exact_start
    if times and not exact_start:
        raise ValueError(
            f"fitting the times needs a start whose grid begins at t_max = {process.t_max:g}; "
            f"it begins at {float(grid[0]):g} (pass times=False)"
        )
    z = torch.tensor(param.encode(grid), dtype=torch.float64, requires_grad=True)

    def current_times() -> Tensor:
        return param.times_tensor(z) if fit_times else grid

    params = rows + ([z] if fit_times else [])
    sets = [(m, x.to(proxy.dtype), r) for m, x, r in proxy.sets]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=inner, line_search_fn="strong_wolfe")
    show = progress if progress is not None else os.isatty(2)
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=iterations, initial=min(len(trace), iterations), desc="fit", leave=False)
    meta = dict(info or {})
    failed = None
    try:
        for it in range(len(trace), iterations):
            if stale >= patience and validation is not None:
                break

            def closure() -> Tensor:
                opt.zero_grad()
                loss = _loss(proxy, sets, rows, current_times())
                loss.backward()
                if fit_times and z.grad is None:
                    raise ValueError(
                        "the model's output does not depend differentiably on t; fit with "
                        "times=False (--fit-fixed-times)"
                    )
                return loss

            try:
                opt.step(closure)
            except FloatingPointError as exc:  # a step left the model's valid range
                failed = str(exc)
                break
            with torch.no_grad():
                z.clamp_(-Z_MAX, Z_MAX)
                sch = _schedule(process, current_times(), rows, meta)
            value = proxy.schedule_error(sch)
            val = validation.schedule_error(sch) if validation is not None else None
            rec = {"kind": "iteration", "iteration": it, "proxy": value, "validation": val}
            rec["schedule"] = sch.to_dict()
            trace.append(rec)
            if file is not None:
                file.write(json.dumps(_finite(rec), allow_nan=False) + "\n")
                file.flush()
                os.fsync(file.fileno())
            score = val if val is not None else value
            if math.isfinite(score) and score < best[0]:
                best, stale = (score, sch, value, val), 0
            else:
                stale += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(proxy=f"{value:.4g}", best=f"{best[0]:.4g}")
    finally:
        if bar is not None:
            bar.close()
        if file is not None:
            file.close()
    _, chosen, after, val_after = best
    out_info = dict(meta)
    out_info["fit"] = {
        "iterations": len(trace),
        "times": fit_times,
        "inner": inner,
        "proxy_before": before,
        "proxy_after": after,
        "validation_before": val_before,
        "validation_after": val_after,
        **({"stopped": failed} if failed else {}),
    }
    chosen = Schedule.from_dict({**chosen.to_dict(), "info": out_info})
    return FitResult(
        chosen,
        lin,
        before,
        after,
        val_before,
        val_after,
        len(trace),
        time.perf_counter() - begin,
        trace,
    )


def _finite(rec: dict[str, Any]) -> dict[str, Any]:
    out = dict(rec)
    for k in ("proxy", "validation"):
        v = out.get(k)
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
    return out


def _open_fit_log(path: Path, header: dict[str, Any], resume: bool):
    """Open the JSONL log (``resume``: check its header and read its iterations)."""
    trace: list[dict[str, Any]] = []
    if path.exists() and not resume:
        raise FileExistsError(f"{path} exists; pass resume=True (--resume) to continue that fit")
    if resume and path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"{path} is empty; not a fit log")
        head = json.loads(lines[0])
        if head.get("format") != FIT_LOG_FORMAT:
            raise ValueError(f"{path} is not a fit log (format {head.get('format')!r})")
        for key in ("fingerprint", "validation", "times", "inner"):
            if head.get(key) != header[key]:
                raise ValueError(
                    f"{path} was written for another fit ({key} differs); use a new --log"
                )
        if head.get("start") != header["start"]:
            raise ValueError(f"{path} was written for another start schedule; use a new --log")
        kept = [lines[0]]
        for ln in lines[1:]:
            try:
                trace.append(json.loads(ln))
            except json.JSONDecodeError:  # a line cut by an interruption: dropped
                break
            kept.append(ln)
        path.write_text("\n".join(kept) + "\n")
        return path.open("a"), trace
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("w")
    f.write(json.dumps(header) + "\n")
    f.flush()
    return f, trace
