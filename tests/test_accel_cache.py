"""Feature caching (diffusolve.accel.cache): schedules, exactness of DeepCache and encoder
propagation against the plain UNet and against the features computed by hand, removal of
the hooks, and use inside ``diffusolve.sample`` (multistep, single-step, guidance)."""

from __future__ import annotations

import pytest
import torch

import diffusolve
from diffusolve.accel import (
    CacheSchedule,
    DeepCache,
    EncoderPropagation,
    deep_cache,
    encoder_propagation,
    find_unet,
    prior_noise_injection,
)


@pytest.fixture(scope="module")
def unet():
    return find_unet(diffusolve.load("digits"))


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 1, 16, 16, generator=g) for _ in range(3)]
    ts = [torch.tensor(900.0), torch.tensor(700.0), torch.tensor(500.0)]
    labels = torch.tensor([1, 4, 10])
    return xs, ts, labels


def _plain(unet, x, t, y):
    return unet(x, t, y, return_dict=False)[0]


def _encode(unet, x, t, y, upto=None):
    """emb, conv_in output, the skips of down blocks 0..upto and the last sample (by hand)."""
    emb = unet.time_embedding(unet.time_proj(t[None].expand(x.shape[0])).to(x.dtype))
    emb = emb + unet.class_embedding(y)
    h = unet.conv_in(x)
    skips = [h]
    blocks = unet.down_blocks if upto is None else unet.down_blocks[: upto + 1]
    for block in blocks:
        h, res = block(hidden_states=h, temb=emb)
        skips.extend(res)
    return emb, skips, h


def _decode(unet, h, skips, emb, first=0):
    """Up blocks ``first..`` on the feature ``h`` with the skips, then the output head."""
    # the up blocks from ``first`` on take the first skips (the deeper ones feed the rest)
    skips = list(skips)[: sum(len(b.resnets) for b in unet.up_blocks[first:])]
    for block in unet.up_blocks[first:]:
        n = len(block.resnets)
        res, skips = tuple(skips[-n:]), skips[:-n]
        h = block(h, res, emb)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


def test_schedules():
    u = CacheSchedule.uniform(10, 3)
    assert u.full_indices == (0, 3, 6, 9) and (u.n_full, u.n_cached) == (4, 6)
    assert CacheSchedule.uniform(5, 1).full == (True,) * 5
    n = CacheSchedule.nonuniform(21, 3)
    assert n.n_full >= 7 and n.full_indices[0] == 0 and n.full_indices[-1] == 20
    gaps = [b - a for a, b in zip(n.full_indices, n.full_indices[1:], strict=False)]
    mid = len(gaps) // 2
    assert min(gaps[mid - 1 : mid + 1]) < max(gaps[0], gaps[-1])  # denser at the centre
    k = CacheSchedule.key_steps(50)
    assert k.full_indices == (0, 1, 2, 3, 5, 10, 15, 25, 35)
    assert CacheSchedule.key_steps(21).full_indices[0] == 0
    with pytest.raises(ValueError, match="must contain 0"):
        CacheSchedule.from_steps([1, 2], 4)
    with pytest.raises(ValueError, match="outside"):
        CacheSchedule.from_steps([0, 4], 4)
    with pytest.raises(ValueError, match="first evaluation must be full"):
        CacheSchedule((False, True))
    with pytest.raises(ValueError, match="interval"):
        CacheSchedule.uniform(4, 0)
    with pytest.raises(ValueError, match="center"):
        CacheSchedule.nonuniform(4, 2, center=1.5)


@pytest.mark.parametrize("make", [lambda u, s: DeepCache(u, s, 1), EncoderPropagation])
def test_all_full_is_bitwise_plain(unet, inputs, make):
    xs, ts, y = inputs
    with torch.no_grad():
        ref = [_plain(unet, x, t, y) for x, t in zip(xs, ts, strict=True)]
        with make(unet, CacheSchedule.uniform(3, 1)) as run:
            out = [_plain(unet, x, t, y) for x, t in zip(xs, ts, strict=True)]
    assert all(torch.equal(a, b) for a, b in zip(ref, out, strict=True))
    assert (run.n_full, run.n_cached) == (3, 0)


