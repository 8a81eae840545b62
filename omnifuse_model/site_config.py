"""A hospital site's configuration (`site_configs/*.toml`), validated by pydantic.

Relative paths in a site file resolve against the directory of that file, so a site folder
can be moved as a whole. Errors name the file, the field and what was expected.
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, NamedTuple

import tomli_w
from pydantic import Field, ValidationError, field_validator, model_validator

from omnifuse_model.config import StrictModel, TaskKind, TrainConfig
from omnifuse_model.synthetic import SyntheticFeatureConfig

SITE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
"""A site's name becomes folder and file names (its view, cache, SuperNode key): no '.',
no '..', no separators; a letter or digit first, at most 64 characters."""

MimicTask = Literal["in-hospital-mortality", "phenotyping"]

MIMIC_MODALITIES: tuple[str, ...] = ("ehr", "cxr", "rep")
"""The modality names of the MIMIC data layer (``data.source = 'feature_cache'``), in the
model's default order: EHR time series, chest X-rays, radiology reports."""


class TaskOutput(NamedTuple):
    """What a model must predict for a task: the task kind and the number of labels."""

    task: TaskKind
    num_classes: int


MIMIC_TASK_OUTPUTS: dict[MimicTask, TaskOutput] = {
    "in-hospital-mortality": TaskOutput("binary", 1),
    "phenotyping": TaskOutput("multilabel", 25),  # the benchmark's 25 phenotypes
}
"""The model output each MIMIC task needs: the one place these facts are written down."""


class SiteDataConfig(StrictModel):
    """Where the site's data is. ``feature_cache``: MIMIC-format files prepared into a feature
    cache by ``omnifuse prepare``; ``synthetic_features``: generated feature-level data."""

    source: Literal["feature_cache", "synthetic_features"] = "feature_cache"
    benchmark_dir: Path | None = Field(
        default=None, description="mimic3-benchmarks task folder (listfiles + episode CSVs)."
    )
    stays_csv: Path | None = Field(default=None, description="root/all_stays.csv")
    cxr_dir: Path | None = Field(default=None, description="MIMIC-CXR-JPG root (holds files/)")
    cxr_metadata: Path | None = Field(
        default=None,
        description="mimic-cxr-2.0.0-metadata.csv(.gz); default: the one inside cxr_dir.",
    )
    reports_dir: Path | None = Field(default=None, description="MIMIC-CXR report tree root")
    ehr_normalizer: Path | None = Field(
        default=None,
        description=(
            "EHR normaliser JSON to use instead of the one fitted on this site's train split "
            "(e.g. the federation's, computed from every site's count/sum/sum-of-squares)."
        ),
    )
    synthetic: SyntheticFeatureConfig | None = None
    synthetic_sizes: tuple[int, int] = Field(
        default=(600, 200), description="(train, val) sizes for synthetic_features."
    )

    @model_validator(mode="after")
    def _source_fields(self) -> SiteDataConfig:
        if self.source == "synthetic_features" and self.synthetic is None:
            raise ValueError("data.synthetic: required when data.source = 'synthetic_features'")
        if self.source == "feature_cache" and self.benchmark_dir is None:
            raise ValueError("data.benchmark_dir: required when data.source = 'feature_cache'")
        return self


class BackboneConfig(StrictModel):
    """Local weights of the frozen backbones; None = random init with a warning."""

    resnet34_weights: Path | None = None
    bert_dir: Path | None = None
    wordpiece_vocab: Path | None = Field(
        default=None,
        description=(
            "BERT vocab.txt for the offline report fallback when bert_dir is not set (e.g. one "
            "file distributed to every site of a consortium, so token ids mean the same "
            "everywhere); without it the fallback builds its vocabulary from the train "
            "split's reports."
        ),
    )


class LocalTrainingConfig(StrictModel):
    """Per-site overrides of the federation's local training settings."""

    batch_size: int | None = Field(default=None, gt=0, le=65536)
    lr: float | None = Field(default=None, gt=0, le=10, allow_inf_nan=False)
    local_epochs: int | None = Field(default=None, gt=0, le=10000)

    def apply(self, train: TrainConfig) -> TrainConfig:
        """The federation's training settings with this site's overrides in place."""
        overrides = {
            "batch_size": self.batch_size,
            "lr": self.lr,
            "epochs": self.local_epochs,
        }
        update = {k: v for k, v in overrides.items() if v is not None}
        return TrainConfig.model_validate({**train.model_dump(), **update})


