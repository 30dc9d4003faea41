"""Figure 4: what admission buys - coverage and admitted accuracy against three baselines.

All four methods see the same network outputs (fp32 ``Predictor.forward``), the same
support set (the bundle's training exemplars, exact k-NN in its store, k = the bundle's
k) and are calibrated on the same calibration split, to the same ``alpha``, by the same
rule: the largest coverage whose one-sided Wilson lower bound of admitted accuracy
reaches ``alpha`` at the bundle's ``confidence`` (``model.admission``):

* **exemplar** - the product rule, recalibrated for each alpha from the bundle's stored
  calibration statistics (``model.admission.calibrate``, as ``EXEMPLAR_ADMISSION__ALPHA``
  does in the daemon);
* **softmax** - one threshold on the top softmax probability
  (``calibrate_softmax_threshold``);
* **trust score** (Jiang et al., 2018) - distance from the exemplar vector to the
  nearest support point of any *other* class over the distance to the nearest point of
  the *predicted* class, on the same exemplar vectors (no density filtering, the
  reference implementation's default); one threshold, calibrated like softmax;
* **k-NN** - the label is the majority vote of the k nearest support exemplars' true
  labels (ties: the nearest tied label); admitted when the voting fraction clears a
  threshold calibrated the same way.

AURC ranks by each method's own score: exemplar = the highest alpha of the calibrated
ladder that still admits (``model.evaluate.exemplar_scores``, ties by margin), softmax =
top probability, trust = the ratio, k-NN = the voting fraction (ties: nearer first).
Out-of-distribution (``model.data.ood_paths``: emails, foreign) and shifted (movie plots,
``plots.jsonl``) text is unlabelled: the figure is the admission rate (lower is better).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from benchmarks.common import Context, Support, product_index, rebuild_support_store
from model.admission import (
    CalibrationStats,
    Thresholds,
    calibrate,
    calibrate_softmax_threshold,
    decide,
    softmax_margin,
)
from model.bundle import Bundle
from model.data import ood_paths, read_examples
from model.evaluate import alpha_ladder, aurc, exemplar_scores
from model.predictor import Prediction, Predictor
from model.store.base import Neighbor
from model.store.edge import EdgeStore

ALPHAS = (0.90, 0.95, 0.99)
METHODS = ("exemplar", "softmax", "trust_score", "knn")


class SplitOutputs:
    """Network outputs, neighbours and the baselines' scores for one split."""

    def __init__(
        self,
        predictor: Predictor,
        texts: Sequence[str],
        support: Support,
        gold: Sequence[str | None] | None = None,
    ) -> None:
        labels = predictor.labels
        fwd = predictor.forward(list(texts), explain=False)
        self.probs, self.z = fwd.probs, fwd.exemplars
        self.gold = list(gold) if gold is not None else None
        self.neighbors: list[list[Neighbor]] = []
        for start in range(0, len(texts), 256):
            self.neighbors.extend(
                predictor.store.search(self.z[start : start + 256], predictor.thresholds.k)
            )
        self.pred = [labels[int(i)] for i in self.probs.argmax(1)]
        self.margin = softmax_margin(self.probs)
        self.max_prob = self.probs.max(1)
        self.trust = trust_scores(self.z, self.pred, support)
        self.knn_label, self.knn_frac, self.knn_nearest = knn_votes(self.neighbors)

    def predictions(self, t: Thresholds) -> list[Prediction]:
        """Enough of ``Prediction`` for ``model.evaluate.exemplar_scores``."""
        return [
            Prediction(
                label=p,
                predicted_label=p,
                scores={},
                margin=float(m),
                verdict=decide(p, float(m), nb, t),
                nearest=nb,
                words=[],
            )
            for p, m, nb in zip(self.pred, self.margin, self.neighbors, strict=True)
        ]

    def correct(self) -> npt.NDArray[np.bool_]:
        assert self.gold is not None
        return np.array([p == g for p, g in zip(self.pred, self.gold, strict=True)])

    def knn_correct(self) -> npt.NDArray[np.bool_]:
        assert self.gold is not None
        return np.array([p == g for p, g in zip(self.knn_label, self.gold, strict=True)])


