"""Denoising Langevin Gibbs (DLG), the Denoising MCMC sampler of Kim & Ye (ICML 2023).

The chain lives on the product space of data ``x`` and a discrete noise level ``k`` (times
``levels[0] < ... < levels[K-1] = t_max``, uniform in lambda). Its target is
``p(x, k) = pi(k) p_{t_k}(x)`` with ``pi`` uniform, so ``x`` given ``k`` is a noised data
sample and ``k`` given ``x`` is the posterior of the noise level. One sweep:

1. ``langevin_steps`` Langevin steps on ``x`` at the current level, with the score from the
   denoiser, ``s = (alpha x0_hat - x) / sigma^2``, and step ``eps = eta sigma^2``:
   ``x <- x + (eta / 2) (alpha x0_hat - x) + sqrt(eta) sigma z`` (one model evaluation each);
2. a Gibbs update of the level, ``k ~ p(k | x)`` (``gibbs="sample"``), or its mode
   (``gibbs="map"``, the published demo's choice), from a noise-level estimator: the exact
   posterior for an analytic prior (:class:`ExactNoisePosterior`, from the prior's
   ``log_prob``), or a small trained classifier (:class:`NoiseLevelNet`, trained by
   :func:`train_noise_estimator`; the bundled one for ``digits`` is
   :func:`load_noise_estimator`).

After the sweeps each sample is integrated from its level to ``t_min`` by a registered
solver (``diffusolve.sample`` on a grid starting at that level; samples are grouped by
level). By default the chain's last state is integrated (``select="last"``): it is a draw
of the chain's target, the exact choice at stationarity. ``select="min"`` integrates the
state with the lowest level seen over the sweeps, as published; it favours states that
look clean and is biased: on a 2-D mixture its sliced Wasserstein distance to exact
samples was 0.24 against 0.11 for ``"last"`` (exact-vs-exact floor 0.14), and on
``digits`` at NFE 10 its FD-digits was 0.52 against 0.28 (n = 1000).

**NFE.** Every sample costs ``sweeps * langevin_steps`` Langevin evaluations plus the solve's
evaluations (its steps and the final denoise): ``stats["nfe"]`` is that count (measured).
The noise-level estimator is not the diffusion model and is not counted (the exact
posterior evaluates the prior's density; the trained estimator is a 26k-parameter CNN).

**Chains.** The published sampler keeps its chains running across batches, so their burn-in
is paid once. ``stats["chain"]`` is the final :class:`Chain` (state and level per sample);
pass it back as ``chain=`` to continue: the evaluations of the earlier call are then not
part of this call's ``stats["nfe"]``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..process import Process, as_time, make_grid
from ..solvers import get_solver, sample, steps_for_nfe
from ..solvers.noise import as_noise_source

__all__ = [
    "Chain",
    "ExactNoisePosterior",
    "NoiseLevelNet",
    "default_levels",
    "dmcmc_sample",
    "train_noise_estimator",
    "save_noise_estimator",
    "load_noise_estimator",
    "noise_estimator_accuracy",
    "ESTIMATOR_FILE",
    "ESTIMATOR_CONFIG",
]

ESTIMATOR_FILE = "noise_estimator.safetensors"
ESTIMATOR_CONFIG = "noise_estimator_config.json"
#: the packaged estimators: model name -> folder under ``diffusolve/assets``
_BUNDLED = {"digits": "digits-noise-level"}


def default_levels(process: Process, n_levels: int = 40) -> Tensor:
    """``n_levels`` increasing times, uniform in lambda, from one step above ``t_min`` (the
    lambda interval cut in ``n_levels`` parts) up to ``t_max`` (float64)."""
    if n_levels < 2:
        raise ValueError(f"n_levels must be at least 2, got {n_levels}")
    l_hi, l_lo = float(process.lam(process.t_max)), float(process.lam(process.t_min))
    u = torch.arange(n_levels, dtype=torch.float64) / n_levels  # 0 .. 1 - 1/K
    lam = l_hi + (l_lo - l_hi) * u  # lam[0] at t_max
    t = process.t_of_lambda(lam).flip(0)
    t[-1] = process.t_max
    return t


@dataclass(frozen=True)
class Chain:
    """The state of DLG chains: samples ``x`` at level indices ``level`` ``[B]`` (long)."""

    x: Tensor
    level: Tensor


# ---------------------------------------------------------------------------- estimators
class ExactNoisePosterior:
    """The exact posterior of the noise level ``p(k | x) ∝ p_{t_k}(x)`` (uniform prior over
    ``levels``) of an analytic prior with ``log_prob(x, t)`` (``GaussianMixture``,
    ``Gaussian``, ``Empirical``). ``__call__(x)`` returns ``[B, K]`` log-probabilities.

    Example:
        >>> import torch
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import vp_linear
        >>> prior = Gaussian(torch.zeros(2), torch.full((2,), 0.01), process=vp_linear())
        >>> post = ExactNoisePosterior(prior, n_levels=8)
        >>> post(torch.zeros(3, 2)).exp().sum(1)  # normalised
        tensor([1., 1., 1.], dtype=torch.float64)
    """

    def __init__(self, prior: Any, levels: Tensor | None = None, n_levels: int = 40) -> None:
        if not callable(getattr(prior, "log_prob", None)):
            raise TypeError(
                f"{type(prior).__name__} has no log_prob(x, t); the exact noise posterior needs "
                "an analytic prior (GaussianMixture, Gaussian, Empirical). For a network, pass a "
                "trained estimator (train_noise_estimator / load_noise_estimator)."
            )
        self.prior = prior
        self.levels = default_levels(prior.process, n_levels) if levels is None else as_time(levels)

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        logp = torch.stack([self.prior.log_prob(x, t) for t in self.levels.unbind()], dim=1)
        return torch.log_softmax(logp.to(torch.float64), dim=1)


class NoiseLevelNet(nn.Module):
    """A small CNN classifying the noise level of ``x_t`` among ``levels`` (``[K]`` times).

    Three 3x3 convolutions (``width``, ``2 width``, ``4 width`` channels; the last two with
    stride 2) with SiLU, global average pooling, two fixed cues (the log mean square of the
    input, and of its discrete Laplacian, the high-frequency power that carries the noise
    level when the noise is weak), then a linear layer to ``K`` logits.
    Trained with levels drawn uniformly, its softmax estimates ``p(k | x)`` under the
    uniform prior of the DLG target. ``__call__(x)`` returns ``[B, K]`` log-probabilities
    (float64); :meth:`logits` the raw output.
    """

    def __init__(self, levels: Tensor, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        levels = as_time(levels).flatten()
        self.register_buffer("levels", levels.clone())
        self.in_channels, self.width = int(in_channels), int(width)
        w = self.width
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        self.head = nn.Linear(4 * w + 2, levels.numel())
        lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("laplacian", lap.expand(in_channels, 1, 3, 3).clone(), False)

    def logits(self, x: Tensor) -> Tensor:
        x = x.to(self.head.weight.dtype)
        power = torch.log(x.pow(2).mean(dim=(1, 2, 3)) + 1e-8)
        high = nn.functional.conv2d(x, self.laplacian, groups=self.in_channels)
        high_power = torch.log(high.pow(2).mean(dim=(1, 2, 3)) + 1e-8)
        h = self.convs(x).mean(dim=(2, 3))
        return self.head(torch.cat([h, power[:, None], high_power[:, None]], dim=1))

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        with torch.no_grad():
            return torch.log_softmax(self.logits(x).to(torch.float64), dim=1)

    def config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "width": self.width, "n_levels": len(self.levels)}


def train_noise_estimator(
    model_or_data: Any,
    data: Tensor | None = None,
    *,
    process: Process | None = None,
    levels: Tensor | None = None,
    n_levels: int = 40,
    width: int = 16,
    steps: int = 2500,
    batch: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    shifts: int = 1,
    log: Any = None,
) -> NoiseLevelNet:
    """Train a :class:`NoiseLevelNet` on ``data`` noised with the process at levels drawn
    uniformly from ``levels`` (cross-entropy; AdamW with cosine decay; random shifts of up
    to ``shifts`` pixels).

    Args:
        model_or_data: a denoiser (its ``process`` is used; ``data`` defaults to the digits
            train split when the model's samples are 1x16x16) or a data tensor
            ``[N, C, H, W]`` (then ``process=`` is required).
        data: the training images ``[N, C, H, W]``.
        levels: the ``[K]`` increasing times; default :func:`default_levels`.
        log: optional callable receiving a progress line every 250 steps.

    Deterministic for a seed (and thread count). Returns the network in eval mode with
    ``train_info`` (steps, wall time, final loss) attached.
    """
    if isinstance(model_or_data, Tensor):
        if data is not None:
            raise ValueError("give the data once (as the first argument or as data=)")
        data = model_or_data
        if process is None:
            raise ValueError("with a data tensor, pass process= (the noise process)")
    else:
        process = model_or_data.process if process is None else process
        if data is None:
            from ..models.data import load_digits

            data = load_digits("train")[0]
    if data.ndim != 4:
        raise ValueError(f"data must be images [N, C, H, W], got {tuple(data.shape)}")
    levels = default_levels(process, n_levels) if levels is None else as_time(levels)
    k = levels.numel()
    alpha = process.alpha(levels).to(torch.float32)
    sigma = process.sigma(levels).to(torch.float32)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = NoiseLevelNet(levels, in_channels=data.shape[1], width=width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    data = data.to(torch.float32)
    start, losses = time.perf_counter(), []
    net.train()
    for i in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        x0 = data[idx]
        if shifts:
            dx, dy = torch.randint(-shifts, shifts + 1, (2,), generator=gen).tolist()
            x0 = torch.roll(x0, shifts=(dy, dx), dims=(2, 3))
        lab = torch.randint(0, k, (batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        xt = alpha[lab, None, None, None] * x0 + sigma[lab, None, None, None] * eps
        loss = nn.functional.cross_entropy(net.logits(xt), lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log is not None and (i + 1) % 250 == 0:
            log(f"step {i + 1}/{steps}  loss {sum(losses[-250:]) / 250:.4f}")
    net.eval().requires_grad_(False)
    net.train_info = {
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "wall_s": round(time.perf_counter() - start, 1),
        "final_loss": round(sum(losses[-100:]) / min(100, len(losses)), 4),
    }
    return net


def noise_estimator_accuracy(
    net: NoiseLevelNet, data: Tensor, process: Process, *, repeats: int = 4, seed: int = 1
) -> dict[str, float]:
    """Held-out accuracy of ``net`` on ``data`` noised at every level ``repeats`` times:
    top-1, within one level, mean absolute level error, mean log-likelihood of the true
    level, and the mean absolute error in lambda of the posterior mean level."""
    levels = net.levels
    k = levels.numel()
    alpha = process.alpha(levels).to(torch.float32)
    sigma = process.sigma(levels).to(torch.float32)
    lam = process.lam(levels)
    gen = torch.Generator().manual_seed(seed)
    hits = near = err = ll = dlam = 0.0
    count = 0
    for _ in range(repeats):
        for j in range(k):
            eps = torch.randn(data.shape, generator=gen)
            xt = alpha[j] * data.float() + sigma[j] * eps
            logp = net(xt)
            pred = logp.argmax(1)
            hits += float((pred == j).sum())
            near += float(((pred - j).abs() <= 1).sum())
            err += float((pred - j).abs().float().sum())
            ll += float(logp[:, j].sum())
            lam_mean = (logp.exp() * lam).sum(1)
            dlam += float((lam_mean - lam[j]).abs().sum())
            count += len(data)
    return {
        "top1": hits / count,
        "within_one_level": near / count,
        "mean_abs_level_error": err / count,
        "mean_log_likelihood": ll / count,
        "mean_abs_lambda_error": dlam / count,
    }


def save_noise_estimator(net: NoiseLevelNet, folder: str | Path, *, force: bool = False) -> Path:
    """Write ``net`` to ``folder`` (safetensors weights and a JSON config); refuses to
    overwrite existing files unless ``force``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    weights, config = folder / ESTIMATOR_FILE, folder / ESTIMATOR_CONFIG
    for path in (weights, config):
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists; pass force=True to overwrite it")
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous() for name, t in net.state_dict().items()}
    save_file(state, str(weights))
    info = {"config": net.config(), "train_info": getattr(net, "train_info", None)}
    config.write_text(json.dumps(info, indent=2) + "\n")
    return folder


