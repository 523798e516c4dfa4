"""Analysis phases of ``diffusolve bench guidance`` (issue 11): ``likelihood``,
``intrinsic-dim`` and ``digits-analysis``.

* ``likelihood``: the probability-flow log-likelihood (:func:`diffusolve.analysis.
  log_likelihood`) of points of the ``t_min`` marginal of a random 8-d Gaussian mixture,
  against its exact ``log_prob``, on VP, rectified flow, EDM and VE; exact trace and
  Hutchinson; dopri5 tolerances and RK4 step counts. The prior term is the exact mixture
  density at ``t_max``, so the error is the ODE's (the Gaussian prior's mismatch is recorded
  apart).
* ``intrinsic-dim``: every estimator on low-rank mixtures whose seeds (``seed + 1 ..``)
  differ from the one the hyper-parameters were chosen on (seed 0 of
  ``tests/test_intrinsic_dimension.py``), with random dimensions, ranks and processes.
* ``digits-analysis``: bits per dimension of the bundled ``digits`` model on held-out
  digits (density of ``x_{t_min}``, see :func:`_bpd_job`), per-class median estimates of
  every intrinsic-dimension estimator, relative asymmetry of the score Jacobian per noise
  level.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .runner import Job, RecordStore

__all__ = ["PHASES", "jobs", "tables", "plots", "goals"]

PHASES = ("likelihood", "intrinsic-dim", "digits-analysis")
_KEY = {"bench": "guidance"}
_PROCS = ("vp", "rf", "edm", "ve")
#: the digits estimators' hyper-parameters (noise levels in data units, sigma / alpha)
DIGITS_ID = {
    "stanczuk": {"sigma": 0.05, "n_perturb": 512},
    "flipd": {"sigma": 0.05},
    "flow": {"sigma_start": 0.05, "sigma_end": 0.5, "steps": 2, "method": "heun"},
}
_TIMES = (0.0, 10.0, 50.0, 200.0, 500.0)


def _process(name: str) -> Any:
    from ..process import edm, rectified_flow, ve, vp_linear

    return {"vp": vp_linear, "rf": rectified_flow, "edm": edm, "ve": ve}[name]()


def _key(phase: str, task: str, method: str, setting: str) -> dict[str, str]:
    return {**_KEY, "phase": phase, "task": task, "method": method, "setting": setting}


# ------------------------------------------------------------------------- likelihood
def _likelihood_job(proc_name: str, trace: str, setting: str, n: int, seed: int) -> Any:
    def run(store: RecordStore) -> dict[str, Any]:
        import time

        from ..analysis import gaussian_prior, log_likelihood
        from ..models import GaussianMixture

        proc = _process(proc_name)
        gmm = GaussianMixture.random(8, 4, process=proc, seed=seed)
        gen = torch.Generator().manual_seed(seed + 1)
        x0 = gmm.sample(n, gen)
        t0 = proc.t_min
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        x = proc.alpha(t0) * x0 + proc.sigma(t0) * eps
        ref = gmm.log_prob(x, t0)
        kind, val = setting.split("-", 1)
        kw: dict[str, Any] = {"method": kind}
        if kind == "dopri5":
            kw.update(rtol=float(val), atol=float(val) * 1e-2)
        else:
            kw["steps"] = int(val)
        if trace == "hutchinson":
            kw.update(trace="hutchinson", probes=2, seed=seed)
        start = time.perf_counter()
        lp, info = log_likelihood(gmm, x, prior=gmm.log_prob, **kw)
        wall = time.perf_counter() - start
        err = lp - ref
        x_end = info["x_end"]
        mismatch = gmm.log_prob(x_end, proc.t_max) - gaussian_prior(
            x_end, float(proc.sigma(proc.t_max))
        )
        return {
            "n": n,
            "d": 8,
            "mae_nats": float(err.abs().mean()),
            "max_abs_nats": float(err.abs().max()),
            "mean_err_nats": float(err.mean()),
            "se_nats": float(err.std() / math.sqrt(n)),
            "rel_error": float((err.abs() / ref.abs()).mean()),
            "nfe": int(info["nfe"]),
            "gaussian_prior_mismatch_nats": float(mismatch.abs().mean()),
            "timing": {"solve_seconds": wall},
        }

    return run


def _likelihood_jobs(quick: bool, seed: int) -> Iterator[Job]:
    procs = ("vp", "rf", "edm") if quick else _PROCS
    n = 16 if quick else 64
    exact = (
        ("dopri5-1e-05", "rk4-16")
        if quick
        else ("dopri5-1e-05", "dopri5-1e-08", "rk4-16", "rk4-64")
    )
    hutch = ("dopri5-1e-05",) if quick else ("dopri5-1e-05", "rk4-64")
    for p in procs:
        for trace, settings in (("exact", exact), ("hutchinson", hutch)):
            for s in settings:
                key = _key("likelihood", f"gmm-d8-{p}", trace, s)
                yield Job(key, _likelihood_job(p, trace, s, n, seed), f"likelihood {p} {trace} {s}")


# ------------------------------------------------------------------------- intrinsic dim
def _mixture_spec(seed: int) -> tuple[int, list[int], str]:
    """A random test mixture: dimension, distinct ranks in 1..D-1 and a process."""
    rng = np.random.default_rng(10_000 + seed)
    dim = int(rng.choice([16, 24, 32]))
    ranks = sorted(int(r) for r in rng.choice(np.arange(1, dim), size=4, replace=False))
    return dim, ranks, str(rng.choice(["vp", "rf", "edm"]))


def _id_job(mix_seed: int, method: str, n_points: int) -> Any:
    def run(store: RecordStore) -> dict[str, Any]:
        from ..analysis import (
            component_samples,
            flipd_id,
            flow_jacobian_id,
            low_rank_mixture,
            stanczuk_id,
        )

        dim, ranks, proc = _mixture_spec(mix_seed)
        gmm, ranks = low_rank_mixture(dim, ranks, process=_process(proc), seed=mix_seed)
        x, comp = component_samples(gmm, n_points, seed=mix_seed + 1)
        fn = {"stanczuk": stanczuk_id, "flipd": flipd_id, "flow": flow_jacobian_id}[method]
        est = fn(gmm, x)[0]
        per = []
        for k, r in enumerate(ranks):
            e = est[comp == k]
            per.append(
                {
                    "rank": r,
                    "median": float(e.median()),
                    "max_dev": float((e - r).abs().max()),
                    "frac_exact": float((e.round() == r).double().mean()),
                }
            )
        return {
            "dim": dim,
            "process": proc,
            "ranks": ranks,
            "points_per_component": n_points,
            "components": per,
            "frac_exact": float(np.mean([c["frac_exact"] for c in per])),
            "all_exact": all(c["frac_exact"] == 1.0 for c in per),
        }

    return run


def _id_jobs(quick: bool, seed: int) -> Iterator[Job]:
    n_mix, n_points = (2, 4) if quick else (6, 8)
    for i in range(n_mix):
        ms = seed + 1 + i
        dim, ranks, proc = _mixture_spec(ms)
        task = f"lowrank-d{dim}-{proc}-s{ms}"
        for method in ("stanczuk", "flipd", "flow"):
            key = _key("intrinsic-dim", task, method, "default")
            yield Job(key, _id_job(ms, method, n_points), f"id {task} {method}")


# ------------------------------------------------------------------------- digits
_DIGITS: dict[str, Any] = {}


def _digits() -> tuple[Any, torch.Tensor, torch.Tensor]:
    if "model" not in _DIGITS:
        from ..models import load
        from ..models.data import load_digits

        _DIGITS["model"] = load("digits")
        _DIGITS["data"] = load_digits("heldout")
    x, y = _DIGITS["data"]
    return _DIGITS["model"], x, y


def _pick(y: torch.Tensor, classes: tuple[int, ...], per_class: int) -> torch.Tensor:
    return torch.cat([(y == c).nonzero().flatten()[:per_class] for c in classes])


def _bpd_job(n_per_class: int, steps: int, probes: int, points: str, seed: int) -> Any:
    """Bits per dimension of the density of ``x_{t_min}`` (DDPM t = 0: ``alpha = 0.99995``,
    ``sigma = 0.01``) evaluated at held-out digits in the model's [-1, 1] units: the
    probability-flow ODE from t = 0 to 999 (RK4 in log sigma/alpha, Hutchinson traces) and
    the Gaussian prior ``N(0, sigma(999)^2 I)``. ``bpd_8bit`` is the same density in units
    of 8-bit pixel values ([0, 255], ``+ log2(127.5)``); no dequantisation: the digits are
    continuous (8x8 grey levels upsampled bilinearly), not 8-bit codes.

    ``points="clean"``: at the held-out digits themselves; ``"noised"``: at
    ``alpha(0) x0 + sigma(0) eps``, a typical sample of ``x_{t_min}``. Any density of
    ``x_{t_min} = alpha x0 + 0.01 eps`` is at most ``(2 pi 0.01^2)^(-d/2)``, so an exact
    model has bits/dim >= ``-log2(1 / (0.01 sqrt(2 pi)))`` = -5.318: lower figures measure
    the model's excess concentration, not the data."""

    def run(store: RecordStore) -> dict[str, Any]:
        from ..analysis import bits_per_dim, log_likelihood

        model, x, y = _digits()
        idx = _pick(y, tuple(range(10)), n_per_class)
        xs, ys = x[idx], y[idx]
        if points == "noised":
            proc = model.process
            eps = torch.randn(xs.shape, generator=torch.Generator().manual_seed(seed + 7))
            xs = float(proc.alpha(proc.t_min)) * xs + float(proc.sigma(proc.t_min)) * eps
        lp, info = log_likelihood(
            model,
            xs,
            ys,
            trace="hutchinson",
            probes=probes,
            method="rk4",
            steps=steps,
            seed=seed,
            max_rows=1024,
        )
        bpd = bits_per_dim(lp, 256)
        per = {str(c): float(bpd[ys == c].mean()) for c in range(10)}
        return {
            "n": len(idx),
            "bpd": float(bpd.mean()),
            "bpd_se": float(bpd.std() / math.sqrt(len(idx))),
            "bpd_8bit": float(bpd.mean()) + math.log2(127.5),
            "nats_per_dim": float(-lp.mean() / 256),
            "per_class_bpd": per,
            "prior_logp_mean": float(info["prior_logp"].mean()),
            "floor_bpd_exact_model": -math.log2(1 / (0.01 * math.sqrt(2 * math.pi))),
            "nfe": int(info["nfe"]),
        }

    return run


