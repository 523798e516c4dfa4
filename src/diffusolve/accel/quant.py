"""Post-training quantization of a diffusers UNet: fake-quant wrappers, calibration from the
model's own sampling trajectories, safetensors save/load, and CPU int8 execution.

Pipeline (shared by the three papers below):

1. :func:`collect_trajectories` runs the float model's sampler (``diffusolve.sample`` with
   a registered solver) and records every model input ``(x_t, t, cond)`` (and, for EDA-DM,
   the mid-block attention output ``F_t``).
2. A calibration strategy picks a :class:`CalibrationSet` from the trajectories:

   * :func:`uniform_calibration` -- Q-Diffusion's time-step-aware calibration (Li et al.,
     ICCV 2023): ``cali_st`` steps spaced uniformly along the trajectory
     (``range(0, S, S // cali_st)``), ``cali_n`` samples at each (paper: 20 x 256 on CIFAR).
   * :func:`ptq4dm_calibration` -- PTQ4DM's Normally Distributed Time-step Calibration
     (Shang et al., CVPR 2023): ``t_i = clamp(round(u_i * S))``, ``u_i ~ N(0.4, 0.4^2)``,
     ``t`` counted in sampler steps from the clean end (0) to the noise end (``S``), one
     trajectory per calibration sample, 1024 samples.
   * :func:`tdac_calibration` -- EDA-DM's Temporal Distribution Alignment Calibration (Liu
     et al., 2024, arXiv:2401.04585): per-step density ``d_t = #{t' != t : mean((F_t -
     F_t')^2) <= r}`` and diversity ``v_t = sum_t' sum_i (1 - cos(F_t^i, F_t'^i))`` of the
     mid-block attention output, ``w_t = minmax(d) + lambda * minmax(v)`` (``lambda = 1.2``),
     ``n_t = round(N w_t / sum w)`` samples at step ``t``.

3. :func:`quantize` returns a quantized *copy* (the given model is never modified): every
   ``Conv2d`` / ``Linear`` not kept in float (:class:`QuantConfig`) is replaced by a
   :class:`QuantConv2d` / :class:`QuantLinear` with per-output-channel symmetric weights
   (``scale_c = max|w_c| / (2^(b-1) - 1)``) and a per-tensor asymmetric activation
   quantizer whose range is calibrated by min/max or by MSE-optimal percentile clipping
   (default ``"mse"``, as PTQ4DM's scale initialisation). Without reconstruction the model
   ends at these calibrated scales with nearest rounding (what PTQ4DM's released NDTC
   script does: it does not pass ``--use_adaround``).
4. ``quantize(..., reconstruct=BlockReconstruction())`` then runs EDA-DM's fine-grained
   block reconstruction (FBR; :mod:`diffusolve.accel.recon`): per ResNet / attention /
   up-down-sampling block, AdaRound soft rounding of the weights and learned activation
   steps against the float block's and layers' outputs, ending hard-rounded on the same
   int8 grid (300 iterations per block by default, sized for a CPU; the paper runs
   thousands). Measured (digits, TDAC, FD-digits at 1,000 samples, float 0.264): W8A8
   0.263 without / 0.264 with FBR, W4A8 0.301 without / 0.259 with FBR.

Fake quantization is simulated in float32 and is slower than the float model, not faster;
:func:`save_quantized` stores int8 weights (int4 packed two per byte) with their scales,
and :func:`load_quantized` rebuilds the same fake-quant model bit for bit.

Real int8 on CPU is :func:`real_int8`; its default backend was chosen by measurement.
Setup: the digits UNet, dpmpp_2m, 20 steps, batch 256, one thread; torch 2.13.0+cpu,
torchao 0.18.0, optimum-quanto 0.2.7. Each of 5 rounds times every variant once, and the
figure is the median over rounds of the time relative to the float model in the same
round. The machine was a shared 2-core box, so single rounds vary by up to 2x. FD-digits
is at 1,000 samples (float 0.264):

==============================================================  =================  ======
backend (what runs in int8)                                     time / float       FD
==============================================================  =================  ======
torchao PT2E static int8, X86InductorQuantizer, every conv and  0.52 (0.50-0.52 in  0.265
linear, Inductor-compiled (``backend="torchao-pt2e"``)           4 of 5 rounds)
float model compiled alone (no quantization; for reference)    0.87               0.264
torch.ao ``quantize_dynamic``, Linear only                      0.99               0.263
torchao ``quantize_`` Int8WeightOnly, Linear only               0.99               0.264
torchao ``quantize_`` Int8DynamicActivationInt8Weight, Linear   1.09               0.263
optimum-quanto qint8 weights (Linear + Conv2d)                  1.01               0.262
optimum-quanto qint8 weights + activations                      0.75 (0.51-1.68)   0.262
==============================================================  =================  ======

The default is the PT2E path: it is the only one that runs this UNet's convolutions, where
nearly all of its time goes, in int8 kernels. It is also the only one that was consistently
faster, about 1.9x the eager float model and 1.7x the compiled one. The Linear-only paths
cannot help a convolution-heavy network. In this torchao version, ``quantize_`` fails on
``Conv2d``. optimum-quanto has no fast CPU kernels: it is within the noise of the float model
(1.3x slower at batch 16). The price of PT2E is ``torch.export`` plus an Inductor compile at
the first call of each input shape, about 4 minutes on one shared thread. Its file holds the
float network and the calibrated observers (5.2 MB for the digits model); loading re-derives
the same int8 program, bit for bit. ``backend="torch.ao-dynamic"`` (:func:`int8_dynamic`,
deprecated upstream) is kept as a path that needs no extra package.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "QuantConfig",
    "Trajectories",
    "CalibrationSet",
    "QuantConv2d",
    "QuantLinear",
    "quantize_weight",
    "fake_quant_activation",
    "find_unet",
    "collect_trajectories",
    "uniform_calibration",
    "ptq4dm_calibration",
    "ptq4dm_step_indices",
    "tdac_calibration",
    "quantize",
    "save_quantized",
    "load_quantized",
    "int8_dynamic",
    "real_int8",
    "Int8Network",
]

ACT_RANGES = ("minmax", "mse")


@dataclass(frozen=True)
class QuantConfig:
    """Which layers are quantized and how.

    Args:
        weight_bits: bits of the per-output-channel symmetric weight quantizer (2..8).
        act_bits: bits of the per-tensor asymmetric input quantizer of each quantized layer
            (2..16), or ``None`` for weight-only quantization.
        act_range: ``"mse"`` (default; the clipping range with the least squared
            quantization error among percentile ranges, PTQ4DM's ``init_amode="mse"``) or
            ``"minmax"`` (the observed range).
        keep_float: module-name prefixes left in float. Default: the first and last
            convolutions and the time embedding, the layers the papers keep at high
            precision (Q-Diffusion and PTQ4DM keep the first/last layer at 8 bit; float
            here).
        percentiles: tail fractions tried by the MSE search (each gives the range
            ``[q(p), q(1 - p)]``; ``0`` is min/max).
        sample_values: how many activation values per layer are kept (uniformly at random)
            for the MSE search.

    Example:
        >>> QuantConfig(weight_bits=4).weight_bits
        4
    """

    weight_bits: int = 8
    act_bits: int | None = 8
    act_range: str = "mse"
    keep_float: tuple[str, ...] = ("conv_in", "conv_out", "time_embedding")
    percentiles: tuple[float, ...] = (0.0, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    sample_values: int = 200_000

    def __post_init__(self) -> None:
        if not 2 <= int(self.weight_bits) <= 8:
            raise ValueError(f"weight_bits must be in 2..8 (int8 storage), got {self.weight_bits}")
        if self.act_bits is not None and not 2 <= int(self.act_bits) <= 16:
            raise ValueError(f"act_bits must be in 2..16 or None, got {self.act_bits}")
        if self.act_range not in ACT_RANGES:
            raise ValueError(f"act_range must be one of {ACT_RANGES}, got {self.act_range!r}")
        if any(not 0.0 <= p < 0.5 for p in self.percentiles) or not self.percentiles:
            raise ValueError(f"percentiles must be fractions in [0, 0.5), got {self.percentiles}")
        object.__setattr__(self, "keep_float", tuple(self.keep_float))
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))


# ----------------------------------------------------------------------------- quantizers


def quantize_weight(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric quantization: ``(q int8, scale float32 [C_out])`` with
    ``w ~ q * scale``, ``|q| <= 2^(bits-1) - 1`` and ``|w - q * scale| <= scale / 2``.

    Example:
        >>> q, s = quantize_weight(torch.tensor([[1.0, -0.5], [0.0, 0.0]]), 8)
        >>> q.tolist(), s[1].item()
        ([[127, -64], [0, 0]], 1.0)
    """
    qmax = 2 ** (int(bits) - 1) - 1
    w32 = w.detach().to(torch.float32)
    amax = w32.reshape(w32.shape[0], -1).abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    shape = (-1,) + (1,) * (w32.ndim - 1)
    q = torch.clamp(torch.round(w32 / scale.reshape(shape)), -qmax, qmax).to(torch.int8)
    return q, scale


def _dequantize(q: Tensor, scale: Tensor) -> Tensor:
    return q.to(torch.float32) * scale.reshape((-1,) + (1,) * (q.ndim - 1))


def fake_quant_activation(x: Tensor, lo: float, hi: float, bits: int) -> Tensor:
    """Per-tensor asymmetric fake quantization of ``x`` on ``[lo, hi]`` (``lo <= 0 <= hi``
    enforced, so 0 is exact) with ``2^bits`` levels.

    Example:
        >>> fake_quant_activation(torch.tensor([-1.0, 0.0, 0.3, 5.0]), -1.0, 1.0, 8).tolist()[1]
        0.0
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    levels = 2 ** int(bits) - 1
    scale = (hi - lo) / levels if hi > lo else 1.0
    zero = round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, levels)
    return (q - zero) * scale


class _Observer:
    """Running min/max and a uniform random sample of the values seen (for the MSE search)."""

    def __init__(self, keep: int, seed: int) -> None:
        self.lo, self.hi = math.inf, -math.inf
        self.keep = keep
        self.values: list[Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)
        self.per_call = keep

    def update(self, x: Tensor) -> None:
        v = x.detach().reshape(-1).to("cpu", torch.float32)
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
        if v.numel() > self.per_call:
            v = v[torch.randint(v.numel(), (self.per_call,), generator=self.gen)]
        self.values.append(v)

    def range(self, cfg: QuantConfig) -> tuple[float, float]:
        if cfg.act_range == "minmax" or cfg.act_bits is None:
            return self.lo, self.hi
        v = torch.cat(self.values)
        if v.numel() > cfg.sample_values:
            v = v[torch.randint(v.numel(), (cfg.sample_values,), generator=self.gen)]
        srt = v.sort().values
        last = srt.numel() - 1
        best, best_err = (self.lo, self.hi), math.inf
        for p in cfg.percentiles:
            lo, hi = (
                (self.lo, self.hi)
                if p == 0
                else (float(srt[round(p * last)]), float(srt[round((1 - p) * last)]))
            )
            err = float(((fake_quant_activation(v, lo, hi, cfg.act_bits) - v) ** 2).mean())
            if err < best_err:
                best, best_err = (lo, hi), err
        return best


class _QuantLayer(nn.Module):
    """Shared state of the fake-quant wrappers: int8 weights + scales, float bias, the
    calibrated input range (``act_range`` = ``[lo, hi]``, NaN until calibrated)."""

    def __init__(self, layer: nn.Module, weight_bits: int, act_bits: int | None) -> None:
        super().__init__()
        q, scale = quantize_weight(layer.weight, weight_bits)
        self.weight_bits, self.act_bits = int(weight_bits), act_bits
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        bias = None if layer.bias is None else layer.bias.detach().to(torch.float32).clone()
        self.register_buffer("bias", bias)
        self.register_buffer("act_range", torch.full((2,), float("nan")))
        self.observer: _Observer | None = None

    # set (not registered) by accel.recon while a block is reconstructed: soft-rounded
    # weights and learned activation steps replace the stored ones until it is committed
    _recon: Any = None

    def weight_fq(self) -> Tensor:
        if self._recon is not None:
            return self._recon.weight()
        return _dequantize(self.qweight, self.scale)

    def _input(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self.observer.update(x)
            return x
        if self.act_bits is None:
            return x
        if self._recon is not None and self._recon.learns_act:
            return self._recon.act(x)
        lo, hi = self.act_range.tolist()
        if math.isnan(lo):
            raise RuntimeError(
                "this layer's activation range is not calibrated: pass a calibration set "
                "to quantize(), or use QuantConfig(act_bits=None) for weight-only quantization."
            )
        return fake_quant_activation(x, lo, hi, self.act_bits)


class QuantLinear(_QuantLayer):
    """Fake-quant ``nn.Linear``: ``linear(fq_act(x), q * scale, bias)``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._input(x), self.weight_fq().to(x.dtype), _cast(self.bias, x))


