"""The admission rule and its calibration, on synthetic statistics with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.admission import (
    HUMAN_MAPPING,
    CalibrationStats,
    Thresholds,
    calibrate,
    calibrate_softmax_threshold,
    decide,
    near_duplicate_threshold,
    support_count,
    trivial_edits,
    wilson_lower,
)
from model.store.base import Neighbor


def nb(
    label: str, predicted: str | None = None, distance: float = 1.0, source: str = "train"
) -> Neighbor:
    return Neighbor(
        id=f"x{distance}",
        distance=distance,
        label=label,
        predicted=predicted or label,
        source=source,
    )


T = Thresholds(
    alpha=0.9,
    k=4,
    q_min=2,
    tau={"pos": 2.0, "neg": 2.0},
    margin={"pos": 0.2, "neg": 0.2},
    near_duplicate=0.05,
)


def test_support_counts_consecutive_true_positives_from_the_nearest() -> None:
    assert support_count("pos", [nb("pos"), nb("pos"), nb("neg"), nb("pos")]) == 2
    assert support_count("pos", [nb("neg"), nb("pos")]) == 0
    # a training exemplar the model got wrong is not a true-positive association
    assert support_count("pos", [nb("pos", predicted="neg"), nb("pos")]) == 0
    # a human mapping counts with its human label, whatever the model predicted for it
    assert support_count("pos", [nb("pos", predicted="neg", source="human"), nb("pos")]) == 2


def test_admits_when_everything_agrees() -> None:
    v = decide("pos", 0.5, [nb("pos", distance=1.0), nb("pos", distance=1.5)], T)
    assert v.admitted and v.admitted_by == "exemplar_support" and v.support == 2
    assert v.distance == 1.0


@pytest.mark.parametrize(
    ("label", "margin", "neighbors", "reasons"),
    [
        ("pos", 0.5, [], ("no_support",)),
        ("pos", 0.5, [nb("pos", distance=1.0), nb("neg", distance=1.1)], ("label_disagreement",)),
        ("pos", 0.5, [nb("pos", distance=3.0), nb("pos", distance=3.1)], ("too_far",)),
        ("pos", 0.1, [nb("pos", distance=1.0), nb("pos", distance=1.1)], ("low_margin",)),
        ("pos", 0.1, [nb("neg", distance=5.0)], ("label_disagreement", "too_far", "low_margin")),
    ],
)
def test_rejections_carry_every_reason(
    label: str, margin: float, neighbors: list[Neighbor], reasons: tuple[str, ...]
) -> None:
    v = decide(label, margin, neighbors, T)
    assert not v.admitted
    assert v.reasons == reasons


def test_uncalibrated_label_is_never_admitted() -> None:
    t = T.with_overrides()
    t = Thresholds(**{**t.to_json(), "tau": {"pos": None, "neg": 2.0}})
    v = decide("pos", 0.9, [nb("pos", distance=0.1)] * 4, t)
    assert not v.admitted and "uncalibrated_label" in v.reasons


def test_human_mapping_within_near_duplicate_overrides_the_model() -> None:
    human = nb("neg", predicted="pos", distance=0.01, source="human")
    v = decide("pos", 0.9, [human, nb("pos", distance=0.5)], T)
    assert v.admitted and v.label == "neg" and v.admitted_by == HUMAN_MAPPING
    # further away it is just another exemplar, here one that disagrees
    far = nb("neg", predicted="pos", distance=0.5, source="human")
    v = decide("pos", 0.9, [far, nb("pos", distance=0.6)], T)
    assert not v.admitted and v.reasons == ("label_disagreement",)


def test_overrides_replace_calibrated_values_and_reject_unknown_labels() -> None:
    t = T.with_overrides(q_min=1, tau={"pos": 9.0})
    assert t.q_min == 1 and t.tau == {"pos": 9.0, "neg": 2.0}
    with pytest.raises(ValueError, match="does not know"):
        T.with_overrides(tau={"maybe": 1.0})
    with pytest.raises(ValueError, match="q_min"):
        T.with_overrides(q_min=9)


def test_wilson_lower_bound() -> None:
    assert wilson_lower(95, 100, 0.5) == pytest.approx(0.95)
    low = float(wilson_lower(95, 100, 0.9))
    assert 0.9 < low < 0.95
    assert float(wilson_lower(0, 0, 0.9)) == 0.0
    # more evidence, tighter bound
    assert float(wilson_lower(950, 1000, 0.9)) > low


def _synthetic(n: int, seed: int) -> CalibrationStats:
    """Correctness falls with distance and rises with q: a world where the rule can work."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(["pos", "neg"], size=n)
    d = rng.uniform(0, 1, size=n)
    q = rng.integers(0, 5, size=n)
    margin = rng.uniform(0, 1, size=n)
    p_correct = np.clip(1.05 - d * 0.6 - (q == 0) * 0.4 + margin * 0.1, 0, 1)
    correct = rng.uniform(size=n) < p_correct
    gold = [
        lab if ok else ("neg" if lab == "pos" else "pos")
        for lab, ok in zip(labels, correct, strict=True)
    ]
    return CalibrationStats(
        predicted=list(labels), gold=gold, margin=list(margin), distance=list(d), support=list(q)
    )


