"""`diffusolve --version` prints the installed distribution's version (package metadata),
which is the one source of truth shared with ``diffusolve.__version__`` (pyproject reads
the version from there)."""

import subprocess
import sys
from importlib.metadata import version

import diffusolve
from diffusolve.cli import main, package_version


def test_version_is_the_package_metadata(capsys):
    assert main(["--version"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"diffusolve {version('diffusolve')}"
    assert package_version() == version("diffusolve") == diffusolve.__version__


def test_version_flag_without_torch():
    """--version answers without importing torch (a cold, separate interpreter)."""
    code = (
        "import sys; from diffusolve.cli import main; rc = main(['--version']); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("diffusolve ")