class QuantConv2d(_QuantLayer):
    """Fake-quant ``nn.Conv2d`` (zero padding): ``conv2d(fq_act(x), q * scale, bias)``."""

    def __init__(self, layer: nn.Conv2d, weight_bits: int, act_bits: int | None) -> None:
        if layer.padding_mode != "zeros":
            raise ValueError(
                f"only zero-padded convolutions are supported, got {layer.padding_mode}"
            )
        super().__init__(layer, weight_bits, act_bits)
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight_fq().to(x.dtype)
        x = self._input(x)
        return F.conv2d(
            x, w, _cast(self.bias, x), self.stride, self.padding, self.dilation, self.groups
        )


def _cast(b: Tensor | None, x: Tensor) -> Tensor | None:
    return None if b is None else b.to(x.dtype)


# ----------------------------------------------------------------------------- models


def find_unet(model: Any) -> nn.Module:
    """The network inside a denoiser: follows ``.unet`` / ``.model`` until an ``nn.Module``
    (``load("digits")`` is ``LabelConditioned -> DiffusersDenoiser -> UNet2DModel``)."""
    seen = 0
    while not isinstance(model, nn.Module):
        nxt = getattr(model, "unet", None) or getattr(model, "model", None)
        if nxt is None or seen > 8:
            raise TypeError(
                f"no network found inside {type(model).__name__}: pass a denoiser with a "
                "`.unet` (DiffusersDenoiser) or `.model` attribute, or an nn.Module."
            )
        model, seen = nxt, seen + 1
    return model


