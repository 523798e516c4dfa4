"""``diffusolve bench accel``: quantization, feature caching and few-step models against the
float digits model, in quality and in CPU speed.

Every method (:mod:`.accel_methods`) samples class labels ``i % 10`` on the bundled digits
model (or a few-step model distilled from it). Measured per method:

* **FD-digits** of ``N`` samples (1,000; quick 100) against the held-out digits, next to
  the real-vs-real floor at the same ``N`` (:func:`~diffusolve.models.fd_digits_noise_floor`)
  and as a ratio to the float baseline's FD;
* **class agreement under guidance**: classifier-free guidance at scale 2 on the method
  (100 samples; quick 20), the fraction the bundled noise-aware classifier (at ``t = 0``)
  assigns to the target label (the independent judge classifier's figure is in the
  records);
* **CPU time per sample** (``time.process_time`` of one batch of 16, quick 8, on the
  conditional model), the median of 3 repeats. All methods are timed by **one job**, in one
  process, interleaved round by round, after a warm-up batch each, so the baseline and
  every method share the machine's state; the speed-up is ``t_baseline / t_method`` of that
  job. A resumed run never mixes timings of two runs;
* **size on disk**: bytes of the saved weights (the float UNet as safetensors,
  ``save_quantized``'s safetensors, ``torch.save`` of the dynamic int8 state dict, a
  few-step model's folder);
* **peak memory**: the network's tensors in memory plus the peak growth of the process's
  resident set while one timing batch ran (Linux ``VmHWM`` after a reset through
  ``/proc/self/clear_refs``, the C heap trimmed first); measured in the timing job;
* **NFE**: the network calls the solve really made.

The full run also measures ``int8-pt2e``, the real int8 CPU program of
:func:`~diffusolve.accel.quant.real_int8` (torchao PT2E, TDAC calibration): it is compiled
once per batch shape (minutes each on one thread), so the quick run leaves it out and a
machine without torchao records it as missing.

The teacher's best solver for NFE 5, 10 and 50 is chosen among ``dpmpp_2m``,
``unipc_bh2_2`` and ``dpm_solver_3m`` by FD-digits at NFE 10 on **separate starts** (seed
``+ 500000``), not on the reported samples. Goals (issue 12): W8A8 within 10 % of the float FD-digits; caching
at >= 1.5x speed-up with FD-digits within 10 %; a distilled model at NFE 2 with FD-digits no
worse than the teacher's best at NFE 10.

Example:
    >>> [m.name for m in methods(None)][:3]
    ['float', 'w8a8-uniform', 'w8a8-ptq4dm']
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .accel_methods import (
    REAL_INT8,
    SOLVER,
    STEPS,
    TEACHER_NFES,
    TEACHER_SOLVERS,
    Method,
    MissingWeights,
    disk_bytes,
    finite,
    generate,
    methods,
    speed_runner,
)
from .distributed import open_store, run_jobs_distributed
from .runner import Job

__all__ = [
    "BENCH",
    "KEY_FIELDS",
    "QUICK",
    "FULL",
    "GUIDANCE",
    "jobs",
    "rows",
    "tables",
    "goals",
    "plots",
    "run_accel",
    "markdown_report",
    "plot_results",
    "methods",
]

BENCH = "accel"
KEY_FIELDS = ("bench", "phase", "task", "method", "setting")
TASK = "digits"
GUIDANCE = 2.0
#: seed offset of the solver-selection starts (disjoint from the reported starts)
SELECT_OFFSET = 500_000
SELECT_NFE = 10
QUICK = {
    "n_fd": 100,
    "n_agree": 20,
    "n_select": 50,
    "batch": 8,
    "repeats": 3,
    "n_traj": 32,
    "n_cal": 256,
    "recon_iters": 10,
    "real_int8": False,
}
FULL = {
    "n_fd": 1000,
    "n_agree": 100,
    "n_select": 200,
    "batch": 16,
    "repeats": 3,
    "n_traj": 64,
    "n_cal": 1024,
    "recon_iters": 100,
    "real_int8": True,
}


def settings(quick: bool, seed: int) -> dict[str, Any]:
    return {**(QUICK if quick else FULL), "seed": int(seed)}


def _key(phase: str, method: str, setting: str) -> dict[str, Any]:
    return {"bench": BENCH, "phase": phase, "task": TASK, "method": method, "setting": setting}


@lru_cache(maxsize=1)
def _classifiers() -> dict[str, Any]:
    from ..models import load_classifier
    from ..models.clean_classifier import load_judge_classifier

    return {"bundled": load_classifier(), "judge": load_judge_classifier()}


def _agreement(x: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict[str, float]:
    """Fractions of ``x`` whose class by the bundled noise-aware classifier (at ``t = 0``)
    and by the judge classifier is the target label."""
    c = _classifiers()
    x = x.clamp(-1, 1).float()
    with torch.no_grad():
        bundled = (c["bundled"](x, torch.tensor(0.0)).argmax(1) == labels).float().mean()
        judge = (c["judge"](x).argmax(1) == labels).float().mean()
    return {
        f"{prefix}_bundled": round(float(bundled), 6),
        f"{prefix}_judge": round(float(judge), 6),
    }


def _measure(m: Method, cfg: dict[str, Any]) -> dict[str, Any]:
    from ..models import fd_digits

    info = {"label": m.label, "family": m.family, "solver": m.solver, "steps": m.steps}
    info["option"] = m.option
    if m.name == "w8a8-edadm":
        info["recon_iters"] = cfg["recon_iters"]
    seed = cfg["seed"]
    try:
        cpu = time.process_time()
        x, nfe = generate(m, cfg["n_fd"], seed, cfg)
        cpu = (time.process_time() - cpu) / cfg["n_fd"]
        g, nfe_g = generate(m, cfg["n_agree"], seed, cfg, guidance=GUIDANCE)
    except MissingWeights as e:
        return {**info, "status": "missing", "message": str(e)}
    size, what = disk_bytes(m, cfg)
    if not torch.isfinite(x).all():
        raise RuntimeError(f"{m.label}: non-finite samples")
    return {
        **info,
        "status": "ok",
        "nfe": int(nfe),
        "n": cfg["n_fd"],
        "fd": round(fd_digits(x.clamp(-1, 1).float()), 6),
        "guidance": GUIDANCE,
        "n_agree": cfg["n_agree"],
        "nfe_guided": int(nfe_g),
        **_agreement(g, torch.arange(cfg["n_agree"]) % 10, "agree"),
        **_agreement(x, torch.arange(cfg["n_fd"]) % 10, "cond_agree"),
        "disk_bytes": int(size),
        "disk_what": what,
        "timing": {"fd_run_cpu_s_per_sample": cpu},
    }


def _select(solver: str, cfg: dict[str, Any]) -> dict[str, Any]:
    from ..models import fd_digits
    from .accel_methods import steps_for_nfe

    steps = steps_for_nfe(solver, SELECT_NFE)
    m = Method("teacher", f"nfe={SELECT_NFE}", "float", solver, steps)
    x, nfe = generate(m, cfg["n_select"], cfg["seed"] + SELECT_OFFSET, cfg)
    return {
        "solver": solver,
        "steps": steps,
        "nfe": int(nfe),
        "n": cfg["n_select"],
        "fd": round(fd_digits(x.clamp(-1, 1).float()), 6),
    }


def chosen_solver(records: list[dict[str, Any]]) -> str | None:
    """The teacher solver with the lowest selection FD (ties: registry order)."""
    sel = [r for r in records if r.get("phase") == "select" and finite(r.get("fd"))]
    if not sel:
        return None
    order = {s: i for i, s in enumerate(TEACHER_SOLVERS)}
    return min(sel, key=lambda r: (r["fd"], order.get(r["solver"], 99)))["solver"]


FAMILIES = ("teacher", "quant", "cache", "fewstep")


def check_methods(selected: list[str] | None) -> list[str] | None:
    """The method names to run for ``--methods`` (names or the families ``teacher``,
    ``quant``, ``cache``, ``fewstep``); the float baseline is always run, since every ratio
    is taken against it in the same run. ``None``: every method."""
    if selected is None:
        return None
    catalogue = methods("dpmpp_2m", real_int8=True)
    known = {m.name for m in catalogue}
    out = {"float"}
    for name in selected:
        if name in FAMILIES:
            fam = "float" if name == "teacher" else name
            out |= {m.name for m in catalogue if m.family == fam}
        elif name in known:
            out.add(name)
        else:
            raise ValueError(
                f"unknown method {name!r}; choose from {', '.join(FAMILIES)} or "
                f"{', '.join(sorted(known))}"
            )
    return [m for m in dict.fromkeys(m.name for m in catalogue) if m in out]


def jobs(quick: bool, seed: int, store: Any = None, only: set[str] | None = None) -> Iterator[Job]:
    """The FD floor at ``N``, the solver selection, every method, then the timing job over
    every method. The teacher's NFE points are built after the selection jobs, from their
    records in ``store`` (the runner finishes a job before it asks for the next); without a
    store they are left out. ``only``: keep these method names (:func:`check_methods`)."""
    from ..models import fd_digits_noise_floor

    cfg = settings(quick, seed)
    n = cfg["n_fd"]
    yield Job(
        _key("floor", "fd-floor", f"n={n}"),
        lambda store: {"n": n, "fd": round(fd_digits_noise_floor(n, seed), 6)},
        label=f"FD-digits floor n={n}",
    )
    sel_keys = []
    if only is None or "teacher" in only:
        for solver in TEACHER_SOLVERS:
            k = _key("select", "teacher-select", f"{solver}/nfe={SELECT_NFE}")
            sel_keys.append(k)
            yield Job(k, lambda store, s=solver: _select(s, cfg), label=f"select {solver}")
    selected = [store.get(k) for k in sel_keys] if store is not None else []
    teacher = chosen_solver([r for r in selected if r is not None])
    real = cfg.get("real_int8", False) or (only is not None and REAL_INT8 in only)
    catalogue = methods(teacher, real_int8=real)
    todo = [m for m in catalogue if only is None or m.name in only]
    for m in todo:
        yield Job(
            _key("method", m.name, m.setting), lambda store, m=m: _measure(m, cfg), label=m.label
        )
    speed = speed_runner(todo, cfg["batch"], cfg["repeats"], seed, cfg)
    yield Job(
        _key("speed", "all", f"batch={cfg['batch']}"),
        lambda store: {
            "methods": [f"{m.name}|{m.setting}" for m in todo],
            "batch": cfg["batch"],
            "repeats": cfg["repeats"],
            "timing": {"methods": speed()},
        },
        label=f"CPU time and memory of {len(todo)} methods, batch {cfg['batch']}",
    )


# ----------------------------------------------------------------------------- report


def _speed(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    sp = [r for r in records if r.get("phase") == "speed"]
    return dict(sp[-1].get("timing", {}).get("methods", {})) if sp else {}


def rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method record, grouped by family (float, quant, cache, few-step; a
    resumed run's new rows join their family), in record order within a family: the
    method's figures joined with the
    FD floor, the baseline's FD, and the timing job's speed-up (``t_baseline / t_method``,
    both from that one job) and memory. Missing methods keep their message."""
    floor = next((r for r in records if r.get("phase") == "floor"), None)
    speed = _speed(records)
    base = next(
        (r for r in records if r.get("phase") == "method" and r.get("method") == "float"), None
    )
    base_fd = base.get("fd") if base else None
    t_base = speed.get(f"float|{base['setting']}", {}).get("cpu_s_per_sample") if base else None
    out = []
    for r in records:
        if r.get("phase") != "method":
            continue
        row = dict(r)
        row["floor"] = floor["fd"] if floor and floor.get("n") == r.get("n") else None
        s = speed.get(f"{r['method']}|{r['setting']}", {})
        t = s.get("cpu_s_per_sample")
        row["cpu_s_per_sample"] = t
        row["speedup"] = t_base / t if finite(t_base) and finite(t) and t > 0 else None
        row["peak_rss_growth"] = s.get("peak_rss_growth")
        row["model_bytes"] = s.get("model_bytes")
        ok = r.get("status") == "ok"
        row["fd_ratio"] = r["fd"] / base_fd if ok and finite(base_fd) and base_fd > 0 else None
        out.append(row)
    families = ("float", "quant", "cache", "fewstep")
    out.sort(key=lambda r: families.index(r["family"]) if r.get("family") in families else 4)
    _notes(out)
    return out


