"""How far a learned score is from a gradient field.

A vector field is conservative (a gradient) exactly when its Jacobian is symmetric. The
true score ``grad log p_t`` is, and so is the true denoiser ``D = (x + sigma^2 score) /
alpha``: ``J_D = (I + sigma^2 H) / alpha`` with ``H`` the Hessian of ``log p_t``. A network
need not be; Horvat & Pfister ("On gauge freedom, conservativity and intrinsic
dimensionality estimation in diffusion models", ICLR 2024) show that exact sampling and
densities need only the conservative part, but reading local geometry (intrinsic
dimension) from the field needs conservativity. The measure here is the relative asymmetry

    ``||J - J^T||_F / ||J||_F``

of the score Jacobian ``J_s = (alpha J_D - I) / sigma^2`` (and, in ``info``, of ``J_D``),
with the exact Jacobian from ``d`` vector-Jacobian products (one replicated batch).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..process import as_time
from ._field import _rep_cond, jacobian

__all__ = ["asymmetry"]


def asymmetry(
    model: Any,
    x: Tensor,
    t: float | Tensor,
    cond: Any = None,
    *,
    dtype: torch.dtype = torch.float64,
    max_rows: int = 4096,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Relative asymmetry ``||J - J^T||_F / ||J||_F`` of the score Jacobian at ``(x, t)``.

    Args:
        model: a denoiser with its ``process``.
        x: ``[B, ...]`` states at time ``t`` (e.g. data noised to ``t``).
        t: one process time for the batch.
        cond: the model's condition (a per-sample tensor is split with the batch).

    Returns:
        ``(rel [B] float64, info)`` with ``info["denoiser"]`` (the same measure for ``J_D``)
        and ``info["frobenius"]`` (``||J_s||_F``).

    Example:
        >>> import torch
        >>> from diffusolve.models import GaussianMixture
        >>> from diffusolve.process import vp_linear
        >>> g = GaussianMixture.random(4, 3, process=vp_linear(), seed=0)
        >>> rel, info = asymmetry(g, torch.randn(2, 4, dtype=torch.float64), 0.3)
        >>> bool(rel.max() < 1e-13)
        True
    """
    tt = as_time(t)
    if tt.ndim != 0:
        raise ValueError("asymmetry takes one time for the batch (a float or a 0-d tensor)")
    proc = model.process
    a, s = float(proc.alpha(tt)), float(proc.sigma(tt))
    b = x.shape[0]
    xd = x.to(dtype)

    def fn(xr: Tensor, rows: Tensor) -> Tensor:
        return model(xr, tt, _rep_cond(cond, b, rows)).to(dtype)

    jd = jacobian(fn, xd, max_rows=max_rows).to(torch.float64)
    eye = torch.eye(jd.shape[1], dtype=torch.float64)
    js = (a * jd - eye) / s**2

    def rel(j: Tensor) -> Tensor:
        return torch.linalg.matrix_norm(j - j.transpose(1, 2)) / torch.linalg.matrix_norm(j)

    return rel(js), {"denoiser": rel(jd), "frobenius": torch.linalg.matrix_norm(js)}
