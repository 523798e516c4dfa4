"""FD-only methods of ``bench samplers`` on the network task.

Samplers whose output is not the probability-flow endpoint of its start have no
``rel_error`` to the bench's reference, but FD-digits (the distribution's distance to real
digits) applies to them as to every other method. On the network task each of these runs
at each NFE on the FD starts (seed + 3) with its documented defaults, no settings search:

* stochastic solvers with fixed schedules (:data:`STOCHASTIC`): ancestral DDPM, SDE-DPM-
  Solver++(2M), ancestral DPM-Solver++(2S), the stochastic-interpolant SDE; their noise
  from per-sample seeds ``seed + 4``. They are fixed-schedule solvers, so they count in the
  fixed-schedule baseline of the FD summary.
* whole-trajectory samplers (:data:`TRAJECTORY`): DMCMC (Denoising Langevin Gibbs with the
  bundled noise-level estimator, then ``dpmpp_2m``) and DPM-OT (the OT map to the train
  split noised to ``t_late``, then ``dpmpp_2m`` as published, or ancestral ``ddpm`` for
  ``dpm_ot_ddpm``: with the deterministic finish two starts in one OT cell give one image,
  with the ancestral one every sample draws its own noise), ``t_late`` chosen by
  :func:`~diffusolve.sampling.select_t_late`'s memorisation guard on calibration noise
  (seed 5000), with the same finishing solver, and the train split alone.

Every record carries the samples' median nearest-neighbour distance to the train split next
to the held-out digits' own (a sample much nearer the training set than real unseen digits
are is a copy) and the fraction of samples within a third of that held-out median of a
training image (:func:`~diffusolve.sampling.memorisation_table`'s radius), and DPM-OT's the
share of distinct images among its samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .runner import Job

__all__ = ["STOCHASTIC", "TRAJECTORY", "FD_ONLY_METHODS", "check_fd_only", "fd_only_jobs"]

#: stochastic registry solvers benched by FD-digits alone (fixed schedules)
STOCHASTIC = ("ddpm", "sde_dpmpp_2m", "dpmpp_2s_ancestral", "si_sde")
#: whole-trajectory samplers benched by FD-digits alone
TRAJECTORY = ("dmcmc", "dpm_ot", "dpm_ot_ddpm")
#: DPM-OT's finishing solver per method: the deterministic one (two starts in one OT cell
#: give one image) and the ancestral one (every sample its own noise)
DPM_OT_SOLVERS = {"dpm_ot": "dpmpp_2m", "dpm_ot_ddpm": "ddpm"}
FD_ONLY_METHODS = STOCHASTIC + TRAJECTORY
#: DPM-OT: calibration starts (and their seed) of the memorisation guard, the map's fit
GUARD_SAMPLES, GUARD_SEED = 512, 5000
DPM_OT_FIT = {"iters": 1000}


def check_fd_only(methods: list[str]) -> None:
    bad = [m for m in methods if m not in FD_ONLY_METHODS]
    if bad:
        raise ValueError(
            f"unknown FD-only method(s) {', '.join(bad)}; choose from {', '.join(FD_ONLY_METHODS)}"
        )


def _setting(method: str, seed: int) -> dict[str, Any]:
    if method in STOCHASTIC:
        return {"noise_seed": seed + 4}
    if method == "dmcmc":
        return {"noise_seed": seed + 4, "estimator": "digits", "solver": "dpmpp_2m"}
    from ..sampling.dpm_ot import LEVEL_FRACTIONS

    out = {
        "data": "train",
        "guard_samples": GUARD_SAMPLES,
        "guard_seed": GUARD_SEED,
        "fractions": list(LEVEL_FRACTIONS),
        "solver": DPM_OT_SOLVERS[method],
        **DPM_OT_FIT,
    }
    from ..solvers import get_solver

    if get_solver(out["solver"]).stochastic:
        out["noise_seed"] = seed + 4
    return out


class _Memo:
    """The train / held-out digits and their NN reference, and DPM-OT's maps, built once."""

    def __init__(self) -> None:
        self._data: tuple[torch.Tensor, float] | None = None
        self.maps: dict[float, Any] = {}

    def data(self) -> tuple[torch.Tensor, float]:
        if self._data is None:
            from ..models.data import load_digits
            from ..sampling import nn_distances

            train, held = load_digits("train")[0], load_digits("heldout")[0]
            self._data = (train, float(nn_distances(held, train).median()))
        return self._data


