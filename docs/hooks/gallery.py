"""MkDocs hook: run the gallery examples at build time and make the Gallery page.

Every ``examples/*.py`` with a ``run(out)`` function is imported and run once per build
(each takes a few seconds on one CPU core); the figures it writes are added to the site as
generated files and ``gallery/index.md`` is written from the module docstrings, the
figures, the Markdown each run returns and the source. Nothing in the gallery is pasted by
hand: a figure exists only because its example ran in this build. A failing example fails
the build.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import time
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.gallery")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
_tmp: tempfile.TemporaryDirectory | None = None


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_gallery_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section(path: Path, out: Path, files, config) -> tuple[str, float]:
    module = _load(path)
    doc = (module.__doc__ or path.stem).strip().splitlines()
    title, body = doc[0].strip(), "\n".join(doc[1:]).strip()
    t0 = time.perf_counter()
    figures, notes = module.run(out)
    seconds = time.perf_counter() - t0
    md = [f"## {title}", "", body, ""]
    for fig in figures:
        fig = Path(fig)
        uri = f"gallery/{fig.name}"
        files.append(File.generated(config, uri, abs_src_path=str(fig)))
        md += [f"![{title}]({fig.name})", ""]
    md += [notes, ""]
    md += [f"*Made by `examples/{path.name}` in this build ({seconds:.1f} s).*", ""]
    source = path.read_text().rstrip("\n")
    md += [f'??? example "Source: examples/{path.name}"', "", "    ```python"]
    md += [("    " + line) if line else "" for line in source.splitlines()]
    md += ["    ```", ""]
    return "\n".join(md), seconds


def on_files(files, config):
    global _tmp
    import torch

    _tmp = tempfile.TemporaryDirectory(prefix="diffusolve-gallery-")
    out = Path(_tmp.name)
    torch.manual_seed(0)
    # the examples are small: one intra-op thread is as fast and does not thrash a shared CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    scripts = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
    parts, total = [], 0.0
    for path in scripts:
        text, seconds = _section(path, out, files, config)
        log.info(f"gallery: examples/{path.name} ran in {seconds:.1f} s")
        parts.append(text)
        total += seconds
    torch.set_num_threads(threads)
    head = [
        "# Gallery",
        "",
        "Every figure and table on this page was made while this site was built, by running "
        f"the {len(scripts)} scripts in `examples/` (in all {total:.0f} s on the build "
        "machine's CPU). Each section shows its script; run one yourself with "
        "`python examples/<name>.py OUT_DIR`.",
        "",
    ]
    files.append(File.generated(config, "gallery/index.md", content="\n".join(head + parts)))
    files.append(File.generated(config, "algorithms/registry.md", content=_registry_page()))
    return files


def _registry_page() -> str:
    """The solver registry as a table, generated from the code (as the README's is)."""
    from diffusolve.solvers.table import solver_table

    return "\n".join(
        [
            "# Solver registry",
            "",
            "Generated from `diffusolve.solvers` while this site was built (the same table as "
            "`diffusolve solvers --markdown`). *order* is the global order of the "
            "deterministic solve, checked by fitting log(error) against log(NFE) on the "
            "exact Gaussian ODE; *grid* is the natural grid an int number of steps uses.",
            "",
            solver_table(markdown=True),
            "",
        ]
    )


def on_post_build(config):
    global _tmp
    if _tmp is not None:
        _tmp.cleanup()
        _tmp = None
