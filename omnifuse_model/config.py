"""Validated configuration of the OmniFuse model and of a training run.

Defaults are the paper's (METHOD.md section 5): K = 5 residual autoencoders, alpha = 0.1,
beta = 0.5, lambda1 = 1, lambda2 = 10, lambda3 = 0.5. Every model is strict
(``extra="forbid"``), so a misspelt key is an error that names the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ModalityKind = Literal["timeseries", "image_features", "token_states", "vector"]
TaskKind = Literal["binary", "multilabel", "multiclass"]
FusionKind = Literal["dwfuse", "concat", "sum", "se_gate", "lstm"]


class StrictModel(BaseModel):
    """Base for every config object: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModalitySpec(StrictModel):
    """One input modality and the trainable encoder that maps it to width ``d``."""

    name: str = Field(min_length=1, description="Modality name, e.g. 'ehr', 'cxr', 'rep'.")
    kind: ModalityKind = Field(
        description=(
            "Encoder family: 'timeseries' [T, F] -> 2-layer LSTM; 'image_features' [F] "
            "(frozen backbone output) -> projection; 'token_states' [L, F] + mask -> "
            "attention pooling + MLP; 'vector' [F] -> MLP."
        )
    )
    input_dim: int = Field(gt=0, description="Feature width F of one time step / token / vector.")
    seq_len: int | None = Field(
        default=None, gt=0, description="T or L for 'timeseries' and 'token_states' inputs."
    )

    @model_validator(mode="after")
    def _seq_len_matches_kind(self) -> ModalitySpec:
        sequential = self.kind in ("timeseries", "token_states")
        if sequential and self.seq_len is None:
            raise ValueError(f"modality '{self.name}': kind '{self.kind}' needs seq_len")
        if not sequential and self.seq_len is not None:
            raise ValueError(f"modality '{self.name}': kind '{self.kind}' takes no seq_len")
        return self

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample's input, without the batch dimension."""
        if self.seq_len is None:
            return (self.input_dim,)
        return (self.seq_len, self.input_dim)


class OmniFuseConfig(StrictModel):
    """The model: modalities, task, widths, loss weights and ablation switches."""

    modalities: list[ModalitySpec] = Field(min_length=2, description="M >= 2 modalities.")
    task: TaskKind = Field(description="binary, multilabel (sigmoid per label) or multiclass.")
    num_classes: int = Field(
        default=1, gt=0, description="1 for binary, labels for multilabel, classes for multiclass."
    )
    d: int = Field(default=128, gt=0, description="Common embedding width of every encoder.")
    num_blocks: int = Field(default=5, gt=0, description="K residual autoencoders per cascade.")
    cra_hidden: tuple[int, ...] = Field(
        default=(256, 128, 64), min_length=1, description="Encoder widths of one autoencoder."
    )
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout in heads/encoders.")
    alpha: float = Field(default=0.1, ge=0.0, description="Weight of L_rs in L_DWFuse (Eq. 14).")
    beta: float = Field(default=0.5, ge=0.0, description="DWFuse exponent (Eq. 10).")
    lambda1: float = Field(default=1.0, ge=0.0, description="Weight of L_backward (Eq. 18).")
    lambda2: float = Field(default=10.0, ge=0.0, description="Weight of L_DWFuse (Eq. 18).")
    lambda3: float = Field(default=0.5, ge=0.0, description="Weight of L_TLA (Eq. 18).")
    fusion: FusionKind = Field(
        default="dwfuse",
        description="'dwfuse' (paper) or a baseline head: concat, sum, se_gate, lstm.",
    )
    use_tla: bool = Field(default=True, description="Traceable Laziness Activation on/off.")
    use_forward_imputation: bool = Field(default=True, description="Forward CRA on/off.")
    use_backward_imputation: bool = Field(default=True, description="Backward CRA on/off.")
    tla_distance: Literal["ce", "mae"] = Field(
        default="ce", description="Sample distance D for lazy-combination mining (Eq. 15)."
    )
    dp_compatible: bool = Field(
        default=False,
        description=(
            "Build the variant that DP-SGD (Opacus) can train: LSTMs are Opacus' DPLSTM "
            "(same parameter names and function), placeholders e_m(0) are encoded per sample, "
            "the TLA pass runs over the whole batch under its mask, and every loss is a mean "
            "of per-sample terms. Same state_dict keys as the default model."
        ),
    )
    tla_reduction: Literal["mean", "sum"] = Field(
        default="mean",
        description=(
            "How sample distances become a combination score. The paper sums (Eq. 15); with "
            "missing modalities a sum also counts how often a combination is available, so "
            "the default is the mean, which picks the same argmax on complete data."
        ),
    )

    @field_validator("modalities")
    @classmethod
    def _unique_names(cls, modalities: list[ModalitySpec]) -> list[ModalitySpec]:
        names = [m.name for m in modalities]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"modality names must be unique, repeated: {duplicates}")
        return modalities

    @model_validator(mode="after")
    def _consistent(self) -> OmniFuseConfig:
        if self.task == "binary" and self.num_classes != 1:
            raise ValueError(f"num_classes: binary task needs 1, got {self.num_classes}")
        if self.task == "multiclass" and self.num_classes < 2:
            raise ValueError(f"num_classes: multiclass task needs >= 2, got {self.num_classes}")
        if self.use_backward_imputation and not self.use_forward_imputation:
            raise ValueError(
                "use_backward_imputation: the backward cascade maps the forward imputation back "
                "(Eq. 6), so it needs use_forward_imputation=true"
            )
        return self

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)


