"""Phase ``transfer`` of ``diffusolve bench guidance``: what a filtered image prompt transfers.

FilterPrompt (Wang et al. 2024, arXiv:2404.13263) filters a reference image in pixel space
so that only some of its attributes reach the generation. Here (see
:mod:`diffusolve.edit.filter_prompt`) every held-out digit of a fixed subset is a
reference; for every filter preset (identity, low-pass, high-pass, edge, intensity) and
mode (SDEdit start at a strength; loss guidance towards the filtered reference at a
scale) the bundled ``digits`` model generates one image per reference, twice:

- under the **null class** (unconditional): does the reference's class transfer?
- under **another class** (``(y + 1 + i mod 9) mod 10`` for reference ``i`` of class
  ``y``, never ``y``): does the reference's class beat the condition, and does its style
  transfer to another digit? (The generated bins are cut at the condition's terciles.)

Each record holds, for both, :func:`~diffusolve.edit.filter_prompt.transfer_scores`: class
agreement (bundled classifier at ``t_min``), tercile-bin agreement of stroke thickness,
slant and size, and the Pearson correlation of the raw attribute values with the
reference's. Baselines: unconditioned samples from the same noise (chance level; the
pairing with references is arbitrary) and the references themselves (agreement 1, class
agreement = the classifier's accuracy). Every method uses the same start noise (per-sample
seeds), so rows differ only by the conditioning. FD-digits is not measured here (a few
hundred samples give a biased FD; ``bench guidance`` phase ``digits`` has it).

``quick``: 16 references, 10 steps, SDEdit strengths 0.1 and 0.3, guidance scale 0.3
(30 s on one thread of a loaded 2-core machine). Full: 120 references, 10 steps,
strengths 0.1 / 0.2 / 0.3, guidance scales 0.1 and 0.3 through the denoiser (137 s on
one thread, 253 s on a loaded machine). The guidance mode needs
:class:`diffusolve.guidance.LossGuidance`;
without it those jobs are not produced and the tables say so.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..edit import filter_prompt as fp
from ..models.attributes import ATTRIBUTES
from .runner import Job

__all__ = ["PHASES", "jobs", "tables", "plots", "goals", "CONFIG"]

PHASES: tuple[str, ...] = ("transfer",)
TASK = "digits-heldout"
SOLVER = "dpmpp_2m"
#: per run kind: references, steps, SDEdit strengths, guidance scales
CONFIG: dict[bool, dict[str, Any]] = {
    True: {"n": 16, "steps": 10, "strengths": (0.1, 0.3), "scales": (0.3,)},
    False: {"n": 120, "steps": 10, "strengths": (0.1, 0.2, 0.3), "scales": (0.1, 0.3)},
}
BASE_UNCOND = "baseline:unconditioned"
BASE_REF = "baseline:reference"


def has_loss_guidance() -> bool:
    """Whether :class:`diffusolve.guidance.LossGuidance` is there (the guidance mode)."""
    try:
        from ..guidance import LossGuidance  # noqa: F401
    except ImportError:
        return False
    return True


def _key(method: str, setting: str) -> dict[str, Any]:
    return {"bench": "guidance", "phase": "transfer", "task": TASK, "method": method,
            "setting": setting}  # fmt: skip


class _Context:
    """References, their classes, the other classes and the model, loaded once."""

    def __init__(self, quick: bool, seed: int) -> None:
        from ..models import load
        from ..models.bundled import load_classifier
        from ..models.data import load_digits

        cfg = CONFIG[quick]
        x, y = load_digits("heldout")
        # a fixed random subset of the held-out split (seeded), so quick runs see all classes
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: cfg["n"]]
        self.ref, self.labels = x[order], y[order]
        i = torch.arange(len(order))
        self.other = (self.labels + 1 + i % 9) % 10
        self.model = load("digits")
        self.classifier = load_classifier()
        self.noise = seed * 100_000  # per-sample seeds noise + i, the same for every method
        self.steps = cfg["steps"]

    def scores(self, images: torch.Tensor, cond_labels: torch.Tensor | None) -> dict[str, Any]:
        return fp.transfer_scores(
            images,
            self.ref,
            self.labels,
            classifier=self.classifier,
            t=float(self.model.process.t_min),
            cond_labels=cond_labels,
        )

    def generate(self, filt: str, mode: str, value: float, cond: Any) -> torch.Tensor:
        kw = {"strength": value} if mode == "sdedit" else {"scale": value}
        return fp.filter_prompt(
            self.model, self.ref, filt, mode=mode, steps=self.steps, solver=SOLVER,
            cond=cond, noise=self.noise, **kw,
        )  # fmt: skip


def _run(ctx: _Context, method: str, value: float) -> dict[str, Any]:
    start = time.perf_counter()
    out: dict[str, Any] = {"n": len(ctx.ref), "steps": ctx.steps, "solver": SOLVER}
    for which, cond in (("null", None), ("other", ctx.other)):
        cond_labels = None if cond is None else ctx.other
        if method == BASE_REF:
            images = ctx.ref
        elif method == BASE_UNCOND:
            with torch.no_grad():  # strength 1 from the same noise: plain sampling
                images = ctx.generate("identity", "sdedit", 1.0, cond)
        else:
            mode, filt = method.split(":")
            # the guidance loss differentiates the filter; SDEdit needs no graph
            with torch.set_grad_enabled(mode == "guidance"):
                images = ctx.generate(filt, mode, value, cond)
        out[which] = ctx.scores(images.detach(), cond_labels)
    out["timing"] = {"generate_and_score_s": time.perf_counter() - start}
    return out


def jobs(quick: bool, seed: int) -> Iterator[Job]:
    """The phase's jobs: two baselines, then every filter x mode x setting."""
    cfg = CONFIG[bool(quick)]
    state: dict[str, _Context] = {}

    def ctx() -> _Context:
        if "ctx" not in state:
            state["ctx"] = _Context(bool(quick), seed)
        return state["ctx"]

    def job(method: str, setting: str, value: float) -> Job:
        return Job(_key(method, setting), lambda store: _run(ctx(), method, value),
                   label=f"transfer {method} {setting}")  # fmt: skip

    yield job(BASE_REF, "-", 0.0)
    yield job(BASE_UNCOND, "-", 0.0)
    modes = [("sdedit", "strength", cfg["strengths"])]
    if has_loss_guidance():
        modes.append(("guidance", "scale", cfg["scales"]))
    for name in fp.list_filters():
        for mode, what, values in modes:
            for v in values:
                yield job(f"{mode}:{name}", f"{what}={v:g}", float(v))


