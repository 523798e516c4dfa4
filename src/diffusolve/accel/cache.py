"""Feature caching for diffusers UNets: DeepCache and Faster Diffusion encoder propagation.

Both methods reuse features of an earlier network evaluation instead of recomputing them.
They are installed on a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` by swapping
the ``forward`` of a few of its modules for the duration of a ``with`` block (the UNet
class and its weights are untouched, nothing is forked) and restored on exit, also after
an error.

Which evaluation recomputes what is an explicit :class:`CacheSchedule`: one entry per
*network call*, in call order. The wrappers see only network calls, so they work under
every registered solver: a multi-stage solver makes several calls per step and each one
is an entry; classifier-free guidance doubles the batch inside one call, which is one
entry. Build the schedule with ``n_evals`` = the solve's NFE (``sample(..., stats=s)``
reports ``s["nfe"]``); a solve that calls the network more often than the schedule says
raises an error instead of guessing.

* **DeepCache** (Ma, Fang, Wang, "DeepCache: Accelerating Diffusion Models for Free",
  CVPR 2024). The UNet is ``conv_in``, down blocks ``D_0 .. D_{K-1}``, a mid block ``M``
  and up blocks ``U_0 .. U_{K-1}`` (``U_0`` deepest; ``U_{K-1-i}`` takes the skips of
  ``D_i``). Its skip branches are the paper's ``(block, layer)`` slots: each layer of
  ``D_b`` and its downsampler. A *full* evaluation runs everything and stores the outputs
  of the modules deeper than the branch; a *cached* evaluation runs only the shallower
  layers on both paths, the deeper modules returning the stored tensors, so the first up
  layer that runs gets the high-level feature of the last full evaluation and current
  shallow skips (:class:`DeepCache` has the exact rule). The default branch 0 is the
  paper's (its Stable Diffusion setting, ``cache_branch_id=0``): a cached call runs only
  ``conv_in`` and the last layer of the last up block. ``branch=(b, n_b)`` (``n_b`` the
  layers of ``D_b``) reuses whole blocks. The uniform interval default 3 is the paper's
  README setting.
* **Encoder propagation** (Li, Hu et al., "Faster Diffusion: Rethinking the Role of the
  Encoder for Diffusion Model Inference", NeurIPS 2024). At *key* evaluations the whole
  UNet runs and the encoder's outputs are stored (``conv_in``, every down block's residuals
  and the mid block's output); at the other evaluations the encoder and mid block are
  skipped and the decoder runs on the stored features with the current time embedding.
  Default key evaluations: the paper's 50-step set ``{0, 1, 2, 3, 5, 10, 15, 25, 35}``
  scaled to the solve's NFE (:meth:`CacheSchedule.key_steps`). Its prior-noise injection
  (``x_t <- x_t + 0.003 x_T`` once ``t / T < 0.5``) changes the sampler's state, not the
  network, so it is a ``sample`` callback: :func:`prior_noise_injection`. The paper's
  parallel decoding of consecutive non-key steps is not done (a solver needs each output
  before choosing its next input).

Example:
    >>> import torch, diffusolve
    >>> from diffusolve.accel import CacheSchedule, deep_cache, find_unet
    >>> model = diffusolve.load("digits")
    >>> x = model.process.prior_sample((2, 1, 16, 16), noise=0)
    >>> sched = CacheSchedule.uniform(11, 2)
    >>> with torch.no_grad(), deep_cache(find_unet(model), sched) as run:
    ...     out = diffusolve.sample(model, x, 10, "dpmpp_2m", cond=[3, 7])
    >>> (run.n_full, run.n_cached)
    (6, 5)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CacheSchedule",
    "DeepCache",
    "EncoderPropagation",
    "deep_cache",
    "encoder_propagation",
    "find_unet",
    "prior_noise_injection",
]

#: Faster Diffusion's key steps of a 50-step solve (``mod='50ls'``)
KEY_STEPS_50 = (0, 1, 2, 3, 5, 10, 15, 25, 35)

_UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


@dataclass(frozen=True)
class CacheSchedule:
    """Which network evaluations run in full and which reuse cached features.

    ``full[i]`` is ``True`` when the ``i``-th network call of the solve recomputes
    everything (and refreshes the cache), ``False`` when it reuses the cache. The first
    call is always full (nothing is cached before it). ``rule`` says how it was built.

    Example:
        >>> s = CacheSchedule.uniform(7, 3)
        >>> s.full_indices, s.n_cached
        ((0, 3, 6), 4)
        >>> CacheSchedule.from_steps([0, 2], 4).full
        (True, False, True, False)
    """

    full: tuple[bool, ...]
    rule: str = "custom"

    def __post_init__(self) -> None:
        full = tuple(self.full)
        if not full:
            raise ValueError("a cache schedule needs at least one evaluation")
        if not all(isinstance(f, bool) for f in full):
            raise TypeError("full must be a sequence of bools (True = full evaluation)")
        if not full[0]:
            raise ValueError(
                "the first evaluation must be full: nothing is cached before it "
                "(use CacheSchedule.from_steps with 0 among the full indices)"
            )
        object.__setattr__(self, "full", full)

    @property
    def n_evals(self) -> int:
        """The number of network calls the schedule covers."""
        return len(self.full)

    @property
    def full_indices(self) -> tuple[int, ...]:
        """The indices of the full evaluations."""
        return tuple(i for i, f in enumerate(self.full) if f)

    @property
    def n_full(self) -> int:
        return sum(self.full)

    @property
    def n_cached(self) -> int:
        return self.n_evals - self.n_full

    @classmethod
    def from_steps(cls, full_indices: Iterable[int], n_evals: int, rule: str = "custom"):
        """Full evaluations at ``full_indices`` (must contain 0), cached elsewhere."""
        n_evals = _positive_int(n_evals, "n_evals")
        idx = list(full_indices)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in idx):
            raise TypeError(f"full indices must be ints, got {idx!r}")
        bad = [i for i in idx if not 0 <= i < n_evals]
        if bad:
            raise ValueError(f"full indices {bad} are outside 0..{n_evals - 1}")
        if len(set(idx)) != len(idx):
            raise ValueError(f"full indices repeat: {sorted(idx)}")
        if 0 not in idx:
            raise ValueError("the full indices must contain 0 (nothing is cached before it)")
        chosen = set(idx)
        return cls(tuple(i in chosen for i in range(n_evals)), rule)

    @classmethod
    def uniform(cls, n_evals: int, interval: int) -> CacheSchedule:
        """DeepCache's uniform schedule: a full evaluation every ``interval`` calls
        (``i % interval == 0``), cached in between; ``interval=1`` caches nothing."""
        n_evals = _positive_int(n_evals, "n_evals")
        interval = _positive_int(interval, "interval")
        return cls.from_steps(range(0, n_evals, interval), n_evals, f"uniform({interval})")

    @classmethod
    def nonuniform(
        cls, n_evals: int, interval: int, center: float = 0.5, power: float = 2.0
    ) -> CacheSchedule:
        """A non-uniform schedule with about ``n_evals / interval`` full evaluations, denser
        around the fraction ``center`` of the solve (DeepCache's non-uniform variant).

        Rule: with ``k = ceil(n_evals / interval)`` points ``u_j`` evenly spaced in
        ``[-1, 1]``, the full indices are ``round((n_evals - 1) s(u_j))`` where
        ``s(u) = center + |u|^power (1 - center)`` for ``u >= 0`` and
        ``s(u) = center - |u|^power center`` for ``u < 0``; ``power > 1`` packs them near
        ``center``. Index collisions are resolved by adding points until ``k`` distinct
        indices exist (so the count is at least ``k``, at most ``n_evals``). Defaults:
        ``center=0.5``, ``power=2`` (quadratic spacing).
        """
        n_evals = _positive_int(n_evals, "n_evals")
        interval = _positive_int(interval, "interval")
        if not 0.0 <= float(center) <= 1.0:
            raise ValueError(f"center must be a fraction in [0, 1], got {center}")
        if not float(power) >= 1.0:
            raise ValueError(f"power must be >= 1 (1 = uniform spacing), got {power}")
        k = min(n_evals, math.ceil(n_evals / interval))
        m = k
        while True:
            idx = {0}
            for j in range(m):
                u = -1.0 + 2.0 * j / (m - 1) if m > 1 else -1.0
                a = abs(u) ** power
                s = center + a * (1.0 - center) if u >= 0 else center - a * center
                idx.add(round((n_evals - 1) * s))
            if len(idx) >= k or m >= n_evals:
                break
            m += 1
        rule = f"nonuniform({interval}, center={center}, power={power})"
        return cls.from_steps(sorted(idx), n_evals, rule)

    @classmethod
    def key_steps(cls, n_evals: int, steps50: Sequence[int] = KEY_STEPS_50) -> CacheSchedule:
        """Faster Diffusion's key steps, given for 50 steps (default ``{0, 1, 2, 3, 5, 10,
        15, 25, 35}``), scaled to ``n_evals`` calls: ``round(k n_evals / 50)``, deduplicated."""
        n_evals = _positive_int(n_evals, "n_evals")
        idx = sorted({min(n_evals - 1, round(k * n_evals / 50)) for k in steps50} | {0})
        return cls.from_steps(idx, n_evals, f"key_steps({n_evals}/50)")


def _positive_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def find_unet(model: Any) -> nn.Module:
    """The diffusers UNet inside a denoiser and its wrappers (guidance, label conditioning,
    adapters), found by following ``unet`` / ``model`` attributes.

    Example:
        >>> import diffusolve
        >>> type(find_unet(diffusolve.load("digits", guidance=2.0))).__name__
        'UNet2DModel'
    """
    seen: set[int] = set()
    obj = model
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        if type(obj).__name__ in _UNET_CLASSES:
            return obj
        obj = getattr(obj, "unet", None) or getattr(obj, "model", None)
    raise TypeError(
        f"found no diffusers UNet2DModel / UNet2DConditionModel inside {type(model).__name__} "
        "(following .unet / .model); pass the UNet itself"
    )


class _Swapped:
    """Swaps the ``forward`` of modules by instance attributes and restores them."""

    def __init__(self) -> None:
        self._saved: list[tuple[nn.Module, Any]] = []

    def swap(self, module: nn.Module, new: Callable[..., Any]) -> None:
        self._saved.append((module, module.__dict__.get("forward")))
        module.forward = new

    def restore(self) -> None:
        while self._saved:
            module, old = self._saved.pop()
            if old is None:
                del module.forward
            else:
                module.forward = old


class _CachedRun:
    """Shared machinery: a call counter over the UNet's forward, per-module caches."""

    method = "cache"

    def __init__(self, unet: nn.Module, schedule: CacheSchedule) -> None:
        if type(unet).__name__ not in _UNET_CLASSES:
            unet = find_unet(unet)
        if not isinstance(schedule, CacheSchedule):
            raise TypeError(f"schedule must be a CacheSchedule, got {type(schedule).__name__}")
        self.unet = unet
        self.schedule = schedule
        self.calls = 0
        self.n_full = 0
        self.n_cached = 0
        self._full = True
        self._t: Any = None
        self._shape: tuple[int, ...] | None = None
        self._store: dict[int, Any] = {}
        self._swapped = _Swapped()
        self._active = False

    def cached_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def __enter__(self) -> _CachedRun:
        if self._active:
            raise RuntimeError(f"this {type(self).__name__} is already installed")
        if "forward" in self.unet.__dict__:
            raise RuntimeError("the UNet's forward is already swapped (nested caches?)")
        self.calls = self.n_full = self.n_cached = 0
        self._store.clear()
        self._shape = None
        try:
            top = self.unet.forward
            self._swapped.swap(self.unet, self._wrap_top(top))
            for k, module in enumerate(self.cached_modules()):
                self._swapped.swap(module, self._wrap_module(k, module.forward))
        except BaseException:
            self._swapped.restore()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._swapped.restore()
        self._store.clear()
        self._active = False

    def _wrap_top(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        def run(sample: Tensor, *args: Any, **kwargs: Any) -> Any:
            i = self.calls
            if i >= self.schedule.n_evals:
                raise RuntimeError(
                    f"{self.method}: the schedule covers {self.schedule.n_evals} network "
                    f"calls and this is call {i + 1}; build it with n_evals = the solve's "
                    "NFE (sample(..., stats=s) reports s['nfe'])"
                )
            full = self.schedule.full[i]
            shape = tuple(sample.shape)
            if not full and shape != self._shape:
                raise ValueError(
                    f"{self.method}: call {i} reuses features of an input of shape "
                    f"{self._shape}, but got {shape}; cached calls need the batch of the "
                    "last full call"
                )
            self._full = full
            self._t = args[0] if args else kwargs.get("timestep")
            self.calls += 1
            out = forward(sample, *args, **kwargs)
            if full:
                self._shape = shape
                self.n_full += 1
            else:
                self.n_cached += 1
            return out

        return run

    def _wrap_module(self, k: int, forward: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if self._full:
                out = forward(*args, **kwargs)
                self._store[k] = out
                return out
            return self._store[k]

        return run

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.unet).__name__}, {self.schedule.rule}, "
            f"calls={self.calls}, full={self.n_full}, cached={self.n_cached})"
        )