def _digits_id_job(method: str, classes: tuple[int, ...], per_class: int, seed: int) -> Any:
    def run(store: RecordStore) -> dict[str, Any]:
        from ..analysis import flipd_id, flow_jacobian_id, stanczuk_id

        model, x, y = _digits()
        idx = _pick(y, classes, per_class)
        fn = {"stanczuk": stanczuk_id, "flipd": flipd_id, "flow": flow_jacobian_id}[method]
        kw = dict(DIGITS_ID[method])
        if method != "flipd":
            kw["seed"] = seed
        est, info = fn(model, x[idx], y[idx], max_rows=512, **kw)
        per = {str(c): float(est[y[idx] == c].median()) for c in classes}
        out: dict[str, Any] = {"hyper": kw, "per_class_median": per, "n": len(idx)}
        out["median"] = float(est.median())
        if method == "flipd":
            out["trace_median"] = float(info["trace"].median())
            out["residual_median"] = float(info["residual"].median())
        return out

    return run


def _conservativity_job(t: float, per_class: int, classes: tuple[int, ...], seed: int) -> Any:
    def run(store: RecordStore) -> dict[str, Any]:
        from ..analysis import asymmetry

        model, x, y = _digits()
        idx = _pick(y, classes, per_class)
        proc = model.process
        gen = torch.Generator().manual_seed(seed)
        eps = torch.randn(x[idx].shape, generator=gen)
        xt = float(proc.alpha(t)) * x[idx] + float(proc.sigma(t)) * eps
        rel, info = asymmetry(model, xt, t, y[idx], max_rows=512)
        return {
            "t": t,
            "sigma_over_alpha": float(proc.sigma_tilde(t)),
            "n": len(idx),
            "score_rel_asym_median": float(rel.median()),
            "score_rel_asym_max": float(rel.max()),
            "denoiser_rel_asym_median": float(info["denoiser"].median()),
        }

    return run


