"""The bench task catalogue: priors with their process, the shared start, exact references.

A task is a prior (a Gaussian mixture, a Gaussian, or the bundled digits UNet) on a noise
process, ``n_samples`` starts ``x_T`` (prior noise at ``t_max``, float64), the reference
result every method is measured against, exact data samples for the sliced Wasserstein
distance and its noise floor.

References (``reference=``):

* ``"zero"``: the exact probability-flow endpoint at ``sigma -> 0``
  (:meth:`~diffusolve.models.analytic.reference.ODEReference.reference_zero`: DOP853 in
  float64 on ``x/alpha`` against ``v = (sigma/alpha)^2`` down to ``v = 0``; closed form for
  Gaussian priors);
* ``"tmin"``: the PF-ODE from ``(x_T, t_max)`` to ``t_min`` (DOP853, float64; closed form
  for Gaussian priors) followed by the exact denoiser at ``t_min``. The two differ by
  ``O(s_min^2)``, ``s_min = sigma/alpha`` at ``t_min``: about ``1e-4`` on the DDPM-linear
  process, ``8.5e-4`` on Stable Diffusion's scaled-linear betas (``gmm-d32-sd``).

The network task (``digits-unet``) has no exact reference: a 1000-step third-order solve
ending with a denoise at ``t_min``, whatever ``reference`` says (its info says so).

Example:
    >>> from diffusolve.bench.tasks import build_task
    >>> task = build_task("gauss-d2-vp", 8)
    >>> tuple(task.x_T.shape), task.kind, task.info["reference"]
    ((8, 2), 'vp', 'closed form: probability-flow endpoint at sigma -> 0')
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..metrics import rel_error, sw_noise_floor
from ..process import get_process, make_grid
from ..solvers import sample

__all__ = [
    "TASKS",
    "FULL_TASKS",
    "QUICK_TASKS",
    "REFERENCES",
    "Task",
    "build_task",
    "prior_for",
    "check_tasks",
]

#: name -> prior kind, dimension, process name (and, for the network task, its methods)
TASKS: dict[str, dict[str, Any]] = {
    "gmm-d2-vp": {"prior": "gmm", "dim": 2, "process": "ddpm-linear"},
    "gmm-d64-vp": {"prior": "gmm", "dim": 64, "process": "ddpm-linear"},
    "gmm-d2-rf": {"prior": "gmm", "dim": 2, "process": "rectified-flow"},
    "gmm-d64-rf": {"prior": "gmm", "dim": 64, "process": "rectified-flow"},
    # Stable Diffusion's scaled-linear betas (0.00085 .. 0.012): sigma/alpha = 0.029 at
    # t = 0, so a final denoise at t_min is visibly off the sigma -> 0 endpoint
    "gmm-d32-sd": {"prior": "gmm", "dim": 32, "process": "ddpm-scaled-linear"},
    # the bundled digits UNet (unconditional: null class), float64; the reference is a
    # 1000-step third-order solve (see build_task), checked against a 500-step one
    "digits-unet": {
        "prior": "digits",
        "dim": 256,
        "process": "ddpm-linear",
        # each solve is a UNet run: our strongest solvers of each family only
        "methods": (
            "ddim",
            "dpmpp_2m",
            "dpmpp_3m",
            "unipc_bh1_2",
            "unipc_bh2_2",
            "deis_tab3",
            "ipndm",
            "plms",
            "bdia_ddim",
        ),
    },
    # small exact tasks for tests and smoke runs
    "gauss-d2-vp": {"prior": "gaussian", "dim": 2, "process": "ddpm-linear"},
    "gauss-d2-rf": {"prior": "gaussian", "dim": 2, "process": "rectified-flow"},
}
FULL_TASKS = ("gmm-d2-vp", "gmm-d64-vp", "gmm-d2-rf", "gmm-d64-rf", "gmm-d32-sd", "digits-unet")
QUICK_TASKS = ("gmm-d64-vp", "gmm-d2-rf")
#: "zero": PF-ODE endpoint at sigma -> 0; "tmin": PF-ODE to t_min + exact denoiser there
REFERENCES = ("zero", "tmin")
#: samples for the network task (each solve runs the float32 UNet; solver arithmetic float64)
N_SAMPLES_NETWORK = 32
REFERENCE_STEPS = 1000
N_COMPONENTS = 25


@dataclass
class Task:
    """One bench task: a prior with its process, the shared start, reference and data."""

    name: str
    kind: str  # "vp" or "rf"
    model: Any
    x_T: Tensor
    ref: Tensor
    data: Tensor
    info: dict[str, Any] = field(default_factory=dict)


def check_tasks(names: list[str] | tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the unknown tasks and the known ones."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(
            f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(TASKS)}"
        )


def prior_for(name: str, seed: int = 0) -> Any:
    """The exact prior of an analytic task (deterministic for ``seed``)."""
    check_tasks([name])
    spec = TASKS[name]
    if spec["prior"] not in ("gmm", "gaussian"):
        raise ValueError(f"task {name!r} has no analytic prior")
    process = get_process(spec["process"])
    d = int(spec["dim"])
    if spec["prior"] == "gmm":
        from ..models.analytic.gmm import GaussianMixture

        return GaussianMixture.random(d, N_COMPONENTS, process=process, seed=seed)
    from ..models import Gaussian

    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    evals = torch.logspace(-2, 0, d, dtype=torch.float64)
    mean = 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
    return Gaussian(mean, (q * evals) @ q.T, process=process)


def _network_task(name: str, n_samples: int, seed: int, sw_projections: int) -> Task:
    """The bundled digits UNet: reference = 1000-step dpmpp_3m solve in float64."""
    from ..models import load
    from ..models.data import load_digits

    # the UNet runs in float32 (float64 convolutions are ~6x slower on CPU); the solver state
    # and coefficients stay float64. cond None = the null class (unconditional)
    model = load("digits", dtype=torch.float32)
    p = model.process
    n_samples = min(n_samples, N_SAMPLES_NETWORK)
    xT = p.prior_sample(
        (n_samples, 1, 16, 16), torch.Generator().manual_seed(seed + 1), dtype=torch.float64
    )

    def solve(steps: int) -> Tensor:
        with torch.no_grad():
            return sample(model, xT, make_grid(p, steps, "logsnr"), "dpmpp_3m", progress=False)

    start = time.perf_counter()
    ref = solve(REFERENCE_STEPS)
    ref_seconds = time.perf_counter() - start
    acc = rel_error(solve(REFERENCE_STEPS // 2), ref)
    data = load_digits("heldout")[0].to(torch.float64)
    g = torch.Generator().manual_seed(seed + 2)
    data = data[torch.randperm(data.shape[0], generator=g)[:n_samples]]
    if data.shape[0] < n_samples:
        raise ValueError(f"digits-unet needs at most {data.shape[0]} samples")
    info = {
        "prior": "bundled digits UNet (unconditional, null class)",
        "dim": 256,
        "n_components": None,
        "process": p.name,
        "t_max": p.t_max,
        "t_min": p.t_min,
        "n_samples": n_samples,
        "seed": seed,
        "reference": f"{REFERENCE_STEPS}-step dpmpp_3m (third order), logSNR grid, float64 "
        "solver state (float32 UNet), final denoise at t_min (a network has no sigma -> 0 "
        "endpoint)",
        "reference_accuracy": acc,
        "reference_accuracy_is": f"rel. difference to a {REFERENCE_STEPS // 2}-step solve "
        "(an upper bound on the reference's error)",
        "reference_seconds": round(ref_seconds, 3),
        "sw_floor": None,
        "sw_floor_std": None,
        "sw_projections": sw_projections,
        "sw_data": "held-out digits (model samples are not exact data samples; sw is indicative)",
    }
    return Task(name, "vp", model, xT, ref, data, info)


def _reference(model: Any, spec: dict[str, Any], xT: Tensor, reference: str, n_check: int):
    """``(ref, seconds, accuracy, accuracy text, description)`` of an analytic task
    (``seconds``: the reference solve alone, without its accuracy check)."""
    from ..models.analytic.reference import gaussian_endpoint_zero

    p = model.process
    exact = spec["prior"] == "gaussian"
    start = time.perf_counter()
    if reference == "tmin":
        ref = model.reference(xT, p.t_max, p.t_min, final="denoise")
        text = "PF-ODE to t_min + exact denoiser"
        text = "closed form: " + text if exact else "DOP853 float64 " + text
    elif exact:
        ref = gaussian_endpoint_zero(model, xT, p.t_max)
        text = "closed form: probability-flow endpoint at sigma -> 0"
    else:
        ref = model.reference_zero(xT, p.t_max)
        text = (
            "DOP853 float64 PF-ODE in x/alpha against (sigma/alpha)^2 down to sigma = 0 "
            "(exact endpoint, no final denoise)"
        )
    seconds = time.perf_counter() - start
    if exact:
        return ref, seconds, 0.0, "closed form (exact)", text
    if reference == "tmin":
        acc = model.reference_accuracy(xT[:n_check], p.t_max, p.t_min, n_check=n_check)
    else:
        acc = model.reference_zero_accuracy(xT[:n_check], p.t_max, n_check=n_check)
    acc_text = f"max rel. diff. to a 100x tighter DOP853 solve on {n_check} samples"
    return ref, seconds, acc, acc_text, text


def build_task(
    name: str,
    n_samples: int,
    *,
    seed: int = 0,
    sw_projections: int = 128,
    reference: str = "zero",
) -> Task:
    """Build a task: prior, ``x_T`` (float64), reference, exact data and SW floor.

    Args:
        name: a key of :data:`TASKS`.
        n_samples: number of starts (the network task caps it at ``N_SAMPLES_NETWORK``).
        seed: seed of the prior, the starts and the data.
        sw_projections: projections of the sliced Wasserstein distance.
        reference: ``"zero"`` or ``"tmin"`` (see the module docstring).
    """
    check_tasks([name])
    if reference not in REFERENCES:
        raise ValueError(f"unknown reference {reference!r}; choose from {', '.join(REFERENCES)}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    spec = TASKS[name]
    if spec["prior"] == "digits":
        return _network_task(name, n_samples, seed, sw_projections)
    model = prior_for(name, seed)
    p = model.process
    d = int(spec["dim"])
    xT = p.prior_sample(
        (n_samples, d), torch.Generator().manual_seed(seed + 1), dtype=torch.float64
    )
    n_check = min(16, n_samples)
    ref, ref_seconds, acc, acc_text, ref_text = _reference(model, spec, xT, reference, n_check)
    data = model.sample(n_samples, torch.Generator().manual_seed(seed + 2))
    floor = sw_noise_floor(
        model.sample, n_samples, repeats=3, seed=seed, n_projections=sw_projections
    )
    info = {
        "prior": spec["prior"],
        "dim": d,
        "n_components": N_COMPONENTS if spec["prior"] == "gmm" else 1,
        "process": p.name,
        "t_max": p.t_max,
        "t_min": p.t_min,
        "s_min": float(p.sigma_tilde(p.t_min)),
        "n_samples": n_samples,
        "seed": seed,
        "reference_kind": reference,
        "reference": ref_text,
        "reference_accuracy": acc,
        "reference_accuracy_is": acc_text,
        "reference_seconds": round(ref_seconds, 3),
        "sw_floor": floor["mean"],
        "sw_floor_std": floor["std"],
        "sw_projections": sw_projections,
    }
    kind = "rf" if spec["process"] == "rectified-flow" else "vp"
    return Task(name, kind, model, xT, ref, data, info)