def _blocks(unet: nn.Module) -> tuple[list[nn.Module], nn.Module | None, list[nn.Module]]:
    down, up = list(unet.down_blocks), list(unet.up_blocks)
    if len(down) != len(up):
        raise ValueError(f"expected as many up as down blocks, got {len(down)} and {len(up)}")
    return down, getattr(unet, "mid_block", None), up


class DeepCache(_CachedRun):
    """DeepCache on a diffusers UNet (Ma, Fang, Wang, CVPR 2024); see the module docstring.

    Args:
        unet: a ``UNet2DModel`` / ``UNet2DConditionModel`` (or a denoiser holding one).
        schedule: full vs cached network calls (:class:`CacheSchedule`; the paper's uniform
            schedule is ``CacheSchedule.uniform(nfe, 3)``).
        branch: the skip branch. An int is the paper's ``cache_branch_id``: the skip slots
            ``(block, layer)`` counted in order, each down block ``D_i`` having one slot per
            layer and one for its downsampler (Stable Diffusion's 2 layers + 1 give the
            paper's ``(id // 3, id % 3)``). A pair ``(block, layer)`` names the slot
            directly. Default 0, the paper's setting: the shallowest branch, where a cached
            call runs only ``conv_in`` and the last layer of the last up block.

    On a cached call, with ``(b, l) = (block, layer)``: ``conv_in``, ``D_0 .. D_{b-1}``
    and the first ``l`` layers of ``D_b`` run; the rest of ``D_b``, the deeper down blocks
    and the mid block return their stored outputs; of the up block ``U_{K-1-b}`` (which
    takes ``D_b``'s skips) only the last ``l + 1`` layers run, the first of them on the
    stored output of the layer before it, and the shallower up blocks run in full. So every
    layer that runs sees current skips and only the features deeper than the branch are
    reused. ``(b, n_b)`` with ``n_b`` the layers of ``D_b`` is the whole-block branch ``b``.

    ``forecast`` (default 0, the paper's plain reuse) replaces the reused feature by a
    polynomial forecast in the network's timestep: the Lagrange polynomial of degree
    ``forecast`` through the feature at the last ``forecast + 1`` full calls, evaluated at
    the cached call's timestep (fewer full calls so far give a lower degree). Degree 1 is
    the linear extrapolation ``f_1 + (t - t_1) (f_1 - f_0) / (t_1 - t_0)``; on a grid
    uniform in the timestep it is TaylorSeer's first-order forecast (Liu et al., "From
    Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers", ICCV 2025),
    here applied to DeepCache's one reused tensor, the input of the first up layer that
    runs. It costs one weighted sum of ``forecast + 1`` stored tensors per cached call.

    Use as a context manager; ``n_full``, ``n_cached`` and ``calls`` count the calls.
    """

    method = "DeepCache"

    def __init__(
        self,
        unet: nn.Module,
        schedule: CacheSchedule,
        branch: int | tuple[int, int] = 0,
        forecast: int = 0,
    ) -> None:
        super().__init__(unet, schedule)
        self.block, self.layer, self.branch = _branch_slot(self.unet, branch)
        if isinstance(forecast, bool) or not isinstance(forecast, int) or not 0 <= forecast <= 3:
            raise ValueError(
                f"forecast must be an int in 0..3 (the degree of the feature forecast; 0 = "
                f"reuse), got {forecast!r}"
            )
        self.forecast = forecast
        self._front: int | None = None
        self._hist: list[tuple[Tensor, Any]] = []

    def frontier(self) -> nn.Module | None:
        """The cached module whose output a cached call's running layers read (the input of
        the first up layer that runs); ``None`` when the branch reuses nothing on the up path."""
        down, mid, up = _blocks(self.unet)
        k, b = len(down), self.block
        ub = up[k - 1 - b]
        j0 = len(ub.resnets) - 1 - self.layer
        if j0 > 0:
            return _layers(ub, [j0 - 1])[-1]
        return up[k - 2 - b] if b < k - 1 else mid

    def __enter__(self) -> DeepCache:
        mods = self.cached_modules()
        front = self.frontier()
        self._front = next((i for i, m in enumerate(mods) if m is front), None)
        self._hist = []
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._hist = []

    def _wrap_module(self, k: int, forward: Callable[..., Any]) -> Callable[..., Any]:
        reuse = super()._wrap_module(k, forward)
        if self.forecast == 0 or k != self._front:
            return reuse

        def run(*args: Any, **kwargs: Any) -> Any:
            out = reuse(*args, **kwargs)
            t = _time_vector(self._t)
            if self._full:
                if self._hist and torch.equal(self._hist[-1][0], t):
                    self._hist.pop()  # the same timestep twice: keep the newer feature
                self._hist = [*self._hist, (t, out)][-(self.forecast + 1) :]
                return out
            if len(self._hist) < 2:
                return out
            return _lagrange(self._hist, t)

        return run

    def cached_modules(self) -> list[nn.Module]:
        down, mid, up = _blocks(self.unet)
        k, b, lay = len(down), self.block, self.layer
        mods: list[nn.Module] = []
        block = down[b]
        if lay == 0:
            mods.append(block)  # none of its layers runs: the whole block is reused
        else:
            mods.extend(_layers(block, range(lay, len(block.resnets))))
            mods.extend(getattr(block, "downsamplers", None) or [])
        mods.extend(down[b + 1 :])
        if mid is not None:
            mods.append(mid)
        mods.extend(up[: k - 1 - b])
        ub = up[k - 1 - b]
        # up layer j of m has mirrored index m - 1 - j; those deeper than ``layer`` are reused
        mods.extend(_layers(ub, range(len(ub.resnets) - 1 - lay)))
        return mods

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", branch=({self.block}, {self.layer}))"


