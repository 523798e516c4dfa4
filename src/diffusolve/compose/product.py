r"""Products of experts: sample ``p(x) ∝ prod_i p_i(x)`` from diffusion models of each ``p_i``.

The product of the noised marginals ``prod_i q_i,t`` is **not** the noised product, so
summing the scores in the reverse SDE ("naive sum") does not sample the product. Du et al.,
"Reduce, reuse, recycle: compositional generation with energy-based diffusion models and
MCMC", ICML 2023 (arXiv 2302.11552) correct it with a few MCMC steps at every noise level
targeting ``pi_t ∝ prod_i q_i,t``: annealed MCMC whose last level is the product of the
data densities (up to the tiny noise at ``t_min``).

* :func:`product_sample`: the reverse SDE (Euler-Maruyama) or probability-flow ODE (Euler)
  with the summed score ``sum_i s_i``; with ``mcmc=`` a kernel, ``n_steps`` MCMC moves
  targeting ``pi_t`` after the start and after every step.
* Kernels (frozen dataclasses; step size ``eta_t = step_scale * sigma(t)^2``, the annealed
  Langevin schedule of Song & Ermon 2019, eq. 6, with ``step_scale = epsilon / sigma_L^2``;
  the adjusted kernels multiply it by a gain adapted after every move towards
  ``target_accept``, carried across levels, since at low noise the target's scale stops
  shrinking with ``sigma`` (the data's own spread) and a fixed ``sigma^2`` schedule freezes
  the chain):
  :class:`ULA` (unadjusted Langevin: needs scores only, so it runs on networks),
  :class:`MALA` (Metropolis-adjusted) and :class:`HMC` (leapfrog, ``eps = sqrt(2 eta)``),
  which need the energy ``log pi_t``: available where every expert has ``log_prob(x, t)``
  (analytic priors). The need is declared (``needs_energy``) and refused with a clear error.
  Du et al. report MALA/HMC beating ULA, with a handful of steps per level.
* ``smc=``: sequential Monte Carlo (Del Moral, Doucet & Jasra, "Sequential Monte Carlo
  samplers", JRSS-B 2006) on the same intermediate targets ``pi_k ∝ prod_i q_i,t_k``, as in
  the annealed-importance-sampling composition of Zhang et al., "Product of experts for
  visual generation" (arXiv 2506.08894): local MCMC moves fix the shape of every mode but
  move mass between separated modes only slowly, so the weights between modes stay those of
  the early, high-noise levels. Importance weights correct them. The reverse-SDE step with
  the summed score is the proposal ``q(x' | x)``, with the forward Euler-Maruyama step of
  the same variance as the backward kernel ``L(x | x')`` (the noising direction, as in the
  particle denoising diffusion sampler of Phillips et al., ICML 2024), so the incremental
  weight is ``pi_{k+1}(x') L(x | x') / (pi_k(x) q(x' | x))`` (Del Moral et al. 2006),
  exact for any step size; the start is weighted by ``pi_0(x) / N(x; 0,
  sigma(t_0)^2 I)`` (the prior of :meth:`~diffusolve.process.Process.prior_sample`).
  Particles are resampled (systematic) when the effective sample size falls below
  ``smc * N``; the MCMC kernel, invariant for ``pi_{k+1}``, then moves them without
  changing the weights (it must be MALA or HMC: ULA is not invariant). The returned set is
  resampled once more at the end, so it is equally weighted, and the kernel moves it once
  more to spread the repeats; ``info["log_z"]`` is the
  unbiased (in ``Z``) estimate of ``log ∫ prod_i q_i,t_end(x) dx``.
* :func:`product_of_mixtures`: the exact normalised product of two Gaussian mixtures (a
  mixture with ``K_a K_b`` components: precisions add, ``C = (C_i^-1 + C_j^-1)^-1``,
  ``mu = C (C_i^-1 mu_i + C_j^-1 mu_j)``, weights ``∝ w_i w_j N(mu_i; mu_j, C_i + C_j)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..models.analytic.gmm import GaussianMixture
from ..process import Process, make_grid
from ..process.grids import check_grid
from ._fields import Experts, score_from_x0, sde_coefficients

__all__ = ["ULA", "MALA", "HMC", "KERNELS", "product_of_mixtures", "product_sample"]


def product_of_mixtures(a: GaussianMixture, b: GaussianMixture) -> GaussianMixture:
    """The normalised product ``a(x) b(x) / Z`` of two Gaussian mixtures, exactly (float64).

    Component ``(i, j)`` (``i`` of ``a`` major): precision ``P_i + P_j``, mean
    ``C (P_i mu_i + P_j mu_j)``, weight ``∝ w_i w_j N(mu_i; mu_j, C_i + C_j)`` (the
    product of two Gaussian densities is ``N(mu_i; mu_j, C_i + C_j) N(x; mu, C)``). The
    result has ``a``'s process and shape.

    Example:
        >>> import torch
        >>> from diffusolve.models import GaussianMixture
        >>> from diffusolve.process import vp_linear
        >>> p = vp_linear()
        >>> a = GaussianMixture(torch.ones(1), torch.tensor([[0.0]]), torch.tensor([1.0]), process=p)
        >>> b = GaussianMixture(torch.ones(1), torch.tensor([[2.0]]), torch.tensor([1.0]), process=p)
        >>> c = product_of_mixtures(a, b)  # N(0, 1) N(2, 1) ∝ N(1, 1/2)
        >>> c.means.tolist(), c.covs.flatten().tolist()
        ([[1.0]], [0.5])
    """
    if a.dim != b.dim:
        raise ValueError(f"the mixtures live in different dimensions: {a.dim} vs {b.dim}")
    ca, cb = a.covs, b.covs
    pa, pb = torch.linalg.inv(ca), torch.linalg.inv(cb)
    prec = pa[:, None] + pb[None, :]  # [Ka, Kb, d, d]
    cov = torch.linalg.inv(prec)
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    lin = (pa @ a.means[..., None])[:, None] + (pb @ b.means[..., None])[None, :]
    mean = (cov @ lin)[..., 0]
    s = ca[:, None] + cb[None, :]
    diff = a.means[:, None] - b.means[None, :]
    chol = torch.linalg.cholesky(s)
    sol = torch.linalg.solve_triangular(chol, diff[..., None], upper=False)[..., 0]
    logn = (
        -0.5 * (sol * sol).sum(-1)
        - torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        - 0.5 * a.dim * math.log(2 * math.pi)
    )
    logw = a.log_weights[:, None] + b.log_weights[None, :] + logn
    w = torch.softmax(logw.flatten(), 0)
    d = a.dim
    return GaussianMixture(
        w, mean.reshape(-1, d), cov.reshape(-1, d, d), process=a.process, shape=a.shape
    )


# --------------------------------------------------------------------------- kernels
@dataclass(frozen=True)
class _Kernel:
    step_scale: float = 0.1
    n_steps: int = 2
    needs_energy: ClassVar[bool] = False
    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if not self.step_scale > 0:
            raise ValueError(f"step_scale must be positive, got {self.step_scale}")
        if self.n_steps < 1:
            raise ValueError(f"n_steps must be at least 1, got {self.n_steps}")
        acc = getattr(self, "target_accept", 0.5)
        if not 0 < acc < 1:
            raise ValueError(f"target_accept must lie in (0, 1), got {acc}")
        if getattr(self, "adapt", 0.0) < 0:
            raise ValueError("adapt must be >= 0 (0 keeps the step schedule fixed)")

    def step_size(self, process: Process, t: float, log_gain: float = 0.0) -> float:
        """``eta_t = step_scale * exp(log_gain) * sigma(t)^2``."""
        return self.step_scale * math.exp(log_gain) * float(process.sigma(t)) ** 2

    def options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class ULA(_Kernel):
    """Unadjusted Langevin ``x <- x + eta grad log pi_t + sqrt(2 eta) xi`` (Du et al.
    2023, sec. 4; scores only, so it runs on networks). Biased for a finite step."""

    name: ClassVar[str] = "ula"


@dataclass(frozen=True)
class MALA(_Kernel):
    """Metropolis-adjusted Langevin (Roberts & Tweedie 1996): the ULA proposal accepted
    with the Metropolis-Hastings ratio; needs ``log pi_t``."""

    step_scale: float = 0.5
    target_accept: float = 0.574
    adapt: float = 1.0
    needs_energy: ClassVar[bool] = True
    name: ClassVar[str] = "mala"


@dataclass(frozen=True)
class HMC(_Kernel):
    """Hamiltonian Monte Carlo (Neal 2011): ``leapfrog`` steps of size ``sqrt(2 eta)``
    with unit mass, accepted with the Metropolis ratio; needs ``log pi_t``. Du et al. 2023
    use a few leapfrog steps per move."""

    step_scale: float = 0.5
    leapfrog: int = 3
    target_accept: float = 0.65
    adapt: float = 1.0
    needs_energy: ClassVar[bool] = True
    name: ClassVar[str] = "hmc"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.leapfrog < 1:
            raise ValueError(f"leapfrog must be at least 1, got {self.leapfrog}")


KERNELS = {k.name: k for k in (ULA, MALA, HMC)}


@dataclass
class _Target:
    """``pi_t ∝ prod_i q_i,t``: its score (and energy when the experts have one)."""

    experts: Experts
    t: float
    calls: list[int] = field(default_factory=lambda: [0])

    def score(self, x: Tensor) -> Tensor:
        p = self.experts.process
        a, s = float(p.alpha(self.t)), float(p.sigma(self.t))
        self.calls[0] += 1
        return score_from_x0(x, self.experts.denoise(x, self.t), a, s).sum(0)

    def log_prob(self, x: Tensor) -> Tensor:
        return self.experts.log_prob(x, self.t).sum(0)


def _sum(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).sum(1)


def _bshape(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _mcmc(
    kernel: _Kernel, target: _Target, x: Tensor, gen: torch.Generator, gain: list[float]
) -> tuple[Tensor, float]:
    """``kernel.n_steps`` moves on ``target``; returns ``(x, acceptance rate)``.

    ``gain[0]`` is the log step-size gain of the adjusted kernels, updated after every
    move by ``adapt * (mean acceptance probability - target_accept)`` (carried from level
    to level)."""
    acc = []
    for _ in range(kernel.n_steps):
        eta = kernel.step_size(target.experts.process, target.t, gain[0])
        g = target.score(x)
        xi = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        if isinstance(kernel, ULA):
            x = x + eta * g + math.sqrt(2 * eta) * xi
            acc.append(1.0)
            continue
        lp = target.log_prob(x)
        if isinstance(kernel, MALA):
            y = x + eta * g + math.sqrt(2 * eta) * xi
            gy = target.score(y)
            lpy = target.log_prob(y)
            fwd = _sum((y - x - eta * g) ** 2) / (4 * eta)
            bwd = _sum((x - y - eta * gy) ** 2) / (4 * eta)
            log_ratio = lpy - lp - bwd + fwd
        else:  # HMC, leapfrog with unit mass
            eps = math.sqrt(2 * eta)
            mom = xi
            y = x
            pm = mom + 0.5 * eps * g
            for k in range(kernel.leapfrog):
                y = y + eps * pm
                gy = target.score(y)
                pm = pm + (eps if k < kernel.leapfrog - 1 else 0.5 * eps) * gy
            lpy = target.log_prob(y)
            log_ratio = lpy - lp - 0.5 * _sum(pm * pm) + 0.5 * _sum(mom * mom)
        u = torch.rand(x.shape[0], generator=gen, dtype=torch.float64)
        ok = torch.log(u) < log_ratio.nan_to_num(nan=-math.inf)
        x = torch.where(_bshape(ok, x), y, x)
        rate = float(torch.exp(log_ratio.nan_to_num(nan=-math.inf).clamp_max(0)).mean())
        gain[0] += kernel.adapt * (rate - kernel.target_accept)
        acc.append(float(ok.double().mean()))
    return x, sum(acc) / len(acc)


def _ess(logw: Tensor) -> float:
    """Effective sample size ``1 / sum_j W_j^2`` of normalised weights, as a fraction of N."""
    w = torch.softmax(logw, 0)
    return float(1.0 / (w * w).sum()) / logw.numel()


def _systematic(logw: Tensor, x: Tensor, gen: torch.Generator) -> Tensor:
    """Systematic resampling (Kitagawa 1996; Douc, Cappe & Moulines 2005) of the particles
    ``x`` by ``logw``: one uniform ``u`` from ``gen``; particle ``j`` of the result is the
    one whose cumulative weight first reaches ``(u + j) / N``."""
    n = logw.numel()
    cdf = torch.cumsum(torch.softmax(logw, 0), 0)
    cdf[-1] = 1.0
    u = torch.rand(1, generator=gen, dtype=torch.float64)
    pos = (u + torch.arange(n, dtype=torch.float64)) / n
    idx = torch.searchsorted(cdf.to(torch.float64), pos).clamp(max=n - 1)
    return x[idx.to(x.device)]


def _check_smc(smc: Any) -> float | None:
    if smc is None or smc is False:
        return None
    if smc is True:
        return 0.5
    if isinstance(smc, (int, float)) and 0 < float(smc) <= 1:
        return float(smc)
    raise ValueError(
        f"smc must be None/False (no weights), True (resample below ESS 0.5 N) or the ESS "
        f"fraction in (0, 1] below which particles are resampled, got {smc!r}"
    )


def _generator(noise: Any) -> torch.Generator:
    if isinstance(noise, torch.Generator):
        return noise
    if noise is None:
        return torch.Generator().manual_seed(torch.seed() % (2**63))
    if isinstance(noise, int) and not isinstance(noise, bool):
        return torch.Generator().manual_seed(noise)
    raise TypeError(f"noise must be an int seed or a torch.Generator, got {type(noise).__name__}")


def product_sample(
    models: Any,
    x: Tensor,
    grid: Tensor | int,
    *,
    cond: Any = None,
    mcmc: _Kernel | None = None,
    sampler: str = "sde",
    noise: Any = None,
    grid_kind: str = "logsnr",
    final: str = "denoise",
    smc: bool | float | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Sample the product of experts by the summed score, optionally MCMC/SMC-corrected.

    Args:
        models, cond: the experts (as :func:`~diffusolve.compose.superdiff_sample`).
        x: ``[B, ...]`` start at ``grid[0]``.
        grid: decreasing times or a number of steps.
        mcmc: ``None`` (naive sum) or a kernel (:class:`ULA`, :class:`MALA`,
            :class:`HMC`) run after the start and after every step at the new time.
        sampler: ``"sde"`` (Euler-Maruyama reverse SDE) or ``"ode"`` (Euler
            probability-flow ODE) for the steps between noise levels.
        noise: an int seed or a ``torch.Generator`` (every draw comes from it).
        final: ``"denoise"``: ``(x + sigma^2 sum_i s_i) / alpha`` at ``grid[-1]`` (the
            Tweedie form of the summed score); ``"none"``: the state.
        smc: ``None`` (default; no importance weights: the behaviour without this option),
            ``True`` (sequential Monte Carlo resampling when the effective sample size
            falls below ``0.5 N``, the customary threshold; Del Moral et al. 2006) or that
            fraction in ``(0, 1]`` (1: resample at every level). The batch is the particle
            population and ``x`` must come from the prior ``N(0, sigma(grid[0])^2 I)``
            (:meth:`~diffusolve.process.Process.prior_sample`). Needs every expert's
            energy, ``sampler="sde"`` and ``mcmc`` ``None``, :class:`MALA` or :class:`HMC`
            (kernels that leave ``pi_t`` invariant). The samples are the final resampled
            population (equally weighted; one more kernel move spreads the repeats). Deterministic for the seed, but a
            sample depends on the whole batch (resampling couples the particles).

    Returns:
        ``(samples, info)`` with ``info = {"nfe", "acceptance", "log_gain"}`` (mean
        acceptance per level, 1 for ULA; the adjusted kernels' final log step gain); with
        ``smc`` also ``"ess"`` (the effective sample size fraction at every level before
        resampling), ``"resampled"`` (how many levels resampled, the final one included)
        and ``"log_z"`` (the estimate of ``log ∫ prod_i q_i,t(x) dx`` at ``grid[-1]``).

    Raises:
        TypeError: a kernel that needs the energy (MALA, HMC), or ``smc``, on experts
            without ``log_prob`` (networks): use :class:`ULA` without ``smc``.
        ValueError: ``smc`` with ``sampler="ode"`` or with :class:`ULA`.

    Example:
        >>> import torch
        >>> from diffusolve.models import GaussianMixture
        >>> from diffusolve.process import vp_linear
        >>> p = vp_linear()
        >>> a = GaussianMixture(torch.ones(1), torch.tensor([[0.0]]), torch.tensor([1.0]), process=p)
        >>> b = GaussianMixture(torch.ones(1), torch.tensor([[2.0]]), torch.tensor([1.0]), process=p)
        >>> x = p.prior_sample((2000, 1), noise=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> y, info = product_sample([a, b], x, 50, mcmc=MALA(), noise=1)
        >>> round(float(y.mean()), 1), round(float(y.var()), 1)  # the product N(1, 1/2)
        (1.0, 0.5)
        >>> y, info = product_sample([a, b], x, 50, mcmc=MALA(), noise=1, smc=True)
        >>> round(float(y.mean()), 1), round(float(y.var()), 1)
        (1.0, 0.5)
        >>> import math  # log Z = log ∫ N(x; 0, 1) N(x; 2, 1) dx = log N(0; 2, 2)
        >>> abs(info["log_z"] - (-1 - math.log(4 * math.pi) / 2)) < 0.2
        True
    """
    if sampler not in ("sde", "ode"):
        raise ValueError(f"sampler must be 'sde' or 'ode', got {sampler!r}")
    if final not in ("denoise", "none"):
        raise ValueError(f"final must be 'denoise' or 'none', got {final!r}")
    experts = Experts(models, cond)
    process = experts.process
    if mcmc is not None:
        if not isinstance(mcmc, _Kernel):
            raise TypeError(f"mcmc must be one of {sorted(KERNELS)} kernels, got {mcmc!r}")
        if mcmc.needs_energy and not experts.has_energy:
            names = ", ".join(sorted({type(m).__name__ for m in experts.models}))
            raise TypeError(
                f"{type(mcmc).__name__} needs the energy log q_t(x) of every expert for its "
                f"accept/reject step, but {names} has none (only analytic priors such as "
                "GaussianMixture, without conditions, expose log_prob). Use ULA, which needs "
                "scores only."
            )
    ess_min = _check_smc(smc)
    if ess_min is not None:
        if not experts.has_energy:
            names = ", ".join(sorted({type(m).__name__ for m in experts.models}))
            raise TypeError(
                f"smc weights particles by the energy log q_t(x) of every expert, but {names} "
                "has none (only analytic priors such as GaussianMixture, without conditions, "
                "expose log_prob). Use mcmc=ULA(...) without smc for networks."
            )
        if sampler != "sde":
            raise ValueError(
                "smc needs the stochastic proposal sampler='sde' (the ODE step has no "
                "transition density to weight by)"
            )
        if isinstance(mcmc, ULA):
            raise ValueError(
                "smc needs an MCMC kernel that leaves pi_t invariant (MALA or HMC); ULA is "
                "biased and would bias the weights. Use mcmc=MALA() or HMC(), or mcmc=None"
            )
    grid = (
        make_grid(process, grid, grid_kind) if isinstance(grid, int) else check_grid(process, grid)
    )
    gen = _generator(noise)
    calls = [0]
    acceptance: list[float] = []
    gain = [0.0]
    ess: list[float] = []
    resampled = 0
    log_z = 0.0
    logw = torch.zeros(x.shape[0], dtype=torch.float64)

    def reweight(inc: Tensor, x: Tensor) -> Tensor:
        # log Z_{k+1} / Z_k ≈ log sum_j W_j inc_j (W the normalised weights before the step)
        nonlocal logw, log_z, resampled
        inc = inc.to(torch.float64).nan_to_num(nan=-math.inf)
        log_z += float(torch.logsumexp(torch.log_softmax(logw, 0) + inc, 0))
        logw = logw + inc
        if not torch.isfinite(logw).any():
            raise FloatingPointError("smc: every particle has zero weight")
        ess.append(_ess(logw))
        if ess[-1] < ess_min - 1e-12:
            x = _systematic(logw, x, gen)
            logw = torch.zeros_like(logw)
            resampled += 1
        return x

    if ess_min is not None:
        t0 = float(grid[0])
        s0 = float(process.sigma(t0))
        d = x[0].numel()
        log_prior = -0.5 * _sum(x * x).double() / (s0 * s0) - d * (
            math.log(s0) + 0.5 * math.log(2 * math.pi)
        )
        x = reweight(_Target(experts, t0, calls).log_prob(x).double() - log_prior, x)
    if mcmc is not None:
        x, rate = _mcmc(mcmc, _Target(experts, float(grid[0]), calls), x, gen, gain)
        acceptance.append(rate)
    for i in range(grid.numel() - 1):
        t, tn = float(grid[i]), float(grid[i + 1])
        dt = tn - t
        s = _Target(experts, t, calls).score(x)
        f, g2 = sde_coefficients(process, t)
        if sampler == "sde":
            z = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            var = g2 * abs(dt)
            xn = x + (f * dt) * x - (g2 * dt) * s + math.sqrt(var) * z
            if ess_min is not None:
                # q(x'|x) = N(x'; x + (f x - g^2 s) dt, var); L(x|x') = N(x; x' - f x' dt,
                # var), the forward Euler-Maruyama step: the normalisers cancel
                log_q = -0.5 * _sum(z * z).double()
                back = x - xn + (f * dt) * xn
                log_l = -0.5 * _sum(back * back).double() / var
                lp = _Target(experts, t, calls).log_prob(x).double()
                lpn = _Target(experts, tn, calls).log_prob(xn).double()
                xn = reweight(lpn - lp + log_l - log_q, xn)
            x = xn
        else:
            x = x + (f * dt) * x - (0.5 * g2 * dt) * s
        if mcmc is not None:
            x, rate = _mcmc(mcmc, _Target(experts, tn, calls), x, gen, gain)
            acceptance.append(rate)
    if ess_min is not None and _ess(logw) < 1 - 1e-12:
        x = _systematic(logw, x, gen)
        logw = torch.zeros_like(logw)
        resampled += 1
        if mcmc is not None:  # spread the repeats (the kernel keeps pi_{t_end})
            x, rate = _mcmc(mcmc, _Target(experts, float(grid[-1]), calls), x, gen, gain)
            acceptance.append(rate)
    if final == "denoise":
        t = float(grid[-1])
        s = _Target(experts, t, calls).score(x)
        a, sg = float(process.alpha(t)), float(process.sigma(t))
        x = (x + sg * sg * s) / a
    per = 1 if experts.stacked else experts.size
    info: dict[str, Any] = {"nfe": calls[0] * per, "acceptance": acceptance, "log_gain": gain[0]}
    if ess_min is not None:
        info.update(ess=ess, resampled=resampled, log_z=log_z)
    return x, info
