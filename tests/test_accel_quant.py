"""accel.quant: quantizer bounds, calibration sets from sampling runs, PTQ4DM's time law,
EDA-DM's weights, bit-exact safetensors round trips, the user's model untouched."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusolve.accel.quant import (
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    Trajectories,
    collect_trajectories,
    fake_quant_activation,
    find_unet,
    int8_dynamic,
    load_quantized,
    ptq4dm_calibration,
    ptq4dm_step_indices,
    quantize,
    save_quantized,
    tdac_calibration,
    tdac_weights,
    uniform_calibration,
)
from diffusolve.models import load


@pytest.fixture(scope="module")
def digits():
    return load("digits")


@pytest.fixture(scope="module")
def traj(digits):
    x = digits.process.prior_sample((12, 1, 16, 16), noise=3)
    return collect_trajectories(digits, x, 8, "dpmpp_2m", cond=torch.arange(12) % 10, features=True)


def _rel(a, b):
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_round_trip_within_half_a_step(bits):
    from diffusolve.accel.quant import quantize_weight

    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(bits)) * torch.logspace(
        -3, 1, 16
    ).reshape(-1, 1, 1, 1)
    q, scale = quantize_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and int(q.abs().max()) <= qmax
    err = (w - q.float() * scale.reshape(-1, 1, 1, 1)).abs().reshape(16, -1).amax(1)
    assert bool((err <= scale / 2 * (1 + 1e-6)).all())
    # the largest magnitude of each channel is exact: scale = max|w_c| / qmax
    torch.testing.assert_close(scale, w.reshape(16, -1).abs().amax(1) / qmax)


def test_activation_quantizer_bounds():
    x = torch.linspace(-3, 5, 1001)
    lo, hi, bits = -2.0, 4.0, 8
    y = fake_quant_activation(x, lo, hi, bits)
    step = (hi - lo) / (2**bits - 1)
    inside = (x >= lo) & (x <= hi)
    assert float((y - x)[inside].abs().max()) <= step / 2 + 1e-6
    assert float(y.min()) >= lo - step / 2 and float(y.max()) <= hi + step / 2
    assert float(fake_quant_activation(torch.zeros(3), lo, hi, bits).abs().max()) == 0.0
    assert len(torch.unique(y)) <= 2**bits


def test_config_validation():
    with pytest.raises(ValueError, match="weight_bits"):
        QuantConfig(weight_bits=9)
    with pytest.raises(ValueError, match="act_range"):
        QuantConfig(act_range="kl")
    with pytest.raises(ValueError, match="calibration set"):
        quantize(nn.Linear(2, 2), QuantConfig())


def test_calibration_pairs_from_a_sampling_run(digits, traj):
    # dpmpp_2m: one evaluation per step, final="none": 8 (x_t, t) pairs per trajectory
    assert traj.x.shape == (8, 12, 1, 16, 16) and traj.t.shape == (8,)
    assert traj.features.shape[:2] == (8, 12)
    torch.testing.assert_close(traj.x[0], digits.process.prior_sample((12, 1, 16, 16), noise=3))
    assert bool((traj.t[1:] < traj.t[:-1]).all())
    cal = uniform_calibration(traj, cali_st=4, cali_n=5)
    assert len(cal) == 4 * 5 and cal.step.tolist() == sum(([k] * 5 for k in (0, 2, 4, 6)), [])
    cal = uniform_calibration(traj, cali_st=20, cali_n=256)  # more than there is: all pairs
    assert len(cal) == 8 * 12
    for i in range(0, len(cal), 7):
        k = int(cal.step[i])
        j = int(torch.nonzero((traj.x[k] == cal.x[i]).flatten(1).all(1))[0])
        assert float(cal.t[i]) == float(traj.t[k]) and int(cal.cond[i]) == j % 10


def test_ptq4dm_time_law():
    s, n = 1000, 200_000
    k = s - 1 - ptq4dm_step_indices(n, s)  # steps from the clean end, u * S clamped
    u = k.double() / s
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    # clamped mass at the clean end: P(u S < 0.5) = Phi((0.5 / S - 0.4) / 0.4)
    assert abs(float((k == 0).double().mean()) - phi((0.5 / s - 0.4) / 0.4)) < 0.005
    # quantiles inside the range are the normal's: 0.4 + 0.4 z_q
    for q, z in ((0.25, -0.6745), (0.5, 0.0), (0.75, 0.6745)):
        assert abs(float(torch.quantile(u, q)) - (0.4 + 0.4 * z)) < 0.005
    assert abs(float((k == s - 1).double().mean()) - (1 - phi((1 - 1.5 / s - 0.4) / 0.4))) < 0.005


def test_ptq4dm_calibration_takes_one_time_per_trajectory(traj):
    cal = ptq4dm_calibration(traj, n=12, seed=1)
    assert len(cal) == 12
    for i in range(12):
        torch.testing.assert_close(cal.x[i], traj.x[cal.step[i], i], rtol=0, atol=0)
        assert int(cal.cond[i]) == i % 10


def test_tdac_weights_closed_form():
    # three steps, two samples, 2-d features: hand-computed density and diversity
    f = torch.tensor(
        [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.1], [0.0, 1.0]], [[-1.0, 0.0], [0.0, -3.0]]]
    )
    w = tdac_weights(f, r=0.01, lam=1.2)
    # mse(0,1) = 0.01 / 4 <= r, others far: density [1, 1, 0] -> minmax [1, 1, 0]
    cos = torch.nn.functional.cosine_similarity
    v = torch.tensor(
        [sum(float((1 - cos(f[a], f[b], dim=1)).sum()) for b in range(3)) for a in range(3)],
        dtype=torch.float64,
    )
    v = (v - v.min()) / (v.max() - v.min())
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64) + 1.2 * v)
    tr = Trajectories(torch.randn(3, 2, 4), torch.tensor([3.0, 2.0, 1.0]).double(), None, f)
    cal = tdac_calibration(tr, n=100, r=0.01)
    counts = torch.bincount(cal.step, minlength=3)
    torch.testing.assert_close(counts.double(), torch.round(100 * w / w.sum()))


def test_quantized_copy_errors_fall_with_bits_and_leave_the_model_alone(digits, traj):
    before = {k: v.clone() for k, v in find_unet(digits).state_dict().items()}
    cal = uniform_calibration(traj, cali_st=8, cali_n=4)
    x, t, c = traj.x[4, :6], traj.t[4], torch.arange(6)
    with torch.no_grad():
        ref = digits(x, t, c)
        errs = {
            b: _rel(ref, quantize(digits, QuantConfig(weight_bits=b), cal)(x, t, c)) for b in (4, 8)
        }
        w_only = _rel(ref, quantize(digits, QuantConfig(act_bits=None))(x, t, c))
    assert errs[8] < 0.03 and errs[8] < errs[4] and w_only < errs[8]
    after = find_unet(digits).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()
    assert not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in find_unet(digits).modules())
    q = quantize(digits, QuantConfig(act_bits=None))
    unet = find_unet(q)
    assert isinstance(unet.conv_in, nn.Conv2d) and isinstance(
        unet.time_embedding.linear_1, nn.Linear
    )
    assert isinstance(unet.mid_block.attentions[0].to_q, QuantLinear)


@pytest.mark.parametrize("bits", [8, 4])
def test_safetensors_round_trip_is_bit_exact(digits, traj, tmp_path, bits):
    cal = ptq4dm_calibration(traj, n=16)
    q = quantize(digits, QuantConfig(weight_bits=bits), cal)
    path = save_quantized(q, tmp_path / "q.safetensors")
    r = load_quantized(digits, path)
    x, t, c = traj.x[3, :4], traj.t[3], torch.arange(4)
    with torch.no_grad():
        assert torch.equal(q(x, t, c), r(x, t, c))
    if bits == 4:  # packed two weights a byte: smaller than the int8 file
        p8 = save_quantized(
            quantize(digits, QuantConfig(act_bits=None)), tmp_path / "w8.safetensors"
        )
        assert path.stat().st_size < 0.75 * p8.stat().st_size


def test_int8_dynamic_linear(digits, traj):
    q = int8_dynamic(digits)
    unet = find_unet(q)
    assert type(unet.mid_block.attentions[0].to_q).__module__.startswith("torch.ao")
    assert type(unet.conv_in) is nn.Conv2d
    x, t, c = traj.x[2, :4], traj.t[2], torch.arange(4)
    with torch.no_grad():
        assert _rel(digits(x, t, c), q(x, t, c)) < 0.05
    assert type(find_unet(digits).mid_block.attentions[0].to_q) is nn.Linear


@pytest.mark.slow  # ~30 s: two torch.export + PT2E prepare passes of the UNet
def test_real_int8_torchao_pt2e_round_trip(digits, traj, tmp_path):
    pytest.importorskip(
        "torchao.quantization.pt2e",
        reason="torchao is not installed: the torchao-pt2e int8 CPU backend is optional",
    )
    from diffusolve.accel.quant import Int8Network, real_int8

    cal = uniform_calibration(traj, cali_st=8, cali_n=4)  # 32 rows: one batch of 32
    q = real_int8(digits, cal, batch_size=32, compile=False)  # uncompiled: q/dq simulated
    net = find_unet(q)
    assert isinstance(net, Int8Network) and type(find_unet(digits)).__name__ == "UNet2DModel"
    x, t, c = traj.x[3, :4], traj.t[3], torch.arange(4)
    with torch.no_grad():
        y = q(x, t, c)
        assert _rel(digits(x, t, c), y) < 0.05
    # the program holds int8 weights: one per convolution and linear layer of the UNet
    (program,) = net._programs.values()
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in find_unet(digits).modules())
    int8 = [b for b in program.buffers() if b.dtype == torch.int8]
    assert len(int8) == n_layers
    path = save_quantized(q, tmp_path / "int8.safetensors")
    r = load_quantized(digits, path, compile=False)
    with torch.no_grad():
        assert torch.equal(r(x, t, c), y)
    with pytest.raises(ValueError, match="backend"):
        real_int8(digits, cal, backend="int4")
