"""Figure 2: end-to-end latency at 25%, 50% and 90% of the daemon's measured maximum.

One ``PredictorWorker`` runs on the benchmark process's main thread (as in figure 1 and
as ``exemplar run`` does, with the same predictor, batch ``max_size`` 64 and
``max_wait_ms`` at its default). A *load generator* subprocess - so its Python work does not share
the worker's GIL, as a real client would not - runs the levels one after the other,
doing two things at once in each:

* a producer sends events at a constant rate (open loop: the schedule does not wait for
  answers), stamping each with the wall-clock time just before ``send``;
* a consumer assigned to the labels, adjudication and dead-letter topics records the
  wall-clock arrival of every output record, keyed by event id.

Latency = arrival - send, per event; p50/p95/p99 over every event of the level (about
``latency_seconds`` of load each; a level ends when every output arrived, so the next
starts on an idle daemon). Both timestamps come from the same machine clock. Beside it,
from the worker's own histograms read when the load generator marks a level's start and
end on its stdout: the mean micro-batch size, and the mean time from a record's
timestamp (set by the producer) to its batch's commit - the daemon's share of the
latency; the rest is delivery of the output to the consumer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks.common import BATCH, Context, percentiles
from benchmarks.streaming import (
    RunningWorker,
    caught_up,
    daemon_settings,
    event_value,
    prepare_topics,
    produce_backlog,
    serve,
    wait_until,
)
from daemon.config import BatchConfig

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

#: the daemon's default ``EXEMPLAR_BATCH__MAX_WAIT_MS``
MAX_WAIT_MS = BatchConfig().max_wait_ms


def _worker_sums(running: RunningWorker) -> dict[str, float]:
    """Running sums and counts of the worker's batch-size and event-latency histograms."""
    registry = running.metrics.registry
    return {
        f"{name}_{part}": registry.get_sample_value(f"exemplar_{name}_{part}") or 0.0
        for name in ("batch_size", "event_latency_seconds")
        for part in ("sum", "count")
    }


def measure(ctx: Context, predictor: Any, bootstrap: str, max_eps: float) -> dict[str, Any]:
    kafka, topics = prepare_topics(bootstrap, "latency", ctx.sizes.kafka_session_ms)
    texts = ctx.stream_texts(max(BATCH, int(max_eps * ctx.sizes.latency_seconds) + BATCH))
    texts_file = ctx.work_dir / "latency-texts.json"
    texts_file.write_text(json.dumps(texts))
    settings = daemon_settings(kafka, topics, max_size=BATCH, max_wait_ms=MAX_WAIT_MS)
    fractions = ctx.sizes.latency_fractions
    rates = [f * max_eps for f in fractions]
    command = [
        sys.executable,
        "-m",
        "benchmarks.latency",
        "--bootstrap",
        bootstrap,
        "--input",
        topics.input,
        "--outputs",
        f"{topics.output},{topics.adjudication},{topics.dead_letter}",
        "--rates",
        ",".join(f"{r:.3f}" for r in rates),
        "--seconds",
        str(ctx.sizes.latency_seconds),
        "--texts",
        str(texts_file),
    ]

    def driver(running: RunningWorker) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        produce_backlog(bootstrap, topics.input, texts[:16], "warmup")
        if not wait_until(lambda: running.processed() >= 16 or running.stopped(), 120):
            raise RuntimeError("latency: the worker did not start")
        return _drive(ctx, running, command)

    levels, worker = serve(settings, predictor, driver)
    for level, fraction, rate, inside in zip(levels, fractions, rates, worker, strict=True):
        level.update({"fraction_of_max": fraction, "target_eps": rate, **inside})
        ctx.say(
            f"latency at {fraction:.0%} ({rate:.1f} ev/s): p50 {level['p50_ms']:.0f} "
            f"p95 {level['p95_ms']:.0f} p99 {level['p99_ms']:.0f} ms, batch "
            f"{level['mean_batch_size'] or 0:.1f}"
        )
    return {
        "max_eps": max_eps,
        "batch_max_size": BATCH,
        "batch_max_wait_ms": MAX_WAIT_MS,
        "levels": levels,
    }


