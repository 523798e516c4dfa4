"""Guidance on the bundled digits model: the ``digits`` phase of ``diffusolve bench guidance``.

Every guidance method over its scale grid samples the same ``N`` starts (per-sample seeds
``seed + 1``, balanced target classes ``i % 10``) with the same solver and NFE: ``ddim``, 10
steps (time-uniform grid) plus the final denoising evaluation (NFE 11). DDIM because it is
the solver CFG++ is defined for (our wrapper reproduces its DDIM loop exactly) and it is
deterministic (the methods' differences are not hidden by sampling noise); 10 steps rather
than 20 because a guided 1,000-sample point costs ~40 CPU-s at 10 steps on one thread and the
full run must stay near 10 minutes.

Measured per point: FD-digits against the held-out split (``fd_digits``; the real-vs-real
floor at the same ``N`` is its own job), target-class accuracy by the independent **judge**
classifier (headline; no method ever uses it), by the bundled noise-aware classifier
(secondary; flagged for classifier guidance, whose guide it is), and CPU seconds per sample
(in ``timing``). Scale 1 of CFG is the conditional model; the classifier-type methods guide
the conditional model (their scale 0 is that same point, run once).

Methods: ``cfg`` (plain), ``cfg++`` (lambda), ``interval-cfg`` (EDM2-S interval
``(0.28, 2.9]``), ``rescaled-cfg`` (phi 0.7 in v), ``classifier`` (noise-aware classifier),
``elucd`` (the clean guide classifier, paper defaults tau 1/0.5, gamma 0.3, Softplus 3),
``loss`` (forward guidance through the denoiser with the guide's cross-entropy).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .runner import Job

__all__ = ["PHASES", "jobs", "tables", "plots", "goals", "SOLVER", "STEPS"]

PHASES = ("digits",)
TASK = "digits"
SOLVER = "ddim"
STEPS = 10
#: method -> (quick scales, full scales); scale 1 of cfg is the conditional model
SCALES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cfg": ((1.0, 3.0), (1.0, 1.5, 2.0, 3.0)),
    "cfg++": ((0.6,), (0.3, 0.6)),
    "interval-cfg": ((3.0,), (2.0, 4.0)),
    "rescaled-cfg": ((3.0,), (2.0, 4.0)),
    "classifier": ((1.0,), (0.5, 1.0, 2.0)),
    "elucd": ((0.3,), (0.1, 0.3, 1.0)),
    "loss": ((8.0,), (4.0, 16.0)),
}
GUIDE = {
    "cfg": "none",
    "cfg++": "none",
    "interval-cfg": "none",
    "rescaled-cfg": "none",
    "classifier": "noise-aware (bundled)",
    "elucd": "clean guide",
    "loss": "clean guide",
}
CHUNK = 250


def _n(quick: bool) -> int:
    return 100 if quick else 1000


@lru_cache(maxsize=1)
def _classifiers() -> dict[str, Any]:
    from ..models import load_classifier
    from ..models.clean_classifier import load_clean_classifier, load_judge_classifier

    return {
        "noise_aware": load_classifier(),
        "guide": load_clean_classifier(),
        "judge": load_judge_classifier(),
    }


@lru_cache(maxsize=1)
def _assets() -> dict[str, Any]:
    from ..models import load
    from ..process import make_grid

    model = load("digits")
    return {
        "model": model,
        **_classifiers(),
        "grid": make_grid(model.process, STEPS, "time_uniform"),
    }


def guided(model: Any, method: str, scale: float, grid: Any) -> Any:
    """``model`` guided by ``method`` (a key of :data:`SCALES`) at ``scale`` on the sampling
    ``grid``: a fresh wrapper over the same network; the classifiers are the bundled ones
    (noise-aware for ``classifier``, the clean guide for ``elucd`` and ``loss``). The demo's
    guidance panel uses it too."""
    from ..guidance import (
        CFGPlusPlus,
        ClassifierGuidance,
        EluCD,
        Guided,
        IntervalGuidance,
        LossGuidance,
        RescaledCFG,
    )

    if method == "cfg":
        return Guided(model, scale)
    if method == "cfg++":
        return CFGPlusPlus(model, scale, grid=grid)
    if method == "interval-cfg":
        return IntervalGuidance(model, scale)
    if method == "rescaled-cfg":
        return RescaledCFG(model, scale, phi=0.7, space="v")
    if method == "classifier":
        return ClassifierGuidance(model, _classifiers()["noise_aware"], scale)
    if method == "elucd":
        return EluCD(model, _classifiers()["guide"], scale, grid=grid)
    if method == "loss":
        guide = _classifiers()["guide"]

        def cross_entropy(x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(guide(x0.float()), y, reduction="none")

        return LossGuidance(model, cross_entropy, scale, through_denoiser=True)
    raise ValueError(f"unknown guidance method {method!r}; choose from {', '.join(SCALES)}")


def _guided(method: str, scale: float) -> Any:
    """The bench's guided model of ``method`` at ``scale``."""
    a = _assets()
    return guided(a["model"], method, scale, a["grid"])


