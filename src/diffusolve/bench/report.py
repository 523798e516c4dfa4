"""Tables, summaries and plots for bench results (plain data in, text / PNG out)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["summarize", "markdown_tables", "summary_table", "plot_errors", "fmt"]

LIBRARIES = ("diffusolve", "diffusers")


def fmt(v: float | None, digits: int = 2) -> str:
    """``1.23e-04`` style, ``--`` for missing values."""
    return "--" if v is None else f"{v:.{digits}e}"


def _best(records: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in records if r.get("rel_error") is not None]
    return min(ok, key=lambda r: r["rel_error"]) if ok else None


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task and NFE: our best rel_error, diffusers' best, and ``ratio = ours / diffusers``.

    Example:
        >>> recs = [dict(library="diffusolve", method="a", task="t", nfe=5, rel_error=0.1),
        ...         dict(library="diffusolve", method="b", task="t", nfe=5, rel_error=0.05),
        ...         dict(library="diffusers", method="c", task="t", nfe=5, rel_error=0.2)]
        >>> summarize(recs)[0]["ratio"]
        0.25
    """
    keys = list(dict.fromkeys((r["task"], r["nfe"]) for r in records))
    out = []
    for task, nfe in keys:
        rows = [r for r in records if r["task"] == task and r["nfe"] == nfe]
        ours = _best(r for r in rows if r["library"] == "diffusolve")
        theirs = _best(r for r in rows if r["library"] == "diffusers")
        ratio = None
        if ours is not None and theirs is not None and theirs["rel_error"] > 0:
            ratio = ours["rel_error"] / theirs["rel_error"]
        out.append(
            {
                "task": task,
                "nfe": nfe,
                "ours_method": ours["method"] if ours else None,
                "ours_setting": ours.get("setting") if ours else None,
                "ours_rel_error": ours["rel_error"] if ours else None,
                "diffusers_method": theirs["method"] if theirs else None,
                "diffusers_setting": theirs.get("setting") if theirs else None,
                "diffusers_rel_error": theirs["rel_error"] if theirs else None,
                "ratio": ratio,
            }
        )
    return out


def markdown_tables(result: dict[str, Any]) -> str:
    """One Markdown table per task: rows = methods, columns = NFE; best per library in bold."""
    records = result["records"]
    lines: list[str] = []
    for task, info in result["tasks"].items():
        recs = [r for r in records if r["task"] == task]
        nfes = sorted({r["nfe"] for r in recs})
        lines.append(
            f"### {task}: {info.get('prior')} d={info.get('dim')} K={info.get('n_components')}, "
            f"{info.get('process')}; rel_error (sw_floor={fmt(info.get('sw_floor'))}, "
            f"reference accuracy {fmt(info.get('reference_accuracy'))})"
        )
        lines.append("")
        lines.append("| library | method | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
        lines.append("|---|---|" + "---|" * len(nfes))
        best = {
            (lib, n): _best(r for r in recs if r["library"] == lib and r["nfe"] == n)
            for lib in LIBRARIES
            for n in nfes
        }
        for lib in LIBRARIES:
            for method in dict.fromkeys(r["method"] for r in recs if r["library"] == lib):
                cells = []
                for n in nfes:
                    r = next(
                        (
                            x
                            for x in recs
                            if x["library"] == lib and x["method"] == method and x["nfe"] == n
                        ),
                        None,
                    )
                    v = None if r is None else r["rel_error"]
                    c = fmt(v)
                    if r is not None and best[(lib, n)] is r:
                        c = f"**{c}**"
                    cells.append(c)
                lines.append(f"| {lib} | {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def summary_table(summary: Sequence[dict[str, Any]]) -> str:
    """Markdown: task, NFE, our best, diffusers' best, ratio ours/diffusers."""
    lines = [
        "| task | NFE | ours (best) | rel_error | diffusers (best) | rel_error | ours/diffusers |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        ratio = "--" if s["ratio"] is None else f"{s['ratio']:.3g}"
        lines.append(
            f"| {s['task']} | {s['nfe']} | {s['ours_method'] or '--'} | {fmt(s['ours_rel_error'])} "
            f"| {s['diffusers_method'] or '--'} | {fmt(s['diffusers_rel_error'])} | {ratio} |"
        )
    return "\n".join(lines)


def plot_errors(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """One error-vs-NFE PNG per task (log-log); our solvers solid, diffusers dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in result["tasks"]:
        recs = [r for r in result["records"] if r["task"] == task]
        fig, ax = plt.subplots(figsize=(11, 6))
        nfes = sorted({r["nfe"] for r in recs})
        for lib, style in (("diffusolve", "-"), ("diffusers", "--")):
            for method in dict.fromkeys(r["method"] for r in recs if r["library"] == lib):
                pts = sorted(
                    (r["nfe"], r["rel_error"])
                    for r in recs
                    if r["library"] == lib and r["method"] == method and r["rel_error"] is not None
                )
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.loglog(xs, ys, style, marker="o", ms=3, lw=1, label=f"{method} ({lib})")
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.minorticks_off()
        lo, _ = ax.get_ylim()
        ax.set_ylim(lo, min(ax.get_ylim()[1], 3.0))  # errors above ~1 are divergence
        ax.set_xlabel("NFE")
        ax.set_ylabel("mean relative error to the exact reference (clipped at 3)")
        ax.set_title(f"{task}: solid = diffusolve, dashed = diffusers")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = out / f"samplers_{task}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
