"""`omnifuse site check`: one test per kind of failure, each naming the field and what was
found; a healthy prepared site passes with exit code 0."""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from omnifuse_model.data.features.manifest import MANIFEST_FILE
from omnifuse_model.site_config import DeploymentConfig, SiteConfig
from simulation.app_approval import add_approval
from simulation.certificates import CertificatePaths, make_certificates
from simulation.cli import main
from simulation.site_check import Preflight, check_superlink, run_preflight, sha256_file
from tests.deployment.conftest import write_vocab


def failed(preflight: Preflight, field: str) -> list[str]:
    """What was found by the failed checks about ``field``."""
    return [c.found for c in preflight.failures if c.field == field]


def edit_manifest(site: SiteConfig, change) -> None:
    path = Path(site.cache_dir) / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_a_prepared_site_can_take_part(prepared_site, tmp_path, capsys):
    preflight = run_preflight(prepared_site)
    assert preflight.ok, preflight.failures
    levels = {(c.check, c.field): c.level for c in preflight.checks}
    assert levels[("backbone", "backbones.resnet34_weights")] == "warn"  # random init
    splits = [c.found for c in preflight.checks if c.check == "split"]
    assert splits[1].startswith("val: 3 stays, 1 positive, 2 negative")
    path = tmp_path / "site.toml"
    path.write_text(prepared_site.to_toml())
    assert main(["site", "check", str(path)]) == 0
    assert "can take part" in capsys.readouterr().out


def test_a_missing_path_is_named(site_copy, tmp_path):
    site = site_copy.model_copy(deep=True)
    site.data.reports_dir = tmp_path / "nowhere"
    assert failed(run_preflight(site), "data.reports_dir") == [
        f"{tmp_path}/nowhere: does not exist"
    ]


