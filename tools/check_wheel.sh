#!/usr/bin/env bash
# Build the wheel and sdist, check them, and install the wheel into a fresh virtual
# environment the way a user would: the pinned torch first, then the wheel; then run
# `diffusolve --version` and `diffusolve demo --quick`.
#
#   bash tools/check_wheel.sh            # uses .venv/bin/python for build/twine ([dev] extra)
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu bash tools/check_wheel.sh
#
# Prints a transcript; exits non-zero on the first failure. Leaves dist/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TORCH_INDEX=${TORCH_INDEX:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/diffusolve-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
say() { printf '\n$ %s\n' "$*"; }
# pip's notes about local index folders missing on this machine are noise in a transcript
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }

"$PY" -c "import build, twine" 2>/dev/null || "$PY" -m pip install --quiet build twine
rm -rf dist
say python -m build
"$PY" -m build --outdir dist . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
tail -n 1 "$WORK/build.log"
ls -l dist

say twine check dist/*
"$PY" -m twine check dist/*

WHEEL=$(ls dist/*.whl)
SDIST=$(ls dist/*.tar.gz)
say "wheel contents (assets)"
"$PY" - "$WHEEL" "$SDIST" <<'PYEOF'
import sys, tarfile, zipfile
from pathlib import Path

wheel, sdist = sys.argv[1], sys.argv[2]
names = zipfile.ZipFile(wheel).namelist()
src = Path("src/diffusolve/assets")
want = sorted(f"diffusolve/assets/{p.relative_to(src).as_posix()}" for p in src.rglob("*") if p.is_file())
missing = [w for w in want if w not in names]
print(f"{len(names)} files in the wheel; {len(want)} asset files in the tree, "
      f"{len(want) - len(missing)} of them in the wheel")
for kind in (".safetensors", ".json", "MODEL_CARD.md"):
    print(f"  {kind}: {sum(n.endswith(kind) for n in names if '/assets/' in n)}")
assert not missing, f"assets missing from the wheel: {missing}"
tar = [n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n]
missing = [w for w in want if f"src/{w}" not in tar]
assert not missing, f"assets missing from the sdist: {missing}"
for need in ("CHANGELOG.md", "README.md", "pyproject.toml", "mkdocs.yml"):
    assert need in tar, f"{need} missing from the sdist"
print(f"{len(tar)} entries in the sdist, every asset included")
PYEOF

say "python3 -m venv <tmp>/venv"
python3 -m venv "$WORK/venv"
V="$WORK/venv/bin"
say pip install torch==2.13.0${TORCH_INDEX:+ --index-url $TORCH_INDEX}
"$V/pip" install --quiet --disable-pip-version-check torch==2.13.0 ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} 2>&1 | quiet
say pip install "$(basename "$WHEEL")"
"$V/pip" install --quiet --disable-pip-version-check "$WHEEL" 2>&1 | quiet
"$V/pip" list --disable-pip-version-check 2>/dev/null | grep -i -E "^(diffusolve|torch|diffusers|scikit-learn) "

cd "$WORK"  # away from the source tree: the installed package, not src/
say diffusolve --version
"$V/diffusolve" --version
say diffusolve demo --quick --out demo
start=$(date +%s)
"$V/diffusolve" demo --quick --no-progress --out demo
echo "demo --quick: $(( $(date +%s) - start )) s; report: $(wc -l < demo/report.md) lines, $(ls demo/*.png | wc -l) PNGs"
"$V/python" -c "import diffusolve, pathlib; print('imported from', pathlib.Path(diffusolve.__file__).parent)"
echo "wheel check passed"
