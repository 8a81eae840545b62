"""The federation's run configuration: `[tool.flwr.app.config]` plus `--run-config`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from omnifuse_model.config import OmniFuseConfig, StrictModel, TrainConfig
from omnifuse_model.scenario import Scenario
from omnifuse_model.wire_format import TransportDtype, WireFormat


class FederationRunConfig(StrictModel):
    """Validated run config; keys are the pyproject keys with '-' replaced by '_'."""

    scenario_dir: Path = Field(description="Folder holding scenario.json (sites + model).")
    run_dir: Path = Field(description="Where checkpoints, metrics and audit rows go.")
    num_server_rounds: int = Field(default=3, gt=0)
    local_epochs: int = Field(default=1, gt=0)
    batch_size: int = Field(default=64, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = Field(default=0.01, ge=0)
    modality_aware: bool = Field(default=True, description="Modality-aware aggregation.")
    aggregation: Literal["fedavg", "median", "trimmed-mean"] = Field(
        default="fedavg",
        description=(
            "How accepted updates are combined (server.aggregation): sample-weighted FedAvg, "
            "or the unweighted coordinate-wise median / trimmed mean per modality group, "
            "which bound the influence of one hostile site."
        ),
    )
    trim_fraction: float = Field(
        default=0.2,
        ge=0,
        lt=0.5,
        description=(
            "trimmed-mean: share of sites dropped at each end per coordinate (floor of "
            "fraction x sites; 0.2 trims one of 5-9 sites, so a modality held by 7 of 10 "
            "sites is still trimmed)."
        ),
    )
    fraction_train: float = Field(default=1.0, gt=0, le=1)
    fraction_evaluate: float = Field(default=1.0, ge=0, le=1)
    min_train_nodes: int = Field(default=2, ge=1)
    min_evaluate_nodes: int = Field(default=2, ge=0)
    min_available_nodes: int = Field(default=2, ge=1)
    tla_scope: Literal["site", "global"] = "site"
    seed: int = Field(default=0, ge=0)
    audit_min_count: int = Field(default=5, ge=1)
    server_eval: bool = Field(default=True, description="Evaluate on the scenario's test set.")
    resume: bool = Field(default=False, description="Continue from run_dir's last checkpoint.")
    round_timeout: float = Field(default=3600.0, gt=0)
    query_timeout: float = Field(
        default=120.0,
        gt=0,
        description=(
            "Seconds to wait, during the rounds, for a late node's registration or statistics "
            "answer (a node that gives none is asked again with back-off: 1, 2, 4, ... rounds "
            "later)."
        ),
    )
    central_dp: Literal["off", "server", "client"] = Field(
        default="off",
        description=(
            "Flower's central DP with fixed clipping: clipping on the server or at the sites "
            "(fixedclipping_mod); Gaussian noise on the aggregate. Forces uniform site weights."
        ),
    )
    dp_noise_multiplier: float = Field(default=1.0, ge=0)
    dp_clipping_norm: float = Field(default=1.0, gt=0)
    max_update_norm: float = Field(
        default=1000.0,
        ge=0,
        description="Reject a site update farther than this (L2) from the global weights; 0 = off.",
    )
    client_torch_threads: int = Field(
        default=0,
        ge=0,
        le=256,
        description=(
            "torch intra-op threads each ClientApp uses (torch.set_num_threads); 0 leaves "
            "torch's default, which Ray sets from the client's reserved CPUs."
        ),
    )
    server_threads: int = Field(
        default=0,
        ge=0,
        le=64,
        description=(
            "Threads the server reads and averages a round's updates with "
            "(server.update_stream); 0: the measured default (1: on 2 cores two threads "
            "were slower)."
        ),
    )
    # -- wire format (issue #14 point 3; server.strategy, omnifuse_model.wire_format) --
    transport: TransportDtype = Field(
        default="bfloat16",
        description=(
            "How weights travel: float32 (the original wire: weights both ways), float16 or "
            "bfloat16 (the 16-bit rounding of the float32 master weights down, 16-bit "
            "updates up, added to the master). central-dp other than off forces float32 "
            "(Flower's clipping wrappers need float32 weights). bfloat16 by default: test "
            "AUROC within 0.005 of float32 (docs/BENCHMARKS.md), float32's range (no "
            "overflow), and the server decodes it with one shift (float16: ~6x the cost)."
        ),
    )
    omit_unheld: bool = Field(
        default=True,
        description=(
            "With 16-bit transport and modality-aware aggregation, a site sends back only "
            "the shared parameters and those of the modalities it registered as held (the "
            "others would get weight 0 in the aggregate)."
        ),
    )

    tensorboard: bool = Field(
        default=False,
        description=(
            "Log every round's global and per-site metrics to RUN_DIR/tensorboard "
            "(needs the tensorboard package: the [tracking] extra)."
        ),
    )
    expected_fingerprints: str = Field(
        default="",
        pattern=r"^([A-Za-z0-9_-]+=[0-9a-f]{64})?(,[A-Za-z0-9_-]+=[0-9a-f]{64})*$",
        description=(
            "The consortium's backbone fingerprints, 'cxr=<sha256>,rep=<sha256>' (SHA-256 of "
            "the feature cache's backbone identity, client.statistics.fingerprint; a run "
            "records the ones it used in its checkpoint state); a site reporting another is "
            "excluded. Empty: the fingerprint held by a strict majority of the reporting sites."
        ),
    )

    @model_validator(mode="after")
    def _central_dp_needs_a_mean(self) -> FederationRunConfig:
        if self.central_dp != "off" and self.aggregation != "fedavg":
            raise ValueError(
                f"central-dp = '{self.central_dp}' needs aggregation = 'fedavg' (got "
                f"'{self.aggregation}'): the noise is calibrated to a uniform mean, which one "
                "site moves by at most clipping-norm / sites; a coordinate-wise median or "
                "trimmed mean can move by the whole clipping norm"
            )
        return self

    @classmethod
    def from_flower(cls, run_config: Mapping[str, object]) -> FederationRunConfig:
        data = {key.replace("-", "_"): value for key, value in run_config.items()}
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise ValueError(f"invalid [tool.flwr.app.config] / --run-config:\n{error}") from error

    def scenario(self) -> Scenario:
        """The scenario named by ``scenario-dir`` (site paths absolute)."""
        try:
            return Scenario.load(self.scenario_dir)
        except FileNotFoundError as error:
            hint = (
                f" ('{self.scenario_dir}' is relative: the ServerApp runs in {Path.cwd()}, "
                "Flower's app folder, not the repository; give absolute paths, e.g. "
                'flwr run . --run-config \'scenario-dir="$PWD/runs/demo/scenario" '
                'run-dir="$PWD/runs/demo/federation"\', or use `omnifuse federate`)'
                if not self.scenario_dir.is_absolute()
                else ""
            )
            raise FileNotFoundError(f"run config 'scenario-dir': {error}{hint}") from error

    def expected_fingerprint_map(self) -> dict[str, str]:
        """``expected-fingerprints`` as backbone -> SHA-256 hex digest."""
        pairs = [item.split("=", 1) for item in self.expected_fingerprints.split(",") if item]
        return {name: digest for name, digest in pairs}

    def wire_format(self) -> WireFormat:
        """The wire format in effect: float32 without omission under central DP; omission
        only with modality-aware aggregation (otherwise every site counts in every group)."""
        if self.central_dp != "off":
            return WireFormat(dtype="float32", omit_unheld=False)
        return WireFormat(
            dtype=self.transport,
            omit_unheld=self.omit_unheld and self.modality_aware and self.transport != "float32",
        )

    def omnifuse_config(self) -> OmniFuseConfig:
        return self.scenario().model

    def train_config(self) -> TrainConfig:
        """The local training every site runs in a round unless its site config overrides it
        (``local-epochs`` is ``TrainConfig.epochs``)."""
        return TrainConfig(
            epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=self.seed,
            patience=0,
            progress=False,
            bootstrap_samples=0,
        )
