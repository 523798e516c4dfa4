"""``diffusolve bench devices``: throughput, loop overhead, precision and device agreement.

For the bundled ``digits`` model at batch ``B`` (default 256) with one solver and step
count, on the CPU and, when present, on CUDA:

* ``bare``: the network alone (``unet(x, t, labels)``) called exactly as many times as the
  solve evaluates it; ``loop``: :func:`diffusolve.sample` (solver, grid, x0 conversion,
  output checks); the loop overhead is ``loop / bare - 1`` in percent;
* ``bf16``: the same solve with a bfloat16 network and a float32 state, and its relative L2
  distance to the float32 samples;
* ``compile`` (``--compile``): the network through ``torch.compile``; the first call
  (compilation included) is reported separately from the warm time;
* ``gmm``: a 64-d, 16-component Gaussian mixture (exact denoiser) sampled on the device;
* CUDA against CPU: relative L2 distance of the samples of the same starts (float32).

Writes ``DIR/devices.json`` and ``DIR/devices.md``. ``scripts/gpu_check.py`` runs it.
Timings are the best of ``--repeats`` runs after one warm-up; CUDA times are synchronised.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["run_devices", "main", "add_arguments"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn: Any, device: torch.device, repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up (kernel selection, allocator)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _digits(device: torch.device, args: argparse.Namespace, dtype: torch.dtype) -> Any:
    from ..models import load

    model = load("digits", dtype=dtype)
    model.model.unet.to(device)
    return model


def _device_run(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure on one device."""
    from ..models import GaussianMixture
    from ..models.precision import compile_network
    from ..process import ddpm, make_grid
    from ..solvers import get_solver, sample

    b, steps = args.batch, args.steps
    solver = get_solver(args.solver)
    model = _digits(device, args, torch.float32)
    proc = model.process
    x = proc.prior_sample((b, 1, 16, 16), noise=args.seed).to(device)
    cond = (torch.arange(b) % 10).to(device)
    grid = make_grid(proc, steps, solver.natural_grid)
    stats: dict[str, Any] = {}
    rec: dict[str, Any] = {"device": str(device), "batch": b, "steps": steps}

    def loop(m: Any = model, **kw: Any) -> torch.Tensor:
        with torch.no_grad():
            return sample(m, x, grid, solver, cond=cond, stats=stats, **kw)

    t_loop, ref = _best(loop, device, args.repeats)
    nfe = int(stats["nfe"])
    unet = model.model.unet
    times = grid.tolist()

    def bare() -> torch.Tensor:
        with torch.no_grad():
            out = x
            for i in range(nfe):
                t = torch.full((b,), times[min(i, len(times) - 1)], device=device)
                out = unet(x, t, class_labels=cond, return_dict=False)[0]
            return out

    t_bare, _ = _best(bare, device, args.repeats)
    rec.update(
        nfe=nfe,
        bare_s=t_bare,
        loop_s=t_loop,
        loop_overhead_pct=100.0 * (t_loop / t_bare - 1.0),
        bare_samples_per_s=b / t_bare,
        loop_samples_per_s=b / t_loop,
    )
    half = _digits(device, args, torch.bfloat16)
    t_half, out_half = _best(lambda: loop(half), device, args.repeats)
    rec.update(
        bf16_loop_s=t_half,
        bf16_samples_per_s=b / t_half,
        bf16_finite=bool(torch.isfinite(out_half).all()),
        bf16_rel_l2=_rel(out_half, ref),
    )
    if args.compile:
        fast = compile_network(model)
        t0 = time.perf_counter()
        first = loop(fast)
        _sync(device)
        t_first = time.perf_counter() - t0
        t_fast, first = _best(lambda: loop(fast), device, args.repeats)
        net = fast.model.unet
        rec.update(
            compile_first_call_s=t_first,
            compile_loop_s=t_fast,
            compile_samples_per_s=b / t_fast,
            compile_speedup=t_loop / t_fast,
            compile_rel_l2=_rel(first, ref),
            compile_fell_back=bool(getattr(net, "failed", None)),
        )
    gmm = GaussianMixture.random(64, 16, process=ddpm(), seed=args.seed).to(device=device)
    xg = gmm.process.prior_sample((b, 64), noise=args.seed, dtype=torch.float64).to(device)
    t_gmm, out_gmm = _best(
        lambda: sample(gmm, xg, steps, "dpmpp_2m", final="zero"), device, args.repeats
    )
    rec.update(gmm_s=t_gmm, gmm_samples_per_s=b / t_gmm)
    rec["_samples"] = {"digits": ref.cpu(), "gmm": out_gmm.cpu()}
    return rec


