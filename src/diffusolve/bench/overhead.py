"""``diffusolve bench overhead``: per-step cost of our loop vs diffusers' ``step()`` loop.

Both sides run a trivial model (zeros) on a small float32 tensor over the DDPM-linear
process, so the time measured is the loop's own bookkeeping: coefficient computation,
state handling, checks. Grids / ``set_timesteps`` are built outside the timed region on
both sides. When our loop is slower, :func:`profile_ours` lists where the time goes.

Example:
    >>> from diffusolve.bench.overhead import run_overhead
    >>> r = run_overhead(steps=5, repeats=2, methods=("ddim",), profile=False)
    >>> {"method", "ours_us_per_step", "diffusers_us_per_step", "ratio"} <= set(r["results"][0])
    True
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..models import Denoiser
from ..process import ddpm, make_grid
from ..solvers import get_solver, sample

__all__ = ["run_overhead", "profile_ours", "format_overhead", "PAIRS"]

#: our solver name -> (diffusers class, constructor options, our grid kind matching its spacing)
PAIRS: dict[str, tuple[str, dict[str, Any], str]] = {
    "ddim": (
        "DDIMScheduler",
        {"timestep_spacing": "linspace", "set_alpha_to_one": True},
        "time_uniform",
    ),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"solver_order": 2, "algorithm_type": "dpmsolver++", "timestep_spacing": "linspace"},
        "time_uniform",
    ),
}
_LABELS = {"ddim": "DDIM", "dpmpp_2m": "DPM-Solver++ 2M"}
SHAPE = (1, 4, 8, 8)


class _Zero(Denoiser):
    """A denoiser that returns zeros: the cheapest possible model."""

    def __init__(self, process: Any) -> None:
        self.process = process

    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return torch.zeros_like(x)


def _ours_once(model: Any, x: Tensor, grid: Tensor, solver: str) -> float:
    start = time.perf_counter()
    sample(model, x, grid, solver, final="none", progress=False)
    return time.perf_counter() - start


def _diffusers_once(sched: Any, x: Tensor, steps: int) -> float:
    sched.set_timesteps(steps)  # resets the scheduler's state; not timed
    start = time.perf_counter()
    s = x
    for t in sched.timesteps:
        out = torch.zeros_like(s)
        s = sched.step(out, t, s).prev_sample
    return time.perf_counter() - start


def profile_ours(
    solver: str, steps: int = 50, repeats: int = 5, top: int = 15
) -> list[dict[str, Any]]:
    """cProfile of our loop: the functions with the largest own time (per step, in us)."""
    process = ddpm("linear")
    model = _Zero(process)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    grid = make_grid(process, steps, PAIRS[solver][2])
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(repeats):
        sample(model, x, grid, solver, final="none", progress=False)
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    n = steps * repeats
    for (path, line, fn), (_cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": fn,
                "where": f"{path.split('site-packages/')[-1].split('src/')[-1]}:{line}",
                "calls_per_step": nc / n,
                "own_us_per_step": 1e6 * tt / n,
                "cum_us_per_step": 1e6 * ct / n,
            }
        )
    rows.sort(key=lambda r: -r["own_us_per_step"])
    return rows[:top]


def run_overhead(
    steps: int = 50,
    repeats: int = 15,
    methods: Sequence[str] = ("ddim", "dpmpp_2m"),
    profile: bool = True,
    force_profile: bool = False,
) -> dict[str, Any]:
    """Median per-step wall time of ``diffusolve.sample`` vs a diffusers ``step()`` loop."""
    if int(steps) < 1 or int(repeats) < 1:
        raise ValueError(
            f"steps and repeats must be positive integers, got steps={steps}, repeats={repeats}"
        )
    unknown = [m for m in methods if m not in PAIRS]
    if unknown:
        raise ValueError(f"no diffusers pair for {unknown}; choose from {list(PAIRS)}")
    import diffusers

    process = ddpm("linear")
    model = _Zero(process)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    results = []
    for name in methods:
        cls, opts, kind = PAIRS[name]
        get_solver(name)  # clear error if the solver is not registered
        grid = make_grid(process, steps, kind)
        sched = getattr(diffusers, cls)(
            num_train_timesteps=1000,
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="linear",
            **opts,
        )
        t0 = time.perf_counter()
        make_grid(process, steps, kind)
        grid_us = 1e6 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        sched.set_timesteps(steps)
        set_us = 1e6 * (time.perf_counter() - t0)
        for _ in range(2):  # warm-up
            _ours_once(model, x, grid, name)
            _diffusers_once(sched, x, steps)
        ours, theirs = [], []
        for _ in range(repeats):  # interleaved so load changes hit both alike
            ours.append(_ours_once(model, x, grid, name))
            theirs.append(_diffusers_once(sched, x, steps))
        o = 1e6 * statistics.median(ours) / steps
        d = 1e6 * statistics.median(theirs) / steps
        rec: dict[str, Any] = {
            "method": _LABELS.get(name, name),
            "ours_solver": name,
            "diffusers_scheduler": cls,
            "ours_us_per_step": o,
            "diffusers_us_per_step": d,
            "ratio": o / d,
            "ours_grid_build_us": grid_us,
            "diffusers_set_timesteps_us": set_us,
        }
        if force_profile or (profile and o > d):
            rec["profile"] = profile_ours(name, steps)
        results.append(rec)
    return {
        "bench": "overhead",
        "convention": (
            f"trivial model (zeros) on a float32 tensor of shape {list(SHAPE)}, DDPM-linear "
            f"process, {steps} steps; per-step wall time = median over {repeats} interleaved "
            "repeats of the whole loop / steps; grid construction and set_timesteps excluded "
            "on both sides (reported separately); ratio = ours / diffusers (target <= 1)."
        ),
        "steps": steps,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "results": results,
    }


def format_overhead(result: dict[str, Any]) -> str:
    """Markdown table (and profiles) for :func:`run_overhead`'s result."""
    lines = [
        "## diffusolve bench overhead",
        "",
        result["convention"],
        "",
        "| method | ours (us/step) | diffusers (us/step) | ours/diffusers | grid build (us) | set_timesteps (us) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['method']} | {r['ours_us_per_step']:.1f} | {r['diffusers_us_per_step']:.1f} "
            f"| {r['ratio']:.3f} | {r['ours_grid_build_us']:.0f} | {r['diffusers_set_timesteps_us']:.0f} |"
        )
    for r in result["results"]:
        if "profile" in r:
            lines += [
                "",
                f"### where our {r['ours_solver']} loop spends its time (top functions by own time)",
                "",
                "| function | where | calls/step | own us/step | cumulative us/step |",
                "|---|---|---|---|---|",
            ]
            for p in r["profile"]:
                lines.append(
                    f"| {p['function']} | {p['where']} | {p['calls_per_step']:.1f} "
                    f"| {p['own_us_per_step']:.1f} | {p['cum_us_per_step']:.1f} |"
                )
    return "\n".join(lines)
