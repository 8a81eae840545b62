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
from collections import defaultdict
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator
from rich import box
from rich.console import Console
from rich.table import Table

from omnifuse_model.config import OmniFuseConfig, StrictModel
from omnifuse_model.data.reports.sections import report_path
from omnifuse_model.scenario import Scenario, SiteSummary
from omnifuse_model.site_config import (
    MIMIC_TASK_OUTPUTS,
    SITE_NAME_PATTERN,
    BackboneConfig,
    MimicTask,
    SiteConfig,
    SiteDataConfig,
)
from simulation.safe_paths import (
    STAY_FILE,
    check_name,
    inside,
    link_or_copy,
    remove_tree,
    writable,
)
from simulation.site_names import SiteLegend
from simulation.site_sidecar import sidecar_assignment
from simulation.split_scoring import SmallSplitError, small_splits

MODALITIES = ("ehr", "cxr", "rep")
SPLITS = ("train", "val", "test")
SERVER_TEST_SITE = "server_test"
CXR_METADATA = "mimic-cxr-2.0.0-metadata.csv"


class SitePlan(StrictModel):
    """One site of the partition."""

    name: str = Field(pattern=SITE_NAME_PATTERN)
    modalities: list[str] = Field(default_factory=lambda: list(MODALITIES), min_length=1)
    size_weight: float = Field(
        default=1.0, gt=0, allow_inf_nan=False, description="Relative share of patients."
    )
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
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Dirichlet alpha for label skew; None = no skew.",
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Random seed.")
    min_subjects: int = Field(default=3, ge=1, description="Fewest subjects a site may get.")
    site_sidecar: Path | None = Field(
        default=None,
        description="CSV with subject_id and site_column (e.g. the synthetic writer's "
        "synthetic_stays.csv): each subject goes to the site so named, instead of a random draw.",
    )
    site_column: str = Field(default="hospital", min_length=1, description="See site_sidecar.")
    backbones: BackboneConfig = Field(default_factory=BackboneConfig)
    d: int = Field(default=64, gt=0, description="Embedding width of the scenario's model.")

    @model_validator(mode="after")
    def _unique(self) -> PartitionConfig:
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"sites: names must be unique, got {names}")
        if SERVER_TEST_SITE in names:
            raise ValueError(f"sites: '{SERVER_TEST_SITE}' is the server's test site, not a name")
        if self.site_sidecar is not None and self.label_alpha is not None:
            raise ValueError("label_alpha: no label skew when site_sidecar assigns the subjects")
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
class InputRowError(ValueError):
    """A row of an input file cannot be used (the message names the file, line and value)."""


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


def _binary(path: Path, line: int, column: str, value: str) -> int:
    """A 0/1 label cell ("1", "0", "1.0"); anything else (NaN, blank, 2) names the cell."""
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if number not in (0.0, 1.0):
        raise InputRowError(f"{path}, line {line}: {column} is {value!r}, expected 0 or 1")
    return int(number)


def read_listfile(path: Path, task: str) -> tuple[list[str], list[list[str]]]:
    """A task listfile whose every row is checked: a stay file name in the benchmark's
    pattern (it becomes a path), as many cells as the header, 0/1 labels.

    Raises `InputRowError` naming the file and line of the first bad row.
    """
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header or header[0] != "stay":
            raise InputRowError(f"{path}, line 1: header {header!r}, expected 'stay,...'")
        labels = ["y_true"] if task == "in-hospital-mortality" else header[-25:]
        if task == "in-hospital-mortality" and "y_true" not in header:
            raise InputRowError(f"{path}, line 1: no y_true column in {header}")
        rows = []
        for row in reader:
            line = reader.line_num
            if not row or not any(cell.strip() for cell in row):
                raise InputRowError(f"{path}, line {line}: blank line, expected a stay row")
            if len(row) != len(header):
                raise InputRowError(
                    f"{path}, line {line}: {len(row)} cells, expected {len(header)} ({header})"
                )
            if not STAY_FILE.fullmatch(row[0]):
                raise InputRowError(
                    f"{path}, line {line}: stay {row[0]!r}, expected a file name like "
                    "12345_episode1_timeseries.csv"
                )
            for name in labels:
                _binary(path, line, name, row[header.index(name)])
            rows.append(row)
    return header, rows