def _layer(block, j, h, emb):
    h = block.resnets[j](h, emb)
    attn = getattr(block, "attentions", None)
    return attn[j](h) if attn else h


def _by_hand(unet, x, t, y, stale=None, slot=None):
    """The UNet layer by layer. Returns the output and the input of every up layer
    ``(u, j)``. With ``slot = (b, l)`` and ``stale`` (the up-layer inputs of an earlier call)
    it is DeepCache's cached call: the down path stops at slot ``(b, l)`` and the up path
    resumes at the up layer taking that slot's skip, on the stale input of that layer."""
    emb = unet.time_embedding(unet.time_proj(t[None].expand(x.shape[0])).to(x.dtype))
    emb = emb + unet.class_embedding(y)
    h = unet.conv_in(x)
    skips = [h]
    down, up, k = unet.down_blocks, unet.up_blocks, len(unet.down_blocks)
    slots = [(i, j) for i, blk in enumerate(down) for j in range(len(blk.resnets) + 1)]
    for i, j in slots:
        if (i, j) == slot:
            break
        blk = down[i]
        if j < len(blk.resnets):
            h = _layer(blk, j, h, emb)
            skips.append(h)
        elif blk.downsamplers:
            h = blk.downsamplers[0](h)
            skips.append(h)
    if slot is None:
        h, start = unet.mid_block(h, emb), (0, 0)
    else:
        b, lay = slot
        start = (k - 1 - b, len(up[k - 1 - b].resnets) - 1 - lay)
        h = stale[start]
    inputs = {}
    for u in range(start[0], k):
        blk = up[u]
        for j in range(start[1] if u == start[0] else 0, len(blk.resnets)):
            inputs[(u, j)] = h
            h = _layer(blk, j, torch.cat([h, skips.pop()], dim=1), emb)
        if blk.upsamplers:
            h = blk.upsamplers[0](h)
    assert not skips  # every skip consumed once
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h))), inputs


def test_by_hand_is_the_unet(unet, inputs):
    xs, ts, y = inputs
    with torch.no_grad():
        out, _ = _by_hand(unet, xs[0], ts[0], y)
        torch.testing.assert_close(out, _plain(unet, xs[0], ts[0], y), rtol=0, atol=1e-6)


def _slots(unet):
    return [(i, j) for i, blk in enumerate(unet.down_blocks) for j in range(len(blk.resnets) + 1)]


