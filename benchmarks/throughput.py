"""Figure 1: events per second through the daemon, next to the work it cannot avoid.

The same events (test + calib texts, cycled) go down several paths through the same
loaded predictor, in one process:

* **daemon** - the real loop: the events are put on the input topic of the embedded
  broker first (a backlog, so the consumer is never starved), then a ``PredictorWorker``
  runs in a thread: micro-batches of 64, forward + search + admission, send to the
  output topics, flush, commit. Rate = events after the first committed batch divided by
  the time from that batch to the last (group join and warm-up excluded). Every event is
  then checked to have landed in exactly one output topic.
* **bare** - ``Predictor.forward`` on the very same 64-event batches, tokenization
  included, with ``explain=True`` exactly as the daemon calls it.
* **daemon_noexplain** / **bare_noexplain** - the same without word contributions (a
  ``Predictor`` subclass passing ``explain=False``): the price of the explanations the
  daemon attaches to adjudication records.
* **daemon_1thread** / **bare_1thread** - the same with one torch thread instead of the
  default (the broker and the Kafka client threads share the cores with it).
* **naive** - one event at a time: poll one record, predict it, send one output and flush,
  commit that offset (the same adapters as the daemon); measured at the end, with the
  default thread count and with one thread.

The machine is shared, so the paths run in rounds over the same text segment, the order
rotated every round, and ratios are medians of per-round ratios (each pair measured
within minutes on identical texts). CPU per event (this process and its children, the
broker included) is recorded next to wall time: it does not inflate when other
processes take the cores. Per-stage seconds come from the worker's own stage histogram.

The compute side (peak matmul FLOP/s, achieved encoder FLOP/s) is in ``forward.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.common import BATCH, Context, batches, torch_threads, tree_cpu_seconds
from benchmarks.streaming import (
    RunningWorker,
    daemon_settings,
    output_ids,
    prepare_topics,
    produce_backlog,
    serve,
    wait_until,
)
from daemon.worker import adjudication_request, label_record
from model.predictor import BatchResult, Predictor
from streams.contracts import InputEvent, decode_event
from streams.kafka import BatchConsumer, OutputProducer, next_offsets


class NoExplainPredictor(Predictor):
    """The same predictor with word contributions switched off (measurement only)."""

    @classmethod
    def of(cls, p: Predictor) -> NoExplainPredictor:
        return cls(p.network, p.tokenizer, p.store, p.thresholds, p.version, p.batch_size)

    def predict(self, texts: Sequence[str], explain: bool = True) -> BatchResult:
        return super().predict(texts, explain=False)


def bare_forward(predictor: Predictor, texts: Sequence[str], explain: bool) -> dict[str, Any]:
    """``Predictor.forward`` over the daemon's 64-event batches; events/s."""
    chunks = batches(texts, BATCH)
    predictor.forward(chunks[0][:8], explain=explain)  # warm-up: first-call allocations
    started = time.perf_counter()
    for chunk in chunks:
        predictor.forward(chunk, explain=explain)
    seconds = time.perf_counter() - started
    return {"events": len(texts), "seconds": seconds, "eps": len(texts) / seconds}


def bare_predict(predictor: Predictor, texts: Sequence[str]) -> dict[str, Any]:
    """``Predictor.predict`` (forward + search + admission) on the same batches."""
    stages: dict[str, float] = {}
    started = time.perf_counter()
    for chunk in batches(texts, BATCH):
        for name, seconds in predictor.predict(chunk).timings.items():
            stages[name] = stages.get(name, 0.0) + seconds
    seconds = time.perf_counter() - started
    return {
        "events": len(texts),
        "seconds": seconds,
        "eps": len(texts) / seconds,
        "stage_ms_per_event": {k: 1000 * v / len(texts) for k, v in stages.items()},
    }


def run_daemon(
    predictor: Predictor,
    bootstrap: str,
    texts: Sequence[str],
    tag: str,
    timeout_s: float,
    session_ms: int = 6_000,
) -> dict[str, Any]:
    """The predictor loop over a backlog of ``texts``; events/s after the first batch."""
    kafka, topics = prepare_topics(bootstrap, tag, session_ms)
    produce_backlog(bootstrap, topics.input, texts, tag)
    n = len(texts)
    settings = daemon_settings(kafka, topics, max_size=BATCH)

    def watch(running: RunningWorker) -> tuple[float, int, float, int, dict[str, float]]:
        if not wait_until(lambda: running.worker.batches_done >= 1 or running.stopped(), timeout_s):
            raise RuntimeError(f"daemon {tag}: no batch within {timeout_s} s")
        t0, done0 = time.perf_counter(), running.processed()
        if (
            not wait_until(lambda: running.processed() >= n or running.stopped(), timeout_s, 0.005)
            or running.processed() < n
        ):
            raise RuntimeError(f"daemon {tag}: {running.processed()}/{n} in {timeout_s} s")
        t1 = time.perf_counter()
        return t0, done0, t1, running.worker.batches_done, running.stage_seconds()

    t0, done0, t1, batches_done, stages = serve(settings, predictor, watch)
    seen = output_ids(bootstrap, topics)
    wanted = {f"{tag}-{i}" for i in range(n)}
    eps = (n - done0) / (t1 - t0)
    return {
        "events": n,
        "measured_events": n - done0,
        "seconds": t1 - t0,
        "eps": eps,
        "batches": batches_done,
        "every_event_once": set(seen) >= wanted and all(seen[i] == 1 for i in wanted),
        "duplicates": sum(max(0, seen.get(i, 0) - 1) for i in wanted),
        "missing": len(wanted - set(seen)),
        # all n events, first batch included (stage sums cover every batch)
        "stage_ms_per_event": {k: 1000 * v / n for k, v in sorted(stages.items())},
        "wall_ms_per_event": 1000 / eps,
    }


