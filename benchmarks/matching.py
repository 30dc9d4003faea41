"""Figure 3: what matching costs as the support set grows (``EdgeStore``, in-process Qdrant).

Three ways to search the same ``n`` synthetic exemplars (see ``common``: mixes of the
bundle's real support vectors, with their labels and text as payload) for the same
queries (real test-split exemplars of the model), in batches of 64, k = 8, payloads
included, as the predictor calls it:

* **product** - the store as the product builds and opens it by default
  (``daemon.stores.StoreConfig().index_settings()``: HNSW, int8 scalar quantization
  whose candidates are rescored with the float32 vectors, the default search ef);
* **no quantization** - HNSW over the float32 vectors only (same graph settings), a
  second store built from the same points;
* **exact** - the product's store opened with ``exact=True``: a full scan of the float32
  vectors. Its hits are the ground truth of recall@k.

Each size runs in its own subprocess (a clean RSS baseline; the engine's memory goes
back to the OS when it exits): insert -> insert time and RSS growth; ``optimize()`` ->
index build time and RSS growth; disk size; then each mode's cost per event (wall time
of 64-query batches / 64, best of 2-3 passes over the queries, after a warm-up batch,
to keep other processes' bursts out) and recall@k. The share of the model's per-event
time (figure 1's bare forward) is the target's measure.

**1M x 1000.** Building HNSW over 1M x 1000 floats does not fit the run on 2 shared cores
(the build time grows at least linearly: see the measured build times). So the 1M case
is inserted and searched exactly (``--index-1m`` builds and measures the indexes too, for
whoever has the time), and the product's index cost at 1M is extrapolated from the
indexed sizes by a power law fitted to cost vs n (log-log least squares). HNSW search
cost grows about logarithmically with n, slower than any power law that fits it over
10k-100k, so the extrapolation over- rather than under-estimates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks.common import (
    BATCH,
    Context,
    K,
    Support,
    dir_mb,
    fill_store,
    peak_rss_mb,
    product_index,
    rss_mb,
    run_json_subprocess,
)
from model.store.edge import EdgeStore

MODES = ("product", "no_quantization", "exact")


def save_inputs(ctx: Context, support: Support, queries: npt.NDArray[np.float32]) -> Path:
    folder = ctx.work_dir / "matching-inputs"
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "support.npy", support.vectors)
    np.save(folder / "queries.npy", queries.astype(np.float32))
    (folder / "payload.json").write_text(
        json.dumps(
            {"labels": support.labels, "predicted": support.predicted, "texts": support.texts}
        )
    )
    return folder


def measure(
    ctx: Context,
    support: Support,
    queries: npt.NDArray[np.float32],
    model_ms_per_event: float | None,
) -> dict[str, Any]:
    inputs = save_inputs(ctx, support, queries)
    dim = support.vectors.shape[1]
    cases = []
    for case in ctx.sizes.matching:
        ctx.say(
            f"matching: {case.n:,} exemplars x {dim} dims"
            + ("" if case.index else " (exact scan only)")
        )
        store_dir = ctx.work_dir / f"matching-{case.n}"
        args = ["benchmarks.matching", "--inputs", str(inputs), "--store", str(store_dir)]
        args += ["--n", str(case.n), "--queries", str(case.queries)]
        result = run_json_subprocess(args + ([] if case.index else ["--no-index"]), timeout_s=7200)
        shutil.rmtree(store_dir, ignore_errors=True)
        for mode in MODES:
            cost = result["search"].get(mode, {}).get("ms_per_event")
            if cost is not None and model_ms_per_event:
                result["search"][mode]["vs_model"] = cost / model_ms_per_event
        cases.append(result)
        ctx.say(
            f"  insert {result['insert_s']:.0f}s; "
            + "; ".join(
                f"{mode} {r['ms_per_event']:.2f} ms/ev"
                + (f", recall@{K} {r['recall']:.3f}" if "recall" in r else "")
                for mode, r in result["search"].items()
            )
        )
    return {
        "dim": dim,
        "k": K,
        "batch": BATCH,
        "index": dataclasses.asdict(product_index()),
        "model_ms_per_event": model_ms_per_event,
        "cases": cases,
        "extrapolated": extrapolate(cases, model_ms_per_event),
    }


def extrapolate(cases: list[dict[str, Any]], model_ms: float | None) -> dict[str, Any] | None:
    """The product index's cost at the largest exact-only size, by a power law in n."""
    indexed = [c for c in cases if "product" in c["search"]]
    beyond = [c for c in cases if "product" not in c["search"]]
    if len(indexed) < 2 or not beyond or beyond[-1]["n"] <= indexed[-1]["n"]:
        return None
    big = beyond[-1]
    n = np.log([c["n"] for c in indexed])
    cost = np.log([c["search"]["product"]["ms_per_event"] for c in indexed])
    slope, intercept = np.polyfit(n, cost, 1)
    ms = float(np.exp(intercept + slope * np.log(big["n"])))
    largest = indexed[-1]
    out = {
        "n": big["n"],
        "measured": False,
        "basis": f"cost ~ n^{slope:.2f}, fitted to the product index's cost at "
        + ", ".join(f"{c['n']:,}" for c in indexed),
        "exponent": float(slope),
        "product_ms_per_event": ms,
        "exact_ms_per_event": big["search"]["exact"]["ms_per_event"],
        "build_s_linear_estimate": largest["search"]["product"]["build_s"]
        * big["n"]
        / largest["n"],
        "recall_at_largest": largest["search"]["product"]["recall"],
    }
    if model_ms:
        out["product_vs_model"] = ms / model_ms
    return out


