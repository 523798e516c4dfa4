"""Error against an exact reference

A 25-component Gaussian mixture in 2-D on the DDPM linear process: its denoiser is known in
closed form, and the probability-flow ODE endpoint of each start is solved to ~1e-10
(DOP853 in float64). Each solver starts from the same noise; the plot gives its relative
error against that endpoint as the number of network evaluations (NFE) grows. The slope is
the solver's global order.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

SOLVERS = ("ddim", "heun", "dpmpp_2m", "dpmpp_3m", "unipc_bh2_2", "deis_tab3")
NFES = (5, 10, 20, 40)


def run(out: Path) -> tuple[list[Path], str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusolve import get_solver, sample, steps_for_nfe
    from diffusolve.metrics import rel_error
    from diffusolve.models import GaussianMixture
    from diffusolve.process import ddpm, make_grid

    proc = ddpm("linear")
    gmm = GaussianMixture.random(2, 25, process=proc, seed=0)
    xT = proc.prior_sample((128, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = gmm.reference(xT, proc.t_max, proc.t_min)
    curves = {}
    for name in SOLVERS:
        solver = get_solver(name)
        errs = []
        for nfe in NFES:
            grid = make_grid(proc, steps_for_nfe(solver, nfe), solver.natural_grid)
            errs.append(float(rel_error(sample(gmm, xT, grid, solver), exact)))
        curves[name] = errs
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for name, errs in curves.items():
        ax[0].loglog(NFES, errs, marker="o", label=name)
    ax[0].set_xticks(list(NFES), [str(k) for k in NFES])
    ax[0].minorticks_off()
    ax[0].set_xlabel("NFE")
    ax[0].set_ylabel("relative error vs exact endpoint")
    ax[0].grid(True, which="both", alpha=0.3)
    ax[0].legend(fontsize=7)
    data = gmm.sample(2000, torch.Generator().manual_seed(1))
    solver = get_solver("dpmpp_3m")
    x = sample(gmm, xT, make_grid(proc, steps_for_nfe(solver, 10), "logsnr"), solver)
    ax[1].scatter(data[:, 0], data[:, 1], s=2, alpha=0.3, label="exact data samples")
    ax[1].scatter(x[:, 0], x[:, 1], s=4, label="dpmpp_3m, NFE 10")
    ax[1].legend(fontsize=7)
    ax[1].set_title("the mixture and 128 solver samples")
    fig.tight_layout()
    png = out / "exact_error.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    lines = ["| solver | " + " | ".join(f"NFE {k}" for k in NFES) + " |"]
    lines.append("|---" * (len(NFES) + 1) + "|")
    for name, errs in curves.items():
        lines.append(f"| `{name}` | " + " | ".join(f"{e:.2e}" for e in errs) + " |")
    return [png], "Mean relative error over 128 starts:\n\n" + "\n".join(lines)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gallery-out")
    out.mkdir(parents=True, exist_ok=True)
    print(run(out)[1])
