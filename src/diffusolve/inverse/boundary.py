"""Optimal boundary conditions for restoration ODEs (Ma, Yang, Yang, Fu & Liu, ICLR 2024).

A deterministic restoration sampler is a map ``x_hat = h(x_T, y)`` from a starting state
``x_T`` and a measurement ``y``. Its quality depends on ``x_T``, and the paper observes that
a good ``x_T`` is nearly independent of ``y``: so draw many candidate starting states, score
each on a small reference set of (image, measurement) pairs by the mean distance of
``h(x_T, y_i)`` to ``x_i``, keep the best, and reuse that one fixed ``x_T`` for every new
measurement, with the same sampler and steps.

- :func:`search_boundary` runs the search and returns a :class:`Boundary` (the chosen
  ``x_T`` with the sampler, steps, process and the scores), which saves and loads as
  safetensors (refusing to overwrite without ``force``).
- :func:`restore_with_boundary` restores new measurements from it.
- :func:`evaluate_boundary` measures it on held-out pairs against the standard use (an
  independent prior sample per image) and against shared random starting states, so the
  gain is reported on images the search never saw.

The sampler must be deterministic given ``x_T`` (e.g. ``ddnm`` or ``pigdm`` with
``eta=0``, ``ddrm`` with ``eta=0`` on noiseless measurements is not: its observed
coordinates add noise); :func:`search_boundary` checks this by running one candidate under
two noise seeds and refuses a sampler whose output changes. The distance is the mean
squared error by default (the paper uses LPIPS, which needs a network this project does not
ship) or any callable ``metric(x_hat, x) -> [N]``.

Example:
    >>> import torch
    >>> from diffusolve.inverse import Inpainting
    >>> from diffusolve.models import Gaussian
    >>> from diffusolve.process import ddpm
    >>> prior = Gaussian(torch.zeros(4), torch.diag(torch.tensor([1.0, 0.5, 1.0, 0.2])),
    ...                  process=ddpm())
    >>> op = Inpainting(torch.tensor([1.0, 0.0, 1.0, 0.0]), (4,))
    >>> x_ref = prior.sample(16, torch.Generator().manual_seed(0))
    >>> b = search_boundary(prior, op, x_ref, method="ddnm", options={"eta": 0.0},
    ...                     steps=5, candidates=8, seed=1, progress=False)
    >>> b.x_T.shape, b.candidates, b.score <= min(b.scores)
    (torch.Size([4]), 8, True)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .base import Operator
from .samplers import get_sampler
from .samplers.base import PosteriorSampler

__all__ = ["Boundary", "search_boundary", "restore_with_boundary", "evaluate_boundary"]

Metric = Callable[[Tensor, Tensor], Tensor]


def mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """Per-sample mean squared error ``[N]``."""
    return (x_hat - x).flatten(1).pow(2).mean(1)


def _metric(metric: str | Metric) -> tuple[str, Metric]:
    if callable(metric):
        return getattr(metric, "__name__", "custom"), metric
    if metric == "mse":
        return "mse", mse
    raise ValueError(f"metric must be 'mse' or a callable (x_hat, x) -> [N]; got {metric!r}")


def _process_name(model: Any) -> str:
    return str(getattr(model.process, "name", type(model.process).__name__))


@dataclass(frozen=True)
class Boundary:
    """A searched starting state ``x_T`` for a deterministic restoration sampler.

    Attributes:
        x_T: the starting state (one sample's shape, no batch dimension).
        method: the posterior sampler's registry name; ``options`` its options.
        steps: the sampler's steps (``x_T`` is for this grid).
        process: the name of the model's process it was searched on.
        metric: the distance's name.
        score: the reference-set loss of the chosen ``x_T``.
        scores: every candidate's reference-set loss (in draw order).
        candidates: how many candidates were drawn; ``reference``: reference-set size.
        seed: the seed of the candidates.
    """

    x_T: Tensor
    method: str
    options: dict[str, Any]
    steps: int
    process: str
    metric: str
    score: float
    scores: tuple[float, ...] = field(default=())
    candidates: int = 0
    reference: int = 0
    seed: int = 0

    def sampler(self) -> PosteriorSampler:
        """The posterior sampler it was searched for."""
        return get_sampler(self.method, **self.options)

    def start(self, n: int) -> Tensor:
        """``x_T`` repeated for ``n`` measurements ``[n, *shape]``."""
        return self.x_T.unsqueeze(0).expand(n, *self.x_T.shape).clone()

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write safetensors (``x_T`` and the settings as metadata); refuses to overwrite an
        existing file unless ``force``."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists; pass force=True to overwrite it")
        meta = {
            "format": "diffusolve-boundary",
            "method": self.method,
            "options": json.dumps(self.options),
            "steps": str(self.steps),
            "process": self.process,
            "metric": self.metric,
            "score": repr(self.score),
            "scores": json.dumps(list(self.scores)),
            "candidates": str(self.candidates),
            "reference": str(self.reference),
            "seed": str(self.seed),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"x_T": self.x_T.contiguous()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Boundary:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no boundary file at {path}")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "diffusolve-boundary":
                raise ValueError(f"{path} is not a boundary file written by Boundary.save")
            x_T = f.get_tensor("x_T")
        return cls(
            x_T=x_T,
            method=meta["method"],
            options=json.loads(meta["options"]),
            steps=int(meta["steps"]),
            process=meta["process"],
            metric=meta["metric"],
            score=float(meta["score"]),
            scores=tuple(json.loads(meta["scores"])),
            candidates=int(meta["candidates"]),
            reference=int(meta["reference"]),
            seed=int(meta["seed"]),
        )


def _run(
    sampler: PosteriorSampler,
    model: Any,
    operator: Operator,
    y: Tensor,
    sigma_y: float,
    steps: int,
    x_T: Tensor,
    cond: Any,
    noise: int = 0,
) -> Tensor:
    with torch.no_grad():
        return sampler.run(
            model, operator, y, sigma_y, steps=steps, x=x_T, cond=cond, noise=noise, progress=False
        )


def _bar(progress: bool | None, total: int, desc: str) -> Any:
    import sys

    show = sys.stderr.isatty() if progress is None else bool(progress)
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="cand", leave=False)


def _repeat_cond(cond: Any, times: int) -> Any:
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond.repeat(times, *([1] * (cond.dim() - 1))) if cond.dim() else cond
    if isinstance(cond, (list, tuple)):
        return list(cond) * times
    raise TypeError(
        "cond must be None, a tensor or a list with one entry per reference image; got "
        f"{type(cond).__name__}"
    )


def search_boundary(
    model: Any,
    operator: Operator,
    x_ref: Tensor,
    sigma_y: float = 0.0,
    *,
    method: str = "ddnm",
    options: dict[str, Any] | None = None,
    steps: int = 10,
    candidates: int = 64,
    seed: int = 0,
    cond: Any = None,
    metric: str | Metric = "mse",
    batch: int = 256,
    progress: bool | None = None,
) -> Boundary:
    """Search the starting state of a deterministic restoration sampler (see the module doc).

    Args:
        model: a denoiser carrying its process.
        operator: the forward operator of the task.
        x_ref: ``[R, *shape]`` reference images (the measurements are ``A x_ref`` plus
            Gaussian noise of std ``sigma_y`` drawn from ``seed``).
        method, options: the posterior sampler and its options (default ``ddnm`` with
            ``eta = 0``, deterministic given ``x_T``).
        steps: the sampler's steps.
        candidates: starting states drawn (prior samples at the sampler's first time from a
            generator seeded with ``seed + 1``; ``seed`` draws the measurement noise).
        cond: the model's condition for the reference images (one entry per image).
        metric: ``"mse"`` or a callable ``(x_hat, x) -> [N]`` per-sample distance.
        batch: most images per sampler run (candidates are evaluated several at a time).

    Returns:
        The :class:`Boundary` with the smallest mean reference loss.
    """
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates must be a positive int; got {candidates!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    if not isinstance(x_ref, Tensor) or x_ref.dim() < 2 or x_ref.shape[0] < 1:
        raise ValueError("x_ref must be a [R, *shape] tensor of reference images, R >= 1")
    if tuple(x_ref.shape[1:]) != tuple(operator.in_shape):
        raise ValueError(
            f"the reference images have shape {tuple(x_ref.shape[1:])}, the operator takes "
            f"{tuple(operator.in_shape)}"
        )
    name, dist = _metric(metric)
    options = {"eta": 0.0} if options is None and method in ("ddnm", "pigdm") else options
    sampler = get_sampler(method, **(options or {}))
    sampler.check(operator)
    r = x_ref.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    y_ref = operator(x_ref)
    if sigma_y:
        y_ref = y_ref + float(sigma_y) * torch.randn(y_ref.shape, generator=gen).to(y_ref)
    shape = tuple(x_ref.shape[1:])
    starts = _starting_states(sampler, model, operator, sigma_y, steps, seed + 1, candidates)
    starts = starts.to(x_ref)
    # the sampler must not use noise after its start
    a = _run(sampler, model, operator, y_ref[:1], sigma_y, steps, starts[:1], _first(cond), 1)
    b = _run(sampler, model, operator, y_ref[:1], sigma_y, steps, starts[:1], _first(cond), 2)
    if not torch.equal(a, b):
        raise ValueError(
            f"{method} with options {sampler.options()} is stochastic given its starting "
            "state (two noise seeds gave different restorations); optimal boundary "
            "conditions need a deterministic restoration sampler, e.g. method='ddnm' or "
            "'pigdm' with options={'eta': 0.0}"
        )
    per = max(1, int(batch) // r)
    scores: list[float] = []
    bar = _bar(progress, candidates, "boundary search")
    try:
        for j0 in range(0, candidates, per):
            k = min(per, candidates - j0)
            xs = starts[j0 : j0 + k].repeat_interleave(r, dim=0)
            ys = y_ref.repeat(k, *([1] * (y_ref.dim() - 1)))
            out = _run(sampler, model, operator, ys, sigma_y, steps, xs, _repeat_cond(cond, k))
            loss = dist(out, x_ref.repeat(k, *([1] * len(shape))).to(out))
            scores += [float(v) for v in loss.view(k, r).mean(1)]
            if bar is not None:
                bar.update(k)
    finally:
        if bar is not None:
            bar.close()
    finite = [s if math.isfinite(s) else math.inf for s in scores]
    best = min(range(candidates), key=finite.__getitem__)
    if not math.isfinite(finite[best]):
        raise RuntimeError("every candidate gave a non-finite restoration")
    return Boundary(
        x_T=starts[best].clone(),
        method=sampler.name,
        options=sampler.options(),
        steps=steps,
        process=_process_name(model),
        metric=name,
        score=finite[best],
        scores=tuple(scores),
        candidates=candidates,
        reference=r,
        seed=int(seed),
    )


def _first(cond: Any) -> Any:
    if cond is None:
        return None
    return cond[:1] if isinstance(cond, (Tensor, list, tuple)) and len(cond) else cond


def _starting_states(
    sampler: PosteriorSampler,
    model: Any,
    operator: Operator,
    sigma_y: float,
    steps: int,
    seed: int,
    n: int,
) -> Tensor:
    """``n`` prior draws at the sampler's first time (``sqrt(alpha^2 + sigma^2) eps``, as
    the samplers start), from a generator seeded with ``seed``."""
    process = model.process
    t0 = sampler.times(process, steps, operator, torch.as_tensor(float(sigma_y)))[0]
    t0 = torch.as_tensor(t0, dtype=torch.float64)
    a, s = float(process.alpha(t0)), float(process.sigma(t0))
    gen = torch.Generator().manual_seed(int(seed))
    eps = torch.randn((n, *operator.in_shape), generator=gen)
    return math.sqrt(a * a + s * s) * eps


def restore_with_boundary(
    model: Any,
    operator: Operator,
    y: Tensor,
    boundary: Boundary,
    sigma_y: float = 0.0,
    *,
    cond: Any = None,
) -> Tensor:
    """Restore measurements ``y`` ``[N, *out_shape]`` from the boundary's fixed ``x_T``
    with its sampler and steps; refuses a model on another process."""
    if _process_name(model) != boundary.process:
        raise ValueError(
            f"the boundary was searched on process {boundary.process!r}; the model's is "
            f"{_process_name(model)!r}"
        )
    if tuple(boundary.x_T.shape) != tuple(operator.in_shape):
        raise ValueError(
            f"the boundary's x_T has shape {tuple(boundary.x_T.shape)}, the operator takes "
            f"{tuple(operator.in_shape)}"
        )
    x_T = boundary.start(y.shape[0]).to(device=y.device)
    return _run(boundary.sampler(), model, operator, y, sigma_y, boundary.steps, x_T, cond)


def evaluate_boundary(
    model: Any,
    operator: Operator,
    x: Tensor,
    boundary: Boundary,
    sigma_y: float = 0.0,
    *,
    cond: Any = None,
    shared_random: int = 8,
    seed: int = 10_000,
    metric: str | Metric = "mse",
) -> dict[str, float]:
    """Held-out comparison (images the search never saw) at the boundary's sampler/steps.

    Returns the mean distance for ``"boundary"`` (the searched ``x_T`` for every image),
    ``"independent"`` (the standard use: a prior sample per image, seeds ``seed + i``) and
    ``"shared_random"`` (the mean over ``shared_random`` random shared starting states: what
    the search selects among), each with its PSNR in dB for images in [-1, 1]
    (``psnr_*``; from the mean squared error when ``metric`` is ``"mse"``).
    """
    _, dist = _metric(metric)
    gen = torch.Generator().manual_seed(int(seed) - 1)
    y = operator(x)
    if sigma_y:
        y = y + float(sigma_y) * torch.randn(y.shape, generator=gen).to(y)
    sampler = boundary.sampler()
    n = x.shape[0]
    out = restore_with_boundary(model, operator, y, boundary, sigma_y, cond=cond)
    res = {"boundary": float(dist(out, x.to(out)).mean())}
    with torch.no_grad():
        ind = sampler.run(
            model,
            operator,
            y,
            sigma_y,
            steps=boundary.steps,
            noise=int(seed),
            cond=cond,
            progress=False,
        )
    res["independent"] = float(dist(ind, x.to(ind)).mean())
    starts = _starting_states(
        sampler, model, operator, sigma_y, boundary.steps, int(seed) + 1, shared_random
    ).to(x)
    shared = []
    for j in range(shared_random):
        xs = starts[j].unsqueeze(0).expand(n, *starts.shape[1:]).clone()
        o = _run(sampler, model, operator, y, sigma_y, boundary.steps, xs, cond)
        shared.append(float(dist(o, x.to(o)).mean()))
    res["shared_random"] = sum(shared) / len(shared)
    if metric == "mse":
        for k in ("boundary", "independent", "shared_random"):
            res[f"psnr_{k}"] = 10 * math.log10(4.0 / res[k]) if res[k] > 0 else math.inf
    return res