def _set_unet(model: Any, unet: nn.Module) -> None:
    obj = model
    while True:
        for attr in ("unet", "model"):
            child = getattr(obj, attr, None)
            if child is None:
                continue
            if isinstance(child, nn.Module):
                setattr(obj, attr, unet)
                return
            obj = child
            break
        else:
            raise TypeError(f"no network attribute in {type(obj).__name__}")


def _targets(unet: nn.Module, cfg: QuantConfig) -> list[str]:
    return [
        name
        for name, m in unet.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
        and not any(name == k or name.startswith(k + ".") for k in cfg.keep_float)
    ]


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _wrap(unet: nn.Module, cfg: QuantConfig) -> list[str]:
    names = _targets(unet, cfg)
    for name in names:
        layer = unet.get_submodule(name)
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        _replace(unet, name, cls(layer, cfg.weight_bits, cfg.act_bits))
    return names


def _copy_with_unet(model: Any) -> tuple[Any, nn.Module]:
    """A deep copy of ``model`` (a denoiser or a module) and the network inside the copy."""
    if isinstance(model, nn.Module):
        m = copy.deepcopy(model)
        return m, m
    unet = copy.deepcopy(find_unet(model))
    original = find_unet(model)
    # copy the wrappers, not the original network twice
    m = copy.deepcopy(model, memo={id(original): unet})
    return m, unet


