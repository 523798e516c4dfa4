"""FilterPrompt-style image prompts: the filters' mathematics, the SDEdit limits, the scores."""

from __future__ import annotations

import math

import pytest
import torch

import diffusolve
from diffusolve.edit import filter_prompt as fp
from diffusolve.models import load
from diffusolve.models.data import load_digits
from diffusolve.process import make_grid

pytestmark = pytest.mark.usefixtures("single_thread")

try:
    from diffusolve.guidance import LossGuidance  # noqa: F401

    HAS_LOSS_GUIDANCE = True
except ImportError:
    HAS_LOSS_GUIDANCE = False

needs_loss_guidance = pytest.mark.skipif(
    not HAS_LOSS_GUIDANCE, reason="diffusolve.guidance.LossGuidance is not there yet"
)


@pytest.fixture(scope="module")
def model():
    return load("digits")


@pytest.fixture(scope="module")
def refs():
    x, y = load_digits("heldout")
    return x[:4], y[:4]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------- filters
def test_lowpass_preserves_mean_and_matches_gaussian_transfer():
    x = _rand(3, 2, 9, 12)
    y = fp.LowPass(1.3)(x)
    assert torch.allclose(y.mean((-2, -1)), x.mean((-2, -1)), atol=1e-13)
    # a pure cosine of frequency (0, k/W) is an eigenvector: scaled by exp(-2 pi^2 s^2 f^2)
    w, k, s = 12, 2, 1.3
    c = torch.cos(2 * math.pi * k * torch.arange(w, dtype=torch.float64) / w).expand(1, 1, 5, w)
    want = math.exp(-2 * math.pi**2 * s**2 * (k / w) ** 2) * c
    assert torch.allclose(fp.LowPass(s)(c), want, atol=1e-13)


def test_highpass_removes_mean_and_low_plus_high_is_identity():
    x = _rand(2, 1, 8, 8, seed=1)
    hi = fp.HighPass(2.0)(x)
    assert torch.allclose(hi.mean((-2, -1)), torch.zeros(2, 1, dtype=torch.float64), atol=1e-13)
    assert torch.allclose(fp.LowPass(2.0)(x) + hi, x, atol=1e-13)
    # a constant image is all DC: the low-pass keeps it, the high-pass removes it
    c = torch.full((1, 1, 6, 6), 0.7, dtype=torch.float64)
    assert torch.allclose(fp.LowPass(3.0)(c), c, atol=1e-14)
    assert hi.dtype == torch.float64


def test_sobel_on_a_ramp_gives_the_slope():
    a, b = 0.3, -0.4  # x[r, c] = a c + b r: gradient magnitude 0.5 everywhere inside
    r = torch.arange(7, dtype=torch.float64).view(-1, 1)
    c = torch.arange(9, dtype=torch.float64).view(1, -1)
    img = (a * c + b * r).expand(2, 1, 7, 9)
    out = fp.Edge()(img)
    assert torch.allclose(out[..., 1:-1, 1:-1], torch.full_like(out[..., 1:-1, 1:-1], 0.5))
    flat = fp.Edge(eps=1e-3)(torch.zeros(1, 1, 4, 4, dtype=torch.float64))
    assert torch.allclose(flat, torch.full_like(flat, 1e-3))  # eps only, on a flat image


def test_intensity_affine_compose():
    x = torch.tensor([[[[-1.0, 0.0, 0.5, 1.0]]]], dtype=torch.float64)
    y = fp.Intensity(0.5, 0.1)(x)
    assert y[0, 0, 0, 2] == 0.0 and y[0, 0, 0, 0] < -0.999 and y[0, 0, 0, 3] > 0.999
    f = fp.LowPass(1.0) >> fp.Affine(2.0, -1.0) >> fp.Identity()
    assert isinstance(f, fp.Compose) and len(f.filters) == 3
    z = _rand(1, 1, 6, 6, seed=3)
    assert torch.allclose(f(z), 2.0 * fp.LowPass(1.0)(z) - 1.0)
    assert fp.Compose(())(z) is not z and torch.equal(fp.Compose(())(z), z)
    assert fp.LowPass(2.0) == fp.LowPass(2.0) and hash(fp.LowPass(2.0)) == hash(fp.LowPass(2.0))


@pytest.mark.parametrize(
    "name", ["identity", "lowpass", "highpass", "edge", "intensity", "composed"]
)
def test_filters_are_differentiable(name):
    f = (
        fp.HighPass(1.0) >> fp.Edge() >> fp.Intensity(0.1, 0.5)
        if name == "composed"
        else fp.get_filter(name)
    )
    x = _rand(1, 1, 5, 6, seed=4).requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