def _time_vector(t: Any) -> Tensor:
    """The timestep as a float64 vector (one entry when all samples share it)."""
    if t is None:
        raise ValueError("DeepCache's forecast needs the UNet's timestep argument")
    v = torch.as_tensor(t).detach().to(torch.float64).reshape(-1)
    return v[:1] if v.numel() > 1 and bool((v == v[0]).all()) else v


def _lagrange(hist: list[tuple[Tensor, Any]], t: Tensor) -> Any:
    """The Lagrange polynomial through ``hist`` = [(t_i, f_i)] evaluated at ``t``; the
    ``f_i`` are tensors or tuples / lists of tensors of one structure."""
    weights = []
    for i, (ti, _) in enumerate(hist):
        w = torch.ones_like(t)
        for j, (tj, _) in enumerate(hist):
            if j != i:
                w = w * (t - tj) / (ti - tj)
        weights.append(w)
    if not all(bool(torch.isfinite(w).all()) for w in weights):
        raise ValueError("DeepCache forecast: two full calls at the same timestep")

    def combine(*fs: Any) -> Any:
        if isinstance(fs[0], Tensor):
            acc = None
            for w, f in zip(weights, fs, strict=True):
                if w.numel() not in (1, f.shape[0]):
                    raise ValueError(
                        f"DeepCache forecast: {w.numel()} timesteps for a feature batch of "
                        f"{f.shape[0]}"
                    )
                w = w.to(f.dtype).reshape(-1, *([1] * (f.dim() - 1)))
                acc = w * f if acc is None else acc + w * f
            return acc
        if isinstance(fs[0], (tuple, list)):
            return type(fs[0])(combine(*parts) for parts in zip(*fs, strict=True))
        raise TypeError(f"DeepCache forecast: cannot extrapolate a {type(fs[0]).__name__} feature")

    return combine(*(f for _, f in hist))


