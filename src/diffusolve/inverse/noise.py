"""Measurement noise models, kept apart from the operators: ``y = noise.sample(A(x))``.

Randomness is injected: ``generator`` is a ``torch.Generator`` (batch noise), an ``int``
seed ``s`` (per-sample seeds ``s, s+1, ...``: a sample's noise does not depend on its batch)
or a sequence of per-sample seeds, as in :func:`diffusolve.sample`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..solvers.noise import as_noise_source

__all__ = ["GaussianNoise", "PoissonNoise", "NoiseSeed"]

NoiseSeed = torch.Generator | int | Sequence[int] | None


def _dims(t: Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.ndim))


class GaussianNoise:
    """Additive white Gaussian noise of standard deviation ``sigma``; for complex
    measurements, on the real and the imaginary parts alike (so that ``||y - A x||^2`` over
    the real coordinates is the exact negative log-likelihood up to ``2 sigma^2``).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import GaussianNoise
        >>> noise = GaussianNoise(0.1)
        >>> y = noise.sample(torch.zeros(2, 3), generator=0)
        >>> bool(torch.equal(y[1], noise.sample(torch.zeros(1, 3), generator=[1])[0]))
        True
        >>> noise.log_likelihood(torch.zeros(1, 2), torch.zeros(1, 2))  # -log(2 pi 0.01)
        tensor([2.7673])
    """

    def __init__(self, sigma: float) -> None:
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0; got {sigma}")
        self.sigma = float(sigma)

    def sample(self, y_clean: Tensor, generator: NoiseSeed = None) -> Tensor:
        """``y_clean + sigma * eps`` (same shape, dtype and device)."""
        real = torch.view_as_real(y_clean) if y_clean.is_complex() else y_clean
        eps = as_noise_source(generator, real.shape[0])(
            tuple(real.shape), dtype=real.dtype, device=real.device
        )
        noisy = real + self.sigma * eps
        return torch.view_as_complex(noisy.contiguous()) if y_clean.is_complex() else noisy

    __call__ = sample

    def log_likelihood(self, y: Tensor, y_clean: Tensor) -> Tensor:
        """``log p(y | y_clean)`` per sample, ``[B]`` (over the real coordinates)."""
        r = y - y_clean
        r = torch.view_as_real(r) if r.is_complex() else r
        if self.sigma == 0:
            raise ValueError("the noiseless likelihood is a point mass (sigma = 0)")
        m = r[0].numel()
        return -0.5 * (r * r).sum(_dims(r)) / self.sigma**2 - 0.5 * m * math.log(
            2 * math.pi * self.sigma**2
        )

    def __repr__(self) -> str:
        return f"GaussianNoise(sigma={self.sigma})"


class PoissonNoise:
    """Shot noise: ``y = k / rate`` with counts ``k ~ Poisson(rate * y_clean)`` (so
    ``E y = y_clean`` and ``Var y = y_clean / rate``; ``y_clean`` must be non-negative).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import PoissonNoise
        >>> noise = PoissonNoise(rate=100.0)
        >>> y = noise.sample(torch.full((1, 10000), 0.5), generator=0)
        >>> abs(float(y.mean()) - 0.5) < 0.01
        True
    """

    def __init__(self, rate: float) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive; got {rate}")
        self.rate = float(rate)

    def _lam(self, y_clean: Tensor) -> Tensor:
        if y_clean.is_complex():
            raise TypeError("Poisson noise needs real, non-negative clean measurements")
        if torch.any(y_clean < 0):
            raise ValueError("Poisson noise needs non-negative clean measurements")
        return self.rate * y_clean

    def sample(self, y_clean: Tensor, generator: NoiseSeed = None) -> Tensor:
        """Scaled Poisson counts (same shape, dtype and device as ``y_clean``)."""
        lam = self._lam(y_clean)
        if generator is None or isinstance(generator, torch.Generator):
            k = torch.poisson(lam, generator=generator)
        else:
            seeds = (
                range(generator, generator + lam.shape[0])
                if isinstance(generator, int)
                else list(generator)
            )
            if len(seeds) != lam.shape[0]:
                raise ValueError(f"got {len(seeds)} seeds for a batch of {lam.shape[0]}")
            # per-sample generators on the CPU in float64: values independent of the batch
            k = torch.stack(
                [
                    torch.poisson(
                        lam[i].detach().to("cpu", torch.float64),
                        generator=torch.Generator().manual_seed(int(s)),
                    )
                    for i, s in enumerate(seeds)
                ]
            ).to(device=lam.device, dtype=lam.dtype)
        return k / self.rate

    __call__ = sample

    def log_likelihood(self, y: Tensor, y_clean: Tensor) -> Tensor:
        """``log P(k | rate * y_clean)`` per sample ``[B]`` with ``k = round(rate * y)``
        (the probability of the observed counts)."""
        lam = self._lam(y_clean)
        k = torch.round(y * self.rate)
        return (torch.xlogy(k, lam) - lam - torch.lgamma(k + 1)).sum(_dims(k))

    def __repr__(self) -> str:
        return f"PoissonNoise(rate={self.rate})"
