"""How one explained prediction looks on a terminal and in JSON."""

from __future__ import annotations

import json
from typing import Any

from model.predictor import Prediction

_RESET = "\033[0m"


def explanation_json(text: str, pred: Prediction, version: str, top: int) -> dict[str, Any]:
    return {
        "text": text,
        "model_version": version,
        "label": pred.label,
        "predicted_label": pred.predicted_label,
        "admitted": pred.admitted,
        "admitted_by": pred.verdict.admitted_by,
        "reasons": list(pred.verdict.reasons),
        "support": pred.verdict.support,
        "nearest_distance": pred.verdict.distance,
        "scores": pred.scores,
        "margin": pred.margin,
        "nearest": [
            {
                "id": n.id,
                "label": n.label,
                "predicted": n.predicted,
                "source": n.source,
                "distance": n.distance,
                "text": n.text,
            }
            for n in pred.nearest[:top]
        ],
        "words": [
            {"word": w.word, "score": w.score, "start": w.start, "end": w.end} for w in pred.words
        ],
    }


def _colour_word(word: str, score: float, scale: float) -> str:
    """Green pushes toward the predicted label, red against; brighter = stronger."""
    strength = min(abs(score) / scale, 1.0) if scale > 0 else 0.0
    level = round(strength * 4)
    if level == 0:
        return word
    palette_up = [None, 194, 157, 120, 46]
    palette_down = [None, 224, 217, 210, 196]
    code = (palette_up if score > 0 else palette_down)[level]
    return f"\033[38;5;16;48;5;{code}m{word}{_RESET}"


def render_explanation(
    text: str, pred: Prediction, version: str, as_json: bool, colour: bool, top: int = 5
) -> str:
    if as_json:
        return json.dumps(explanation_json(text, pred, version, top), indent=2, ensure_ascii=False)
    status = "ADMITTED" if pred.admitted else "ROUTED TO HUMANS"
    why = (
        f"by {pred.verdict.admitted_by}"
        if pred.admitted
        else "reasons: " + ", ".join(pred.verdict.reasons)
    )
    lines = [
        f"label     : {pred.label}  ({status}; {why})",
        f"model     : {version}; predicted {pred.predicted_label} "
        f"p={pred.scores[pred.predicted_label]:.3f} margin={pred.margin:.3f}",
        f"support   : q={pred.verdict.support} true-positive neighbours, nearest distance "
        f"{'n/a' if pred.verdict.distance is None else round(pred.verdict.distance, 4)}",
    ]
    scale = max((abs(w.score) for w in pred.words), default=0.0)
    if colour:
        pieces, cursor = [], 0
        for w in pred.words:
            pieces.append(text[cursor : w.start])
            pieces.append(_colour_word(text[w.start : w.end], w.score, scale))
            cursor = w.end
        pieces.append(text[cursor:])
        lines.append("words     : " + "".join(pieces))
    ranked = sorted(pred.words, key=lambda w: -abs(w.score))[:10]
    lines.append("top words : " + ", ".join(f"{w.word} {w.score:+.3f}" for w in ranked))
    lines.append("nearest training exemplars:")
    for n in pred.nearest[:top]:
        snippet = (n.text or "(text not stored)").replace("\n", " ")
        if len(snippet) > 100:
            snippet = snippet[:97] + "..."
        lines.append(f"  {n.distance:8.4f}  {n.label:>10} ({n.source}) {n.id}: {snippet}")
    return "\n".join(lines)
