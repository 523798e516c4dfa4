"""Few-step models: consistency distillation, MMD fine-tuning, LoRA and the shipped weights.

The mathematics is checked on closed forms: the PF-ODE flow map of Gaussian data (the exact
consistency function), the LCM boundary scalings, the unbiased MMD^2 of the cubic KID kernel
(whose feature map in one dimension is finite, so MMD^2 has a closed form), and the peft
LoRA algebra (a zero adapter is the identity, a merged adapter equals the unmerged one).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import diffusolve
from diffusolve.models import Gaussian, load
from diffusolve.models.consistency import BoundaryScalings, ConsistencyBoundary
from diffusolve.models.fewstep import (
    FEWSTEP_MODELS,
    FewStepRecipe,
    fewstep_recipe,
    per_sample_noise,
    sample_fewstep,
    skipping_timesteps,
)
from diffusolve.process import ddpm
from diffusolve.train.fewstep import DDPMScalars
from diffusolve.train.lcm import cd_loss, ddim_step, pseudo_huber
from diffusolve.train.mmd import class_mmd2, mmd2_unbiased, poly_kernel

ASSETS = Path(diffusolve.__file__).resolve().parent / "assets"
SHIPPED = [m for m in FEWSTEP_MODELS if (ASSETS / m / "fewstep.json").is_file()]


# --------------------------------------------------------------------------------------
# consistency distillation on Gaussian data (exact flow map)

C2 = 0.3  # data variance: x0 ~ N(0, C2 I)
SC = DDPMScalars()


def _r(t: torch.Tensor) -> torch.Tensor:
    """The marginal standard deviation of x_t for Gaussian data: sqrt(a^2 C2 + s^2)."""
    a, s = SC(t, 2)
    return torch.sqrt(a**2 * C2 + s**2)


def exact_f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The consistency function to t = 0: the PF-ODE flow map of Gaussian data is linear,
    x_0 = x_t r(0) / r(t) (it keeps each point's quantile)."""
    return x * _r(torch.zeros_like(t)) / _r(t)