def _sample(method: str, scale: float, n: int, seed: int) -> tuple[torch.Tensor, int]:
    from ..solvers.loop import sample

    a = _assets()
    guided = _guided(method, scale)
    outs, nfe = [], 0
    labels = torch.arange(n) % 10
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        x = a["model"].process.prior_sample(
            (hi - lo, 1, 16, 16), noise=list(range(seed + 1 + lo, seed + 1 + hi))
        )
        stats: dict[str, Any] = {}
        with torch.no_grad():  # the guidance terms enable gradients for their own backward
            out = sample(
                guided, x, a["grid"], SOLVER, cond=labels[lo:hi], stats=stats, progress=False
            )
        outs.append(out.detach())
        nfe = stats["nfe"]
    return torch.cat(outs), nfe


def _measure(method: str, scale: float, n: int, seed: int) -> dict[str, Any]:
    from ..models import fd_digits

    a = _assets()
    wall, cpu = time.perf_counter(), time.process_time()
    samples, nfe = _sample(method, scale, n, seed)
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    labels = torch.arange(n) % 10
    x = samples.clamp(-1, 1).float()
    with torch.no_grad():
        judge = float((a["judge"](x).argmax(1) == labels).float().mean())
        noise_aware = float(
            (a["noise_aware"](x, torch.tensor(0.0)).argmax(1) == labels).float().mean()
        )
    return {
        "scale": scale,
        "n": n,
        "solver": SOLVER,
        "steps": STEPS,
        "nfe": nfe,
        "fd": round(fd_digits(x), 6),
        "acc_judge": round(judge, 6),
        "acc_noise_aware": round(noise_aware, 6),
        "guide": GUIDE[method],
        "secondary_is_guide": method == "classifier",
        "judge_is_guide": False,
        "timing": {"cpu_s_per_sample": cpu / n, "wall_s": wall},
    }


def _key(method: str, setting: str) -> dict[str, Any]:
    return {
        "bench": "guidance",
        "phase": "digits",
        "task": TASK,
        "method": method,
        "setting": setting,
    }


def jobs(quick: bool, seed: int) -> Iterator[Job]:
    """The FD floor at ``N``, then every method over its scale grid (``N`` = 100 quick,
    1,000 full). The classifier-type methods' scale 0 is the conditional model (``cfg``
    at 1), run once."""
    from ..models import fd_digits_noise_floor

    n = _n(quick)
    yield Job(
        _key("fd-floor", f"n={n}"),
        lambda store: {"n": n, "fd": round(fd_digits_noise_floor(n, seed), 6)},
        label=f"FD-digits floor n={n}",
    )
    for method, (q, f) in SCALES.items():
        for scale in q if quick else f:
            yield Job(
                _key(method, f"scale={scale:g}"),
                lambda store, m=method, s=scale: _measure(m, s, n, seed),
                label=f"{method} {scale:g}",
            )


