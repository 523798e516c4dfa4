"""k-diffusion-style sampler functions: ``sample_<solver>(model, x, sigmas, ...)``.

One function per deterministic registered solver (and per alias of one), generated from the
registry at import, for tools that call samplers the k-diffusion way (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", whose EDM/VE
parameterisation this is):

* ``model(x, sigma, **extra_args)`` is a denoiser returning the denoised ``x`` for
  ``x = x0 + sigma * eps``; ``sigma`` is a per-sample tensor (``sigma * x.new_ones(B)``);
* ``sigmas`` are decreasing noise levels; a trailing 0 means "end at the data": the loop's
  final policy (default ``"denoise"``: the denoiser output at the last positive sigma, which
  is what an Euler step to sigma = 0 returns; ``final="zero"`` extrapolates to sigma = 0);
  without a trailing 0 the state at the last sigma is returned;
* ``callback({"x", "i", "sigma", "sigma_hat", "denoised"})`` is called once per interval of
  ``sigmas`` with the state at ``sigmas[i]`` and the denoiser output there (``sigma_hat`` =
  ``sigma``: these solvers add no churn);
* ``disable`` turns the progress bar off (``None``: shown on a terminal).

The solve is :func:`diffusolve.sample` on the EDM process (``alpha = 1``, ``sigma = t``) over
the positive sigmas, so each function agrees with ``diffusolve.sample`` on the same model
(tested to 1e-12 in float64). Extra keyword arguments are the solver's options.

Example:
    >>> import torch
    >>> from diffusolve import kdiff
    >>> denoiser = lambda x, sigma: x / (1 + sigma[:, None] ** 2)  # data ~ N(0, I)
    >>> sigmas = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    >>> x = 80.0 * torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> kdiff.sample_dpmpp_2m(denoiser, x, sigmas, disable=True).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .process import edm
from .solvers import ALIASES, get_solver, list_solvers, sample

__all__: list[str] = ["sampler_names", "kdiff_sample"]


class _KDenoiser:
    """A k-diffusion denoiser seen as our ``model(x, t, cond) -> x0`` on an EDM process."""

    def __init__(self, model: Callable[..., Tensor], process: Any, extra_args: dict) -> None:
        self.model = model
        self.process = process
        self.extra_args = extra_args
        self.last: tuple[float, Tensor] | None = None

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        sigma = t.to(device=x.device, dtype=x.dtype) * x.new_ones(x.shape[0])
        out = self.model(x, sigma, **self.extra_args)
        self.last = (float(t), out)
        return out


def kdiff_sample(
    solver: str,
    model: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    *,
    final: str = "denoise",
    **solver_options: Any,
) -> Tensor:
    """Run ``solver`` the k-diffusion way (see the module docstring); ``sample_<solver>``
    is this function with ``solver`` bound."""
    sig = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).flatten()
    if sig.numel() < 2:
        raise ValueError("sigmas needs at least two noise levels")
    to_zero = float(sig[-1]) == 0.0
    grid = sig[:-1] if to_zero else sig
    if grid.numel() < 2 and not to_zero:
        raise ValueError("sigmas needs at least two positive noise levels")
    if not bool((grid > 0).all()) or not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(
            "sigmas must be strictly decreasing and positive, with at most a trailing 0 "
            f"(got {sig.tolist()})"
        )
    if grid.numel() < 2:
        raise ValueError("give at least two positive sigmas before the trailing 0")
    process = edm(sigma_min=float(grid[-1]), sigma_max=float(grid[0]))
    den = _KDenoiser(model, process, dict(extra_args or {}))
    step_evals: list[tuple[float, Tensor]] = []  # (time, output) of the current step

    def record(x_: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        out = den(x_, t, cond)
        step_evals.append((float(t), out))
        return out

    record.process = process  # type: ignore[attr-defined]

    def report(i: int, x_i: Tensor) -> None:
        at = [o for t, o in step_evals if t == float(grid[i])]
        denoised = at[0] if at else (step_evals[0][1] if step_evals else None)
        step_evals.clear()
        if callback is not None:
            s_i = sig[i].to(x.dtype)
            callback({"x": x_i, "i": i, "sigma": s_i, "sigma_hat": s_i, "denoised": denoised})

    last_x = [x]

    def cb(info: dict[str, Any]) -> None:
        last_x[0] = info["x_next"]
        report(info["i"], info["x"])

    out = sample(
        record,
        x,
        grid,
        get_solver(solver, **solver_options),
        final=final if to_zero else "none",
        callback=cb,
        progress=None if disable is None else not disable,
    )
    if to_zero:
        report(grid.numel() - 1, last_x[0])
    return out


def _make(name: str, target: str, meaning: str = "") -> Callable[..., Tensor]:
    solver = get_solver(target)

    def fn(
        model: Callable[..., Tensor],
        x: Tensor,
        sigmas: Tensor,
        extra_args: dict[str, Any] | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        disable: bool | None = None,
        *,
        final: str = "denoise",
        **solver_options: Any,
    ) -> Tensor:
        return kdiff_sample(
            target, model, x, sigmas, extra_args, callback, disable, final=final, **solver_options
        )

    first = (solver.__doc__ or "").strip().splitlines()[0] if solver.__doc__ else ""
    alias = f" Alias of ``{target}``: {meaning}" if meaning else ""
    fn.__name__ = fn.__qualname__ = f"sample_{name}"
    fn.__doc__ = "\n\n".join(
        [
            f"``{target}`` ({type(solver).__name__}, order {solver.order}, "
            f"{solver.evals_per_step} evaluation(s) per step) in the k-diffusion calling "
            f"convention.{alias}",
            first,
            "``model(x, sigma, **extra_args)`` returns the denoised ``x``; ``sigmas`` decrease "
            "(a trailing 0: the final policy ``final``); ``callback`` gets ``x``, ``i``, "
            "``sigma``, ``sigma_hat``, ``denoised`` per interval; ``disable`` hides the "
            "progress bar; other keyword arguments are the solver's options (see "
            ":mod:`diffusolve.kdiff`).",
        ]
    )
    fn.__module__ = __name__
    return fn


def sampler_names() -> list[str]:
    """The ``sample_*`` functions of this module (deterministic solvers and their aliases)."""
    return sorted(n for n in __all__ if n.startswith("sample_"))


for _name in list_solvers():
    if not get_solver(_name).stochastic:
        globals()[f"sample_{_name}"] = _make(_name, _name)
        __all__.append(f"sample_{_name}")
for _alias, (_target, _meaning) in sorted(ALIASES.items()):
    if not get_solver(_target).stochastic:
        globals()[f"sample_{_alias}"] = _make(_alias, _target, _meaning)
        __all__.append(f"sample_{_alias}")