# ----------------------------------------------------------------------------- calibration


@dataclass
class Trajectories:
    """Model inputs recorded along a sampling run: ``x [S, N, ...]``, ``t [S]`` (float64),
    ``cond`` (the batch's condition, or ``None``) and optionally ``features [S, N, ...]``
    (the mid-block attention output, for EDA-DM)."""

    x: Tensor
    t: Tensor
    cond: Any = None
    features: Tensor | None = None

    @property
    def steps(self) -> int:
        return int(self.x.shape[0])


@dataclass
class CalibrationSet:
    """Calibration inputs ``x [M, ...]``, ``t [M]`` and ``cond`` (``[M]`` or ``None``), with
    the step index each came from (``step [M]``)."""

    x: Tensor
    t: Tensor
    cond: Tensor | None = None
    step: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.x.shape[0])


def collect_trajectories(
    model: Any,
    x: Tensor,
    steps: int = 20,
    solver: str = "dpmpp_2m",
    *,
    cond: Any = None,
    features: bool = False,
    **sample_options: Any,
) -> Trajectories:
    """Run ``diffusolve.sample(model, x, steps, solver)`` with ``final="none"`` and record the
    input ``(x_t, t)`` of every model evaluation (one per step for single-evaluation
    solvers such as ``dpmpp_2m``; ``S`` = the number of evaluations). With
    ``features=True`` also record the output of the network's ``mid_block.attentions[0]``
    (or of ``mid_block``) at each evaluation (EDA-DM's ``F_t``).

    Example:
        >>> from diffusolve.models import load
        >>> m = load("digits")
        >>> tr = collect_trajectories(m, m.process.prior_sample((2, 1, 16, 16), noise=0), 5,
        ...                           cond=torch.tensor([3, 7]))
        >>> tr.x.shape, tr.t.shape
        (torch.Size([5, 2, 1, 16, 16]), torch.Size([5]))
    """
    from ..models import Denoiser
    from ..solvers import sample

    xs: list[Tensor] = []
    ts: list[Tensor] = []
    feats: list[Tensor] = []
    handle = None
    if features:
        unet = find_unet(model)
        mid = getattr(unet, "mid_block", None)
        if mid is None:
            raise ValueError("features=True needs a UNet with a mid_block (EDA-DM's F_t)")
        atts = getattr(mid, "attentions", None)
        target = atts[0] if atts is not None and len(atts) and atts[0] is not None else mid
        handle = target.register_forward_hook(
            lambda _m, _i, out: feats.append((out[0] if isinstance(out, tuple) else out).detach())
        )

    class _Recorder(Denoiser):
        def __init__(self) -> None:
            self.process = model.process

        def denoise(self, xt: Tensor, t: Tensor, c: Any = None) -> Tensor:
            xs.append(xt.detach().clone())
            ts.append(torch.as_tensor(t, dtype=torch.float64).reshape(-1)[:1].clone())
            return model(xt, t, c)

    try:
        with torch.no_grad():
            sample(_Recorder(), x, steps, solver, cond=cond, final="none", **sample_options)
    finally:
        if handle is not None:
            handle.remove()
    return Trajectories(
        torch.stack(xs), torch.cat(ts), cond, torch.stack(feats) if features else None
    )


def _cond_rows(cond: Any, idx: Tensor, n: int) -> Tensor | None:
    if cond is None:
        return None
    c = torch.as_tensor(cond)
    if c.numel() == 1:
        return c.reshape(1).expand(len(idx)).clone()
    if c.shape[0] != n:
        raise ValueError(f"cond has {c.shape[0]} rows for {n} trajectories")
    return c[idx]


def _gather(tr: Trajectories, steps: Tensor, samples: Tensor) -> CalibrationSet:
    n = tr.x.shape[1]
    return CalibrationSet(
        tr.x[steps, samples], tr.t[steps], _cond_rows(tr.cond, samples, n), steps.clone()
    )


