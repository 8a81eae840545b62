"""Frozen feature backbones: a ResNet-34 trunk for chest X-rays and a BERT for reports.

METHOD.md section 1: images go through torchvision's ResNet-34 up to global average pooling
(512-d); reports' first 150 tokens go through a frozen BERT (bert-base-uncased, or
bert-base-chinese for Chinese reports) giving ``[150, 768]`` token states. Both run once per
sample ahead of training; their outputs are cached, keyed by each backbone's ``identity``.

Weights only ever come from local files (hospitals are often offline): nothing here names a
model hub id or downloads. Without weights, each backbone falls back to a seeded random
initialisation and logs a warning, so tests and synthetic-data runs work; its features carry
no pretrained meaning.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet

if TYPE_CHECKING:  # transformers is imported lazily: it takes seconds and only text needs it
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

RESNET34_FEATURES = 512
REPORT_TOKENS = 150
BERT_WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
BERT_VOCAB_FILES: tuple[str, ...] = ("vocab.txt", "tokenizer.json")
_MODEL_FILE_SUFFIXES = (".json", ".txt", ".safetensors", ".bin", ".model")
_SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class BackboneWeightsError(ValueError):
    """A backbone weights file or model directory that exists but cannot be used."""


def _sha256_of_files(paths: Iterable[Path], root: Path | None = None) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if root is not None:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _freeze(module: nn.Module) -> None:
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)


# --------------------------------------------------------------------------- images


class ResNet34Trunk(ResNet):
    """torchvision ResNet-34 with ``fc = Identity``: ``[B, 3, H, W]`` -> ``[B, 512]``, frozen.

    The layers and state-dict keys are those of ``torchvision.models.resnet34``, minus
    ``fc.*``. ``train(True)`` is ignored, so batch norm keeps its running statistics even when
    a parent module is put in training mode. ``identity`` names the weights for cache keys.
    """

    def __init__(self, identity: str) -> None:
        super().__init__(BasicBlock, [3, 4, 6, 3])
        self.fc = nn.Identity()
        self.identity = identity

    def train(self, mode: bool = True) -> ResNet34Trunk:
        """A frozen backbone stays in eval mode."""
        return super().train(False)


def _resnet_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a saved ResNet-34 (full or trunk), ``state_dict``/``module.`` wrappers removed."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: object = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch/safetensors raise many types for a bad file
        raise BackboneWeightsError(f"{path}: cannot read ResNet-34 weights: {error}") from error
    if isinstance(loaded, nn.Module):
        loaded = loaded.state_dict()
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise BackboneWeightsError(
            f"{path}: expected a state dict of tensors (torchvision resnet34), "
            f"got {type(loaded).__name__}"
        )
    state = {str(k).removeprefix("module."): v for k, v in loaded.items()}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def build_resnet34_trunk(
    weights_path: str | os.PathLike[str] | None, seed: int = 0
) -> ResNet34Trunk:
    """The frozen ResNet-34 image trunk (512-d output), in eval mode, no gradients.

    ``weights_path`` is a local file (``torch.save`` or ``.safetensors``) holding either a full
    torchvision ``resnet34`` state dict, whose ``fc.*`` keys are dropped, or a trunk state dict;
    a ``{"state_dict": ...}`` wrapper and ``module.`` prefixes are accepted. A missing file
    raises ``FileNotFoundError``; unreadable content or keys/shapes that do not match raise
    :class:`BackboneWeightsError`, each naming the path. Identity: ``resnet34:sha256-<hash of
    the file>``. With ``None``, weights are a random initialisation seeded by ``seed``
    (identity ``resnet34:random-init-seed-<seed>``) and a warning says so.
    """
    if weights_path is None:
        logger.warning(
            "No ResNet-34 weights file configured: the image backbone is randomly initialised "
            "(seed %d); its features are not meaningful. Set a local ImageNet/CheXpert "
            "resnet34 state dict for real data.",
            seed,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            trunk = ResNet34Trunk(f"resnet34:random-init-seed-{seed}")
        _freeze(trunk)
        return trunk

    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ResNet-34 weights file not found")
    state = _resnet_state_dict(path)
    with torch.device("meta"):  # no random init: every tensor comes from the file
        trunk = ResNet34Trunk(f"resnet34:sha256-{_sha256_of_files([path])[:16]}")
    expected = trunk.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BackboneWeightsError(
            f"{path}: not a torchvision resnet34 state dict: {len(missing)} missing key(s) "
            f"{missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}"
        )
    misshapen = [k for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if misshapen:
        key = misshapen[0]
        raise BackboneWeightsError(
            f"{path}: {len(misshapen)} tensor(s) of the wrong shape, e.g. {key} is "
            f"{tuple(state[key].shape)}, expected {tuple(expected[key].shape)}"
        )
    state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    trunk.load_state_dict(state, strict=True, assign=True)
    _freeze(trunk)
    return trunk


# --------------------------------------------------------------------------- reports


def _wordpiece_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    """BERT's uncased normaliser and pre-tokeniser, ``[CLS] ... [SEP]`` around the tokens."""
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return tokenizer


