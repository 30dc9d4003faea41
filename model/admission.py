"""The admission rule and its calibration (DESIGN.md §3).

A prediction ``y`` is admitted iff

* ``q >= q_min``: the ``q`` nearest support exemplars, counted from the nearest
  outward until the first that breaks the run, are true-positive associations
  for ``y`` (true label == predicted label == ``y``; a human mapping counts with
  its human label as the truth);
* ``d <= tau[y]``: the nearest exemplar is close enough;
* ``margin >= m[y]``: the model's own softmax margin for ``y`` clears a floor.

Exception: when the nearest exemplar is a human mapping within the calibrated
near-duplicate distance, its human label is output and admitted (``human_mapping``).

Thresholds are never typed in by hand: :func:`calibrate` picks, on a held-out
calibration split, per predicted label the ``(tau, m)`` with the largest coverage
whose admitted accuracy reaches ``alpha`` (judged by a one-sided Wilson lower
bound, so small calibration sets are not over-trusted), and the ``q_min`` that
maximises total coverage. The per-row statistics are kept with the model, so a new
``alpha`` recalibrates in milliseconds without touching the data again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt

from model.store.base import Neighbor

LABEL_DISAGREEMENT = "label_disagreement"
TOO_FAR = "too_far"
LOW_MARGIN = "low_margin"
NO_SUPPORT = "no_support"
UNCALIBRATED_LABEL = "uncalibrated_label"
REJECT_REASONS = (LABEL_DISAGREEMENT, TOO_FAR, LOW_MARGIN, NO_SUPPORT, UNCALIBRATED_LABEL)

EXEMPLAR_SUPPORT = "exemplar_support"
HUMAN_MAPPING = "human_mapping"

_GRID = 48  # candidate thresholds per axis: quantiles of the observed values


@dataclass(frozen=True)
class Thresholds:
    """Everything the rule needs; stored with the model version, overridable from settings."""

    alpha: float
    k: int
    q_min: int
    tau: dict[str, float | None]  # None: this label never reached alpha, never admitted
    margin: dict[str, float]
    near_duplicate: float
    confidence: float = 0.8

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Thresholds:
        return cls(**dict(data))

    def with_overrides(
        self,
        q_min: int | None = None,
        tau: Mapping[str, float] | None = None,
        margin: Mapping[str, float] | None = None,
        near_duplicate: float | None = None,
    ) -> Thresholds:
        """Operator overrides win over calibrated values, label by label."""
        unknown = (set(tau or {}) | set(margin or {})) - set(self.tau)
        if unknown:
            raise ValueError(f"override names labels the model does not know: {sorted(unknown)}")
        if q_min is not None and not 0 <= q_min <= self.k:
            raise ValueError(f"q_min must be between 0 and k={self.k}, got {q_min}")
        return replace(
            self,
            q_min=self.q_min if q_min is None else q_min,
            tau={**self.tau, **dict(tau or {})},
            margin={**self.margin, **dict(margin or {})},
            near_duplicate=self.near_duplicate if near_duplicate is None else near_duplicate,
        )


@dataclass(frozen=True)
class Verdict:
    """The rule's answer for one prediction."""

    admitted: bool
    label: str  # the output label (a human mapping may replace the model's)
    reasons: tuple[str, ...] = ()
    admitted_by: str | None = None
    support: int = 0
    distance: float | None = None


def is_true_positive(neighbor: Neighbor, label: str) -> bool:
    """A support exemplar that backs ``label``: truth and prediction agree on it.

    A human mapping's truth is the reviewer's label; what the model once predicted
    for it does not matter (the human overrode it).
    """
    if neighbor.source == "human":
        return neighbor.label == label
    return neighbor.label == label and neighbor.predicted == label


def support_count(label: str, neighbors: Sequence[Neighbor]) -> int:
    """Run length of true-positive associations for ``label`` from the nearest outward."""
    q = 0
    for n in neighbors:
        if not is_true_positive(n, label):
            break
        q += 1
    return q


