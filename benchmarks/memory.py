"""Figure 5: resident memory of a predictor process with 10k and 100k support exemplars.

For each size a copy of the bundle gets a support store of that size built as a bundle's
is (``common.rebuild_support_store``: its real exemplars plus synthetic ones with
realistic vectors, labels and text payloads, the product's default index settings, HNSW
built); then a fresh subprocess loads it as the daemon does (``daemon.app.load``: bundle,
store through ``daemon.stores.open_store``, predictor with the default forward chunk
size), predicts a few batches of 64 events, and reports its RSS at each step plus the
peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BATCH,
    Context,
    Support,
    dir_mb,
    peak_rss_mb,
    rebuild_support_store,
    rss_mb,
    run_json_subprocess,
)


def measure(ctx: Context, support: Support) -> dict[str, Any]:
    texts_file = ctx.work_dir / "memory-texts.json"
    texts_file.write_text(json.dumps(ctx.stream_texts(4 * BATCH)))
    rows = []
    for size in ctx.sizes.memory_sizes:
        bundle = ctx.copy_bundle(f"memory-{size}")
        started = time.perf_counter()
        store = rebuild_support_store(bundle, support, size)
        ctx.say(
            f"memory: support set {size:,} (built and indexed in "
            f"{time.perf_counter() - started:.0f}s), predictor subprocess"
        )
        result = run_json_subprocess(
            ["benchmarks.memory", "--bundle", str(bundle), "--texts", str(texts_file)],
            timeout_s=900,
        )
        result.update(
            support_set=size,
            store_disk_mb=dir_mb(bundle / "store"),
            indexed_vectors=store["indexed_vectors"],
        )
        rows.append(result)
        ctx.say(
            f"  RSS {result['rss_after_predict_mb']:.0f} MiB (peak "
            f"{result['rss_peak_mb']:.0f}, store open +{result['store_open_mb']:.0f})"
        )
    return {"sizes": rows}


def child(bundle: Path, texts: list[str]) -> dict[str, Any]:
    rss_start = rss_mb()
    from daemon.app import effective_thresholds
    from daemon.config import MetricsConfig, Settings
    from daemon.stores import open_store
    from model.bundle import load_bundle
    from model.predictor import Predictor

    rss_imports = rss_mb()
    # what daemon.app.load does, one step at a time so each step's memory shows
    settings = Settings(model_dir=bundle, metrics=MetricsConfig(enabled=False))
    loaded = load_bundle(bundle)
    rss_model = rss_mb()
    store = open_store(settings.store, loaded)
    rss_store = rss_mb()
    predictor = Predictor(
        loaded.network,
        loaded.tokenizer,
        store,
        effective_thresholds(loaded, settings.admission),
        loaded.info.version,
        batch_size=settings.batch.forward_size,
    )
    count = store.count()
    predictor.predict(texts[:BATCH])
    rss_first = rss_mb()
    started = time.perf_counter()
    for start in range(BATCH, len(texts), BATCH):
        predictor.predict(texts[start : start + BATCH])
    seconds = time.perf_counter() - started
    rss_after = rss_mb()
    store.close()
    return {
        "exemplars": count,
        "rss_start_mb": rss_start,
        "rss_after_imports_mb": rss_imports,
        "model_mb": rss_model - rss_imports,
        "store_open_mb": rss_store - rss_model,
        "rss_after_load_mb": rss_store,
        "rss_after_first_batch_mb": rss_first,
        "rss_after_predict_mb": rss_after,
        "rss_peak_mb": peak_rss_mb(),
        "predict_eps": (len(texts) - BATCH) / seconds if seconds > 0 else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="predictor RSS (used by benchmarks.run)")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--texts", type=Path, required=True)
    a = p.parse_args(argv)
    result = child(a.bundle, json.loads(a.texts.read_text()))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
