"""The noise process: ``x_t = alpha(t) * x_0 + sigma(t) * eps``.

Every process in diffusolve (VP, VE, EDM, rectified flow, linear stochastic interpolants,
discrete DDPM schedules) is an instance of :class:`Process`. Solvers only ever see
``alpha(t)``, ``sigma(t)`` and ``lambda(t) = log(alpha / sigma)`` (here ``lam``), so every
solver works on every process.

Times are float64 tensors (or Python floats); every method returns a float64 tensor so
that step coefficients are computed in double precision whatever the sample dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["Process", "as_time", "seeded_normal"]


def as_time(t: Tensor | float) -> Tensor:
    """Return ``t`` as a float64 tensor (no copy when it already is one)."""
    if isinstance(t, Tensor):
        return t.to(torch.float64)
    return torch.tensor(float(t), dtype=torch.float64)


def seeded_normal(
    seeds: Sequence[int],
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard normal noise of ``shape`` with sample ``i`` drawn from its own generator
    seeded with ``seeds[i]`` (in float64 on the CPU, so the values depend on neither dtype
    nor device nor batch)."""
    seeds = list(seeds)
    if not shape or len(seeds) != shape[0]:
        raise ValueError(
            f"{len(seeds)} seeds for a batch of {shape[0] if shape else 0}; give one seed per "
            "sample (or one int seed for seeds s, s+1, ...)"
        )
    out = torch.stack(
        [
            torch.randn(
                tuple(shape[1:]),
                generator=torch.Generator().manual_seed(int(s)),
                dtype=torch.float64,
            )
            for s in seeds
        ]
    )
    return out.to(dtype=dtype, device=device)