# --- one case, in its own process ---------------------------------------------------------


def _search(
    store: EdgeStore, queries: npt.NDArray[np.float32], repeats: int
) -> tuple[float, list[list[str]]]:
    """ms per event over batches of 64 (best of ``repeats`` passes), and the ids found."""
    store.search(queries[:BATCH], K)  # warm-up: page the segments in
    ids: list[list[str]] = []
    best = float("inf")
    for attempt in range(repeats):
        started = time.perf_counter()
        for start in range(0, len(queries), BATCH):
            hits = store.search(queries[start : start + BATCH], K)
            if attempt == 0:
                ids.extend([h.id for h in row] for row in hits)
        best = min(best, time.perf_counter() - started)
    return 1000 * best / len(queries), ids


def _recall(found: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth, strict=True)]))


def run_case(
    inputs: Path, store_dir: Path, n: int, n_queries: int, index: bool = True
) -> dict[str, Any]:
    rss0 = rss_mb()
    payload = json.loads((inputs / "payload.json").read_text())
    vectors = np.load(inputs / "support.npy")
    support = Support(vectors, payload["labels"], payload["predicted"], payload["texts"])
    dim = vectors.shape[1]
    queries = np.load(inputs / "queries.npy")
    reps = -(-n_queries // len(queries))
    queries = np.ascontiguousarray(np.tile(queries, (reps, 1))[:n_queries], dtype=np.float32)
    repeats = 2 if n >= 1_000_000 else 3
    rss_inputs = rss_mb()
    product = product_index()
    settings = {
        "product": product,
        "no_quantization": dataclasses.replace(product, quantization="none"),
    }
    result: dict[str, Any] = {
        "n": n,
        "dim": dim,
        "queries": len(queries),
        "indexed": index,
        "vector_mb": n * dim * 4 / 2**20,
        "rss_start_mb": rss0,
        "search": {},
    }
    truth: list[list[str]] = []
    for mode, index_settings in settings.items():
        path = store_dir / mode
        shutil.rmtree(path, ignore_errors=True)
        store = EdgeStore(path, dim=dim, index=index_settings)
        insert_s = fill_store(store, support, n, seed=n)  # same seed: the same points
        row: dict[str, Any] = {}
        if mode == "product":
            result.update(insert_s=insert_s, rss_growth_insert_mb=rss_mb() - rss_inputs)
        if index:
            started = time.perf_counter()
            store.optimize()
            row.update(build_s=time.perf_counter() - started, indexed_vectors=store.indexed_count)
            if mode == "product":
                result["rss_growth_indexed_mb"] = rss_mb() - rss_inputs
        store.close()
        if mode == "product":
            result["disk_mb"] = dir_mb(path)
            exact = EdgeStore(path, exact=True)
            ms, truth = _search(exact, queries, repeats)
            exact.close()
            result["search"]["exact"] = {"ms_per_event": ms}
        if index:
            store = EdgeStore(path, index=index_settings)
            row["ms_per_event"], found = _search(store, queries, repeats)
            row["recall"] = _recall(found, truth)
            store.close()
            result["search"][mode] = row
        shutil.rmtree(path, ignore_errors=True)
        if not index:
            break  # exact only: one store
    result["rss_peak_mb"] = peak_rss_mb()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one matching case (used by benchmarks.run)")
    p.add_argument("--inputs", type=Path, required=True)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--queries", type=int, required=True)
    p.add_argument("--no-index", action="store_true", help="insert and scan only, no index")
    a = p.parse_args(argv)
    result = run_case(a.inputs, a.store, a.n, a.queries, index=not a.no_index)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