def _run(method: str, model: Any, x: torch.Tensor, nfe: int, setting: dict, memo: _Memo) -> dict:
    from ..process import make_grid
    from ..solvers import get_solver, sample, steps_for_nfe

    extra: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    if method in STOCHASTIC:
        solver = get_solver(method)
        n = steps_for_nfe(solver, nfe, "denoise")
        grid = make_grid(model.process, n, solver.natural_grid)
        out = sample(model, x, grid, solver, noise=setting["noise_seed"], stats=stats)
        extra["steps"] = n
    elif method == "dmcmc":
        from ..sampling import dmcmc_sample, load_noise_estimator

        out = dmcmc_sample(
            model,
            x,
            nfe=nfe,
            solver=setting["solver"],
            estimator=load_noise_estimator(setting["estimator"]),
            noise=setting["noise_seed"],
            stats=stats,
        )
    else:
        from ..sampling import distinct_fraction, dpm_ot_sample, select_t_late

        train, _ = memo.data()
        ot_map, rows = select_t_late(
            model,
            train,
            nfe - 1,
            fractions=tuple(setting["fractions"]),
            n=setting["guard_samples"],
            seed=setting["guard_seed"],
            solver=setting["solver"],
            fit_options={"iters": setting["iters"]},
            maps=memo.maps,
        )
        noise = setting.get("noise_seed")
        out = dpm_ot_sample(
            model, ot_map, x, steps=nfe - 1, solver=setting["solver"], noise=noise, stats=stats
        )
        extra.update(
            t_late=ot_map.t_late,
            guard=rows,
            distinct_fraction=_distinct(out),
            distinct_targets=distinct_fraction(stats["index"]),
            map_info={k: ot_map.info.get(k) for k in ("iters", "wall_s", "mass_error_l1")},
        )
    nfe_used = stats.get("nfe")
    if isinstance(nfe_used, torch.Tensor):
        nfe_used = int(nfe_used.max())
    return {"x": out, "nfe_used": nfe_used, **extra}


def _distinct(x: torch.Tensor) -> float:
    """The share of distinct images among the samples (equal to 6 decimals: the same)."""
    flat = x.detach().reshape(x.shape[0], -1).to(torch.float64).round(decimals=6)
    return float(torch.unique(flat, dim=0).shape[0] / x.shape[0])


def fd_only_jobs(
    tasks: Any, tname: str, nfe: int, methods: list[str], seed: int, memo: _Memo | None = None
) -> Iterator[Job]:
    """One ``fdonly`` job per method: FD-digits of its samples from the FD starts, with the
    memorisation figures (see the module docstring)."""
    from .samplers import _key

    memo = memo or _Memo()
    for method in methods:
        setting = _setting(method, seed)

        def run(store: Any, method: str = method, setting: dict = setting) -> dict[str, Any]:
            from ..models import fd_digits
            from ..sampling import nn_distances

            task = tasks.fd_task(tname)
            rec: dict[str, Any] = {
                "kind": "stochastic solver" if method in STOCHASTIC else "trajectory sampler",
                "fd_digits": None,
                "fd_samples": int(task.x_T.shape[0]),
                "rel_error": None,
            }
            try:
                res = _run(method, task.model, task.x_T, nfe, setting, memo)
                x = res.pop("x")
                rec.update(res)
                if not bool(torch.isfinite(x).all()):
                    rec["note"] = "non-finite samples"
                    return rec
                train, held_nn = memo.data()
                rec["fd_digits"] = float(fd_digits(x.float()))
                d = nn_distances(x, train)
                rec["median_nn_train"] = float(d.median())
                rec["heldout_median_nn_train"] = held_nn
                # memorisation_table's radius: a third of the held-out digits' median
                rec["frac_within_radius"] = float((d < held_nn / 3.0).double().mean())
            except Exception as e:  # noqa: BLE001 - recorded, never dropped silently
                rec["note"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            return rec

        yield Job(
            _key("fdonly", tname, "diffusolve", method, nfe, setting),
            run,
            f"{tname} NFE {nfe} {method} FD (FD only)",
        )
