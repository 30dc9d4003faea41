"""Fixtures for a tiny, randomly initialised transformer encoder (no download).

The encoder (``model.testing.make_tiny_encoder``) is a real BERT forward pass with a
4-layer, 32-wide config; its tokenizer is the real WordPiece tokenizer shipped with the
default encoder, so word offsets and special tokens behave exactly as in production.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from model.testing import make_tiny_encoder


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


_WORDS = {
    "good": ["wonderful", "delightful", "brilliant", "moving", "charming", "superb"],
    "bad": ["dreadful", "boring", "clumsy", "tedious", "awful", "lifeless"],
    "meh": ["average", "ordinary", "middling", "passable", "routine", "forgettable"],
}
_NOUNS = ["film", "story", "cast", "script", "ending", "score", "pacing", "sequel"]


def toy_corpus(
    n: int, seed: int = 0, labels: tuple[str, ...] = ("good", "bad", "meh")
) -> list[dict[str, str]]:
    """Labelled rows whose label is carried by a few label-specific words."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = rng.sample(_WORDS[label], 2)
        noun = rng.choice(_NOUNS)
        rows.append(
            {
                "id": f"toy:{seed}:{i}",
                "text": f"The {noun} was {words[0]} and {words[1]}.",
                "label": label,
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Path) -> Path:
    """A trained bundle (tiny random encoder, toy 3-label corpus) with its embedded store."""
    from model.build import BuildOptions, build_bundle
    from model.data import Example
    from model.network import NetworkConfig
    from model.train import TrainOptions

    rows = toy_corpus(240, seed=11)
    examples = [Example(r["id"], r["text"], r["label"]) for r in rows]
    out = tmp_path_factory.mktemp("tiny-bundle") / "bundle"
    options = BuildOptions(
        alpha=0.9,
        k=4,
        network=NetworkConfig(
            labels=("_", "__"), encoder=str(tiny_encoder), num_filters=32, max_length=64
        ),
        train=TrainOptions(max_epochs=25, progress=False, learning_rate=3e-3),
    )
    return build_bundle(examples[:180], out, examples[180:], options)


def copy_bundle(bundle: Path, target: Path) -> Path:
    """A private copy (the embedded store allows one process per directory)."""
    shutil.copytree(bundle, target)
    return target