@pytest.mark.parametrize("slot", range(6))
def test_deepcache_layer_branch_equals_by_hand(unet, inputs, slot):
    """Every skip slot of the bundled UNet (3 blocks x (1 layer + downsampler)), given as
    the paper's flat branch id: the cached calls equal the UNet run by hand with the up
    path resumed from the stored input of the layer taking the slot's skip."""
    xs, ts, y = inputs
    pair = _slots(unet)[slot]
    sched = CacheSchedule.from_steps([0], 3)
    with torch.no_grad():
        _, stale = _by_hand(unet, xs[0], ts[0], y)
        manual = [
            _by_hand(unet, x, t, y, stale, pair)[0] for x, t in zip(xs[1:], ts[1:], strict=True)
        ]
        with deep_cache(unet, sched, branch=slot) as run:
            first = _plain(unet, xs[0], ts[0], y)
            cached = [_plain(unet, x, t, y) for x, t in zip(xs[1:], ts[1:], strict=True)]
        assert torch.equal(first, _plain(unet, xs[0], ts[0], y))
        plain1 = _plain(unet, xs[1], ts[1], y)
    assert (run.block, run.layer) == pair and run.branch == slot
    for a, b in zip(cached, manual, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (run.n_full, run.n_cached) == (1, 2)
    # the cached call differs from the plain one (the cache is really used)
    assert not torch.allclose(cached[0], plain1, atol=1e-3)


@pytest.mark.parametrize("branch", [0, 1, 2])
def test_deepcache_whole_block_equals_manual(unet, inputs, branch):
    """The whole-block branch ``(b, n_b)`` against a second, block-level computation by
    hand: the deep feature is the input of up block K-1-b, the skips those of D_0..D_b."""
    xs, ts, y = inputs
    k = len(unet.down_blocks)
    sched = CacheSchedule.from_steps([0], 3)
    with torch.no_grad():
        emb0, skips0, h0 = _encode(unet, xs[0], ts[0], y)
        h = unet.mid_block(h0, emb0)
        for block in unet.up_blocks[: k - 1 - branch]:
            n = len(block.resnets)
            res, skips0 = tuple(skips0[-n:]), skips0[:-n]
            h = block(h, res, emb0)
        manual = []
        for x, t in zip(xs[1:], ts[1:], strict=True):
            emb, skips, _ = _encode(unet, x, t, y, upto=branch)
            manual.append(_decode(unet, h, skips, emb, first=k - 1 - branch))
        whole = (branch, len(unet.down_blocks[branch].resnets))
        with deep_cache(unet, sched, branch=whole) as run:
            _plain(unet, xs[0], ts[0], y)
            cached = [_plain(unet, x, t, y) for x, t in zip(xs[1:], ts[1:], strict=True)]
    for a, b in zip(cached, manual, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (run.n_full, run.n_cached) == (1, 2)
    assert (run.block, run.layer, run.branch) == (*whole, _slots(unet).index(whole))


def test_encoder_propagation_equals_manual(unet, inputs):
    xs, ts, y = inputs
    with torch.no_grad():
        emb0, skips0, h0 = _encode(unet, xs[0], ts[0], y)
        mid0 = unet.mid_block(h0, emb0)
        with encoder_propagation(unet, CacheSchedule.from_steps([0], 3)) as run:
            _plain(unet, xs[0], ts[0], y)
            cached = [_plain(unet, x, t, y) for x, t in zip(xs[1:], ts[1:], strict=True)]
        for x, t, out in zip(xs[1:], ts[1:], cached, strict=True):
            emb, _, _ = _encode(unet, x, t, y, upto=-1)
            torch.testing.assert_close(out, _decode(unet, mid0, skips0, emb), rtol=0, atol=1e-6)
        # the decoder does not see x at a non-key call: another x gives the same output
        with encoder_propagation(unet, CacheSchedule.from_steps([0], 2)):
            _plain(unet, xs[0], ts[0], y)
            other = _plain(unet, xs[2], ts[1], y)
    assert torch.equal(other, cached[0])
    assert (run.n_full, run.n_cached) == (1, 2)


def test_hooks_removed_and_errors(unet, inputs):
    xs, ts, y = inputs
    with torch.no_grad():
        ref = _plain(unet, xs[1], ts[1], y)
        with pytest.raises(RuntimeError, match="schedule covers 1"):
            with deep_cache(unet, CacheSchedule.uniform(1, 1)):
                _plain(unet, xs[0], ts[0], y)
                _plain(unet, xs[1], ts[1], y)
        assert not any("forward" in m.__dict__ for m in unet.modules())
        with encoder_propagation(unet, CacheSchedule.from_steps([0], 2)):
            _plain(unet, xs[0], ts[0], y)
            with pytest.raises(ValueError, match="batch of the last full call"):
                _plain(unet, xs[1][:2], ts[1], y[:2])
        assert not any("forward" in m.__dict__ for m in unet.modules())
        assert torch.equal(_plain(unet, xs[1], ts[1], y), ref)
    for bad in (6, -1, (3, 0), (0, 2), (0.0, 1)):
        with pytest.raises(ValueError, match="branch"):
            DeepCache(unet, CacheSchedule.uniform(2, 1), branch=bad)
    with pytest.raises(TypeError, match="branch"):
        DeepCache(unet, CacheSchedule.uniform(2, 1), branch="0")
    with pytest.raises(TypeError, match="no diffusers"):
        find_unet(object())


@pytest.mark.parametrize(
    ("solver", "guidance"), [("dpmpp_2m", None), ("dpm_solver_2s", None), ("dpmpp_2m", 2.0)]
)
def test_inside_sample(solver, guidance):
    model = diffusolve.load("digits", guidance=guidance)
    unet = find_unet(model)
    x = model.process.prior_sample((4, 1, 16, 16), noise=1)
    cond = [0, 3, 5, 8]
    stats: dict = {}
    with torch.no_grad():
        ref = diffusolve.sample(model, x, 8, solver, cond=cond, stats=stats)
        nfe = stats["nfe"]
        with deep_cache(unet, CacheSchedule.uniform(nfe, 1)) as run:
            same = diffusolve.sample(model, x, 8, solver, cond=cond)
        assert torch.equal(same, ref) and run.n_full == nfe
        with deep_cache(unet, CacheSchedule.uniform(nfe, 2)) as dc:
            a = diffusolve.sample(model, x, 8, solver, cond=cond)
        with encoder_propagation(unet, nfe) as ep:
            b = diffusolve.sample(model, x, 8, solver, cond=cond)
        with deep_cache(unet, CacheSchedule.uniform(nfe, 2), forecast=1) as fc:
            c = diffusolve.sample(model, x, 8, solver, cond=cond)
        assert torch.equal(diffusolve.sample(model, x, 8, solver, cond=cond), ref)
    assert (dc.n_full, dc.n_cached) == ((nfe + 1) // 2, nfe // 2) == (fc.n_full, fc.n_cached)
    assert ep.n_full == CacheSchedule.key_steps(nfe).n_full and ep.calls == nfe
    for out in (a, b, c):
        err = float((out - ref).norm() / ref.norm())
        assert 0 < err < 0.5  # cached: close to, but not equal to, the plain solve


def test_prior_noise_injection():
    model = diffusolve.load("digits")
    x = model.process.prior_sample((2, 1, 16, 16), noise=2)
    seen = []
    inject = prior_noise_injection(x, model.process.t_max)

    def both(info):
        before = info["x_next"].clone()
        inject(info)
        seen.append((float(info["t_next"]) / model.process.t_max, info["x_next"] - before))

    with torch.no_grad():
        diffusolve.sample(model, x, 6, "ddim", cond=1, callback=both)
    for frac, delta in seen:
        expect = 0.003 * x if frac < 0.5 else torch.zeros_like(x)
        torch.testing.assert_close(delta, expect, rtol=0, atol=1e-6)
    assert any(frac < 0.5 for frac, _ in seen) and any(frac >= 0.5 for frac, _ in seen)


def test_condition_unet():
    """A cross-attention UNet2DConditionModel: all-full is bitwise plain; DeepCache's cached
    call equals the call on another input with the deep feature of the first (branch 0)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    net = UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 1, 8, 8, generator=g) for _ in range(2)]
    enc = torch.randn(2, 3, 8, generator=g)

    def call(x, t):
        return net(x, torch.tensor(t), encoder_hidden_states=enc, return_dict=False)[0]

    with torch.no_grad():
        ref = [call(xs[0], 800.0), call(xs[1], 600.0)]
        for make in (lambda s: deep_cache(net, s), lambda s: encoder_propagation(net, s)):
            with make(CacheSchedule.uniform(2, 1)):
                assert all(
                    torch.equal(call(x, t), r)
                    for x, t, r in zip(xs, (800.0, 600.0), ref, strict=True)
                )
        with deep_cache(net, CacheSchedule.from_steps([0], 2)) as run:
            call(xs[0], 800.0)
            cached = call(xs[1], 600.0)
        assert run.n_cached == 1 and not torch.allclose(cached, ref[1], atol=1e-4)
        assert not any("forward" in m.__dict__ for m in net.modules())
        assert torch.equal(call(xs[1], 600.0), ref[1])


def test_lagrange_reproduces_polynomials():
    """The forecast is the Lagrange polynomial through the stored features: exact on
    features that are polynomials of its degree in t, per sample when t is per sample, and
    on tuples of tensors."""
    from diffusolve.accel.cache import _lagrange, _time_vector

    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))

    def feat(t):
        tt = t.reshape(-1, 1, 1, 1)
        return a + b * tt + c * tt**2

    for ts, t in [([900.0, 800.0, 650.0], 500.0), ([10.0, 30.0, 45.0], 60.0)]:
        hist = [(_time_vector(torch.tensor(s)), feat(torch.tensor(s))) for s in ts]
        got = _lagrange(hist, _time_vector(torch.tensor(t)))
        torch.testing.assert_close(got, feat(torch.tensor(t)), rtol=1e-10, atol=1e-9)
        # degree 1 through the last two: the linear extrapolation
        lin = hist[-1][1] + (t - ts[-1]) / (ts[-1] - ts[-2]) * (hist[-1][1] - hist[-2][1])
        torch.testing.assert_close(_lagrange(hist[-2:], _time_vector(torch.tensor(t))), lin)
    # per-sample times (a batch at different t) and tuple features
    tvec = [torch.tensor([900.0, 850.0, 800.0, 700.0]) - 100 * k for k in range(3)]
    hist = [(_time_vector(t), (feat(t), 2 * feat(t))) for t in tvec]
    t = torch.tensor([500.0, 400.0, 300.0, 250.0])
    got = _lagrange(hist, _time_vector(t))
    torch.testing.assert_close(got[0], feat(t), rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(got[1], 2 * feat(t), rtol=1e-10, atol=1e-9)
    assert _time_vector(torch.full((5,), 3.0)).shape == (1,)  # one shared t
    with pytest.raises(ValueError, match="same timestep"):
        _lagrange(hist[:1] * 2, _time_vector(t))


@pytest.mark.parametrize(("forecast", "slot"), [(1, 0), (2, 0), (1, 3)])
def test_deepcache_forecast_equals_by_hand(unet, inputs, forecast, slot):
    """Cached calls with a forecast equal the UNet run by hand from the slot on, on the
    Lagrange polynomial through the stored inputs of the first running up layer."""
    xs, ts, y = inputs
    g = torch.Generator().manual_seed(5)
    xs = [*xs, torch.randn(3, 1, 16, 16, generator=g)]
    ts = [*ts, torch.tensor(300.0)]
    pair = _slots(unet)[slot]
    n_full = forecast + 1
    sched = CacheSchedule.from_steps(list(range(n_full)), n_full + 1)
    with torch.no_grad():
        stored = [_by_hand(unet, x, t, y)[1] for x, t in zip(xs[:n_full], ts[:n_full], strict=True)]
        key = (
            len(unet.up_blocks) - 1 - pair[0],
            len(unet.up_blocks[-1 - pair[0]].resnets) - 1 - pair[1],
        )
        t = float(ts[n_full])
        nodes = [float(s) for s in ts[:n_full]]
        pred = 0
        for i, ti in enumerate(nodes):
            w = 1.0
            for j, tj in enumerate(nodes):
                if j != i:
                    w *= (t - tj) / (ti - tj)
            pred = pred + w * stored[i][key]
        manual, _ = _by_hand(unet, xs[n_full], ts[n_full], y, {key: pred}, pair)
        reuse, _ = _by_hand(unet, xs[n_full], ts[n_full], y, stored[-1], pair)
        with deep_cache(unet, sched, branch=slot, forecast=forecast) as run:
            for x, s in zip(xs[:n_full], ts[:n_full], strict=True):
                _plain(unet, x, s, y)
            cached = _plain(unet, xs[n_full], ts[n_full], y)
    torch.testing.assert_close(cached, manual, rtol=0, atol=2e-5)
    assert not torch.allclose(cached, reuse, atol=1e-3)  # the forecast is really used
    assert (run.n_full, run.n_cached) == (n_full, 1) and not run._hist


def test_deepcache_forecast_inside_sample_and_errors():
    """In a solve the linear forecast is closer to the uncached samples than plain reuse
    (measured on separate starts: relative error 0.02 against 0.10 at every 2nd call); the
    first cached call, with one full call stored, is plain reuse."""
    model = diffusolve.load("digits")
    unet = find_unet(model)
    x = model.process.prior_sample((8, 1, 16, 16), noise=4)
    cond = list(range(8))
    with torch.no_grad():
        ref = diffusolve.sample(model, x, 10, "dpmpp_2m", cond=cond)
        errs = {}
        for fc in (0, 1):
            with deep_cache(unet, CacheSchedule.uniform(11, 2), forecast=fc):
                out = diffusolve.sample(model, x, 10, "dpmpp_2m", cond=cond)
            errs[fc] = float((out - ref).norm() / ref.norm())
            assert torch.isfinite(out).all()
    assert 0 < errs[1] < 0.5 * errs[0]
    for bad in (-1, 4, 1.0, True):
        with pytest.raises(ValueError, match="forecast"):
            DeepCache(unet, CacheSchedule.uniform(2, 1), forecast=bad)