def _int_cells(path: Path, header: list[str], rows: list[list[str]], column: str) -> list[int]:
    """Column ``column`` of ``rows`` as integers ("123" or "123.0"), naming a bad cell's line."""
    index = next((i for i, h in enumerate(header) if h.lower() == column), None)
    if index is None:
        raise InputRowError(f"{path}, line 1: no {column} column in {header}")
    values = []
    for line, row in enumerate(rows, start=2):
        try:
            number = float(row[index])
            if not number.is_integer():
                raise ValueError
        except (ValueError, IndexError):
            cell = row[index] if index < len(row) else "<missing>"
            raise InputRowError(
                f"{path}, line {line}: {column} is {cell!r}, expected an integer"
            ) from None
        values.append(int(number))
    return values


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
    """A row's class for label skew (rows were checked by `read_listfile`)."""
    if task == "in-hospital-mortality":
        return int(float(row[header.index("y_true")]))
    labels = [float(v) for v in row[-25:]]
    return int(sum(labels) >= 3)  # phenotyping: many vs few conditions


def _vocabulary(backbones: BackboneConfig) -> Path | None:
    """The consortium's WordPiece vocabulary file for the report fallback: the one given,
    else ``wordpiece_vocab.txt`` next to scenario.json (`omnifuse prepare --scenario` writes
    it from the sites' train reports); none with a local BERT."""
    if backbones.bert_dir is not None:
        return None
    if backbones.wordpiece_vocab is not None:
        return backbones.wordpiece_vocab.resolve()
    return Path("../wordpiece_vocab.txt")


def _site_config(
    plan: SitePlan, task: str, paths: dict[str, Path], backbones: BackboneConfig, has_metadata: bool
) -> SiteConfig:
    """The site's config; its relative paths resolve against the site folder."""
    data: dict[str, object] = {
        "source": "feature_cache",
        "benchmark_dir": Path(task),
        "stays_csv": Path("all_stays.csv"),
        # no data.ehr_normalizer: the federation sends the normaliser of its statistics phase
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
            wordpiece_vocab=_vocabulary(backbones) if "rep" in plan.modalities else None,
        ),
    )


def _write_listfiles(
    site_dir: Path, subjects: set[int], split_rows: dict[str, list[list[str]]], source: dict
) -> dict[str, object]:
    """Each split's listfile rows of ``subjects`` and a link per stay file; the counts."""
    task, header = source["task"], source["list_header"]
    task_dir, counts = site_dir / task, {}
    for split in SPLITS:
        rows = [r for r in split_rows[split] if _subject(r[0]) in subjects]
        _write_csv(inside(site_dir, task_dir / f"{split}_listfile.csv"), header, rows)
        folder = "test" if split == "test" else "train"
        for row in rows:
            link_or_copy(
                source["paths"]["task"] / folder / row[0], task_dir / folder / row[0], site_dir
            )
        counts[f"{split}_stays"] = len(rows)
        if rows and task == "in-hospital-mortality":
            label = header.index("y_true")
            counts[f"{split}_positive"] = sum(int(float(r[label])) for r in rows)
    return counts