def uniform_calibration(
    tr: Trajectories, cali_st: int = 20, cali_n: int = 256, seed: int = 0
) -> CalibrationSet:
    """Q-Diffusion's time-step-aware calibration: steps ``range(0, S, S // cali_st)`` (the
    whole trajectory when ``cali_st >= S``), ``cali_n`` trajectories drawn without
    replacement at each (all of them when fewer). Paper defaults ``cali_st=20, cali_n=256``
    (CIFAR-10).

    Example:
        >>> tr = Trajectories(torch.zeros(10, 4, 1), torch.linspace(1, 0.1, 10).double())
        >>> uniform_calibration(tr, cali_st=5, cali_n=3).step.tolist()
        [0, 0, 0, 2, 2, 2, 4, 4, 4, 6, 6, 6, 8, 8, 8]
    """
    s, n = tr.steps, tr.x.shape[1]
    stride = max(s // max(int(cali_st), 1), 1)
    gen = torch.Generator().manual_seed(seed)
    steps, samples = [], []
    for k in range(0, s, stride):
        pick = torch.randperm(n, generator=gen)[: min(int(cali_n), n)]
        steps.append(torch.full((len(pick),), k, dtype=torch.long))
        samples.append(pick)
    return _gather(tr, torch.cat(steps), torch.cat(samples))


def ptq4dm_step_indices(
    n: int, steps: int, mean: float = 0.4, std: float = 0.4, seed: int = 0
) -> Tensor:
    """PTQ4DM's NDTC time draws as trajectory step indices: ``u ~ N(mean, std^2)``,
    ``k = clamp(round(u * S), 0, S - 1)`` counted from the clean end, returned as the index
    ``S - 1 - k`` into a trajectory stored from noise (0) to clean (``S - 1``). Paper
    defaults ``mean = std = 0.4`` (Shang et al., CVPR 2023; the released DNTC script).

    Example:
        >>> k = ptq4dm_step_indices(4096, 100)
        >>> abs(int((99 - k).median()) - 40) <= 2  # the clamp keeps the median at mean * S
        True
    """
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(int(n), generator=gen, dtype=torch.float64) * std + mean
    k = torch.clamp(torch.round(u * steps), 0, steps - 1).to(torch.long)
    return steps - 1 - k


def ptq4dm_calibration(
    tr: Trajectories, n: int = 1024, mean: float = 0.4, std: float = 0.4, seed: int = 0
) -> CalibrationSet:
    """PTQ4DM's Normally Distributed Time-step Calibration: ``n`` samples (paper: 1024), the
    ``i``-th taken from trajectory ``i mod N`` at step :func:`ptq4dm_step_indices` (one
    time per trajectory as in the paper when ``n <= N``)."""
    steps = ptq4dm_step_indices(n, tr.steps, mean, std, seed)
    samples = torch.arange(int(n)) % tr.x.shape[1]
    return _gather(tr, steps, samples)


def _minmax(v: Tensor) -> Tensor:
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else torch.zeros_like(v)


def tdac_weights(features: Tensor, r: float | None = None, lam: float = 1.2) -> Tensor:
    """EDA-DM's per-step weights ``w_t = minmax(d_t) + lam * minmax(v_t)`` from the
    features ``F [S, N, ...]`` (density radius ``r``; default: the median pairwise
    distance, since the paper tunes ``r`` per data set -- 3.0 CIFAR, 0.3 LDM-bedroom)."""
    s = features.shape[0]
    f = features.reshape(s, features.shape[1], -1).to(torch.float64)
    flat = f.reshape(s, -1)
    sq = (flat**2).sum(1)
    dist = ((sq[:, None] + sq[None, :] - 2 * flat @ flat.T) / flat.shape[1]).clamp_min(0)
    off = ~torch.eye(s, dtype=torch.bool)
    if r is None:
        r = float(dist[off].median()) if s > 1 else 0.0
    density = ((dist <= r) & off).sum(1).to(torch.float64)
    unit = F.normalize(f, dim=2)
    cos = torch.einsum("snd,pnd->spn", unit, unit)
    diversity = (1 - cos).sum(dim=(1, 2))
    return _minmax(density) + lam * _minmax(diversity)


def tdac_calibration(
    tr: Trajectories,
    n: int = 1024,
    r: float | None = None,
    lam: float = 1.2,
    seed: int = 0,
) -> CalibrationSet:
    """EDA-DM's Temporal Distribution Alignment Calibration: ``n_t = round(n w_t / sum w)``
    samples from step ``t`` (weights :func:`tdac_weights`; paper ``n = 1024``,
    ``lambda = 1.2`` for CIFAR), drawn from the trajectories without replacement while
    they last. Needs ``collect_trajectories(..., features=True)``."""
    if tr.features is None:
        raise ValueError("TDAC needs the mid-block features: collect_trajectories(features=True)")
    w = tdac_weights(tr.features, r, lam)
    if float(w.sum()) <= 0:
        w = torch.ones_like(w)
    counts = torch.round(n * w / w.sum()).to(torch.long)
    gen = torch.Generator().manual_seed(seed)
    big = tr.x.shape[1]
    steps, samples = [], []
    for k, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        idx = torch.cat([torch.randperm(big, generator=gen) for _ in range(-(-c // big))])[:c]
        steps.append(torch.full((c,), k, dtype=torch.long))
        samples.append(idx)
    return _gather(tr, torch.cat(steps), torch.cat(samples))


# ----------------------------------------------------------------------------- quantize


def _wrappers(unet: nn.Module) -> dict[str, _QuantLayer]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, _QuantLayer)}


def quantize(
    model: Any,
    config: QuantConfig | None = None,
    calibration: CalibrationSet | None = None,
    *,
    batch_size: int = 256,
    seed: int = 0,
    reconstruct: Any = None,
) -> Any:
    """A fake-quantized copy of ``model`` (a denoiser such as ``load("digits")`` or a bare
    ``nn.Module``); ``model`` itself is not modified.

    With activations quantized (``config.act_bits`` set) the ranges are calibrated on
    ``calibration`` by running the copy as a denoiser, ``model(x, t, cond)``, in batches,
    with weights quantized and activations observed in float. ``reconstruct`` (a
    :class:`~diffusolve.accel.recon.BlockReconstruction`) then fits every block on the
    same calibration set (EDA-DM's FBR; :func:`~diffusolve.accel.recon.reconstruct_blocks`).

    Example:
        >>> from diffusolve.models import load
        >>> m = load("digits")
        >>> q = quantize(m, QuantConfig(weight_bits=8, act_bits=None))
        >>> type(find_unet(q).conv_in).__name__, type(find_unet(q).conv_out).__name__
        ('Conv2d', 'Conv2d')
    """
    cfg = QuantConfig() if config is None else config
    qmodel, unet = _copy_with_unet(model)
    _wrap(unet, cfg)
    layers = _wrappers(unet)
    if cfg.act_bits is not None:
        if calibration is None or len(calibration) == 0:
            raise ValueError(
                "activation quantization needs a calibration set (uniform_calibration, "
                "ptq4dm_calibration or tdac_calibration of collect_trajectories(model, ...)); "
                "or set QuantConfig(act_bits=None)."
            )
        if isinstance(qmodel, nn.Module):
            raise TypeError("activation calibration needs a denoiser (model(x, t, cond)).")
        m = len(calibration)
        per_call = max(cfg.sample_values // max(1, -(-m // batch_size)), 1)
        for i, layer in enumerate(layers.values()):
            layer.observer = _Observer(cfg.sample_values, seed + i)
            layer.observer.per_call = per_call
        try:
            with torch.no_grad():
                for s in range(0, m, batch_size):
                    sl = slice(s, s + batch_size)
                    c = None if calibration.cond is None else calibration.cond[sl]
                    qmodel(calibration.x[sl], calibration.t[sl], c)
            for layer in layers.values():
                lo, hi = layer.observer.range(cfg)  # type: ignore[union-attr]
                layer.act_range = torch.tensor([lo, hi], dtype=torch.float32)
        finally:
            for layer in layers.values():
                layer.observer = None
    qmodel._quant_config = cfg  # type: ignore[union-attr]
    if reconstruct is not None:
        from .recon import reconstruct_blocks

        if isinstance(qmodel, nn.Module) or calibration is None:
            raise ValueError("block reconstruction needs a denoiser and a calibration set")
        qmodel = reconstruct_blocks(qmodel, model, calibration, reconstruct)
    return qmodel


# ----------------------------------------------------------------------------- storage


def _pack4(q: Tensor) -> Tensor:
    u = (q.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, u.new_zeros(1)])
    return u[0::2] | (u[1::2] << 4)


def _unpack4(p: Tensor, shape: tuple[int, ...]) -> Tensor:
    u = torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1)[: math.prod(shape)]
    return (u.to(torch.int16) - 8).to(torch.int8).reshape(shape)


def save_quantized(qmodel: Any, path: str | Path) -> Path:
    """Write a :func:`quantize` result as safetensors: per quantized layer its int8 weights
    (``.qweight``; packed two per byte when ``weight_bits <= 4``, ``.qweight4``), float32
    per-channel ``.scale``, ``.bias`` and ``.act_range``; the float layers' parameters and
    buffers as they are; the :class:`QuantConfig` (and the block reconstruction's options,
    when one was run) in the metadata. A reconstructed model needs nothing more: its
    rounding is in the int8 weights and its learned steps in ``.act_range``."""
    from safetensors.torch import save_file

    unet = find_unet(qmodel)
    if isinstance(unet, Int8Network):
        return _save_int8(unet, path)
    cfg: QuantConfig = getattr(qmodel, "_quant_config", None) or QuantConfig()
    layers = _wrappers(unet)
    tensors: dict[str, Tensor] = {}
    for name, t in unet.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in layers:
            if leaf == "qweight" and cfg.weight_bits <= 4:
                tensors[f"{owner}.qweight4"] = _pack4(t)
                continue
        tensors[name] = t.detach().contiguous().clone()
    meta = {
        "quant_config": json.dumps(asdict(cfg)),
        "layers": json.dumps({n: list(m.qweight.shape) for n, m in layers.items()}),
    }
    recon = getattr(qmodel, "_reconstruction", None)
    if recon is not None:  # provenance only: the result is in the weights and ranges
        meta["reconstruction"] = json.dumps(asdict(recon))
    path = Path(path)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_quantized(model: Any, path: str | Path, *, compile: bool = True) -> Any:
    """Rebuild the fake-quant model written by :func:`save_quantized` on a copy of the float
    ``model`` (the architecture; its weights are replaced). Outputs equal the saved model's
    bit for bit (same int8 weights, scales and ranges, same arithmetic). A file of a
    :func:`real_int8` model (``format: torchao-pt2e``) holds the float network and the
    calibrated observers; loading rebuilds the same :class:`Int8Network` (the int8
    program is re-derived, deterministically, at the first call; ``compile`` as in
    :func:`real_int8`)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") == "torchao-pt2e":
        return _load_int8(model, tensors, compile)
    raw = json.loads(meta["quant_config"])
    cfg = QuantConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    shapes = json.loads(meta["layers"])
    qmodel, unet = _copy_with_unet(model)
    names = _wrap(unet, cfg)
    if sorted(names) != sorted(shapes):
        raise ValueError(f"{path}: its quantized layers do not match this model's architecture")
    for name, shape in shapes.items():
        key = f"{name}.qweight4"
        if key in tensors:
            tensors[f"{name}.qweight"] = _unpack4(tensors.pop(key), tuple(shape))
    unet.load_state_dict(tensors, strict=True)
    qmodel._quant_config = cfg  # type: ignore[union-attr]
    if "reconstruction" in meta:
        from .recon import BlockReconstruction

        raw = json.loads(meta["reconstruction"])
        qmodel._reconstruction = BlockReconstruction(  # type: ignore[union-attr]
            **{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        )
    return qmodel


def _save_int8(net: Int8Network, path: str | Path) -> Path:
    from safetensors.torch import save_file

    tensors = {f"net.{k}": v.detach().contiguous().clone() for k, v in net.net.state_dict().items()}
    tensors.update({f"observer.{k}": v.contiguous().clone() for k, v in net.observers.items()})
    meta = {"format": "torchao-pt2e", "quantizer": "X86InductorQuantizer default"}
    path = Path(path)
    save_file(tensors, str(path), metadata=meta)
    return path


def _load_int8(model: Any, tensors: dict[str, Tensor], compile: bool) -> Any:
    _require_torchao()
    qmodel, unet = _copy_with_unet(model)
    unet.load_state_dict(
        {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True
    )
    observers = {k[9:]: v for k, v in tensors.items() if k.startswith("observer.")}
    _set_unet(qmodel, Int8Network(unet, observers, compile))
    return qmodel


def int8_dynamic(model: Any) -> Any:
    """A copy of ``model`` whose ``nn.Linear`` layers run in int8 on CPU
    (``torch.ao.quantization.quantize_dynamic``: int8 weights, activations quantized per
    call). Convolutions stay float: dynamic quantization has no Conv2d kernel. This is a real
    low-precision path, not a simulation of :func:`quantize` (no calibration, dynamic
    activation ranges)."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    qmodel, unet = _copy_with_unet(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qunet = quantize_dynamic(unet, {nn.Linear}, dtype=torch.qint8)
    if qunet is not unet:
        _set_unet(qmodel, qunet)
    return qmodel


# ----------------------------------------------------------------------------- real int8 (torchao)

REAL_INT8_BACKENDS = ("torchao-pt2e", "torch.ao-dynamic")


def _require_torchao() -> None:
    try:
        import torchao.quantization.pt2e  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "real_int8(backend='torchao-pt2e') needs torchao: pip install torchao "
            "(or use backend='torch.ao-dynamic', int8 Linear layers only)"
        ) from e


class _Call(nn.Module):
    """The network as a function of positional tensors (what torch.export traces)."""

    def __init__(self, net: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.net, self.names = net, names

    def forward(self, sample: Tensor, timestep: Tensor, *values: Tensor) -> Tensor:
        kwargs = dict(zip(self.names, values, strict=True))
        return self.net(sample, timestep, **kwargs, return_dict=False)[0]


def _prepare_pt2e(net: nn.Module, args: tuple[Tensor, ...], names: tuple[str, ...]) -> Any:
    import warnings

    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(_Call(net, names).eval(), args)
        return prepare_pt2e(exported.module(), quantizer)


def _split_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[str, ...], list]:
    kwargs = {k: v for k, v in kwargs.items() if k != "return_dict" and v is not None}
    if len(args) > 2:
        raise TypeError("pass the network's conditioning by keyword (class_labels=...)")
    names = tuple(sorted(kwargs))
    return names, [*args, *(kwargs[k] for k in names)]


class Int8Network(nn.Module):
    """A diffusers UNet run as a static int8 program of torchao's PT2E flow on CPU.

    Holds the float network (the architecture and the weights the int8 weights are made
    from) and the calibrated observer state (``activation_post_process_*``: per-tensor
    activation histograms and per-channel weight ranges). On each new input signature it
    exports the network (``torch.export``), inserts the observers
    (``prepare_pt2e`` with ``X86InductorQuantizer``'s default: per-channel symmetric int8
    weights, per-tensor affine uint8 activations of every convolution and linear layer),
    loads the calibrated state, converts (``convert_pt2e``: int8 weights folded) and, with
    ``compile=True``, compiles with Inductor (``freezing`` on), which lowers the q/dq pairs
    to oneDNN int8 kernels. The observers do not depend on the batch size, so one
    calibration serves every shape. Called like the UNet: ``(sample, timestep, **cond)``,
    returning ``(output,)``.
    """

    def __init__(self, net: nn.Module, observers: dict[str, Tensor], compile: bool = True) -> None:
        super().__init__()
        self.net = net.eval()
        self.observers = {k: v.detach().clone() for k, v in observers.items()}
        self.compile = bool(compile)
        self._programs: dict[Any, Any] = {}

    def program(self, *args: Tensor, names: tuple[str, ...] = ()) -> Any:
        """The converted (and, if ``compile``, compiled) program for these inputs."""
        key = (names, tuple((tuple(a.shape), a.dtype) for a in args))
        if key not in self._programs:
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

            prepared = _prepare_pt2e(self.net, args, names)
            state = {k: v for k, v in prepared.state_dict().items() if _is_observer(k)}
            if sorted(state) != sorted(self.observers):
                raise ValueError(
                    "the calibrated observers do not match this network's int8 graph: "
                    "calibrate again with real_int8 on the same architecture"
                )
            prepared.load_state_dict(self.observers, strict=False)
            program = convert_pt2e(prepared)
            if self.compile:
                import torch._inductor.config as inductor_config

                inductor_config.freezing = True
                program = torch.compile(program)
            self._programs[key] = program
        return self._programs[key]

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor]:
        names, values = _split_call(args, kwargs)
        with torch.no_grad():
            return (self.program(*values, names=names)(*values),)


