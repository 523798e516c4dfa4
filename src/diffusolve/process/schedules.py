"""Constructors for every supported noise process.

=====================  =====================================  ===========================
constructor            alpha(t), sigma(t)                      time range (default)
=====================  =====================================  ===========================
``ddpm``               discrete betas, lambda interpolated     ``[0, N-1]`` (diffusers index)
``vp_linear``          VPSDE, beta in [0.1, 20]                ``[1e-3, 1]``
``vp_cosine``          iDDPM cosine, s = 0.008                 ``[1e-3, 0.9946]``
``ve``                 alpha = 1, geometric sigma              ``[0, 1]`` (sigma 0.01 .. 50)
``edm``                alpha = 1, sigma = t                    ``[0.002, 80]``
``rectified_flow``     alpha = 1 - t, sigma = t                ``[1e-3, 0.999]``
``interpolant``        user alpha, beta, gamma                 user range
=====================  =====================================  ===========================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .base import Process, as_time

__all__ = [
    "DiscreteVP",
    "ddpm",
    "ddpm_betas",
    "from_scheduler_config",
    "vp_linear",
    "vp_cosine",
    "ve",
    "edm",
    "rectified_flow",
    "interpolant",
    "PROCESSES",
    "get_process",
]


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation with linear extrapolation; ``xp`` increasing."""
    idx = torch.searchsorted(xp, x.clamp(xp[0], xp[-1]).contiguous(), right=True) - 1
    idx = idx.clamp(0, xp.numel() - 2)
    x0, x1, f0, f1 = xp[idx], xp[idx + 1], fp[idx], fp[idx + 1]
    return f0 + (f1 - f0) * (x - x0) / (x1 - x0)