def _write_images_and_reports(
    site_dir: Path, plan: SitePlan, subjects: set[int], source: dict, rng: np.random.Generator
) -> dict[str, object]:
    """The site's kept CXR metadata rows and links to the kept studies' reports; counts."""
    counts: dict[str, object] = {"cxr_images": 0, "reports": 0}
    metadata = source["metadata"]
    if metadata is None or not ({"cxr", "rep"} & set(plan.modalities)):
        return counts
    header, rows, subject_ids, study_ids = metadata
    mine = [i for i, subject in enumerate(subject_ids) if subject in subjects]
    studies = sorted({study_ids[i] for i in mine})
    kept = {s for s in studies if rng.random() < plan.cxr_keep}
    if "cxr" in plan.modalities:
        kept_rows = [rows[i] for i in mine if study_ids[i] in kept]
        _write_csv(inside(site_dir, site_dir / CXR_METADATA), header, kept_rows)
        counts["cxr_images"] = len(kept_rows)
    if "rep" in plan.modalities:
        pool = kept if "cxr" in plan.modalities else studies
        reported = {s for s in sorted(pool) if rng.random() < plan.rep_keep}
        reports = source["paths"]["reports"]
        for i in mine:
            relative = report_path(subject_ids[i], study_ids[i])
            if study_ids[i] in reported and (reports / relative).is_file():
                target = site_dir / "mimic-cxr-reports" / relative
                link_or_copy(reports / relative, target, site_dir)
        counts["reports"] = len(list((site_dir / "mimic-cxr-reports").rglob("*.txt")))
    return counts


def _write_site(
    out_dir: Path,
    plan: SitePlan,
    subjects: set[int],
    split_rows: dict[str, list[list[str]]],
    source: dict,
    config: PartitionConfig,
    rng: np.random.Generator,
) -> dict[str, object]:
    """Replace ``out_dir/<site>`` with the site's view and site.toml; its counts."""
    task, paths, metadata = config.task, source["paths"], source["metadata"]
    site_dir = inside(out_dir, out_dir / check_name(plan.name, "site name"))
    remove_tree(out_dir, site_dir)
    counts: dict[str, object] = {"site": plan.name, "subjects": len(subjects)}
    counts.update(_write_listfiles(site_dir, subjects, split_rows, source))
    stays_header, stays_rows, stay_subjects = source["stays"]
    mine = [
        row for row, subject in zip(stays_rows, stay_subjects, strict=True) if subject in subjects
    ]
    _write_csv(inside(site_dir, site_dir / "all_stays.csv"), stays_header, mine)
    counts.update(_write_images_and_reports(site_dir, plan, subjects, source, rng))
    writable(site_dir, site_dir / "site.toml")
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


def _read_source(config: PartitionConfig) -> tuple[dict, dict[str, list[list[str]]]]:
    """Every source table, each row checked; the listfile rows per split."""
    paths = _source_paths(config.data_dir, config.task)
    listfiles = {s: read_listfile(paths["task"] / f"{s}_listfile.csv", config.task) for s in SPLITS}
    stays_header, stays_rows = _read_csv(paths["stays"])
    source: dict = {
        "task": config.task,
        "paths": paths,
        "list_header": listfiles["train"][0],
        "stays": (
            stays_header,
            stays_rows,
            _int_cells(paths["stays"], stays_header, stays_rows, "subject_id"),
        ),
        "metadata": None,
    }
    if paths["metadata"].is_file():
        header, rows = _read_csv(paths["metadata"])
        source["metadata"] = (
            header,
            rows,
            _int_cells(paths["metadata"], header, rows, "subject_id"),
            _int_cells(paths["metadata"], header, rows, "study_id"),
        )
    return source, {split: rows for split, (_, rows) in listfiles.items()}


def _small_splits(
    config: PartitionConfig,
    site_subjects: list[set[int]],
    split_rows: dict[str, list[list[str]]],
    header: list[str],
    min_count: int,
) -> list[str]:
    """Each site's validation split and the server's test split, checked for scoring."""
    named = [
        (plan.name, "val", [r for r in split_rows["val"] if _subject(r[0]) in subjects])
        for plan, subjects in zip(config.sites, site_subjects, strict=True)
    ]
    named.append((SERVER_TEST_SITE, "test", split_rows["test"]))
    return small_splits(named, header, config.task, min_count)


