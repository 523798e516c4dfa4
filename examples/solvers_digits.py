"""Solvers on the bundled digits model

The bundled class-conditional digits model (classifier-free guidance 2.0) sampled from the
same starting noise by four deterministic solvers at 10 network evaluations each. Rows are
solvers, columns the classes 0-9; every row uses the same per-sample seeds, so columns are
comparable.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

SOLVERS = ("ddim", "dpmpp_2m", "unipc_bh2_2", "deis_tab3")
NFE = 10


def run(out: Path) -> tuple[list[Path], str]:
    from diffusolve import get_solver, load, sample, steps_for_nfe
    from diffusolve.images import save_grid
    from diffusolve.process import make_grid

    model = load("digits", guidance=2.0)
    proc = model.process
    labels = torch.arange(10)
    xT = proc.prior_sample((10, 1, 16, 16), noise=list(range(10)))
    rows, lines = [], ["| solver | steps | NFE | seconds |", "|---|---|---|---|"]
    for name in SOLVERS:
        solver = get_solver(name)
        steps = steps_for_nfe(solver, NFE)
        grid = make_grid(proc, steps, solver.natural_grid)
        t0 = time.perf_counter()
        stats: dict = {}
        with torch.no_grad():
            rows.append(sample(model, xT, grid, solver, cond=labels, stats=stats))
        lines.append(f"| `{name}` | {steps} | {stats['nfe']} | {time.perf_counter() - t0:.2f} |")
    png = save_grid(torch.cat(rows), out / "solvers_digits.png", nrow=10, scale=3)
    return [png], "Rows top to bottom: " + ", ".join(
        f"`{s}`" for s in SOLVERS
    ) + ".\n\n" + "\n".join(lines)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gallery-out")
    out.mkdir(parents=True, exist_ok=True)
    print(run(out)[1])
