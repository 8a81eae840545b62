"""The experiment config (`omnifuse experiment CONFIG.toml`): methods x scenarios x seeds.

A strict pydantic model read from TOML; every error names the file and the field. A cell is
one (method, scenario variant, seed); a scenario variant is one (modality subset, missing
rate) of a scenario. See docs/EXPERIMENTS.md for every field.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from omnifuse_model.config import ABLATION_ROWS, StrictModel, TrainConfig, ablation_row
from omnifuse_model.site_config import validation_problems

CELL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"

FUSION_BASELINES: dict[str, dict] = {
    name: ablation_row(name) for name in ("concat", "sum", "se_gate", "lstm")
}


class SyntheticSites(StrictModel):
    """Feature-level synthetic sites generated for the experiment (no files needed)."""

    sites: int = Field(default=3, ge=1, le=50)
    train_per_site: int = Field(default=300, ge=10)
    val_per_site: int = Field(default=100, ge=10)
    test_size: int = Field(default=500, ge=10)
    data_seed: int = Field(default=0, ge=0)


class ScenarioEntry(StrictModel):
    """One scenario: a prepared scenario folder or generated synthetic sites."""

    name: str = Field(pattern=CELL_NAME)
    dir: Path | None = Field(
        default=None, description="Folder with scenario.json (relative: to the config file)."
    )
    synthetic: SyntheticSites | None = None
    subsets: list[list[str]] | None = Field(
        default=None, description="Modality subsets (Table 4); None = all the model's."
    )
    missing_rates: list[float] = Field(
        default=[0.0],
        min_length=1,
        description="Extra missingness per modality on top of the data's own (0 = as is).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ScenarioEntry:
        if (self.dir is None) == (self.synthetic is None):
            raise ValueError(f"scenario '{self.name}': give exactly one of dir or synthetic")
        if any(not 0.0 <= r < 1.0 for r in self.missing_rates):
            raise ValueError(f"missing_rates: expected values in [0, 1), got {self.missing_rates}")
        if self.subsets is not None and any(len(set(s)) < 2 for s in self.subsets):
            raise ValueError(f"subsets: the model needs >= 2 modalities, got {self.subsets}")
        return self


class MethodEntry(StrictModel):
    """One row of the result tables: how a model is built and trained."""

    name: str = Field(pattern=CELL_NAME)
    mode: Literal["centralised", "federated", "local"]
    ablation_row: Literal["a", "b", "c", "d", "e", "f"] | None = None
    fusion_baseline: Literal["concat", "sum", "se_gate", "lstm"] | None = None
    model: dict = Field(default_factory=dict, description="More OmniFuseConfig overrides.")
    modality_aware: bool = Field(default=True, description="Federated: modality-aware FedAvg.")
    proximal_mu: float = Field(default=0.0, ge=0, description="Federated: FedProx mu.")
    scenarios: list[str] | None = Field(default=None, description="Only these; None = all.")

    @model_validator(mode="after")
    def _one_preset(self) -> MethodEntry:
        if self.ablation_row is not None and self.fusion_baseline is not None:
            raise ValueError(f"method '{self.name}': ablation_row or fusion_baseline, not both")
        return self

    def model_overrides(self, shared: dict) -> dict:
        preset = {}
        if self.ablation_row is not None:
            preset = ABLATION_ROWS[self.ablation_row]
        elif self.fusion_baseline is not None:
            preset = FUSION_BASELINES[self.fusion_baseline]
        return {**shared, **preset, **self.model}


class FederationSettings(StrictModel):
    rounds: int = Field(default=5, ge=1)
    local_epochs: int = Field(default=1, ge=1)


class ExperimentConfig(StrictModel):
    """Everything that fixes an experiment's numbers (written into results.json)."""

    name: str = Field(pattern=CELL_NAME)
    seeds: list[int] = Field(min_length=1)
    reference: str = Field(description="Method the paired differences are taken against.")
    metrics: list[Literal["auroc", "auprc", "ece"]] = Field(default=["auroc", "auprc", "ece"])
    bootstrap_resamples: int = Field(default=2000, ge=10)
    model: dict = Field(default_factory=dict, description="OmniFuseConfig overrides, all methods.")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=10, patience=3, progress=False),
        description="Centralised and local training; federated: batch size, lr and the rest.",
    )
    federation: FederationSettings = Field(default_factory=FederationSettings)
    scenarios: list[ScenarioEntry] = Field(min_length=1)
    methods: list[MethodEntry] = Field(min_length=1)

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"expected distinct seeds >= 0, got {seeds}")
        return seeds

    @model_validator(mode="after")
    def _names(self) -> ExperimentConfig:
        for kind, names in (
            ("scenarios", [s.name for s in self.scenarios]),
            ("methods", [m.name for m in self.methods]),
        ):
            if len(set(names)) != len(names):
                raise ValueError(f"{kind}: a name appears twice in {names}")
        methods = [m.name for m in self.methods]
        if self.reference not in methods:
            raise ValueError(f"reference: '{self.reference}' is not a method ({methods})")
        known = {s.name for s in self.scenarios}
        for method in self.methods:
            unknown = sorted(set(method.scenarios or []) - known)
            if unknown:
                raise ValueError(
                    f"method '{method.name}': scenarios {unknown} not in {sorted(known)}"
                )
        return self

    def resolve(self, base: Path, overrides: dict[str, Path] | None = None) -> ExperimentConfig:
        """Scenario dirs absolute against ``base``; ``overrides``: name -> dir (CLI)."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - {s.name for s in self.scenarios})
        if unknown:
            raise ValueError(f"--scenario-dir: no scenario named {unknown} in the config")
        scenarios = []
        for entry in self.scenarios:
            path = overrides.get(entry.name, entry.dir)
            if path is not None and not Path(path).is_absolute():
                path = (base / path).resolve()
            scenarios.append(entry.model_copy(update={"dir": path}))
        return self.model_copy(update={"scenarios": scenarios})


def load_experiment_config(
    path: str | Path, scenario_dirs: dict[str, Path] | None = None
) -> ExperimentConfig:
    """Read and validate CONFIG.toml; errors name the file and the field."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"experiment config not found: {file}")
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{file}: not valid TOML: {error}") from error
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        raise ValueError(f"{file}: {validation_problems(error)}") from error
    return config.resolve(file.parent.resolve(), scenario_dirs)


