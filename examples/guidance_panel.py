"""Guidance methods side by side

One digit per class (rows 0-9) from the same starting noise, DDIM with 10 steps, under
classifier-free guidance at scales 1 (plain conditional), 3 and 6, CFG++ (scale 0.6), and
classifier guidance with the bundled noise-aware classifier (scale 1). The accuracy column
is measured by an independent clean classifier (the judge) that no method uses.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def run(out: Path) -> tuple[list[Path], str]:
    from diffusolve import load, sample
    from diffusolve.guidance import CFGPlusPlus, ClassifierGuidance, Guided
    from diffusolve.images import save_grid
    from diffusolve.models import load_classifier
    from diffusolve.models.clean_classifier import load_judge_classifier
    from diffusolve.process import make_grid

    model = load("digits")
    grid = make_grid(model.process, 10, "time_uniform")
    labels = torch.arange(10)
    xT = model.process.prior_sample((10, 1, 16, 16), noise=list(range(20_000, 20_010)))
    methods = {
        "CFG 1": Guided(model, 1.0),
        "CFG 3": Guided(model, 3.0),
        "CFG 6": Guided(model, 6.0),
        "CFG++ 0.6": CFGPlusPlus(model, 0.6, grid=grid),
        "classifier 1": ClassifierGuidance(model, load_classifier(), 1.0),
    }
    judge = load_judge_classifier()
    columns, lines = [], ["| method | judge accuracy (10 digits) |", "|---|---|"]
    for title, guided in methods.items():
        with torch.no_grad():
            x = sample(guided, xT, grid, "ddim", cond=labels)
            acc = float((judge(x.float()).argmax(1) == labels).double().mean())
        columns.append(x.float())
        lines.append(f"| {title} | {100 * acc:.0f} % |")
    panel = torch.stack(columns, 1).flatten(0, 1)
    png = save_grid(panel, out / "guidance_panel.png", nrow=len(columns), scale=3)
    return [png], "Columns left to right: " + ", ".join(methods) + ".\n\n" + "\n".join(lines)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gallery-out")
    out.mkdir(parents=True, exist_ok=True)
    print(run(out)[1])
