"""``DiffusolveScheduler`` inside real diffusers pipelines built here from tiny random parts
(nothing downloaded): Stable Diffusion (CLIP tokenizer + text encoder, AutoencoderKL,
cross-attention UNet), ``DDPMPipeline`` with a ``UNet2DModel``, and a flow-matching loop
driven exactly as diffusers' flow pipelines drive their scheduler. Float64 where results are
compared, so differences are rounding only."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from _tiny_pipelines import tiny_sd_parts, tiny_unet
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionPipeline,
)

import diffusolve
from diffusolve.diffusers import DiffusolveScheduler
from diffusolve.interop.replay import PushSolve, evaluation_times
from diffusolve.models import Gaussian, from_diffusers
from diffusolve.process import ddpm, make_grid, rectified_flow
from diffusolve.solvers import get_solver, list_solvers

pytestmark = pytest.mark.usefixtures("single_thread")

SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "clip_sample": False,
}
DETERMINISTIC = [n for n in list_solvers() if not get_solver(n).stochastic]


def tiny_sd_pipeline(folder) -> StableDiffusionPipeline:
    """A Stable-Diffusion pipeline of tiny random float64 parts (8x8 latents, 16x16 images)."""
    parts = tiny_sd_parts(folder)
    pipe = StableDiffusionPipeline(
        **parts,
        scheduler=DDIMScheduler(**SD_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("clip"))


def generate(pipe, steps: int, seed: int = 0, output_type: str = "pt", **kw):
    with torch.no_grad():
        return pipe(
            "a photo of a cat",
            num_inference_steps=steps,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(seed),
            output_type=output_type,
            **kw,
        ).images


def _min_nfe(solver: str, at_least: int = 6) -> int:
    s = get_solver(solver)
    nfe = at_least
    while True:
        try:
            diffusolve.solvers.steps_for_nfe(s, nfe)
            return nfe
        except ValueError:
            nfe += 1


# ---------------------------------------------------------------------- the replay core
@pytest.mark.parametrize("final", ["denoise", "zero", "none"])
def test_push_solve_is_the_loop_bitwise_for_every_solver(final):
    """Fed one output at a time, every registered solver (stochastic ones with the same
    generator) reproduces ``diffusolve.sample`` bitwise, and the dry run lists exactly its
    NFE evaluation times."""
    p = ddpm("scaled_linear", beta_start=0.00085, beta_end=0.012)
    prior = Gaussian(torch.full((3,), 0.3, dtype=torch.float64), 0.5 * torch.eye(3), process=p)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for name in list_solvers():
        solver = get_solver(name)
        n = max(solver.min_steps, 5)
        grid = make_grid(p, n, solver.natural_grid)
        ref = diffusolve.sample(
            prior, x, grid, solver, final=final, noise=torch.Generator().manual_seed(7)
        )
        solve = PushSolve(solver, p, grid, x, final)
        solve.set_generator(torch.Generator().manual_seed(7))
        while not solve.done:
            xq, tq = solve.query
            solve.feed(prior(xq, tq))
        assert torch.equal(solve.result, ref), name
        times = evaluation_times(solver, p, grid, final)
        assert len(times) == solver.nfe(n) + (final != "none"), name
        assert [t for t, _ in solve.evaluations] == times, name


# ---------------------------------------------------------------------- Stable Diffusion
def _our_guided_model(pipe, prompt: str, scale: float):
    """The pipeline's classifier-free-guided UNet as our denoiser (same embeddings)."""
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True)
    inner = from_diffusers(pipe.unet, SD_CONFIG)

    class Guided:
        process = inner.process

        def __call__(self, x, t, c=None):
            both = inner(torch.cat([x, x]), t, torch.cat([uncond, cond]))
            u, c_ = both.chunk(2)
            return u + scale * (c_ - u)  # CFG on x0 = CFG on epsilon (same x, t)

    return Guided()


@pytest.mark.parametrize("solver", DETERMINISTIC)
def test_sd_pipeline_runs_every_deterministic_solver_as_our_loop(sd, solver):
    """``pipe.scheduler = DiffusolveScheduler.from_config(...)`` generates with every
    deterministic solver, and the pipeline's latents are our loop's result on the same
    guided network, grid and start (float64: rounding only)."""
    sd.scheduler = DiffusolveScheduler.from_config(sd.scheduler.config, solver=solver)
    nfe = _min_nfe(solver)
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    latents = generate(sd, nfe, output_type="latent", latents=x_t)
    sch = sd.scheduler
    assert (
        len(sch.timesteps) <= nfe and len(sch.timesteps) == sch.solver.nfe(sch.grid.numel() - 1) + 1
    )
    with torch.no_grad():
        ref = diffusolve.sample(
            _our_guided_model(sd, "a photo of a cat", 3.0), x_t, sch.grid, solver
        )
    err = float((latents - ref).abs().max())
    assert err < 1e-9 * float(ref.abs().max()), (solver, err)
    image = generate(sd, nfe, latents=x_t)
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


