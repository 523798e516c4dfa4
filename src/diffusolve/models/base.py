"""The Denoiser contract: ``model(x, t, cond=None) -> x0_hat`` carrying its process.

A denoiser returns the Tweedie estimate ``E[x0 | x_t = x]`` for a batch ``x`` at time ``t``
of its :class:`~diffusolve.process.Process`. ``t`` is a float64 tensor, either 0-d (one
time for the batch) or of shape ``[B]``. Every other parameterisation (epsilon, v, score,
flow velocity) is converted with :mod:`diffusolve.process.param`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..process import PREDICTIONS, Process, as_time, from_x0, to_x0

__all__ = [
    "Denoiser",
    "CallableDenoiser",
    "from_callable",
    "DynamicThresholding",
    "dynamic_threshold",
]


def dynamic_threshold(x0: Tensor, ratio: float = 0.995, max_value: float = 1.0) -> Tensor:
    """Dynamic thresholding (Saharia et al. 2022): per sample ``s = clip(q_ratio(|x0|), 1, max)``,
    then ``clamp(x0, -s, s) / s``."""
    flat = x0.reshape(x0.shape[0], -1).abs()
    s = torch.quantile(flat.float(), ratio, dim=1).to(x0.dtype)
    s = torch.clamp(s, min=1.0, max=max_value).reshape((-1,) + (1,) * (x0.ndim - 1))
    return torch.clamp(x0, -s, s) / s


class Denoiser:
    """Base class of every model: analytic priors, adapters, wrappers.

    Subclasses set ``self.process`` and implement :meth:`denoise`.
    """

    process: Process

    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        return self.denoise(x, as_time(t), cond)

    def predict(
        self, x: Tensor, t: Tensor | float, kind: str = "epsilon", cond: Any = None
    ) -> Tensor:
        """The model output in another parameterisation (``epsilon``, ``v``, ``score``, ...)."""
        return from_x0(self.process, x, t, self(x, t, cond), kind)


class CallableDenoiser(Denoiser):
    """Wrap any callable ``fn(x, t, cond) -> prediction`` with a declared prediction type.

    Args:
        fn: the network. Called as ``fn(x, time_map(t), cond)`` or, with
            ``accepts_cond=False``, ``fn(x, time_map(t))``.
        process: the process the network was trained on.
        prediction: one of ``"epsilon"``, ``"x0"``, ``"v"``, ``"score"``, ``"velocity"``.
        time_map: converts process time to the network's time input (default identity).
        accepts_cond: whether ``fn`` takes a third ``cond`` argument.

    Example:
        >>> import torch
        >>> from diffusolve.process import vp_linear
        >>> from diffusolve.models import from_callable
        >>> model = from_callable(lambda x, t: torch.zeros_like(x), vp_linear(), "epsilon")
        >>> x = torch.ones(2, 3)
        >>> torch.allclose(model(x, 0.5), x / vp_linear().alpha(0.5).float())
        True
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        process: Process,
        prediction: str = "epsilon",
        *,
        time_map: Callable[[Tensor], Tensor] | None = None,
        accepts_cond: bool | None = None,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.fn = fn
        self.process = process
        self.prediction = prediction
        self.time_map = time_map
        if accepts_cond is None:
            accepts_cond = _takes_three_args(fn)
        self.accepts_cond = accepts_cond

    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        tin = self.time_map(t) if self.time_map is not None else t
        if self.accepts_cond:
            out = self.fn(x, tin, cond)
        else:
            if cond is not None:
                raise ValueError("this model was wrapped with accepts_cond=False but got a cond.")
            out = self.fn(x, tin)
        if out.shape != x.shape:
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} for input shape {tuple(x.shape)}; "
                "a denoiser's output must have the input's shape."
            )
        return to_x0(self.process, x, t, out, self.prediction)


def _takes_three_args(fn: Callable[..., Any]) -> bool:
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    params = [
        p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    has_var = any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())
    return has_var or len(params) >= 3


def from_callable(
    fn: Callable[..., Tensor],
    process: Process,
    prediction: str = "epsilon",
    **kwargs: Any,
) -> CallableDenoiser:
    """Shorthand for :class:`CallableDenoiser`."""
    return CallableDenoiser(fn, process, prediction, **kwargs)


class DynamicThresholding(Denoiser):
    """Dynamic thresholding of the x0 estimate (Saharia et al. 2022, Imagen).

    Per sample, ``s = max(quantile(|x0|, ratio), 1)`` clipped to ``max_value``; the
    estimate is clamped to ``[-s, s]`` and divided by ``s``. Only meaningful for
    pixel-space models whose data lie in ``[-1, 1]``. Wrap any denoiser; every solver then
    sees the thresholded estimate (DPM-Solver++ uses it this way).
    """

    def __init__(self, model: Denoiser, ratio: float = 0.995, max_value: float = 1.0) -> None:
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.model = model
        self.process = model.process
        self.ratio = float(ratio)
        self.max_value = float(max_value)

    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return dynamic_threshold(self.model(x, t, cond), self.ratio, self.max_value)
