"""Sites that cannot take part, on a real loopback deployment (TLS SuperLink, SuperNode
authentication, one `flwr run`; issue #10 point 9).

Three MIMIC-format sites (tiny synthetic files, `omnifuse partition`, feature caches built
by `prepare_site`) each run their own authenticated SuperNode:

* site_a is healthy and trains round 1;
* site_b built its report features with another WordPiece vocabulary than the consortium's:
  the statistics phase excludes it (``fingerprint_mismatch:rep``), it is never sent training;
* site_c's config points its feature cache at a folder that does not exist on its disk:
  loading fails with that local path in the exception text in every step. The path stays in
  site_c's own SuperNode log; the server only learns a named error code, and since site_c
  failed every round the run ends failed, naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from client.statistics import cache_fingerprints
from omnifuse_model.data.features.cache import prepare_site
from omnifuse_model.site_config import BackboneConfig, SiteConfig, load_site_config
from server.audit_log import read_audit
from simulation.deploy import LocalDeployment
from simulation.partition import SERVER_TEST_SITE, PartitionConfig, SitePlan, partition
from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic
from tests.deployment.conftest import write_vocab

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SITES = ("site_a", "site_b", "site_c")
PRIVATE_FOLDER = "ward7_private_volume"  # in site_c's local path, nowhere else


def _rewrite(path: Path, **update: object) -> SiteConfig:
    """Change fields of the site config at ``path`` (written back as TOML)."""
    site = load_site_config(path).model_copy(update=update)
    path.write_text(site.to_toml(), encoding="utf-8")
    return load_site_config(path)


def _scenario(root: Path) -> tuple[Path, Path, SiteConfig]:
    """The scenario, site_c's missing cache folder and site_a's prepared config."""
    data = root / "data"
    write_synthetic_mimic(
        SyntheticMimicConfig(num_stays=90, seed=11, image_size=32, mortality_prevalence=0.4),
        data,
        False,
    )
    words = ["no acute findings", "pleural effusion left", "mild cardiomegaly"]
    consortium_vocab = write_vocab(root / "consortium_vocab.txt", words)
    own_vocab = write_vocab(root / "site_b_vocab.txt", ["small right opacity", "line in place"])
    scenario = root / "scenario"
    partition(
        PartitionConfig(
            data_dir=data,
            sites=[SitePlan(name=name) for name in SITES],
            seed=1,
            d=8,
            backbones=BackboneConfig(wordpiece_vocab=consortium_vocab),
        ),
        scenario,
        console=Console(quiet=True),
    )
    site_b = _rewrite(
        scenario / "site_b" / "site.toml",
        backbones=BackboneConfig(wordpiece_vocab=own_vocab),
    )
    missing = root / "site_c_host" / PRIVATE_FOLDER / "feature_cache"
    _rewrite(scenario / "site_c" / "site.toml", cache_dir=missing)
    site_a = load_site_config(scenario / "site_a" / "site.toml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for site in (site_a, site_b, load_site_config(scenario / SERVER_TEST_SITE / "site.toml")):
            prepare_site(site, progress=False, batch_size=16)
    finally:
        torch.set_num_threads(threads)
    return scenario, missing, site_a


def _server_side_text(deployment: LocalDeployment, run_dir: Path) -> str:
    """Everything the consortium side has: ServerApp output, SuperLink log, run files."""
    files = [deployment.work_dir / name for name in ("flwr_run.log", "superlink.log")]
    files += [deployment.work_dir / "superlink.out"]
    files += sorted(path for path in run_dir.rglob("*") if path.suffix in {".json", ".csv"})
    return "\n".join(path.read_text(errors="replace") for path in files if path.is_file())


def test_mismatched_backbone_excluded_failing_site_named_its_path_kept_local(tmp_path):
    scenario, missing, site_a = _scenario(tmp_path)
    consortium = cache_fingerprints(site_a, ["cxr", "rep"])
    assert set(consortium) == {"cxr", "rep"}
    run_dir = tmp_path / "deployment" / "run"
    with LocalDeployment(tmp_path / "deployment") as deployment:
        deployment.start_superlink(node_auth=True)
        nodes, processes = {}, {}
        for site in SITES:
            keys = deployment.make_keys(site)
            nodes[site] = deployment.register(keys.public_key, name=site)
            processes[site] = deployment.start_supernode(
                site, scenario / site / "site.toml", keys.private_key
            )
        deployment.wait_online(set(nodes.values()), timeout=180)
        returncode = deployment.run(
            {
                "scenario-dir": str(scenario),
                "run-dir": str(run_dir),
                "num-server-rounds": 1,
                "min-available-nodes": 3,
                "min-train-nodes": 1,
                "min-evaluate-nodes": 1,
                "seed": 1,
                "round-timeout": 300.0,
                # the consortium's backbones (site_c never answers the statistics query, so
                # two answering sites could not outvote each other)
                "expected-fingerprints": ",".join(f"{k}={v}" for k, v in consortium.items()),
            },
            timeout=900,
        )
        logs = {site: process.log_text() for site, process in processes.items()}
    run_log = (deployment.work_dir / "flwr_run.log").read_text(errors="replace")
    server_text = _server_side_text(deployment, run_dir)
    history = json.loads((run_dir / "metrics.json").read_text())
    outcome = json.loads((run_dir / "outcome.json").read_text())
    audit = {(row.site, row.round): row.update_status for row in read_audit(run_dir)}

    # site_a trained round 1 with the federated normaliser
    assert audit.get(("site_a", 1)) == "accepted", (audit, run_log[-4000:])
    assert json.loads((run_dir / "ehr_normalizer.json").read_text())
    # site_b: excluded by the statistics phase for its report backbone, never asked to train
    assert history["1"]["excluded"] == {"site_b": "fingerprint_mismatch:rep"}, history
    assert audit.get(("site_b", 1)) == "excluded:fingerprint_mismatch:rep", audit
    assert "site_b" not in {entry.get("site") for entry in history["1"]["failed_or_rejected"]}
    assert "statistics phase: site site_b excluded: fingerprint_mismatch:rep" in run_log
    # (flwr 1.42's SuperNode logs each message it takes: site_b got only the two queries)
    assert "Receiving: train message" in logs["site_a"], logs["site_a"][-4000:]
    assert "Receiving: train message" not in logs["site_b"], logs["site_b"][-4000:]
    assert "Receiving: evaluate message" not in logs["site_b"]
    # site_c: failed every step; the run ends failed and names it with a code, no path
    assert outcome["status"] == "failed", outcome
    assert len(outcome["failing"]) == 1, outcome
    (reason,) = outcome["failing"].values()
    assert "data_unreadable:FileNotFoundError:site=site_c" in reason, outcome
    assert "site=site_c" in outcome["reason"] and "SitesFailedError" in run_log, returncode
    # the local path is in site_c's own log, nowhere on the consortium side
    assert "Receiving: train message" in logs["site_c"], logs["site_c"][-4000:]
    assert f"FileNotFoundError: {missing}" in logs["site_c"], logs["site_c"][-4000:]
    for private in (str(missing), PRIVATE_FOLDER):
        assert private not in server_text, private
    for site in ("site_a", "site_b"):
        assert PRIVATE_FOLDER not in logs[site]