def run_naive(
    predictor: Predictor,
    bootstrap: str,
    texts: Sequence[str],
    tag: str,
    timeout_s: float,
    session_ms: int = 6_000,
) -> dict[str, Any]:
    """Consume one, predict one, produce one + flush, commit one; events/s after the first."""
    kafka, topics = prepare_topics(bootstrap, tag, session_ms)
    produce_backlog(bootstrap, topics.input, texts, tag)
    consumer = BatchConsumer(kafka, [topics.input], group_id=kafka.group_id)
    producer = OutputProducer(kafka)
    done, t0 = 0, 0.0
    steps = dict.fromkeys(("poll", "predict", "produce_flush", "commit"), 0.0)
    deadline = time.monotonic() + timeout_s
    try:
        while done < len(texts):
            if time.monotonic() > deadline:
                raise RuntimeError(f"naive loop: {done}/{len(texts)} in {timeout_s} s")
            t = time.perf_counter()
            records = consumer.poll_batch(1, 0.5)
            if not records:
                continue
            t_polled = time.perf_counter()
            record = records[0]
            event = decode_event(
                record.value, record.key, record.topic, record.partition, record.offset, 20_000
            )
            assert isinstance(event, InputEvent)
            pred = predictor.predict([event.text]).predictions[0]
            t_predicted = time.perf_counter()
            if pred.admitted:
                producer.send(
                    topics.output, event.id, label_record(event, record, pred, predictor.version)
                )
            else:
                producer.send(
                    topics.adjudication,
                    event.id,
                    adjudication_request(event, record, pred, predictor.version),
                )
            producer.flush(kafka.request_timeout_ms / 1000)
            t_flushed = time.perf_counter()
            consumer.commit(next_offsets(records))
            done += 1
            if done == 1:
                t0 = time.perf_counter()
            else:  # steps of the measured events only, like the rate
                steps["poll"] += t_polled - t
                steps["predict"] += t_predicted - t_polled
                steps["produce_flush"] += t_flushed - t_predicted
                steps["commit"] += time.perf_counter() - t_flushed
        seconds = time.perf_counter() - t0
    finally:
        producer.close()
        consumer.close()
    measured = max(1, len(texts) - 1)
    return {
        "events": len(texts),
        "seconds": seconds,
        "eps": measured / seconds,
        "step_ms_per_event": {k: 1000 * v / measured for k, v in steps.items()},
    }


PATHS = ("bare", "daemon", "daemon_noexplain", "daemon_1thread", "bare_noexplain", "bare_1thread")


def run_path(
    path: str, predictor: Predictor, bootstrap: str, texts: Sequence[str], tag: str, session_ms: int
) -> dict[str, Any]:
    """One timed pass of ``texts`` down one path, with the CPU it cost (broker included)."""
    timeout = 60.0 + 2.0 * len(texts)
    cpu0 = tree_cpu_seconds()
    if path == "bare":
        result = bare_forward(predictor, texts, explain=True)
    elif path == "bare_noexplain":
        result = bare_forward(predictor, texts, explain=False)
    elif path == "bare_1thread":
        with torch_threads(1):
            result = bare_forward(predictor, texts, explain=True)
    elif path == "daemon":
        result = run_daemon(predictor, bootstrap, texts, tag, timeout, session_ms)
    elif path == "daemon_noexplain":
        result = run_daemon(
            NoExplainPredictor.of(predictor), bootstrap, texts, tag, timeout, session_ms
        )
    elif path == "daemon_1thread":
        with torch_threads(1):
            result = run_daemon(predictor, bootstrap, texts, tag, timeout, session_ms)
    else:
        raise ValueError(path)
    result["cpu_ms_per_event"] = 1000 * (tree_cpu_seconds() - cpu0) / len(texts)
    return result


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    measured = sum(r.get("measured_events", r["events"]) for r in runs)
    return {
        "eps": statistics.median(r["eps"] for r in runs),
        "eps_rounds": [r["eps"] for r in runs],
        "eps_pooled": measured / sum(r["seconds"] for r in runs),
        "cpu_ms_per_event": statistics.mean(r["cpu_ms_per_event"] for r in runs),
    }


