"""`omnifuse site check SITE.toml`: can this site take part in a federation? (the preflight)

Read-only checks of one site, each a `Check` naming the config field it is about and what
was found: every configured path exists and is readable; each listed modality has data;
stays and positives per split (a split too small to train on or score is an error, with its
numbers); the backbone files and their SHA-256; a feature cache that is complete and was
built from this config and these backbones (its manifest names the site, task, modalities
and each backbone's identity, which hashes the weights or vocabulary); free disk at the
cache; and, when asked, a TLS handshake with the SuperLink verified by the configured CA.
A site may take part only when no check failed; warnings (e.g. a randomly initialised
backbone) are shown but do not stop it. `omnifuse site start` runs the same checks first.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from omnifuse_model.data.cxr.images import IMAGE_SIZE
from omnifuse_model.data.features.backbones import (
    REPORT_TOKENS,
    read_wordpiece_vocabulary,
    vocabulary_sha256,
)
from omnifuse_model.site_config import SiteConfig
from simulation.app_approval import approved_app_hashes

Level = Literal["ok", "warn", "fail"]

IMAGE_SEED = 0
"""Seed of the randomly initialised ResNet-34 `prepare` uses when no weights are set."""
FALLBACK_TEXT = "random-init-seed0-L2-H768"
"""The offline report fallback `prepare` builds by default (seed, layers, width)."""
MODEL_FILE_SUFFIXES = (".json", ".txt", ".safetensors", ".bin", ".model")
"""Files of a BERT folder that define the model (as hashed into its identity)."""
SUPERLINK_TIMEOUT_S = 10.0

_PATHS: tuple[tuple[str, str], ...] = (
    ("data.benchmark_dir", "dir"),
    ("data.stays_csv", "file"),
    ("data.cxr_dir", "dir"),
    ("data.cxr_metadata", "file"),
    ("data.reports_dir", "dir"),
    ("data.ehr_normalizer", "file"),
    ("backbones.resnet34_weights", "file"),
    ("backbones.bert_dir", "dir"),
    ("backbones.wordpiece_vocab", "file"),
    ("deployment.root_certificates", "file"),
    ("deployment.auth_private_key", "file"),
    ("deployment.approved_apps", "file"),
)
"""Every path field of a site config and what it must be."""


@dataclass(frozen=True)
class Check:
    """One finding: which check, about which config field, the verdict and what was found."""

    check: str
    field: str
    level: Level
    found: str


@dataclass
class Preflight:
    """Every finding about one site; it can take part when none failed."""

    site: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.level == "fail"]


def _value(site: SiteConfig, dotted: str) -> Any:
    value: Any = site
    for part in dotted.split("."):
        value = None if value is None else getattr(value, part)
    return value


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_folder(folder: Path) -> str:
    """SHA-256 over a BERT folder's defining files (relative name, NUL, bytes; sorted), the
    hash `TextBackbone` puts into its identity."""
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix in MODEL_FILE_SUFFIXES
    )
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- paths


def _path_problem(path: Path, kind: str) -> str | None:
    if not path.exists():
        return f"{path}: does not exist"
    if kind == "dir" and not path.is_dir():
        return f"{path}: not a folder"
    if kind == "file" and not path.is_file():
        return f"{path}: not a file"
    if not os.access(path, os.R_OK | (os.X_OK if kind == "dir" else 0)):
        return f"{path}: not readable by this user"
    return None


def check_paths(site: SiteConfig) -> list[Check]:
    """Each configured path exists, is of the right kind and readable; the SuperNode key is
    readable by its owner only."""
    checks = []
    for dotted, kind in _PATHS:
        path = _value(site, dotted)
        if path is None:
            continue
        problem = _path_problem(Path(path), kind)
        checks.append(Check("path", dotted, "fail" if problem else "ok", problem or str(path)))
    key = _value(site, "deployment.auth_private_key")
    if key is not None and Path(key).is_file():
        mode = stat.S_IMODE(Path(key).stat().st_mode)
        if mode & 0o077:
            checks.append(
                Check(
                    "key permissions",
                    "deployment.auth_private_key",
                    "fail",
                    f"{key}: mode {mode:04o}, expected 0600 (owner only): chmod 600 it",
                )
            )
    return checks


# --------------------------------------------------------------------------- backbones


def expected_identities(site: SiteConfig) -> dict[str, str | None]:
    """The backbone identity `omnifuse prepare` gives each of the site's image/report
    modalities under this config (None: not knowable from the config alone). Files that
    cannot be read are left out (the path checks report them)."""
    expected: dict[str, str | None] = {}
    backbones = site.backbones
    if "cxr" in site.modalities:
        weights = backbones.resnet34_weights
        if weights is None:
            expected["cxr"] = f"resnet34:random-init-seed-{IMAGE_SEED}:img{IMAGE_SIZE}"
        elif Path(weights).is_file():
            digest = sha256_file(Path(weights))[:16]
            expected["cxr"] = f"resnet34:sha256-{digest}:img{IMAGE_SIZE}"
    if "rep" in site.modalities:
        if backbones.bert_dir is not None:
            if Path(backbones.bert_dir).is_dir():
                digest = sha256_folder(Path(backbones.bert_dir))[:16]
                expected["rep"] = f"bert:sha256-{digest}:T{REPORT_TOKENS}"
        elif backbones.wordpiece_vocab is not None:
            try:
                vocabulary = read_wordpiece_vocabulary(backbones.wordpiece_vocab)
            except (OSError, ValueError):
                return expected
            digest = vocabulary_sha256(vocabulary)[:16]
            expected["rep"] = (
                f"bert-fallback:wordpiece-sha256-{digest}:{FALLBACK_TEXT}:T{REPORT_TOKENS}"
            )
        else:
            expected["rep"] = None
    return expected


def check_backbones(site: SiteConfig) -> list[Check]:
    """The backbone files with their SHA-256; an unset backbone is a warning (random
    features), a vocabulary learnt from this site's own reports too (not shared)."""
    if site.data.source == "synthetic_features":
        return []  # generated features: no backbone runs
    checks = []
    backbones = site.backbones
    needed = {"cxr": "backbones.resnet34_weights", "rep": "backbones.bert_dir"}
    for modality, dotted in needed.items():
        if modality not in site.modalities:
            continue
        path = _value(site, dotted)
        if path is None:
            if modality == "rep" and backbones.wordpiece_vocab is not None:
                continue
            checks.append(
                Check(
                    "backbone",
                    dotted,
                    "warn",
                    "not set: randomly initialised, features carry no pretrained meaning",
                )
            )
        elif Path(path).is_file():
            checks.append(Check("backbone", dotted, "ok", f"sha256 {sha256_file(Path(path))}"))
        elif Path(path).is_dir():
            checks.append(Check("backbone", dotted, "ok", f"sha256 {sha256_folder(Path(path))}"))
        else:
            checks.append(Check("backbone", dotted, "fail", f"{path}: not found"))
    vocab = backbones.wordpiece_vocab
    if "rep" in site.modalities and backbones.bert_dir is None:
        if vocab is None:
            checks.append(
                Check(
                    "backbone",
                    "backbones.wordpiece_vocab",
                    "warn",
                    "not set: the report "
                    "vocabulary is learnt from this site's reports, not the consortium's",
                )
            )
        elif Path(vocab).is_file():
            try:
                digest = vocabulary_sha256(read_wordpiece_vocabulary(vocab))
                checks.append(
                    Check("backbone", "backbones.wordpiece_vocab", "ok", f"sha256 {digest}")
                )
            except (OSError, ValueError) as error:
                checks.append(Check("backbone", "backbones.wordpiece_vocab", "fail", str(error)))
    return checks