def trust_scores(
    z: npt.NDArray[np.float32], pred: Sequence[str], support: Support
) -> npt.NDArray[np.float64]:
    """d(nearest other-class support point) / d(nearest predicted-class point), exact."""
    classes = sorted(set(support.labels))
    s = torch.from_numpy(support.vectors)
    owner = np.array(support.labels)
    nearest = np.full((len(z), len(classes)), np.inf)
    for start in range(0, len(z), 512):
        d = torch.cdist(torch.from_numpy(z[start : start + 512]), s).numpy()
        for c, label in enumerate(classes):
            mask = owner == label
            if mask.any():
                nearest[start : start + 512, c] = d[:, mask].min(axis=1)
    index = {c: i for i, c in enumerate(classes)}
    out = np.zeros(len(z))
    for i, p in enumerate(pred):
        own = nearest[i, index[p]] if p in index else np.inf
        other = np.delete(nearest[i], index[p]).min() if p in index else 0.0
        out[i] = other / max(own, 1e-12)
    return out


def knn_votes(
    neighbors: Sequence[Sequence[Neighbor]],
) -> tuple[list[str], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Majority label, its voting fraction, and the nearest distance among its voters."""
    labels, frac, nearest = [], np.zeros(len(neighbors)), np.zeros(len(neighbors))
    for i, nbs in enumerate(neighbors):
        if not nbs:
            labels.append("")
            continue
        votes = Counter(n.label for n in nbs)
        top = max(votes.values())
        tied = {lab for lab, v in votes.items() if v == top}
        winner = next(n.label for n in nbs if n.label in tied)  # nearest of the tied labels
        labels.append(winner)
        frac[i] = top / len(nbs)
        nearest[i] = min(n.distance for n in nbs if n.label == winner)
    return labels, frac, nearest


def _selective(
    admit: npt.NDArray[np.bool_], correct: npt.NDArray[np.bool_] | None, threshold: Any = None
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "coverage": float(admit.mean()) if admit.size else 0.0,
        "admitted": int(admit.sum()),
    }
    if correct is not None:
        row["admitted_accuracy"] = float(correct[admit].mean()) if admit.any() else None
    if threshold is not None:
        row["threshold"] = None if not np.isfinite(threshold) else float(threshold)
    return row


def measure(ctx: Context, predictor: Predictor, bundle: Bundle, support: Support) -> dict[str, Any]:
    base = predictor.thresholds
    labels = predictor.labels
    conf = base.confidence
    calib = read_examples(ctx.data_dir / "calib.jsonl")
    test = read_examples(ctx.data_dir / "test.jsonl")
    ctx.say(f"quality: forward + search on calib ({len(calib)}) and test ({len(test)})")
    cal = SplitOutputs(predictor, [e.text for e in calib], support, [e.label for e in calib])
    tst = SplitOutputs(predictor, [e.text for e in test], support, [e.label for e in test])
    unlabelled: dict[str, SplitOutputs] = {}
    shifted = ctx.data_dir / "plots.jsonl"
    sources = {"plots (shifted)": shifted} if shifted.exists() else {}
    sources.update({f"{name} (OOD)": path for name, path in ood_paths().items()})
    for name, path in sources.items():
        texts = [e.text for e in read_examples(path)]
        ctx.say(f"quality: {name}, {len(texts)} texts")
        unlabelled[name] = SplitOutputs(predictor, texts, support)

    reproduced = reproduce_check(cal, bundle.calibration, base.k)
    cal_ok, tst_ok = cal.correct(), tst.correct()
    cal_knn_ok, tst_knn_ok = cal.knn_correct(), tst.knn_correct()
    by_alpha: dict[str, Any] = {}
    admission_rate: dict[str, dict[str, Any]] = {name: {} for name in unlabelled}
    for alpha in ALPHAS:
        t = calibrate(bundle.calibration, labels, alpha, base.k, base.near_duplicate, conf)
        thresholds = {
            "softmax": calibrate_softmax_threshold(cal.max_prob, cal_ok, alpha, conf),
            "trust_score": calibrate_softmax_threshold(cal.trust, cal_ok, alpha, conf),
            "knn": calibrate_softmax_threshold(cal.knn_frac, cal_knn_ok, alpha, conf),
        }

        def admits(
            out: SplitOutputs, t: Thresholds = t, th: dict[str, float] = thresholds
        ) -> dict[str, npt.NDArray[np.bool_]]:
            return {
                "exemplar": np.array([p.admitted for p in out.predictions(t)]),
                "softmax": out.max_prob >= th["softmax"],
                "trust_score": out.trust >= th["trust_score"],
                "knn": out.knn_frac >= th["knn"],
            }

        a = admits(tst)
        exemplar_out = np.array(
            [p.verdict.label == g for p, g in zip(tst.predictions(t), tst.gold or [], strict=True)]
        )
        key = f"{alpha:.2f}"
        by_alpha[key] = {
            "exemplar": {
                **_selective(a["exemplar"], exemplar_out),
                "q_min": t.q_min,
                "tau": t.tau,
                "margin": t.margin,
            },
            "softmax": _selective(a["softmax"], tst_ok, thresholds["softmax"]),
            "trust_score": _selective(a["trust_score"], tst_ok, thresholds["trust_score"]),
            "knn": _selective(a["knn"], tst_knn_ok, thresholds["knn"]),
        }
        for name, out in unlabelled.items():
            admission_rate[name][key] = {m: float(v.mean()) for m, v in admits(out).items()}

    ladder = alpha_ladder(bundle.calibration, base, labels)
    ex_scores = exemplar_scores(tst.predictions(base), ladder)
    knn_score = tst.knn_frac - 1e-6 * tst.knn_nearest  # ties: nearer voters first
    return {
        "alphas": list(ALPHAS),
        "k": base.k,
        "confidence": conf,
        "calibration_rows": len(calib),
        "test_rows": len(test),
        "support_set": len(support.labels),
        "model_accuracy": float(tst_ok.mean()),
        "knn_accuracy": float(tst_knn_ok.mean()),
        "aurc": {
            "exemplar": aurc(ex_scores, tst_ok),
            "softmax": aurc(tst.max_prob, tst_ok),
            "trust_score": aurc(tst.trust, tst_ok),
            "knn": aurc(knn_score, tst_knn_ok),
        },
        "test": by_alpha,
        "admission_rate": admission_rate,
        "unlabelled_rows": {name: len(out.pred) for name, out in unlabelled.items()},
        "calibration_reproduced": reproduced,
        "index_vs_exact": index_vs_exact(ctx, tst, support, base),
    }


def index_vs_exact(
    ctx: Context, tst: SplitOutputs, support: Support, t: Thresholds
) -> dict[str, Any]:
    """Admission on test through the product's default index vs through an exact scan.

    The bundle's support set is rebuilt as a bundle built now would ship it (HNSW, the
    default quantization); the same test exemplars are searched both ways and decided
    with the bundle's thresholds.
    """
    copy = ctx.copy_bundle("quality-indexed")
    built = rebuild_support_store(copy, support, 0)
    decisions = {}
    for mode, exact in (("index", False), ("exact", True)):
        store = EdgeStore(copy / "store", exact=exact, index=product_index())
        try:
            neighbors = [
                nb
                for start in range(0, len(tst.z), 256)
                for nb in store.search(tst.z[start : start + 256], t.k)
            ]
        finally:
            store.close()
        decisions[mode] = [
            decide(p, float(m), nb, t)
            for p, m, nb in zip(tst.pred, tst.margin, neighbors, strict=True)
        ]
    gold = tst.gold or []
    rows = {}
    for mode, verdicts in decisions.items():
        admitted = np.array([v.admitted for v in verdicts])
        ok = np.array([v.label == g for v, g in zip(verdicts, gold, strict=True)])
        rows[mode] = _selective(admitted, ok)
    same = [a.admitted == b.admitted for a, b in zip(*decisions.values(), strict=True)]
    return {
        **rows,
        "indexed_vectors": built["indexed_vectors"],
        "admission_agreement": float(np.mean(same)),
    }


def reproduce_check(cal: SplitOutputs, stored: CalibrationStats, k: int) -> dict[str, Any]:
    """Do this run's calibration-split outputs match the statistics stored with the model?"""
    gold = [g or "" for g in cal.gold or []]
    rebuilt = CalibrationStats.build(cal.pred, gold, cal.margin.tolist(), cal.neighbors)
    n = min(len(rebuilt.predicted), len(stored.predicted))
    same_pred = np.mean(
        [a == b for a, b in zip(rebuilt.predicted[:n], stored.predicted[:n], strict=True)]
    )
    dist = np.abs(np.array(rebuilt.distance[:n]) - np.array(stored.distance[:n]))
    return {
        "rows": n,
        "same_prediction": float(same_pred),
        "max_distance_diff": float(np.nanmax(dist)) if n else None,
        "same_support_count": float(
            np.mean(np.array(rebuilt.support[:n]) == np.array(stored.support[:n]))
        )
        if n
        else None,
    }
