"""OmniFuse: encoders -> CRA imputation (fwd/bwd) -> DWFuse or a baseline head, plus TLA.

Shapes: B batch, M modalities, d embedding width, C classes/labels. Availability is bool
[B, M]; labels follow ``omnifuse_model.losses``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.encoders import ModalityEncoders
from omnifuse_model.fusion import DWFuseHeads, build_baseline_fusion, modality_weights
from omnifuse_model.imputation import (
    CascadeOutput,
    CascadeResidualAutoencoder,
    masked_mse,
    per_sample_masked_mse,
)
from omnifuse_model.laziness import (
    Combination,
    LazinessReport,
    combination_masks,
    tla_loss,
)
from omnifuse_model.losses import (
    mean_absolute_error,
    per_label_loss,
    per_sample_loss,
    probabilities,
)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class OmniFuseOutput:
    """Per-sample outputs of one forward pass.

    logits: joint prediction o [B, C] (the reported prediction).
    modality_logits: per-modality predictions P_m [B, M, C] (DWFuse only, else None).
    dwfuse_weights: omega [B, M] (DWFuse only, else None); with labels the true-label
        probabilities drive them, without labels each head's confidence does. Multi-label:
        the mean over labels of ``dwfuse_label_weights``.
    dwfuse_label_weights: multi-label DWFuse only, omega per label [B, M, C] (Eq. 10 on
        each label's true-value probabilities); they weight L_ens label by label.
    completed: completed modality embeddings [B, M, d]: real where the input holds the
        modality, imputed (forward CRA) where it does not.
    input_availability: bool [B, M] the modalities the prediction used.
    losses: named scalar losses and 'total' when labels were given, else empty.
    """

    logits: Tensor
    modality_logits: Tensor | None
    dwfuse_weights: Tensor | None
    completed: Tensor
    input_availability: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    dwfuse_label_weights: Tensor | None = None


@dataclass
class _Prediction:
    v: Tensor  # input triplet [B, M * d]
    forward: CascadeOutput | None
    completed: Tensor  # [B, M, d]
    logits: Tensor  # [B, C]
    modality_logits: Tensor | None  # [B, M, C]


class OmniFuse(nn.Module):
    """The OmniFuse model for any M >= 2 named modalities (METHOD.md)."""

    def __init__(self, config: OmniFuseConfig) -> None:
        super().__init__()
        self.config = config
        names, d, m = config.modality_names, config.d, config.num_modalities
        self.encoders = ModalityEncoders(config.modalities, d, config.dropout, config.dp_compatible)
        self.forward_cra = (
            CascadeResidualAutoencoder(m * d, config.num_blocks, config.cra_hidden)
            if config.use_forward_imputation
            else None
        )
        self.backward_cra = (
            CascadeResidualAutoencoder(m * d, config.num_blocks, config.cra_hidden)
            if config.use_backward_imputation
            else None
        )
        if config.fusion == "dwfuse":
            joint_dim = self.forward_cra.latent_dim if self.forward_cra is not None else m * d
            self.heads: DWFuseHeads | None = DWFuseHeads(
                m, d, joint_dim, config.num_classes, config.dropout
            )
            self.fusion_head: nn.Module | None = None
        else:
            self.heads = None
            self.fusion_head = build_baseline_fusion(
                config.fusion, m, d, config.num_classes, config.dropout, config.dp_compatible
            )
        self.register_buffer("_combination_masks", combination_masks(names), persistent=False)
        self.laziness: LazinessReport | None = None

    # -- lazy combination state -------------------------------------------------------------
    @property
    def lazy_combination(self) -> Combination | None:
        return self.laziness.lazy_combination if self.laziness else None

    def set_laziness(self, report: LazinessReport | None) -> None:
        """Install the lazy combination that L_TLA activates during the next epoch."""
        if report is not None and report.lazy_combination is not None:
            unknown = set(report.lazy_combination) - set(self.config.modality_names)
            if unknown:
                raise ValueError(f"lazy combination names unknown modalities: {sorted(unknown)}")
        self.laziness = report

    def _lazy_mask(self) -> Tensor | None:
        if self.lazy_combination is None:
            return None
        names = self.config.modality_names
        mask = torch.zeros(len(names), dtype=torch.bool, device=self._combination_masks.device)
        mask[[names.index(n) for n in self.lazy_combination]] = True
        return mask

    # -- the forward path -------------------------------------------------------------------
    def _predict(self, embeddings: Tensor, available: Tensor, placeholders: Tensor) -> _Prediction:
        """Input triplet -> forward imputation -> completed embeddings -> predictions.

        placeholders: [M, d], or [B, M, d] per sample (``dp_compatible``).
        """
        batch, num_modalities, d = embeddings.shape
        slots = torch.where(available.unsqueeze(-1), embeddings, placeholders)
        v = slots.flatten(1)
        cascade = None
        if self.forward_cra is not None:
            cascade = self.forward_cra(v)
            imputed = cascade.output.view(batch, num_modalities, d)
            completed = torch.where(available.unsqueeze(-1), embeddings, imputed)
            joint_input = cascade.latents
        else:
            completed, joint_input = slots, v
        if self.heads is not None:
            logits = self.heads.joint_head(joint_input)
            modality_logits = self.heads.modality_logits(completed)
        else:
            logits = self.fusion_head(completed)
            modality_logits = None
        return _Prediction(v, cascade, completed, logits, modality_logits)

    def _joint_logits(self, embeddings: Tensor, available: Tensor, placeholders: Tensor) -> Tensor:
        """The joint prediction o [B, C] alone, calling only the layers it depends on.

        Equal to ``_predict(...).logits`` at less cost: DWFuse's per-modality heads and the
        cascade's last decoder are left out (the TLA pass and mining need only o; under
        DP-SGD a layer called in a step must also reach the loss, as Opacus pairs each
        call's inputs with its output gradient).
        """
        if self.heads is None:
            return self._predict(embeddings, available, placeholders).logits
        slots = torch.where(available.unsqueeze(-1), embeddings, placeholders)
        if self.forward_cra is None:
            return self.heads.joint_head(slots.flatten(1))
        return self.heads.joint_head(self.forward_cra.latents_only(slots.flatten(1)))

    def forward(
        self,
        inputs: dict[str, Tensor],
        availability: Tensor,
        masks: dict[str, Tensor] | None = None,
        labels: Tensor | None = None,
        drop: Tensor | None = None,
    ) -> OmniFuseOutput:
        """Predict, and with ``labels`` compute the total objective (Eq. 18).

        Args:
            inputs: modality name -> [B, *input_shape] (any content where absent).
            availability: bool [B, M], modalities the data holds.
            masks: token masks for 'token_states' modalities.
            labels: see ``omnifuse_model.losses``; enables the losses.
            drop: bool [B, M] present modalities to hide from the input (training-time
                dropping; the hidden truth is the imputation target).
        """
        availability = availability.to(torch.bool)
        embeddings, placeholders = self.encoders(inputs, availability, masks)
        used = availability & ~drop.to(torch.bool) if drop is not None else availability
        prediction = self._predict(embeddings, used, placeholders)
        weights, label_weights = self._weights(prediction.modality_logits, labels, used)
        losses: dict[str, Tensor] = {}
        if labels is not None:
            losses = self._losses(
                embeddings,
                availability,
                used,
                placeholders,
                prediction,
                weights if label_weights is None else label_weights,
                labels,
            )
        return OmniFuseOutput(
            logits=prediction.logits,
            modality_logits=prediction.modality_logits,
            dwfuse_weights=weights,
            completed=prediction.completed,
            input_availability=used,
            losses=losses,
            dwfuse_label_weights=label_weights,
        )

    def _weights(
        self, modality_logits: Tensor | None, labels: Tensor | None, used: Tensor
    ) -> tuple[Tensor | None, Tensor | None]:
        """(omega [B, M], multi-label: omega per label [B, M, C]), ``fusion.modality_weights``.

        With forward imputation every modality enters the products (absent ones were
        imputed); without it only the modalities the input holds (``used``) do: an absent
        one's head saw the placeholder alone (``fusion.dwfuse_weights``).
        """
        if modality_logits is None:
            return None, None
        enters = None if self.forward_cra is not None else used
        return modality_weights(
            modality_logits.detach(), labels, self.config.task, self.config.beta, enters
        )

    def _losses(
        self,
        embeddings: Tensor,
        availability: Tensor,
        used: Tensor,
        placeholders: Tensor,
        prediction: _Prediction,
        weights: Tensor | None,
        labels: Tensor,
    ) -> dict[str, Tensor]:
        cfg, task = self.config, self.config.task
        losses: dict[str, Tensor] = {}
        total = embeddings.new_zeros(())
        if prediction.forward is not None:
            # Complement target (Table 1): truth where hidden, placeholder where given; a
            # modality absent from the data has no truth and leaves the loss (masked).
            target = torch.where(used.unsqueeze(-1), placeholders, embeddings).detach()
            imputed = prediction.forward.output.view_as(embeddings)
            if cfg.dp_compatible:  # a mean of per-sample terms (see _tla)
                losses["forward"] = per_sample_masked_mse(imputed, target, availability).mean()
            else:
                losses["forward"] = masked_mse(imputed, target, availability)
            total = total + losses["forward"]
            if self.backward_cra is not None:
                cycle = self.backward_cra(prediction.forward.output).output
                losses["backward"] = (cycle - prediction.v.detach()).pow(2).mean()
                total = total + cfg.lambda1 * losses["backward"]
        joint = per_sample_loss(prediction.logits, labels, task).mean()
        if prediction.modality_logits is not None and weights is not None:
            losses["ens"] = self._ensemble_loss(prediction.modality_logits, weights, labels)
            losses["rs"] = joint  # Eq. 13
            losses["fusion"] = losses["ens"] + cfg.alpha * joint  # Eq. 14
        else:
            losses["fusion"] = joint
        total = total + cfg.lambda2 * losses["fusion"]
        lazy = self._lazy_mask()
        if cfg.use_tla and lazy is not None:
            losses["tla"] = self._tla(embeddings, availability, placeholders, labels, lazy)
            total = total + cfg.lambda3 * losses["tla"]
        losses["total"] = total
        return losses

    def _ensemble_loss(self, modality_logits: Tensor, weights: Tensor, labels: Tensor) -> Tensor:
        """L_ens (Eq. 12) = sum_m mean_B(omega_m * CE(P_m, y)). ``weights`` [B, M], or per
        label [B, M, C] (multi-label), each label's BCE then weighted by its own omega and
        averaged over labels (with equal weights: the same as the label-averaged BCE)."""
        task = self.config.task
        terms = []
        for m in range(modality_logits.shape[1]):
            if weights.dim() == 3:
                weighted = (weights[:, m] * per_label_loss(modality_logits[:, m], labels)).mean(1)
            else:
                weighted = weights[:, m] * per_sample_loss(modality_logits[:, m], labels, task)
            terms.append(weighted)
        return torch.stack(terms, dim=1).mean(dim=0).sum()

    def _tla(
        self,
        embeddings: Tensor,
        availability: Tensor,
        placeholders: Tensor,
        labels: Tensor,
        lazy: Tensor,
    ) -> Tensor:
        """L_TLA (Eq. 16-17): the loss of predictions from the lazy combination alone.

        Default: predict only the samples that hold the combination, mean over them. With
        ``dp_compatible`` every sample is predicted (each module call sees the whole batch,
        as Opacus' per-sample gradients need) and the masked sum is divided by the batch
        size: a count of holding samples as normaliser would couple the samples' gradients.
        """
        holds = availability[:, lazy].all(dim=1)  # Mask(s), Eq. 16
        task = self.config.task
        if self.config.dp_compatible:
            lazy_used = lazy.unsqueeze(0).expand(embeddings.shape[0], -1)
            per_sample = per_sample_loss(
                self._joint_logits(embeddings, lazy_used, placeholders), labels, task
            )
            return (per_sample * holds.to(per_sample.dtype)).mean()
        if not bool(holds.any()):
            return embeddings.new_zeros(())
        lazy_used = lazy.unsqueeze(0).expand(int(holds.sum()), -1)
        lazy_logits = self._joint_logits(embeddings[holds], lazy_used, placeholders)
        per_sample = per_sample_loss(lazy_logits, labels[holds], task)
        return tla_loss(per_sample, torch.ones_like(per_sample, dtype=torch.bool))

    @torch.no_grad()
    def combination_distances(
        self,
        inputs: dict[str, Tensor],
        availability: Tensor,
        labels: Tensor,
        masks: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Sample distances D(yhat_i, y) for every combination (mining, Eq. 15).

        Each sample is predicted once per combination it holds, with only that
        combination's modalities as input (the rest placeholders, imputed); encoders run
        once. Distances of combinations a sample does not hold are 0 and not eligible.

        Returns:
            (distances [B, C], eligible bool [B, C]): eligible where the sample holds every
            modality of the combination.
        """
        availability = availability.to(torch.bool)
        embeddings, placeholders = self.encoders(inputs, availability, masks)
        combos = self._combination_masks  # [C, M]
        eligible = (availability.unsqueeze(1) | ~combos.unsqueeze(0)).all(dim=2)  # [B, C]
        # Only (sample, combination) pairs that count are predicted: a sample lacking one of
        # a combination's modalities is not scored for it (its distance stays 0).
        rows, columns = eligible.nonzero(as_tuple=True)
        if placeholders.dim() == 3:  # per-sample placeholders [B, M, d]
            placeholders = placeholders[rows]
        logits = self._joint_logits(embeddings[rows], combos[columns], placeholders)
        if self.config.tla_distance == "ce":
            scored = per_sample_loss(logits, labels[rows], self.config.task)
        else:
            scored = mean_absolute_error(logits, labels[rows], self.config.task)
        distance = torch.zeros(eligible.shape, dtype=scored.dtype, device=scored.device)
        distance[rows, columns] = scored
        return distance, eligible

    def predict_proba(self, logits: Tensor) -> Tensor:
        """Probabilities [B, C] of the joint logits."""
        return probabilities(logits, self.config.task)

    # -- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write ``model.safetensors`` + ``config.json`` (config, laziness, versions, extra)."""
        return write_checkpoint(path, self.state_dict(), self.config, self.laziness, extra)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> OmniFuse:
        """Rebuild a model written by ``save_checkpoint``."""
        weights, meta = read_checkpoint(path, map_location)
        directory = Path(path)
        try:
            config = OmniFuseConfig.model_validate(meta["config"])
        except ValueError as error:  # pydantic's several lines: one, naming the file
            problem = " ".join(str(error).split())
            raise ValueError(f"checkpoint {directory / CONFIG_FILE}: {problem}") from error
        check_weights(weights, config, f"checkpoint {directory / WEIGHTS_FILE}")
        model = cls(config)
        model.load_state_dict(weights)
        if meta.get("laziness"):
            model.set_laziness(LazinessReport.from_dict(meta["laziness"]))
        return model.to(map_location)


def write_checkpoint(
    path: str | Path,
    weights: Mapping[str, Tensor],
    config: OmniFuseConfig,
    laziness: LazinessReport | None = None,
    extra: dict | None = None,
    indent: int | None = 2,
) -> Path:
    """The one checkpoint format (a model's, and the server's per round): ``model.safetensors``
    with the weights and ``config.json`` with the model config, laziness, versions and
    ``extra`` (e.g. the server's round state). Readable by ``OmniFuse.from_checkpoint``.
    ``indent=None`` writes config.json on one line (json's C encoder: ~3x faster for the
    server's growing round state)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    meta = {
        "config": config.model_dump(mode="json"),
        "laziness": laziness.to_dict() if laziness else None,
        "versions": {"torch": torch.__version__, "format": 1},
        "extra": extra or {},
    }
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=indent))
    return directory


def read_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[dict[str, Tensor], dict]:
    """(weights, metadata) of a checkpoint; errors name the folder and the file."""
    directory = Path(path)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {directory}: missing {name}")
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
    except ValueError as error:
        raise ValueError(f"checkpoint {directory / CONFIG_FILE}: not JSON ({error})") from error
    if not isinstance(meta, dict) or "config" not in meta:
        raise ValueError(f"checkpoint {directory / CONFIG_FILE}: no 'config' entry")
    try:
        weights = load_file(str(directory / WEIGHTS_FILE), device=map_location)
    except Exception as error:  # safetensors raises its own error type on truncated files
        raise ValueError(
            f"checkpoint {directory / WEIGHTS_FILE}: unreadable ({type(error).__name__}: {error})"
        ) from error
    return weights, meta


def expected_weights(config: OmniFuseConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor in the state dict of ``OmniFuse(config)``; built on
    the meta device, so no memory is allocated and no random numbers are drawn."""
    with torch.device("meta"):
        model = OmniFuse(config)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def check_weights(weights: Mapping[str, Tensor], config: OmniFuseConfig, source: str) -> None:
    """Raise ``ValueError`` naming ``source`` unless ``weights`` has exactly the keys, shapes
    and dtypes of ``OmniFuse(config)``'s state dict (``load_state_dict`` would cast a wrong
    dtype silently)."""
    expected = expected_weights(config)
    problems = [f"missing {k}" for k in sorted(expected.keys() - weights.keys())]
    problems += [f"unexpected {k}" for k in sorted(weights.keys() - expected.keys())]
    for key in sorted(expected.keys() & weights.keys()):
        shape, dtype = expected[key]
        actual = (tuple(weights[key].shape), weights[key].dtype)
        if actual != (shape, dtype):
            problems.append(
                f"{key} is {list(actual[0])} {actual[1]}, expected {list(shape)} {dtype}"
            )
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; ... {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise ValueError(
            f"{source}: weights do not match the model config "
            f"({len(problems)} of {len(expected)} tensors wrong: {shown})"
        )