class Process:
    """A linear Gaussian noise process ``x_t = alpha(t) x_0 + sigma(t) eps``.

    Subclasses override :meth:`alpha` and :meth:`sigma` (and, where a closed form exists,
    :meth:`t_of_lambda`). Time runs from ``t_min`` (almost clean) to ``t_max`` (almost pure
    noise); ``lambda(t)`` must be strictly decreasing in ``t`` on that interval.

    Args:
        alpha: callable ``t -> alpha(t)`` on float64 tensors.
        sigma: callable ``t -> sigma(t)`` on float64 tensors.
        t_min: smallest time used by samplers (the final denoise happens here).
        t_max: largest time; samplers start here from :meth:`prior_sample`.
        name: short name used in tables.

    Example:
        >>> import torch
        >>> from diffusolve.process import Process
        >>> p = Process(lambda t: torch.cos(t * torch.pi / 2), lambda t: torch.sin(t * torch.pi / 2),
        ...             t_min=1e-3, t_max=1 - 1e-3, name="trig")
        >>> abs(float(p.lam(0.5))) < 1e-12
        True
    """

    def __init__(
        self,
        alpha: Callable[[Tensor], Tensor] | None = None,
        sigma: Callable[[Tensor], Tensor] | None = None,
        *,
        t_min: float,
        t_max: float,
        name: str = "process",
    ) -> None:
        if not (t_max > t_min):
            raise ValueError(f"t_max ({t_max}) must be larger than t_min ({t_min}).")
        self._alpha_fn = alpha
        self._sigma_fn = sigma
        self.t_min = float(t_min)
        self.t_max = float(t_max)
        self.name = name

    # ----------------------------------------------------------------- core functions
    def alpha(self, t: Tensor | float) -> Tensor:
        """Signal scale ``alpha(t)`` (float64)."""
        if self._alpha_fn is None:
            raise NotImplementedError
        return self._alpha_fn(as_time(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        """Noise scale ``sigma(t)`` (float64)."""
        if self._sigma_fn is None:
            raise NotImplementedError
        return self._sigma_fn(as_time(t))

    def lam(self, t: Tensor | float) -> Tensor:
        """Half log signal-to-noise ratio ``lambda(t) = log(alpha(t) / sigma(t))``."""
        t = as_time(t)
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def t_of_lambda(self, lam: Tensor | float) -> Tensor:
        """Inverse of :meth:`lam` on ``[t_min, t_max]`` (bisection unless overridden)."""
        lam = as_time(lam)
        lo = torch.full_like(lam, self.t_min)
        hi = torch.full_like(lam, self.t_max)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            above = self.lam(mid) > lam  # lambda decreases with t: target lies later
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
            if torch.all(hi - lo <= 1e-15 * max(1.0, abs(self.t_max))):
                break
        return 0.5 * (lo + hi)

    def d_alpha(self, t: Tensor | float) -> Tensor:
        """Time derivative of ``alpha`` (autograd in float64 unless overridden)."""
        return self._derivative(self.alpha, t)

    def d_sigma(self, t: Tensor | float) -> Tensor:
        """Time derivative of ``sigma`` (autograd in float64 unless overridden)."""
        return self._derivative(self.sigma, t)

    @staticmethod
    def _derivative(fn: Callable[[Tensor], Tensor], t: Tensor | float) -> Tensor:
        t = as_time(t).detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y = fn(t)
            if not y.requires_grad:  # constant in t (e.g. alpha = 1 for VE/EDM)
                return torch.zeros_like(t).detach()
            (g,) = torch.autograd.grad(y.sum(), t, allow_unused=True)
        return torch.zeros_like(t).detach() if g is None else g.detach()

    # ----------------------------------------------------------------- helpers
    def sigma_tilde(self, t: Tensor | float) -> Tensor:
        """``sigma(t) / alpha(t) = exp(-lambda(t))``, the EDM noise level of ``x / alpha``."""
        return torch.exp(-self.lam(t))

    def t_of_sigma_tilde(self, s: Tensor | float) -> Tensor:
        """Inverse of :meth:`sigma_tilde`."""
        return self.t_of_lambda(-torch.log(as_time(s)))

    def prior_sample(
        self,
        shape: tuple[int, ...] | torch.Size,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        noise: int | Sequence[int] | torch.Generator | Callable[..., Tensor] | None = None,
    ) -> Tensor:
        """A sample of ``x_{t_max}`` for zero-mean unit-scale data: ``sigma(t_max) * eps``.

        ``noise`` takes the same values as :func:`diffusolve.sample`'s: an int seed ``s``
        (per-sample seeds ``s, s+1, ...``), a list of per-sample seeds, a
        ``torch.Generator`` or a noise source (``noise(shape, dtype=, device=)``, e.g.
        :class:`diffusolve.solvers.SeededNoise`). With per-sample seeds a sample's noise
        does not depend on its batch, and equals what ``SeededNoise`` draws. Otherwise
        ``generator`` (positional) is used.

        Example:
            >>> from diffusolve.process import ddpm
            >>> a = ddpm().prior_sample((3, 2), noise=5)
            >>> b = ddpm().prior_sample((1, 2), noise=[7])
            >>> bool(torch.equal(a[2], b[0]))
            True
        """
        shape = tuple(shape)
        if isinstance(noise, torch.Generator):
            if generator is not None:
                raise ValueError("pass either generator or noise, not both")
            generator, noise = noise, None
        if noise is None:
            eps = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        else:
            if generator is not None:
                raise ValueError("pass either generator or noise, not both")
            if isinstance(noise, (bool, str, bytes)):
                raise TypeError("noise must be an int seed, a list of seeds or a noise source")
            if isinstance(noise, int):
                eps = seeded_normal(range(noise, noise + shape[0]), shape, dtype, device)
            elif isinstance(noise, Sequence) or (
                isinstance(noise, Tensor) and noise.ndim == 1 and not noise.is_floating_point()
            ):
                eps = seeded_normal([int(s) for s in noise], shape, dtype, device)
            elif callable(noise):
                eps = noise(shape, dtype=dtype, device=device)
            else:
                raise TypeError(
                    f"noise must be an int seed, a list of per-sample seeds, a torch.Generator "
                    f"or a noise source, got {type(noise).__name__}"
                )
        return eps * float(self.sigma(self.t_max))

    def marginal(self, x0: Tensor, t: Tensor | float, eps: Tensor) -> Tensor:
        """``alpha(t) x0 + sigma(t) eps`` (forward noising)."""
        return float(self.alpha(t)) * x0 + float(self.sigma(t)) * eps

    def validate(self) -> None:
        """Check that lambda is finite and strictly decreasing on ``[t_min, t_max]``."""
        ts = torch.linspace(self.t_min, self.t_max, 257, dtype=torch.float64)
        lam = self.lam(ts)
        if not torch.all(torch.isfinite(lam)):
            raise ValueError(f"{self.name}: lambda(t) is not finite on [t_min, t_max].")
        if not torch.all(lam[1:] < lam[:-1]):
            raise ValueError(f"{self.name}: lambda(t) must decrease strictly on [t_min, t_max].")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, t_min={self.t_min:g}, t_max={self.t_max:g})"
        )
