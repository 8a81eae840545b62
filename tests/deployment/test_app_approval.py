"""The site's allowlist of approved apps and the gate its SuperNode runs (no servers here).

The gate's verdicts are checked by flwr 1.42's own FAB verifier (the code a SuperNode runs
for ``--trusted-entities``), so an "approved" here is one flwr itself accepts.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.supercore.fab import Fab
from flwr.supernode.start_client_internal import _verify_fab

from simulation.app_approval import (
    add_approval,
    approved_app_hashes,
    fab_sha256,
    load_approved_apps,
)
from simulation.approved_supernode import (
    REFUSED_LOG_PREFIX,
    AppApprovalGate,
    install,
    split_arguments,
    with_app_approval,
)
from simulation.cli import main as omnifuse
from simulation.flower_processes import REPO_ROOT, flower_bin

HASH_A = "a" * 64
HASH_B = "0123456789abcdef" * 4


def _flower_fab(app: Path, tmp_path: Path) -> Path:
    """The .fab file `flwr build` writes for ``app``."""
    out = tmp_path / "built"
    out.mkdir()
    completed = subprocess.run(
        [flower_bin("flwr"), "build", "--app", str(app)],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    (fab,) = out.glob("*.fab")
    return fab


def test_app_hash_is_the_hash_of_the_bundle_flwr_builds(tmp_path):
    fab = _flower_fab(REPO_ROOT, tmp_path)
    expected = hashlib.sha256(fab.read_bytes()).hexdigest()
    assert fab_sha256(app_dir=REPO_ROOT) == expected
    assert fab_sha256(fab_file=fab) == expected
    assert expected[:8] in fab.name  # flwr names the file by the same hash


def test_app_hash_changes_with_any_shipped_file(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_bytes((REPO_ROOT / "pyproject.toml").read_bytes())
    for package in ("client", "server"):
        (app / package).mkdir()
        (app / package / "app.py").write_text("app = None\n")
    before = fab_sha256(app_dir=app)
    (app / "client" / "app.py").write_text("app = None  # one changed comment\n")
    assert fab_sha256(app_dir=app) != before


def test_allowlist_round_trip_keeps_existing_entries(tmp_path):
    allowlist = tmp_path / "site" / "approved_apps.toml"
    assert add_approval(allowlist, HASH_A, note='v0.1.0 "reviewed"')
    assert add_approval(allowlist, HASH_B)
    assert not add_approval(allowlist, HASH_A, note="again")  # already there: unchanged
    assert approved_app_hashes(allowlist) == {HASH_A, HASH_B}
    assert [app.note for app in load_approved_apps(allowlist).app] == ['v0.1.0 "reviewed"', ""]
    assert allowlist.read_text().count("[[app]]") == 2


def test_empty_allowlist_approves_nothing(tmp_path):
    allowlist = tmp_path / "approved_apps.toml"
    allowlist.write_text("")
    assert approved_app_hashes(allowlist) == frozenset()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[app]]\nsha256 = "abc"\n', r"app\.0\.sha256.*'abc'"),
        (f'[[app]]\nsha256 = "{HASH_A.upper()}"\n', r"app\.0\.sha256"),
        (f'[[app]]\nsha = "{HASH_A}"\n', r"app\.0\.sha\b.*not permitted"),
        (f'[[app]]\nsha256 = "{HASH_A}"\nnote = 3\n', r"app\.0\.note.*found 3"),
        (f'[[apps]]\nsha256 = "{HASH_A}"\n', r"apps: Extra inputs"),
        ("[[app]\n", "not valid TOML"),
    ],
)
def test_a_malformed_allowlist_names_file_field_and_value(tmp_path, text, expected):
    allowlist = tmp_path / "approved_apps.toml"
    allowlist.write_text(text)
    with pytest.raises(ValueError, match=expected) as raised:
        approved_app_hashes(allowlist)
    assert str(allowlist) in str(raised.value)


def test_a_missing_allowlist_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="approved_apps.toml does not exist"):
        approved_app_hashes(tmp_path / "approved_apps.toml")


def _fab(content: bytes, announced: str | None = None) -> Fab:
    return Fab(announced or hashlib.sha256(content).hexdigest(), content, {})


def test_gate_approves_only_listed_bundles_as_flwr_verifies_them(tmp_path):
    approved, other = _fab(b"approved app bytes"), _fab(b"some other app")
    gate = AppApprovalGate(frozenset({approved.hash_str}), tmp_path / "approved_apps.toml")
    trusted = gate.trusted_entities()

    assert gate.refusal(approved.hash_str, approved.content) is None
    assert _verify_fab(gate.review(approved, run_id=7), trusted)

    reason = gate.refusal(other.hash_str, other.content)
    assert other.hash_str in reason and "approved_apps.toml" in reason
    reviewed = gate.review(other, run_id=8)
    assert reviewed.content == other.content and reviewed.hash_str == other.hash_str
    assert reviewed.verifications.get("valid_license")  # reaches flwr's verifier, fails
    assert not _verify_fab(reviewed, trusted)


def test_gate_refuses_bytes_that_do_not_match_the_announced_hash(tmp_path):
    swapped = _fab(b"not the approved bytes", announced=HASH_A)
    gate = AppApprovalGate(frozenset({HASH_A}), tmp_path / "approved_apps.toml")
    assert "not to the announced FAB hash" in gate.refusal(swapped.hash_str, swapped.content)
    assert not _verify_fab(gate.review(swapped, run_id=1), gate.trusted_entities())


def test_an_approval_signed_by_another_process_is_not_trusted(tmp_path):
    fab = _fab(b"approved app bytes")
    ours = AppApprovalGate(frozenset({fab.hash_str}), tmp_path / "a.toml")
    theirs = AppApprovalGate(frozenset({fab.hash_str}), tmp_path / "a.toml")
    assert not _verify_fab(theirs.review(fab, run_id=1), ours.trusted_entities())


def test_install_wraps_flwr_fab_fetch_and_trusted_entities(tmp_path, monkeypatch):
    from flwr.supernode import start_client_internal as internal

    seen = {}

    def fake_pull_and_store_message(*, get_fab, trusted_entities, **rest):
        seen["fab"] = get_fab("ignored", 5)
        seen["trusted"] = trusted_entities
        return 5

    monkeypatch.setattr(internal, "_pull_and_store_message", fake_pull_and_store_message)
    fab = _fab(b"approved app bytes")
    gate = AppApprovalGate(frozenset({fab.hash_str}), tmp_path / "a.toml")
    install(gate)
    result = internal._pull_and_store_message(get_fab=lambda h, r: fab, trusted_entities=None)
    assert result == 5
    assert seen["trusted"] == gate.trusted_entities()
    assert _verify_fab(seen["fab"], seen["trusted"])


def test_arguments_of_the_approving_supernode():
    path, rest = split_arguments(["--superlink", "h:1", "--approved-apps", "a.toml", "--insecure"])
    assert path == Path("a.toml") and rest == ["--superlink", "h:1", "--insecure"]
    assert split_arguments(["--approved-apps=b.toml"])[0] == Path("b.toml")
    with pytest.raises(ValueError, match="--approved-apps FILE is required"):
        split_arguments(["--superlink", "h:1"])
    with pytest.raises(ValueError, match="cannot be combined"):
        split_arguments(["--approved-apps", "a.toml", "--trusted-entities", "t.yaml"])
    command = with_app_approval(["/venv/bin/flower-supernode", "--superlink", "h:1"], Path("a"))
    assert command[:3] == [sys.executable, "-m", "simulation.approved_supernode"]
    assert command[3:] == ["--approved-apps", str(Path("a").resolve()), "--superlink", "h:1"]


def test_supernode_with_a_bad_allowlist_stops_before_connecting(tmp_path):
    allowlist = tmp_path / "approved_apps.toml"
    allowlist.write_text('[[app]]\nsha256 = "nope"\n')
    command = [sys.executable, "-m", "simulation.approved_supernode"]
    command += ["--approved-apps", str(allowlist), "--superlink", "127.0.0.1:9", "--insecure"]
    completed = subprocess.run(
        command,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert str(allowlist) in completed.stderr and "'nope'" in completed.stderr
    assert "Starting Flower SuperNode" not in completed.stdout + completed.stderr
    assert REFUSED_LOG_PREFIX not in completed.stderr


def test_cli_approve_adds_the_fab_hash(tmp_path, capsys):
    fab = tmp_path / "app.fab"
    fab.write_bytes(b"pretend bundle")
    out = tmp_path / "approved_apps.toml"
    args = ["deploy", "approve", "--fab", str(fab), "--out", str(out), "--note", "v1"]
    assert omnifuse(args) == 0
    digest = hashlib.sha256(b"pretend bundle").hexdigest()
    assert approved_app_hashes(out) == {digest}
    assert f"{digest} added to" in capsys.readouterr().out
    assert omnifuse(["deploy", "approve", "--app-dir", str(tmp_path), "--out", str(out)]) == 1