class TrainConfig(StrictModel):
    """One training run (centralised, or one federated site's local epochs)."""

    epochs: int = Field(default=20, gt=0)
    batch_size: int = Field(default=64, gt=0)
    eval_batch_size: int = Field(
        default=256,
        gt=0,
        description=(
            "Batch size of the passes without gradients (evaluation, TLA mining): samples are "
            "predicted independently, so it changes no result, only the per-batch overhead."
        ),
    )
    lr: float = Field(default=1e-3, gt=0.0, allow_inf_nan=False)
    weight_decay: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="torch and numpy seed.")
    patience: int = Field(
        default=5,
        ge=0,
        description="Epochs without validation AUROC gain before stopping; 0 = off.",
    )
    drop_rate: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description=(
            "Per-sample probability that a training sample with >= 2 present modalities keeps "
            "only a random proper non-empty subset of them (METHOD.md section 2)."
        ),
    )
    grad_clip: float | None = Field(default=5.0, gt=0.0, description="Max grad norm; None = off.")
    bootstrap_samples: int = Field(
        default=200, ge=0, description="For metric confidence intervals."
    )
    device: str = Field(default="cpu", description="'cpu', 'cuda' or 'cuda:N'.")
    mixed_precision: bool = Field(
        default=True, description="bfloat16 autocast on CUDA (no effect on CPU)."
    )
    num_workers: int = Field(default=0, ge=0, description="DataLoader workers.")
    progress: bool = Field(default=True, description="Show rich progress bars.")


_ABLATION_SWITCHES = ("use_tla", "use_forward_imputation", "use_backward_imputation")


def ablation_row(
    fusion: FusionKind, tla: bool = False, forward: bool = False, backward: bool = False
) -> dict:
    """OmniFuseConfig overrides of one fusion head with TLA / forward / backward imputation."""
    switches = dict(zip(_ABLATION_SWITCHES, (tla, forward, backward), strict=True))
    return {"fusion": fusion, **switches}


ABLATION_ROWS: dict[str, dict] = {
    "a": ablation_row("concat"),
    "b": ablation_row("dwfuse"),
    "c": ablation_row("dwfuse", tla=True),
    "d": ablation_row("dwfuse", tla=True, forward=True),
    "e": ablation_row("dwfuse", forward=True, backward=True),
    "f": ablation_row("dwfuse", tla=True, forward=True, backward=True),
}
"""The paper's Table 4 rows (a)-(f) as OmniFuseConfig overrides."""
