import re
from pathlib import Path

import pytest
import torch

import diffusolve
from diffusolve.solvers.table import update_readme

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_solver_table_is_current():
    assert update_readme(str(README), check=True), (
        "README solver table is stale: run `python -m diffusolve.solvers.table README.md`"
    )


def test_readme_starts_with_the_two_commands():
    lines = [l for l in README.read_text().splitlines() if l.strip()]
    assert lines[1] == "```bash"
    assert lines[2].startswith("make demo") and lines[3].startswith("make test")


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_network_example_runs():
    """The from_callable example wraps a real nn.Module and samples from it (the cheap
    block; the quickstart's exact reference is in the slow test below)."""
    block = next(b for b in _python_blocks() if "from_callable" in b)
    namespace = {"torch": torch, "diffusolve": diffusolve}
    exec(compile(block, "README.md", "exec"), namespace)
    assert isinstance(namespace["model"].fn, torch.nn.Module)
    assert namespace["x"].shape == (16, 3, 32, 32) and torch.isfinite(namespace["x"]).all()


@pytest.mark.slow
def test_readme_python_examples_run():
    """Every python block of the README runs as written, in order, in one namespace
    (the quickstart solves a 1,000-sample exact reference: about a minute on 2 cores)."""
    blocks = _python_blocks()
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert float(namespace["rel_error"](namespace["x0"], namespace["exact"])) < 0.1
