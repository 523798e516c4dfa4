"""The consistency-model boundary parameterisation (Song et al. 2023; Luo et al. 2023, LCM).

A consistency function ``f(x_t, t)`` must satisfy the boundary condition ``f(x, t_min) = x``.
Consistency models build it in:

    f(x, t) = c_skip(t) x + c_out(t) F(x, t),
    c_skip(t) = sigma_data^2 / (s^2 + sigma_data^2),   c_out(t) = s / sqrt(s^2 + sigma_data^2),
    s = timestep_scaling * t,

with ``F`` the network's clean estimate. Latent Consistency Models use ``sigma_data = 0.5``
and ``timestep_scaling = 10`` on the DDPM timestep ``t`` in ``0 .. 999``, so
``c_skip(0) = 1``, ``c_out(0) = 0`` and both are within ``1e-5`` of ``0`` and ``1`` from
``t = 19`` (the first point of the 50-step skipping grid) on.

A folder that holds a ``consistency.json`` (``{"sigma_data": 0.5, "timestep_scaling": 10}``)
is wrapped in :class:`ConsistencyBoundary` by :func:`diffusolve.models.load`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .base import Denoiser

__all__ = ["BoundaryScalings", "ConsistencyBoundary", "CONFIG_NAME"]

#: the file in a model folder that asks :func:`~diffusolve.models.load` for the wrapper
CONFIG_NAME = "consistency.json"


@dataclass(frozen=True)
class BoundaryScalings:
    """``c_skip`` and ``c_out`` of the consistency parameterisation (LCM defaults).

    Example:
        >>> b = BoundaryScalings()
        >>> b.c_skip(0.0), b.c_out(0.0)
        (1.0, 0.0)
        >>> round(b.c_out(999.0), 6)
        1.0
    """

    sigma_data: float = 0.5
    timestep_scaling: float = 10.0

    def __post_init__(self) -> None:
        for name in ("sigma_data", "timestep_scaling"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")

    def c_skip(self, t: Tensor | float) -> Any:
        s = self.timestep_scaling * t
        return self.sigma_data**2 / (s**2 + self.sigma_data**2)

    def c_out(self, t: Tensor | float) -> Any:
        s = self.timestep_scaling * t
        if isinstance(s, Tensor):
            return s / torch.sqrt(s**2 + self.sigma_data**2)
        return s / math.sqrt(s**2 + self.sigma_data**2)

    def apply(self, x: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """``c_skip(t) x + c_out(t) x0`` (``t`` 0-d or ``[B]``, broadcast over ``x``)."""
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        if t.ndim == 1:
            t = t.view(-1, *([1] * (x.ndim - 1)))
        return (self.c_skip(t).to(x.dtype) * x) + (self.c_out(t).to(x.dtype) * x0)

    def save(self, folder: str | Path) -> None:
        (Path(folder) / CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, folder: str | Path) -> BoundaryScalings | None:
        """The scalings stored in ``folder``, or ``None`` when it has no ``consistency.json``."""
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        unknown = set(data) - {"sigma_data", "timestep_scaling"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        return cls(**data)


class ConsistencyBoundary(Denoiser):
    """``f(x, t, cond) = c_skip(t) x + c_out(t) model(x, t, cond)``: a denoiser with the
    consistency boundary condition ``f(x, 0) = x`` built in.

    Linear in the inner model's output, so classifier-free guidance of ``f`` equals
    guidance of the inner x0 estimate followed by the scalings.

    Example:
        >>> import torch
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import ddpm
        >>> inner = Gaussian(torch.zeros(2), torch.eye(2), process=ddpm())
        >>> f = ConsistencyBoundary(inner)
        >>> x = torch.randn(3, 2, dtype=torch.float64)
        >>> bool(torch.equal(f(x, 0.0), x))
        True
    """

    def __init__(self, model: Any, scalings: BoundaryScalings | None = None) -> None:
        self.model = model
        self.process = model.process
        self.scalings = scalings or BoundaryScalings()

    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.scalings.apply(x, t, self.model(x, t, cond))

    @property
    def unet(self) -> Any:
        return self.model.unet

    def __repr__(self) -> str:
        return f"ConsistencyBoundary({self.model!r}, {self.scalings!r})"
