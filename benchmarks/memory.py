"""Figure 5: resident memory of a predictor process with 10k and 100k support exemplars.

For each size a copy of the bundle gets its real support set padded with synthetic
exemplars (``common.fill_store``: realistic vectors, labels and text payloads) up to the
size; then a fresh subprocess loads it exactly as the daemon does (``daemon.app.load``:
bundle, embedded store, predictor), predicts a few batches of 64 events, and reports its
RSS at each step plus the peak. The store is left as ``exemplar train`` leaves it (plain
segments, no HNSW); figure 3 reports what an HNSW index adds.
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
    pad_bundle_store,
    peak_rss_mb,
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
        added = pad_bundle_store(bundle, support, size)
        ctx.say(
            f"memory: support set {size:,} (padded {added:,} in "
            f"{time.perf_counter() - started:.0f}s), predictor subprocess"
        )
        result = run_json_subprocess(
            ["benchmarks.memory", "--bundle", str(bundle), "--texts", str(texts_file)],
            timeout_s=900,
        )
        result.update({"support_set": size, "store_disk_mb": dir_mb(bundle / "store")})
        rows.append(result)
        ctx.say(
            f"  RSS {result['rss_after_predict_mb']:.0f} MiB (peak "
            f"{result['rss_peak_mb']:.0f}, store open +{result['store_open_mb']:.0f})"
        )
    return {"sizes": rows}


def child(bundle: Path, texts: list[str]) -> dict[str, Any]:
    rss_start = rss_mb()
    from daemon.app import effective_thresholds
    from daemon.config import Settings
    from model.bundle import load_bundle
    from model.predictor import Predictor
    from model.store.edge import EdgeStore

    rss_imports = rss_mb()
    # what daemon.app.load does, one step at a time so each step's memory shows
    settings = Settings(model_dir=bundle, metrics={"enabled": False})
    loaded = load_bundle(bundle)
    rss_model = rss_mb()
    store = EdgeStore(loaded.store_path)
    rss_store = rss_mb()
    predictor = Predictor(
        loaded.network,
        loaded.tokenizer,
        store,
        effective_thresholds(loaded, settings.admission),
        loaded.info.version,
        batch_size=BATCH,
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