def wordpiece_vocabulary(texts: Sequence[str], vocab_size: int = 8000) -> list[str]:
    """A WordPiece vocabulary built from ``texts``, the same in every process.

    Hugging Face's ``WordPieceTrainer`` breaks ties between equally frequent merges in hash
    map order, which differs between processes, so its vocabulary (and the features of every
    report) changed from run to run. This builds it by counting instead: the special tokens,
    every character seen (and its ``##`` continuation, so any word of these characters can be
    spelled), then whole words by falling frequency, ties by code point order, up to
    ``vocab_size`` entries (more when the characters alone need more). Words are those of the
    BERT uncased normaliser and pre-tokeniser, so Chinese text gives one token per character
    as bert-base-chinese does.
    """
    pipeline = wordpiece_tokenizer(_SPECIAL_TOKENS)
    counts: Counter[str] = Counter()
    for text in texts:
        normalised = pipeline.normalizer.normalize_str(text)
        counts.update(word for word, _ in pipeline.pre_tokenizer.pre_tokenize_str(normalised))
    characters = sorted({c for word in counts for c in word})
    vocabulary = [*_SPECIAL_TOKENS, *characters, *(f"##{c}" for c in characters)]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocabulary += words[: max(vocab_size - len(vocabulary), 0)]
    return vocabulary


def read_wordpiece_vocabulary(path: str | os.PathLike[str]) -> list[str]:
    """A BERT ``vocab.txt`` (one token per line, line k = id k); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: WordPiece vocabulary file not found")
    try:
        tokens = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise BackboneWeightsError(f"{path}: cannot read the vocabulary: {error}") from error
    missing = [t for t in _SPECIAL_TOKENS[:4] if t not in tokens]
    repeated = (
        sorted({t for t in tokens if tokens.count(t) > 1}) if len(set(tokens)) < len(tokens) else []
    )
    if missing or repeated or "" in tokens:
        raise BackboneWeightsError(
            f"{path}: not a BERT vocab.txt: missing special tokens {missing}, repeated tokens "
            f"{repeated[:5]}, empty lines {tokens.count('')}; expected one distinct token per "
            f"line including {list(_SPECIAL_TOKENS[:4])}"
        )
    return tokens


def write_wordpiece_vocabulary(vocabulary: Sequence[str], path: str | os.PathLike[str]) -> None:
    """Write a vocabulary as a BERT ``vocab.txt`` (line k = token id k) that
    :func:`read_wordpiece_vocabulary` reads back unchanged: a consortium's vocabulary file."""
    text = "\n".join(vocabulary)
    if text.splitlines() != list(vocabulary):
        raise ValueError("a WordPiece token may not be empty or contain a line break")
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text + "\n", encoding="utf-8")
    os.replace(temporary, path)


def vocabulary_sha256(vocabulary: Sequence[str]) -> str:
    """SHA-256 of a vocabulary as its ``vocab.txt`` bytes (tokens joined by newlines)."""
    return hashlib.sha256("\n".join(vocabulary).encode("utf-8")).hexdigest()


