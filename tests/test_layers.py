"""The import graph: imports point down the layers, and no package imports itself in a cycle.

Layers (docs/architecture.md): process < models < solvers < guidance/inverse/sampling <
inversion/compose/analysis < edit < bench/train < the package top (``diffusolve.load``, the
CLI, the demo).
``metrics``, ``images`` and the ``_paths`` and ``_alloc`` helpers import no other diffusolve module, so any
layer may use them. Every import counts, including the ones inside functions (lazy imports
are still dependencies).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "diffusolve"

#: first component below ``diffusolve`` -> layer; a module may import its own layer or lower
LAYERS = {
    "_paths": 0,
    "_alloc": 0,
    "metrics": 0,
    "images": 0,
    "process": 0,
    "models": 1,
    "solvers": 2,
    "guidance": 3,
    "inverse": 3,
    "sampling": 3,
    "accel": 3,
    "kdiff": 3,
    "inversion": 4,
    "compose": 4,
    "analysis": 4,
    "edit": 5,
    "bench": 6,
    "interop": 6,
    "diffusers": 6,
    "train": 6,
    "distributed": 6,
    "loading": 7,
    "demo": 7,
    "sample_cli": 7,
    "restore_cli": 7,
    "boundary_cli": 7,
    "invert_cli": 7,
    "search_cli": 7,
    "cli": 7,
    "__main__": 7,
    "__init__": 7,
}
#: packages that may import no other diffusolve package at all
LEAVES = ("_paths", "_alloc", "metrics", "images")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the diffusolve modules ``path`` imports (anywhere in the file)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "diffusolve"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "diffusolve":
                continue
            for alias in node.names:  # `from pkg import sub` imports the submodule
                sub = SRC.parent.joinpath(*target.split("."), alias.name)
                is_module = sub.with_suffix(".py").is_file() or sub.is_dir()
                out.add(f"{target}.{alias.name}" if is_module else target)
    return out


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        if "assets" in path.parts:
            continue
        graph[_module_name(path)] = _imports(path)
    return graph


GRAPH = _graph()


def test_the_graph_was_read() -> None:
    assert "diffusolve.models.bundled" in GRAPH and "diffusolve.metrics.fd" in GRAPH
    # the parser resolves relative imports, lazy ones included
    assert "diffusolve.models.base" in GRAPH["diffusolve.models.bundled"]


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module: str) -> None:
    comp = _component(module)
    assert comp in LAYERS, f"{module}: add its package {comp!r} to LAYERS"
    up = sorted(
        target
        for target in GRAPH[module]
        if LAYERS.get(_component(target), 99) > LAYERS[comp]
        or (comp in LEAVES and _component(target) != comp)
    )
    assert not up, f"{module} (layer {LAYERS[comp]}) imports higher layers: {up}"


def test_no_cycles_between_packages() -> None:
    edges: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        src = _component(module)
        for t in targets:
            if _component(t) != src:
                edges.setdefault(src, set()).add(_component(t))

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(edges.get(node, ())):
            if nxt in path:
                return path[path.index(nxt) :] + [nxt]
            found = cycle_from(nxt, path + [nxt])
            if found:
                return found
        return None

    for start in sorted(edges):
        cycle = cycle_from(start, [start])
        assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)


def test_train_and_metrics_stay_out_of_models() -> None:
    models = {m: t for m, t in GRAPH.items() if _component(m) == "models"}
    bad = {
        m: sorted(x for x in t if _component(x) in ("train", "guidance", "solvers"))
        for m, t in models.items()
    }
    assert not any(bad.values()), bad


def test_moved_names_point_to_their_new_place() -> None:
    import diffusolve.metrics as metrics
    from diffusolve.models import fd_digits

    assert callable(fd_digits)
    with pytest.raises(ImportError, match="diffusolve.models.fd_digits"):
        metrics.fd_digits  # noqa: B018
    with pytest.raises(ImportError, match="diffusolve.models"):
        exec("from diffusolve.metrics.fd import fd_digits_noise_floor", {})
    from diffusolve.models import load

    with pytest.raises(TypeError, match=r"diffusolve.load\(name, guidance=w\)"):
        load("digits", guidance=2.0)
    # the training package keeps its old names (it may import models)
    from diffusolve.models.data import load_digits
    from diffusolve.train.classifier import load_classifier_from
    from diffusolve.train.data import load_digits as old_load_digits

    assert old_load_digits is load_digits and callable(load_classifier_from)