@pytest.mark.parametrize(
    "solver,reference,steps",
    [
        ("ddim", DDIMScheduler, 10),
        ("ddim", DDIMScheduler, 5),
        ("dpmpp_2m", DPMSolverMultistepScheduler, 10),
        ("dpmpp_2m", DPMSolverMultistepScheduler, 6),
    ],
)
def test_images_equal_diffusers_own_schedulers(sd, solver, reference, steps):
    """Same config (trailing spacing, DDIM with ``set_alpha_to_one``), same generator: the
    images equal diffusers' DDIM / DPM-Solver++ 2M ones to float64 rounding of diffusers'
    float32 coefficients. DDIM is compared at step counts dividing 1000: otherwise diffusers'
    DDIM steps to ``t - 1000 // n``, which is not its next timestep."""
    sd.scheduler = reference.from_config(SD_CONFIG)
    ref, ref_lat = generate(sd, steps), generate(sd, steps, output_type="latent")
    ref_times = sd.scheduler.timesteps.tolist()
    sd.scheduler = DiffusolveScheduler.from_config(SD_CONFIG, solver=solver, grid_kind="trailing")
    ours, lat = generate(sd, steps), generate(sd, steps, output_type="latent")
    assert sd.scheduler.timesteps.tolist() == ref_times
    d_img, d_lat = float((ours - ref).abs().max()), float((lat - ref_lat).abs().max())
    print(
        f"{solver} vs {reference.__name__}, {steps} steps: images {d_img:.2e}, latents {d_lat:.2e} (max |latent| {float(ref_lat.abs().max()):.1f})"
    )
    assert d_img < 1e-6 and d_lat < 1e-6 * float(ref_lat.abs().max())


def test_history_resets_between_pipeline_calls(sd):
    sd.scheduler = DiffusolveScheduler.from_config(sd.scheduler.config, solver="unipc_bh2_2")
    a = generate(sd, 6, seed=4)
    generate(sd, 8, seed=5)  # a different call in between
    b = generate(sd, 6, seed=4)
    assert torch.equal(a, b)
    assert sd.scheduler.step_index == len(sd.scheduler.timesteps)


def test_one_scheduler_object_serves_two_pipelines_in_two_threads(sd):
    """Per-generation state is thread-local: two pipelines sharing one scheduler object,
    generating concurrently (forced to interleave), give their sequential results."""
    shared = DiffusolveScheduler.from_config(sd.scheduler.config, solver="dpmpp_3m")
    pipes = [StableDiffusionPipeline(**{**sd.components, "scheduler": shared}) for _ in range(2)]
    for p in pipes:
        p.set_progress_bar_config(disable=True)
    jobs = [(6, 11), (9, 12)]
    expected = [generate(p, n, seed=s) for p, (n, s) in zip(pipes, jobs, strict=True)]
    barrier = threading.Barrier(2)
    results: dict[int, torch.Tensor] = {}

    def interleave(pipe, i, t, kw):
        if i < 5:
            barrier.wait(timeout=30)  # both pipelines are mid-generation at every step
        return kw

    def run(k):
        n, s = jobs[k]
        results[k] = generate(pipes[k], n, seed=s, callback_on_step_end=interleave)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for k in range(2):
        assert torch.equal(results[k], expected[k])