def _digits_jobs(quick: bool, seed: int) -> Iterator[Job]:
    phase = "digits-analysis"
    n_bpd, steps, probes = (1, 6, 1) if quick else (8, 10, 1)
    for points in ("clean", "noised"):
        setting = f"{points},rk4-{steps},hutch{probes},n={10 * n_bpd}"
        job = _bpd_job(n_bpd, steps, probes, points, seed)
        yield Job(_key(phase, "digits", "bpd", setting), job, f"bpd {points}")
    classes = (0, 1) if quick else tuple(range(10))
    for method in ("stanczuk", "flipd", "flow"):
        per = 1 if quick else 2
        s = ",".join(f"{k}={v}" for k, v in DIGITS_ID[method].items()) + f",n/class={per}"
        yield Job(
            _key(phase, "digits", f"id-{method}", s),
            _digits_id_job(method, classes, per, seed),
            f"digits id {method}",
        )
    times = (0.0, 50.0, 500.0) if quick else _TIMES
    for t in times:
        per, cls = (1, (3,)) if quick else (1, (0, 3, 5, 8))
        yield Job(
            _key(phase, "digits", "conservativity", f"t={t:g},n={per * len(cls)}"),
            _conservativity_job(t, per, cls, seed),
            f"conservativity t={t:g}",
        )