def _drive(
    ctx: Context, running: RunningWorker, command: list[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run the load generator; per level, the worker's mean batch size and mean latency
    from a record's timestamp to its batch's commit (histogram sums at the level marks)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    log = ctx.work_dir / "loadgen.log"
    marks: dict[str, dict[str, float]] = {}
    with log.open("w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        assert proc.stdout is not None
        result: dict[str, Any] | None = None
        for line in proc.stdout:
            if line.startswith("mark "):
                marks[line.split()[1]] = _worker_sums(running)
            elif line.startswith("{"):
                result = json.loads(line)
        code = proc.wait(timeout=60)
    if code != 0 or result is None:
        raise RuntimeError(f"load generator failed ({code}):\n{log.read_text()[-3000:]}")
    inside = []
    for i in range(len(result["levels"])):
        a, b = marks[f"start-{i}"], marks[f"end-{i}"]
        d = {k: b[k] - a[k] for k in a}
        batches, events = d["batch_size_count"], d["event_latency_seconds_count"]
        inside.append(
            {
                "mean_batch_size": d["batch_size_sum"] / batches if batches else None,
                "daemon_mean_ms": 1000 * d["event_latency_seconds_sum"] / events
                if events
                else None,
            }
        )
    return result["levels"], inside


# --- the load generator (runs in its own process) ----------------------------------------


def loadgen(
    bootstrap: str,
    input_topic: str,
    outputs: list[str],
    rates: list[float],
    seconds: float,
    texts: list[str],
) -> dict[str, Any]:
    """Every level in turn: send at ``rate`` for ``seconds``, wait for every output."""
    arrivals: dict[str, float] = {}
    ready = threading.Event()
    stop = threading.Event()

    def consume() -> None:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20
        )
        consumer.topics()
        parts = [
            TopicPartition(t, p) for t in outputs for p in (consumer.partitions_for_topic(t) or [])
        ]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)  # ListOffsets LATEST is wrong on Tansu
        try:
            while not stop.is_set():
                polled = consumer.poll(timeout_ms=20)
                now = time.time()
                if not ready.is_set() and caught_up(consumer, parts):
                    ready.set()
                for batch in polled.values():
                    for record in batch:
                        if record.key:
                            arrivals.setdefault(record.key.decode(), now)
        finally:
            consumer.close()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    ready.wait(60)  # earlier records (the warm-up) are skipped before the clock starts
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    levels = []
    for level, rate in enumerate(rates):
        n = max(1, int(rate * seconds))
        sent: dict[str, float] = {}
        _mark(f"start-{level}")
        start = time.time()
        for i in range(n):
            delay = start + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
            key = f"l{level}-{i}"
            sent[key] = time.time()
            producer.send(
                input_topic, key=key.encode(), value=event_value(key, texts[i % len(texts)])
            )
        producer.flush(30)
        send_seconds = time.time() - start
        deadline = time.time() + max(60.0, 4 * seconds)
        while any(k not in arrivals for k in sent) and time.time() < deadline:
            time.sleep(0.02)
        _mark(f"end-{level}")
        latencies = [1000 * (arrivals[k] - t) for k, t in sent.items() if k in arrivals]
        stats = percentiles(latencies)
        levels.append(
            {
                "sent": n,
                "received": len(latencies),
                "achieved_send_eps": n / send_seconds,
                "p50_ms": stats["p50"],
                "p95_ms": stats["p95"],
                "p99_ms": stats["p99"],
                "mean_ms": sum(latencies) / len(latencies) if latencies else float("nan"),
                "max_ms": max(latencies) if latencies else float("nan"),
            }
        )
    stop.set()
    thread.join(10)
    producer.close()
    return {"levels": levels}


def _mark(name: str) -> None:
    sys.stdout.write(f"mark {name}\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="latency load generator (used by benchmarks.run)")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--outputs", required=True)
    p.add_argument("--rates", required=True, help="comma-separated events/s, one per level")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--texts", type=Path, required=True)
    a = p.parse_args(argv)
    result = loadgen(
        a.bootstrap,
        a.input,
        a.outputs.split(","),
        [float(r) for r in a.rates.split(",")],
        a.seconds,
        json.loads(a.texts.read_text()),
    )
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