def _simpler(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether ``b`` is simpler than ``a``: a float solver point is simpler than any
    compressed method; within a family the lower rank (a float point: fewer NFE)."""
    if b is a or b.get("status") != "ok":
        return False
    if b["family"] == "float" and a["family"] != "float":
        return True
    if b["family"] == "float" and a["family"] == "float":
        return b["nfe"] < a["nfe"]
    from .accel_methods import CACHE, QUANT

    rank = {**{k: v[-1] for k, v in QUANT.items()}, **{k: v[-1] for k, v in CACHE.items()}}
    rank["int8-dynamic"] = 0
    rank[REAL_INT8] = 1
    if a["family"] == b["family"] and a["family"] in ("quant", "cache"):
        return rank.get(b["method"], 0) < rank.get(a["method"], 0)
    if a["family"] == b["family"] == "fewstep":
        return a["method"] == b["method"] and b["nfe"] < a["nfe"]
    return False


def _notes(table: list[dict[str, Any]]) -> None:
    """``row["note"]``: the fastest simpler method that is at least as fast at an FD no worse
    (where this method loses to a simpler one)."""
    for a in table:
        a["note"] = ""
        if a.get("status") != "ok":
            a["note"] = "weights missing: " + str(a.get("message", ""))
            continue
        if not finite(a.get("speedup")):
            continue
        beat = [
            b
            for b in table
            if _simpler(a, b)
            and finite(b.get("speedup"))
            and b["speedup"] >= a["speedup"]
            and b["fd"] <= a["fd"]
        ]
        if beat:
            b = max(beat, key=lambda b: (b["speedup"], -b["fd"]))
            a["note"] = (
                f"loses to {b['label']}: {b['speedup']:.2f}x at FD {b['fd']:.3f} (faster at "
                "lower FD)"
            )


def _pct(ratio: float) -> str:
    """A ratio to the float FD as a signed percentage, e.g. ``+10.01 %``."""
    return f"{100 * (ratio - 1):+.2f} %"


def _mb(v: Any) -> str:
    return f"{v / 2**20:.2f}" if finite(v) and v >= 0 else "–"


def _f(v: Any, fmt: str) -> str:
    return format(v, fmt) if finite(v) else "–"


def tables(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The methods table and the teacher-solver selection."""
    table = rows(records)
    lines = [
        "| method | NFE | FD-digits | floor | FD / float | agreement cond. / CFG 2 | speed-up | "
        "size (MB) | peak memory (MB) | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | – | missing | – | – | – | – | – | – | {r['note']} |")
            continue
        mem = None
        if finite(r.get("peak_rss_growth")) and finite(r.get("model_bytes")):
            mem = r["peak_rss_growth"] + r["model_bytes"]
        elif finite(r.get("peak_rss_growth")):
            mem = r["peak_rss_growth"]
        lines.append(
            f"| {r['label']} | {r['nfe']} | {r['fd']:.3f} | {_f(r['floor'], '.3f')} | "
            f"{_f(r['fd_ratio'], '.3f')} | {100 * r['cond_agree_bundled']:.1f} / "
            f"{100 * r['agree_bundled']:.1f} % | "
            f"{_f(r['speedup'], '.2f')}x | {_mb(r['disk_bytes'])} | {_mb(mem)} | {r['note']} |"
        )
    speed = [r for r in records if r.get("phase") == "speed"]
    batch = speed[-1]["batch"] if speed else "?"
    reps = speed[-1]["repeats"] if speed else "?"
    n = next((r["n"] for r in table if r.get("status") == "ok"), "?")
    n_agree = next((r["n_agree"] for r in table if r.get("status") == "ok"), "?")
    note = (
        f"\n\nFD-digits of {n} samples (labels i % 10) against held-out digits; floor = real "
        f"digits at the same n. Agreement: the bundled noise-aware classifier at t = 0 vs the "
        f"target label, on the {n} conditional samples / on {n_agree} samples at CFG scale "
        f"{GUIDANCE:g} (the judge classifier's figures are in the records). Speed-up = CPU time per "
        f"sample of the float baseline / the method's, medians of {reps} interleaved repeats "
        f"of a batch of {batch} in one job of this run. Size = bytes of the saved weights. "
        "Peak memory = the network's tensors in memory + the median over the rounds of the "
        "peak resident-set growth while one batch sampled (VmHWM after a reset via "
        "/proc/self/clear_refs). Fake-quant "
        "methods simulate int8 arithmetic in float32: their speed is not that of an int8 "
        "kernel."
    )
    recon = next((r["recon_iters"] for r in table if "recon_iters" in r), None)
    if recon is not None:
        note += (
            f" w8a8-edadm: TDAC calibration + EDA-DM block reconstruction, {recon} iterations "
            "per block (the library default is 300, the paper's thousands)."
        )
    out = [("Acceleration on digits: quality, speed, size, memory", "\n".join(lines) + note)]
    sel = [r for r in records if r.get("phase") == "select"]
    if sel:
        best = chosen_solver(records)
        s = ["| solver | steps | NFE | FD-digits | chosen |", "|---|---|---|---|---|"]
        for r in sel:
            mark = "yes" if r["solver"] == best else ""
            s.append(f"| {r['solver']} | {r['steps']} | {r['nfe']} | {r['fd']:.3f} | {mark} |")
        text = "\n".join(s) + (
            f"\n\nFD-digits of {sel[0]['n']} samples from separate starts (seed + "
            f"{SELECT_OFFSET}); the chosen solver runs the teacher's NFE "
            f"{', '.join(map(str, TEACHER_NFES))} points."
        )
        out.append((f"Teacher solver selection at NFE {SELECT_NFE}", text))
    return out


GOALS = (
    "W8A8 within 10 % of the float FD-digits",
    "caching at >= 1.5x speed-up with FD-digits within 10 %",
    "a distilled model at NFE 2 with FD-digits no worse than the teacher's best at NFE 10",
)


def goals(records: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """The issue's three goals: (text, met, the measured figures)."""
    table = rows(records)
    ok = [r for r in table if r.get("status") == "ok"]
    base = next((r for r in ok if r["method"] == "float"), None)
    out: list[tuple[str, bool, str]] = []
    if base is None:
        return [(g, False, "no float baseline record") for g in GOALS]
    w8 = [r for r in ok if r["method"].startswith("w8a8")]
    figs = ", ".join(f"{r['method']} {r['fd']:.3f} ({_pct(r['fd_ratio'])})" for r in w8)
    met = any(r["fd"] <= 1.1 * base["fd"] for r in w8)
    out.append((GOALS[0], met, f"float FD {base['fd']:.3f}; {figs or 'no W8A8 records'}"))
    cache = [r for r in ok if r["family"] == "cache"]
    good = [
        r
        for r in cache
        if finite(r["speedup"]) and r["speedup"] >= 1.5 and r["fd"] <= 1.1 * base["fd"]
    ]
    figs = ", ".join(
        f"{r['method']} {_f(r['speedup'], '.2f')}x at FD {r['fd']:.3f} ({_pct(r['fd_ratio'])})"
        for r in cache
    )
    out.append((GOALS[1], bool(good), figs or "no caching records"))
    teacher = [r for r in ok if r["method"] == "teacher" and r["setting"] == "nfe=10"]
    few = [r for r in table if r["family"] == "fewstep" and r["setting"] == "nfe=2"]
    if not teacher:
        out.append((GOALS[2], False, "no teacher NFE 10 record"))
    else:
        t = teacher[0]
        parts, met = [], False
        for r in few:
            if r.get("status") != "ok":
                parts.append(f"{r['method']}: weights missing")
                continue
            met |= r["fd"] <= t["fd"]
            parts.append(f"{r['method']} FD {r['fd']:.3f}")
        figs = f"teacher {t['solver']} NFE 10 FD {t['fd']:.3f}; " + (
            "; ".join(parts) or "no few-step records"
        )
        out.append((GOALS[2], met, figs))
    return out


def plots(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """FD-digits against speed-up, one colour per family, the float baseline at 1x."""
    pts = [r for r in rows(records) if r.get("status") == "ok" and finite(r.get("speedup"))]
    if not pts:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"float": "C0", "quant": "C1", "cache": "C2", "fewstep": "C3"}
    fig, ax = plt.subplots(figsize=(7, 5))
    for fam, c in colours.items():
        mine = [r for r in pts if r["family"] == fam]
        if mine:
            ax.scatter([r["speedup"] for r in mine], [r["fd"] for r in mine], c=c, label=fam, s=18)
        for r in mine:
            ax.annotate(r["label"].replace(" (baseline)", ""), (r["speedup"], r["fd"]), fontsize=5)
    floor = next((r for r in records if r.get("phase") == "floor"), None)
    if floor:
        ax.axhline(floor["fd"], color="grey", ls=":", label=f"real digits (n={floor['n']})")
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")  # few-step points at NFE 1 reach ~10x the float FD
    ax.set_xlabel("speed-up over the float baseline (CPU time per sample)")
    ax.set_ylabel("FD-digits (lower is better)")
    ax.set_title(f"Acceleration on digits (baseline {SOLVER}, {STEPS} steps)")
    ax.legend(fontsize=7)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "accel_quality_speed.png"
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return [path]


# ----------------------------------------------------------------------------- entry points


def run_accel(
    *,
    methods: list[str] | None = None,
    quick: bool = False,
    seed: int = 0,
    records: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the bench (``methods``: a subset, :func:`check_methods`; default all); returns
    ``{"meta", "goals", "rows", "records"}``. Every finished job is appended to ``records``
    (JSONL) at once; ``resume=True`` skips the jobs already there (the configuration must
    match)."""
    mode = "resume" if resume else ("overwrite" if overwrite else "new")
    cfg = settings(quick, seed)
    only = check_methods(methods)
    config = {"quick": bool(quick), **cfg, "methods": only}
    store = open_store(records, bench=BENCH, key_fields=KEY_FIELDS, config=config, mode=mode)
    start = time.perf_counter()

    def show(job: Job, record: dict[str, Any], skipped: bool) -> None:
        if progress:
            tag = " (resumed)" if skipped else ""
            what = job.label or str(job.key)
            print(f"[{time.perf_counter() - start:7.1f}s] {what}{tag}", file=sys.stderr)

    run_jobs_distributed(
        jobs(quick, seed, store, None if only is None else set(only)), store, on_record=show
    )
    recs = list(store.records)
    table = rows(recs)
    meta = {
        "bench": BENCH,
        "quick": bool(quick),
        "seed": int(seed),
        "settings": cfg,
        "methods": only or "all",
        "baseline": f"{SOLVER} {STEPS} steps",
        "teacher_solver": chosen_solver(recs),
        "seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
    }
    summary = [
        {
            k: r.get(k)
            for k in (
                "method",
                "setting",
                "label",
                "family",
                "status",
                "message",
                "nfe",
                "fd",
                "floor",
                "fd_ratio",
                "agree_bundled",
                "agree_judge",
                "cond_agree_bundled",
                "cond_agree_judge",
                "speedup",
                "cpu_s_per_sample",
                "disk_bytes",
                "model_bytes",
                "peak_rss_growth",
                "note",
            )
        }
        for r in table
    ]
    gl = [{"goal": t, "met": bool(m), "measured": f} for t, m, f in goals(recs)]
    return {"meta": meta, "goals": gl, "rows": summary, "records": recs}


def markdown_report(result: dict[str, Any]) -> str:
    """The goals, then the tables."""
    meta = result["meta"]
    lines = [
        f"# bench accel{' (quick)' if meta['quick'] else ''}",
        "",
        f"seed {meta['seed']}; baseline {meta['baseline']}; teacher solver "
        f"{meta['teacher_solver']}; {meta['threads']} thread(s); {meta['seconds']} s",
        "",
        "## Goals",
        "",
        "| goal | met | measured |",
        "|---|---|---|",
    ]
    for g in result["goals"]:
        lines.append(f"| {g['goal']} | {'yes' if g['met'] else 'no'} | {g['measured']} |")
    if meta["quick"]:
        lines += [
            "",
            "A quick run checks that every method runs; its FD-digits use so few samples that "
            "the noise floor is close to the differences between methods, so its goal column "
            "and notes are not a ranking. The goals are judged on the full run (`diffusolve "
            "bench accel`, 1,000 samples).",
        ]
    for title, table in tables(result["records"]):
        lines += ["", f"## {title}", "", table.rstrip()]
    return "\n".join(lines)


def plot_results(result: dict[str, Any], out_dir: Path) -> list[Path]:
    return plots(result["records"], Path(out_dir))
