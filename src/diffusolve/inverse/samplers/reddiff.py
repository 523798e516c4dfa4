"""RED-diff: regularisation by denoising diffusion, a variational sampler (Mardani, Song,
Kautz, Vahdat, ICLR 2024; "A Variational Perspective on Solving Inverse Problems with
Diffusion Models").

RED-diff does not run a noise-to-data chain: it optimises the mean ``mu`` of a variational
posterior ``N(mu, 0)`` with Adam, one iteration per grid time from high noise to low. At grid
time ``t`` (fresh ``eps ~ N(0, I)`` every step):

    x_t    = alpha_t mu + sigma_t eps
    loss   = obs_weight * ||y - A(mu)||^2 / 2 + lambda * w_t * <sg(eps_hat(x_t) - eps), mu>
    grad   = obs_weight * J_A(mu)^T (A(mu) - y) + lambda * w_t * (eps_hat - eps)

with ``eps_hat = (x_t - alpha_t D(x_t)) / sigma_t`` (the denoiser's noise estimate; ``sg`` stops
the gradient, so the network is **not** differentiated) and the SNR weighting ``w_t`` of
``st = sigma_t / alpha_t = 1 / sqrt(SNR)``: ``"linear"`` ``st`` (the paper's), ``"sqrt"``
``sqrt(st)``, ``"square"`` ``st^2``, ``"log"`` ``log(1 + st)``, ``"const"`` ``1``. ``mu``
starts at ``A^+ y`` (the operator's pseudo-inverse; minimum-norm least squares by conjugate
gradients when it has none; ``0`` for a nonlinear operator). The result is ``mu``.

**What it converges to.** For a Gaussian prior ``N(m, C)`` the expected regulariser
gradient is ``st * w_t * (C + st^2 I)^-1 (mu - m)``: with the linear weighting, a prior
precision ``lambda st^2 (C + st^2 I)^-1`` that fades as the noise falls. So ``mu`` is a
MAP-like point (a deterministic estimate, not a posterior sample): the data term fits the
observed directions, the regulariser pulls the unobserved ones towards the prior.

**Per sample.** The loss is summed per sample (the paper's code takes means over the batch
and the pixels), and Adam acts entrywise, so a sample's result never depends on its batch.
The measurement noise ``sigma_y`` does not enter the loss (as in the paper's code; the
likelihood's ``1 / sigma_y^2`` is absorbed in ``obs_weight`` and ``lambda``).

Defaults (the paper's released configuration): ``lr = 0.1``, Adam ``betas = (0.9, 0.99)``,
``lambda = 0.25``, ``obs_weight = 1``, linear weighting. Needs gradients through ``A``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import PosteriorSampler, Problem, register
from .parts import eps_of

__all__ = ["REDDiff", "snr_weight"]

WEIGHTINGS = ("linear", "sqrt", "square", "log", "const")
_ADAM_EPS = 1e-8


def snr_weight(kind: str, st: float) -> float:
    """The SNR weighting ``w_t`` of RED-diff at ``st = sigma_t / alpha_t``.

    Example:
        >>> snr_weight("linear", 2.0), snr_weight("square", 2.0), snr_weight("const", 2.0)
        (2.0, 4.0, 1.0)
    """
    if kind == "linear":
        return st
    if kind == "sqrt":
        return math.sqrt(st)
    if kind == "square":
        return st * st
    if kind == "log":
        return math.log1p(st)
    if kind == "const":
        return 1.0
    raise ValueError(f"unknown RED-diff weighting {kind!r}; choose from {WEIGHTINGS}")


@register
@dataclass(frozen=True)
class REDDiff(PosteriorSampler):
    """Variational sampler: Adam on ``mu`` with a denoising-diffusion regulariser.

    Args:
        lr: Adam learning rate (default 0.1).
        lambda_: weight of the regulariser (default 0.25).
        obs_weight: weight of the data term (default 1.0).
        weighting: SNR weighting ``w_t``: ``"linear"`` (default), ``"sqrt"``, ``"square"``,
            ``"log"`` or ``"const"``.
        beta1, beta2: Adam moment decays (default 0.9 and 0.99).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import Inpainting
        >>> from diffusolve.inverse.samplers import REDDiff
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import ddpm
        >>> prior = Gaussian(torch.zeros(4), torch.eye(4), process=ddpm())
        >>> op = Inpainting(torch.tensor([1.0, 1.0, 0.0, 0.0]), (4,))
        >>> y = torch.tensor([[1.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
        >>> mu = REDDiff().run(prior, op, y, 0.0, steps=100, noise=0)
        >>> bool(torch.allclose(mu[:, :2], y[:, :2], atol=0.1))  # the data term fits y
        True
    """

    lr: float = 0.1
    lambda_: float = 0.25
    obs_weight: float = 1.0
    weighting: str = "linear"
    beta1: float = 0.9
    beta2: float = 0.99

    name: ClassVar[str] = "reddiff"
    needs: ClassVar[tuple[str, ...]] = ("grad",)
    citation: ClassVar[str] = (
        "Mardani, Song, Kautz, Vahdat. A Variational Perspective on Solving Inverse Problems "
        "with Diffusion Models. ICLR 2024."
    )
    SEARCH: ClassVar[dict[str, tuple[Any, ...]]] = {
        "lr": (0.01, 0.03, 0.1, 0.3, 1.0),
        "lambda_": (0.05, 0.1, 0.25, 0.5, 1.0),
    }

    def __post_init__(self) -> None:
        self._positive(lr=self.lr, obs_weight=self.obs_weight)
        if not (isinstance(self.lambda_, (int, float)) and self.lambda_ >= 0):
            raise ValueError(f"reddiff: lambda_ must be >= 0; got {self.lambda_!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"reddiff: weighting must be one of {WEIGHTINGS}; got {self.weighting!r}"
            )
        for k in ("beta1", "beta2"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise ValueError(f"reddiff: {k} must lie in [0, 1); got {v!r}")

    def init(self, p: Problem, x: Tensor) -> Any:
        op = p.operator
        if op.has_pinv:
            mu = op.pinv(p.y)
        elif op.linear:
            mu = op.lstsq(p.y)
        else:
            mu = torch.zeros_like(x)
        mu = mu.to(dtype=x.dtype, device=x.device)
        zero = torch.zeros_like(mu)
        return {"mu": mu, "m": zero, "v": zero, "k": 0}

    def gradient(self, p: Problem, mu: Tensor, i: int) -> Tensor:
        """One stochastic gradient of the loss at grid time ``i`` (one network call, a fresh
        ``eps``; the network is not differentiated)."""
        st = p.st(i)
        grad = -self.obs_weight * p.operator.vjp(mu, p.residual(mu)).to(mu.dtype)
        eps = p.randn(mu)
        xt = p.alpha[i] * mu + p.sigma[i] * eps
        with torch.no_grad():
            x0 = p.denoise(xt, i)
        if math.isfinite(st) and self.lambda_ > 0:
            w = self.lambda_ * snr_weight(self.weighting, st)
            grad = grad + w * (eps_of(p, xt, x0, i) - eps)
        return grad

    def step(self, p: Problem, x: Tensor, i: int, state: Any) -> tuple[Tensor, Any]:
        mu = state["mu"]
        grad = self.gradient(p, mu, i)
        # Adam, entrywise (so per sample)
        k = state["k"] + 1
        m = self.beta1 * state["m"] + (1 - self.beta1) * grad
        v = self.beta2 * state["v"] + (1 - self.beta2) * grad * grad
        m_hat = m / (1 - self.beta1**k)
        v_hat = v / (1 - self.beta2**k)
        mu = mu - self.lr * m_hat / (v_hat.sqrt() + _ADAM_EPS)
        return mu, {"mu": mu, "m": m, "v": v, "k": k}

    def finish(self, p: Problem, x: Tensor, state: Any) -> Tensor:
        return state["mu"]