def test_stochastic_solver_takes_the_pipelines_generator(sd):
    sd.scheduler = DiffusolveScheduler.from_config(sd.scheduler.config, solver="ddpm")
    a, b, c = generate(sd, 6, seed=1), generate(sd, 6, seed=1), generate(sd, 6, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_config_round_trip_and_overrides(tmp_path):
    s = DiffusolveScheduler.from_config(
        DDIMScheduler(**SD_CONFIG).config, solver="heun", solver_options={"s_churn": 0.0}
    )
    assert s.config.beta_schedule == "scaled_linear" and s.solver.name == "heun"
    s.save_config(tmp_path)
    back = DiffusolveScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(s.config)
    s.set_timesteps(9)
    back.set_timesteps(9)
    assert torch.equal(s.timesteps, back.timesteps) and s.order == 2
    assert len(s) == 1000 and s.init_noise_sigma == 1.0
    assert "DDIMScheduler" in [c.__name__ for c in s.compatibles]
    with pytest.raises(ValueError, match="unknown solver"):
        DiffusolveScheduler(solver="nope")
    with pytest.raises(ValueError, match="grid_kind"):
        DiffusolveScheduler(grid_kind="nope")
    with pytest.raises(RuntimeError, match="set_timesteps"):
        DiffusolveScheduler().step(torch.zeros(1, 2), 999, torch.zeros(1, 2))
    s.set_timesteps(9)
    with pytest.raises(ValueError, match="in order"):
        s.step(torch.zeros(1, 2), s.timesteps[1], torch.zeros(1, 2))


def test_add_noise_is_the_process_marginal():
    s = DiffusolveScheduler.from_config(SD_CONFIG)
    ref = DDIMScheduler(**SD_CONFIG)
    x0, eps = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(
        s.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), rtol=1e-6, atol=1e-6
    )


# ---------------------------------------------------------------------- DDPMPipeline
@pytest.mark.parametrize("name", ["digits-nfe5-usf", "digits-nfe5-ns"])
def test_ddpm_pipeline_with_a_v_prediction_unet_and_a_shipped_schedule(name):
    """``DDPMPipeline`` (unconditional UNet2DModel, the bundled digits model's scheduler
    config: linear betas, v-prediction) with a shipped searched schedule (USF decisions; a
    fitted ``ns`` solver, whose result combines all outputs): the pipeline makes exactly the
    schedule's NFE and returns the schedule's own result on the same start."""
    from diffusolve.solvers.search.shipped import load_shipped

    folder = Path(diffusolve.__file__).parent / "assets" / "digits" / "scheduler"
    cfg = json.loads((folder / "scheduler_config.json").read_text())
    unet = tiny_unet().eval()
    sched = DiffusolveScheduler.from_config(cfg, schedule=name)
    pipe = DDPMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(
            batch_size=2,
            num_inference_steps=50,
            generator=torch.Generator().manual_seed(3),
            output_type="np",
        ).images
    assert len(sched.timesteps) == 5
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = load_shipped(name).sample(from_diffusers(unet, cfg), x_t)
    ref = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(out - ref).max() < 1e-5


# ---------------------------------------------------------------------- flow matching
def _flow_loop(scheduler, velocity, x, steps, sigmas):
    """The scheduler calls of diffusers' flow pipelines (Flux / SD3)."""
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=None)
    for t in timesteps:
        x = scheduler.step(velocity(x, t.expand(x.shape[0]) / 1000), t, x, return_dict=False)[0]
    return x


def test_flow_matching_ddim_is_flow_match_euler_and_every_solver_is_our_loop():
    """From a FlowMatchEuler config (shift 3), driven as diffusers' flow pipelines drive it:
    our ``ddim`` is diffusers' flow Euler (x0-form of the same update) on the same sigmas, and
    any solver equals our loop on an exact Gaussian model of rectified flow."""
    import numpy as np

    p = rectified_flow(1e-3, 1 - 1e-3)
    prior = Gaussian(torch.full((4,), 0.5, dtype=torch.float64), 0.2 * torch.eye(4), process=p)

    def velocity(x, t):  # exact flow velocity eps - x0 in the pipeline's convention
        if float(t[0]) == 1.0:  # pure noise: E[x0 | x_1] is the data mean
            return x - prior.mean
        return diffusolve.process.from_x0(p, x, t[0], prior(x, t[0]), "velocity")

    cfg = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = np.linspace(0.99, 0.1, 8)
    ref = _flow_loop(FlowMatchEulerDiscreteScheduler.from_config(cfg), velocity, x, 8, sigmas)
    ours = _flow_loop(DiffusolveScheduler.from_config(cfg, solver="ddim"), velocity, x, 8, sigmas)
    print(f"flow ddim vs FlowMatchEuler: {float((ours - ref).abs().max()):.2e}")
    assert float((ours - ref).abs().max()) < 1e-6
    ref_default = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    ref_default.set_timesteps(10)
    for solver in ("unipc_bh2_2", "heun", "dpm_solver_3s"):
        s = DiffusolveScheduler.from_config(cfg, solver=solver)
        out = _flow_loop(s, velocity, x, 10, None)
        # diffusers' default flow grid: timesteps from N; the first step (from sigma = 1,
        # where lambda = -inf) is the entry Euler step, the solver runs the rest of the grid
        assert float(s.timesteps[0]) == 1000.0
        assert float(s.grid[0]) == pytest.approx(float(s.timesteps[1]) / 1000, rel=1e-6)
        x1 = x + (float(s.grid[0]) - 1.0) * velocity(x, torch.ones(3))
        # the loop's model sees the float32 timesteps a pipeline passes (rounding ~1e-7)
        torch.testing.assert_close(
            out, diffusolve.sample(prior, x1, s.grid, solver), rtol=0, atol=1e-6
        )
    s = DiffusolveScheduler.from_config(cfg, solver="ddim")
    s.set_timesteps(10)
    assert torch.equal(s.timesteps, ref_default.timesteps)
    assert torch.equal(s.sigmas, ref_default.sigmas)


