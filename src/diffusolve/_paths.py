"""Checks on output paths, run before any work so that a bad ``--out`` fails at once.

No diffusolve or third-party imports: every layer (train, bench, the CLI) may use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["check_file_out", "check_dir_out", "IMAGE_SUFFIXES"]

#: image formats ``diffusolve sample`` writes (lossless, or lossy where asked for)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def _check_parent(path: Path, flag: str) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(
                    f"{flag} {path}: {parent} is a file, not a folder; choose another {flag}"
                )
            return


def check_file_out(
    path: str | Path,
    *,
    force: bool = False,
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
    flag: str = "--out",
) -> Path:
    """``path`` if a file can be written there: it has one of ``suffixes``, is not a
    folder, no parent is a file, and it does not exist unless ``force``."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name such as {path / 'grid.png'}")
    if path.suffix.lower() not in suffixes:
        what = "no extension" if not path.suffix else f"the extension {path.suffix!r}"
        raise ValueError(
            f"{flag} {path} has {what}; use one of {', '.join(suffixes)} (e.g. {path.stem}.png)"
        )
    _check_parent(path, flag)
    if path.exists() and not force:
        raise FileExistsError(
            f"{path} exists; pass --force to overwrite it or choose another {flag}"
        )
    return path


def check_dir_out(
    path: str | Path, *, files: Iterable[str] = (), force: bool = False, flag: str = "--out"
) -> Path:
    """``path`` if it can be an output folder: not a file, no parent is a file, and none of
    ``files`` (names or glob patterns inside it) exists unless ``force``."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a folder")
    _check_parent(path, flag)
    if path.is_dir() and not force:
        existing = sorted({p.name for pattern in files for p in path.glob(pattern)})
        if existing:
            shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
            raise FileExistsError(
                f"{path} already holds {shown}; pass --force to overwrite, or choose another {flag}"
            )
    return path