# ------------------------------------------------------------------------------- report
def _f(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    mine = [r for r in records if r.get("phase") == "transfer"]
    base = [r for r in mine if r["method"].startswith("baseline:")]
    rest = [r for r in mine if not r["method"].startswith("baseline:")]
    return sorted(base, key=lambda r: r["method"], reverse=True) + rest


def _label(r: dict[str, Any]) -> tuple[str, str, str]:
    if r["method"] == BASE_UNCOND:
        return "unconditioned (chance)", "-", "-"
    if r["method"] == BASE_REF:
        return "the reference itself", "-", "-"
    mode, filt = r["method"].split(":")
    return filt, mode, r["setting"]


def tables(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Null-class and other-class tables, and the per-filter summary."""
    rows = _rows(records)
    if not rows:
        return []
    attrs = list(ATTRIBUTES)
    out: list[tuple[str, str]] = []
    for which, title in (
        ("null", "Filter prompts: what transfers (null-class generation)"),
        ("other", "Filter prompts under another class (style across digits)"),
    ):
        head = ["filter", "mode", "setting", "class = ref"]
        if which == "other":
            head.append("class = cond")
        head += [f"{a} bin" for a in attrs] + [f"{a} r" for a in attrs]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            s = r[which]
            cells = list(_label(r)) + [_f(s["class_agreement"])]
            if which == "other":
                cells.append(_f(s["cond_agreement"]))
            cells += [_f(s["bin_agreement"][a]) for a in attrs]
            cells += [_f(s["correlation"][a]) for a in attrs]
            lines.append("| " + " | ".join(cells) + " |")
        n = rows[0]["n"]
        lines.append("")
        lines.append(
            f"n = {n} held-out references; bin = fraction in the same per-class tercile of the "
            "attribute as the reference, r = Pearson correlation of the raw values."
            + ("" if has_loss_guidance() or any(
                r["method"].startswith("guidance:") for r in rows
            ) else " Guidance mode not run (diffusolve.guidance.LossGuidance is not available).")
        )  # fmt: skip
        out.append((title, "\n".join(lines)))
    summary = _summary(rows)
    if summary:
        head = ["filter", "class"] + [f"{a} r" for a in attrs] + [f"{a} bin" for a in attrs]
        head += ["transfers most", "transfers least"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for filt, d in summary.items():
            cells = [filt, _f(d["class"])] + [_f(d["r"][a]) for a in attrs]
            cells += [_f(d["bin"][a]) for a in attrs] + [d["most"], d["least"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "Relative transfer = (filter - chance) / (identity - chance) of the class agreement, "
            "the attributes' correlation r and bin agreement, averaged over the modes and "
            "settings where the identity filter is at least 0.05 above chance (null-class "
            "generation): 1 = as much as the unfiltered reference, 0 = chance, < 0 = pushed "
            "away (a bin agreement below chance means a systematic shift, e.g. the blur "
            "thickening strokes). Most / least: by r.",
        ]
        out.append(("Filter prompts: relative transfer per filter", "\n".join(lines)))
    return out


def _ratio(value: float, ident: float, chance: float) -> float | None:
    den = ident - chance
    return None if den < 0.05 else (value - chance) / den


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per non-identity filter: relative transfer (class, r and bin per attribute) against
    the identity filter at the same mode and setting, both measured from chance."""
    base = next((r for r in rows if r["method"] == BASE_UNCOND), None)
    if base is None:
        return {}
    b = base["null"]
    ident = {
        (r["method"].split(":")[0], r["setting"]): r["null"]
        for r in rows
        if r["method"].endswith(":identity")
    }
    acc: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["method"].startswith("baseline:") or r["method"].endswith(":identity"):
            continue
        mode, filt = r["method"].split(":")
        i = ident.get((mode, r["setting"]))
        if i is None:
            continue
        s = r["null"]
        d = acc.setdefault(filt, {"class": [], "r": {a: [] for a in ATTRIBUTES},
                                  "bin": {a: [] for a in ATTRIBUTES}})  # fmt: skip
        d["class"].append(_ratio(s["class_agreement"], i["class_agreement"], b["class_agreement"]))
        for a in ATTRIBUTES:
            d["r"][a].append(_ratio(s["correlation"][a], i["correlation"][a], b["correlation"][a]))
            d["bin"][a].append(
                _ratio(s["bin_agreement"][a], i["bin_agreement"][a], b["bin_agreement"][a])
            )
    out: dict[str, dict[str, Any]] = {}
    for filt, d in acc.items():
        r = {a: _mean(d["r"][a]) for a in ATTRIBUTES}
        ranked = sorted((a for a in ATTRIBUTES if r[a] is not None), key=lambda a: -r[a])
        if not ranked:
            continue
        out[filt] = {
            "class": _mean(d["class"]),
            "r": r,
            "bin": {a: _mean(d["bin"][a]) for a in ATTRIBUTES},
            "most": ranked[0],
            "least": ranked[-1],
        }
    return out


def goals(records: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """Informational: the most and least transferred stroke attribute per filter."""
    summary = _summary(_rows(records))
    if not summary:
        return []
    figure = "; ".join(
        f"{filt}: most {d['most']} ({d['r'][d['most']]:.2f}), least {d['least']} "
        f"({d['r'][d['least']]:.2f}), class {_f(d['class'])}"
        for filt, d in summary.items()
    )
    return [
        (
            "transfer: which attributes each filter transfers (correlation relative to the "
            "unfiltered reference; informational)",
            True,
            figure,
        )
    ]


def plots(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One bar chart: relative transfer (class agreement; attribute correlation) per filter."""
    summary = _summary(_rows(records))
    if not summary:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(summary)
    keys = ["class", *ATTRIBUTES]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(keys)
    for j, k in enumerate(keys):
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(names))]
        vals = [summary[n]["class"] if k == "class" else summary[n]["r"][k] for n in names]
        ax.bar(xs, [0.0 if v is None else v for v in vals], width, label=k)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("transfer relative to identity")
    ax.set_title("What a filtered image prompt transfers (digits, null class)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "guidance_transfer.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