def _layers(block: nn.Module, idx: Iterable[int]) -> list[nn.Module]:
    """The resnets (and their attention, where the block has one per layer) at ``idx``."""
    attn = list(getattr(block, "attentions", None) or [])
    out: list[nn.Module] = []
    for j in idx:
        out.append(block.resnets[j])
        if j < len(attn) and attn[j] is not None:
            out.append(attn[j])
    return out


def _branch_slot(unet: nn.Module, branch: Any) -> tuple[int, int, int]:
    """``(block, layer, flat id)`` of a DeepCache branch given as the paper's flat id or as
    a ``(block, layer)`` pair."""
    down, _, up = _blocks(unet)
    slots = [len(b.resnets) + 1 for b in down]
    for i in range(len(down)):
        if len(up[len(down) - 1 - i].resnets) < slots[i]:
            raise ValueError(
                f"up block {len(down) - 1 - i} has fewer layers than down block {i} has skips; "
                "DeepCache needs the standard diffusers UNet layout"
            )
    listing = ", ".join(f"block {i}: layers 0..{n - 1}" for i, n in enumerate(slots))
    if isinstance(branch, tuple) and len(branch) == 2:
        blk, lay = branch
        if (
            any(isinstance(v, bool) or not isinstance(v, int) for v in branch)
            or not 0 <= blk < len(down)
            or not 0 <= lay < slots[blk]
        ):
            raise ValueError(
                f"branch {branch!r} is not a (block, layer) slot of this UNet ({listing})"
            )
        return blk, lay, sum(slots[:blk]) + lay
    if isinstance(branch, bool) or not isinstance(branch, int):
        raise TypeError(
            f"branch must be an int (the paper's branch id) or a (block, layer) pair, got {branch!r}"
        )
    if not 0 <= branch < sum(slots):
        raise ValueError(
            f"branch must be an int in 0..{sum(slots) - 1} (this UNet's skip slots: {listing}), got {branch}"
        )
    rest = branch
    for blk, n in enumerate(slots):
        if rest < n:
            return blk, rest, branch
        rest -= n
    raise AssertionError("unreachable")