def exact_flow(x: torch.Tensor, t: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
    return x * _r(t1) / _r(t)


def gaussian_ddim(x: torch.Tensor, t: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
    a, s = SC(t, 2)
    a1, s1 = SC(t1, 2)
    x0 = a * C2 / (a**2 * C2 + s**2) * x  # the exact posterior mean E[x0 | x_t]
    return ddim_step(x, x0, a, s, a1, s1)


def _batch(n: int = 256, d: int = 8, k: int = 20):
    g = torch.Generator().manual_seed(0)
    i = torch.randint(0, 1000 // k, (n,), generator=g)
    t = k * (i + 1) - 1
    x0 = math.sqrt(C2) * torch.randn(n, d, generator=g, dtype=torch.float64)
    a, s = SC(t, 2)
    return a * x0 + s * torch.randn(n, d, generator=g, dtype=torch.float64), t, (t - k).clamp(min=0)


def test_exact_consistency_function_has_zero_cd_loss() -> None:
    x, t, t1 = _batch()
    for loss in ("l2", "huber"):
        assert float(cd_loss(exact_f, exact_f, exact_flow, x, t, t1, loss)) < 1e-12
    assert torch.allclose(exact_f(x, torch.zeros_like(t)), x, rtol=1e-15, atol=0)
    # a rescaled f is just as self-consistent: CD alone does not pin f down ...
    scaled = lambda x, t: 1.05 * exact_f(x, t)  # noqa: E731
    assert float(cd_loss(scaled, scaled, exact_flow, x, t, t1, "l2")) < 1e-12
    # ... the boundary condition f(x, 0) = x does: through LCM's scalings the same error in
    # the network output is seen by the n = 0 terms (t = 19 -> t' = 0)
    b = BoundaryScalings()

    def wrong(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.to(torch.float64).view(-1, 1)
        net = (exact_f(x, t) - b.c_skip(tt) * x) / b.c_out(tt).clamp(min=1e-12)
        return b.apply(x, t, 1.05 * net)

    assert torch.allclose(wrong(x, torch.zeros_like(t)), x)
    at_boundary = float(cd_loss(wrong, wrong, exact_flow, x, t, t1, "l2"))
    first = t1 == 0
    expect = float((0.05 * exact_f(x[first], t[first])).pow(2).sum()) / x.numel()
    assert at_boundary == pytest.approx(expect, rel=1e-3)


def test_cd_loss_with_ddim_teacher_is_second_order_in_the_skip() -> None:
    """With the exact denoiser, the DDIM teacher's local error is O(h^2), so the L2 loss at
    the exact consistency function falls ~16x when the skip k halves (first-order solver:
    error^2 ~ h^4), and it is small for LCM's k = 20."""
    losses = []
    for k in (40, 20, 10):
        x, t, t1 = _batch(k=k)
        keep = t1 > 200  # away from the grid's end, where one step is not "small"
        losses.append(
            float(cd_loss(exact_f, exact_f, gaussian_ddim, x[keep], t[keep], t1[keep], "l2"))
        )
    assert losses[1] < 1e-6
    for big, small in zip(losses, losses[1:], strict=False):
        assert 8.0 < big / small < 32.0, losses


def test_teacher_step_is_the_solver_core_ddim() -> None:
    """The training's per-sample DDIM step equals diffusolve.sample(..., "ddim") on the
    digits process (whose integer-time scalars are the ones the training uses)."""
    process = ddpm()
    t = torch.tensor([519, 519])
    assert torch.allclose(process.alpha(torch.tensor(519.0)), SC(t)[0][0], atol=1e-12)
    prior = Gaussian(torch.zeros(3), C2 * torch.eye(3), process=process)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, generator=g, dtype=torch.float64)
    grid = torch.tensor([519.0, 499.0], dtype=torch.float64)
    ref = diffusolve.sample(prior, x, grid, "ddim", final="none")
    a, s = SC(t, 2)
    a1, s1 = SC(torch.tensor([499, 499]), 2)
    ours = ddim_step(x, prior(x, torch.tensor(519.0)), a, s, a1, s1)
    assert torch.allclose(ours, ref, atol=1e-12)


def test_pseudo_huber_limits() -> None:
    a = torch.zeros(2, 5, dtype=torch.float64)
    small = torch.full((2, 5), 1e-6, dtype=torch.float64)
    c = 0.01
    # sqrt(q + c^2) - c ~ q / (2c) for small q, ~ sqrt(q) for large q
    assert float(pseudo_huber(a, small, c)) == pytest.approx(5e-12 / (2 * c), rel=1e-6)
    assert float(pseudo_huber(a, a + 100.0, c)) == pytest.approx(math.sqrt(5e4) - c, rel=1e-6)


# --------------------------------------------------------------------------------------
# boundary scalings


def test_lcm_boundary_scalings() -> None:
    b = BoundaryScalings()
    assert b.c_skip(0.0) == 1.0 and b.c_out(0.0) == 0.0
    t = torch.tensor([0.0, 1.0, 19.0, 499.0, 999.0], dtype=torch.float64)
    assert torch.allclose(b.c_skip(t) + b.c_out(t) ** 2, torch.ones(5, dtype=torch.float64))
    # s = 10 t, sigma_data = 0.5: at the first skipping-grid time, f is the network's x0
    assert b.c_skip(19.0) == pytest.approx(0.25 / (190.0**2 + 0.25))
    assert b.c_out(19.0) > 1 - 1e-5
    with pytest.raises(ValueError, match="sigma_data"):
        BoundaryScalings(sigma_data=0.0)


def test_consistency_wrapper_is_linear_under_guidance() -> None:
    prior = Gaussian(torch.zeros(2), torch.eye(2), process=ddpm())
    f = ConsistencyBoundary(prior)
    x = torch.randn(4, 2, dtype=torch.float64)
    t = torch.tensor(3.0, dtype=torch.float64)
    b = f.scalings
    assert torch.allclose(f(x, t), b.c_skip(3.0) * x + b.c_out(3.0) * prior(x, t))


# --------------------------------------------------------------------------------------
# unbiased MMD^2 with the cubic KID kernel


def _double_sum(x: torch.Tensor, y: torch.Tensor) -> float:
    m, n, d = len(x), len(y), x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_mmd_equals_the_double_sum_and_is_symmetric() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = 0.5 + torch.randn(9, 3, generator=g, dtype=torch.float64)
    val = float(mmd2_unbiased(x, y))
    assert val == pytest.approx(_double_sum(x, y), rel=1e-12)
    assert val == pytest.approx(float(mmd2_unbiased(y, x)), rel=1e-12)
    assert torch.allclose(poly_kernel(x, y), poly_kernel(y, x).T)


def _mean_and_se(draw, reps: int = 400) -> tuple[float, float]:
    vals = torch.tensor([draw(i) for i in range(reps)], dtype=torch.float64)
    return float(vals.mean()), float(vals.std() / math.sqrt(reps))


def test_mmd_is_unbiased_against_its_closed_form() -> None:
    """In 1-d, k(a, b) = (ab + 1)^3 = 1 + 3ab + 3a^2b^2 + a^3b^3, so MMD^2 = 3 (dm1)^2 +
    3 (dm2)^2 + (dm3)^2 with dm_k the difference of the k-th moments; for N(mu, 1):
    m1 = mu, m2 = mu^2 + 1, m3 = mu^3 + 3 mu. Under equal distributions it is 0."""

    def moments(mu: float) -> tuple[float, float, float]:
        return mu, mu**2 + 1, mu**3 + 3 * mu

    for mu_x, mu_y in ((0.0, 0.0), (0.0, 0.4)):
        mx, my = moments(mu_x), moments(mu_y)
        exact = 3 * (mx[0] - my[0]) ** 2 + 3 * (mx[1] - my[1]) ** 2 + (mx[2] - my[2]) ** 2

        def draw(i: int, mu_x: float = mu_x, mu_y: float = mu_y) -> float:
            g = torch.Generator().manual_seed(1000 + i)
            x = mu_x + torch.randn(30, 1, generator=g, dtype=torch.float64)
            y = mu_y + torch.randn(40, 1, generator=g, dtype=torch.float64)
            return float(mmd2_unbiased(x, y))

        mean, se = _mean_and_se(draw)
        assert abs(mean - exact) < 4 * se, (mu_x, mu_y, mean, exact, se)
        if mu_x != mu_y:
            assert mean > 4 * se  # the difference is detected


def test_class_mmd_is_the_mean_of_per_class_terms() -> None:
    g = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 0, 0, 1, 1, 10, 10])
    f_gen = torch.randn(7, 4, generator=g, dtype=torch.float64)
    f_real = [torch.randn(k, 4, generator=g, dtype=torch.float64) for k in (3, 2, 2)]
    want = sum(
        float(mmd2_unbiased(f_gen[labels == c], r)) for c, r in zip((0, 1, 10), f_real, strict=True)
    )
    assert float(class_mmd2(f_gen, labels, f_real)) == pytest.approx(want / 3, rel=1e-12)


# --------------------------------------------------------------------------------------
# LoRA through peft


def test_lora_zero_init_and_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from diffusolve.models.lora import add_lora, load_lora_unet, lora_config, save_lora

    base = copy.deepcopy(load("digits").model.unet).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 16, 16, generator=g, dtype=torch.float64)
    t, y = torch.tensor([999, 400, 3]), torch.tensor([1, 5, 10])
    student = add_lora(copy.deepcopy(base), lora_config(4))
    with torch.no_grad():
        ref = base(x, t, class_labels=y).sample
        assert torch.equal(student(x, t, class_labels=y).sample, ref)  # B = 0: the identity
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        trained = student(x, t, class_labels=y).sample
    assert (trained - ref).abs().max() > 1e-3
    save_lora(student, lora_config(4), tmp_path, base="digits")
    assert {p.name for p in tmp_path.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    merged = load_lora_unet(copy.deepcopy(base), tmp_path)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        out = merged(x, t, class_labels=y).sample
    assert (out - trained).abs().max() < 1e-6


# --------------------------------------------------------------------------------------
# recipes, sampler and CLI


def test_skipping_grid_and_recipe_round_trip(tmp_path: Path) -> None:
    assert skipping_timesteps(5) == [999.0, 799.0, 599.0, 399.0, 199.0]
    from diffusolve.train.lcm import recipe_for

    r = recipe_for("x", "lcm")
    r.save(tmp_path)
    back = fewstep_recipe(tmp_path)
    assert back == FewStepRecipe(**{**r.__dict__, "name": tmp_path.name})
    assert back.nfe(2) == 2 and back.nfe(2, guidance=2.0) == 4
    with pytest.raises(FileNotFoundError, match="no few-step recipe"):
        fewstep_recipe(tmp_path / "missing")


def test_cli_refuses_to_overwrite(tmp_path: Path) -> None:
    from diffusolve.train.cli import main

    for argv, existing in (
        (["digits-lcm"], "unet"),
        (["digits-lcm", "--lora"], "lora"),
        (["digits-mmd"], "fewstep.json"),
    ):
        out = tmp_path / argv[-1].strip("-")
        (out / existing).mkdir(parents=True)
        with pytest.raises(FileExistsError, match="--force"):
            main(["train", *argv, "--out", str(out), "--steps", "1"])
    with pytest.raises(ValueError, match="--rank"):
        main(["train", "digits-lcm", "--lora", "--rank", "0", "--out", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="--lr"):
        main(["train", "digits-lcm", "--lr", "0", "--out", str(tmp_path / "l")])
    with pytest.raises(ValueError, match="lora"):
        main(["train", "digits-lcm", "--lora", "--init", "x", "--out", str(tmp_path / "i")])
    # --init writes the boundary scalings too, so an earlier consistency.json is guarded
    out = tmp_path / "lcm-mmd"
    out.mkdir()
    (out / "consistency.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--force"):
        main(["train", "digits-mmd", "--init", "digits-lcm", "--out", str(out), "--steps", "1"])
    with pytest.raises(FileNotFoundError, match="consistency.json"):
        main(["train", "digits-mmd", "--init", str(tmp_path), "--out", str(tmp_path / "m")])


def test_rebuild_hints_are_the_model_cards_commands() -> None:
    # the missing-weights hint of every bundled few-step model names the `diffusolve train`
    # arguments its MODEL_CARD.md runs (digits-lcm-mmd: both MMD stages, in order)
    from diffusolve.models.bundled import TRAIN_STAGES, asset_dir, train_hint

    for name in SHIPPED:
        card = (asset_dir(name) / "MODEL_CARD.md").read_text()
        stages = TRAIN_STAGES.get(name, (name,))
        hint = train_hint(name)
        assert hint.count("diffusolve train") == len(stages)
        for stage in stages:
            args = stage.split(" --out ")[0].replace("STAGE1", "")
            for token in args.split(" --"):
                assert token.strip() in card, (name, token)
    assert "--pixel-weight 1" in train_hint("digits-lcm-mmd").split(", then ")[1]
    with pytest.raises(FileNotFoundError, match="few-step models are"):
        fewstep_recipe("/nonexistent/few-step-folder")


def test_sample_fewstep_needs_a_recipe() -> None:
    with pytest.raises(ValueError, match="recipe"):
        sample_fewstep(load("digits"), 2, 2)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_samples_deterministically(name: str) -> None:
    model = load(name)
    recipe = fewstep_recipe(name)
    assert model.fewstep == recipe and recipe.steps == (1, 2, 4)
    a = sample_fewstep(model, 6, 2, seed=3)
    assert torch.equal(a, sample_fewstep(name, 6, 2, seed=3))  # deterministic for a seed
    assert torch.isfinite(a).all() and a.abs().max() <= 1.0
    # per-sample generators: the batch split changes only the kernels' round-off
    b = sample_fewstep(model, 6, 2, seed=3, batch_size=4)
    assert (a - b).abs().max() < 1e-4
    # the recipe is the solver core's: the same samples through diffusolve.sample
    for steps in (2, 4):
        gens = [torch.Generator().manual_seed(5 + i) for i in range(3)]
        x = float(model.process.sigma(999.0)) * per_sample_noise(gens, (1, 16, 16))

        def noise(shape, dtype=torch.float32, device=None, gens=gens):
            return per_sample_noise(gens, tuple(shape[1:])).to(dtype)

        with torch.no_grad():
            ref = diffusolve.sample(
                model,
                x,
                recipe.grid(steps),
                recipe.solver,
                cond=torch.arange(3),
                final=recipe.final,
                noise=noise,
                x0_transform=lambda z: z.clamp(-1.0, 1.0),
            ).clamp(-1.0, 1.0)
        ours = sample_fewstep(model, 3, steps, torch.arange(3), seed=5)
        assert (ours - ref).abs().max() < 1e-4
    # guidance through the null class is the guidance layer's classifier-free guidance
    g = sample_fewstep(model, 3, 2, torch.arange(3), seed=5, guidance=2.0)
    assert torch.isfinite(g).all() and not torch.equal(g, ours)
    gens = [torch.Generator().manual_seed(5 + i) for i in range(3)]
    x = float(model.process.sigma(999.0)) * per_sample_noise(gens, (1, 16, 16))
    with torch.no_grad():
        ref = diffusolve.sample(
            diffusolve.load(name, guidance=2.0),
            x,
            recipe.grid(2),
            recipe.solver,
            cond=torch.arange(3),
            final=recipe.final,
            noise=lambda shape, dtype=torch.float32, device=None: per_sample_noise(
                gens, tuple(shape[1:])
            ).to(dtype),
            x0_transform=lambda z: z.clamp(-1.0, 1.0),
        ).clamp(-1.0, 1.0)
    assert (g - ref).abs().max() < 1e-4


def test_mmd_lcm_chain_is_the_shipped_lcm_sampler() -> None:
    """The chain ``train_mmd`` differentiates with ``init`` is the ``lcm`` recipe that
    ``sample_fewstep`` runs: the same prior and re-noising draws give the same samples."""
    from diffusolve.train.mmd import lcm_chain

    model, labels = load("digits-lcm"), torch.tensor([3, 7, 10])
    gens = [torch.Generator().manual_seed(5 + i) for i in range(3)]
    z = per_sample_noise(gens, (1, 16, 16))
    noise = [per_sample_noise(gens, (1, 16, 16))]  # each generator's second draw
    scal = DDPMScalars(dtype=torch.float32)
    x = float(scal(torch.tensor([999]))[1]) * z
    with torch.no_grad():
        ours = lcm_chain(model.model.unet, x, labels, [999, 499], scal, model.model.scalings, noise)
    ref = sample_fewstep(model, 3, 2, labels, seed=5)
    assert (ours - ref).abs().max() < 1e-4
    with pytest.raises(ValueError, match="noise"):
        lcm_chain(model.model.unet, x, labels, [999, 499], scal, model.model.scalings, [])


@pytest.mark.slow
def test_tiny_lcm_training_lowers_its_loss_and_writes_a_loadable_model(tmp_path: Path) -> None:
    from diffusolve.train.lcm import LCMConfig, train_lcm

    info = train_lcm(
        LCMConfig(steps=2, batch_size=4, lora=True, rank=2), out=tmp_path, progress=False
    )
    assert info["trainable_parameters"] > 0
    m = load(tmp_path)
    assert torch.isfinite(sample_fewstep(m, 2, 2)).all()


def _digits_batch(n: int, seed: int = 0):
    from diffusolve.models.data import load_digits

    x, y = load_digits("train")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def test_cd_training_steps_lower_the_loss_on_a_fixed_batch() -> None:
    """A few optimizer steps of the training's own loss (student UNet, frozen target, DDIM
    teacher) on one fixed batch lower it: the gradients point the right way."""
    from diffusolve.train.fewstep import base_unet
    from diffusolve.train.lcm import consistency_fn, teacher_ddim_fn

    torch.manual_seed(0)
    scal, bound = DDPMScalars(dtype=torch.float32), BoundaryScalings()
    teacher = base_unet().requires_grad_(False)
    student = base_unet()
    target = copy.deepcopy(student).requires_grad_(False)
    x0, y = _digits_batch(8)
    t = torch.tensor([19, 99, 199, 399, 599, 799, 899, 999])
    g = torch.Generator().manual_seed(0)
    a, s = scal(t, 4)
    x_t = a * x0 + s * torch.randn(x0.shape, generator=g)
    opt = torch.optim.Adam(student.parameters(), lr=2e-5)
    losses = []
    for _ in range(6):
        loss = cd_loss(
            consistency_fn(student, y, scal, bound),
            consistency_fn(target, y, scal, bound),
            teacher_ddim_fn(teacher, y, scal),
            x_t,
            t,
            (t - 20).clamp(min=0),
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_mmd_training_steps_lower_the_loss_on_a_fixed_batch() -> None:
    """The same for MMD fine-tuning: fixed noise and real batch, differentiable
    checkpointed DDIM chain, guide-classifier features."""
    from diffusolve.models.clean_classifier import load_clean_classifier
    from diffusolve.train.fewstep import base_unet
    from diffusolve.train.mmd import ddim_chain, guide_features

    torch.manual_seed(0)
    scal = DDPMScalars(dtype=torch.float32)
    guide, unet = load_clean_classifier(), base_unet()
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    from diffusolve.models.data import load_digits

    xs, ys = load_digits("train")
    real = [xs[ys == c][:3] for c in (0, 1)]
    z = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f_real = [guide_features(guide, r) for r in real]
    opt = torch.optim.Adam(unet.parameters(), lr=2e-4)
    losses = []
    for _ in range(5):
        x = ddim_chain(unet, z, labels, [999.0, 499.0], scal, checkpointing=True)
        loss = class_mmd2(guide_features(guide, x), labels, f_real)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 0.5)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
