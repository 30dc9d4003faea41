"""The network: shapes, exact token contributions, word merging, determinism.

Real transformer forward passes on a tiny randomly initialised BERT (no download).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.network import (
    ExemplarNetwork,
    NetworkConfig,
    load_encoder,
    tokenize,
    word_contributions,
)
from model.train import TrainOptions, train_network
from tests.model_fixtures import toy_corpus


def _network(
    encoder_dir: Path, labels: tuple[str, ...], filters: int = 24, seed: int = 0
) -> tuple[ExemplarNetwork, object]:
    torch.manual_seed(seed)
    encoder, tokenizer = load_encoder(str(encoder_dir))
    cfg = NetworkConfig(
        labels=labels, encoder=str(encoder_dir), num_filters=filters, num_layers=2, max_length=32
    )
    return ExemplarNetwork(cfg, encoder).eval(), tokenizer


TEXTS = ["An unbelievably charming film!", "dull", "The cast, the score and the ending."]


@pytest.mark.parametrize("labels", [("neg", "pos"), ("a", "b", "c", "d")])
def test_shapes(tiny_encoder: Path, labels: tuple[str, ...]) -> None:
    net, tok = _network(tiny_encoder, labels, filters=24)
    enc = tokenize(tok, TEXTS, 32)
    with torch.no_grad():
        out = net(enc)
    assert out.logits.shape == (3, len(labels))
    assert out.exemplar.shape == (3, 24)
    assert out.argmax.shape == (3, 24)
    assert (out.exemplar >= 0).all()  # ReLU after the max-pool


def test_a_bfloat16_encoder_keeps_the_head_in_float32_and_close(tiny_encoder: Path) -> None:
    net, tok = _network(tiny_encoder, ("neg", "pos"))
    enc = tokenize(tok, TEXTS, 32)
    with torch.no_grad():
        full = net(enc)
        net.set_encoder_dtype(torch.bfloat16)
        half = net(enc)
        contrib = net.token_contributions(half, enc.input_ids.shape[1])
    assert {p.dtype for p in net.encoder.parameters()} == {torch.bfloat16}
    assert net.head.weight.dtype == net.conv.weight.dtype == torch.float32
    assert half.logits.dtype == half.exemplar.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: close to, not equal to, the float32 pass
    assert not torch.equal(half.exemplar, full.exemplar)
    torch.testing.assert_close(half.exemplar, full.exemplar, rtol=0.05, atol=0.05)
    # the attributions stay exact for what the head saw
    torch.testing.assert_close(contrib.sum(dim=1) + net.head.bias, half.logits)


@pytest.mark.parametrize("labels", [("neg", "pos"), ("a", "b", "c")])
def test_contributions_add_up_to_logits(tiny_encoder: Path, labels: tuple[str, ...]) -> None:
    net, tok = _network(tiny_encoder, labels)
    enc = tokenize(tok, TEXTS, 32)
    with torch.no_grad():
        out = net(enc)
        contrib = net.token_contributions(out, enc.input_ids.shape[1])
    rebuilt = contrib.sum(dim=1) + net.head.bias
    torch.testing.assert_close(rebuilt, out.logits, rtol=1e-5, atol=1e-5)


def test_special_tokens_and_padding_never_win_the_max_pool(tiny_encoder: Path) -> None:
    net, tok = _network(tiny_encoder, ("neg", "pos"))
    enc = tokenize(tok, TEXTS, 32)
    with torch.no_grad():
        out = net(enc)
    winners = torch.gather(enc.token_mask, 1, out.argmax)
    assert winners.all()


def test_words_merge_subword_pieces_and_keep_the_sum(tiny_encoder: Path) -> None:
    net, tok = _network(tiny_encoder, ("neg", "pos"))
    text = TEXTS[0]
    enc = tokenize(tok, [text], 32)
    assert len(enc.input_ids[0]) > len(text.split()) + 2  # some word is split into pieces
    with torch.no_grad():
        out = net(enc)
        contrib = net.token_contributions(out, enc.input_ids.shape[1])[0]
    words = word_contributions(text, contrib, enc.word_ids[0], enc.offsets[0], label_index=1)
    assert [w.word for w in words] == ["An", "unbelievably", "charming", "film", "!"]
    assert all(text[w.start : w.end] == w.word for w in words)
    expected = float((contrib[:, 1] - contrib[:, 0]).sum())
    assert sum(w.score for w in words) == pytest.approx(expected, abs=1e-5)


def test_multiclass_words_score_the_predicted_class(tiny_encoder: Path) -> None:
    net, tok = _network(tiny_encoder, ("a", "b", "c"))
    enc = tokenize(tok, [TEXTS[2]], 32)
    with torch.no_grad():
        out = net(enc)
        contrib = net.token_contributions(out, enc.input_ids.shape[1])[0]
    words = word_contributions(TEXTS[2], contrib, enc.word_ids[0], enc.offsets[0], 2)
    assert sum(w.score for w in words) == pytest.approx(float(contrib[:, 2].sum()), abs=1e-5)


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="two labels"):
        NetworkConfig(labels=("only",))
    with pytest.raises(ValueError, match="distinct"):
        NetworkConfig(labels=("a", "a"))


def _train_once(encoder_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    rows = toy_corpus(60, seed=1)
    labels = ("bad", "good", "meh")
    index = {lab: i for i, lab in enumerate(labels)}
    net, tok = _network(encoder_dir, labels, filters=16, seed=seed)
    train_network(
        net,
        tok,
        [r["text"] for r in rows[:48]],
        [index[r["label"]] for r in rows[:48]],
        [r["text"] for r in rows[48:]],
        [index[r["label"]] for r in rows[48:]],
        TrainOptions(max_epochs=3, patience=3, seed=seed, progress=False),
    )
    return {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("encoder.")}


def test_training_is_deterministic_for_a_seed(tiny_encoder: Path) -> None:
    first = _train_once(tiny_encoder, seed=5)
    second = _train_once(tiny_encoder, seed=5)
    other = _train_once(tiny_encoder, seed=6)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_training_learns_the_toy_task(tiny_encoder: Path) -> None:
    rows = toy_corpus(120, seed=2)
    labels = ("bad", "good", "meh")
    index = {lab: i for i, lab in enumerate(labels)}
    net, tok = _network(tiny_encoder, labels, filters=32, seed=0)
    result = train_network(
        net,
        tok,
        [r["text"] for r in rows[:90]],
        [index[r["label"]] for r in rows[:90]],
        [r["text"] for r in rows[90:]],
        [index[r["label"]] for r in rows[90:]],
        TrainOptions(max_epochs=30, patience=5, seed=0, progress=False, learning_rate=3e-3),
    )
    assert result.best_dev_accuracy >= 0.9
    assert result.best_epoch <= result.epochs_run