def _points(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        if r.get("phase") == "digits" and r.get("method") != "fd-floor" and "fd" in r:
            out.setdefault(r["method"], []).append(r)
    base = [r for r in out.get("cfg", []) if r["scale"] == 1.0]
    for method in ("classifier", "elucd", "loss"):  # scale 0 = the conditional model
        if method in out and base:
            out[method] = [{**base[0], "method": method, "scale": 0.0}] + out[method]
    for rows in out.values():
        rows.sort(key=lambda r: r["scale"])
    return out


def tables(records: list[dict]) -> list[tuple[str, str]]:
    """One row per method and scale."""
    pts = _points(records)
    floor = [r for r in records if r.get("method") == "fd-floor"]
    lines = [
        "| method | scale | guide | FD-digits | acc. (judge) | acc. (noise-aware) | NFE | CPU s / sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, rows in pts.items():
        for r in rows:
            flag = " †" if r.get("secondary_is_guide") else ""
            cpu = r.get("timing", {}).get("cpu_s_per_sample", float("nan"))
            lines.append(
                f"| {method} | {r['scale']:g} | {r['guide']} | {r['fd']:.3f} | "
                f"{100 * r['acc_judge']:.1f} % | {100 * r['acc_noise_aware']:.1f} %{flag} | "
                f"{r['nfe']} | {cpu:.3f} |"
            )
    note = ""
    if floor:
        note = f"\n\nFD-digits of real digits at n = {floor[0]['n']}: {floor[0]['fd']:.3f}."
    note += (
        f" Solver {SOLVER}, {STEPS} steps; the same starts and class-balanced targets for every "
        "point. † the secondary accuracy is measured by the method's own guide. Scale 0 of the "
        "classifier methods is the conditional model (= cfg 1)."
    )
    return [("Guidance on digits: FD-digits vs target accuracy", "\n".join(lines) + note)]


def plots(records: list[dict], out_dir: Path) -> list[Path]:
    """The FD-digits vs judge-accuracy frontier, one line per method."""
    pts = _points(records)
    if not pts:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, rows in pts.items():
        ax.plot(
            [100 * r["acc_judge"] for r in rows], [r["fd"] for r in rows], "o-", label=method, ms=4
        )
    floor = [r for r in records if r.get("method") == "fd-floor"]
    if floor:
        ax.axhline(floor[0]["fd"], color="grey", ls=":", label="real digits")
    ax.set_xlabel("target accuracy by the judge classifier (%)")
    ax.set_ylabel("FD-digits (lower is better)")
    ax.set_title("Guidance on digits")
    ax.legend(fontsize=7)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "guidance_digits_frontier.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


GOAL = "a guidance method that improves target accuracy at equal or better FD-digits than plain CFG"


def goals(records: list[dict]) -> list[tuple[str, bool, str]]:
    """A method point dominates plain CFG when some CFG point has <= its accuracy and >= its
    FD with one strict. Reported: the dominating point with the highest judge accuracy (then
    the lowest FD), against the lowest-FD CFG point it dominates."""
    pts = _points(records)
    cfg = pts.get("cfg", [])
    if not cfg:
        return [(GOAL, False, "no plain-CFG records")]
    best = None
    for method, rows in pts.items():
        if method == "cfg":
            continue
        for r in rows:
            if r["scale"] == 0.0 and method in ("classifier", "elucd", "loss"):
                continue  # the conditional model itself
            beaten = [
                c
                for c in cfg
                if r["acc_judge"] >= c["acc_judge"]
                and r["fd"] <= c["fd"]
                and (r["acc_judge"] > c["acc_judge"] or r["fd"] < c["fd"])
            ]
            if not beaten:
                continue
            c = min(beaten, key=lambda c: c["fd"])  # the hardest CFG point it beats
            rank = (r["acc_judge"], -r["fd"])
            if best is None or rank > best[0]:
                best = (rank, method, r, c)
    if best is None:
        return [(GOAL, False, "no method point dominates a plain-CFG point")]
    gain, method, r, c = best
    text = (
        f"{method} at {r['scale']:g}: judge accuracy {100 * r['acc_judge']:.1f} % at FD "
        f"{r['fd']:.3f} vs CFG {c['scale']:g}: {100 * c['acc_judge']:.1f} % at FD {c['fd']:.3f}"
    )
    return [(GOAL, True, text)]
