"""DPM-OT (Li et al., ICCV 2023): semi-discrete optimal transport from the prior noise to
data noised to a late level of the sampling trajectory, then a short solve.

**The map.** Targets ``y_i = alpha(t_late) x_i + sigma(t_late) eps_i`` (training points
noised to ``t_late`` with fixed seeded noise) with weights ``w_i``; the source is the prior
noise ``mu = N(0, sigma(t_max)^2 I)``. For the cost ``c(x, y) = |x - y|^2 / 2`` the
semi-discrete OT map is ``T(x) = y_{i(x)}``, ``i(x) = argmin_i c(x, y_i) - psi_i`` (power
cells), where the Kantorovich potentials ``psi`` maximise the concave dual

    F(psi) = E_{x ~ mu}[min_i (c(x, y_i) - psi_i)] + sum_i w_i psi_i,
    dF / dpsi_i = w_i - mu(cell_i).

:func:`fit_dpm_ot` ascends ``F`` with Adam on Monte-Carlo batches of the source (cosine
decay; the potentials averaged over the last quarter of the iterations), so at the optimum
every cell carries its target's weight. The map is an :class:`OTMap` (safetensors
``save``/``load``; ``info`` records the measured cell-mass error on fresh samples).

**Sampling.** :func:`dpm_ot_sample` maps fresh noise to its cell's point ``y_i`` and runs
``steps`` steps of a registered solver from ``t_late`` to ``t_min``: ``steps + 1``
evaluations with the final denoise (the assignment is a nearest-point search and costs no
model evaluation). With a class-conditional model, each sample takes its target's label.

**Memorisation.** ``T(x)`` is a training point plus noise of level ``t_late``, so outputs
sit near training data when ``t_late`` is late. :func:`memorisation_table` measures it:
the median nearest-neighbour distance to the training set and the fraction of samples
within a small radius, next to the same figures for held-out data. Two samples in one cell
start from the same point, so with a deterministic solver they are the same image: at most
``N`` distinct outputs (``distinct_fraction``).

**Choosing ``t_late``** (:func:`select_t_late`). The published level is near the end of
sampling, where outputs are copies of training images. :func:`select_t_late` takes the
latest of a list of levels (uniform fractions of the logSNR range) whose samples, on
calibration noise, pass a memorisation guard built from the data alone: their median
nearest-neighbour distance to the data is at least the data's own leave-one-out median
(how far a real image is from the others). It looks at no quality metric.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..process import make_grid
from ..solvers import get_solver, sample

__all__ = [
    "OTMap",
    "fit_dpm_ot",
    "dpm_ot_sample",
    "nn_distances",
    "memorisation_table",
    "format_memorisation_table",
    "MemorisationRow",
    "select_t_late",
    "LEVEL_FRACTIONS",
    "distinct_fraction",
]

#: :func:`select_t_late`'s candidate levels: fractions of the way from ``lambda(t_max)`` to
#: ``lambda(t_min)`` in logSNR, tried latest first
LEVEL_FRACTIONS = (0.8, 0.7, 0.6, 0.5, 0.4, 0.3)

_CHUNK = 1 << 24  # entries of the [batch, N] score matrix per chunk


@dataclass
class OTMap:
    """A semi-discrete OT map from the prior noise at ``t_source`` to ``targets`` at ``t_late``.

    Attributes:
        targets: ``[N, *shape]`` the target points (data noised to ``t_late``).
        psi: ``[N]`` float64 Kantorovich potentials: ``x`` goes to
            ``argmin_i |x - y_i|^2 / 2 - psi_i``.
        weights: ``[N]`` float64 target weights (sum 1).
        t_late: the targets' time; ``t_source``: the source's (the prior, ``t_max``).
        labels: optional ``[N]`` integer conditions of the targets (class labels).
        info: fit record (iterations, wall time, measured cell-mass errors, cost).
    """

    targets: Tensor
    psi: Tensor
    weights: Tensor
    t_late: float
    t_source: float
    labels: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.targets.shape[0]
        if self.psi.shape != (n,) or self.weights.shape != (n,):
            raise ValueError(
                f"psi and weights must be [N] with N={n}; got {tuple(self.psi.shape)} and "
                f"{tuple(self.weights.shape)}"
            )
        if self.labels is not None and self.labels.shape != (n,):
            raise ValueError(f"labels must be [N] with N={n}; got {tuple(self.labels.shape)}")

    @property
    def shape(self) -> tuple[int, ...]:
        """The sample shape (without the batch)."""
        return tuple(self.targets.shape[1:])

    def assign(self, x: Tensor) -> Tensor:
        """The cell index ``[B]`` (long) of each source sample ``x`` ``[B, *shape]``."""
        return _assign(x.reshape(x.shape[0], -1), self._flat_targets(), self._offsets())

    def __call__(self, x: Tensor) -> Tensor:
        """``T(x)``: the target point of each sample's cell."""
        return self.targets[self.assign(x)].to(x.dtype)

    def _flat_targets(self) -> Tensor:
        return self.targets.reshape(self.targets.shape[0], -1).to(torch.float64)

    def _offsets(self) -> Tensor:
        y = self._flat_targets()
        return self.psi.to(torch.float64) - 0.5 * (y * y).sum(1)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the map to ``path`` (``.safetensors``); refuses to overwrite an existing
        file unless ``force``. The round trip is bit-exact."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: an OT map is saved as .safetensors")
        if path.is_dir():
            raise ValueError(f"{path} is a folder; give a file name")
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists; pass force=True to overwrite it")
        tensors = {
            "targets": self.targets.contiguous(),
            "psi": self.psi.contiguous(),
            "weights": self.weights.contiguous(),
        }
        if self.labels is not None:
            tensors["labels"] = self.labels.contiguous()
        meta = {
            "kind": "diffusolve.OTMap",
            "t_late": repr(float(self.t_late)),
            "t_source": repr(float(self.t_source)),
            "info": json.dumps(self.info),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> OTMap:
        """Read a map written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("kind") != "diffusolve.OTMap":
                raise ValueError(f"{path} is not an OT map written by OTMap.save")
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        return cls(
            targets=tensors["targets"],
            psi=tensors["psi"],
            weights=tensors["weights"],
            t_late=float(meta["t_late"]),
            t_source=float(meta["t_source"]),
            labels=tensors.get("labels"),
            info=json.loads(meta.get("info", "{}")),
        )


def _assign(xf: Tensor, y: Tensor, offsets: Tensor) -> Tensor:
    """``argmax_i <x, y_i> + offsets_i`` (= ``argmin_i |x - y_i|^2 / 2 - psi_i``), chunked."""
    xf = xf.to(torch.float64)
    rows = max(1, _CHUNK // max(1, y.shape[0]))
    out = [(xf[i : i + rows] @ y.T + offsets).argmax(1) for i in range(0, xf.shape[0], rows)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def fit_dpm_ot(
    model: Any,
    data: Tensor,
    t_late: float,
    *,
    weights: Tensor | None = None,
    labels: Tensor | None = None,
    noise_targets: bool = True,
    iters: int = 2000,
    batch: int = 4096,
    lr: float | None = None,
    seed: int = 0,
    eval_samples: int | None = None,
    log: Any = None,
) -> OTMap:
    """Fit the semi-discrete OT map from ``model.process``'s prior noise to ``data`` noised
    to ``t_late``.

    Args:
        model: a denoiser (only its ``process`` is used) or a process.
        data: ``[N, *shape]`` the data points (e.g. the training images).
        t_late: the targets' time (the published method uses a level near the end of
            sampling; the solve from there is short).
        weights: ``[N]`` target weights (default uniform).
        labels: ``[N]`` conditions stored with the map (the sampler passes each sample its
            target's label).
        noise_targets: noise the data to ``t_late`` with seeded noise (default); ``False``
            uses ``alpha(t_late) x_i`` (the noise-free images of the points).
        iters, batch: Adam iterations and source samples per iteration.
        lr: Adam's step on ``psi``; default 0.1 of the mean gap between the best and the
            second-best cell cost of the source at ``psi = 0``.
        seed: seeds the targets' noise and the source samples.
        eval_samples: fresh source samples to measure the fitted cells' masses with
            (default ``max(100_000, 50 N)``, capped at 2,000,000); recorded in ``info``.
        log: optional callable receiving a progress line every 250 iterations.
    """
    process = model if hasattr(model, "t_max") and hasattr(model, "alpha") else model.process
    t_late = float(t_late)
    if not (process.t_min <= t_late < process.t_max):
        raise ValueError(
            f"t_late must lie in [t_min, t_max) = [{process.t_min:g}, {process.t_max:g}), "
            f"got {t_late}"
        )
    n = data.shape[0]
    if n < 2:
        raise ValueError("DPM-OT needs at least two data points")
    if weights is None:
        w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    else:
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if w.shape != (n,) or not bool((w > 0).all()):
            raise ValueError(f"weights must be [N] positive with N={n}")
        w = w / w.sum()
    gen = torch.Generator().manual_seed(seed)
    a, s = float(process.alpha(t_late)), float(process.sigma(t_late))
    x0 = data.to(torch.float64)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    targets = a * x0 + (s * eps if noise_targets else 0.0)
    y = targets.reshape(n, -1)
    d = y.shape[1]
    sigma_src = float(process.sigma(process.t_max))
    half_sq = 0.5 * (y * y).sum(1)

    def source(m: int) -> Tensor:
        return sigma_src * torch.randn(m, d, generator=gen, dtype=torch.float64)

    if lr is None:
        scores = source(min(batch, 4096)) @ y.T - half_sq
        top2 = scores.topk(2, dim=1).values
        lr = 0.1 * float((top2[:, 0] - top2[:, 1]).mean())
    psi = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([psi], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters)
    avg, n_avg = torch.zeros(n, dtype=torch.float64), 0
    start = time.perf_counter()
    for i in range(iters):
        with torch.no_grad():
            idx = _assign(source(batch), y, psi - half_sq)
            g = torch.bincount(idx, minlength=n).to(torch.float64) / batch
        psi.grad = g - w  # ascent on F: dF/dpsi = w - g
        opt.step()
        sched.step()
        with torch.no_grad():
            psi -= psi.mean()  # F is invariant to a constant shift
            if i >= iters - max(1, iters // 4):
                avg += psi
                n_avg += 1
        if log is not None and (i + 1) % 250 == 0:
            log(f"iter {i + 1}/{iters}  |g - w|_1 {float((g - w).abs().sum()):.4f}")
    psi_final = (avg / n_avg).detach()
    m = eval_samples if eval_samples is not None else min(2_000_000, max(100_000, 50 * n))
    counts = torch.zeros(n, dtype=torch.float64)
    cost = 0.0
    with torch.no_grad():
        for j in range(0, m, 65536):
            xs = source(min(65536, m - j))
            idx = _assign(xs, y, psi_final - half_sq)
            counts += torch.bincount(idx, minlength=n).to(torch.float64)
            cost += float(((xs - y[idx]) ** 2).sum(1).sum())
    mass = counts / m
    info = {
        "iters": iters,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "noise_targets": noise_targets,
        "wall_s": round(time.perf_counter() - start, 2),
        "eval_samples": m,
        "mass_error_l1": float((mass - w).abs().sum()),
        "mass_error_max_rel": float(((mass - w).abs() / w).max()),
        "empty_cells": int((counts == 0).sum()),
        "transport_cost": cost / m,  # E |x - T(x)|^2
    }
    return OTMap(
        targets=targets.to(data.dtype if data.is_floating_point() else torch.float32),
        psi=psi_final,
        weights=w,
        t_late=t_late,
        t_source=float(process.t_max),
        labels=None if labels is None else torch.as_tensor(labels).to(torch.long).flatten(),
        info=info,
    )


def dpm_ot_sample(
    model: Any,
    ot_map: OTMap,
    x_T: Tensor | int,
    steps: int = 4,
    solver: Any = "dpmpp_2m",
    *,
    noise: Any = None,
    cond: Any = "assigned",
    final: str = "denoise",
    grid_kind: str | None = None,
    stats: dict[str, Any] | None = None,
) -> Tensor:
    """Map prior noise to its OT cell's point and solve from ``t_late`` with ``steps`` steps.

    Args:
        model: the denoiser (its process must have ``ot_map.t_source`` as ``t_max``).
        ot_map: from :func:`fit_dpm_ot` or :meth:`OTMap.load`.
        x_T: prior noise ``[B, *shape]`` at ``t_max``, or a number of samples ``n`` (the
            noise is drawn with ``noise``: an int seed gives per-sample seeds).
        steps: solver steps from ``t_late`` to ``t_min``.
        solver: a registered solver.
        noise: seeds the prior noise when ``x_T`` is an int (and a stochastic solver).
        cond: ``"assigned"`` (default): each sample gets its target's label when the map
            has labels, else ``None``; anything else is passed to the model as is.
        final, grid_kind: as for :func:`diffusolve.sample`.
        stats: filled with ``nfe`` (per sample, counted), ``steps``, ``index`` (the assigned
            target of each sample) and ``t_late``.
    """
    process = model.process
    if abs(float(process.t_max) - ot_map.t_source) > 1e-9 * max(1.0, abs(ot_map.t_source)):
        raise ValueError(
            f"the map's source is at t={ot_map.t_source:g} but the model's t_max is "
            f"{process.t_max:g}; fit the map with this model's process"
        )
    if isinstance(x_T, bool):
        raise TypeError("x_T must be a tensor or a number of samples")
    if isinstance(x_T, int):
        x_T = process.prior_sample((x_T, *ot_map.shape), noise=noise)
    idx = ot_map.assign(x_T)
    y = ot_map.targets[idx].to(device=x_T.device, dtype=x_T.dtype)
    if isinstance(cond, str) and cond == "assigned":
        cond = None if ot_map.labels is None else ot_map.labels[idx]
    solver = get_solver(solver)
    grid = make_grid(
        process, int(steps), grid_kind or solver.natural_grid, t_start=float(ot_map.t_late)
    )
    st: dict[str, Any] = {}
    out = sample(model, y, grid, solver, cond=cond, final=final, noise=noise, stats=st)
    if stats is not None:
        stats.update(nfe=st["nfe"], steps=int(steps), index=idx, t_late=ot_map.t_late)
    return out


def _time_at_fraction(process: Any, frac: float) -> float:
    l0 = float(process.lam(torch.tensor(process.t_max, dtype=torch.float64)))
    l1 = float(process.lam(torch.tensor(process.t_min, dtype=torch.float64)))
    lam = torch.tensor(l0 + float(frac) * (l1 - l0), dtype=torch.float64)
    return float(process.t_of_lambda(lam))


def select_t_late(
    model: Any,
    data: Tensor,
    steps: int,
    *,
    fractions: tuple[float, ...] = LEVEL_FRACTIONS,
    n: int = 512,
    seed: int = 0,
    solver: Any = "dpmpp_2m",
    fit_options: dict[str, Any] | None = None,
    maps: dict[float, OTMap] | None = None,
    log: Any = None,
) -> tuple[OTMap, list[dict[str, Any]]]:
    """The latest level whose DPM-OT samples pass the memorisation guard, and its map.

    For each fraction ``f`` of ``fractions`` (latest first), ``t_late`` is the time at
    logSNR ``lambda(t_max) + f (lambda(t_min) - lambda(t_max))``; the map to ``data`` noised
    there is fitted (:func:`fit_dpm_ot` with ``fit_options``), ``n`` calibration starts
    (seed ``seed``) are sampled with ``steps`` steps of ``solver``, and the level passes
    when their median nearest-neighbour distance to ``data`` is at least the median
    leave-one-out distance within ``data``. The first level that passes is returned; if
    none does, the earliest. Only ``data`` and the model are used: no quality metric, no
    held-out data.

    Args:
        maps: a cache ``{t_late: OTMap}`` shared between calls with the same ``model``,
            ``data`` and ``fit_options`` (filled here; keyed by the level alone).
        log: optional callable receiving one line per level.

    Returns:
        ``(map, rows)``: the chosen map and, per level tried, ``fraction``, ``t_late``,
        ``sigma``, ``median_nn``, ``guard`` (the leave-one-out median), ``passed`` and the
        map's ``fit_seconds``.
    """
    if not fractions or any(not (0.0 < float(f) < 1.0) for f in fractions):
        raise ValueError(f"fractions must be a non-empty list in (0, 1), got {fractions}")
    if n < 2:
        raise ValueError(f"n must be at least 2, got {n}")
    process = model.process
    guard = float(nn_distances(data, data, exclude_self=True).median())
    maps = {} if maps is None else maps
    rows: list[dict[str, Any]] = []
    order = sorted((float(f) for f in fractions), reverse=True)
    chosen = None
    for f in order:
        t = _time_at_fraction(process, f)
        key = round(t, 12)
        if key not in maps:
            maps[key] = fit_dpm_ot(model, data, t, **(fit_options or {}))
        m = maps[key]
        x = process.prior_sample((n, *m.shape), torch.Generator().manual_seed(seed))
        with torch.no_grad():
            out = dpm_ot_sample(model, m, x, steps=steps, solver=solver, noise=seed)
        med = float(nn_distances(out, data).median())
        row = {
            "fraction": f,
            "t_late": t,
            "sigma": float(process.sigma(torch.tensor(t, dtype=torch.float64))),
            "median_nn": med,
            "guard": guard,
            "passed": med >= guard,
            "fit_seconds": m.info.get("wall_s"),
        }
        rows.append(row)
        if log is not None:
            log(
                f"t_late {t:.4g} (logSNR fraction {f:g}): median NN {med:.3f} vs guard "
                f"{guard:.3f}: {'pass' if row['passed'] else 'fail'}"
            )
        chosen = m
        if row["passed"]:
            break
    assert chosen is not None
    return chosen, rows


def distinct_fraction(index: Tensor) -> float:
    """Distinct DPM-OT targets (``stats["index"]``) over samples: the share of distinct
    outputs of a deterministic solve (samples in one cell give the same image)."""
    return float(torch.unique(index).numel() / max(1, index.numel()))


# ---------------------------------------------------------------------------- memorisation
class MemorisationRow(NamedTuple):
    """One row of :func:`memorisation_table`."""

    method: str
    median_nn_train: float
    frac_within_radius: float
    n: int
    radius: float


def nn_distances(samples: Tensor, reference: Tensor, *, exclude_self: bool = False) -> Tensor:
    """The Euclidean distance ``[N]`` (float64) from each sample to its nearest neighbour in
    ``reference`` (both flattened per sample)."""
    a = samples.reshape(samples.shape[0], -1).to(torch.float64)
    b = reference.reshape(reference.shape[0], -1).to(torch.float64)
    out = []
    bb = (b * b).sum(1)
    for i in range(0, a.shape[0], 1024):
        ai = a[i : i + 1024]
        d2 = (ai * ai).sum(1, keepdim=True) - 2 * ai @ b.T + bb
        if exclude_self:
            d2 = torch.where(d2 <= 1e-18, torch.full_like(d2, math.inf), d2)
        out.append(d2.min(1).values.clamp_min(0).sqrt())
    return torch.cat(out)


def memorisation_table(
    samples_by_method: dict[str, Tensor],
    train: Tensor,
    heldout: Tensor,
    *,
    radius: float | None = None,
) -> list[MemorisationRow]:
    """Rows ``(method, median NN distance to train, fraction within radius, n, radius)``,
    first for ``"heldout"`` (the held-out data against the training set: what samples that
    do not copy training points look like), then for each method.

    ``radius`` defaults to a third of the held-out median NN distance: a sample closer than
    that to a training point is much closer than real unseen data ever is.

    Example:
        >>> import torch
        >>> train, held = torch.randn(50, 4), torch.randn(20, 4)
        >>> rows = memorisation_table({"copies": train[:10] + 1e-3}, train, held)
        >>> rows[1].method, rows[1].frac_within_radius
        ('copies', 1.0)
    """
    d_held = nn_distances(heldout, train)
    r = float(d_held.median()) / 3.0 if radius is None else float(radius)
    rows = [
        MemorisationRow(
            "heldout", float(d_held.median()), float((d_held < r).float().mean()), len(d_held), r
        )
    ]
    for name, xs in samples_by_method.items():
        d = nn_distances(xs, train)
        rows.append(
            MemorisationRow(name, float(d.median()), float((d < r).float().mean()), len(d), r)
        )
    return rows


def format_memorisation_table(rows: list[MemorisationRow]) -> str:
    """A Markdown table of :func:`memorisation_table`'s rows."""
    lines = [
        f"| method | n | median NN distance to train | fraction within {rows[0].radius:.3g} |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r.method} | {r.n} | {r.median_nn_train:.3f} | {r.frac_within_radius:.3f} |"
        for r in rows
    ]
    return "\n".join(lines)