# ---------------------------------------------------------------------- SD's own defaults
SD_DEFAULT = {  # Stable Diffusion's shipped scheduler config (DDIM / PNDM keys)
    **SD_CONFIG,
    "set_alpha_to_one": False,
    "timestep_spacing": "leading",
}


@pytest.mark.parametrize(
    "solver,reference,cfg,spacing,steps",
    [
        ("ddim", DDIMScheduler, SD_DEFAULT, "leading", 10),
        ("ddim", DDIMScheduler, {**SD_DEFAULT, "timestep_spacing": "trailing"}, "trailing", 5),
        ("dpmpp_2m", DPMSolverMultistepScheduler, {}, "linspace", 8),
        (
            "dpmpp_2m",
            DPMSolverMultistepScheduler,
            {"final_sigmas_type": "sigma_min"},
            "linspace",
            8,
        ),
        (
            "dpmpp_2m",
            DPMSolverMultistepScheduler,
            {"final_sigmas_type": "sigma_min"},
            "trailing",
            6,
        ),
    ],
)
def test_images_equal_diffusers_with_sd_default_configs(sd, solver, reference, cfg, spacing, steps):
    """SD's defaults: DDIM with ``set_alpha_to_one=False`` (the last step lands on
    ``alphas_cumprod[0]``, our grid ends at t = 0 with final ``"none"``), DPM-Solver++ 2M with
    diffusers' defaults (``final_sigmas_type="zero"``, ``lower_order_final``) and with
    ``"sigma_min"`` (ends at t = 0, last step first order)."""
    base = {k: SD_CONFIG[k] for k in ("beta_start", "beta_end", "beta_schedule")}
    config = reference.from_config({**base, **cfg, "timestep_spacing": spacing}).config
    sd.scheduler = reference.from_config(config)
    ref, ref_lat = generate(sd, steps), generate(sd, steps, output_type="latent")
    ref_times = sd.scheduler.timesteps.tolist()
    sd.scheduler = DiffusolveScheduler.from_config(config, solver=solver, grid_kind=spacing)
    ours, lat = generate(sd, steps), generate(sd, steps, output_type="latent")
    assert sd.scheduler.timesteps.tolist() == ref_times
    end_at_zero = (
        cfg.get("set_alpha_to_one") is False or cfg.get("final_sigmas_type") == "sigma_min"
    )
    assert sd.scheduler.final == ("none" if end_at_zero else "denoise")
    assert float(sd.scheduler.grid[-1]) == (0.0 if end_at_zero else ref_times[-1])
    d_img, d_lat = float((ours - ref).abs().max()), float((lat - ref_lat).abs().max())
    print(
        f"SD default {solver} vs {reference.__name__} ({spacing}, {cfg}), {steps} steps: "
        f"images {d_img:.2e}, latents {d_lat:.2e} (max |latent| {float(ref_lat.abs().max()):.1f})"
    )
    assert d_img < 1e-6 and d_lat < 1e-6 * float(ref_lat.abs().max())


def test_unreproduced_config_options_warn():
    cfg = DPMSolverMultistepScheduler(use_karras_sigmas=True, euler_at_final=True).config
    with pytest.warns(UserWarning, match="use_karras_sigmas=True, euler_at_final=True"):
        s = DiffusolveScheduler.from_config(cfg, solver="dpmpp_2m")
    assert s.solver.lower_order_final is True  # the config's lower_order_final is passed on
    assert DiffusolveScheduler.from_config(cfg, solver="dpmpp_2m", final="zero").final == "zero"
    with pytest.raises(ValueError, match="final_sigmas_type"):
        DiffusolveScheduler(final_sigmas_type="nope")