# --------------------------------------------------------------------------- disk, network


def check_disk(site: SiteConfig, min_free_gb: float | None = None) -> Check:
    """Free disk where the feature cache lives (its nearest existing folder)."""
    if min_free_gb is None:
        min_free_gb = site.deployment.min_free_disk_gb if site.deployment else 1.0
    folder = Path(site.cache_dir).resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free / 2**30
    level: Level = "ok" if free >= min_free_gb else "fail"
    return Check(
        "disk", "cache_dir", level, f"{free:.1f} GiB free at {folder} (needs {min_free_gb:g} GiB)"
    )


def tls_handshake(address: str, ca_file: Path, timeout: float = SUPERLINK_TIMEOUT_S) -> str:
    """Connect to ``host:port`` and complete a TLS handshake that verifies the server's
    certificate (chain and host name) against ``ca_file`` only; the negotiated protocol.
    Raises ``OSError`` (``ssl.SSLError`` included) naming what failed."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection((host, int(port)), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return f"{tls.version()}, certificate verified by {ca_file}"


def check_superlink(address: str, ca_file: Path | None, dotted: str) -> Check:
    """The SuperLink answers a TLS handshake verified by the consortium CA."""
    if ca_file is None:
        return Check("superlink", "deployment.root_certificates", "fail", "no CA file configured")
    try:
        return Check("superlink", dotted, "ok", f"{address}: {tls_handshake(address, ca_file)}")
    except ssl.SSLError as error:
        return Check(
            "superlink",
            dotted,
            "fail",
            f"{address}: TLS handshake with CA {ca_file} failed: {error.reason or error}",
        )
    except OSError as error:
        return Check("superlink", dotted, "fail", f"{address}: cannot connect: {error}")


def check_allowlist(site: SiteConfig) -> list[Check]:
    """The site's approved-apps allowlist (``simulation.app_approval``): set when the site
    deploys (without one its SuperNode would run whatever app the SuperLink sends), parsed
    strictly; an empty list approves nothing, so every run would be refused."""
    if site.deployment is None:
        return []
    path = site.deployment.approved_apps
    field = "deployment.approved_apps"
    if path is None:
        return [
            Check(
                "allowlist",
                field,
                "fail",
                "not set: without an allowlist the SuperNode would run any app the SuperLink "
                "sends (`omnifuse deploy approve` writes one)",
            )
        ]
    if not Path(path).is_file():
        return []  # the path check names the missing file
    try:
        hashes = approved_app_hashes(Path(path))
    except (OSError, ValueError) as error:
        return [Check("allowlist", field, "fail", str(error).splitlines()[0])]
    if not hashes:
        return [
            Check(
                "allowlist",
                field,
                "warn",
                f"{path}: no approved app yet: every run is refused until one is approved",
            )
        ]
    return [Check("allowlist", field, "ok", f"{len(hashes)} approved app(s)")]


# --------------------------------------------------------------------------- all


def run_preflight(
    site: SiteConfig,
    superlink: str | None = None,
    ca_file: Path | None = None,
    min_free_gb: float | None = None,
) -> Preflight:
    """Every check of ``site``; with ``superlink`` (``host:port``) also the TLS handshake,
    verified by ``ca_file`` (default: the config's ``deployment.root_certificates``)."""
    preflight = Preflight(site.name)
    preflight.checks += check_paths(site)
    preflight.checks += check_backbones(site)
    # imported here: site_cache_check builds on this module's Check and identities
    from simulation.site_cache_check import check_cache, check_data

    cache_checks, manifest = check_cache(site)
    preflight.checks += check_data(site, manifest)
    preflight.checks += cache_checks
    preflight.checks.append(check_disk(site, min_free_gb))
    preflight.checks += check_allowlist(site)
    if superlink is not None:
        if ca_file is None and site.deployment is not None:
            ca_file = site.deployment.root_certificates
        preflight.checks.append(check_superlink(superlink, ca_file, "deployment.superlink"))
    return preflight


_STYLE = {"ok": "[green]ok[/green]", "warn": "[yellow]warn[/yellow]", "fail": "[red]FAIL[/red]"}


def render(preflight: Preflight, console: Console) -> None:
    """The findings as one table and a closing line saying whether the site can take part."""
    table = Table(title=f"Preflight of site '{preflight.site}'")
    for column in ("check", "field", "result", "found"):
        table.add_column(column, overflow="fold")
    for check in preflight.checks:
        table.add_row(check.check, check.field, _STYLE[check.level], check.found)
    console.print(table)
    if preflight.ok:
        console.print(f"[green]site '{preflight.site}' can take part[/green]")
    else:
        failed = sorted({c.field for c in preflight.failures})
        console.print(
            f"[red]site '{preflight.site}' cannot take part: {len(preflight.failures)} "
            f"failed check(s) ({', '.join(failed)})[/red]"
        )
