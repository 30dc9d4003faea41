"""The smoke run's model and data: a tiny random BERT and a toy corpus, built in seconds.

Built like the test fixtures (``model.testing.make_tiny_encoder``, here a 2-layer, 32-wide
random ``BertModel`` with the default encoder's real WordPiece tokenizer; texts whose
label is carried by a few words) so ``benchmarks.run --smoke`` needs no trained model and
no download, and exercises every code path of the full run at toy sizes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from model.build import BuildOptions, build_bundle
from model.data import Example
from model.network import NetworkConfig
from model.testing import make_tiny_encoder
from model.train import TrainOptions

WORDS = {
    "good": ["wonderful", "delightful", "brilliant", "moving", "charming", "superb"],
    "bad": ["dreadful", "boring", "clumsy", "tedious", "awful", "lifeless"],
    "meh": ["average", "ordinary", "middling", "passable", "routine", "forgettable"],
}
NOUNS = ["film", "story", "cast", "script", "ending", "score", "pacing", "sequel"]
PLOT_WORDS = ["a detective", "two sisters", "a farmer", "the crew", "an old spy", "a robot"]
PLOT_VERBS = ["travels to", "returns to", "investigates", "escapes from", "inherits"]
PLOT_PLACES = ["a small town", "the capital", "an island", "the mountains", "a space station"]


def toy_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    labels = sorted(WORDS)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        a, b = rng.sample(WORDS[label], 2)
        rows.append(
            {
                "id": f"toy:{seed}:{i}",
                "label": label,
                "text": f"The {rng.choice(NOUNS)} was {a} and {b}.",
            }
        )
    return rows


def plot_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {
            "id": f"plot:{i}",
            "text": f"{rng.choice(PLOT_WORDS).capitalize()} "
            f"{rng.choice(PLOT_VERBS)} {rng.choice(PLOT_PLACES)} and finds a secret.",
        }
        for i in range(n)
    ]


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def build_smoke_inputs(root: Path) -> tuple[Path, Path]:
    """Write toy data and a tiny trained bundle under ``root``; (model_dir, data_dir)."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = toy_rows(360, seed=11)
    _write(data / "train.jsonl", rows[:180])
    _write(data / "calib.jsonl", rows[180:270])
    _write(data / "test.jsonl", rows[270:])
    _write(data / "plots.jsonl", plot_rows(40, seed=5))
    encoder = make_tiny_encoder(root / "encoder", num_layers=2)
    options = BuildOptions(
        alpha=0.9,
        k=4,
        # every field given: the product's defaults may change, the smoke model must not
        network=NetworkConfig(
            labels=("_", "__"),
            encoder=str(encoder),
            num_layers=2,
            num_filters=32,
            max_length=64,
            dropout=0.1,
        ),
        train=TrainOptions(max_epochs=10, progress=False, learning_rate=3e-3),
    )
    examples = [Example(r["id"], r["text"], r["label"]) for r in rows]
    model = build_bundle(examples[:180], root / "model", examples[180:270], options)
    return model, data