def wordpiece_tokenizer(vocabulary: Sequence[str]) -> Tokenizer:
    """The uncased BERT WordPiece tokenizer over ``vocabulary`` (token k has id k)."""
    model = models.WordPiece({token: k for k, token in enumerate(vocabulary)}, unk_token="[UNK]")
    return _wordpiece_pipeline(Tokenizer(model))


class TextBackbone:
    """Frozen BERT over report texts: text -> token states ``[T, H]`` + mask ``[T]`` (T = 150).

    With ``model_dir``: a local directory in the bert-base-uncased layout (``config.json``,
    ``vocab.txt`` or ``tokenizer.json``, ``model.safetensors`` or ``pytorch_model.bin``) is
    loaded with ``AutoTokenizer``/``AutoModel`` and ``local_files_only=True``; H is the model's
    hidden size (768 for BERT-base). Identity: ``bert:sha256-<hash of the directory's
    files>:T<max_tokens>``. A Chinese model (bert-base-chinese layout) goes the same way.

    Without ``model_dir`` (offline fallback for tests and synthetic data): a WordPiece
    tokenizer over ``fallback_vocab`` (a ``vocab.txt`` file, e.g. one distributed to every
    site of a consortium; preferred) or else over :func:`wordpiece_vocabulary` of
    ``fallback_texts`` (the site's own reports), and a randomly initialised ``BertModel`` with
    ``fallback_layers`` layers of width ``fallback_hidden_size`` (default 768, so downstream
    shapes match BERT-base), seeded by ``seed``; a warning says the features are not
    meaningful. Both are deterministic: the same texts or file give the same features in any
    process. Identity: ``bert-fallback:wordpiece-sha256-<hash of the vocabulary>:
    random-init-seed<seed>-L<layers>-H<hidden>:T<max_tokens>``, so another vocabulary is a
    cache miss.

    Token states at padding positions are set to zero; the mask is boolean.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        *,
        fallback_texts: Sequence[str] | None = None,
        fallback_vocab: str | os.PathLike[str] | None = None,
        max_tokens: int = REPORT_TOKENS,
        fallback_hidden_size: int = 768,
        fallback_layers: int = 2,
        fallback_heads: int = 12,
        fallback_vocab_size: int = 8000,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens {max_tokens}: expected at least 2 ([CLS] and [SEP])")
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self.tokenizer: Any = None  # transformers tokenizer of a local model
        self._fallback: Tokenizer | None = None  # padded and truncated to max_tokens
        self._fallback_counter: Tokenizer | None = None  # the same, untruncated
        self.model: PreTrainedModel
        self.identity: str
        self.vocabulary: list[str] = []  # the fallback's WordPiece vocabulary
        if model_dir is not None:
            self._load_local(Path(model_dir))
        else:
            if fallback_vocab is not None:
                self.vocabulary = read_wordpiece_vocabulary(fallback_vocab)
                source = f"the vocabulary file {fallback_vocab}"
            else:
                usable = [t for t in (fallback_texts or ()) if t and t.strip()]
                if not usable:
                    raise ValueError(
                        "TextBackbone: no BERT model directory, no fallback_vocab file and no "
                        "fallback_texts given; the offline fallback needs a WordPiece "
                        "vocabulary (backbones.wordpiece_vocab) or the site's reports"
                    )
                self.vocabulary = wordpiece_vocabulary(usable, fallback_vocab_size)
                source = f"{len(usable)} local texts"
            self._build_fallback(
                source, fallback_hidden_size, fallback_layers, fallback_heads, seed
            )
        limit = int(self.model.config.max_position_embeddings)
        if max_tokens > limit:
            raise ValueError(
                f"max_tokens {max_tokens}: the model has only {limit} position embeddings"
            )
        self.hidden_size = int(self.model.config.hidden_size)
        _freeze(self.model)
        self.model.to(self.device)

    def _load_local(self, model_dir: Path) -> None:
        from transformers import AutoModel, AutoTokenizer

        if not model_dir.is_dir():
            raise FileNotFoundError(f"{model_dir}: BERT model directory not found")
        present = {p.name for p in model_dir.iterdir()}
        wanted = {
            "config.json": ("config.json",),
            "vocabulary": BERT_VOCAB_FILES,
            "weights": BERT_WEIGHT_FILES,
        }
        lacking = [k for k, names in wanted.items() if not present.intersection(names)]
        if lacking:
            raise BackboneWeightsError(
                f"{model_dir}: not a BERT directory, lacking {lacking}; expected config.json, "
                f"one of {list(BERT_VOCAB_FILES)} and one of {list(BERT_WEIGHT_FILES)}"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.model = AutoModel.from_pretrained(model_dir, local_files_only=True)
        except Exception as error:  # transformers and safetensors raise many types
            raise BackboneWeightsError(f"{model_dir}: cannot load BERT: {error}") from error
        # Hash what defines the model (weights, config, vocabulary), not READMEs or caches.
        files = sorted(
            p
            for p in model_dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix in _MODEL_FILE_SUFFIXES
        )
        self.identity = f"bert:sha256-{_sha256_of_files(files, model_dir)[:16]}:T{self.max_tokens}"

    def _build_fallback(
        self, source: str, hidden_size: int, layers: int, heads: int, seed: int
    ) -> None:
        from transformers import BertConfig, BertModel

        if hidden_size % heads:
            raise ValueError(
                f"fallback_hidden_size {hidden_size} must be a multiple of fallback_heads {heads}"
            )
        logger.warning(
            "No BERT model directory configured: report features come from a WordPiece "
            "tokenizer over %s (%d tokens) and a randomly initialised %d-layer BERT "
            "(hidden %d, seed %d); they are not meaningful. Configure a local "
            "bert-base-uncased (or bert-base-chinese) directory for real data.",
            source,
            len(self.vocabulary),
            layers,
            hidden_size,
            seed,
        )
        tokenizer = wordpiece_tokenizer(self.vocabulary)
        self._fallback_counter = Tokenizer.from_str(tokenizer.to_str())
        tokenizer.enable_truncation(max_length=self.max_tokens)
        tokenizer.enable_padding(
            length=self.max_tokens, pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]"
        )
        self._fallback = tokenizer
        self.tokenizer = None
        config = BertConfig(
            vocab_size=len(self.vocabulary),
            hidden_size=hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden_size,
            max_position_embeddings=max(512, self.max_tokens),
            pad_token_id=tokenizer.token_to_id("[PAD]"),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = BertModel(config, add_pooling_layer=False)
        self.identity = (
            f"bert-fallback:wordpiece-sha256-{vocabulary_sha256(self.vocabulary)[:16]}:"
            f"random-init-seed{seed}-L{layers}-H{hidden_size}:T{self.max_tokens}"
        )

    def _tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask, each ``[N, T]`` (truncated and padded to T)."""
        if self._fallback is not None:
            encodings = self._fallback.encode_batch(texts)
            ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
            mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
            return ids, mask
        batch = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` before truncation, ``[CLS]`` and ``[SEP]`` included."""
        if self._fallback_counter is not None:
            return len(self._fallback_counter.encode(text).ids)
        return len(self.tokenizer(text, truncation=False)["input_ids"])

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 8) -> tuple[Tensor, Tensor]:
        """Token states ``[N, T, H]`` (float32, zero at padding) and mask ``[N, T]`` (bool)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts; use encode_one for one text")
        states, masks = [], []
        for start in range(0, len(texts), batch_size):
            ids, mask = self._tokenize(list(texts[start : start + batch_size]))
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            keep = mask.bool()
            states.append((hidden * keep.unsqueeze(-1)).float().cpu())
            masks.append(keep.cpu())
        if not states:
            return (
                torch.zeros(0, self.max_tokens, self.hidden_size),
                torch.zeros(0, self.max_tokens, dtype=torch.bool),
            )
        return torch.cat(states), torch.cat(masks)

    def encode_one(self, text: str) -> tuple[Tensor, Tensor]:
        """One text: states ``[T, H]`` and mask ``[T]``."""
        states, mask = self.encode([text])
        return states[0], mask[0]
