"""Selective-prediction report: coverage, admitted accuracy, AURC, against a softmax baseline.

Works on any file, labelled or not: rows without a label (or with a label the
model does not know) count toward coverage only, and accuracy figures are
``None`` when no row has a known label.

The baseline is the usual selective classifier a user would build instead: admit
when the top softmax probability clears one threshold, calibrated at training time
on the same split to the same ``alpha``.

For AURC the exemplar method needs a ranking, not one operating point. The rule
is recalibrated from the bundle's stored calibration statistics for a ladder of
alphas; a prediction's score is the highest alpha whose thresholds still admit it
(ties broken by the softmax margin). The curve therefore traces the family of
calibrated rules, exactly what an operator moves along by changing alpha.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from model.admission import CalibrationStats, Thresholds, calibrate, decide
from model.data import Example
from model.predictor import Prediction, Predictor


def aurc(confidence: npt.ArrayLike, correct: npt.ArrayLike) -> float | None:
    """Area under the risk-coverage curve (lower is better); ties broken pessimistically."""
    c = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if ok.size == 0:
        return None
    order = np.lexsort((ok, -c))  # within equal confidence, wrong answers first
    errors = np.cumsum(~ok[order])
    risk = errors / np.arange(1, ok.size + 1)
    return float(risk.mean())


def risk_coverage(
    confidence: npt.ArrayLike, correct: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    order = np.lexsort((ok, -c))
    n = np.arange(1, ok.size + 1)
    return n / ok.size, np.cumsum(~ok[order]) / n


ALPHA_LADDER = tuple(float(a) for a in np.round(np.linspace(0.5, 0.995, 34), 4))


def alpha_ladder(
    stats: CalibrationStats, base: Thresholds, labels: Sequence[str]
) -> list[Thresholds]:
    """Thresholds recalibrated for each alpha of the ladder (milliseconds each)."""
    return [
        calibrate(stats, labels, a, base.k, base.near_duplicate, base.confidence)
        for a in ALPHA_LADDER
    ]


def exemplar_scores(preds: Sequence[Prediction], ladder: Sequence[Thresholds]) -> np.ndarray:
    """Highest ladder alpha that admits each prediction (0 if none), plus a margin tie-break."""
    scores = np.zeros(len(preds))
    for i, p in enumerate(preds):
        level = 0.0
        for t in ladder:
            if decide(p.predicted_label, p.margin, p.nearest, t).admitted:
                level = max(level, t.alpha)
        scores[i] = level + 1e-3 * p.margin
    return scores


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def evaluate(
    predictor: Predictor,
    examples: Sequence[Example],
    softmax_threshold: float | None,
    calibration: CalibrationStats,
    batch_size: int = 256,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the predictor over ``examples``; returns (report, curves for plotting).

    ``calibration`` is the bundle's stored calibration statistics (for the AURC ladder).
    """
    labels = set(predictor.labels)
    preds: list[Prediction] = []
    for start in range(0, len(examples), batch_size):
        chunk = [e.text for e in examples[start : start + batch_size]]
        preds.extend(predictor.predict(chunk, explain=False).predictions)

    n = len(examples)
    known = [i for i, e in enumerate(examples) if e.label in labels]
    admitted = np.array([p.admitted for p in preds], dtype=bool)
    max_prob = np.array([max(p.scores.values()) for p in preds])
    threshold = math.inf if softmax_threshold is None else softmax_threshold
    base_admit = max_prob >= threshold

    correct_out = np.array([preds[i].label == examples[i].label for i in range(n)], dtype=bool)
    correct_model = np.array(
        [preds[i].predicted_label == examples[i].label for i in range(n)], dtype=bool
    )
    k_idx = np.asarray(known, dtype=int)

    def selective(admit: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
        adm_known = admit[k_idx]
        return {
            "coverage": float(admit.mean()) if n else 0.0,
            "admitted": int(admit.sum()),
            "admitted_accuracy": _ratio(
                int((adm_known & correct[k_idx]).sum()), int(adm_known.sum())
            ),
        }

    ladder = alpha_ladder(calibration, predictor.thresholds, predictor.labels)
    ex_conf = exemplar_scores(preds, ladder)
    report: dict[str, Any] = {
        "n": n,
        "n_labelled": len(known),
        "n_unknown_label": sum(
            1 for e in examples if e.label is not None and e.label not in labels
        ),
        "model_version": predictor.version,
        "alpha": predictor.thresholds.alpha,
        **selective(admitted, correct_out),
        "accuracy": _ratio(int(correct_model[k_idx].sum()), len(known)),
        "aurc": aurc(ex_conf[k_idx], correct_out[k_idx]) if known else None,
        "per_class": {},
        "per_true_class": {},
        "reject_reasons": dict(
            sorted(Counter(r for p in preds for r in p.verdict.reasons).items())
        ),
        "admitted_by": dict(
            sorted(Counter(p.verdict.admitted_by for p in preds if p.verdict.admitted_by).items())
        ),
        "baselines": {
            "softmax": {
                "threshold": softmax_threshold,
                **selective(base_admit, correct_model),
                "aurc": aurc(max_prob[k_idx], correct_model[k_idx]) if known else None,
            }
        },
    }
    for label in predictor.labels:
        rows = np.array([p.label == label for p in preds], dtype=bool)
        known_rows = np.zeros(n, dtype=bool)
        known_rows[k_idx] = True
        adm = rows & admitted
        report["per_class"][label] = {
            "predicted": int(rows.sum()),
            "coverage": _ratio(int(adm.sum()), int(rows.sum())),
            "admitted": int(adm.sum()),
            "admitted_accuracy": _ratio(
                int((adm & known_rows & correct_out).sum()), int((adm & known_rows).sum())
            ),
        }
        truth = np.array([e.label == label for e in examples], dtype=bool)
        adm_t = truth & admitted
        report["per_true_class"][label] = {
            "n": int(truth.sum()),
            "coverage": _ratio(int(adm_t.sum()), int(truth.sum())),
            "admitted_accuracy": _ratio(int((adm_t & correct_out).sum()), int(adm_t.sum())),
        }
    curves: dict[str, Any] = {}
    if known:
        curves["exemplar"] = risk_coverage(ex_conf[k_idx], correct_out[k_idx])
        curves["softmax"] = risk_coverage(max_prob[k_idx], correct_model[k_idx])
        curves["points"] = {
            "exemplar": (float(admitted[k_idx].mean()), 1 - (report["admitted_accuracy"] or 1.0)),
            "softmax": (
                float(base_admit[k_idx].mean()),
                1 - (report["baselines"]["softmax"]["admitted_accuracy"] or 1.0),
            ),
        }
    return report, curves


def plot_risk_coverage(curves: dict[str, Any], alpha: float, path: Path, title: str) -> None:
    """Risk-coverage curves of both methods with their calibrated operating points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    colours = {"exemplar": "tab:blue", "softmax": "tab:orange"}
    names = {"exemplar": "exemplar admission", "softmax": "softmax threshold"}
    for key in ("exemplar", "softmax"):
        if key in curves:
            cov, risk = curves[key]
            ax.plot(cov, risk, label=names[key], color=colours[key])
            x, y = curves["points"][key]
            ax.scatter([x], [y], color=colours[key], zorder=3, edgecolor="black")
    ax.axhline(
        1 - alpha,
        color="grey",
        linestyle="--",
        linewidth=1,
        label=f"target risk 1-alpha = {1 - alpha:.2f}",
    )
    ax.set_xlabel("coverage")
    ax.set_ylabel("risk (error rate among admitted)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, None)
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def format_report(report: dict[str, Any]) -> str:
    """Readable summary for the terminal."""

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    base = report["baselines"]["softmax"]
    lines = [
        f"rows {report['n']} (labelled {report['n_labelled']}), model {report['model_version']},"
        f" alpha {report['alpha']}",
        f"exemplar admission : coverage {pct(report['coverage'])}, admitted accuracy "
        f"{pct(report['admitted_accuracy'])}, AURC {_num(report['aurc'])}",
        f"softmax baseline   : coverage {pct(base['coverage'])}, admitted accuracy "
        f"{pct(base['admitted_accuracy'])}, AURC {_num(base['aurc'])}",
        f"model accuracy (all rows): {pct(report['accuracy'])}",
        "per predicted label:",
    ]
    for label, row in report["per_class"].items():
        lines.append(
            f"  {label:>16}: predicted {row['predicted']}, coverage {pct(row['coverage'])}, "
            f"admitted accuracy {pct(row['admitted_accuracy'])}"
        )
    if report["reject_reasons"]:
        reasons = ", ".join(f"{k} {v}" for k, v in report["reject_reasons"].items())
        lines.append(f"reject reasons: {reasons}")
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
