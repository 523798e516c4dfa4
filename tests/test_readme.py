from pathlib import Path

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
