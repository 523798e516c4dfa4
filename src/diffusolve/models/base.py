"""The Denoiser contract: ``model(x, t, cond=None) -> x0_hat`` carrying its process.

A denoiser returns the Tweedie estimate ``E[x0 | x_t = x]`` for a batch ``x`` at time ``t``
of its :class:`~diffusolve.process.Process`. ``t`` is a float64 tensor, either 0-d (one
time for the batch) or of shape ``[B]``. (Networks wrapped by :func:`from_callable` get it
in their own dtype; see :class:`CallableDenoiser`.) Every other parameterisation (epsilon, v, score,
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
    # the quantile in the estimate's own precision (float64 stays float64); half types
    # are not supported by torch.quantile and go through float32
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(work, ratio, dim=1).to(x0.dtype)
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
    """Wrap any network or callable ``fn(x, t[, cond]) -> prediction`` with a declared
    prediction type.

    Args:
        fn: the network: a ``torch.nn.Module`` (its ``forward`` is inspected) or any callable.
        process: the process the network was trained on.
        prediction: one of ``"epsilon"``, ``"x0"``, ``"v"``, ``"score"``, ``"velocity"``.
        time_map: converts process time (float64) to the network's time input (default
            identity), e.g. ``lambda t: t * 1000`` for a network trained on ``t * 1000``.
        accepts_cond: whether ``fn`` takes ``cond``. By default it is read from the
            signature: ``cond`` goes to a parameter named ``cond`` (by keyword), else to a
            third positional parameter *without* a default (``def f(x, t, y)``); never to a
            parameter with a default (``def f(x, t, scale=1.0)`` gets no ``cond``). When the
            signature cannot tell (``*args``, builtins), ``cond`` is passed only when it is
            not ``None``.
        batch_time: pass ``t`` as a 1-D tensor ``[B]`` (one time per sample). Default: yes
            for a ``torch.nn.Module`` (networks with time embeddings expect ``[B]``), and
            ``t`` as the solver gives it (0-d for a time shared by the batch, or ``[B]``)
            for other callables.

    How the network is called: ``x`` in the network's dtype (a module's first floating
    parameter or buffer; ``x``'s dtype for other callables), ``t`` (after ``time_map``, if
    it is floating) in the same dtype on ``x``'s device; the output is converted back to
    ``x``'s dtype and then to the x0 estimate.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from diffusolve.process import vp_linear
        >>> from diffusolve.models import from_callable
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(4, 3)
        ...     def forward(self, x, t):  # t: [B], in the module's dtype
        ...         return self.lin(torch.cat([x, t[:, None]], dim=1))
        >>> model = from_callable(Net(), vp_linear(), "epsilon")
        >>> model(torch.ones(2, 3, dtype=torch.float64), 0.5).dtype
        torch.float64
        >>> zero = from_callable(lambda x, t: torch.zeros_like(x), vp_linear(), "epsilon")
        >>> x = torch.ones(2, 3)
        >>> torch.allclose(zero(x, 0.5), x / vp_linear().alpha(0.5).float())
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
        batch_time: bool | None = None,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if not callable(fn):
            raise TypeError(f"fn must be a network or a callable, got {type(fn).__name__}")
        self.fn = fn
        self.process = process
        self.prediction = prediction
        self.time_map = time_map
        self.is_module = isinstance(fn, torch.nn.Module)
        mode = _cond_mode(fn)
        if accepts_cond is True:
            mode = "keyword" if mode == "keyword" else "positional"
        elif accepts_cond is False:
            mode = "none"
        self.cond_mode = mode
        self.accepts_cond = mode != "none"
        self.batch_time = self.is_module if batch_time is None else bool(batch_time)

    def _net_dtype(self, x: Tensor) -> torch.dtype:
        if self.is_module:
            for tensor in (*self.fn.parameters(), *self.fn.buffers()):
                if tensor.is_floating_point():
                    return tensor.dtype
        return x.dtype

    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        b = x.shape[0]
        tin = t
        if self.batch_time:
            if tin.ndim == 0:
                tin = tin.expand(b)
            elif tin.shape != (b,):
                raise ValueError(f"t must be 0-d or of shape [{b}], got {tuple(tin.shape)}.")
        if self.time_map is not None:
            tin = self.time_map(tin)
        dt = self._net_dtype(x)
        if isinstance(tin, Tensor):
            tin = tin.to(device=x.device, dtype=dt if tin.is_floating_point() else None)
        xin = x.to(dt)
        mode = self.cond_mode
        if mode == "auto":
            mode = "none" if cond is None else "positional"
        if mode == "positional":
            out = self.fn(xin, tin, cond)
        elif mode == "keyword":
            out = self.fn(xin, tin, cond=cond)
        else:
            if cond is not None:
                raise ValueError(
                    "this network takes no cond (its signature has no `cond` parameter and "
                    "no third positional one without a default); pass accepts_cond=True to "
                    "from_callable to force it."
                )
            out = self.fn(xin, tin)
        if not isinstance(out, Tensor):
            raise TypeError(f"the network returned {type(out).__name__}, expected a tensor")
        if out.shape != x.shape:
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} for input shape {tuple(x.shape)}; "
                "a denoiser's output must have the input's shape."
            )
        return to_x0(self.process, x, t, out.to(x.dtype), self.prediction)


def _cond_mode(fn: Callable[..., Any]) -> str:
    """How to pass ``cond`` to ``fn``: ``"keyword"`` (a parameter named ``cond``),
    ``"positional"`` (a third positional parameter without a default), ``"none"``, or
    ``"auto"`` (the signature cannot tell: pass cond only when it is not None)."""
    import inspect

    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return "auto"
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    named = sig.parameters.get("cond")
    if named is not None:
        return "positional" if named.kind == named.POSITIONAL_ONLY else "keyword"
    if len(positional) >= 3 and positional[2].default is inspect.Parameter.empty:
        return "positional"
    if len(positional) < 3 and any(p.kind == p.VAR_POSITIONAL for p in params):
        return "auto"
    return "none"


def from_callable(
    fn: Callable[..., Tensor],
    process: Process,
    prediction: str = "epsilon",
    **kwargs: Any,
) -> CallableDenoiser:
    """Wrap a network (``torch.nn.Module`` or callable) as a Denoiser; see
    :class:`CallableDenoiser` for how ``x``, ``t`` and ``cond`` are passed."""
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
