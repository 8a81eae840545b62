"""Frozen backbones: ResNet-34 trunk weights handling and the report BERT (local or fallback)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18, resnet34

from omnifuse_model.data.features.backbones import (
    BackboneWeightsError,
    TextBackbone,
    build_resnet34_trunk,
    read_wordpiece_vocabulary,
    vocabulary_sha256,
    wordpiece_vocabulary,
)

ENGLISH = [
    "The heart size is normal. No pleural effusion or pneumothorax.",
    "Right lower lobe opacity concerning for pneumonia.",
    "Lungs are clear. Support devices unchanged.",
]
CHINESE = ["双肺纹理清晰，未见实变。", "心影大小正常，右下肺见片状阴影。"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- ResNet-34


def test_random_trunk_warns_and_is_frozen(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="omnifuse_model.data.features.backbones"):
        trunk = build_resnet34_trunk(None, seed=3)
    assert "not meaningful" in caplog.text
    assert trunk.identity == "resnet34:random-init-seed-3"
    assert not trunk.training
    assert not any(p.requires_grad for p in trunk.parameters())
    trunk.train()  # a parent's .train() must not switch batch norm to batch statistics
    assert not trunk.training
    assert trunk(torch.zeros(1, 3, 64, 64)).shape == (1, 512)
    again = build_resnet34_trunk(None, seed=3)
    assert torch.equal(trunk.conv1.weight, again.conv1.weight)


def test_weights_round_trip_full_and_trunk_dicts(tmp_path: Path) -> None:
    source = build_resnet34_trunk(None, seed=1)
    full = resnet34(weights=None)  # torchvision layout, with an fc head that must be dropped
    full.load_state_dict({**source.state_dict(), **full.fc.state_dict(prefix="fc.")})
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = source(images)

    saved = {
        "full.pt": full.state_dict(),
        "trunk.pt": source.state_dict(),
        "wrapped.pt": {"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}},
    }
    identities = set()
    for name, state in saved.items():
        torch.save(state, tmp_path / name)
        trunk = build_resnet34_trunk(tmp_path / name)
        assert torch.equal(trunk(images), expected), name
        assert trunk.identity.startswith("resnet34:sha256-")
        assert not trunk.training and not any(p.requires_grad for p in trunk.parameters())
        identities.add(trunk.identity)
    assert len(identities) == 3  # the identity follows the file's bytes


def test_weights_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "absent.pt"
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        build_resnet34_trunk(missing)
    other = tmp_path / "resnet18.pt"
    torch.save(resnet18(weights=None).state_dict(), other)
    with pytest.raises(BackboneWeightsError, match=r"resnet18\.pt.*unexpected"):
        build_resnet34_trunk(other)
    bent = build_resnet34_trunk(None).state_dict()
    bent["conv1.weight"] = torch.zeros(64, 1, 7, 7)  # a one-channel stem
    torch.save(bent, tmp_path / "bent.pt")
    with pytest.raises(BackboneWeightsError, match=r"bent\.pt.*conv1\.weight"):
        build_resnet34_trunk(tmp_path / "bent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneWeightsError, match="garbage.pt"):
        build_resnet34_trunk(garbage)


# --------------------------------------------------------------------------- report BERT


@pytest.fixture(scope="module")
def fallback() -> TextBackbone:
    """The default fallback: hidden 768, so shapes equal bert-base's."""
    return TextBackbone(fallback_texts=ENGLISH + CHINESE)


def test_fallback_states_and_masks(fallback: TextBackbone) -> None:
    texts = [ENGLISH[0], CHINESE[1], "pneumonia " * 200]
    states, masks = fallback.encode(texts)
    assert states.shape == (3, 150, 768) and states.dtype == torch.float32
    assert masks.shape == (3, 150) and masks.dtype == torch.bool
    for text, mask, state in zip(texts, masks, states, strict=True):
        count = min(fallback.count_tokens(text), 150)
        assert mask.sum().item() == count
        assert mask[:count].all() and not mask[count:].any()  # real tokens first
        assert (state[count:] == 0).all() and (state[:count] != 0).any()
    # Chinese is split one character per token: [CLS] + 16 characters (with punctuation) + [SEP]
    assert fallback.count_tokens(CHINESE[1]) == len(CHINESE[1]) + 2
    assert fallback.count_tokens("pneumonia " * 200) > 150
    one_state, one_mask = fallback.encode_one(ENGLISH[0])
    torch.testing.assert_close(one_state, states[0])
    assert torch.equal(one_mask, masks[0])


def test_fallback_is_deterministic_and_identified(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="omnifuse_model.data.features.backbones"):
        first = TextBackbone(fallback_texts=CHINESE, fallback_hidden_size=32, fallback_heads=2)
    assert "not meaningful" in caplog.text
    second = TextBackbone(fallback_texts=CHINESE, fallback_hidden_size=32, fallback_heads=2)
    other = TextBackbone(fallback_texts=CHINESE[:1], fallback_hidden_size=32, fallback_heads=2)
    assert first.identity == second.identity != other.identity
    assert first.identity.startswith("bert-fallback:wordpiece")
    states, _ = first.encode(CHINESE)
    assert states.shape == (2, 150, 32)
    assert torch.equal(states, second.encode(CHINESE)[0])