def test_presets_map_digits_near_the_data_range(refs):
    x, _ = refs
    for name in fp.list_filters():
        y = fp.get_filter(name)(x)
        assert y.shape == x.shape and bool(torch.isfinite(y).all())
        assert float(y[..., 0, 0].mean()) < -0.9, name  # paper stays paper in the corner


# ---------------------------------------------------------------------------- SDEdit
def test_sdedit_strength_zero_is_the_filtered_reference(model, refs):
    x, _ = refs
    out = fp.filter_prompt(model, x, "lowpass", strength=0.0)
    assert torch.equal(out, fp.LowPass(1.5)(x))
    out = fp.filter_prompt(model, x, "identity", strength=0.0)
    assert torch.equal(out, x) and out is not x


def test_sdedit_full_strength_is_plain_sampling(model, refs):
    x, _ = refs
    with torch.no_grad():
        out = fp.filter_prompt(model, x, "edge", strength=1.0, steps=3, noise=11, cond=None)
        x_t = model.process.prior_sample(x.shape, noise=11)
        plain = diffusolve.sample(model, x_t, 3, "dpmpp_2m")
    assert torch.equal(out, plain)


def test_sdedit_start_is_the_noised_reference(model, refs):
    # one DDIM step to t_min from the start: x_out = D(x_start, t_start); check x_start by
    # a denoiser that returns its input
    x, _ = refs
    seen = {}

    class Probe:
        process = model.process

        def __call__(self, x_in, t, cond=None):
            seen.setdefault("x", x_in.clone())
            seen.setdefault("t", float(t))
            return torch.zeros_like(x_in)

    fp.filter_prompt(
        Probe(),
        x,
        "lowpass",
        strength=0.5,
        steps=2,
        solver="ddim",
        noise=3,
        grid_kind="time_uniform",
    )
    grid = fp.sdedit_grid(model.process, 0.5, 2, "time_uniform")
    assert seen["t"] == float(grid[0]) and len(grid) == 2
    p = model.process
    eps = p.prior_sample(x.shape, noise=3) / float(p.sigma(p.t_max))
    want = float(p.alpha(grid[0])) * fp.LowPass(1.5)(x) + float(p.sigma(grid[0])) * eps
    assert torch.allclose(seen["x"], want, atol=1e-6)


def test_sdedit_is_deterministic_and_per_sample(model, refs):
    x, _ = refs
    with torch.no_grad():
        a = fp.filter_prompt(model, x, "intensity", strength=0.3, steps=4, noise=5, cond=3)
        b = fp.filter_prompt(model, x, "intensity", strength=0.3, steps=4, noise=5, cond=3)
        c = fp.filter_prompt(model, x[2:3], "intensity", strength=0.3, steps=4, noise=[7], cond=3)
    assert torch.equal(a, b)
    assert torch.allclose(a[2:3], c, atol=1e-5)  # per-sample seeds: independent of the batch


def test_sdedit_grid_counts():
    p = load("digits").process
    g = fp.sdedit_grid(p, 0.1, 10, "time_uniform", min_steps=2)
    assert len(g) == 3 and math.isclose(float(g[0]), 99.9) and float(g[-1]) == p.t_min
    assert torch.equal(fp.sdedit_grid(p, 1.0, 6, "logsnr"), make_grid(p, 6, "logsnr"))


def test_bad_inputs_are_refused(model, refs):
    x, _ = refs
    with pytest.raises(ValueError, match="strength must be in"):
        fp.filter_prompt(model, x, strength=1.5)
    with pytest.raises(ValueError, match="strength must be in"):
        fp.filter_prompt(model, x, strength=-0.1)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        fp.filter_prompt(model, x[0], strength=0.5)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        fp.LowPass()(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="unknown filter 'blur'"):
        fp.filter_prompt(model, x, "blur")
    with pytest.raises(ValueError, match="unknown mode"):
        fp.filter_prompt(model, x, mode="img2img")
    with pytest.raises(ValueError, match="steps"):
        fp.filter_prompt(model, x, steps=0)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        fp.LowPass(0.0)
    with pytest.raises(ValueError, match="width"):
        fp.Intensity(width=-1.0)
    with pytest.raises(TypeError, match="Filter objects"):
        fp.Compose((fp.LowPass(), "edge"))
    with pytest.raises(ValueError, match="scale"):
        fp.filter_prompt(model, x, mode="guidance", scale=-1.0)


# ---------------------------------------------------------------------------- guidance
@needs_loss_guidance
def test_guidance_scale_zero_is_plain_sampling(model, refs):
    x, _ = refs
    with torch.no_grad():
        out = fp.filter_prompt(model, x, "lowpass", mode="guidance", scale=0.0, steps=3, noise=2)
        plain = diffusolve.sample(model, model.process.prior_sample(x.shape, noise=2), 3)
    assert torch.equal(out, plain)