class Variant(StrictModel):
    """One scenario variant: a modality subset (None = all) at one extra missing rate."""

    scenario: str
    subset: list[str] | None
    missing_rate: float

    @property
    def key(self) -> str:
        subset = "all" if self.subset is None else "+".join(self.subset)
        return f"{self.scenario}__{subset}__mr{self.missing_rate:.2f}"


class Cell(StrictModel):
    method: MethodEntry
    variant: Variant
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method.name}/{self.variant.key}/seed{self.seed}"

    def fingerprint(self, config: ExperimentConfig) -> dict:
        """Everything the cell's result depends on (a finished cell with another is rerun)."""
        scenario = next(s for s in config.scenarios if s.name == self.variant.scenario)
        return json.loads(
            json.dumps(
                {
                    "method": self.method.model_dump(mode="json"),
                    "variant": self.variant.model_dump(mode="json"),
                    "seed": self.seed,
                    "scenario": scenario.model_dump(
                        mode="json", exclude={"subsets", "missing_rates"}
                    ),
                    "model": self.method.model_overrides(config.model),
                    "train": config.train.model_dump(mode="json"),
                    "federation": config.federation.model_dump(mode="json"),
                }
            )
        )


def variants(entry: ScenarioEntry) -> list[Variant]:
    subsets = entry.subsets or [None]
    return [
        Variant(scenario=entry.name, subset=subset, missing_rate=rate)
        for subset in subsets
        for rate in entry.missing_rates
    ]


def cells(config: ExperimentConfig) -> list[Cell]:
    """Every cell, ordered scenario variant, seed, method (a variant's data is loaded once)."""
    result = []
    for entry in config.scenarios:
        for variant in variants(entry):
            for seed in config.seeds:
                for method in config.methods:
                    if method.scenarios is None or entry.name in method.scenarios:
                        result.append(Cell(method=method, variant=variant, seed=seed))
    return result
