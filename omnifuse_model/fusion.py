"""Dynamic Weighted Fuse (DWFuse, Eq. 9-14) and the baseline fusion heads of Table 3.

Every baseline head maps completed modality embeddings [B, M, d] to logits [B, C] so that it
runs through the same model, training and evaluation code as DWFuse.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from omnifuse_model.config import FusionKind, TaskKind
from omnifuse_model.encoders import build_lstm
from omnifuse_model.losses import (
    confidence,
    confidence_per_label,
    true_label_probability,
    true_label_probability_per_label,
)


def dwfuse_weights(p_true: Tensor, beta: float, enters: Tensor | None = None) -> Tensor:
    """Down-weighting factors of Eq. 10, over the modalities that enter the product.

    omega_m = [ prod_{n != m, n enters} (1 - p_n) ] ** (beta / K_m),
    K_m = #{n != m : n enters}; omega_m = 1 when K_m = 0 (nobody else to defer to).

    With every modality entering, K_m = M - 1: the paper's Eq. 10. A modality that is
    neither present nor imputed (forward imputation off, modality absent or hidden) holds
    only the placeholder e_n(0); its head's (1 - p_n) says nothing about this sample (that
    head learns the base rate, so its factor would skew the others' weights by class), so it
    contributes no factor. The exponent is renormalised to the K_m factors that do enter, so
    omega stays a geometric mean of the same kind whatever a sample's pattern: a sample with
    one other modality at (1 - p) = 0.25 gets the weight of a sample with all others at 0.25.

    Args:
        p_true: [B, M] probability each modality's head gives the true label (use detached
            values: the weights are not trained through).
        beta: exponent (paper: 0.5).
        enters: bool [B, M], True where modality n's prediction may enter the others'
            products; None: every modality enters.

    Returns:
        [B, M] weights in [0, 1]; omega_m -> 0 when the other modalities already predict the
        truth confidently, so modality m is pushed hardest where the others fail.
    """
    if p_true.dim() != 2 or p_true.shape[1] < 2:
        raise ValueError(f"p_true must be [B, M] with M >= 2, got shape {tuple(p_true.shape)}")
    if enters is None:
        enters = torch.ones(p_true.shape, dtype=torch.bool, device=p_true.device)
    if enters.shape != p_true.shape:
        raise ValueError(
            f"enters must be [B, M] like p_true {tuple(p_true.shape)}, got {tuple(enters.shape)}"
        )
    num_modalities = p_true.shape[1]
    eye = torch.eye(num_modalities, dtype=torch.bool, device=p_true.device)
    # factor (1 - p_n) of modality n in omega_m: [B, m, n]; 1 for n = m and for n left out
    counted = enters.to(torch.bool).unsqueeze(1) & ~eye.unsqueeze(0)
    miss = (1.0 - p_true).clamp_min(0.0).unsqueeze(1).expand(-1, num_modalities, -1)
    others = torch.where(counted, miss, torch.ones_like(miss)).prod(dim=2)
    count = counted.sum(dim=2).clamp_min(1).to(p_true.dtype)  # K_m; an empty product is 1
    return others.pow(beta / count)


def modality_weights(
    modality_logits: Tensor,
    labels: Tensor | None,
    task: TaskKind,
    beta: float,
    enters: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """omega of every modality from its head's logits: (omega [B, M], per label [B, M, C]
    for multi-label else None).

    p_m is the probability head m gives the true label (``labels``), or without labels its
    confidence in its own prediction. Multi-label: Eq. 10 per label, on the probability each
    head gives that label's true value, and omega [B, M] is the mean over labels of the
    per-label weights. Taking the mean of p over labels first (as before) is uninformative:
    with 25 mostly rare phenotypes the easy negatives dominate, every head's mean p sits
    near the mean (1 - prevalence), and omega barely moves between samples or modalities,
    nor says which modality fails on which label.

    Args:
        modality_logits: [B, M, C] detached per-modality logits.
        labels: the task's labels (``omnifuse_model.losses``) or None.
        enters: see ``dwfuse_weights``.
    """
    if task == "multilabel":
        if labels is not None:
            p = true_label_probability_per_label(modality_logits, labels.unsqueeze(1))
        else:
            p = confidence_per_label(modality_logits)  # [B, M, C]
        batch, num_modalities, num_labels = p.shape
        rows = p.transpose(1, 2).reshape(batch * num_labels, num_modalities)
        if enters is not None:
            enters = enters.unsqueeze(1).expand(-1, num_labels, -1)
            enters = enters.reshape(batch * num_labels, num_modalities)
        per_label = dwfuse_weights(rows, beta, enters).view(batch, num_labels, num_modalities)
        per_label = per_label.transpose(1, 2)  # [B, M, C]
        return per_label.mean(dim=2), per_label
    columns = []
    for m in range(modality_logits.shape[1]):
        logits = modality_logits[:, m]
        p = true_label_probability(logits, labels, task) if labels is not None else None
        columns.append(p if p is not None else confidence(logits, task))
    return dwfuse_weights(torch.stack(columns, dim=1), beta, enters), None


def _classifier(d_in: int, num_classes: int, dropout: float) -> nn.Sequential:
    hidden = max(num_classes, min(d_in, 128))
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )


class DWFuseHeads(nn.Module):
    """Per-modality classifiers g_m (Eq. 9) and the joint classifier g_rs (Eq. 11).

    The joint head reads the concatenated CRA latents concat(s_1..s_K) when forward imputation
    runs, otherwise the concatenated completed embeddings (ablation rows without IMP-fw).
    """

    def __init__(
        self, num_modalities: int, d: int, joint_dim: int, num_classes: int, dropout: float
    ) -> None:
        super().__init__()
        self.modality_heads = nn.ModuleList(
            _classifier(d, num_classes, dropout) for _ in range(num_modalities)
        )
        self.joint_head = _classifier(joint_dim, num_classes, dropout)

    def modality_logits(self, completed: Tensor) -> Tensor:
        """[B, M, d] -> P_m logits [B, M, C]."""
        return torch.stack(
            [head(completed[:, m]) for m, head in enumerate(self.modality_heads)], dim=1
        )


class ConcatFusion(nn.Module):
    """Concatenate the M embeddings, then an MLP."""

    def __init__(self, num_modalities: int, d: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.head = _classifier(num_modalities * d, num_classes, dropout)

    def forward(self, completed: Tensor) -> Tensor:
        return self.head(completed.flatten(1))


class SumFusion(nn.Module):
    """Sum the M embeddings, then an MLP."""

    def __init__(self, num_modalities: int, d: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.head = _classifier(d, num_classes, dropout)

    def forward(self, completed: Tensor) -> Tensor:
        return self.head(completed.sum(dim=1))


class SEGateFusion(nn.Module):
    """Squeeze-and-excitation over modalities: a gate in (0, 1) per modality from the
    concatenated embeddings, applied before concatenation and an MLP."""

    def __init__(
        self, num_modalities: int, d: int, num_classes: int, dropout: float, reduction: int = 4
    ) -> None:
        super().__init__()
        width = num_modalities * d
        self.excite = nn.Sequential(
            nn.Linear(width, max(width // reduction, num_modalities)),
            nn.ReLU(),
            nn.Linear(max(width // reduction, num_modalities), num_modalities),
            nn.Sigmoid(),
        )
        self.head = _classifier(width, num_classes, dropout)

    def forward(self, completed: Tensor) -> Tensor:
        gates = self.excite(completed.flatten(1)).unsqueeze(-1)  # [B, M, 1]
        return self.head((completed * gates).flatten(1))


class LSTMFusion(nn.Module):
    """MedFuse-style fusion: the modality embeddings as a length-M sequence through an LSTM;
    the last hidden state -> linear classifier. With imputation every position holds a
    completed embedding; without it, absent positions hold the placeholder e_m(0).
    ``dp_compatible``: Opacus' DPLSTM (see ``encoders.build_lstm``)."""

    def __init__(
        self,
        num_modalities: int,
        d: int,
        num_classes: int,
        dropout: float,
        dp_compatible: bool = False,
    ) -> None:
        super().__init__()
        self.lstm = build_lstm(d, d, 1, dp_compatible)
        self.dropout = nn.Dropout(dropout)
        self.classify = nn.Linear(d, num_classes)

    def forward(self, completed: Tensor) -> Tensor:
        _, (hidden, _) = self.lstm(completed)
        return self.classify(self.dropout(hidden[-1]))


BASELINE_FUSIONS: dict[str, type[nn.Module]] = {
    "concat": ConcatFusion,
    "sum": SumFusion,
    "se_gate": SEGateFusion,
    "lstm": LSTMFusion,
}


def build_baseline_fusion(
    kind: FusionKind,
    num_modalities: int,
    d: int,
    num_classes: int,
    dropout: float,
    dp_compatible: bool = False,
) -> nn.Module:
    """A baseline fusion head by name (not 'dwfuse', which the model wires itself)."""
    if kind not in BASELINE_FUSIONS:
        raise ValueError(f"fusion: unknown baseline '{kind}', expected {sorted(BASELINE_FUSIONS)}")
    if kind == "lstm":
        return LSTMFusion(num_modalities, d, num_classes, dropout, dp_compatible)
    return BASELINE_FUSIONS[kind](num_modalities, d, num_classes, dropout)