@needs_loss_guidance
def test_guidance_pulls_towards_the_filtered_reference(model, refs):
    x, _ = refs
    f = fp.get_filter("lowpass")
    kw = dict(mode="guidance", steps=6, noise=4)
    with torch.no_grad():
        free = fp.filter_prompt(model, x, f, scale=0.0, **kw)
        a = fp.filter_prompt(model, x, f, scale=1.0, **kw)
        b = fp.filter_prompt(model, x, f, scale=1.0, **kw)
    assert torch.equal(a, b)
    err = lambda y: float((f(y) - f(x)).pow(2).mean())  # noqa: E731
    assert err(a) < 0.5 * err(free)


# ---------------------------------------------------------------------------- scores
def test_transfer_scores_of_the_reference_itself_and_of_a_shuffle():
    x, y = load_digits("heldout")
    x, y = x[:60], y[:60]
    s = fp.transfer_scores(x, x, y)
    assert s["n"] == 60 and s["class_agreement"] > 0.95 and s["cond_agreement"] is None
    assert s["bin_agreement"] == {"thickness": 1.0, "slant": 1.0, "size": 1.0}
    assert all(abs(v - 1.0) < 1e-12 for v in s["correlation"].values())
    # conditioned on a class: the generated bins are cut at the condition's terciles
    s2 = fp.transfer_scores(x, x, y, cond_labels=y)
    assert s2["cond_agreement"] == s["class_agreement"]
    with pytest.raises(ValueError, match="paired"):
        fp.transfer_scores(x[:3], x[:4], y[:4])


@needs_loss_guidance
def test_guidance_loss_is_the_squared_distance_of_filtered_images(model, refs):
    x, _ = refs
    g = fp._guided(model, fp.LowPass(1.0)(x), fp.LowPass(1.0), 0.5, True)
    (term,) = g.terms
    assert term.scale == 0.5 and term.through_denoiser
    assert torch.equal(term.loss(x, None), torch.zeros(4))
    # LowPass keeps constants: a shift by 1 costs H * W per image
    assert torch.allclose(term.loss(x + 1.0, None), torch.full((4,), 256.0), atol=1e-3)


# ---------------------------------------------------------------------------- bench phase
def _bench(monkeypatch, keep):
    from diffusolve.bench import guidance_transfer as gt
    from diffusolve.bench.runner import RecordStore, run_jobs

    monkeypatch.setitem(gt.CONFIG, True, {**gt.CONFIG[True], "n": 4, "steps": 4})
    store = RecordStore(None, bench="guidance", key_fields=gt_key_fields())
    jobs = [j for j in gt.jobs(quick=True, seed=0) if j.key["method"] in keep]
    run_jobs(jobs, store)
    return gt, store.records


def gt_key_fields():
    return ("bench", "phase", "task", "method", "setting")


def test_bench_phase_trimmed(monkeypatch, tmp_path):
    keep = {"baseline:reference", "baseline:unconditioned", "sdedit:identity", "sdedit:edge"}
    if HAS_LOSS_GUIDANCE:
        keep.add("guidance:lowpass")
    gt, recs = _bench(monkeypatch, keep)
    for r in recs:
        assert set(gt_key_fields()) <= set(r) and r["phase"] in gt.PHASES
        assert r["bench"] == "guidance" and r["n"] == 4
    ref = next(r for r in recs if r["method"] == "baseline:reference")["null"]
    assert ref["bin_agreement"] == {"thickness": 1.0, "slant": 1.0, "size": 1.0}
    methods = {r["method"] for r in recs}
    assert methods == keep
    titles = [t for t, _ in gt.tables(recs)]
    assert len(titles) == 3 and all("|" in tab for _, tab in gt.tables(recs))
    (goal,) = gt.goals(recs)
    assert goal[1] is True and "edge: most" in goal[2]
    (png,) = gt.plots(recs, tmp_path)
    assert png.exists() and png.stat().st_size > 0
    # deterministic: the same jobs give the same records but for the timing
    _, again = _bench(monkeypatch, {"sdedit:edge"})
    from diffusolve.bench.runner import strip_timing

    first = [strip_timing(r) for r in recs if r["method"] == "sdedit:edge"]
    assert first == [strip_timing(r) for r in again]


@pytest.mark.slow
def test_bench_phase_quick_through_the_runner():
    from diffusolve.bench import guidance_transfer as gt
    from diffusolve.bench.runner import RecordStore, run_jobs

    store = RecordStore(None, bench="guidance", key_fields=gt_key_fields())
    run_jobs(gt.jobs(quick=True, seed=0), store)
    assert len(gt.tables(store.records)) == 3 and len(gt.goals(store.records)) == 1
    ident = store.select(method="sdedit:identity", setting="strength=0.1")[0]["null"]
    chance = store.select(method="baseline:unconditioned")[0]["null"]
    assert ident["class_agreement"] > chance["class_agreement"] + 0.3