def test_a_file_where_a_folder_belongs(site_copy, tmp_path):
    site = site_copy.model_copy(deep=True)
    site.data.cxr_dir = tmp_path / "a_file"
    site.data.cxr_dir.write_text("x")
    assert failed(run_preflight(site), "data.cxr_dir") == [f"{site.data.cxr_dir}: not a folder"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file: no unreadable file")
def test_an_unreadable_file_is_named(site_copy, tmp_path):
    site = site_copy.model_copy(deep=True)
    vocab = write_vocab(tmp_path / "vocab.txt", ["x y"])
    vocab.chmod(0)
    site.backbones.wordpiece_vocab = vocab
    assert "not readable" in failed(run_preflight(site), "backbones.wordpiece_vocab")[0]


def test_a_manifest_that_is_not_an_object_is_named(site_copy):
    """A JSON list as manifest.json was an AttributeError traceback."""
    path = Path(site_copy.cache_dir) / MANIFEST_FILE
    path.write_text(json.dumps([json.loads(path.read_text())]))
    expected = f"{path}: expected a JSON object, found list"
    assert failed(run_preflight(site_copy), "cache_dir") == [expected]


def test_a_listed_modality_without_data(site_copy):
    def no_reports(manifest):
        for stays in manifest["splits"].values():
            for stay in stays:
                stay["rep"] = None

    edit_manifest(site_copy, no_reports)
    found = failed(run_preflight(site_copy), "modalities")
    assert found == ["rep: stays with data: train 0, val 0, test 0"]


def test_a_split_too_small_to_score_names_its_numbers(site_copy):
    def no_positive_in_val(manifest):
        for stay in manifest["splits"]["val"]:
            stay["labels"] = [0]

    edit_manifest(site_copy, no_positive_in_val)
    (found,) = failed(run_preflight(site_copy), "data.benchmark_dir")
    assert found.startswith("val: 3 stays, 0 positive, 3 negative: too small")


def test_another_weights_file_shows_its_sha256_and_stales_the_cache(site_copy, tmp_path):
    weights = tmp_path / "resnet34.pth"
    weights.write_bytes(b"not the weights the cache was built with")
    site = site_copy.model_copy(deep=True)
    site.backbones.resnet34_weights = weights
    preflight = run_preflight(site)
    shown = [c.found for c in preflight.checks if c.check == "backbone" and c.level == "ok"]
    assert f"sha256 {sha256_file(weights)}" in shown
    (stale,) = failed(preflight, "backbones.resnet34_weights")
    assert "cxr features built by resnet34:random-init-seed-0" in stale
    assert f"resnet34:sha256-{sha256_file(weights)[:16]}" in stale


def test_a_missing_backbone_file(site_copy, tmp_path):
    site = site_copy.model_copy(deep=True)
    site.backbones.resnet34_weights = tmp_path / "gone.pth"
    found = failed(run_preflight(site), "backbones.resnet34_weights")
    assert f"{tmp_path}/gone.pth: does not exist" in found
    assert f"{tmp_path}/gone.pth: not found" in found


def test_another_report_vocabulary_stales_the_cache(site_copy, tmp_path):
    site = site_copy.model_copy(deep=True)
    site.backbones.wordpiece_vocab = write_vocab(tmp_path / "other.txt", ["other words here"])
    (found,) = failed(run_preflight(site), "backbones")
    assert "rep features built by bert-fallback:wordpiece-sha256-" in found


def test_an_incomplete_cache(site_copy):
    shard = next((Path(site_copy.cache_dir) / "features" / "cxr").glob("*.safetensors"))
    shard.unlink()
    (found,) = failed(run_preflight(site_copy), "cache_dir")
    assert found.startswith("cxr: ") and "entries missing" in found


def test_no_cache_at_all(site_copy, tmp_path):
    site = site_copy.model_copy(update={"cache_dir": tmp_path / "empty"})
    (found,) = failed(run_preflight(site), "cache_dir")
    assert "no feature cache manifest" in found


def test_a_cache_prepared_for_another_site(site_copy):
    site = site_copy.model_copy(update={"name": "site_b"})
    (found,) = failed(run_preflight(site), "name")
    assert "prepared for 'site_a', this config says 'site_b'" in found


def test_too_little_free_disk(site_copy):
    (found,) = failed(run_preflight(site_copy, min_free_gb=1e9), "cache_dir")
    assert "needs 1e+09 GiB" in found


def deployed(site: SiteConfig, folder: Path, **values) -> SiteConfig:
    ca = folder / "ca.pem"
    ca.write_text("not used")
    key = folder / "site_a"
    key.write_text("key")
    key.chmod(0o600)
    config = {"superlink": "127.0.0.1:1", "root_certificates": ca, "auth_private_key": key}
    return site.model_copy(update={"deployment": DeploymentConfig(**(config | values))})


def test_a_private_key_readable_by_others(site_copy, tmp_path):
    site = deployed(site_copy, tmp_path)
    site.deployment.auth_private_key.chmod(0o644)
    (found,) = failed(run_preflight(site), "deployment.auth_private_key")
    assert "mode 0644, expected 0600" in found


def test_a_malformed_allowlist(site_copy, tmp_path):
    allowlist = tmp_path / "approved_apps.toml"
    allowlist.write_text('[[app]]\nsha256 = "abc"\nnote = "too short"\n')
    site = deployed(site_copy, tmp_path, approved_apps=allowlist)
    (found,) = failed(run_preflight(site), "deployment.approved_apps")
    assert "expected [[app]] tables with sha256" in found


def test_a_deployed_site_without_an_allowlist_cannot_take_part(site_copy, tmp_path):
    """Without approved_apps the SuperNode would run whatever app the SuperLink sends."""
    site = deployed(site_copy, tmp_path)
    site.deployment.approved_apps = None
    (found,) = failed(run_preflight(site), "deployment.approved_apps")
    assert "would run any app" in found


def test_cli_exit_code_1_names_the_failing_field(site_copy, tmp_path, capsys):
    site = site_copy.model_copy(deep=True)
    site.data.stays_csv = tmp_path / "missing.csv"
    path = tmp_path / "site.toml"
    path.write_text(site.to_toml())
    assert main(["site", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "cannot take part" in out and "data.stays_csv" in out


# --------------------------------------------------------------------------- SuperLink TLS


@pytest.fixture
def tls_server(tmp_path) -> Iterator[tuple[str, CertificatePaths]]:
    """A TLS server on 127.0.0.1 with a certificate from a fresh consortium CA."""
    certs = make_certificates(tmp_path / "certs")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(connection, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}", certs
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_superlink_reachable_over_tls_with_the_ca(tls_server):
    address, certs = tls_server
    check = check_superlink(address, certs.ca_cert, "deployment.superlink")
    assert check.level == "ok" and "certificate verified" in check.found


def test_superlink_with_a_certificate_from_another_ca(tls_server, tmp_path):
    address, _ = tls_server
    other = make_certificates(tmp_path / "other")
    check = check_superlink(address, other.ca_cert, "deployment.superlink")
    assert check.level == "fail"
    assert "TLS handshake with CA" in check.found and "CERTIFICATE_VERIFY_FAILED" in check.found


def test_superlink_not_listening(tmp_path):
    certs = make_certificates(tmp_path / "certs")
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    check = check_superlink(f"127.0.0.1:{port}", certs.ca_cert, "deployment.superlink")
    assert check.level == "fail" and "cannot connect" in check.found


def test_cli_superlink_flag_uses_the_deployment_section(site_copy, tls_server, tmp_path, capsys):
    address, certs = tls_server
    allowlist = tmp_path / "approved_apps.toml"
    add_approval(allowlist, "a" * 64, note="reviewed")
    site = site_copy.model_copy(
        update={
            "deployment": DeploymentConfig(
                superlink=address,
                root_certificates=certs.ca_cert,
                auth_private_key=certs.server_key,  # any 0600 file
                approved_apps=allowlist,
            )
        }
    )
    path = tmp_path / "site.toml"
    path.write_text(site.to_toml())
    assert main(["site", "check", str(path), "--superlink"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "│ superlink" in line]
    assert rows and "ok" in rows[0]
