"""accel.recon: AdaRound beats nearest rounding and lands on the grid, the rounding
regulariser alone gives nearest rounding, EDA-DM's block reconstruction lowers a block's
error on the digits UNet, and the result round-trips through safetensors bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusolve.accel.quant import (
    QuantConfig,
    QuantLinear,
    collect_trajectories,
    find_unet,
    load_quantized,
    quantize,
    save_quantized,
    tdac_calibration,
)
from diffusolve.accel.recon import (
    BlockReconstruction,
    find_blocks,
    reconstruct_blocks,
    reconstruct_module,
    rectified_sigmoid,
)
from diffusolve.models import load


def _layer(seed=0, d_in=32, d_out=16):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g) / d_in**0.5)
    # correlated inputs: the case where rounding each weight to nearest is not optimal
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, d_in, generator=g)
    return lin, x


def test_rectified_sigmoid_and_its_inverse():
    from diffusolve.accel.recon import _inverse_rectified_sigmoid

    rest = torch.linspace(0, 0.999, 101, dtype=torch.float64)
    torch.testing.assert_close(rectified_sigmoid(_inverse_rectified_sigmoid(rest)), rest)
    # clipped tails: exactly 0 / 1 once sigmoid(v) (zeta - gamma) + gamma leaves [0, 1]
    v0 = torch.log(torch.tensor(1 / 11))  # sigmoid(v0) = 1 / 12: h = 1.2 / 12 - 0.1 = 0
    assert float(rectified_sigmoid(v0 - 1e-3)) == 0.0 and float(rectified_sigmoid(-v0 + 1e-3)) == 1
    cfg = BlockReconstruction(iters=100)
    assert [cfg.beta_at(i) for i in (0, 19, 20, 60)] == [20.0, 20.0, 20.0, 11.0]
    assert abs(cfg.beta_at(99) - 2.225) < 1e-9
    with pytest.raises(ValueError, match="warmup"):
        BlockReconstruction(warmup=1.0)


def test_adaround_linear_beats_nearest_and_ends_on_the_grid():
    lin, x = _layer()
    target = lin(x).detach()
    q = QuantLinear(lin, 4, None)
    nearest = q.qweight.clone()
    w_s = lin.weight.detach() / q.scale[:, None]
    with torch.no_grad():
        mse_nearest = float(((q(x) - target) ** 2).mean())
    r = reconstruct_module(q, (x,), target, {"": lin.weight}, BlockReconstruction(iters=300))
    with torch.no_grad():
        mse = float(((q(x) - target) ** 2).mean())
    assert mse < 0.7 * mse_nearest and r["after"] < 0.7 * r["before"]
    qw = q.qweight.float()
    # AdaRound's grid: floor(w / s) + {0, 1}, i.e. floor or ceil of w / s (for a w / s that
    # is an integer, here the channel's largest |w| at +-7, floor + 1 is also allowed)
    assert bool(((qw == torch.floor(w_s)) | (qw == torch.floor(w_s) + 1)).all())
    assert bool((q.qweight != nearest).any())  # it did not just return nearest rounding
    assert r["binary"] > 0.8


def test_rounding_regulariser_alone_gives_nearest_rounding():
    # zero inputs: the output is the bias whatever the weights, so only the regulariser
    # moves V; it pushes h(V) away from 1/2 onto {0, 1}, each to its nearer side
    lin, _ = _layer(1)
    x = torch.zeros(64, 32)
    q = QuantLinear(lin, 4, None)
    nearest = q.qweight.clone()
    cfg = BlockReconstruction(iters=400, warmup=0.0, round_weight=1.0)
    r = reconstruct_module(q, (x,), lin(x).detach(), {"": lin.weight}, cfg)
    assert r["binary"] > 0.99  # the few left soft sit at h = 1/2, where its slope is 0
    assert torch.equal(q.qweight, nearest)


@pytest.fixture(scope="module")
def digits():
    return load("digits")


@pytest.fixture(scope="module")
def setup(digits):
    x = digits.process.prior_sample((16, 1, 16, 16), noise=5)
    tr = collect_trajectories(digits, x, 8, cond=torch.arange(16) % 10, features=True)
    cal = tdac_calibration(tr, n=96)
    q = quantize(digits, QCFG, cal)
    return cal, q


BLOCK = "down_blocks.1.resnets.0"
QCFG = QuantConfig(weight_bits=4, act_range="minmax")  # min/max ranges: a fast setup


def test_block_reconstruction_lowers_the_block_error(digits, setup, tmp_path):
    cal, q = setup
    names = find_blocks(find_unet(q))
    assert names[:3] == ["down_blocks.0.resnets.0", "down_blocks.0.downsamplers.0", BLOCK]
    assert "mid_block.attentions.0" in names and len(names) == len(set(names))
    q_before = {k: v.clone() for k, v in find_unet(q).state_dict().items()}
    log = []
    cfg = BlockReconstruction(iters=60, blocks=(BLOCK,))
    r = reconstruct_blocks(q, digits, cal, cfg, log=log)
    assert [e["block"] for e in log] == [BLOCK]
    assert log[0]["after"] < 0.8 * log[0]["before"]
    # only that block changed; weights on the floor/ceil grid of the float weights
    qu, ru, fu = find_unet(q), find_unet(r), find_unet(digits)
    assert all(torch.equal(q_before[k], v) for k, v in qu.state_dict().items())
    changed = {k for k, v in ru.state_dict().items() if not torch.equal(q_before[k], v)}
    assert changed and all(k.startswith(BLOCK + ".") for k in changed)
    for name in ("conv1", "conv2", "conv_shortcut", "time_emb_proj"):
        layer = ru.get_submodule(f"{BLOCK}.{name}")
        w_s = fu.get_submodule(f"{BLOCK}.{name}").weight.detach()
        w_s = w_s / layer.scale.reshape((-1,) + (1,) * (w_s.ndim - 1))
        qw = layer.qweight.float()
        assert bool(((qw == torch.floor(w_s)) | (qw == torch.floor(w_s) + 1)).all())
    # the same through quantize(reconstruct=...): deterministic, identical weights
    r2 = quantize(digits, QCFG, cal, reconstruct=cfg)
    assert all(
        torch.equal(a, b)
        for a, b in zip(ru.state_dict().values(), find_unet(r2).state_dict().values(), strict=True)
    )
    # safetensors round trip: bit-exact outputs, options kept as provenance
    path = save_quantized(r, tmp_path / "fbr.safetensors")
    back = load_quantized(digits, path)
    x, t, c = cal.x[:6], cal.t[:6], cal.cond[:6]
    with torch.no_grad():
        assert torch.equal(r(x, t, c), back(x, t, c))
    assert back._reconstruction == cfg