def _is_observer(key: str) -> bool:
    return key.startswith("activation_post_process_")


def real_int8(
    model: Any,
    calibration: CalibrationSet | None = None,
    *,
    backend: str = "torchao-pt2e",
    batch_size: int = 256,
    compile: bool = True,
) -> Any:
    """A copy of ``model`` that really runs in int8 on CPU.

    ``backend="torchao-pt2e"`` (default; needs ``torchao``): static int8 of every
    convolution and linear layer through torchao's PT2E flow with the x86 Inductor
    quantizer (:class:`Int8Network`), calibrated on ``calibration`` (e.g.
    :func:`tdac_calibration`; full batches of ``batch_size`` rows, the remainder is
    dropped), compiled with Inductor at the first call of each input shape (minutes on one
    CPU thread; ``compile=False`` runs the int8 graph uncompiled, q/dq simulated, for
    checks). ``backend="torch.ao-dynamic"``: :func:`int8_dynamic` (Linear layers only, no
    calibration). Measured choice: see the module docstring.

    Example:
        >>> real_int8(torch.nn.Linear(2, 2), backend="pt3")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: backend must be one of ('torchao-pt2e', 'torch.ao-dynamic'), got 'pt3'
    """
    if backend not in REAL_INT8_BACKENDS:
        raise ValueError(f"backend must be one of {REAL_INT8_BACKENDS}, got {backend!r}")
    if backend == "torch.ao-dynamic":
        return int8_dynamic(model)
    _require_torchao()
    if calibration is None or len(calibration) == 0:
        raise ValueError("the torchao-pt2e backend needs a calibration set (tdac_calibration...)")
    if isinstance(model, nn.Module):
        raise TypeError("real_int8 needs a denoiser (model(x, t, cond)) to calibrate")
    qmodel, unet = _copy_with_unet(model)
    unet.eval()
    calls: list[tuple[tuple[str, ...], list[Tensor]]] = []

    def record(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append(_split_call(args, kwargs))

    rows = min(int(batch_size), len(calibration))
    handle = unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            for s in range(0, len(calibration) - rows + 1, rows):
                c = None if calibration.cond is None else calibration.cond[s : s + rows]
                qmodel(calibration.x[s : s + rows], calibration.t[s : s + rows], c)
    finally:
        handle.remove()
    names, first = calls[0]
    prepared = _prepare_pt2e(unet, tuple(first), names)
    with torch.no_grad():
        for _, values in calls:
            prepared(*values)
    observers = {k: v for k, v in prepared.state_dict().items() if _is_observer(k)}
    _set_unet(qmodel, Int8Network(unet, observers, compile))
    return qmodel
