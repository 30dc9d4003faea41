"""Run every benchmark side by side and write ``results.json`` + ``RESULTS.md``.

    python -m benchmarks.run --model models/rotten-tomatoes --data data/rotten-tomatoes
    python -m benchmarks.run --smoke            # tiny random model, about a minute

Figures (one module each, in this order, in one process so they share the machine's
state): ``throughput`` (daemon vs bare forward vs naive loop), ``compute`` (peak and
achieved FLOP/s, forward-pass variants; ``forward.py``), ``latency``, ``quality``,
``matching`` and ``memory``. ``--only`` runs a subset (figures that need another's
numbers measure a stand-in). The machine is shared: each figure records how many cores
this run and everything else used meanwhile, and the report says when others did.

The product is measured as it ships: the predictor is loaded as ``exemplar run`` loads it
(``daemon.app.load`` with the default ``Settings``: forward pass in chunks of
``batch.forward_size``, the store opened through ``daemon.stores.open_store``), and the
daemon's 10k support set is built as ``model.build`` builds a bundle's (indexed).

The full run writes into ``benchmarks/``; the smoke run into ``benchmarks/smoke/``
(ignored by git through its own ``.gitignore``) unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import structlog

from benchmarks import report, targets
from benchmarks.common import (
    BATCH,
    Context,
    CpuWatch,
    Sizes,
    load_average,
    machine_info,
    read_support,
    rebuild_support_store,
)

FIGURES = ("throughput", "compute", "latency", "quality", "matching", "memory")
HERE = Path(__file__).resolve().parent


def quiet_logging() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    # kafka-python warns when a busy machine delays its event loop; not a result
    logging.getLogger("kafka").setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, help="trained bundle (copied, never opened in place)")
    p.add_argument("--data", type=Path, help="folder with train/calib/test(/plots).jsonl")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random model and toy data, toy sizes (< 2 minutes)",
    )
    p.add_argument("--skip-1m", action="store_true", help="leave out the 1M-exemplar store")
    p.add_argument(
        "--index-1m",
        action="store_true",
        help="also build HNSW over the 1M store (adds tens of minutes on 2 cores)",
    )
    p.add_argument(
        "--only", default=",".join(FIGURES), help=f"comma-separated subset of {','.join(FIGURES)}"
    )
    p.add_argument(
        "--out",
        type=Path,
        help="where results.json and RESULTS.md go (default benchmarks/, "
        "benchmarks/smoke/ with --smoke)",
    )
    p.add_argument("--work-dir", type=Path, help="scratch space (default: a temp dir)")
    args = p.parse_args(argv)
    if not args.smoke and (args.model is None or args.data is None):
        p.error("--model and --data are required (or --smoke)")
    unknown = set(args.only.split(",")) - set(FIGURES)
    if unknown:
        p.error(f"unknown figures {sorted(unknown)}; choose from {FIGURES}")
    return args


def _stop(signum: int, _frame: object) -> None:
    # unwind normally so the broker child and the temp dir are cleaned up
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    signal.signal(signal.SIGTERM, _stop)
    only = [f for f in FIGURES if f in args.only.split(",")]
    out_dir = args.out or (HERE / "smoke" if args.smoke else HERE)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.smoke and args.out is None:
        (out_dir / ".gitignore").write_text("# smoke-run output, rewritten by every run\n*\n")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="exemplar-bench-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        if args.smoke:
            from benchmarks.smoke import build_smoke_inputs

            print("smoke: building a tiny model and toy data", flush=True)
            model_dir, data_dir = build_smoke_inputs(work / "smoke-inputs")
            sizes = Sizes.smoke()
        else:
            model_dir, data_dir = args.model.resolve(), args.data.resolve()
            sizes = Sizes.full(skip_1m=args.skip_1m, index_1m=args.index_1m)
        ctx = Context(
            model_dir=model_dir,
            data_dir=data_dir,
            work_dir=work,
            sizes=sizes,
            smoke=args.smoke,
            say=lambda m: print(m, flush=True),
        )
        results: dict[str, Any] = {
            "meta": {
                "command": "python -m benchmarks.run " + " ".join(argv or sys.argv[1:]),
                "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
                "smoke": args.smoke,
                "model": str(args.model or "tiny random encoder (smoke)"),
                "data": str(args.data or "toy corpus (smoke)"),
                "figures": only,
                "machine": machine_info(),
                "load_average_start": load_average(),
                "sizes": _sizes_json(sizes),
            },
        }
        run_figures(ctx, only, results)
        results["meta"]["load_average_end"] = load_average()
        results["meta"]["total_s"] = round(time.monotonic() - started, 1)
    results["targets"] = targets.evaluate(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out_dir / "RESULTS.md").write_text(report.markdown(results))
    print(
        f"wrote {out_dir / 'results.json'} and {out_dir / 'RESULTS.md'} "
        f"({results['meta']['total_s']:.0f} s)",
        flush=True,
    )
    return 0


def _sizes_json(sizes: Sizes) -> dict[str, Any]:
    data = dict(vars(sizes))
    data["matching"] = [vars(c) for c in sizes.matching]
    return data


def run_figures(ctx: Context, only: list[str], results: dict[str, Any]) -> None:
    from benchmarks import forward, latency, matching, memory, quality, throughput
    from daemon.app import load
    from daemon.config import MetricsConfig, Settings
    from model.predictor import Predictor
    from model.store.edge import EdgeStore
    from streams.broker import EmbeddedBroker

    cpu: dict[str, Any] = {}
    results["meta"]["cpu_by_figure"] = cpu
    serve_dir = ctx.copy_bundle("serve")
    reference_dir = ctx.copy_bundle("reference")
    support = read_support(reference_dir / "store")
    ctx.shared["support"] = support
    # the daemon's support set: as a bundle built with this many exemplars would ship it
    results["meta"]["daemon_store"] = rebuild_support_store(
        serve_dir, support, ctx.sizes.pad_support_to
    )
    # the product's settings: EXEMPLAR_BATCH__FORWARD_SIZE etc. at their defaults
    settings = Settings(model_dir=serve_dir, metrics=MetricsConfig(enabled=False))
    loaded = load(settings, str(serve_dir), batch_size=settings.batch.forward_size)
    serving = loaded.predictor
    ctx.shared["daemon_support_size"] = loaded.store.count()
    reference_store = EdgeStore(reference_dir / "store")
    reference = Predictor(
        serving.network,
        serving.tokenizer,
        reference_store,
        loaded.bundle.thresholds,
        serving.version,
        batch_size=serving.batch_size,
    )
    try:
        with EmbeddedBroker(log_path=ctx.work_dir / "broker.log") as broker:
            if "throughput" in only:
                watch = CpuWatch()
                results["throughput"] = throughput.measure(ctx, serving, broker.bootstrap_servers)
                cpu["throughput"] = watch.read()
            if "compute" in only:
                watch = CpuWatch()
                results["compute"] = forward.measure(
                    ctx, serving, reference_store, loaded.bundle.thresholds
                )
                cpu["compute"] = watch.read()
            if "latency" in only:
                watch = CpuWatch()
                max_eps = _daemon_eps(ctx, results, serving, broker.bootstrap_servers)
                results["latency"] = latency.measure(
                    ctx, serving, broker.bootstrap_servers, max_eps
                )
                cpu["latency"] = watch.read()
        if "quality" in only:
            watch = CpuWatch()
            results["quality"] = quality.measure(ctx, reference, loaded.bundle, support)
            cpu["quality"] = watch.read()
        model_ms = 1000 / _bare_eps(ctx, results, serving)
        queries = _queries(ctx, reference)
    finally:
        reference_store.close()
        loaded.close()
    if "matching" in only:
        watch = CpuWatch()
        results["matching"] = matching.measure(ctx, support, queries, model_ms)
        cpu["matching"] = watch.read()
    if "memory" in only:
        watch = CpuWatch()
        results["memory"] = memory.measure(ctx, support)
        cpu["memory"] = watch.read()


def _bare_eps(ctx: Context, results: dict[str, Any], predictor: Any) -> float:
    """Bare forward events/s: figure 1's, or a short stand-in measurement."""
    if "throughput" in results:
        return float(results["throughput"]["bare_forward_eps"])
    from benchmarks.throughput import bare_forward

    eps = float(bare_forward(predictor, ctx.stream_texts(4 * BATCH), explain=True)["eps"])
    results.setdefault("meta", {})["bare_forward_eps_standin"] = eps
    return eps


def _daemon_eps(ctx: Context, results: dict[str, Any], predictor: Any, bootstrap: str) -> float:
    if "throughput" in results:
        return float(results["throughput"]["daemon_eps"])
    from benchmarks.throughput import run_daemon

    texts = ctx.stream_texts(8 * BATCH)
    eps = float(
        run_daemon(predictor, bootstrap, texts, "standin", 600, ctx.sizes.kafka_session_ms)["eps"]
    )
    results["meta"]["daemon_eps_standin"] = eps
    return eps


def _queries(ctx: Context, predictor: Any) -> Any:
    """Real exemplar vectors of the test split (the matching figure's queries)."""
    if "test_fp32" in ctx.shared:
        return ctx.shared["test_fp32"].exemplars
    return predictor.forward(ctx.texts("test")[:512], explain=False).exemplars


if __name__ == "__main__":
    raise SystemExit(main())