def load_noise_estimator(name: str | Path = "digits") -> NoiseLevelNet:
    """A saved :class:`NoiseLevelNet`: a bundled name (``"digits"``) or a folder written by
    :func:`save_noise_estimator`. Eval mode, parameters frozen."""
    from safetensors.torch import load_file

    if isinstance(name, str) and name in _BUNDLED:
        folder = Path(__file__).resolve().parent.parent / "assets" / _BUNDLED[name]
    else:
        folder = Path(name)
    if not (folder / ESTIMATOR_FILE).is_file():
        raise FileNotFoundError(
            f"no noise-level estimator in {folder} (expected {ESTIMATOR_FILE}); bundled: "
            f"{sorted(_BUNDLED)}"
        )
    cfg = json.loads((folder / ESTIMATOR_CONFIG).read_text())["config"]
    state = load_file(str(folder / ESTIMATOR_FILE))
    net = NoiseLevelNet(state["levels"], in_channels=cfg["in_channels"], width=cfg["width"])
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


# ---------------------------------------------------------------------------- sampler
def _subset(cond: Any, idx: Tensor, batch: int) -> Any:
    """``cond`` restricted to the samples ``idx`` when it is per sample."""
    if isinstance(cond, Tensor) and cond.ndim >= 1 and cond.shape[0] == batch and batch > 1:
        return cond[idx]
    if isinstance(cond, (list, tuple)) and len(cond) == batch and batch > 1:
        return [cond[i] for i in idx.tolist()]
    return cond