def _admitted_accuracy(stats: CalibrationStats, t: Thresholds) -> tuple[float, float]:
    admitted, correct = 0, 0
    for p, g, m, d, q in zip(
        stats.predicted, stats.gold, stats.margin, stats.distance, stats.support, strict=True
    ):
        tau = t.tau[p]
        if tau is not None and q >= t.q_min and d <= tau and m >= t.margin[p]:
            admitted += 1
            correct += p == g
    return correct / max(admitted, 1), admitted / len(stats.predicted)


@pytest.mark.parametrize("alpha", [0.85, 0.9, 0.95])
def test_calibration_reaches_alpha_on_fresh_data(alpha: float) -> None:
    t = calibrate(_synthetic(4000, 0), ["pos", "neg"], alpha, k=4, near_duplicate=0.01)
    accuracy, coverage = _admitted_accuracy(_synthetic(20000, 1), t)
    assert accuracy >= alpha - 0.01
    assert coverage > 0.1
    assert t.q_min >= 1


def test_calibration_admits_nothing_where_alpha_is_out_of_reach() -> None:
    rng = np.random.default_rng(3)
    n = 2000
    pred = list(rng.choice(["pos", "neg"], size=n))
    gold = list(rng.choice(["pos", "neg"], size=n))  # coin flips: 50% accurate everywhere
    stats = CalibrationStats(
        pred,
        gold,
        list(rng.uniform(size=n)),
        list(rng.uniform(size=n)),
        list(rng.integers(0, 5, size=n)),
    )
    t = calibrate(stats, ["pos", "neg"], 0.95, k=4, near_duplicate=0.01)
    assert t.tau == {"pos": None, "neg": None}


def test_calibration_stats_round_trip_json() -> None:
    stats = _synthetic(50, 4)
    stats.distance[0] = math.inf
    again = CalibrationStats.from_json(stats.to_json())
    assert again == stats


def test_softmax_threshold_calibration() -> None:
    rng = np.random.default_rng(5)
    p = rng.uniform(0.5, 1.0, size=5000)
    correct = rng.uniform(size=5000) < p
    t = calibrate_softmax_threshold(p, correct, 0.9, confidence=0.8)
    assert 0.8 < t < 1.0
    fresh = rng.uniform(0.5, 1.0, size=20000)
    fresh_ok = rng.uniform(size=20000) < fresh
    assert fresh_ok[fresh >= t].mean() >= 0.89
    assert calibrate_softmax_threshold(p, np.zeros(5000, dtype=bool), 0.9) == math.inf


def test_near_duplicate_threshold_stays_below_distinct_text_distances() -> None:
    edits = np.array([0.01, 0.02, 0.5])
    others = np.linspace(0.1, 5, 1000)
    value = near_duplicate_threshold(edits, others)
    assert value <= np.quantile(others, 0.01)
    assert trivial_edits("Hello  world!")
    assert "Hello  world!" not in trivial_edits("Hello  world!")