def _assignment(config: PartitionConfig, subject_class: dict[int, int]) -> dict[int, int]:
    """Subject -> site index: drawn (`assign_subjects`) or read from the site sidecar."""
    if config.site_sidecar is None:
        return assign_subjects(
            subject_class, config.sites, config.label_alpha, config.seed, config.min_subjects
        )
    names, subjects = [p.name for p in config.sites], sorted(subject_class)
    return sidecar_assignment(
        config.site_sidecar, config.site_column, subjects, names, config.min_subjects
    )


def partition(
    config: PartitionConfig,
    out_dir: Path,
    console: Console | None = None,
    min_count: int = 5,
    strict: bool = False,
) -> Scenario:
    """Write every site's view + site.toml, the server test site, scenario.json.

    A validation or test split too small to score (`split_problems`) is a warning, or with
    ``strict`` a `SmallSplitError` raised before anything is written.
    Nothing is written, linked or removed outside ``out_dir`` (`simulation.safe_paths`);
    a bad input row raises `InputRowError` naming its file and line before anything is written.
    """
    console = console or Console()
    out_dir = Path(out_dir).resolve()
    source, split_rows = _read_source(config)
    list_header = source["list_header"]
    subject_class: dict[int, int] = {}
    for row in split_rows["train"] + split_rows["val"]:
        subject = _subject(row[0])
        subject_class[subject] = max(
            subject_class.get(subject, 0), _class_of(row, list_header, config.task)
        )
    assignment = _assignment(config, subject_class)
    site_subjects = [
        {s for s, site in assignment.items() if site == index} for index in range(len(config.sites))
    ]
    small = _small_splits(config, site_subjects, split_rows, list_header, min_count)
    if small and strict:
        raise SmallSplitError(small)
    rng = np.random.default_rng(config.seed + 1)
    rows, site_configs = [], []
    for plan, subjects in zip(config.sites, site_subjects, strict=True):
        site_rows = {**split_rows, "test": []}
        rows.append(_write_site(out_dir, plan, subjects, site_rows, source, config, rng))
        site_configs.append(Path(plan.name, "site.toml"))
    test_plan = SitePlan(name=SERVER_TEST_SITE)
    test_subjects = {_subject(r[0]) for r in split_rows["test"]}
    test_rows = {"train": [], "val": [], "test": split_rows["test"]}
    rows.append(_write_site(out_dir, test_plan, test_subjects, test_rows, source, config, rng))
    scenario = Scenario(
        kind="mimic",
        task=config.task,
        site_configs=site_configs,
        server_test_site=Path(SERVER_TEST_SITE, "site.toml"),
        model_config=mimic_model_config(config.task, config.d),
        partition=json.loads(config.model_dump_json()),
        sites=[SiteSummary.model_validate(row) for row in rows],
    )
    writable(out_dir, out_dir / "scenario.json")
    scenario.write(out_dir)
    _print_table(console, rows)
    for line in small:
        console.print(f"[yellow]warning:[/yellow] {line}: too small to score", highlight=False)
    return scenario


PARTITION_COLUMNS = {  # count -> header (short, so that the table fits 80 columns)
    "modalities": "holds",
    "subjects": "subjects",
    "train_stays": "train",
    "val_stays": "val",
    "test_stays": "test",
    "train_positive": "train pos",
    "cxr_images": "X-rays",
    "reports": "reports",
}


def _print_table(console: Console, rows: list[dict]) -> None:
    """Stays per split, training positives, X-rays and reports per site. Names longer than
    the site column can hold at this width become S1, S2, ... with a legend (never "hospi…")."""
    names = [str(row["site"]) for row in rows]
    legend = SiteLegend.for_column(names, console.width - 64)  # what the counts leave
    table = Table(
        title="Sites (stays per split)",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("site", no_wrap=True)
    for header in PARTITION_COLUMNS.values():  # headers wrap at spaces
        table.add_column(header, justify="right")
    for row in rows:
        cells = [str(row.get(c, "-")) for c in PARTITION_COLUMNS]
        cells[0] = cells[0].replace("+", " ")  # modalities wrap at spaces
        table.add_row(legend.short(str(row["site"])), *cells)
    console.print(table)
    if legend.abbreviated:
        console.print(legend.text())