def _daemon_detail(runs: list[dict[str, Any]]) -> dict[str, Any]:
    stages: dict[str, list[float]] = {}
    for r in runs:
        for k, v in r["stage_ms_per_event"].items():
            stages.setdefault(k, []).append(v)
    return {
        "every_event_once": all(r["every_event_once"] for r in runs),
        "missing": sum(r["missing"] for r in runs),
        "duplicates": sum(r["duplicates"] for r in runs),
        "batches": sum(r["batches"] for r in runs),
        "stage_ms_per_event": {k: statistics.mean(v) for k, v in sorted(stages.items())},
        "wall_ms_per_event": statistics.mean(r["wall_ms_per_event"] for r in runs),
    }


def _paired(runs: dict[str, list[dict[str, Any]]], a: str, b: str) -> float:
    """Median over rounds of eps(a) / eps(b), measured minutes apart on the same texts."""
    return statistics.median(x["eps"] / y["eps"] for x, y in zip(runs[a], runs[b], strict=True))


def measure(ctx: Context, predictor: Predictor, bootstrap: str) -> dict[str, Any]:
    """Rounds of the same texts down every path, the order rotated each round."""
    sizes = ctx.sizes
    texts = ctx.stream_texts(sizes.events)
    per_round = batches(texts, len(texts) // sizes.throughput_rounds)[: sizes.throughput_rounds]
    session = sizes.kafka_session_ms
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
    for r, segment in enumerate(per_round):
        order = PATHS[r % len(PATHS) :] + PATHS[: r % len(PATHS)]
        for path in order:
            runs[path].append(run_path(path, predictor, bootstrap, segment, f"{path}-{r}", session))
        ctx.say(
            f"throughput round {r + 1}/{len(per_round)} ({len(segment)} events): "
            + ", ".join(f"{p} {runs[p][-1]['eps']:.1f}" for p in PATHS)
            + " ev/s"
        )
    summary = {p: _summary(v) for p, v in runs.items()}
    predict = bare_predict(predictor, per_round[0])
    naive_texts = texts[: sizes.naive_events]
    naive_timeout = 60.0 + 5.0 * len(naive_texts)
    naive = run_naive(predictor, bootstrap, naive_texts, "naive", naive_timeout, session)
    with torch_threads(1):
        naive_1thread = run_naive(
            predictor, bootstrap, naive_texts, "naive1", naive_timeout, session
        )
    ctx.say(f"  naive {naive['eps']:.1f} ev/s, with 1 torch thread {naive_1thread['eps']:.1f}")
    daemon_eps, bare_eps = summary["daemon"]["eps"], summary["bare"]["eps"]
    ctx.shared["daemon_eps"] = daemon_eps
    return {
        "daemon_eps": daemon_eps,
        "bare_forward_eps": bare_eps,
        "naive_eps": naive["eps"],
        "daemon_vs_bare": _paired(runs, "daemon", "bare"),
        # bare CPU / daemon CPU per event: the ratio a dedicated machine would approach
        "daemon_vs_bare_cpu": summary["bare"]["cpu_ms_per_event"]
        / summary["daemon"]["cpu_ms_per_event"],
        "daemon_vs_naive": daemon_eps / naive["eps"],
        "bare_forward_noexplain_eps": summary["bare_noexplain"]["eps"],
        "daemon_noexplain_eps": summary["daemon_noexplain"]["eps"],
        "daemon_1thread_eps": summary["daemon_1thread"]["eps"],
        "explain_cost_bare": 1 - _paired(runs, "bare", "bare_noexplain"),
        "explain_cost_daemon": 1 - _paired(runs, "daemon", "daemon_noexplain"),
        "one_thread_vs_default_daemon": _paired(runs, "daemon_1thread", "daemon"),
        "bare_1thread_eps": summary["bare_1thread"]["eps"],
        "daemon_vs_bare_1thread": _paired(runs, "daemon_1thread", "bare_1thread"),
        "naive_1thread_eps": naive_1thread["eps"],
        "daemon_vs_naive_1thread": summary["daemon_1thread"]["eps"] / naive_1thread["eps"],
        "torch_threads_default": torch.get_num_threads(),
        "paths": summary,
        "bare_predict_eps": predict["eps"],
        "bare_predict_stage_ms_per_event": predict["stage_ms_per_event"],
        "events": len(texts),
        "rounds": len(per_round),
        "events_per_round": len(per_round[0]),
        "naive_events": len(naive_texts),
        "batch_size": BATCH,
        "support_set": ctx.shared.get("daemon_support_size"),
        "daemon": _daemon_detail(runs["daemon"]),
        "daemon_1thread": _daemon_detail(runs["daemon_1thread"]),
        "naive": naive,
        "naive_1thread": naive_1thread,
    }