def _sigmoid(z: float) -> float:
    """Numerically stable logistic function on floats."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


class DiscreteVP(Process):
    """A discrete DDPM schedule (``alphas_cumprod`` over N training steps) as a process.

    Time is measured in diffusers' timestep units, ``t in [0, N-1]``, so a network trained
    on the schedule is called with ``t`` unchanged. Between integer steps ``lambda(t)`` is
    interpolated linearly; ``alpha = sqrt(sigmoid(2 lambda))`` and
    ``sigma = sqrt(sigmoid(-2 lambda))`` (variance preserving).

    Example:
        >>> from diffusolve.process import ddpm
        >>> p = ddpm("linear")
        >>> round(float(p.alpha(0)) ** 2, 6)  # alphas_cumprod[0] = 1 - beta_0
        0.9999
    """

    def __init__(self, alphas_cumprod: Tensor, *, name: str = "ddpm") -> None:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2:
            raise ValueError("alphas_cumprod needs at least two entries.")
        if not torch.all((ac > 0) & (ac < 1)):
            raise ValueError(
                "alphas_cumprod must lie strictly inside (0, 1); a zero-terminal-SNR schedule "
                "(alphas_cumprod[-1] == 0) has lambda = -inf at t_max and is not supported. "
                "Drop the last step or disable rescale_betas_zero_snr."
            )
        lam = 0.5 * (torch.log(ac) - torch.log1p(-ac))
        if not torch.all(lam[1:] < lam[:-1]):
            raise ValueError("alphas_cumprod must decrease strictly.")
        super().__init__(t_min=0.0, t_max=float(ac.numel() - 1), name=name)
        self.alphas_cumprod = ac
        self._knots = torch.arange(ac.numel(), dtype=torch.float64)
        self._lam = lam
        # for t_of_lambda we interpolate t against -lambda (increasing)
        self._neg_lam = -lam
        self._lam_list = lam.tolist()  # scalar fast path (solver steps call with 0-d times)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def _lam_float(self, t: Tensor | float) -> float | None:
        """lambda at a scalar time in plain float arithmetic (same interpolation, with linear
        extrapolation outside the knots), or None for tensors that need the tensor path."""
        if isinstance(t, Tensor) and (t.ndim != 0 or t.requires_grad):
            return None
        tf = float(t)
        lam = self._lam_list
        i = min(max(math.floor(tf), 0), len(lam) - 2)
        return lam[i] + (lam[i + 1] - lam[i]) * (tf - i)

    def lam(self, t: Tensor | float) -> Tensor:
        lf = self._lam_float(t)
        if lf is not None:
            return torch.tensor(lf, dtype=torch.float64)
        return _interp(as_time(t), self._knots, self._lam)

    def alpha(self, t: Tensor | float) -> Tensor:
        lf = self._lam_float(t)
        if lf is not None:
            return torch.tensor(math.sqrt(_sigmoid(2 * lf)), dtype=torch.float64)
        return torch.sqrt(torch.sigmoid(2 * self.lam(t)))

    def sigma(self, t: Tensor | float) -> Tensor:
        lf = self._lam_float(t)
        if lf is not None:
            return torch.tensor(math.sqrt(_sigmoid(-2 * lf)), dtype=torch.float64)
        return torch.sqrt(torch.sigmoid(-2 * self.lam(t)))

    def t_of_lambda(self, lam: Tensor | float) -> Tensor:
        lam = as_time(lam)
        return _interp(-lam, self._neg_lam, self._knots)


def ddpm_betas(
    schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> Tensor:
    """Betas exactly as diffusers computes them (float32), returned as float64.

    ``schedule`` is one of ``"linear"``, ``"scaled_linear"``, ``"squaredcos_cap_v2"``.
    """
    n = int(num_train_timesteps)
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    elif schedule == "squaredcos_cap_v2":

        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)],
            dtype=torch.float32,
        )
    else:
        raise ValueError(
            f"unknown beta schedule {schedule!r}; use 'linear', 'scaled_linear' or "
            "'squaredcos_cap_v2', or pass your own betas to DiscreteVP."
        )
    return betas.to(torch.float64)


def ddpm(
    schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> DiscreteVP:
    """A discrete DDPM process with diffusers' beta conventions.

    ``alphas_cumprod`` is accumulated in float32 exactly as diffusers does, so a model
    trained with diffusers' ``DDPMScheduler`` sees the same noise levels.

    Example:
        >>> from diffusolve.process import ddpm
        >>> ddpm("scaled_linear", beta_start=0.00085, beta_end=0.012).t_max
        999.0
    """
    betas = ddpm_betas(schedule, num_train_timesteps, beta_start, beta_end).to(torch.float32)
    ac = torch.cumprod(1.0 - betas, dim=0)
    return DiscreteVP(ac, name=f"ddpm-{schedule}")


def from_scheduler_config(config: Mapping[str, Any] | Any) -> Process:
    """Map a diffusers scheduler (or its config dict) onto a process.

    Supports the DDPM-family configs (``beta_schedule``, ``trained_betas``,
    ``num_train_timesteps``) and flow-matching configs (``FlowMatch*`` class names or
    ``prediction_type == "flow_prediction"``), which map to :func:`rectified_flow`.
    """
    cfg = dict(getattr(config, "config", config))
    cls = str(cfg.get("_class_name", ""))
    if "FlowMatch" in cls or cfg.get("prediction_type") == "flow_prediction":
        shift = float(cfg.get("shift", 1.0) or 1.0)
        if shift != 1.0 or cfg.get("use_dynamic_shifting"):
            raise ValueError(
                f"flow-matching config with shift={shift} / dynamic shifting: build the grid "
                "with the shift yourself; the process is rectified_flow()."
            )
        n = int(cfg.get("num_train_timesteps", 1000))
        return rectified_flow(t_min=1.0 / n, t_max=1.0 - 1.0 / n)
    if cfg.get("rescale_betas_zero_snr"):
        raise ValueError(
            "rescale_betas_zero_snr=True gives zero terminal SNR (lambda = -inf at t_max), "
            "which no exponential-integrator solver can start from; disable it in the config."
        )
    n = int(cfg.get("num_train_timesteps", 1000))
    trained = cfg.get("trained_betas")
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=torch.float32)
        return DiscreteVP(torch.cumprod(1.0 - betas, 0), name="ddpm-trained")
    return ddpm(
        cfg.get("beta_schedule", "linear"),
        n,
        float(cfg.get("beta_start", 0.0001)),
        float(cfg.get("beta_end", 0.02)),
    )


class _LogAlphaVP(Process):
    """A continuous VP process given by ``log alpha(t)``; ``sigma = sqrt(1 - alpha^2)``."""

    def _log_alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.exp(self._log_alpha(as_time(t)))

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(as_time(t))))

    def lam(self, t: Tensor | float) -> Tensor:
        la = self._log_alpha(as_time(t))
        return la - 0.5 * torch.log(-torch.expm1(2 * la))

    @staticmethod
    def _log_alpha_of_lambda(lam: Tensor | float) -> Tensor:
        return -0.5 * torch.nn.functional.softplus(-2.0 * as_time(lam))


class _VPLinear(_LogAlphaVP):
    def __init__(self, beta_min: float, beta_max: float, t_min: float, t_max: float) -> None:
        super().__init__(t_min=t_min, t_max=t_max, name="vp-linear")
        self.b0, self.b1 = float(beta_min), float(beta_max)

    def _log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * t**2 * (self.b1 - self.b0) - 0.5 * t * self.b0

    def t_of_lambda(self, lam: Tensor | float) -> Tensor:
        log_alpha = self._log_alpha_of_lambda(lam)
        a = 0.25 * (self.b1 - self.b0)
        b = 0.5 * self.b0
        return (-b + torch.sqrt(b * b - 4 * a * log_alpha)) / (2 * a)


def vp_linear(
    beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0
) -> Process:
    """Continuous VP-SDE with linear beta(t) (Song et al. 2021).

    Example:
        >>> from diffusolve.process import vp_linear
        >>> p = vp_linear()
        >>> abs(float(p.t_of_lambda(p.lam(0.3))) - 0.3) < 1e-12
        True
    """
    return _VPLinear(beta_min, beta_max, t_min, t_max)


class _VPCosine(_LogAlphaVP):
    def __init__(self, s: float, t_min: float, t_max: float) -> None:
        super().__init__(t_min=t_min, t_max=t_max, name="vp-cosine")
        self.s = float(s)
        self._log_alpha0 = math.log(math.cos(math.pi / 2 * self.s / (1 + self.s)))

    def _log_alpha(self, t: Tensor) -> Tensor:
        return torch.log(torch.cos(math.pi / 2 * (t + self.s) / (1 + self.s))) - self._log_alpha0

    def t_of_lambda(self, lam: Tensor | float) -> Tensor:
        log_alpha = self._log_alpha_of_lambda(lam)
        c = torch.exp(log_alpha + self._log_alpha0).clamp(max=1.0)
        return 2 * (1 + self.s) / math.pi * torch.arccos(c) - self.s


def vp_cosine(s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946) -> Process:
    """Continuous cosine VP schedule (Nichol & Dhariwal 2021).

    ``t_max = 0.9946`` keeps ``lambda(t_max)`` near -5.1, the clip that the DPM-Solver
    authors recommend because the cosine schedule's lambda diverges at t = 1.
    """
    return _VPCosine(s, t_min, t_max)


class _VE(Process):
    def __init__(self, sigma_min: float, sigma_max: float) -> None:
        super().__init__(t_min=0.0, t_max=1.0, name="ve")
        self.smin, self.smax = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.smax / self.smin)

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(as_time(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        return self.smin * torch.exp(as_time(t) * self._log_ratio)

    def lam(self, t: Tensor | float) -> Tensor:
        return -(math.log(self.smin) + as_time(t) * self._log_ratio)

    def t_of_lambda(self, lam: Tensor | float) -> Tensor:
        return (-as_time(lam) - math.log(self.smin)) / self._log_ratio


def ve(sigma_min: float = 0.01, sigma_max: float = 50.0) -> Process:
    """Variance-exploding SDE (Song et al. 2021): ``sigma(t) = smin (smax/smin)^t``, t in [0, 1]."""
    return _VE(sigma_min, sigma_max)


class _EDM(Process):
    def __init__(self, sigma_min: float, sigma_max: float, sigma_data: float) -> None:
        super().__init__(t_min=sigma_min, t_max=sigma_max, name="edm")
        self.sigma_data = float(sigma_data)

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(as_time(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        return as_time(t).clone()

    def lam(self, t: Tensor | float) -> Tensor:
        return -torch.log(as_time(t))

    def t_of_lambda(self, lam: Tensor | float) -> Tensor:
        return torch.exp(-as_time(lam))


def edm(sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5) -> Process:
    """EDM (Karras et al. 2022): ``alpha = 1``, ``sigma = t`` on ``[sigma_min, sigma_max]``."""
    return _EDM(sigma_min, sigma_max, sigma_data)


class _RectifiedFlow(Process):
    def __init__(self, t_min: float, t_max: float) -> None:
        if not (0.0 < t_min < t_max < 1.0):
            raise ValueError(
                "rectified flow needs 0 < t_min < t_max < 1: lambda is infinite at t = 0 and "
                f"t = 1 (got t_min={t_min}, t_max={t_max})."
            )
        super().__init__(t_min=t_min, t_max=t_max, name="rectified-flow")

    def alpha(self, t: Tensor | float) -> Tensor:
        return 1.0 - as_time(t)

    def sigma(self, t: Tensor | float) -> Tensor:
        return as_time(t).clone()

    def d_alpha(self, t: Tensor | float) -> Tensor:
        return -torch.ones_like(as_time(t))

    def d_sigma(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(as_time(t))

    def lam(self, t: Tensor | float) -> Tensor:
        t = as_time(t)
        return torch.log1p(-t) - torch.log(t)

    def t_of_lambda(self, lam: Tensor | float) -> Tensor:
        return torch.sigmoid(-as_time(lam))


def rectified_flow(t_min: float = 1e-3, t_max: float = 0.999) -> Process:
    """Rectified flow / flow matching: ``x_t = (1 - t) x0 + t eps``.

    The default range ``[1e-3, 0.999]`` matches diffusers' flow sigmas for 1000 training
    steps and keeps ``lambda`` finite (it is infinite at both ends).
    """
    return _RectifiedFlow(t_min, t_max)


def interpolant(
    alpha: Callable[[Tensor], Tensor],
    beta: Callable[[Tensor], Tensor],
    gamma: Callable[[Tensor], Tensor] | None = None,
    *,
    t_min: float,
    t_max: float,
    name: str = "interpolant",
) -> Process:
    """A linear stochastic interpolant ``x_t = alpha(t) x0 + beta(t) x1 + gamma(t) z``.

    With a Gaussian base ``x1 ~ N(0, I)`` and ``z ~ N(0, I)`` independent this is the
    process ``alpha(t) x0 + sigma(t) eps`` with ``sigma = sqrt(beta^2 + gamma^2)``.

    Example:
        >>> import math, torch
        >>> from diffusolve.process import interpolant
        >>> p = interpolant(lambda t: torch.cos(math.pi / 2 * t), lambda t: torch.sin(math.pi / 2 * t),
        ...                 t_min=1e-3, t_max=1 - 1e-3, name="trig")
        >>> p.validate()
    """

    def sigma(t: Tensor) -> Tensor:
        b = beta(t)
        return b.abs() if gamma is None else torch.sqrt(b**2 + gamma(t) ** 2)

    proc = Process(alpha, sigma, t_min=t_min, t_max=t_max, name=name)
    proc.validate()
    return proc


def _trig() -> Process:
    return interpolant(
        lambda t: torch.cos(math.pi / 2 * t),
        lambda t: torch.sin(math.pi / 2 * t),
        t_min=1e-3,
        t_max=1 - 1e-3,
        name="trig-interpolant",
    )


#: Named processes for CLIs, tests and benches.
PROCESSES: dict[str, Callable[[], Process]] = {
    "ddpm-linear": lambda: ddpm("linear"),
    "ddpm-scaled-linear": lambda: ddpm("scaled_linear", beta_start=0.00085, beta_end=0.012),
    "ddpm-cosine": lambda: ddpm("squaredcos_cap_v2"),
    "vp-linear": vp_linear,
    "vp-cosine": vp_cosine,
    "ve": ve,
    "edm": edm,
    "rectified-flow": rectified_flow,
    "trig-interpolant": _trig,
}


def get_process(name: str) -> Process:
    """Build a named process (see :data:`PROCESSES`)."""
    try:
        return PROCESSES[name]()
    except KeyError:
        raise ValueError(f"unknown process {name!r}; choose from {sorted(PROCESSES)}") from None
