"""Dynamic thresholding (Saharia et al. 2022, Imagen): the function and the denoiser wrapper.

Per sample, ``s = min(max(q, 1), max_value)`` with ``q`` the ``ratio``-quantile of ``|x0|``
over all of the sample's entries; the estimate becomes ``clip(x0, -s, s) / s``. Three
regimes, each exercised: ``q <= 1`` (identity), ``1 < q <= max_value`` (the quantile path:
clip at the quantile, divide by it) and ``q > max_value`` (the division path: clip at
``max_value``, divide by it). Every test uses a ``max_value`` above 1: with the default
``max_value = 1`` only the identity is reachable.

The expected values come from a hand implementation (sorting and linear interpolation
between order statistics, the definition of ``torch.quantile`` and ``numpy.quantile``).
"""

from __future__ import annotations

import math

import pytest
import torch

import diffusolve
from diffusolve.models import DynamicThresholding, Gaussian
from diffusolve.models.base import dynamic_threshold
from diffusolve.process import make_grid, vp_linear

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def hand_quantile(v: list[float], ratio: float) -> float:
    """Linear interpolation between order statistics at position ``ratio (m - 1)``."""
    v = sorted(v)
    pos = ratio * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def hand_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    out = torch.empty_like(x0)
    for i in range(x0.shape[0]):
        q = hand_quantile(x0[i].abs().flatten().tolist(), ratio)
        s = min(max(q, 1.0), max_value)
        out[i] = x0[i].clamp(-s, s) / s
    return out


def _batch(dtype=torch.float32) -> torch.Tensor:
    """Four samples [4, 3, 8, 8]: quantiles about 0.5 (identity), 2.5 and 4 (quantile path,
    max 5), and 16 (division path)."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.3, 1.5, 2.5, 10.0], dtype=F64).view(4, 1, 1, 1)
    return (torch.randn(4, 3, 8, 8, generator=g, dtype=F64) * scale).to(dtype)


def test_three_regimes_against_the_hand_formula():
    x0 = _batch()
    ratio, max_value = 0.9, 5.0
    out = dynamic_threshold(x0, ratio, max_value)
    torch.testing.assert_close(out, hand_threshold(x0, ratio, max_value), rtol=1e-6, atol=1e-6)
    q = [hand_quantile(x0[i].abs().flatten().tolist(), ratio) for i in range(4)]
    assert q[0] < 1 < q[1] < q[2] < max_value < q[3], q  # the batch covers every regime
    # identity below 1
    torch.testing.assert_close(out[0], x0[0], rtol=0, atol=0)
    # quantile path: the largest entry is 1 and about (1 - ratio) of the entries are clipped
    for i in (1, 2):
        assert float(out[i].abs().max()) == pytest.approx(1.0, abs=1e-6)
        clipped = float((out[i].abs() >= 1 - 1e-6).double().mean())
        assert abs(clipped - (1 - ratio)) <= 1.5 / out[i].numel() + 0.01, clipped
        inner = x0[i].abs() < q[i] * (1 - 1e-6)
        torch.testing.assert_close(out[i][inner], x0[i][inner] / q[i], rtol=1e-6, atol=1e-7)
    # division path: clip at max_value, divide by max_value; the result stays below 1
    torch.testing.assert_close(out[3], x0[3].clamp(-5.0, 5.0) / 5.0, rtol=1e-6, atol=1e-7)
    assert float(out[3].abs().max()) == pytest.approx(1.0, abs=1e-6)  # q > max: clip active


def test_per_sample_and_shape_free():
    x0 = _batch()
    perm = torch.tensor([2, 0, 3, 1])
    out = dynamic_threshold(x0, 0.8, 3.0)
    torch.testing.assert_close(dynamic_threshold(x0[perm], 0.8, 3.0), out[perm])
    flat = dynamic_threshold(x0.reshape(4, -1), 0.8, 3.0)
    torch.testing.assert_close(flat.reshape(x0.shape), out)
    assert out.dtype == x0.dtype and out.shape == x0.shape


@pytest.mark.parametrize("ratio", [0.5, 0.995, 1.0])
def test_ratio_changes_the_threshold(ratio):
    x0 = _batch()
    torch.testing.assert_close(
        dynamic_threshold(x0, ratio, 4.0), hand_threshold(x0, ratio, 4.0), rtol=1e-6, atol=1e-6
    )


def test_default_max_is_a_clamp_to_unit_range():
    """max_value = 1 (the default): s = 1 for every sample, a plain clip to [-1, 1]."""
    x0 = _batch()
    torch.testing.assert_close(dynamic_threshold(x0), x0.clamp(-1, 1), rtol=0, atol=0)


def test_float64_thresholding_is_exact():
    """float64 estimates are thresholded in float64 (the quantile was once taken in float32,
    a 2e-7 relative error in s that broke float64 reference solves)."""
    x0 = _batch(F64)
    torch.testing.assert_close(
        dynamic_threshold(x0, 0.9, 5.0), hand_threshold(x0, 0.9, 5.0), rtol=1e-12, atol=1e-13
    )


class _Scaled:
    """A toy denoiser with its process: ``x0 = 3 x``."""

    def __init__(self, process):
        self.process = process

    def __call__(self, x, t, cond=None):
        return 3.0 * x


def test_wrapper_thresholds_every_estimate():
    p = vp_linear()
    inner = _Scaled(p)
    wrapped = DynamicThresholding(inner, ratio=0.9, max_value=5.0)
    assert wrapped.process is p
    x = _batch() / 3.0
    torch.testing.assert_close(
        wrapped(x, 0.5), hand_threshold(3.0 * x, 0.9, 5.0), rtol=1e-6, atol=1e-6
    )
    # ratio = 1 (the largest valid): s is the per-sample maximum of |x0|, clipped to [1, max]
    top = DynamicThresholding(inner, ratio=1.0, max_value=20.0)
    x0 = 3.0 * x
    s = x0.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(1.0, 20.0)
    torch.testing.assert_close(top(x, 0.5), x0.clamp(-s, s) / s, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="ratio"):
        DynamicThresholding(inner, ratio=0.0)
    with pytest.raises(ValueError, match="ratio"):
        DynamicThresholding(inner, ratio=1.5)


def test_thresholded_solve_ends_in_the_unit_box():
    """A prior with data far outside [-1, 1]: every x0 estimate, so the final denoise, is
    thresholded; the quantile regime leaves about (1 - ratio) of entries at +-1."""
    p = vp_linear()
    d = 64
    prior = Gaussian(torch.zeros(d), 9.0 * torch.ones(d), process=p)
    model = DynamicThresholding(prior, ratio=0.9, max_value=10.0)
    x = p.prior_sample((8, d), torch.Generator().manual_seed(0), dtype=F64)
    seen = []

    def spy(info):
        seen.append(info["i"])

    out = diffusolve.sample(model, x, make_grid(p, 10, "logsnr"), "ddim", callback=spy)
    assert len(seen) == 10
    assert float(out.abs().max()) <= 1.0 + 1e-6
    at_one = (out.abs() >= 1 - 1e-6).double().mean(1)
    assert torch.all((at_one - 0.1).abs() <= 1.5 / d + 0.01), at_one
    plain = diffusolve.sample(prior, x, make_grid(p, 10, "logsnr"), "ddim")
    assert float(plain.abs().max()) > 3.0  # without the wrapper the data scale (3) shows