class PrivacyConfig(StrictModel):
    """Local DP-SGD settings (Opacus); the budget covers the whole federated run."""

    dp_sgd: bool = Field(default=False, description="Train locally with DP-SGD (Opacus).")
    target_epsilon: float = Field(
        default=8.0,
        gt=0,
        le=100,
        allow_inf_nan=False,
        description="Epsilon the site may spend over the whole run (above 100: no privacy).",
    )
    target_delta: float = Field(
        default=1e-5, gt=0, lt=1, description="Delta; keep it below 1 / training samples."
    )
    max_grad_norm: float = Field(
        default=1.0, gt=0, allow_inf_nan=False, description="Per-sample clipping norm."
    )
    accountant: Literal["rdp", "prv"] = Field(
        default="rdp",
        description=(
            "Opacus accountant: 'rdp' (Renyi DP: a safe upper bound, fast enough to check "
            "the budget every round) or 'prv' (tighter, slower)."
        ),
    )


SUPERLINK_ADDRESS_PATTERN = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252}):[0-9]{1,5}$"
"""``host:port`` of a SuperLink (a DNS name, an IPv4 address or a bracketed IPv6 address),
without a URL scheme, as ``flower-supernode --superlink`` takes it."""


_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def host_problem(host: str) -> str | None:
    """Why ``host`` is not a DNS name or an IP address (None when it is one): it becomes a
    certificate's name and a word of the kit's scripts, so nothing else is let through."""
    if not isinstance(host, str) or not host:
        return "expected a DNS name or an IP address, got an empty name"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        return (
            f"{host!r} is not a DNS name (labels of letters, digits and inner '-', joined by "
            "'.', at most 253 characters) or an IP address"
        )
    return None


def superlink_address_problem(address: str) -> str | None:
    """Why ``address`` is not a SuperLink ``host:port`` (None when it is one): a DNS name, an
    IPv4 address or a bracketed IPv6 address, and a port from 1 to 65535."""
    if not isinstance(address, str) or not re.fullmatch(SUPERLINK_ADDRESS_PATTERN, address):
        return f"{address!r}: expected host:port (a DNS name or an IP address, no scheme)"
    host, _, port = address.rpartition(":")
    if not 1 <= int(port) <= 65535:
        return f"{address!r}: port {int(port)} is not in 1..65535"
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{address!r}: {host} is not an IPv6 address"
        return None
    problem = host_problem(host)
    return f"{address!r}: {problem}" if problem else None


class DeploymentConfig(StrictModel):
    """How the site's SuperNode joins a real federation (``omnifuse site start``).

    Relative paths resolve against the site config's folder, so a site kit folder
    (``omnifuse deploy kit``) can be moved as a whole.
    """

    superlink: str = Field(
        pattern=SUPERLINK_ADDRESS_PATTERN,
        description=(
            "The consortium SuperLink's Fleet API as host:port (no scheme); the host must be "
            "a name in the SuperLink's TLS certificate."
        ),
    )
    root_certificates: Path = Field(
        description="The consortium CA certificate (ca.pem) that the SuperLink's must chain to."
    )
    auth_private_key: Path = Field(
        description=(
            "This site's SuperNode private key (OpenSSH ECDSA, mode 0600); its public key is "
            "registered at the SuperLink by the consortium."
        )
    )
    runtime_host: Literal["127.0.0.1", "::1", "0.0.0.0", "::"] = Field(
        default="127.0.0.1",
        description=(
            "Interface of the SuperNode's local Runtime API (its ClientApp processes connect "
            "there): loopback unless a separately run SuperExec on another host needs it."
        ),
    )
    runtime_port: int = Field(
        default=9094, ge=1, le=65535, description="Port of the SuperNode's local Runtime API."
    )
    health_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Optional plain-gRPC health service on 127.0.0.1 (None: not started).",
    )
    flwr_home: Path = Field(
        default=Path("flwr_home"), description="FLWR_HOME of the SuperNode (its own state)."
    )
    approved_apps: Path | None = Field(
        default=None,
        description=(
            "The site's allowlist of approved Flower app bundles (approved_apps.toml: a list "
            "of [[app]] tables with sha256 and note); code approval at the site reads it."
        ),
    )
    max_retries: int | None = Field(
        default=None,
        ge=0,
        description="Reconnection attempts before the SuperNode gives up (None: no limit).",
    )
    min_free_disk_gb: float = Field(
        default=1.0,
        ge=0,
        allow_inf_nan=False,
        description="Free disk the preflight requires at the feature cache.",
    )

    @field_validator("superlink")
    @classmethod
    def _superlink(cls, address: str) -> str:
        problem = superlink_address_problem(address)
        if problem:
            raise ValueError(problem)
        return address


