"""Lifelong learning on a drifting stream: coverage and admitted accuracy over time.

The stream drifts: the base model is trained and calibrated on Rotten Tomatoes
snippets that name no film genre (domain A); then snippets that do (horror,
documentary, animation, family, action, musical, war, romance, comedy: domain B)
arrive. The labels keep their meaning (fresh/rotten), the vocabulary and topics
shift. ``models/rt`` cannot serve as the base: it was trained on domain B too.

Phases, every step with the project's real parts (the curator's decision applier,
the predictor's lifecycle recorder, the fine-tune runner's child process, the
registry's promotion), only the broker is left out:

1. **before**: the base model on held-out test-A / test-B;
2. **decisions**: the first part of the domain-B stream flows through the predictor;
   the first ``--budget`` rejected events are answered from their gold labels, each
   decision applied at once (new human mapping, no retraining); close admitted
   events become candidates;
3. **fine-tune**: one job trains on support set + human mappings + candidates,
   shadow-checks against the serving version on the calibration rows and promotes
   only if not worse;
4. **after**: the rest of the stream and the held-out sets on the serving version.

``repeats_b`` are the answered events sent again with a trivial edit (end punctuation
changed): what a human decision buys at once, without retraining. All of them were
rejected the first time (coverage 0 before the decisions, by construction).

    python -m benchmarks.lifelong --data data/rt --work /tmp/lifelong --json docs/lifelong.json

Coverage = share of events admitted; admitted accuracy = share of admitted events whose
output label is the gold label; the target is the model's alpha (0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from daemon.config import CuratorConfig, MetricsConfig, Settings
from daemon.lifecycle import LifecycleService
from model.build import BuildOptions, build_bundle
from model.data import Example, read_examples
from model.predictor import Predictor
from model.registry import Registry
from model.train import TrainOptions
from streams.contracts import Decision, InputEvent

GENRE = re.compile(
    r"\b(horror|scary|scares?|slasher|zombies?|gore|creepy|frightening|vampires?|haunted"
    r"|documentar(?:y|ies)|animat(?:ed|ion|ors?)|cartoons?|pixar|disney|anime"
    r"|kids?|children|famil(?:y|ies)|action|explosions?|stunts?|chases?"
    r"|music(?:al|als)?|songs?|singing|soundtrack|war|soldiers?|battle|military"
    r"|romance|romantic|rom-com|comed(?:y|ies|ic)|funny|laughs?|jokes?|hilarious|gags?)\b",
    re.IGNORECASE,
)


def is_domain_b(example: Example) -> bool:
    return GENRE.search(example.text) is not None


def measure(predictor: Predictor, rows: Sequence[Example]) -> dict[str, Any]:
    """Coverage, admitted accuracy and plain accuracy of the serving predictor on rows."""
    preds = predictor.predict([r.text for r in rows], explain=False).predictions
    admitted = [(p, r) for p, r in zip(preds, rows, strict=True) if p.admitted]
    correct = sum(p.label == r.label for p, r in admitted)
    return {
        "rows": len(rows),
        "coverage": round(len(admitted) / max(len(rows), 1), 4),
        "admitted_accuracy": round(correct / len(admitted), 4) if admitted else None,
        "accuracy": round(
            sum(p.predicted_label == r.label for p, r in zip(preds, rows, strict=True))
            / max(len(rows), 1),
            4,
        ),
        "admitted_by_human_mapping": sum(
            p.verdict.admitted_by == "human_mapping" for p, _ in admitted
        ),
    }


def build_base(train: list[Example], calib: list[Example], root: Path, epochs: int) -> Registry:
    registry = Registry.create(root)
    staging = registry.new_staging()
    options = BuildOptions(train=TrainOptions(max_epochs=epochs, progress=False))
    build_bundle(train, staging, calib, options, say=lambda m: print(f"  base: {m}", flush=True))
    registry.promote(
        registry.commit_staging(staging, {"status": "promoted", "reason": "base (domain A)"})
    )
    return registry


def edited(text: str) -> str:
    """The same text sent again with a trivial edit: end punctuation changed."""
    stripped = text.rstrip(".!? ")
    return stripped if stripped and stripped != text else text + "!"


def stream_chunk(
    service: LifecycleService,
    rows: Sequence[Example],
    budget_left: int,
    offset: int,
    repeats: list[Example],
) -> tuple[dict[str, Any], int]:
    """Predict a chunk like the predictor loop, record it, answer rejections from gold.

    Every answered event is also kept, trivially edited, in ``repeats``.
    """
    predictor = service.serving.current.predictor
    result = predictor.predict([r.text for r in rows], explain=False)
    events = [InputEvent(id=r.id, text=r.text) for r in rows]
    assert service.worker is not None and service.worker._on_predictions is not None
    service.worker._on_predictions(list(zip(events, result.predictions, strict=True)), predictor)
    assert service.curator is not None
    applier = service.curator.applier
    answered = 0
    for i, (row, pred) in enumerate(zip(rows, result.predictions, strict=True)):
        if pred.admitted or answered >= budget_left:
            continue
        outcome = applier.apply(
            Decision(id=row.id, label=str(row.label), reviewer="gold"), f"bench:0:{offset + i}"
        )
        if type(outcome).__name__ == "Applied":
            answered += 1
            repeats.append(Example(f"{row.id}:again", edited(row.text), row.label))
    admitted = [(p, r) for p, r in zip(result.predictions, rows, strict=True) if p.admitted]
    correct = sum(p.label == r.label for p, r in admitted)
    return {
        "rows": len(rows),
        "coverage": round(len(admitted) / len(rows), 4),
        "admitted_accuracy": round(correct / len(admitted), 4) if admitted else None,
        "decisions": answered,
        "version": predictor.version,
    }, answered


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = Path(args.data)
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    train = read_examples(data / "train.jsonl", require_labels=True)
    calib = read_examples(data / "calib.jsonl", require_labels=True)
    test = read_examples(data / "test.jsonl", require_labels=True)
    train_a = [e for e in train if not is_domain_b(e)]
    calib_a = [e for e in calib if not is_domain_b(e)]
    test_a = [e for e in test if not is_domain_b(e)]
    test_b = [e for e in test if is_domain_b(e)]
    stream = [e for e in train + calib if is_domain_b(e)]
    random.Random(args.seed).shuffle(stream)
    if args.limit:
        train_a, stream = train_a[: args.limit], stream[: args.limit // 3]
    split = int(len(stream) * args.before_finetune)
    print(
        f"domain A: train {len(train_a)}, calib {len(calib_a)}, test {len(test_a)}; "
        f"domain B: stream {len(stream)} ({split} before the fine-tune), test {len(test_b)}",
        flush=True,
    )

    t0 = time.perf_counter()
    registry = build_base(train_a, calib_a, work / "models", args.epochs)
    timings = {"base_build_s": round(time.perf_counter() - t0, 1)}
    settings = Settings(
        model_dir=registry.root,
        metrics=MetricsConfig(enabled=False),
        curator=CuratorConfig(
            min_decisions=1,
            min_candidates=1,
            min_interval_s=0,
            max_epochs=args.epochs,
            tolerance=args.tolerance,
            candidate_ratio=args.candidate_ratio,
        ),
    )
    service = LifecycleService(settings, schedule=False)
    state = service.state
    assert state is not None  # --role all keeps the lifecycle state
    if service.runner is not None:
        service.runner.announce = None  # no broker here: promotion flips the pointer only
    report: dict[str, Any] = {
        "setup": {
            "domain_b": "snippets naming a genre (regex in benchmarks/lifelong.py)",
            "train_a": len(train_a),
            "calib_a": len(calib_a),
            "test_a": len(test_a),
            "test_b": len(test_b),
            "stream_b": len(stream),
            "stream_before_finetune": split,
            "budget": args.budget,
            "alpha": service.serving.current.predictor.thresholds.alpha,
            "chunk": args.chunk,
            "seed": args.seed,
            "tolerance": args.tolerance,
            "candidate_ratio": args.candidate_ratio,
        }
    }
    try:
        predictor = service.serving.current.predictor
        report["before"] = {
            "test_a": measure(predictor, test_a),
            "test_b": measure(predictor, test_b),
        }
        print("before:", json.dumps(report["before"]), flush=True)
        timeline = []
        budget = args.budget
        repeats: list[Example] = []
        for start in range(0, split, args.chunk):
            chunk, used = stream_chunk(
                service, stream[start : min(start + args.chunk, split)], budget, start, repeats
            )
            budget -= used
            timeline.append({"phase": "decisions", "seen": min(start + args.chunk, split), **chunk})
            print("stream:", json.dumps(timeline[-1]), flush=True)
        predictor = service.serving.current.predictor
        # every answered event was rejected when it first came: coverage 0 before
        report["before"]["repeats_b"] = {"rows": len(repeats), "coverage": 0.0}
        report["after_decisions"] = {
            "test_a": measure(predictor, test_a),
            "test_b": measure(predictor, test_b),
            "repeats_b": measure(predictor, repeats),
            "decisions": args.budget - budget,
            "candidates": state.count_candidates(settings.curator.candidate_ratio),
        }
        print("after decisions:", json.dumps(report["after_decisions"]), flush=True)

        t0 = time.perf_counter()
        assert service.runner is not None
        result = service.runner.run("benchmark")
        timings["finetune_s"] = round(time.perf_counter() - t0, 1)
        report["finetune"] = {
            "outcome": result.outcome,
            "reason": result.reason,
            "version": result.version,
            "shadow": result.metrics,
        }
        print("fine-tune:", json.dumps(report["finetune"]), flush=True)
        predictor = service.serving.current.predictor
        for start in range(split, len(stream), args.chunk):
            chunk, used = stream_chunk(
                service, stream[start : start + args.chunk], 0, start, repeats
            )
            timeline.append(
                {"phase": "after_finetune", "seen": min(start + args.chunk, len(stream)), **chunk}
            )
            print("stream:", json.dumps(timeline[-1]), flush=True)
        report["after_finetune"] = {
            "test_a": measure(predictor, test_a),
            "test_b": measure(predictor, test_b),
            "repeats_b": measure(predictor, repeats),
        }
        print("after fine-tune:", json.dumps(report["after_finetune"]), flush=True)
        report["timeline"] = timeline
        report["timings"] = timings
    finally:
        service.stop()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/rt", help="prepared Rotten Tomatoes directory")
    parser.add_argument("--work", default="/tmp/exemplar-lifelong", help="scratch (replaced)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--budget", type=int, default=400, help="rejections answered by humans")
    parser.add_argument(
        "--before-finetune",
        type=float,
        default=0.7,
        help="share of the stream that flows before the fine-tune",
    )
    parser.add_argument("--chunk", type=int, default=200, help="events per timeline point")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="promotion tolerance on calibration coverage (domain A)",
    )
    parser.add_argument(
        "--candidate-ratio", type=float, default=0.5, help="EXEMPLAR_CURATOR__CANDIDATE_RATIO"
    )
    parser.add_argument("--limit", type=int, default=0, help="shrink the data (a quick look)")
    args = parser.parse_args()
    report = run(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"report: {args.json}")


if __name__ == "__main__":
    main()
