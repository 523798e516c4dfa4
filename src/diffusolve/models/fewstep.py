"""Few-step digits models and their sampling recipes.

Four bundled models are trained from ``digits`` to be sampled with very few network
evaluations (``diffusolve train digits-lcm``, ``digits-lcm --lora``, ``digits-mmd``,
``digits-mmd --init digits-lcm``):

- ``digits-lcm``: consistency distillation (Luo et al. 2023, Latent Consistency Models; Song
  et al. 2023, Consistency Models), full fine-tune, sampled with multistep consistency
  sampling (the registered ``lcm`` solver);
- ``digits-lcm-lora``: the same distillation as a LoRA on the base model (Luo et al. 2023,
  LCM-LoRA), merged into ``digits`` when loaded;
- ``digits-mmd``: MMD fine-tuning for a two-evaluation DDIM sampler (Aiello, Valsesia &
  Magli 2023, arXiv 2301.07969);
- ``digits-lcm-mmd``: ``digits-lcm`` MMD-fine-tuned through its own two-evaluation ``lcm``
  sampler (the same loss, the consistency boundary scalings kept).

Each folder has a ``fewstep.json`` recipe (:class:`FewStepRecipe`): the solver, the times
at which the network is called for each step count, and the final policy. ``steps`` counts
network calls per sample (the final denoise included), so with ``guidance = 1`` the NFE of
an ``n``-step sample is ``n * nfe_per_step``; classifier-free guidance doubles it.

The sampler here is the solver core's ``lcm`` / ``ddim`` step written out for these grids
(the models layer sits below the solvers): for ``n >= 2`` it equals
``diffusolve.sample(model, x, recipe.grid(n), recipe.solver, final=recipe.final,
noise=source, x0_transform=clamp)`` with the per-sample noise source described in
:func:`sample_fewstep` (``tests/test_fewstep.py`` checks it); ``n = 1`` is the single
denoising call ``f(x_T, T)``, which ``sample`` cannot express (a grid has two points).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FEWSTEP_MODELS",
    "FewStepRecipe",
    "fewstep_recipe",
    "sample_fewstep",
    "skipping_timesteps",
    "RECIPE_NAME",
]

FEWSTEP_MODELS = ("digits-lcm", "digits-lcm-lora", "digits-mmd", "digits-lcm-mmd")
RECIPE_NAME = "fewstep.json"
_SOLVERS = ("lcm", "ddim")
_FINALS = ("denoise",)


def skipping_timesteps(n: int, num_train_timesteps: int = 1000, origin_steps: int = 50) -> list:
    """The ``n`` network-call times of LCM's multistep sampling on the distillation grid.

    Distillation uses the skipping grid ``{k i - 1 : i = 1 .. origin_steps}`` with
    ``k = num_train_timesteps / origin_steps`` (Luo et al. 2023: 50 DDIM steps, k = 20);
    ``n``-step sampling takes every ``origin_steps // n``-th point from the top.

    Example:
        >>> skipping_timesteps(1), skipping_timesteps(2), skipping_timesteps(4)
        ([999.0], [999.0, 499.0], [999.0, 759.0, 519.0, 279.0])
    """
    if not 1 <= int(n) <= origin_steps:
        raise ValueError(f"n must be in 1..{origin_steps}, got {n}")
    k = num_train_timesteps // origin_steps
    origin = [float(k * i - 1) for i in range(1, origin_steps + 1)][::-1]
    return origin[:: origin_steps // int(n)][: int(n)]


@dataclass(frozen=True)
class FewStepRecipe:
    """How a few-step model is sampled (the content of its ``fewstep.json``).

    Attributes:
        name: the model name.
        base: the model it was trained from (``"digits"``).
        solver: the registered solver whose step runs between the network calls.
        grid_kind: a :func:`~diffusolve.process.make_grid` kind, or ``None`` when the call
            times are listed in ``timesteps``.
        final: the final policy of :func:`diffusolve.sample` (``"denoise"``: the last
            network call returns its x0 estimate).
        steps: the step counts (network calls per sample) the model is evaluated at.
        nfe_per_step: network evaluations per step at guidance 1.
        timesteps: ``((n, (t_1, ..., t_n)), ...)``: the times of the ``n`` network calls.
        clamp: whether every x0 estimate is clamped to [-1, 1].
    """

    name: str
    base: str
    solver: str
    grid_kind: str | None
    final: str
    steps: tuple[int, ...]
    nfe_per_step: int
    timesteps: tuple[tuple[int, tuple[float, ...]], ...]
    clamp: bool = True

    def __post_init__(self) -> None:
        if self.solver not in _SOLVERS:
            raise ValueError(f"{self.name}: solver must be one of {_SOLVERS}, got {self.solver!r}")
        if self.final not in _FINALS:
            raise ValueError(f"{self.name}: final must be one of {_FINALS}, got {self.final!r}")
        if self.grid_kind is not None:
            raise ValueError(f"{self.name}: only listed timesteps (grid_kind null) are supported")
        if self.nfe_per_step < 1 or not self.steps:
            raise ValueError(f"{self.name}: nfe_per_step must be >= 1 and steps non-empty")

    def grid(self, steps: int) -> Tensor:
        """The float64 times of the ``steps`` network calls (decreasing)."""
        table = dict(self.timesteps)
        if int(steps) in table:
            return torch.tensor(table[int(steps)], dtype=torch.float64)
        try:
            return torch.tensor(skipping_timesteps(int(steps)), dtype=torch.float64)
        except ValueError as err:
            raise ValueError(f"{self.name}: no grid for {steps} steps ({err})") from None

    def nfe(self, steps: int, guidance: float = 1.0) -> int:
        """Network evaluations per sample (classifier-free guidance doubles them)."""
        return int(steps) * self.nfe_per_step * (1 if float(guidance) == 1.0 else 2)

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "solver": self.solver,
            "grid_kind": self.grid_kind,
            "final": self.final,
            "steps": list(self.steps),
            "nfe_per_step": self.nfe_per_step,
            "timesteps": {str(n): list(ts) for n, ts in self.timesteps},
            "clamp": self.clamp,
        }

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> FewStepRecipe:
        ts = data.get("timesteps") or {str(n): skipping_timesteps(n) for n in data["steps"]}
        return cls(
            name=name,
            base=str(data["base"]),
            solver=str(data["solver"]),
            grid_kind=data.get("grid_kind"),
            final=str(data["final"]),
            steps=tuple(int(s) for s in data["steps"]),
            nfe_per_step=int(data["nfe_per_step"]),
            timesteps=tuple(sorted((int(n), tuple(float(t) for t in v)) for n, v in ts.items())),
            clamp=bool(data.get("clamp", True)),
        )

    def save(self, folder: str | Path) -> None:
        (Path(folder) / RECIPE_NAME).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def _folder(name: str | Path) -> Path:
    if isinstance(name, str) and name in FEWSTEP_MODELS:
        return Path(__file__).resolve().parent.parent / "assets" / name
    return Path(name).expanduser()


def fewstep_recipe(name: str | Path) -> FewStepRecipe:
    """The sampling recipe of few-step model ``name`` (a bundled name or a folder).

    Example:
        >>> r = fewstep_recipe("digits-lcm")
        >>> r.solver, r.steps
        ('lcm', (1, 2, 4))
    """
    folder = _folder(name)
    path = folder / RECIPE_NAME
    if not path.is_file():
        from .bundled import train_hint

        known = isinstance(name, str) and name in FEWSTEP_MODELS
        hint = (
            f"train it with {train_hint(name)}"
            if known
            else f"few-step models are {FEWSTEP_MODELS}"
        )
        raise FileNotFoundError(f"{str(name)!r} has no few-step recipe ({path} is missing); {hint}")
    label = str(name) if isinstance(name, str) and name in FEWSTEP_MODELS else folder.name
    return FewStepRecipe.from_json(label, json.loads(path.read_text()))


def _x0(model: Any, x: Tensor, t: Tensor, labels: Tensor, guidance: float, null: int) -> Tensor:
    """The (guided) x0 estimate: one network call, of a doubled batch under guidance."""
    if guidance == 1.0:
        return model(x, t, labels)
    both = model(torch.cat([x, x]), t, torch.cat([torch.full_like(labels, null), labels]))
    x0_null, x0_cond = both.chunk(2)
    return x0_null + guidance * (x0_cond - x0_null)


def sample_fewstep(
    name_or_model: str | Path | Any,
    n: int,
    steps: int,
    labels: Tensor | None = None,
    seed: int = 0,
    guidance: float = 1.0,
    *,
    recipe: FewStepRecipe | None = None,
    batch_size: int = 500,
) -> Tensor:
    """``n`` samples ``[n, 1, 16, 16]`` in [-1, 1] of a few-step model with ``steps`` calls.

    Args:
        name_or_model: a name in :data:`FEWSTEP_MODELS`, a folder written by ``diffusolve
            train ...``, or a loaded model (then ``recipe`` or the ``fewstep`` attribute that
            :func:`~diffusolve.models.load` sets gives the recipe).
        n: the number of samples.
        steps: network calls per sample (``nfe = steps`` at guidance 1).
        labels: int labels ``[n]`` (default ``i % 10``, class-balanced).
        seed: sample ``i`` draws all its randomness (prior noise, then the re-noising of
            each consistency step) from one generator seeded ``seed + i``, so it does not
            depend on the batch it is drawn in.
        guidance: classifier-free guidance scale with the null class (1 = conditional).

    Runs under ``torch.no_grad``. Raises ``FileNotFoundError`` naming the ``diffusolve
    train`` command when the weights are not there.

    Example:
        >>> x = sample_fewstep("digits-lcm", 4, 2, seed=0)
        >>> x.shape
        torch.Size([4, 1, 16, 16])
    """
    from .bundled import NULL_CLASS, load

    if isinstance(name_or_model, (str, Path)):
        recipe = recipe or fewstep_recipe(name_or_model)
        model = load(name_or_model)
    else:
        model = name_or_model
        recipe = recipe or getattr(model, "fewstep", None)
        if recipe is None:
            raise ValueError(
                "sample_fewstep got a model without a recipe: pass recipe=fewstep_recipe(name) "
                "or a model loaded with diffusolve.models.load(<few-step name>)"
            )
    if int(n) < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    guidance = float(guidance)
    if not guidance >= 0.0:
        raise ValueError(f"guidance must be >= 0, got {guidance}")
    if labels is None:
        labels = torch.arange(int(n)) % 10
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() != int(n):
        raise ValueError(f"got {labels.numel()} labels for {n} samples")
    grid = recipe.grid(steps)
    null = getattr(model, "null", NULL_CLASS)
    out = []
    with torch.no_grad():
        for lo in range(0, int(n), batch_size):
            hi = min(int(n), lo + batch_size)
            gens = [torch.Generator().manual_seed(int(seed) + i) for i in range(lo, hi)]
            out.append(_run(model, recipe, grid, labels[lo:hi], gens, guidance, null))
    return torch.cat(out)


def per_sample_noise(gens: list, shape: tuple[int, ...]) -> Tensor:
    """Standard normal ``[len(gens), *shape]``, row ``i`` from ``gens[i]`` (float64 draws,
    as the solver core's ``SeededNoise``), returned in float32."""
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for g in gens]).to(
        torch.float32
    )


def _run(
    model: Any,
    recipe: FewStepRecipe,
    grid: Tensor,
    labels: Tensor,
    gens: list,
    guidance: float,
    null: int,
) -> Tensor:
    process = model.process
    shape = (1, 16, 16)
    x = float(process.sigma(grid[0])) * per_sample_noise(gens, shape)
    times = grid.unbind()
    for i, t in enumerate(times):
        x0 = _x0(model, x, t, labels, guidance, null)
        if recipe.clamp:
            x0 = x0.clamp(-1.0, 1.0)
        if i == len(times) - 1:
            return x0
        t1 = times[i + 1]
        a1, s1 = float(process.alpha(t1)), float(process.sigma(t1))
        if recipe.solver == "lcm":
            z = per_sample_noise(gens, shape)
        else:  # ddim: the noise implied by x and x0, carried to t1
            a, s = float(process.alpha(t)), float(process.sigma(t))
            z = (x - a * x0) / s
        x = a1 * x0 + s1 * z
    raise AssertionError("unreachable")
