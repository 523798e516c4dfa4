#!/usr/bin/env python
"""Plant listed mutations one at a time in a temporary copy of the repository and run the
relevant tests: a mutant the tests fail on is *killed*, one they pass is a *survivor*.

A developer tool, not part of the default test run::

    .venv/bin/python tools/mutate.py                      # every mutation in tools/mutations.toml
    .venv/bin/python tools/mutate.py --package solvers    # one package
    .venv/bin/python tools/mutate.py --only ddim-eta-squared lcm-wrong-time
    .venv/bin/python tools/mutate.py --list               # what is listed, and what is stale
    .venv/bin/python tools/mutate.py --jobs 2 --json mutants.json

Each mutation in the TOML file is ``id``, ``package``, ``file`` (relative to
``src/diffusolve``), ``find`` (an exact source snippet), ``replace`` and optionally
``tests`` (pytest paths or node ids; default: the package's list in ``[tests]``),
``occurrence`` (which match to replace when the snippet occurs more than once; by default
it must occur exactly once) and ``note``. A mutation whose snippet is no longer in the
source is reported as *stale* (the code moved on: update or drop it), never as an error.

How a mutant runs: ``src/``, ``tests/``, ``pyproject.toml`` (and ``README.md`` and the
other top-level files tests may read) are copied once per worker into a temporary
directory; the mutated file is written there, and ``python -m pytest -x -q`` runs in that
directory with ``PYTHONPATH`` pointing at its ``src`` (checked: ``diffusolve`` must import
from the copy). ``/work/main/src`` -- the repository's own source -- is never written.
Before any mutant, the unmutated copy runs every test list once; tests that already fail
there (e.g. during a concurrent rewrite) are deselected for the mutants, so a mutant is
only "killed" by a test that passed without it.

Outcomes: ``killed`` (tests failed), ``survived`` (tests passed), ``timeout`` (counted as
killed: the mutant made a test hang or crawl), ``stale`` and ``ambiguous`` (not run).
The survival rate of a package is ``survived / (killed + timeout + survived)``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LIST = Path(__file__).resolve().parent / "mutations.toml"
COPY_DIRS = ("src", "tests")
COPY_FILES = ("pyproject.toml", "README.md", "Makefile", "LICENSE")
NOT_SLOW = "addopts=-m 'not slow'"  # the default selection, without the doctests of src/


@dataclass
class Mutation:
    id: str
    package: str
    file: str
    find: str
    replace: str
    tests: list[str] = field(default_factory=list)
    occurrence: int | None = None
    note: str = ""


@dataclass
class Result:
    id: str
    package: str
    status: str
    seconds: float = 0.0
    detail: str = ""


def load(path: Path) -> tuple[list[Mutation], dict[str, list[str]]]:
    data = tomllib.loads(path.read_text())
    tests = {k: list(v) for k, v in data.get("tests", {}).items()}
    muts = []
    seen = set()
    for raw in data.get("mutation", []):
        m = Mutation(**raw)
        if m.id in seen:
            raise SystemExit(f"duplicate mutation id {m.id!r} in {path}")
        seen.add(m.id)
        if not m.tests:
            if m.package not in tests:
                raise SystemExit(f"{m.id}: no tests and no [tests].{m.package} default")
            m.tests = tests[m.package]
        muts.append(m)
    return muts, tests


def locate(source: str, m: Mutation) -> tuple[str, int | None]:
    """('ok', index) | ('stale', None) | ('ambiguous', None)."""
    count = source.count(m.find)
    if count == 0:
        return "stale", None
    if m.occurrence is None:
        if count > 1:
            return "ambiguous", None
        return "ok", source.index(m.find)
    if m.occurrence > count:
        return "stale", None
    i = -1
    for _ in range(m.occurrence):
        i = source.index(m.find, i + 1)
    return "ok", i


def make_copy(dest: Path, tests_rev: str | None = None) -> Path:
    """Copy the working tree's src/, tests/ and top-level files to ``dest``; with
    ``tests_rev``, tests/ comes from that git revision instead (to score older tests against
    today's source)."""
    for d in COPY_DIRS:
        if d == "tests" and tests_rev:
            (dest / d).mkdir(parents=True)
            archive = subprocess.run(
                ["git", "archive", tests_rev, "tests"], cwd=ROOT, capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
            continue
        shutil.copytree(
            ROOT / d,
            dest / d,
            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache"),
        )
    for f in COPY_FILES:
        if (ROOT / f).exists():
            shutil.copy2(ROOT / f, dest / f)
    return dest


def existing(copy: Path, tests: list[str]) -> list[str]:
    """The test paths / node ids whose file exists in the copy."""
    return [t for t in tests if (copy / t.split("::")[0]).exists()]


def env_for(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def check_import(copy: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import diffusolve, sys; sys.stdout.write(diffusolve.__file__)"],
        cwd=copy,
        env=env_for(copy),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if not Path(out).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"diffusolve imports from {out}, not from the copy {copy}: aborting")


def pytest_cmd(tests: list[str], skip: list[str], extra: list[str]) -> list[str]:
    """``skip``: node ids to deselect, and test files that do not even import (dropped)."""
    broken = {d for d in skip if "::" not in d}  # given on the command line, so drop them
    tests = [t for t in tests if t.split("::")[0] not in broken]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, *tests]
    for d in skip:
        if "::" in d:
            cmd += ["--deselect", d]
    return cmd


def baseline(copy: Path, tests: list[str], timeout: float) -> tuple[list[str], float]:
    """Node ids of the tests that fail on the unmutated copy (and files that fail to import,
    e.g. old tests against today's source), and the run's duration."""
    t0 = time.time()
    proc = subprocess.run(
        pytest_cmd(
            tests,
            [],
            ["-rfE", "--no-header", "--continue-on-collection-errors", "-o", NOT_SLOW],
        ),
        cwd=copy,
        env=env_for(copy),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    failed = []
    for line in proc.stdout.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            failed.append(line.split()[1])
    if proc.returncode not in (0, 1) and not failed:
        raise SystemExit(f"baseline run of {tests} could not run:\n{proc.stdout[-3000:]}")
    return failed, time.time() - t0


def run_mutant(m: Mutation, copy: Path, deselect: list[str], timeout: float) -> Result:
    target = copy / "src" / "diffusolve" / m.file
    pristine = target.read_text()  # the copy: consistent with the rest of the copy
    status, at = locate(pristine, m)
    if status != "ok":
        return Result(m.id, m.package, status, detail=f"{m.file}: snippet not found once")
    assert at is not None
    mutated = pristine[:at] + m.replace + pristine[at + len(m.find) :]
    target.write_text(mutated)
    t0 = time.time()
    try:
        proc = subprocess.run(
            pytest_cmd(m.tests, deselect, ["-x", "--no-header", "-o", NOT_SLOW]),
            cwd=copy,
            env=env_for(copy),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode == 0:
            status, detail = "survived", "all tests passed"
        elif proc.returncode == 5:
            status, detail = "survived", "no tests ran"
        else:
            status = "killed"
            failing = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
            detail = failing[0] if failing else proc.stdout.strip().splitlines()[-1:][0]
    except subprocess.TimeoutExpired:
        status, detail = "timeout", f"over {timeout:.0f}s"
    finally:
        target.write_text(pristine)
    return Result(m.id, m.package, status, time.time() - t0, detail)


def summarise(results: list[Result]) -> dict[str, dict[str, float]]:
    per: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in results:
        per[r.package][r.status] += 1
    out = {}
    for pkg, c in sorted(per.items()):
        full = {k: c[k] for k in ("killed", "timeout", "survived", "stale", "ambiguous")}
        ran = full["killed"] + full["timeout"] + full["survived"]
        out[pkg] = {
            **full,
            "ran": ran,
            "survival": (full["survived"] / ran) if ran else float("nan"),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", type=Path, default=DEFAULT_LIST, help="the mutation list (TOML)")
    ap.add_argument("--package", action="append", help="only these packages")
    ap.add_argument("--only", nargs="+", help="only these mutation ids")
    ap.add_argument("--list", action="store_true", help="list mutations and their status")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per mutant")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run in parallel")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument(
        "--tests-rev", help="take tests/ from this git revision (e.g. a 'before' score)"
    )
    args = ap.parse_args(argv)

    muts, _ = load(args.file)
    if args.package:
        muts = [m for m in muts if m.package in args.package]
    if args.only:
        unknown = set(args.only) - {m.id for m in muts}
        if unknown:
            raise SystemExit(f"unknown mutation ids: {sorted(unknown)}")
        muts = [m for m in muts if m.id in args.only]

    if args.list:
        for m in muts:
            src = (ROOT / "src" / "diffusolve" / m.file).read_text()
            print(f"{m.id:40s} {m.package:9s} {m.file:32s} {locate(src, m)[0]}")
        return 0

    with tempfile.TemporaryDirectory(prefix="diffusolve-mutants-") as tmp:
        copies = [make_copy(Path(tmp) / f"w{i}", args.tests_rev) for i in range(max(1, args.jobs))]
        check_import(copies[0])
        for m in muts:
            missing = sorted(set(m.tests) - set(existing(copies[0], m.tests)))
            if missing:
                print(f"{m.id}: no such test files here, skipped: {missing}")
            m.tests = existing(copies[0], m.tests)
        # baseline: every distinct test list once on the unmutated copy
        deselect: dict[tuple[str, ...], list[str]] = {}
        for key in sorted({tuple(m.tests) for m in muts}):
            failed, secs = baseline(copies[0], list(key), args.timeout * 3)
            deselect[key] = failed
            note = f", deselected {len(failed)} failing: {failed}" if failed else ""
            print(f"baseline {' '.join(key)}: {secs:.0f}s{note}", flush=True)

        free = list(copies)
        results: list[Result] = []

        def work(m: Mutation) -> Result:
            copy = free.pop()
            try:
                return run_mutant(m, copy, deselect[tuple(m.tests)], args.timeout)
            finally:
                free.append(copy)

        with ThreadPoolExecutor(max_workers=len(copies)) as pool:
            for r in pool.map(work, muts):
                results.append(r)
                print(
                    f"{r.status:9s} {r.package:9s} {r.id:40s} {r.seconds:6.0f}s  {r.detail}",
                    flush=True,
                )

    summary = summarise(results)
    print("\npackage    ran  killed  timeout  survived  stale  ambiguous  survival")
    for pkg, c in summary.items():
        print(
            f"{pkg:9s} {int(c['ran']):4d} {int(c['killed']):7d} {int(c['timeout']):8d} "
            f"{int(c['survived']):9d} {int(c['stale']):6d} {int(c['ambiguous']):10d}  "
            f"{100 * c['survival']:6.1f}%"
        )
    survivors = [r.id for r in results if r.status == "survived"]
    if survivors:
        print("survivors:", ", ".join(survivors))
    if args.json:
        args.json.write_text(
            json.dumps({"results": [asdict(r) for r in results], "summary": summary}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