def test_fallback_needs_texts() -> None:
    with pytest.raises(ValueError, match="fallback_texts"):
        TextBackbone()
    with pytest.raises(ValueError, match="fallback_texts"):
        TextBackbone(fallback_texts=["", "  "])


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny model in the bert-base-uncased layout: config.json, vocab.txt, safetensors."""
    from transformers import BertConfig, BertModel

    directory = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "，", "。"]
    vocab += ["the", "heart", "size", "is", "normal", "no", "pleural", "effusion", "lungs"]
    vocab += ["are", "clear", "##s"]
    vocab += list("双肺纹理清晰未见实变心影大小正常")
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=160,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    return directory


def test_local_bert_directory(bert_dir: Path) -> None:
    backbone = TextBackbone(bert_dir)
    assert backbone.hidden_size == 32
    assert backbone.identity.startswith("bert:sha256-") and backbone.identity.endswith(":T150")
    states, masks = backbone.encode(["The heart size is normal.", *CHINESE])
    assert states.shape == (3, 150, 32) and masks.shape == (3, 150)
    assert masks[0].sum().item() == backbone.count_tokens("The heart size is normal.") == 8
    # Chinese through the same path: one token per character plus [CLS] and [SEP]
    assert masks[1].sum().item() == len(CHINESE[0]) + 2
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert TextBackbone(bert_dir).identity == backbone.identity


def test_local_bert_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-bert"):
        TextBackbone(tmp_path / "no-such-bert")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BackboneWeightsError, match=r"lacking \['vocabulary', 'weights'\]"):
        TextBackbone(tmp_path)


def test_local_bert_too_few_positions(bert_dir: Path) -> None:
    with pytest.raises(ValueError, match="160 position embeddings"):
        TextBackbone(bert_dir, max_tokens=200)


# --------------------------------------------------------------------------- fallback vocabulary

_TWO_PROCESSES = """
import json, sys, torch
from omnifuse_model.data.features.backbones import TextBackbone
torch.set_num_threads(1)
texts = json.loads(sys.argv[1])
backbone = TextBackbone(fallback_texts=texts, fallback_hidden_size=32, fallback_heads=2,
                        fallback_layers=1, fallback_vocab_size=120)
states, mask = backbone.encode(texts)
torch.save({"vocabulary": backbone.vocabulary, "identity": backbone.identity,
            "states": states, "mask": mask}, sys.argv[2])
"""


def test_fallback_is_the_same_in_two_processes(tmp_path: Path) -> None:
    """Hugging Face's WordPiece trainer broke frequency ties in hash order: the vocabulary, and
    so the features of one cache key, differed between processes (by up to 3.4)."""
    texts = [*ENGLISH, *CHINESE, "effusion effusion opacity opacity clear clear"] * 3
    runs = []
    for seed in ("1", "2"):  # different string hashing in each process; run side by side
        out = tmp_path / f"run{seed}.pt"
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(Path.cwd())}
        command = [sys.executable, "-c", _TWO_PROCESSES, json.dumps(texts), str(out)]
        runs.append((subprocess.Popen(command, env=env), out))
    for process, _ in runs:
        assert process.wait(timeout=300) == 0
    first, second = (torch.load(out) for _, out in runs)
    assert first["vocabulary"] == second["vocabulary"] and "effusion" in first["vocabulary"]
    assert first["identity"] == second["identity"]
    assert torch.equal(first["mask"], second["mask"])
    assert torch.equal(first["states"], second["states"])


def test_vocabulary_file_and_identity(tmp_path: Path) -> None:
    small = {"fallback_hidden_size": 32, "fallback_heads": 2, "fallback_layers": 1}
    built = TextBackbone(fallback_texts=ENGLISH, **small)
    assert built.vocabulary == wordpiece_vocabulary(ENGLISH, 8000)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(built.vocabulary) + "\n", encoding="utf-8")
    from_file = TextBackbone(fallback_vocab=vocab, **small)  # no texts needed
    assert from_file.identity == built.identity
    assert vocabulary_sha256(built.vocabulary)[:16] in built.identity
    assert torch.equal(from_file.encode(ENGLISH)[0], built.encode(ENGLISH)[0])
    vocab.write_text("\n".join([*built.vocabulary, "cardiomegaly"]) + "\n", encoding="utf-8")
    assert TextBackbone(fallback_vocab=vocab, **small).identity != built.identity
    vocab.write_text("hello\nworld\nhello\n", encoding="utf-8")
    with pytest.raises(BackboneWeightsError, match=r"vocab.txt: not a BERT vocab.txt.*'hello'"):
        TextBackbone(fallback_vocab=vocab, **small)
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        read_wordpiece_vocabulary(tmp_path / "absent.txt")