def decide(label: str, margin: float, neighbors: Sequence[Neighbor], t: Thresholds) -> Verdict:
    """Apply the admission rule to one prediction."""
    if not neighbors:
        return Verdict(False, label, (NO_SUPPORT,))
    nearest = neighbors[0]
    if nearest.source == "human" and nearest.distance <= t.near_duplicate:
        return Verdict(
            True,
            nearest.label,
            (),
            HUMAN_MAPPING,
            support=support_count(nearest.label, neighbors),
            distance=nearest.distance,
        )
    q = support_count(label, neighbors)
    reasons: list[str] = []
    tau = t.tau.get(label)
    if tau is None:
        reasons.append(UNCALIBRATED_LABEL)
    if q < t.q_min:
        reasons.append(LABEL_DISAGREEMENT)
    if tau is not None and nearest.distance > tau:
        reasons.append(TOO_FAR)
    if margin < t.margin.get(label, 0.0):
        reasons.append(LOW_MARGIN)
    if reasons:
        return Verdict(False, label, tuple(reasons), None, q, nearest.distance)
    return Verdict(True, label, (), EXEMPLAR_SUPPORT, q, nearest.distance)


def softmax_margin(probs: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    """Top probability minus runner-up, per row."""
    top2 = np.sort(np.asarray(probs, dtype=np.float64), axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def wilson_lower(correct: npt.ArrayLike, total: npt.ArrayLike, confidence: float) -> np.ndarray:
    """One-sided Wilson score lower bound of a binomial proportion (0 where total is 0).

    ``confidence=0.5`` gives the plain empirical accuracy.
    """
    correct = np.asarray(correct, dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    z = NormalDist().inv_cdf(confidence) if confidence > 0.5 else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(total > 0, correct / total, 0.0)
        if z == 0.0:
            return p
        denom = 1 + z * z / total
        centre = p + z * z / (2 * total)
        spread = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
        bound = (centre - spread) / denom
    return np.where(total > 0, bound, 0.0)


@dataclass
class CalibrationStats:
    """Per-row facts of the calibration split; all the calibration search needs."""

    predicted: list[str]
    gold: list[str]
    margin: list[float]
    distance: list[float]  # nearest distance (inf when the store returned nothing)
    support: list[int]  # q: run length of true-positive neighbours for the prediction

    @classmethod
    def build(
        cls,
        predicted: Sequence[str],
        gold: Sequence[str],
        margins: Sequence[float],
        neighbors: Sequence[Sequence[Neighbor]],
    ) -> CalibrationStats:
        return cls(
            predicted=list(predicted),
            gold=list(gold),
            margin=[float(m) for m in margins],
            distance=[float(n[0].distance) if n else math.inf for n in neighbors],
            support=[support_count(p, n) for p, n in zip(predicted, neighbors, strict=True)],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "predicted": self.predicted,
            "gold": self.gold,
            "margin": self.margin,
            "distance": [d if math.isfinite(d) else None for d in self.distance],
            "support": list(self.support),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CalibrationStats:
        return cls(
            predicted=list(data["predicted"]),
            gold=list(data["gold"]),
            margin=[float(m) for m in data["margin"]],
            distance=[math.inf if d is None else float(d) for d in data["distance"]],
            support=[int(s) for s in data["support"]],
        )


def _candidates(values: npt.NDArray[np.float64], extra: Sequence[float]) -> np.ndarray:
    finite = values[np.isfinite(values)]
    qs = np.quantile(finite, np.linspace(0, 1, _GRID)) if finite.size else np.array([])
    return np.unique(np.concatenate([qs, np.asarray(extra, dtype=np.float64)]))


def _best_for_label(
    q: np.ndarray,
    d: np.ndarray,
    m: np.ndarray,
    ok: np.ndarray,
    q_min: int,
    alpha: float,
    confidence: float,
    min_admitted: int,
) -> tuple[int, float | None, float]:
    """Largest admitted count for one predicted label at one q_min; (count, tau, m)."""
    eligible = q >= q_min
    if not eligible.any():
        return 0, None, 0.0
    finite = eligible & np.isfinite(d)
    taus = np.unique(d[finite])  # every observed distance: exact search along tau
    best: tuple[int, float | None, float] = (0, None, 0.0)
    for m_floor in _candidates(m, [0.0]):
        rows = eligible & (m >= m_floor)
        order = np.argsort(d[rows], kind="stable")
        sorted_d = d[rows][order]
        cum_ok = np.concatenate([[0], np.cumsum(ok[rows][order])])
        # admitted count and correct count for every candidate tau, memory O(rows)
        total = np.searchsorted(sorted_d, taus, side="right")
        correct = cum_ok[total]
        good = (wilson_lower(correct, total, confidence) >= alpha) & (total >= min_admitted)
        if good.any():
            i = int(np.argmax(np.where(good, total, -1)))
            if total[i] > best[0]:
                best = (int(total[i]), float(taus[i]), float(m_floor))
    return best


def calibrate(
    stats: CalibrationStats,
    labels: Sequence[str],
    alpha: float,
    k: int,
    near_duplicate: float,
    confidence: float = 0.8,
    min_admitted: int = 5,
) -> Thresholds:
    """Choose q_min, tau[y], m[y] for the largest coverage at admitted accuracy >= alpha."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not stats.predicted:
        raise ValueError("calibration needs at least one row")
    pred = np.asarray(stats.predicted, dtype=object)
    ok = np.asarray(stats.predicted, dtype=object) == np.asarray(stats.gold, dtype=object)
    q_all = np.asarray(stats.support)
    d_all = np.asarray(stats.distance, dtype=np.float64)
    m_all = np.asarray(stats.margin, dtype=np.float64)
    best: tuple[int, int, dict[str, float | None], dict[str, float]] | None = None
    for q_min in range(1, k + 1):
        covered, tau, marg = 0, {}, {}
        for label in labels:
            rows = pred == label
            n, t, mm = _best_for_label(
                q_all[rows],
                d_all[rows],
                m_all[rows],
                ok[rows],
                q_min,
                alpha,
                confidence,
                min_admitted,
            )
            covered += n
            tau[label], marg[label] = t, mm
        # prefer larger coverage; on ties the smaller q_min (fewer assumptions)
        if best is None or covered > best[0]:
            best = (covered, q_min, tau, marg)
    assert best is not None
    _, q_min, tau, marg = best
    return Thresholds(
        alpha=alpha,
        k=k,
        q_min=q_min,
        tau=tau,
        margin=marg,
        near_duplicate=near_duplicate,
        confidence=confidence,
    )


def calibrate_softmax_threshold(
    max_prob: npt.ArrayLike,
    correct: npt.ArrayLike,
    alpha: float,
    confidence: float = 0.8,
    min_admitted: int = 5,
) -> float:
    """Baseline: one max-softmax threshold with the largest coverage at accuracy >= alpha.

    Returns ``inf`` when no threshold reaches alpha (the baseline admits nothing).
    """
    p = np.asarray(max_prob, dtype=np.float64)
    c = np.asarray(correct, dtype=bool)
    order = np.argsort(-p, kind="stable")
    cum_correct = np.cumsum(c[order])
    cum_total = np.arange(1, len(p) + 1)
    good = (wilson_lower(cum_correct, cum_total, confidence) >= alpha) & (cum_total >= min_admitted)
    # a threshold must not split tied probabilities
    sorted_p = p[order]
    boundary = np.append(sorted_p[:-1] > sorted_p[1:], True)
    good &= boundary
    if not good.any():
        return math.inf
    last = int(np.max(np.nonzero(good)[0]))
    return float(sorted_p[last])


def trivial_edits(text: str) -> list[str]:
    """Edits a reviewer would call 'the same text': case, spacing, end punctuation."""
    stripped = " ".join(text.split())
    edits = {
        text.lower(),
        text.upper(),
        stripped,
        stripped.rstrip(".!?") or stripped,
        stripped + ".",
        " " + text + " ",
    }
    edits.discard(text)
    return sorted(edits)


def near_duplicate_threshold(
    edit_distances: npt.ArrayLike, neighbor_distances: npt.ArrayLike
) -> float:
    """Distance under which two exemplars count as the same text.

    The 95th percentile of distances between texts and their trivial edits, but
    never more than the 1st percentile of distances between distinct texts, so a
    human mapping cannot capture genuinely different inputs.
    """
    edits = np.asarray(edit_distances, dtype=np.float64)
    others = np.asarray(neighbor_distances, dtype=np.float64)
    others = others[np.isfinite(others)]
    value = float(np.quantile(edits, 0.95)) if edits.size else 0.0
    if others.size:
        value = min(value, float(np.quantile(others, 0.01)))
    return max(value, 1e-6)
