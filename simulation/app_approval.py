"""A hospital's list of the training code it approved: SHA-256 hashes of Flower app bundles.

A Flower app bundle (FAB) is the zip `flwr run` / `flwr build` makes of the app directory;
flwr 1.42 names a run's app by ``sha256(fab bytes)`` (``flwr.cli.run``: ``fab_hash``). The
site keeps an allowlist of such hashes in a TOML file it owns::

    [[app]]
    sha256 = "0d3cad64...371c"
    note = "omnifuse-fl 0.1.0, reviewed by J. Doe 2026-11-30"

`approved_app_hashes` reads it (strictly: a misspelt key or a malformed hash is an error
naming the file, the entry and the value); `fab_sha256` computes the hash of an app
directory exactly as `flwr run` builds it; `add_approval` appends an entry (the
`omnifuse deploy approve` command). Enforcement is in `simulation.approved_supernode`.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Annotated

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SHA256_HEX = r"^[0-9a-f]{64}$"


class ApprovedApp(BaseModel):
    """One approved app version."""

    model_config = ConfigDict(strict=True, extra="forbid")

    sha256: Annotated[str, Field(pattern=SHA256_HEX)]
    """SHA-256 of the FAB bytes, 64 lower-case hex digits (the hash `flwr run` sends)."""
    note: str = ""
    """Free text for the site's own records: version, reviewer, date."""


class ApprovedApps(BaseModel):
    """The site's allowlist file: ``[[app]]`` tables. An empty list approves nothing."""

    model_config = ConfigDict(strict=True, extra="forbid")

    app: list[ApprovedApp] = Field(default_factory=list)


def load_approved_apps(path: Path) -> ApprovedApps:
    """The allowlist in ``path``; `FileNotFoundError` / `ValueError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"approved apps file {path} does not exist (or is not a file)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"approved apps file {path} is not valid TOML: {error}") from error
    try:
        return ApprovedApps.model_validate(data)
    except ValidationError as error:
        problems = [
            f"  {'.'.join(map(str, item['loc']))}: {item['msg']} (found {item.get('input')!r})"
            for item in error.errors()
        ]
        raise ValueError(
            f"approved apps file {path}: expected [[app]] tables with sha256 (64 lower-case "
            "hex digits) and note\n" + "\n".join(problems)
        ) from error


def approved_app_hashes(path: Path) -> frozenset[str]:
    """The SHA-256 hashes of every app version the site approved in ``path``."""
    return frozenset(app.sha256 for app in load_approved_apps(path).app)


def fab_bytes(app_dir: Path) -> bytes:
    """The FAB `flwr run <app_dir>` would send, built by flwr's own builder."""
    from flwr.cli.build import build_fab_from_disk

    app_dir = Path(app_dir)
    if not (app_dir / "pyproject.toml").is_file():
        raise FileNotFoundError(f"--app-dir {app_dir}: no pyproject.toml (not a Flower app)")
    return build_fab_from_disk(app_dir)


def fab_sha256(app_dir: Path | None = None, fab_file: Path | None = None) -> str:
    """SHA-256 of the FAB of ``app_dir``, or of a built ``.fab`` file (`flwr build`)."""
    if (app_dir is None) == (fab_file is None):
        raise ValueError("give exactly one of an app directory or a .fab file")
    if fab_file is not None:
        if not Path(fab_file).is_file():
            raise FileNotFoundError(f"--fab {fab_file} does not exist")
        return hashlib.sha256(Path(fab_file).read_bytes()).hexdigest()
    return hashlib.sha256(fab_bytes(Path(app_dir))).hexdigest()


def allowlist_toml(approved: ApprovedApps) -> str:
    """The allowlist as TOML, one ``[[app]]`` table per approved version."""
    tables = [f"[[app]]\n{tomli_w.dumps(app.model_dump())}" for app in approved.app]
    return "\n".join(tables)


def add_approval(out: Path, sha256: str, note: str = "") -> bool:
    """Add ``sha256`` to the allowlist ``out`` (created when missing; existing entries kept).

    Returns False when the hash was already approved there (the file is left unchanged).
    """
    out = Path(out)
    approved = load_approved_apps(out) if out.exists() else ApprovedApps()
    if any(app.sha256 == sha256 for app in approved.app):
        return False
    approved.app.append(ApprovedApp(sha256=sha256, note=note))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(allowlist_toml(approved), encoding="utf-8")
    return True


def add_approve_parser(deploy_commands) -> None:
    """`omnifuse deploy approve`: hash an app version and add it to a site's allowlist."""
    approve = deploy_commands.add_parser(
        "approve", help="add an app version (its FAB SHA-256) to a site's approved apps file"
    )
    source = approve.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--app-dir", help="the Flower app directory, hashed as `flwr run` builds it"
    )
    source.add_argument("--fab", help="a .fab file built by `flwr build`")
    approve.add_argument("--out", required=True, help="the allowlist TOML (created or extended)")
    approve.add_argument("--note", default="", help="free text kept with the entry")
    approve.set_defaults(handler=run_approve)


def run_approve(args) -> int:
    from rich.console import Console

    digest = fab_sha256(
        app_dir=Path(args.app_dir) if args.app_dir else None,
        fab_file=Path(args.fab) if args.fab else None,
    )
    added = add_approval(Path(args.out), digest, args.note)
    state = "added to" if added else "already in"
    Console(highlight=False, soft_wrap=True).print(f"{digest} {state} {args.out}")
    return 0