class SiteConfig(StrictModel):
    """One hospital: its data, the modalities it holds, backbones, cache, device, overrides."""

    name: str = Field(min_length=1, pattern=SITE_NAME_PATTERN)
    task: MimicTask = "in-hospital-mortality"
    modalities: list[str] = Field(
        min_length=1, description="Modalities that exist at this site (others are absent)."
    )
    data: SiteDataConfig
    backbones: BackboneConfig = Field(default_factory=BackboneConfig)
    cache_dir: Path = Field(default=Path("cache"), description="Feature cache directory.")
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    training: LocalTrainingConfig = Field(default_factory=LocalTrainingConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    deployment: DeploymentConfig | None = Field(
        default=None,
        description="How the site joins a deployed federation (`omnifuse site start`).",
    )

    @model_validator(mode="after")
    def _known_modalities(self) -> SiteConfig:
        repeated = sorted({m for m in self.modalities if self.modalities.count(m) > 1})
        if repeated:
            raise ValueError(f"modalities: {repeated} listed more than once")
        if self.data.source == "synthetic_features" and self.data.synthetic is not None:
            known, where = [m.name for m in self.data.synthetic.modalities], "data.synthetic"
        else:
            known, where = list(MIMIC_MODALITIES), "the MIMIC data layer"
        unknown = [m for m in self.modalities if m not in known]
        if unknown:
            raise ValueError(f"modalities: {unknown} are not modalities of {where} {known}")
        return self

    def resolve_paths(self, base: Path) -> SiteConfig:
        """Copy with every relative path made absolute against ``base``."""

        def fix(path: Path | None) -> Path | None:
            return None if path is None or path.is_absolute() else (base / path).resolve()

        data = self.data.model_copy(
            update={
                k: fix(getattr(self.data, k)) or getattr(self.data, k)
                for k in (
                    "benchmark_dir",
                    "stays_csv",
                    "cxr_dir",
                    "cxr_metadata",
                    "reports_dir",
                    "ehr_normalizer",
                )
            }
        )
        backbones = self.backbones.model_copy(
            update={
                k: fix(getattr(self.backbones, k)) or getattr(self.backbones, k)
                for k in ("resnet34_weights", "bert_dir", "wordpiece_vocab")
            }
        )
        deployment = self.deployment
        if deployment is not None:
            deployment = deployment.model_copy(
                update={
                    k: fix(getattr(deployment, k)) or getattr(deployment, k)
                    for k in ("root_certificates", "auth_private_key", "flwr_home", "approved_apps")
                }
            )
        return self.model_copy(
            update={
                "data": data,
                "backbones": backbones,
                "cache_dir": fix(self.cache_dir) or self.cache_dir,
                "deployment": deployment,
            }
        )

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def to_toml(self) -> str:
        """The site as TOML text (the one site-config writer): every field whose value is not
        its default, so the file reads back to an equal config.

        Relative paths stay relative: they resolve against the folder the file is written to.
        The text is read back before it is returned; a value TOML cannot hold (a None where
        the default is not None: TOML has no null) raises ``ValueError`` naming the field.
        """
        values = self.model_dump(mode="json", exclude_defaults=True)
        text = tomli_w.dumps(_without_empty(values))
        read_back = SiteConfig.model_validate(tomllib.loads(text))
        if read_back != self:
            lost = [n for n in SiteConfig.model_fields if getattr(read_back, n) != getattr(self, n)]
            raise ValueError(f"site '{self.name}': TOML cannot hold the value of {lost}")
        return text


def _without_empty(value: Any) -> Any:
    """``value`` without None entries and empty tables (neither can be written to TOML)."""
    if isinstance(value, dict):
        kept = {k: _without_empty(v) for k, v in value.items() if v is not None}
        return {k: v for k, v in kept.items() if v != {}}
    if isinstance(value, list):
        return [_without_empty(v) for v in value]
    return value


class SiteConfigError(ValueError):
    """A site config file is missing, unreadable or invalid (message names file and field)."""


def validation_problems(error: ValidationError) -> str:
    """The problems, '; '-joined: the dotted field, what was wrong and the offending value
    (cross-field rules name their fields in the message)."""
    problems = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        problem = f"field '{where}': {message}" if where else message
        if not isinstance(e["input"], dict):
            problem += f" (got {e['input']!r})"
        problems.append(problem)
    return "; ".join(problems)


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site TOML file; relative paths resolve against its directory."""
    path = Path(path)
    if not path.is_file():
        raise SiteConfigError(f"site config not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise SiteConfigError(f"{path}: not valid TOML: {error}") from error
    try:
        config = SiteConfig.model_validate(raw)
    except ValidationError as error:
        raise SiteConfigError(f"{path}: {validation_problems(error)}") from error
    return config.resolve_paths(path.parent.resolve())


def site_config_json_schema() -> str:
    """The JSON schema of SiteConfig (for docs and editors)."""
    return json.dumps(SiteConfig.model_json_schema(), indent=2)
