"""Injected noise for stochastic solvers.

A noise source is a callable ``noise(shape, dtype=..., device=...) -> Tensor`` whose first
dimension is the batch. :class:`SeededNoise` gives every sample its own generator, so a
sample's noise (and therefore its result) does not depend on the batch it is drawn in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["NoiseSource", "SeededNoise", "GeneratorNoise", "as_noise_source"]


class NoiseSource(Protocol):
    def __call__(
        self, shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str | None
    ) -> Tensor: ...


class SeededNoise:
    """Per-sample seeded standard normal noise.

    Example:
        >>> from diffusolve.solvers.noise import SeededNoise
        >>> a = SeededNoise([3, 4])((2, 5), dtype=torch.float32, device=None)
        >>> b = SeededNoise([4])((1, 5), dtype=torch.float32, device=None)
        >>> bool(torch.equal(a[1], b[0]))
        True
    """

    def __init__(self, seeds: Sequence[int]) -> None:
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def __call__(
        self, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32, device=None
    ) -> Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(
                f"SeededNoise holds {len(self.generators)} seeds but a batch of {shape[0]} "
                "was requested; give one seed per sample."
            )
        # draw in float64 on the CPU so the values do not depend on dtype or device
        out = torch.stack(
            [
                torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float64)
                for g in self.generators
            ]
        )
        return out.to(dtype=dtype, device=device)


class GeneratorNoise:
    """Batch noise from one ``torch.Generator`` (depends on the batch size)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(
        self, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32, device=None
    ) -> Tensor:
        gdev = self.generator.device if self.generator is not None else device
        return torch.randn(tuple(shape), generator=self.generator, dtype=dtype, device=gdev).to(
            device
        )


def as_noise_source(
    noise: NoiseSource | torch.Generator | Sequence[int] | int | None, batch: int
) -> NoiseSource:
    """Normalise the ``noise`` argument of :func:`diffusolve.sample`.

    ``int`` seed ``s`` means per-sample seeds ``s, s+1, ..., s+batch-1``; a sequence gives
    the seeds explicitly; a generator or ``None`` uses batch noise.
    """
    if noise is None or isinstance(noise, torch.Generator):
        return GeneratorNoise(noise)
    if isinstance(noise, int):
        return SeededNoise(range(noise, noise + batch))
    if isinstance(noise, Sequence):
        return SeededNoise(noise)
    if callable(noise):
        return noise
    raise TypeError(f"cannot use {type(noise).__name__} as a noise source")
