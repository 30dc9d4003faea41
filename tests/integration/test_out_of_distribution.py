"""Text far from the training data is mostly not admitted.

A tiny model trained on the toy review corpus sees the shipped emails and
foreign-language sentences (model/resources/ood): most of them must be routed to
humans, while held-out in-domain text is mostly admitted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from daemon.app import load
from daemon.config import Settings
from model.data import Example, ood_paths, read_examples
from model.evaluate import evaluate
from tests.model_fixtures import copy_bundle, toy_corpus


@pytest.fixture
def loaded(tiny_bundle: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    bundle = load(Settings(), str(copy_bundle(tiny_bundle, tmp_path / "b")))
    yield bundle
    bundle.close()


def test_far_away_text_is_routed_to_humans(loaded) -> None:  # type: ignore[no-untyped-def]
    in_domain = [Example(r["id"], r["text"], r["label"]) for r in toy_corpus(90, seed=99)]
    report, _ = evaluate(loaded.predictor, in_domain, None, loaded.bundle.calibration)
    assert report["coverage"] >= 0.5
    assert report["admitted_accuracy"] >= 0.9
    for name, path in ood_paths().items():
        rows = read_examples(path)
        ood, _ = evaluate(loaded.predictor, rows, None, loaded.bundle.calibration)
        assert ood["coverage"] <= 0.2, (name, ood["coverage"], ood["reject_reasons"])
        assert ood["reject_reasons"].get("too_far", 0) > 0


def test_a_bfloat16_encoder_serves_nearly_the_same_decisions(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """EXEMPLAR_COMPUTE__ENCODER_DTYPE=bfloat16: the thresholds stay the float32 ones."""
    rows = [Example(r["id"], r["text"], r["label"]) for r in toy_corpus(90, seed=99)]
    copies = [copy_bundle(tiny_bundle, tmp_path / name) for name in ("f32", "bf16")]
    full = load(Settings(), str(copies[0]))
    half = load(Settings(compute={"encoder_dtype": "bfloat16"}), str(copies[1]))  # type: ignore[arg-type]
    try:
        assert next(half.predictor.network.encoder.parameters()).dtype == torch.bfloat16
        texts = [r.text for r in rows]
        a = full.predictor.predict(texts).predictions
        b = half.predictor.predict(texts).predictions
        same_label = sum(x.label == y.label for x, y in zip(a, b, strict=True))
        same_admission = sum(x.admitted == y.admitted for x, y in zip(a, b, strict=True))
        assert same_label >= 0.9 * len(rows) and same_admission >= 0.9 * len(rows)
    finally:
        full.close()
        half.close()