def run_devices(args: argparse.Namespace) -> dict[str, Any]:
    """Run on the CPU and on CUDA when available; returns the JSON-able summary."""
    torch.manual_seed(args.seed)
    devices = [torch.device("cpu")]
    cuda = torch.cuda.is_available() and not args.no_cuda
    if cuda:
        devices.append(torch.device("cuda"))
    runs = [_device_run(d, args) for d in devices]
    summary: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if cuda else None,
        "solver": args.solver,
        "runs": [],
    }
    samples = [r.pop("_samples") for r in runs]
    summary["runs"] = runs
    if cuda:
        summary["cuda_vs_cpu_rel_l2"] = {
            k: _rel(samples[1][k], samples[0][k]) for k in ("digits", "gmm")
        }
    return summary


def _markdown(s: dict[str, Any]) -> str:
    lines = [
        "# bench devices",
        "",
        f"torch {s['torch']}, {s['cpu_threads']} CPU threads, CUDA: "
        + (s["cuda"] or "none (CPU figures only)")
        + f"; solver {s['solver']}.",
        "",
        "| device | batch | NFE | bare net samples/s | loop samples/s | loop overhead | "
        "bf16 samples/s | bf16 rel L2 | compile samples/s | compile first call | "
        "GMM samples/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["runs"]:
        comp = f"{r['compile_samples_per_s']:.1f}" if "compile_samples_per_s" in r else "-"
        if r.get("compile_fell_back"):
            comp += " (eager fallback)"
        first = f"{r['compile_first_call_s']:.1f} s" if "compile_first_call_s" in r else "-"
        lines.append(
            f"| {r['device']} | {r['batch']} | {r['nfe']} | {r['bare_samples_per_s']:.1f} | "
            f"{r['loop_samples_per_s']:.1f} | {r['loop_overhead_pct']:+.1f} % | "
            f"{r['bf16_samples_per_s']:.1f} | {r['bf16_rel_l2']:.2e} | {comp} | {first} | "
            f"{r['gmm_samples_per_s']:.1f} |"
        )
    if "cuda_vs_cpu_rel_l2" in s:
        agree = s["cuda_vs_cpu_rel_l2"]
        lines += [
            "",
            f"CUDA vs CPU, same starts: relative L2 {agree['digits']:.2e} (digits, float32), "
            f"{agree['gmm']:.2e} (GMM, float64).",
        ]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", default="bench-out", help="devices.json/.md here")
    p.add_argument("--batch", type=int, default=256, help="samples per batch (default 256)")
    p.add_argument("--steps", type=int, default=10, help="grid steps (default 10)")
    p.add_argument("--solver", default="dpmpp_2m", help="solver (default dpmpp_2m)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs, best kept (default 3)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--no-cuda", action="store_true", help="CPU only even with CUDA")
    p.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.steps < 1 or args.repeats < 1:
        raise ValueError("--batch, --steps and --repeats must be positive")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = run_devices(args)
    (out / "devices.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = _markdown(summary)
    (out / "devices.md").write_text(text)
    print(text, end="")
    print(f"wrote {out / 'devices.json'} and {out / 'devices.md'}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m diffusolve.bench.devices")
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
