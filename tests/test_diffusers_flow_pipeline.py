"""``DiffusolveScheduler`` in a real flow-matching pipeline: a ``StableDiffusion3Pipeline``
built here from tiny random parts (an ``SD3Transformer2DModel``, ``AutoencoderKL``, two CLIP
text encoders with projection and a local CLIP tokenizer; ``text_encoder_3`` / T5 left out,
which the pipeline allows: its T5 embeddings are then zeros), nothing downloaded.

With ``solver="ddim"`` (flow Euler in x0 form, plus the entry step from sigma = 1) the
pipeline's latents equal those of its own ``FlowMatchEulerDiscreteScheduler`` at the same
settings; every other deterministic solver runs end to end and is our loop on the same
guided network (float64 parts)."""

from __future__ import annotations

import pytest
import torch
import transformers
from _tiny_pipelines import DIM, LENGTH, clip_text_config, clip_tokenizer, tiny_vae
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from diffusolve.diffusers import DiffusolveScheduler

pytestmark = pytest.mark.usefixtures("single_thread")

FLOW_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}  # SD3's shipped shift


def _clip(n_vocab: int, seed: int) -> transformers.CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return transformers.CLIPTextModelWithProjection(clip_text_config(n_vocab, DIM // 2))


def tiny_sd3_pipeline(folder, dtype=torch.float64, **scheduler) -> StableDiffusion3Pipeline:
    """SD3 of tiny random parts: 8x8 latents (16 channels), 16x16 images."""
    tokenizer, n_vocab = clip_tokenizer(folder)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=DIM,  # >= the two CLIP widths together (padded to it)
        caption_projection_dim=DIM,
        pooled_projection_dim=DIM,  # the two pooled projections concatenated
        pos_embed_max_size=16,
    )
    vae = tiny_vae(
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    parts = dict(text_encoder=_clip(n_vocab, 1), text_encoder_2=_clip(n_vocab, 2))
    for m in (transformer, vae, *parts.values()):
        m.to(dtype).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        vae=vae,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler(**{**FLOW_CONFIG, **scheduler}),
        **parts,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return tiny_sd3_pipeline(tmp_path_factory.mktemp("clip3"))


def generate(pipe, steps: int, seed: int = 0, output_type: str = "latent", **kw):
    with torch.no_grad():
        return pipe(
            "a photo of a cat",
            num_inference_steps=steps,
            guidance_scale=3.0,
            height=16,
            width=16,
            max_sequence_length=LENGTH,
            generator=torch.Generator().manual_seed(seed),
            output_type=output_type,
            **kw,
        ).images


def _equal_to_flow_euler(pipe, steps: int, **kw) -> tuple[float, float, float]:
    """(max |latent difference|, max |image difference|, max |latent|) of ddim against the
    pipeline's own flow-matching Euler scheduler, same settings and generator."""
    own = pipe.scheduler
    ref_lat, ref_img = generate(pipe, steps, **kw), generate(pipe, steps, output_type="pt", **kw)
    ref_times = own.timesteps.clone()
    pipe.scheduler = DiffusolveScheduler.from_config(own.config, solver="ddim")
    try:
        lat, img = generate(pipe, steps, **kw), generate(pipe, steps, output_type="pt", **kw)
        assert torch.equal(pipe.scheduler.timesteps, ref_times)
    finally:
        pipe.scheduler = own
    return (
        float((lat - ref_lat).abs().max()),
        float((img - ref_img).abs().max()),
        float(ref_lat.abs().max()),
    )


@pytest.mark.parametrize("steps", [4, 7])
def test_sd3_ddim_equals_the_pipelines_flow_match_euler(sd3, steps):
    """Static shift 3, the pipeline's default sigmas (timesteps from 1000): diffusers' flow
    Euler upcasts to float32 inside ``step``, so float64 parts agree to float32 rounding."""
    d_lat, d_img, scale = _equal_to_flow_euler(sd3, steps)
    print(
        f"SD3 float64, {steps} steps: latents {d_lat:.2e} (max |latent| {scale:.2f}), "
        f"images {d_img:.2e}"
    )
    assert d_lat < 1e-5 * scale and d_img < 1e-5


def test_sd3_ddim_equals_flow_match_euler_with_dynamic_shift_and_given_sigmas(tmp_path):
    """Dynamic shifting (the pipeline computes ``mu`` from the image size) with sigmas given
    to the pipeline, in float32 parts."""
    import numpy as np

    pipe = tiny_sd3_pipeline(tmp_path, torch.float32, use_dynamic_shifting=True)
    d_lat, d_img, scale = _equal_to_flow_euler(pipe, 5, sigmas=np.linspace(1.0, 0.2, 5).tolist())
    print(f"SD3 float32, dynamic shift, given sigmas: latents {d_lat:.2e}, images {d_img:.2e}")
    assert d_lat < 1e-5 * scale and d_img < 1e-5


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m", "unipc_bh2_2", "dpm_solver_3s"])
def test_sd3_runs_other_solvers_as_entry_step_then_our_loop(sd3, solver):
    """Any deterministic solver: ``timesteps`` start at 1000 (sigma = 1), the pipeline makes
    exactly ``len(timesteps)`` network calls, and its latents are the entry Euler step then
    our loop on the same guided transformer (float64: rounding only)."""
    import diffusolve

    own = sd3.scheduler
    sd3.scheduler = DiffusolveScheduler.from_config(own.config, solver=solver)
    calls = []
    hook = sd3.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        x_t = torch.randn(
            1, 16, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64
        )
        lat = generate(sd3, 9, latents=x_t)
        sch = sd3.scheduler
        assert len(calls) == len(sch.timesteps) <= 9 and float(sch.timesteps[0]) == 1000.0
        velocity = _guided_velocity(sd3)
        t1 = float(sch.grid[0])
        x1 = x_t + (t1 - 1.0) * velocity(x_t, torch.tensor(1.0, dtype=torch.float64))

        class Model:
            process = sch.process

            def __call__(self, x, t, c=None):
                return x - t * velocity(x, t)

        with torch.no_grad():
            ref = diffusolve.sample(Model(), x1, sch.grid, solver)
        err = float((lat - ref).abs().max())
        print(f"SD3 {solver}: pipeline vs entry step + our loop {err:.1e}")
        # rounding only (measured 0 to 3e-14; dpm_solver_3s 1.2e-6: its stages near
        # sigma = 1, alpha ~ 0.04, amplify the float64 rounding of the x0 conversion)
        assert err < 1e-6 * float(ref.abs().max()), (solver, err)
    finally:
        hook.remove()
        sd3.scheduler = own


def _guided_velocity(pipe, prompt: str = "a photo of a cat", scale: float = 3.0):
    """The pipeline's classifier-free-guided transformer as ``v(x, t)``, t in [0, 1]."""
    with torch.no_grad():
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt, prompt, prompt, device="cpu", max_sequence_length=LENGTH
        )
    ctx = torch.cat([neg, emb])
    pool = torch.cat([neg_pooled, pooled])

    def velocity(x, t):
        ts = (torch.as_tensor(t) * 1000).to(torch.float32).to(x.dtype).expand(2)
        with torch.no_grad():
            out = pipe.transformer(
                hidden_states=torch.cat([x, x]),
                timestep=ts,
                encoder_hidden_states=ctx,
                pooled_projections=pool,
                return_dict=False,
            )[0]
        u, c = out.chunk(2)
        return u + scale * (c - u)

    return velocity