def _seeds(noise: Any, batch: int) -> Sequence[int] | None:
    if isinstance(noise, bool):
        raise TypeError("noise must be an int seed, a list of seeds or a generator")
    if isinstance(noise, int):
        return list(range(noise, noise + batch))
    if isinstance(noise, Sequence):
        return [int(s) for s in noise]
    return None


def dmcmc_sample(
    model: Any,
    x_T: Tensor | None = None,
    nfe: int = 10,
    langevin_steps: int = 2,
    solver: Any = "dpmpp_2m",
    estimator: Any = None,
    noise: Any = None,
    *,
    cond: Any = None,
    sweeps: int | None = None,
    eta: float = 0.5,
    gibbs: str = "sample",
    select: str = "last",
    chain: Chain | None = None,
    final: str = "denoise",
    grid_kind: str | None = None,
    stats: dict[str, Any] | None = None,
) -> Tensor:
    """Denoising Langevin Gibbs, then a solve with ``solver`` from the level reached.

    Args:
        model: a denoiser ``model(x, t, cond) -> x0`` (per-sample ``t`` ``[B]`` is used).
        x_T: the chains' start at ``t_max`` (e.g. ``model.process.prior_sample(shape)``);
            not needed when ``chain`` is given.
        nfe: model evaluations per sample, Langevin and solve together.
        langevin_steps: Langevin steps per sweep (each one evaluation).
        solver: a registered solver (name or object) for the final solve.
        estimator: ``estimator(x) -> [B, K]`` log ``p(k | x)`` with ``estimator.levels``
            (``[K]`` increasing times). Default: :class:`ExactNoisePosterior` for a prior
            with ``log_prob``; otherwise pass one (e.g. ``load_noise_estimator("digits")``).
        noise: an int seed (per-sample seeds ``seed + i``: a sample's result does not depend
            on its batch), a list of seeds, a ``torch.Generator`` or ``None``.
        cond: passed to every model call (per-sample conditions are split by level).
        sweeps: Langevin-Gibbs sweeps; default ``max(1, nfe // (2 * langevin_steps))``
            (about half the budget for the chain, the rest for the solve).
        eta: the Langevin step relative to the level's variance, ``eps = eta sigma_k^2``.
        gibbs: ``"sample"`` (draw ``k ~ p(k | x)``) or ``"map"`` (its mode).
        select: ``"last"`` (the last state, default) or ``"min"`` (the state with the lowest
            level over the sweeps, the published choice; biased, see the module docstring).
        chain: a :class:`Chain` to continue (from ``stats["chain"]`` of an earlier call).
        final: the solve's final policy (see :func:`diffusolve.sample`).
        grid_kind: the solve's grid kind (default the solver's natural grid).
        stats: filled with ``nfe`` (per sample, counted), ``langevin_nfe``, ``solve_nfe``,
            ``sweeps``, ``solve_steps``, ``t_start`` (``[B]`` the solve's start times),
            ``level_counts`` and ``chain``.

    Example:
        >>> import torch
        >>> from diffusolve.models import GaussianMixture
        >>> from diffusolve.process import vp_linear
        >>> gmm = GaussianMixture(torch.tensor([0.5, 0.5]), torch.tensor([[-1.0, 0], [1, 0]]),
        ...                       torch.tensor([0.05, 0.05]), process=vp_linear())
        >>> xT = gmm.process.prior_sample((8, 2), noise=0)
        >>> st = {}
        >>> dmcmc_sample(gmm, xT, nfe=10, noise=0, stats=st).shape, st["nfe"]
        (torch.Size([8, 2]), 10)
    """
    process = model.process
    solver = get_solver(solver)
    if gibbs not in ("sample", "map"):
        raise ValueError(f"gibbs must be 'sample' or 'map', got {gibbs!r}")
    if select not in ("min", "last"):
        raise ValueError(f"select must be 'min' or 'last', got {select!r}")
    if not (eta > 0):
        raise ValueError(f"eta must be positive, got {eta}")
    if isinstance(langevin_steps, bool) or int(langevin_steps) < 1:
        raise ValueError(f"langevin_steps must be a positive integer, got {langevin_steps!r}")
    langevin_steps = int(langevin_steps)
    if sweeps is None:
        sweeps = max(1, int(nfe) // (2 * langevin_steps))
    if int(sweeps) < 0:
        raise ValueError(f"sweeps must be >= 0, got {sweeps}")
    sweeps = int(sweeps)
    chain_nfe = sweeps * langevin_steps
    solve_budget = int(nfe) - chain_nfe
    if solve_budget < 1:
        raise ValueError(
            f"nfe={nfe} leaves no evaluation for the solve after {sweeps} sweeps of "
            f"{langevin_steps} Langevin steps; lower sweeps or langevin_steps"
        )
    n_steps = steps_for_nfe(solver, solve_budget, final)  # raises a clear error if too few
    if estimator is None:
        estimator = ExactNoisePosterior(model)
    levels = as_time(estimator.levels)
    k = levels.numel()
    if float(levels.min()) <= process.t_min or float(levels.max()) > process.t_max + 1e-9:
        raise ValueError(
            f"the estimator's levels [{float(levels.min()):g}, {float(levels.max()):g}] must lie "
            f"in ({process.t_min:g}, {process.t_max:g}] of {process.name}"
        )
    if chain is None:
        if x_T is None:
            raise ValueError("give x_T (the chains' start at t_max) or chain=")
        x = x_T
        level = torch.full((x.shape[0],), k - 1, dtype=torch.long)
    else:
        x, level = chain.x, chain.level.to(torch.long)
    b = x.shape[0]
    source = as_noise_source(noise, b)
    alpha = process.alpha(levels)
    sigma = process.sigma(levels)
    shape1 = (b,) + (1,) * (x.ndim - 1)
    best_x, best_level = x, level
    with torch.no_grad():
        for _ in range(sweeps):
            for _ in range(langevin_steps):
                a = alpha[level].to(x.dtype).reshape(shape1)
                s = sigma[level].to(x.dtype).reshape(shape1)
                x0 = model(x, levels[level], cond)
                z = source(tuple(x.shape), dtype=x.dtype, device=x.device)
                x = x + 0.5 * eta * (a * x0 - x) + math.sqrt(eta) * s * z
            logp = estimator(x).to(torch.float64)
            if gibbs == "map":
                level = logp.argmax(1)
            else:  # Gumbel-max with the uniform drawn from the same per-sample source
                u = source((b, k), dtype=torch.float64, device=None)
                u = (0.5 * (1 + torch.erf(u / math.sqrt(2)))).clamp(1e-300, 1 - 1e-16)
                level = (logp - torch.log(-torch.log(u))).argmax(1)
            level = level.cpu()
            if select == "last":
                best_x, best_level = x, level
            else:
                better = (level <= best_level).reshape(shape1).to(x.device)
                best_x = torch.where(better, x, best_x)
                best_level = torch.minimum(level, best_level)
    seeds = _seeds(noise, b)
    out = torch.empty_like(best_x)
    solve_nfe = None
    kind = grid_kind or solver.natural_grid
    for j in best_level.unique().tolist():
        idx = torch.nonzero(best_level == j).flatten()
        grid = make_grid(process, n_steps, kind, t_start=float(levels[j]))
        st: dict[str, Any] = {}
        sub_noise = [seeds[i] + 7_919_000 for i in idx.tolist()] if seeds is not None else noise
        out[idx.to(out.device)] = sample(
            model,
            best_x[idx.to(best_x.device)],
            grid,
            solver,
            cond=_subset(cond, idx, b),
            final=final,
            noise=sub_noise,
            stats=st,
        )
        solve_nfe = st["nfe"]
    if stats is not None:
        stats.update(
            nfe=chain_nfe + int(solve_nfe),
            langevin_nfe=chain_nfe,
            solve_nfe=int(solve_nfe),
            sweeps=sweeps,
            solve_steps=n_steps,
            t_start=levels[best_level],
            level_counts=torch.bincount(best_level, minlength=k),
            chain=Chain(x, level),
        )
    return out
