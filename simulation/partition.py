"""Split a MIMIC-format dataset into hospital sites: `omnifuse partition`.

Patients are assigned whole (never one subject at two sites) from the task's train and val
listfiles; the task's test split becomes the server's held-out test site. Each site gets a
data view in the real layouts (its own listfiles with per-file links to the episode CSVs, its
own all_stays.csv rows, its own CXR metadata rows and report links), so the same readers run
on it, plus a site config. Per-site modality availability (a site without reports, a site
keeping 30% of its X-rays), label skew (a Dirichlet(alpha) share of each class per site) and
size skew (site weights) are parameters.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator
from rich.console import Console
from rich.table import Table

from omnifuse_model.config import OmniFuseConfig, StrictModel
from omnifuse_model.data.reports.sections import report_path
from omnifuse_model.scenario import Scenario, SiteSummary
from omnifuse_model.site_config import (
    MIMIC_TASK_OUTPUTS,
    BackboneConfig,
    MimicTask,
    SiteConfig,
    SiteDataConfig,
)

MODALITIES = ("ehr", "cxr", "rep")
SPLITS = ("train", "val", "test")


class SitePlan(StrictModel):
    """One site of the partition."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    modalities: list[str] = Field(default_factory=lambda: list(MODALITIES), min_length=1)
    size_weight: float = Field(default=1.0, gt=0, description="Relative share of patients.")
    cxr_keep: float = Field(default=1.0, ge=0, le=1, description="Share of X-ray studies kept.")
    rep_keep: float = Field(default=1.0, ge=0, le=1, description="Share of reports kept.")

    @model_validator(mode="after")
    def _known(self) -> SitePlan:
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or "ehr" not in self.modalities:
            raise ValueError(
                f"site '{self.name}': modalities must include 'ehr' and come from "
                f"{list(MODALITIES)}, got {self.modalities}"
            )
        return self


class PartitionConfig(StrictModel):
    """How to partition ``data_dir`` (a folder in the synthetic writer's layout, or real
    MIMIC folders given one by one)."""

    data_dir: Path
    task: MimicTask = "in-hospital-mortality"
    sites: list[SitePlan] = Field(min_length=1)
    label_alpha: float | None = Field(
        default=None, gt=0, description="Dirichlet alpha for label skew; None = no skew."
    )
    seed: int = 0
    min_subjects: int = Field(default=3, ge=1, description="Fewest subjects a site may get.")
    backbones: BackboneConfig = Field(default_factory=BackboneConfig)
    d: int = Field(default=64, gt=0, description="Embedding width of the scenario's model.")

    @model_validator(mode="after")
    def _unique(self) -> PartitionConfig:
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"sites: names must be unique, got {names}")
        return self


def default_site_plans(count: int, size_skew: float = 0.0, seed: int = 0) -> list[SitePlan]:
    """Hospitals with different gaps: all modalities; no reports; 70% of X-rays missing;
    then the pattern repeats. ``size_skew`` > 0 draws log-normal size weights."""
    patterns = [
        {"modalities": ["ehr", "cxr", "rep"]},
        {"modalities": ["ehr", "cxr"]},
        {"modalities": ["ehr", "cxr", "rep"], "cxr_keep": 0.3},
    ]
    rng = np.random.default_rng(seed + 17)
    weights = np.exp(size_skew * rng.standard_normal(count)) if size_skew > 0 else np.ones(count)
    return [
        SitePlan(
            name=f"hospital_{chr(ord('a') + i)}" if count <= 26 else f"hospital_{i:03d}",
            size_weight=float(weights[i]),
            **patterns[i % len(patterns)],
        )
        for i in range(count)
    ]


# -- reading the source ---------------------------------------------------------------------
def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise ValueError(f"{path}: empty file, expected a header row")
    return rows[0], rows[1:]


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        os.symlink(source.resolve(), target)
    except OSError:  # filesystems without symlinks
        shutil.copy2(source, target)


def _subject(stay_name: str) -> int:
    return int(stay_name.split("_", 1)[0])


def _source_paths(data_dir: Path, task: str) -> dict[str, Path]:
    paths = {
        "task": data_dir / task,
        "stays": data_dir / "root" / "all_stays.csv",
        "cxr": data_dir / "mimic-cxr-jpg",
        "reports": data_dir / "mimic-cxr-reports",
    }
    if not (paths["task"] / "train_listfile.csv").is_file():
        raise FileNotFoundError(f"{paths['task']}: no train_listfile.csv (is --data a MIMIC root?)")
    if not paths["stays"].is_file():
        raise FileNotFoundError(f"{paths['stays']} not found")
    metadata = [paths["cxr"] / f"mimic-cxr-2.0.0-metadata.csv{s}" for s in ("", ".gz")]
    paths["metadata"] = next((p for p in metadata if p.is_file()), metadata[0])
    return paths


