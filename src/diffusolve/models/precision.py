"""Network precision and compilation: the network's dtype is not the solver state's.

Two ways to run a network in half precision while the solver state (and every x0
conversion) stays float32 or float64:

* a half model: ``diffusolve.models.load("digits", dtype=torch.bfloat16)`` (or
  ``from_diffusers(unet, cfg, dtype=...)``). The adapters cast the network's input to the
  network's dtype and its output back to the state's dtype *before* converting the
  prediction to x0 (:func:`diffusolve.process.to_x0`), so no division by a small ``alpha`` or
  ``sigma`` happens in half precision (at ``sigma -> 0`` the epsilon / v conversions are
  where half-precision states overflow or lose every digit).
* :class:`NetworkPrecision`: a denoiser wrapper that runs the inner denoiser under
  ``torch.autocast`` (weights stay in their dtype; matrix products and convolutions run in
  ``dtype``) and returns the estimate in the state's dtype.

:func:`compile_network` puts ``torch.compile`` on the networks (``nn.Module`` attributes
``unet``/``fn``) inside a denoiser chain, never on the Python solver loop; when compilation
is unavailable or fails the network runs eagerly after one clear warning.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor

from .base import Denoiser

__all__ = ["NetworkPrecision", "compile_network", "networks", "HALF_DTYPES"]

HALF_DTYPES = (torch.float16, torch.bfloat16)
#: attributes of a denoiser that hold its network (adapters) or the wrapped denoiser
_NET_ATTRS = ("unet", "fn")
_INNER_ATTRS = ("model", "base", "net")


class NetworkPrecision(Denoiser):
    """Run ``model`` under ``torch.autocast(dtype)`` with the state in its own dtype.

    Args:
        model: any denoiser (the bundled model, an adapter, a guided model).
        dtype: ``torch.bfloat16`` (default) or ``torch.float16``: the dtype of autocast's
            matrix products and convolutions. float16 on CPU needs a recent torch.
        enabled: ``False`` runs ``model`` as is (for A/B comparisons with one object).

    The estimate is returned in ``x``'s dtype. Autocast leaves element-wise arithmetic in
    the input's precision, so the prediction-to-x0 conversion of the adapters runs in the
    state's dtype (see the module docstring). For a half *model* (weights converted once,
    less memory, usually faster) load it with ``dtype=`` instead.

    Example:
        >>> import torch, diffusolve
        >>> from diffusolve.models import load, NetworkPrecision
        >>> model = NetworkPrecision(load("digits"), torch.bfloat16)
        >>> x = model.process.prior_sample((2, 1, 16, 16), noise=0)
        >>> with torch.no_grad():
        ...     out = diffusolve.sample(model, x, 5, "dpmpp_2m", cond=[3, 7])
        >>> out.dtype, bool(torch.isfinite(out).all())
        (torch.float32, True)
    """

    def __init__(
        self, model: Any, dtype: torch.dtype = torch.bfloat16, *, enabled: bool = True
    ) -> None:
        if dtype not in HALF_DTYPES:
            raise ValueError(
                f"NetworkPrecision runs a network in float16 or bfloat16, got {dtype}; for "
                "float32/float64 networks convert the model (load(name, dtype=...))"
            )
        self.model = model
        self.process = model.process
        self.dtype = dtype
        self.enabled = bool(enabled)

    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if not self.enabled:
            return self.model(x, t, cond)
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            out = self.model(x, t, cond)
        return out.to(x.dtype)

    def __getattr__(self, name: str) -> Any:  # labels, null_cond, tokenizer, ... of the inner
        if name in ("model", "process", "dtype", "enabled"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        return f"NetworkPrecision({self.model!r}, {self.dtype})"


def networks(model: Any) -> list[torch.nn.Module]:
    """The ``nn.Module`` networks inside a denoiser chain (through ``model``/``base``/``net``
    attributes), outermost first, each once.

    Example:
        >>> from diffusolve.models import load
        >>> nets = networks(load("digits"))
        >>> len(nets), type(nets[0]).__name__
        (1, 'UNet2DModel')
    """
    found: list[torch.nn.Module] = []
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if obj is None or id(obj) in seen or depth > 16:
            return
        seen.add(id(obj))
        for attr in _NET_ATTRS:
            net = obj.__dict__.get(attr) if hasattr(obj, "__dict__") else None
            if isinstance(net, _CompiledNetwork):
                net = net.module
            if isinstance(net, torch.nn.Module) and all(net is not f for f in found):
                found.append(net)
        for attr in _INNER_ATTRS:
            inner = obj.__dict__.get(attr) if hasattr(obj, "__dict__") else None
            if inner is not None and not isinstance(inner, (Tensor, torch.nn.Module)):
                visit(inner, depth + 1)

    visit(model, 0)
    return found


class _CompiledNetwork:
    """``torch.compile(module)`` with the module's attributes, falling back to eager.

    The first failure of a compiled call (no compiler, an unsupported operation) is retried
    eagerly; when the eager call succeeds the failure is reported once as a warning and the
    network stays eager from then on. Errors of the network itself (the eager call fails
    too) are raised as they are.
    """

    def __init__(self, module: torch.nn.Module, compiled: Any) -> None:
        self.module = module
        self.compiled = compiled
        self.failed: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - any compiler failure falls back
                out = self.module(*args, **kwargs)
                self.failed = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
                warnings.warn(
                    f"torch.compile failed for {type(self.module).__name__} "
                    f"({self.failed[:300]}); the network runs eagerly (same results, no "
                    "speed-up). Install a C compiler or pass compile=False.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return out
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # config, dtype, device, attn processors, ...
        if name in ("module", "compiled", "failed"):
            raise AttributeError(name)
        return getattr(self.module, name)

    def __repr__(self) -> str:
        state = "eager fallback" if self.failed else "compiled"
        return f"compiled[{state}]({type(self.module).__name__})"


#: one compiled wrapper per network, so repeated sample(compile=True) calls reuse it
_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, _CompiledNetwork] = weakref.WeakKeyDictionary()


def _compiled(module: torch.nn.Module, options: dict[str, Any]) -> _CompiledNetwork | None:
    key = tuple(sorted(options.items()))
    hit = _CACHE.get(module)
    if hit is not None and getattr(hit, "_key", None) == key:
        return hit
    compile_fn = getattr(torch, "compile", None)
    if compile_fn is None:
        warnings.warn(
            "torch.compile is unavailable in this torch; the network runs eagerly",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    try:
        wrapped = _CompiledNetwork(module, compile_fn(module, **options))
    except Exception as err:  # noqa: BLE001 - e.g. an unsupported Python version
        warnings.warn(
            f"torch.compile is unavailable ({type(err).__name__}: {err}); the network runs eagerly",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    wrapped._key = key  # type: ignore[attr-defined]
    _CACHE[module] = wrapped
    return wrapped


def compile_network(model: Any, **options: Any) -> Any:
    """A copy of the denoiser chain ``model`` whose networks run through ``torch.compile``.

    Only the ``nn.Module`` networks are compiled (attributes ``unet`` of the diffusers
    adapter, ``fn`` of :func:`~diffusolve.models.from_callable`); the wrappers above them
    (labels, guidance, precision) are shallow-copied, so ``model`` itself is unchanged and
    the compiled network shares its weights. The compiled network is cached per module:
    compiling the same model again reuses it (and its compiled code). ``options`` go to
    ``torch.compile`` (``mode``, ``dynamic``, ``fullgraph``, ``backend``). Without a network
    the model is returned as is; without ``torch.compile`` or a working compiler, a
    warning says so and the network runs eagerly (same results).

    Example:
        >>> from diffusolve.models import load
        >>> from diffusolve.models.precision import compile_network
        >>> model = load("digits")
        >>> fast = compile_network(model)
        >>> fast.model.unet.config.sample_size, model.model.unet is not fast.model.unet
        (16, True)
    """
    if not networks(model):
        return model
    return _rebuild(model, options, 0)


def _rebuild(obj: Any, options: dict[str, Any], depth: int) -> Any:
    if depth > 16 or not hasattr(obj, "__dict__"):
        return obj
    changes: dict[str, Any] = {}
    for attr in _NET_ATTRS:
        net = obj.__dict__.get(attr)
        if isinstance(net, torch.nn.Module):
            wrapped = _compiled(net, options)
            if wrapped is not None:
                changes[attr] = wrapped
    for attr in _INNER_ATTRS:
        inner = obj.__dict__.get(attr)
        if inner is not None and not isinstance(inner, (Tensor, torch.nn.Module)):
            new = _rebuild(inner, options, depth + 1)
            if new is not inner:
                changes[attr] = new
    if not changes:
        return obj
    out = copy.copy(obj)
    out.__dict__.update(changes)
    return out
