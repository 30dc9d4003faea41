"""The targets of a run, each with what was measured, whether it was met, by how much it
was missed, and what limits it - the last worked out from the run's own breakdowns (the
daemon's stage timings, the naive loop's steps, the matching costs), not written by hand,
so a re-run stays truthful.
"""

from __future__ import annotations

from typing import Any


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _row(
    name: str, measured: float, threshold: float, higher_is_better: bool, limit: str, unit: str = ""
) -> dict[str, Any]:
    met = measured >= threshold if higher_is_better else measured <= threshold
    gap = (threshold - measured) if higher_is_better else (measured - threshold)
    return {
        "target": name,
        "measured": measured,
        "threshold": threshold,
        "unit": unit,
        "met": bool(met),
        "shortfall": None if met else gap,
        "shortfall_relative": None if met else gap / threshold,
        "limited_by": limit,
    }


def daemon_limit(tp: dict[str, Any], one_thread: bool = False) -> str:
    suffix = "_1thread" if one_thread else ""
    d = tp["daemon" + suffix]
    stages = d["stage_ms_per_event"]
    wall = d["wall_ms_per_event"]
    bare = 1000 / tp["paths"]["bare" + suffix]["eps"]
    inside = stages.get("batch", sum(v for k, v in stages.items() if k != "batch"))
    parts = {k: v for k, v in stages.items() if k != "batch"}
    parts["outside batches (poll wait, lag check)"] = max(0.0, wall - inside)
    extra = {k: v for k, v in parts.items() if k != "forward"}
    worst = max(extra, key=lambda k: extra[k])
    listing = ", ".join(f"{k} {v:.2f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
    forward_gap = parts.get("forward", 0.0) - bare
    cpu_d = tp["paths"]["daemon" + suffix]["cpu_ms_per_event"]
    cpu_b = tp["paths"]["bare" + suffix]["cpu_ms_per_event"]
    return (
        f"per event {wall:.2f} ms in the daemon vs {bare:.2f} ms bare forward; daemon "
        f"stages (ms/event): {listing}. Largest cost beyond the forward pass: {worst} "
        f"({extra[worst]:.2f} ms); the daemon's own forward stage is {forward_gap:+.2f} ms/"
        f"event against the bare pass. CPU per event: daemon {cpu_d:.2f} ms (broker "
        f"included) vs bare {cpu_b:.2f} ms ({cpu_d / cpu_b - 1:+.0%}); the rest of the gap is "
        f"waiting for a core (the broker, the Kafka client threads and other processes "
        f"share the 2 cores)."
    )


def naive_limit(tp: dict[str, Any], key: str) -> str:
    naive = tp[key]
    steps = naive.get("step_ms_per_event", {})
    detail = tp["daemon_1thread" if key.endswith("1thread") else "daemon"]
    stages = detail["stage_ms_per_event"]
    model_naive = steps.get("predict", 0.0)
    model_daemon = sum(stages.get(k, 0.0) for k in ("forward", "search", "admission"))
    kafka_naive = sum(steps.get(k, 0.0) for k in ("poll", "produce_flush", "commit"))
    kafka_daemon = sum(stages.get(k, 0.0) for k in ("decode", "produce", "commit"))
    gain = model_naive / max(model_daemon, 1e-9)
    ceiling = (model_naive + kafka_naive) / max(model_daemon + kafka_daemon, 1e-9)
    why = (
        "the model's per-event cost hardly drops with batch size on this CPU (padding to "
        "the batch's longest text eats the GEMM gain) and a local broker's round trips are "
        "cheap"
        if gain < 2
        else "most of it is the batch-of-one forward pass: fixed per-call costs (tokenizer "
        "call, Python dispatch and, with several OpenMP threads on busy cores, a barrier "
        "per op) are paid per event instead of per batch"
    )
    return (
        f"per event: predict {model_naive:.1f} ms one at a time vs {model_daemon:.1f} ms in "
        f"batches of {tp['batch_size']} ({gain:.1f}x); broker round trips (poll, flush, "
        f"commit) {kafka_naive:.1f} ms vs {kafka_daemon:.2f} ms. Batching can give about "
        f"{ceiling:.1f}x at most here: {why}."
    )


def matching_limit(m: dict[str, Any], case: dict[str, Any], mode: str) -> str:
    indexed = [c for c in m["cases"] if c["hnsw_ms_per_event"] is not None]
    recall = (
        f"; recall@{m['k']} of HNSW {indexed[-1]['recall_at_k']:.3f} at {indexed[-1]['n']:,}"
        if indexed
        else ""
    )
    if mode == "exact":
        return (
            f"an exact scan reads all {case['n']:,} x {case['dim']} floats "
            f"({case['vector_mb'] / 1024:.1f} GiB) per query: {case['exact_ms_per_event']:.1f}"
            f" ms/event against {m['model_ms_per_event']:.2f} ms/event for the model. The "
            "product never builds the HNSW index (nothing calls EdgeStore.optimize())"
            f"{recall}."
        )
    return (
        f"HNSW {case['hnsw_ms_per_event']:.2f} ms/event against "
        f"{m['model_ms_per_event']:.2f} ms/event for the model (fp32 as shipped; a faster "
        f"model makes the share larger){recall}. Every hit also fetches its payload "
        "(text); EdgeStore does not expose the search ef."
    )


def evaluate(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    tp = r.get("throughput")
    if tp:
        rows.append(
            _row(
                "daemon throughput >= 0.9 x bare forward",
                tp["daemon_vs_bare"],
                0.9,
                True,
                daemon_limit(tp),
                "x",
            )
        )
        rows.append(
            _row(
                "daemon throughput >= 5 x naive per-event loop",
                tp["daemon_vs_naive"],
                5.0,
                True,
                naive_limit(tp, "naive"),
                "x",
            )
        )
        one = "1 torch thread"
        rows.append(
            _row(
                f"daemon throughput >= 0.9 x bare forward ({one})",
                tp["daemon_vs_bare_1thread"],
                0.9,
                True,
                daemon_limit(tp, one_thread=True),
                "x",
            )
        )
        rows.append(
            _row(
                f"daemon throughput >= 5 x naive per-event loop ({one})",
                tp["daemon_vs_naive_1thread"],
                5.0,
                True,
                naive_limit(tp, "naive_1thread"),
                "x",
            )
        )
    m = r.get("matching")
    if m and m["cases"] and m.get("model_ms_per_event"):
        biggest = max(m["cases"], key=lambda c: (c["n"], c["dim"]))
        size = f"{biggest['n']:,} x {biggest['dim']}"
        ext = m.get("hnsw_extrapolated")
        if biggest["hnsw_ms_per_event"] is not None:
            rows.append(
                _row(
                    f"matching <= 5% of per-event model time at {size} (HNSW)",
                    biggest["hnsw_vs_model"],
                    0.05,
                    False,
                    matching_limit(m, biggest, "hnsw"),
                )
            )
        elif ext:
            rows.append(
                _row(
                    f"matching <= 5% of per-event model time at {size} (HNSW, extrapolated)",
                    ext["hnsw_vs_model"],
                    0.05,
                    False,
                    matching_limit(m, ext | {"vector_mb": biggest["vector_mb"]}, "hnsw"),
                )
            )
        rows.append(
            _row(
                f"matching <= 5% of per-event model time at {size} (exact scan, as shipped)",
                biggest["exact_vs_model"],
                0.05,
                False,
                matching_limit(m, biggest, "exact"),
            )
        )
    q = r.get("quality")
    if q:
        for alpha, row in q["test"].items():
            acc = row["exemplar"]["admitted_accuracy"]
            if acc is None:
                continue
            soft = row["softmax"]
            rows.append(
                _row(
                    f"exemplar admitted accuracy on test >= alpha {alpha}",
                    acc,
                    float(alpha),
                    True,
                    f"coverage {_pct(row['exemplar']['coverage'])} of {q['test_rows']} rows; "
                    f"thresholds chosen on {q['calibration_rows']} calibration rows with a "
                    f"one-sided Wilson bound at confidence {q['confidence']} (so a fresh split "
                    f"falls short about {1 - q['confidence']:.0%} of the time by design); the "
                    f"softmax baseline calibrated the same way: "
                    f"{_pct(soft.get('admitted_accuracy'))} at {_pct(soft['coverage'])} coverage",
                )
            )
    return rows