# -- assignment -----------------------------------------------------------------------------
def assign_subjects(
    subject_class: dict[int, int],
    plans: list[SitePlan],
    alpha: float | None,
    seed: int,
    min_subjects: int,
) -> dict[int, int]:
    """Subject -> site index. Each class's subjects are split by the site size weights,
    times a Dirichlet(alpha) draw per class when ``alpha`` is set (label skew)."""
    rng = np.random.default_rng(seed)
    weights = np.array([p.size_weight for p in plans], dtype=float)
    by_class: dict[int, list[int]] = defaultdict(list)
    for subject, label in sorted(subject_class.items()):
        by_class[label].append(subject)
    if len(subject_class) < min_subjects * len(plans):
        raise ValueError(
            f"{len(subject_class)} subjects cannot give {len(plans)} sites {min_subjects} each"
        )
    for _attempt in range(100):
        assignment: dict[int, int] = {}
        for label in sorted(by_class):
            subjects = list(by_class[label])
            rng.shuffle(subjects)
            share = weights * (rng.dirichlet(np.full(len(plans), alpha)) if alpha else 1.0)
            share = share / share.sum()
            cuts = np.floor(np.cumsum(share) * len(subjects) + 0.5).astype(int)
            for site, chunk in enumerate(np.split(np.array(subjects, dtype=np.int64), cuts[:-1])):
                assignment.update({int(s): site for s in chunk})
        sizes = np.bincount(list(assignment.values()), minlength=len(plans))
        if sizes.min() >= min_subjects:
            return assignment
    raise ValueError(
        f"could not give every site >= {min_subjects} subjects in 100 draws (alpha {alpha}); "
        "raise alpha or lower min_subjects"
    )


# -- writing site views ---------------------------------------------------------------------
def _class_of(row: list[str], header: list[str], task: str) -> int:
    if task == "in-hospital-mortality":
        return int(float(row[header.index("y_true")]))
    labels = [float(v) for v in row[-25:]]
    return int(sum(labels) >= 3)  # phenotyping: many vs few conditions


def _site_config(
    plan: SitePlan, task: str, paths: dict[str, Path], backbones: BackboneConfig, has_metadata: bool
) -> SiteConfig:
    """The site's config; its relative paths resolve against the site folder."""
    data: dict[str, object] = {
        "source": "feature_cache",
        "benchmark_dir": Path(task),
        "stays_csv": Path("all_stays.csv"),
        # the federation's normaliser (from every site's sums), see `omnifuse prepare --scenario`
        "ehr_normalizer": Path("../ehr_normalizer.json"),
    }
    if "cxr" in plan.modalities and has_metadata:
        data["cxr_dir"] = paths["cxr"].resolve()
        data["cxr_metadata"] = Path("mimic-cxr-2.0.0-metadata.csv")
    if "rep" in plan.modalities:
        data["reports_dir"] = Path("mimic-cxr-reports")
    weights, bert = backbones.resnet34_weights, backbones.bert_dir
    return SiteConfig(
        name=plan.name,
        task=task,
        modalities=plan.modalities,
        # outside the site view, so re-partitioning keeps the (content-keyed) cache
        cache_dir=Path(f"../cache/{plan.name}"),
        device="auto",
        data=SiteDataConfig.model_validate(data),
        backbones=BackboneConfig(
            resnet34_weights=weights.resolve() if weights else None,
            bert_dir=bert.resolve() if bert else None,
        ),
    )


