"""Writing only inside an output folder: the one check made before every write, unlink and
rmtree of the simulation harness and CLI, and the name patterns that become paths.

A name from input (a site, a SuperNode key, a listfile row's stay file) becomes a path only
after it matched its pattern, and the path is then checked with `inside` before anything
touches it. `inside` resolves the *parent* folder (so a symlinked folder that leads out of the
output folder is caught) but not the last component: a symlink the harness made inside the
folder is itself inside, wherever it points, and may be replaced or removed.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from omnifuse_model.site_config import SITE_NAME_PATTERN

SITE_NAME = re.compile(SITE_NAME_PATTERN)
"""Site and SuperNode key names: a letter or digit, then letters, digits, '_' or '-' (<= 64)."""

STAY_FILE = re.compile(r"[1-9][0-9]{0,11}_episode[1-9][0-9]{0,5}_timeseries\.csv")
"""A listfile row's stay, as mimic3-benchmarks / mimic4extract write it
(``{SUBJECT_ID}_episode{N}_timeseries.csv``, N counted from 1)."""


class UnsafePathError(ValueError):
    """A path built from input would leave the folder it must stay in."""


def check_name(name: str, what: str, pattern: re.Pattern[str] = SITE_NAME) -> str:
    """``name`` unchanged when it matches ``pattern`` whole; else a `ValueError` naming it."""
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise ValueError(f"{what} {name!r}: expected a name matching {pattern.pattern}")
    return name


def inside(root: Path, path: Path) -> Path:
    """``path`` (absolute, parent resolved) when it lies strictly inside ``root``.

    Raises `UnsafePathError` naming both otherwise, also for ``root`` itself and for a path
    whose last component is '.' or '..'.
    """
    root = Path(root).resolve()
    path = Path(path) if Path(path).is_absolute() else Path.cwd() / path
    if path.name in ("", ".", ".."):
        raise UnsafePathError(f"{path}: not a file or folder name inside {root}")
    candidate = path.parent.resolve() / path.name
    if candidate == root or not candidate.is_relative_to(root):
        raise UnsafePathError(f"{path}: resolves to {candidate}, outside the folder {root}")
    return candidate


def writable(root: Path, path: Path) -> Path:
    """`inside`, and a symlink already at ``path`` removed (it is ours, inside ``root``), so
    that writing to the path never writes through a link to a file elsewhere."""
    target = inside(root, path)
    if target.is_symlink():
        target.unlink()
    return target


def remove_tree(root: Path, path: Path) -> None:
    """rmtree ``path`` (or unlink it, when it is a file or link) after `inside` allowed it."""
    target = inside(root, path)
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)


REPOSITORY = Path(__file__).resolve().parent.parent
"""The folder holding the code (the repository, or site-packages): never an output folder."""


def check_output_folder(
    out: Path, option: str, inputs: Sequence[Path] = (), marker: str | None = None
) -> Path:
    """``out`` resolved, when a command may write into it: a new or empty folder, or one
    holding ``marker`` (an earlier run of the same command, which it replaces).

    Refused with a `ValueError` (or `FileExistsError`) naming ``option``: a file; '/', the
    home folder, the repository or a folder above it; a folder that is, lies inside or
    holds one of ``inputs`` (the data the command reads); any other non-empty folder.
    """
    path = Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{option} {out}: is a file; expected a new or empty folder")
    for name, forbidden in (("the root folder", Path("/")), ("the home folder", Path.home())):
        if path == forbidden.resolve():
            raise ValueError(f"{option} {out}: is {name}; expected a new or empty folder")
    if REPOSITORY.is_relative_to(path):
        raise ValueError(
            f"{option} {out}: is the repository {REPOSITORY} or a folder above it; expected a "
            "new or empty folder"
        )
    for source in inputs:
        source = Path(source).expanduser().resolve()
        if path.is_relative_to(source) or source.is_relative_to(path):
            raise ValueError(
                f"{option} {out}: overlaps the input folder {source}; write the output elsewhere"
            )
    if path.is_dir() and any(path.iterdir()) and not (marker and (path / marker).exists()):
        earlier = f" and holds no {marker} of an earlier run" if marker else ""
        raise FileExistsError(
            f"{option} {out}: exists, is not empty{earlier}; expected a new or empty folder"
        )
    return path


def link_or_copy(source: Path, target: Path, root: Path) -> None:
    """A symlink ``target`` -> ``source`` inside ``root`` (a copy where links are refused).

    Never removes what is already at ``target``: a link to the same source is kept, anything
    else is a `FileExistsError` naming it.
    """
    target = inside(root, target)
    resolved = Path(source).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    inside(root, target)  # the folders just made may not have changed where it resolves
    try:
        os.symlink(resolved, target)
    except FileExistsError:
        if target.is_symlink() and Path(os.readlink(target)) == resolved:
            return
        raise FileExistsError(
            f"{target}: already exists; not replaced by a link to {resolved}"
        ) from None
    except OSError:  # filesystems without symlinks: exclusive create, never overwrite
        with resolved.open("rb") as src, open(target, "xb") as dst:
            shutil.copyfileobj(src, dst)


def create_private(path: Path, data: bytes, force: bool = False) -> Path:
    """Write ``data`` to a new file created 0600 (never readable by others, not even briefly).

    An existing file is a `FileExistsError` unless ``force``, which removes it first.
    """
    return _create(Path(path), data, 0o600, force)


def create_public(path: Path, data: bytes, force: bool = False) -> Path:
    """Like `create_private` with mode 0644 (certificates, public keys)."""
    return _create(Path(path), data, 0o644, force)


def _create(path: Path, data: bytes, mode: int, force: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if force and (path.is_symlink() or path.exists()):
        path.unlink()
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise FileExistsError(f"{path}: already exists; not overwritten (use --force)") from None
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)  # the umask may have narrowed it; never widens a private key
    return path
