"""Every message a ClientApp returns holds only parameter arrays and aggregate metrics:
no per-sample arrays, no stay or subject identifiers (a MIMIC-format site, real readers)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import evaluate, query, train
from omnifuse_model import federation_schema as wire
from omnifuse_model.config import OmniFuseConfig, TrainConfig
from omnifuse_model.data.features.backbones import wordpiece_vocabulary, write_wordpiece_vocabulary
from omnifuse_model.data.features.cache import prepare_site
from omnifuse_model.data.features.site_dataset import mimic_model_modalities
from omnifuse_model.data.ingest import ingest_site
from omnifuse_model.federation_replies import STATISTICS
from omnifuse_model.model import OmniFuse
from omnifuse_model.round_plan import RoundPlan
from omnifuse_model.site_config import BackboneConfig, SiteConfig
from server.statistics_phase import statistics_messages
from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic


@pytest.fixture(scope="module")
def mimic_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site") / "data"
    write_synthetic_mimic(
        SyntheticMimicConfig(num_stays=60, seed=5, image_size=32), root, progress=False
    )
    site = SiteConfig(
        name="hospital_x",
        modalities=["ehr", "cxr", "rep"],
        cache_dir=root.parent / "cache",
        device="cpu",
        data={
            "benchmark_dir": root / "in-hospital-mortality",
            "stays_csv": root / "root" / "all_stays.csv",
            "cxr_dir": root / "mimic-cxr-jpg",
            "reports_dir": root / "mimic-cxr-reports",
        },
    )
    # a deployed site embeds reports with the consortium's vocabulary file
    texts = [s.report_text for s in ingest_site(site).split("train") if s.report_text]
    write_wordpiece_vocabulary(wordpiece_vocabulary(texts), root.parent / "vocab.txt")
    backbones = BackboneConfig(wordpiece_vocab=root.parent / "vocab.txt")
    site = site.model_copy(update={"backbones": backbones})
    prepare_site(site, progress=False)
    toml = root.parent / "site.toml"
    toml.write_text(
        'name = "hospital_x"\nmodalities = ["ehr", "cxr", "rep"]\ncache_dir = "cache"\n'
        'device = "cpu"\n[data]\nbenchmark_dir = "data/in-hospital-mortality"\n'
        'stays_csv = "data/root/all_stays.csv"\ncxr_dir = "data/mimic-cxr-jpg"\n'
        'reports_dir = "data/mimic-cxr-reports"\n[backbones]\nwordpiece_vocab = "vocab.txt"\n'
    )
    identifiers = set()
    for listfile in (root / "in-hospital-mortality").glob("*_listfile.csv"):
        for line in listfile.read_text().splitlines()[1:]:
            stay = line.split(",")[0]
            identifiers |= {stay, stay.split("_")[0]}
    stays = (root / "root" / "all_stays.csv").read_text().splitlines()
    identifiers |= {row.split(",")[2] for row in stays[1:]}  # ICUSTAY_IDs
    return toml, identifiers


def _request(message_type: str, config: OmniFuseConfig) -> Message:
    torch.manual_seed(0)
    state = OmniFuse(config).state_dict()
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord(state),
            wire.CONFIG: ConfigRecord(
                {
                    wire.ROUND_PLAN: RoundPlan(
                        model=config,
                        train=TrainConfig(
                            epochs=1,
                            batch_size=16,
                            seed=0,
                            progress=False,
                            bootstrap_samples=0,
                            patience=0,
                        ),
                        global_round=1,
                        audit_min_count=5,
                    ).model_dump_json()
                }
            ),
        }
    )
    return Message(content=content, message_type=message_type, dst_node_id=1)


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def test_client_replies_hold_only_weights_and_aggregates(flower_task_identity, mimic_site):
    toml, identifiers = mimic_site
    assert len(identifiers) > 50  # stay names, subject ids, ICU stay ids of the site
    config = OmniFuseConfig(
        modalities=mimic_model_modalities(), task="binary", d=8, cra_hidden=(16, 8), num_blocks=1
    )
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"site-config": str(toml)},
        state=RecordDict(),
        run_config={},
    )
    expected = {k: tuple(v.shape) for k, v in OmniFuse(config).state_dict().items()}
    for handler, kind in ((train, MessageType.TRAIN), (evaluate, MessageType.EVALUATE)):
        reply = handler(_request(kind, config), context)
        content = reply.content
        allowed = {wire.ARRAYS, wire.METRICS, wire.AUDIT, wire.TLA_SUMS}
        assert set(content.keys()) <= allowed
        if wire.ARRAYS in content:  # exactly the model's parameters, nothing sample-shaped
            arrays = {k: tuple(v.shape) for k, v in content[wire.ARRAYS].items()}
            assert arrays == expected
        for value in content[wire.METRICS].values():  # scalars only
            assert isinstance(value, int | float)
        texts = []
        for name in (wire.AUDIT, wire.TLA_SUMS):
            if name in content:
                record = dict(content[name])
                assert all(isinstance(v, int | float | str) for v in record.values())
                texts += _strings(record)
                if name == wire.AUDIT:
                    texts += _strings(json.loads(record["row"]))
        texts += list(content[wire.METRICS].keys())
        blob = " ".join(texts)
        leaked = sorted(i for i in identifiers if re.search(rf"(?<!\d){re.escape(i)}(?!\d)", blob))
        assert not leaked, f"identifiers in a reply: {leaked[:5]}"
        numbers = [v for v in content[wire.METRICS].values()]
        assert np.isfinite(numbers).all()


def test_the_statistics_answer_holds_only_sums_and_fingerprints(flower_task_identity, mimic_site):
    """The statistics phase: per-column count, sums and sums of squares of the train EHR
    (never a per-stay value) and 64-hex fingerprints; nothing that names a stay."""
    toml, identifiers = mimic_site
    config = OmniFuseConfig(
        modalities=mimic_model_modalities(), task="binary", d=8, cra_hidden=(16, 8), num_blocks=1
    )
    context = Context(
        run_id=1, node_id=1, node_config={"site-config": str(toml)}, state=RecordDict(),
        run_config={},
    )  # fmt: skip
    [request] = statistics_messages([1], config.model_dump_json(), min_count=5)
    content = query(request, context).content
    assert set(content.keys()) == {STATISTICS}
    record = dict(content[STATISTICS])
    assert set(record) == {
        "ehr-stays", "ehr-count", "ehr-sums", "ehr-sumsq",
        "fingerprint.ehr", "fingerprint.cxr", "fingerprint.rep",
    }  # fmt: skip
    assert len(record["ehr-sums"]) == len(record["ehr-sumsq"]) == 76
    assert record["ehr-count"] >= 2 * record["ehr-stays"] > 0
    assert all(re.fullmatch("[0-9a-f]{64}", v) for k, v in record.items() if "fingerprint" in k)
    blob = " ".join(str(v) for v in record.values())
    assert not [i for i in identifiers if re.search(rf"(?<![\d.]){re.escape(i)}(?![\d.])", blob)]
    [few] = statistics_messages([1], config.model_dump_json(), min_count=10_000)
    withheld = dict(query(few, context).content[STATISTICS])
    assert withheld["ehr-count"] == 0 and "ehr-sums" not in withheld  # below the threshold
