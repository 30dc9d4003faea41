"""The ``exemplar`` command line.

Every subcommand turns the project's errors into one line on stderr and exit
status 2 (1 for anything unexpected, with the traceback, since that is a bug).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Never reach for a model hub: everything this tool loads is on local disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from model.errors import ExemplarError


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _settings(**overrides: Any) -> Any:
    from daemon.config import load_settings
    from daemon.logs import configure_logging

    settings = load_settings(**overrides)
    configure_logging(settings.log)
    return settings


# ---------------------------------------------------------------- data
def cmd_data(args: argparse.Namespace) -> int:
    from model.data import prepare_rotten_tomatoes

    _settings()
    paths = prepare_rotten_tomatoes(Path(args.cache), Path(args.out), seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


# ---------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from model.build import BuildOptions, build_bundle
    from model.data import read_examples
    from model.network import DEFAULT_ENCODER, NetworkConfig
    from model.train import TrainOptions

    _settings()
    train = read_examples(args.data, require_labels=True)
    calib = read_examples(args.calib, require_labels=True) if args.calib else None
    network = NetworkConfig(
        labels=("_", "__"),  # replaced by the labels found in the data
        encoder=args.base_model or DEFAULT_ENCODER,
        num_layers=args.layers,
        num_filters=args.filters,
        max_length=args.max_length,
        fine_tune_encoder=args.fine_tune_encoder,
    )
    options = BuildOptions(
        alpha=args.alpha,
        k=args.k,
        confidence=args.confidence,
        store_text=not args.no_store_text,
        index=_settings().store.index_settings(),
        network=network,
        train=TrainOptions(
            max_epochs=args.epochs, seed=args.seed, progress=sys.stderr.isatty() and not args.quiet
        ),
    )
    if not args.register:
        build_bundle(train, Path(args.out), calib, options, say=_say)
        return 0
    from model.registry import Registry

    registry = Registry.create(Path(args.out))
    staging = registry.new_staging()
    try:
        build_bundle(train, staging, calib, options, say=_say)
        version = registry.commit_staging(
            staging, {"status": "registered", "source": "exemplar train"}
        )
    finally:
        registry.clean_staging()
    if registry.serving_version() is None:
        registry.promote(version)
        registry.update_lifecycle(version, {"status": "promoted", "reason": "first version"})
        _say(f"registered {version} in {args.out} and made it the serving version")
    else:
        _say(
            f"registered {version} in {args.out} (serving stays "
            f"{registry.serving_version()}; fine-tuning promotes after a shadow check)"
        )
    return 0


# ---------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from daemon.app import load
    from model.data import read_examples
    from model.evaluate import evaluate, format_report, plot_risk_coverage

    settings = _settings()
    examples = read_examples(args.data)
    loaded = load(settings, args.model)
    try:
        threshold = loaded.bundle.info.baseline.get("softmax_threshold")
        if settings.admission.alpha is not None:
            threshold = _recalibrated_softmax(loaded.bundle, settings.admission.alpha)
        report, curves = evaluate(loaded.predictor, examples, threshold, loaded.bundle.calibration)
    finally:
        loaded.close()
    report["data"] = str(args.data)
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"report: {args.json}")
    if args.plot:
        if curves:
            plot_risk_coverage(
                curves, report["alpha"], Path(args.plot), f"risk-coverage: {Path(args.data).name}"
            )
            print(f"plot: {args.plot}")
        else:
            _say("no labelled rows: nothing to plot")
    return 0


def _recalibrated_softmax(bundle: Any, alpha: float) -> float | None:
    import math

    from model.admission import calibrate_softmax_threshold

    stats = bundle.calibration
    # the stored margin is top1 - top2; the baseline needs top1, which for two
    # classes is (1 + margin) / 2. For K > 2 the stored stats cannot recover it.
    if len(bundle.info.labels) != 2:
        return bundle.info.baseline.get("softmax_threshold")
    top1 = [(1 + m) / 2 for m in stats.margin]
    ok = [p == g for p, g in zip(stats.predicted, stats.gold, strict=True)]
    t = calibrate_softmax_threshold(top1, ok, alpha, bundle.thresholds.confidence)
    return None if math.isinf(t) else t


# ---------------------------------------------------------------- explain
def cmd_explain(args: argparse.Namespace) -> int:
    from daemon.app import load
    from daemon.render import render_explanation

    settings = _settings()
    text = " ".join(args.text).strip()
    if not text:
        raise_data("explain needs a non-empty text")
    loaded = load(settings, args.model)
    try:
        pred = loaded.predictor.predict([text]).predictions[0]
    finally:
        loaded.close()
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(
        render_explanation(
            text, pred, loaded.predictor.version, as_json=args.json, colour=colour, top=args.nearest
        )
    )
    return 0


def raise_data(message: str) -> None:
    from model.errors import DataError

    raise DataError(message)


# ---------------------------------------------------------------- index
def cmd_index(args: argparse.Namespace) -> int:
    from daemon.app import load
    from model.data import read_examples
    from model.errors import DataError
    from model.store.base import Exemplar
    from model.store.edge import EdgeStore

    settings = _settings()
    examples = read_examples(args.data, require_labels=True)
    loaded = load(settings, args.model)
    try:
        labels = loaded.predictor.labels
        unknown = sorted({str(e.label) for e in examples} - set(labels))
        if unknown:
            raise DataError(
                f"{args.data}: labels {unknown} are unknown to the model (it knows {labels})"
            )
        fwd = loaded.predictor.forward([e.text for e in examples], explain=False)
        predicted = fwd.probs.argmax(axis=1)
        loaded.store.upsert(
            [
                Exemplar(
                    id=e.id,
                    vector=fwd.exemplars[i],
                    label=str(e.label),
                    predicted=labels[int(predicted[i])],
                    source=args.source,
                    text=None if args.no_store_text else e.text,
                )
                for i, e in enumerate(examples)
            ]
        )
        total = loaded.store.count()
        if isinstance(loaded.store, EdgeStore):
            loaded.store.optimize()  # new points join the HNSW index, not a scanned segment
    finally:
        loaded.close()
    print(f"indexed {len(examples)} exemplars from {args.data}; support set now {total}")
    return 0


# ---------------------------------------------------------------- config
def cmd_config(args: argparse.Namespace) -> int:
    from daemon.config import load_settings, masked

    print(json.dumps(masked(load_settings()), indent=2))
    return 0


# ---------------------------------------------------------------- run / broker
def cmd_run(args: argparse.Namespace) -> int:
    from daemon.lifecycle import run_service

    overrides: dict[str, Any] = {"model_dir": Path(args.model)} if args.model else {}
    if args.role:
        overrides["role"] = args.role
    settings = _settings(**overrides)
    return run_service(settings)


# ---------------------------------------------------------------- lifecycle
def cmd_audit(args: argparse.Namespace) -> int:
    from daemon.state import LifecycleState
    from model.registry import state_dir_for

    settings = _settings()
    model_dir = Path(args.model) if args.model else settings.model_dir
    state_dir = settings.curator.state_dir or state_dir_for(model_dir)
    if not (state_dir / "lifecycle.sqlite3").is_file():
        raise_data(f"{state_dir}: no lifecycle state yet (no decision was ever applied)")
    state = LifecycleState(state_dir)
    try:
        entries = state.audit(limit=args.limit, target_id=args.id)
    finally:
        state.close()
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2, ensure_ascii=False))
        return 0
    if not entries:
        print("no changes recorded")
    for e in entries:
        change = f"{e.old_label or '-'} -> {e.new_label or '-'}"
        source = f" (event {e.source_event})" if e.source_event else ""
        note = f"  # {e.note}" if e.note else ""
        print(
            f"{e.seq:>5}  {e.at}  {e.reviewer:<12} {e.action:<8} {e.target_id}  {change}"
            f"  [{e.old_source or '-'} -> {e.new_source or '-'}]{source}  "
            f"model {e.model_version}{note}"
        )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from model.registry import Registry

    settings = _settings()
    root = Path(args.model) if args.model else settings.model_dir
    if args.action == "init":
        return _models_init(root, args)
    registry = Registry(root)
    if args.action == "promote":
        return _models_promote(registry, args)
    entries = registry.versions()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "version": e.version,
                        "status": e.status,
                        "serving": e.serving,
                        "created_at": e.created_at,
                        "metrics": e.metrics,
                        "lifecycle": e.lifecycle,
                    }
                    for e in entries
                ],
                indent=2,
            )
        )
        return 0
    if not entries:
        print(f"{root}: no versions")
    for e in entries:
        mark = "*" if e.serving else " "
        shadow = e.lifecycle.get("shadow", {}).get("new", {})
        coverage = shadow.get("coverage_at_alpha", e.metrics.get("calib_coverage"))
        accuracy = shadow.get("accuracy", e.metrics.get("calib_accuracy"))
        line = (
            f"{mark} {e.version}  {e.status:<10} created {e.created_at}  "
            f"coverage@alpha {_fmt(coverage)}  accuracy {_fmt(accuracy)}"
        )
        if e.lifecycle.get("reason") and not e.serving:
            line += f"  ({e.lifecycle['reason']})"
        print(line)
    return 0


def _models_promote(registry: Any, args: argparse.Namespace) -> int:
    import getpass
    import time

    version = args.version
    if not version:
        raise_data("models promote needs the VERSION to serve (see `exemplar models`)")
    if registry.serving_version() == version:
        print(f"{version} serves already")
        return 0
    registry.request_promotion(version, getpass.getuser(), args.reason or "manual promotion")
    print(f"asked the curator to serve {version} (it replays every decision onto it first)")
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        if registry.serving_version() == version:
            print(f"{version} serves now")
            return 0
        if registry.promotion_request() is None:  # taken, but not served: it failed
            failed = registry.read_lifecycle(version).get("promotion_failed", "see its log")
            print(f"the curator could not promote {version}: {failed}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    print(
        f"no curator took the request within {args.wait:.0f} s; it stays in "
        f"{registry.state_dir} until `exemplar run` (role all or curator) starts on this registry",
        file=sys.stderr,
    )
    return 3


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def _models_init(root: Path, args: argparse.Namespace) -> int:
    import shutil

    from model.build import CALIB_ROWS_FILE
    from model.bundle import fingerprint_texts, read_info
    from model.data import read_examples, write_jsonl
    from model.errors import DataError
    from model.registry import Registry

    if not args.source:
        raise_data("models init needs --from BUNDLE (the first version)")
    source = Path(args.source)
    info = read_info(source)
    registry = Registry.create(root)
    staging = registry.new_staging()
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        if args.calib:
            rows = read_examples(args.calib, require_labels=True)
            expected = info.training.get("calib_fingerprint")
            actual = fingerprint_texts((r.text, r.label) for r in rows)
            if expected and actual != expected:
                raise DataError(
                    f"{args.calib}: not the calibration data {info.version} was "
                    "calibrated on (fingerprint differs)"
                )
            write_jsonl(staging / CALIB_ROWS_FILE, rows)
        version = registry.commit_staging(
            staging, {"status": "registered", "reason": f"imported from {source}"}
        )
    finally:
        registry.clean_staging()
    if registry.serving_version() is None:
        registry.promote(version)
        registry.update_lifecycle(version, {"status": "promoted"})
    print(f"registry {root}: version {version} (serving {registry.serving_version()})")
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from streams.broker import run_broker

    _settings()
    return run_broker(host=args.host, port=args.port)


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo import run_demo

    settings = _settings()
    return run_demo(
        settings, model_dir=Path(args.model), data_dir=Path(args.data), events=args.events
    )


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exemplar",
        description="Text classification that admits only what its training exemplars support.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="prepare a shipped data set")
    p.add_argument("name", choices=["rotten-tomatoes"])
    p.add_argument("--out", default="data/rotten-tomatoes")
    p.add_argument("--cache", default=".cache/exemplar")
    p.add_argument("--seed", type=int, default=13)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train a model bundle with its support set")
    p.add_argument("--data", required=True, help="labelled JSONL or CSV")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--calib", help="labelled calibration file (default: a held-out slice)")
    p.add_argument("--base-model", help="encoder directory (default: all-MiniLM-L6-v2)")
    p.add_argument("--alpha", type=float, default=0.95, help="target admitted accuracy")
    p.add_argument("--k", type=int, default=8, help="neighbours retrieved per prediction")
    p.add_argument(
        "--confidence",
        type=float,
        default=0.8,
        help="one-sided confidence that calibrated accuracy reaches alpha",
    )
    p.add_argument("--filters", type=int, default=1000, help="exemplar vector size M")
    p.add_argument("--layers", type=int, default=4, help="last L encoder layers used")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text")
    p.add_argument("--epochs", type=int, default=40, help="maximum epochs")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--fine-tune-encoder", action="store_true")
    p.add_argument(
        "--no-store-text", action="store_true", help="keep texts out of the store payload"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--register",
        action="store_true",
        help="--out is a model registry: add the bundle as a new version "
        "(serving when it is the first)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="selective-prediction report on a file")
    p.add_argument("--model", help="bundle directory (default: EXEMPLAR_MODEL_DIR)")
    p.add_argument("--data", required=True)
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--plot", help="write a risk-coverage PNG here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("explain", help="explain one prediction")
    p.add_argument("--model", help="bundle directory (default: EXEMPLAR_MODEL_DIR)")
    p.add_argument("text", nargs="+")
    p.add_argument("--json", action="store_true")
    p.add_argument("--nearest", type=int, default=5, help="exemplars to show")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("index", help="add labelled rows to the support set (no retraining)")
    p.add_argument("--model", help="bundle directory (default: EXEMPLAR_MODEL_DIR)")
    p.add_argument("--data", required=True)
    p.add_argument(
        "--source",
        default="index",
        choices=["index", "human"],
        help="'human' marks rows as reviewed mappings",
    )
    p.add_argument("--no-store-text", action="store_true")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("run", help="run the streaming service (settings from EXEMPLAR_*)")
    p.add_argument("--model", help="bundle or registry directory (default: EXEMPLAR_MODEL_DIR)")
    p.add_argument(
        "--role",
        choices=["predictor", "curator", "all"],
        help="what to run (default: EXEMPLAR_ROLE, else all)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("audit", help="list the changes humans made to the support set")
    p.add_argument("--model", help="bundle or registry directory (default: EXEMPLAR_MODEL_DIR)")
    p.add_argument("--limit", type=int, default=50, help="newest N entries")
    p.add_argument("--id", help="only changes of this exemplar / event id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "models", help="list model versions, init a registry, or promote a version (rollback)"
    )
    p.add_argument("action", nargs="?", choices=["list", "init", "promote"], default="list")
    p.add_argument("version", nargs="?", help="promote: the version to serve")
    p.add_argument("--reason", help="promote: why (kept in the version's lifecycle record)")
    p.add_argument(
        "--wait", type=float, default=60.0, help="promote: seconds to wait for the curator"
    )
    p.add_argument("--model", help="registry directory (default: EXEMPLAR_MODEL_DIR)")
    p.add_argument("--from", dest="source", help="init: the bundle that becomes version one")
    p.add_argument("--calib", help="init: the bundle's calibration file, kept for shadow checks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("broker", help="run the embedded Kafka-protocol broker (Tansu)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9092)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("demo", help="the whole streaming loop on an embedded broker")
    p.add_argument("--model", default="models/rotten-tomatoes", help="bundle directory")
    p.add_argument("--data", default="data/rotten-tomatoes", help="prepared data directory")
    p.add_argument("--events", type=int, default=300, help="events to produce")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("config", help="print the effective settings (secrets masked)")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ExemplarError as exc:
        print(f"exemplar {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"exemplar {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