# ------------------------------------------------------------------------- contract
def jobs(quick: bool, seed: int) -> Iterator[Job]:
    """The jobs of the three phases (quick: a subset, under ~45 s on one thread)."""
    yield from _likelihood_jobs(quick, seed)
    yield from _id_jobs(quick, seed)
    yield from _digits_jobs(quick, seed)


def _mine(records: list[dict[str, Any]], phase: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("bench") == "guidance" and r.get("phase") == phase]


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def tables(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Likelihood errors, intrinsic dimension per component, digits figures."""
    out: list[tuple[str, str]] = []
    lik = _mine(records, "likelihood")
    if lik:
        rows = [
            [
                r["task"],
                r["method"],
                r["setting"],
                f"{r['mae_nats']:.2e}",
                f"{r['max_abs_nats']:.2e}",
                f"{r['mean_err_nats']:+.2e} ± {r['se_nats']:.1e}",
                f"{r['rel_error']:.2e}",
                str(r["nfe"]),
                f"{r['gaussian_prior_mismatch_nats']:.1e}",
            ]
            for r in lik
        ]
        head = [
            "task",
            "trace",
            "integrator",
            "MAE (nats)",
            "max abs err",
            "mean err ± SE",
            "rel. error",
            "NFE",
            "Gaussian-prior mismatch",
        ]
        out.append(
            ("Log-likelihood by the PF-ODE vs exact GMM log-density (d = 8)", _table(head, rows))
        )
    ids = _mine(records, "intrinsic-dim")
    if ids:
        rows = []
        for r in ids:
            comps = "; ".join(
                f"{c['rank']}: {c['median']:.2f} ({c['frac_exact']:.0%})" for c in r["components"]
            )
            rows.append([r["task"], r["method"], comps, f"{r['frac_exact']:.0%}"])
        head = [
            "mixture (held-out seed)",
            "estimator",
            "true rank: median estimate (exact)",
            "fraction exact",
        ]
        out.append(("Intrinsic dimension on low-rank Gaussian mixtures", _table(head, rows)))
    dig = _mine(records, "digits-analysis")
    if dig:
        for r in dig:
            if r["method"] == "bpd":
                rows = [[c, f"{v:.3f}"] for c, v in r["per_class_bpd"].items()]
                rows.append(
                    ["all", f"{r['bpd']:.3f} ± {r['bpd_se']:.3f} (8-bit units {r['bpd_8bit']:.3f})"]
                )
                out.append(
                    (
                        f"Digits bits/dim of x_(t_min), held-out ({r['setting']})",
                        _table(["class", "bits/dim ([-1, 1] units)"], rows),
                    )
                )
        idr = [r for r in dig if r["method"].startswith("id-")]
        if idr:
            classes = sorted({c for r in idr for c in r["per_class_median"]}, key=int)
            rows = [
                [c] + [f"{r['per_class_median'].get(c, float('nan')):.1f}" for r in idr]
                for c in classes
            ]
            head = ["class"] + [f"{r['method'][3:]} ({r['setting']})" for r in idr]
            out.append(
                ("Digits: per-class median intrinsic dimension (D = 256)", _table(head, rows))
            )
        cons = [r for r in dig if r["method"] == "conservativity"]
        if cons:
            rows = [
                [
                    f"{r['t']:g}",
                    f"{r['sigma_over_alpha']:.3g}",
                    f"{r['score_rel_asym_median']:.3e}",
                    f"{r['denoiser_rel_asym_median']:.3e}",
                    str(r["n"]),
                ]
                for r in cons
            ]
            head = [
                "t",
                "sigma/alpha",
                "score ‖J - Jᵀ‖ / ‖J‖ (median)",
                "denoiser (median)",
                "points",
            ]
            out.append(("Digits: conservativity of the learned score", _table(head, rows)))
    return out


def plots(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Likelihood error against NFE (exact trace), per process."""
    lik = [r for r in _mine(records, "likelihood") if r["method"] == "exact"]
    if not lik:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for task in sorted({r["task"] for r in lik}):
        rs = sorted((r for r in lik if r["task"] == task), key=lambda r: r["nfe"])
        ax.loglog([r["nfe"] for r in rs], [r["mae_nats"] for r in rs], "o-", label=task)
    ax.set_xlabel("model evaluations (batched)")
    ax.set_ylabel("MAE of log p (nats)")
    ax.legend(fontsize=7)
    ax.set_title("PF-ODE log-likelihood vs exact (exact trace)")
    fig.tight_layout()
    path = out_dir / "analysis_likelihood.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def goals(records: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """The issue's goals with the measured figures."""
    out: list[tuple[str, bool, str]] = []
    lik = _mine(records, "likelihood")
    ex = [r for r in lik if r["method"] == "exact" and r["setting"].startswith("dopri5")]
    if ex:
        best: dict[str, float] = {}
        for r in ex:
            best[r["task"]] = min(best.get(r["task"], math.inf), r["mae_nats"])
        worst = max(best.values())
        out.append(
            (
                "log-likelihood by the PF-ODE matches the exact GMM log-density (exact trace, "
                "dopri5; MAE < 1e-3 nats on every process)",
                worst < 1e-3,
                ", ".join(f"{k}: {v:.1e}" for k, v in best.items()),
            )
        )
    hu = [r for r in lik if r["method"] == "hutchinson"]
    if hu:
        z = [abs(r["mean_err_nats"]) / max(r["se_nats"], 1e-300) for r in hu]
        out.append(
            (
                "Hutchinson log-likelihood unbiased (abs(mean error) within 4 standard errors)",
                max(z) < 4,
                f"largest abs(mean err) / SE = {max(z):.2f} over {len(z)} runs",
            )
        )
    ids = _mine(records, "intrinsic-dim")
    if ids:
        comps = [(r["method"], c) for r in ids for c in r["components"]]
        bad = [
            f"{m} rank {c['rank']} ({c['frac_exact']:.0%})" for m, c in comps if c["frac_exact"] < 1
        ]
        frac = statistics.mean(c["frac_exact"] for _, c in comps)
        out.append(
            (
                "intrinsic dimension exact (rounded) on every known-rank component",
                not bad,
                f"{frac:.1%} of points exact over {len(comps)} component x estimator cells "
                f"({len({r['task'] for r in ids})} held-out mixtures)"
                + (f"; misses: {', '.join(bad)}" if bad else ""),
            )
        )
    dig = _mine(records, "digits-analysis")
    bpd = [r for r in dig if r["method"] == "bpd"]
    if bpd:
        figure = "; ".join(
            f"{r['setting'].split(',')[0]}: {r['bpd']:.3f} ± {r['bpd_se']:.3f} bits/dim of "
            f"x_(t_min) in [-1, 1] units ({r['bpd_8bit']:.3f} in 8-bit units), n = {r['n']}"
            for r in bpd
        )
        floor = bpd[0]["floor_bpd_exact_model"]
        out.append(
            (
                "bits/dim of the bundled digits model on held-out digits (informational)",
                all(math.isfinite(r["bpd"]) for r in bpd),
                figure + f" (an exact model cannot go below {floor:.3f})",
            )
        )
    cons = [r for r in dig if r["method"] == "conservativity"]
    if cons:
        out.append(
            (
                "conservativity of the learned score per noise level (informational)",
                all(math.isfinite(r["score_rel_asym_median"]) for r in cons),
                ", ".join(f"t={r['t']:g}: {r['score_rel_asym_median']:.3f}" for r in cons),
            )
        )
    return out