class EncoderPropagation(_CachedRun):
    """Faster Diffusion encoder propagation (Li, Hu et al., NeurIPS 2024); see the module
    docstring. Full calls are the *key* steps (default schedule:
    :meth:`CacheSchedule.key_steps`); the others run only the decoder, on the stored
    ``conv_in``, down-block and mid-block outputs."""

    method = "encoder propagation"

    def cached_modules(self) -> list[nn.Module]:
        down, mid, _ = _blocks(self.unet)
        return [self.unet.conv_in] + down + ([mid] if mid is not None else [])


def deep_cache(
    unet: Any, schedule: CacheSchedule, branch: int | tuple[int, int] = 0, forecast: int = 0
) -> DeepCache:
    """``with deep_cache(unet, schedule, branch=0, forecast=0) as run:`` installs
    :class:`DeepCache`."""
    return DeepCache(unet, schedule, branch, forecast)


def encoder_propagation(unet: Any, schedule: CacheSchedule | int) -> EncoderPropagation:
    """``with encoder_propagation(unet, schedule) as run:`` installs
    :class:`EncoderPropagation`; an int ``schedule`` is the NFE and gives the default key
    steps (:meth:`CacheSchedule.key_steps`)."""
    if isinstance(schedule, int) and not isinstance(schedule, bool):
        schedule = CacheSchedule.key_steps(schedule)
    return EncoderPropagation(unet, schedule)


def prior_noise_injection(
    x_T: Tensor, t_max: float, scale: float = 0.003, below: float = 0.5
) -> Callable[[dict[str, Any]], None]:
    """Faster Diffusion's prior-noise injection as a ``sample(callback=...)``: after every
    step whose next time ``t_next`` satisfies ``t_next / t_max < below``, the new state gets
    ``scale * x_T`` added (in place), i.e. ``x_t <- x_t + 0.003 x_T`` for ``t / T < 0.5``
    before the network sees it (paper defaults ``scale=0.003``, ``below=0.5``).

    ``x_T`` is the starting noise of the solve, ``t_max`` the process's ``t_max``.
    """
    if not math.isfinite(scale) or not 0.0 < below <= 1.0 or not t_max > 0:
        raise ValueError(f"need finite scale, 0 < below <= 1, t_max > 0; got {scale}, {below}")
    added = scale * x_T

    def inject(info: dict[str, Any]) -> None:
        if float(info["t_next"]) / float(t_max) < below:
            x = info["x_next"]
            x.add_(added.to(dtype=x.dtype, device=x.device))

    return inject
