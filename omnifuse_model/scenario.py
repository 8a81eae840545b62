"""A federated scenario (``scenario.json``): the sites that take part, the server's held-out
test site and the model every site trains.

Two writers make one: ``omnifuse partition`` (MIMIC-format site views, kind ``mimic``) and
``simulation.scenarios.write_feature_scenario`` (feature-level synthetic sites, kind
``synthetic_features``). The ServerApp, the ClientApp (a simulated node finds its site by
``partition-id``), ``omnifuse prepare --scenario``, ``omnifuse federate`` and the deployment
demo read it through :meth:`Scenario.load`. Relative paths in the file resolve against its
folder, so a scenario folder can be moved as a whole. Errors name the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, JsonValue, ValidationError, model_validator

from omnifuse_model.config import OmniFuseConfig, StrictModel
from omnifuse_model.site_config import MIMIC_TASK_OUTPUTS, MimicTask, validation_problems

SCENARIO_FILE = "scenario.json"


class ScenarioError(ValueError):
    """A scenario file is unreadable or invalid (the message names the file and the field)."""


class SiteSummary(StrictModel):
    """One site's row of the partition table: counts, never records."""

    site: str = Field(description="Site name (the folder of its view).")
    subjects: int = Field(ge=0, description="Patients assigned to the site.")
    train_stays: int = Field(ge=0)
    val_stays: int = Field(ge=0)
    test_stays: int = Field(ge=0)
    train_positive: int | None = Field(
        default=None, ge=0, description="Positive stays (in-hospital mortality only)."
    )
    val_positive: int | None = Field(default=None, ge=0)
    test_positive: int | None = Field(default=None, ge=0)
    cxr_images: int = Field(ge=0, description="X-ray images linked into the site view.")
    reports: int = Field(ge=0, description="Radiology reports linked into the site view.")
    modalities: str = Field(description="'+'-joined modalities the site holds.")


class Scenario(StrictModel):
    """What ``scenario.json`` holds."""

    kind: Literal["mimic", "synthetic_features"] = Field(
        description="'mimic': site views of MIMIC-format files (`omnifuse partition`); "
        "'synthetic_features': feature-level synthetic sites."
    )
    task: MimicTask | None = Field(
        default=None, description="The MIMIC task of every site (kind 'mimic' only)."
    )
    site_configs: list[Path] = Field(
        min_length=1,
        description="Site config TOML files, one per site, relative to the scenario folder; "
        "a simulated node's partition-id indexes this list.",
    )
    server_test_site: Path | None = Field(
        default=None,
        description="Site config of the server's held-out test set; none = no server-side test.",
    )
    model: OmniFuseConfig = Field(
        alias="model_config", description="The federation's model (every site builds it)."
    )
    partition: dict[str, JsonValue] | None = Field(
        default=None,
        description="The PartitionConfig that made the site views (kind 'mimic'; provenance).",
    )
    sites: list[SiteSummary] = Field(
        default_factory=list, description="Per-site counts of the partition (kind 'mimic')."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        if len(set(self.site_configs)) != len(self.site_configs):
            raise ValueError(f"site_configs: a site listed twice in {self.site_configs}")
        if self.kind == "synthetic_features":
            if self.task is not None or self.partition is not None or self.sites:
                raise ValueError(
                    "task, partition, sites: only a 'mimic' scenario has them, "
                    "kind is 'synthetic_features'"
                )
            return self
        if self.task is None:
            raise ValueError("task: required when kind = 'mimic'")
        expected = MIMIC_TASK_OUTPUTS[self.task]
        if (self.model.task, self.model.num_classes) != expected:
            raise ValueError(
                f"model_config: task '{self.task}' needs task='{expected.task}' and "
                f"num_classes={expected.num_classes}, got task='{self.model.task}', "
                f"num_classes={self.model.num_classes}"
            )
        return self

    def resolve_paths(self, base: Path) -> Scenario:
        """Copy with the site config paths made absolute against ``base``."""

        def fix(path: Path) -> Path:
            return path if path.is_absolute() else (base / path).resolve()

        test = None if self.server_test_site is None else fix(self.server_test_site)
        return self.model_copy(
            update={
                "site_configs": [fix(p) for p in self.site_configs],
                "server_test_site": test,
            }
        )

    def write(self, scenario_dir: str | Path) -> Path:
        """Write ``scenario_dir/scenario.json`` (the one scenario writer); returns its path."""
        path = Path(scenario_dir) / SCENARIO_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2, by_alias=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, scenario_dir: str | Path) -> Scenario:
        """Read and validate ``scenario_dir/scenario.json``; site paths come back absolute."""
        path = Path(scenario_dir) / SCENARIO_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"scenario {path} not found (write one with `omnifuse partition`)"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ScenarioError(f"{path}: not valid JSON: {error}") from error
        try:
            scenario = cls.model_validate(raw)
        except ValidationError as error:
            raise ScenarioError(f"{path}: {validation_problems(error)}") from error
        return scenario.resolve_paths(path.parent.resolve())


def scenario_json_schema() -> str:
    """The JSON schema of scenario.json (for docs and editors)."""
    return json.dumps(Scenario.model_json_schema(), indent=2)