def _write_site(
    site_dir: Path,
    plan: SitePlan,
    subjects: set[int],
    split_rows: dict[str, list[list[str]]],
    source: dict,
    config: PartitionConfig,
    rng: np.random.Generator,
) -> dict[str, object]:
    task, paths = config.task, source["paths"]
    if site_dir.exists():
        shutil.rmtree(site_dir)
    task_dir = site_dir / task
    counts: dict[str, object] = {"site": plan.name, "subjects": len(subjects)}
    for split in SPLITS:
        rows = [r for r in split_rows[split] if _subject(r[0]) in subjects]
        _write_csv(task_dir / f"{split}_listfile.csv", source["list_header"], rows)
        folder = "test" if split == "test" else "train"
        for row in rows:
            _link(paths["task"] / folder / row[0], task_dir / folder / row[0])
        counts[f"{split}_stays"] = len(rows)
        if rows and task == "in-hospital-mortality":
            counts[f"{split}_positive"] = sum(int(float(r[-1])) for r in rows)
    stays_header, stays_rows = source["stays"]
    column = next(i for i, h in enumerate(stays_header) if h.lower() == "subject_id")
    _write_csv(
        site_dir / "all_stays.csv",
        stays_header,
        [r for r in stays_rows if int(r[column]) in subjects],
    )
    counts["cxr_images"] = counts["reports"] = 0
    metadata = source["metadata"]
    if metadata is not None and ("cxr" in plan.modalities or "rep" in plan.modalities):
        header, rows = metadata
        col = {name: header.index(name) for name in ("dicom_id", "subject_id", "study_id")}
        mine = [r for r in rows if int(float(r[col["subject_id"]])) in subjects]
        studies = sorted({int(float(r[col["study_id"]])) for r in mine})
        kept = {s for s in studies if rng.random() < plan.cxr_keep}
        if "cxr" in plan.modalities:
            kept_rows = [r for r in mine if int(float(r[col["study_id"]])) in kept]
            _write_csv(site_dir / "mimic-cxr-2.0.0-metadata.csv", header, kept_rows)
            counts["cxr_images"] = len(kept_rows)
        if "rep" in plan.modalities:
            reported = {
                s
                for s in sorted(kept if "cxr" in plan.modalities else studies)
                if rng.random() < plan.rep_keep
            }
            for row in mine:
                study = int(float(row[col["study_id"]]))
                subject = int(float(row[col["subject_id"]]))
                relative = report_path(subject, study)
                source_report = paths["reports"] / relative
                if study in reported and source_report.is_file():
                    _link(source_report, site_dir / "mimic-cxr-reports" / relative)
            counts["reports"] = len(list((site_dir / "mimic-cxr-reports").rglob("*.txt")))
    site = _site_config(plan, task, paths, config.backbones, metadata is not None)
    (site_dir / "site.toml").write_text(site.to_toml(), encoding="utf-8")
    counts["modalities"] = "+".join(plan.modalities)
    return counts


def mimic_model_config(task: str, d: int) -> OmniFuseConfig:
    """The federation's model for MIMIC: ehr 24 x 76, cxr ResNet34 512, rep 150 x 768."""
    from omnifuse_model.data.features.site_dataset import mimic_model_modalities

    output = MIMIC_TASK_OUTPUTS[task]
    return OmniFuseConfig(
        modalities=mimic_model_modalities(),
        task=output.task,
        num_classes=output.num_classes,
        d=d,
    )


def partition(config: PartitionConfig, out_dir: Path, console: Console | None = None) -> Scenario:
    """Write every site's view + site.toml, the server test site, scenario.json."""
    console = console or Console()
    out_dir = Path(out_dir)
    paths = _source_paths(config.data_dir, config.task)
    list_header, _ = _read_csv(paths["task"] / "train_listfile.csv")
    split_rows = {s: _read_csv(paths["task"] / f"{s}_listfile.csv")[1] for s in SPLITS}
    source = {
        "paths": paths,
        "list_header": list_header,
        "stays": _read_csv(paths["stays"]),
        "metadata": _read_csv(paths["metadata"]) if paths["metadata"].is_file() else None,
    }
    subject_class: dict[int, int] = {}
    for row in split_rows["train"] + split_rows["val"]:
        subject = _subject(row[0])
        subject_class[subject] = max(
            subject_class.get(subject, 0), _class_of(row, list_header, config.task)
        )
    assignment = assign_subjects(
        subject_class, config.sites, config.label_alpha, config.seed, config.min_subjects
    )
    rng = np.random.default_rng(config.seed + 1)
    rows, site_configs = [], []
    for index, plan in enumerate(config.sites):
        subjects = {s for s, site in assignment.items() if site == index}
        site_rows = {**split_rows, "test": []}
        rows.append(
            _write_site(out_dir / plan.name, plan, subjects, site_rows, source, config, rng)
        )
        site_configs.append(Path(plan.name, "site.toml"))
    test_plan = SitePlan(name="server_test")
    test_subjects = {_subject(r[0]) for r in split_rows["test"]}
    test_rows = {"train": [], "val": [], "test": split_rows["test"]}
    rows.append(
        _write_site(
            out_dir / "server_test", test_plan, test_subjects, test_rows, source, config, rng
        )
    )
    scenario = Scenario(
        kind="mimic",
        task=config.task,
        site_configs=site_configs,
        server_test_site=Path("server_test/site.toml"),
        model_config=mimic_model_config(config.task, config.d),
        partition=json.loads(config.model_dump_json()),
        sites=[SiteSummary.model_validate(row) for row in rows],
    )
    scenario.write(out_dir)
    _print_table(console, rows)
    return scenario


def _print_table(console: Console, rows: list[dict]) -> None:
    table = Table(title="Sites")
    columns = [
        "site",
        "modalities",
        "subjects",
        "train_stays",
        "val_stays",
        "test_stays",
        "train_positive",
        "cxr_images",
        "reports",
    ]
    for column in columns:
        table.add_column(column.replace("_", " "), justify="left" if column == "site" else "right")
    for row in rows:
        table.add_row(*(str(row.get(c, "-")) for c in columns))
    console.print(table)
