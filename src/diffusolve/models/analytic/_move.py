"""``prior.to(device=None, dtype=None)``: a moved copy of an analytic prior.

Analytic priors hold their parameters as tensors (means, eigenvectors, data points) and
compute in the dtype of those tensors (float64 unless moved). ``to`` returns a copy whose
every tensor (nested priors included) lives on ``device`` with floating tensors in
``dtype``; the original is unchanged (the priors are used as immutable values).

Inputs on another device or in another dtype are accepted: a prior computes on its own
device and in its own dtype, and returns results on the input's device in the input's dtype
(densities keep the prior's dtype). Move the prior next to the data (``gmm.to(x.device)``)
to avoid the copies.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

__all__ = ["Movable"]

_T = TypeVar("_T", bound="Movable")
#: dtypes an exact prior computes in (linear algebra in half precision is unsupported)
COMPUTE_DTYPES = (torch.float32, torch.float64)


def _move(value: Any, device: Any, dtype: torch.dtype | None) -> Any:
    if isinstance(value, Tensor):
        if value.is_floating_point():
            return value.to(device=device, dtype=dtype)
        return value.to(device=device)
    if isinstance(value, Movable):
        return value.to(device=device, dtype=dtype)
    if isinstance(value, list):
        return [_move(v, device, dtype) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_move(v, device, dtype) for v in value)
    return value


class Movable:
    """Mixin: ``device``, ``dtype`` and ``to(device, dtype)`` of an analytic prior.

    ``_anchor`` names the attribute whose device and dtype are the prior's.
    """

    _anchor: ClassVar[str]

    @property
    def device(self) -> torch.device:
        """The device the prior computes on."""
        return getattr(self, self._anchor).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the prior computes in (float64 unless moved)."""
        return getattr(self, self._anchor).dtype

    def to(
        self: _T, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> _T:
        """A copy with every tensor on ``device`` and floating tensors in ``dtype``
        (``None``: unchanged). ``dtype`` must be float32 or float64.

        Example:
            >>> import torch
            >>> from diffusolve.models import GaussianMixture
            >>> from diffusolve.process import edm
            >>> gmm = GaussianMixture.random(3, 2, process=edm(), seed=0)
            >>> g32 = gmm.to(dtype=torch.float32)
            >>> g32.dtype, gmm.dtype, g32.means.dtype
            (torch.float32, torch.float64, torch.float32)
        """
        if dtype is not None and dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"an exact prior computes in float32 or float64, got {dtype}; run a network "
                "in half precision with diffusolve.models.NetworkPrecision instead"
            )
        out = copy.copy(self)
        out.__dict__ = {k: _move(v, device, dtype) for k, v in self.__dict__.items()}
        return out

    def _input(self, x: Tensor) -> Tensor:
        """``x`` flattened to ``[B, d]`` on the prior's device, in its dtype."""
        return x.reshape(x.shape[0], -1).to(device=self.device, dtype=self.dtype)
