"""Figure 1: events per second through the daemon, next to the work it cannot avoid.

Every path below processes the same events (one segment of test + calib texts per
round) with the same loaded predictor, whose forward pass runs in length-sorted chunks of
``batch.forward_size`` as the product ships it. The input topics have one partition, so
the daemon's micro-batches are exactly the consecutive 64-event batches the bare path
gets. On every path the first micro-batch (64 events) is a warm-up and is not timed, so
the timed events are the same on every path:

* **bare** - ``Predictor.forward(batch, explain=True)``, tokenization included, on the
  segment's 64-event batches: the model work the daemon cannot avoid (issue baseline a).
* **bare_noexplain** - the same with ``explain=False``: the price of the word
  contributions the daemon attaches to adjudication records.
* **daemon** - the real loop: the segment is put on the input topic of the embedded
  broker first (a backlog, so the consumer is never starved), then a ``PredictorWorker``
  runs as ``exemplar run`` does (micro-batches of 64, forward + search + admission, send,
  flush, commit). Rate = events after the first committed batch / time from that commit
  to the last. Every event is then checked to have landed in exactly one output topic.
* **daemon_1thread** - the daemon with one torch thread instead of torch's default.
* **daemon_bf16** - the daemon with the encoder's weights in bfloat16 and the exemplar
  head in float32 (``forward.build_network("bf16_encoder")``; its accuracy cost is in
  figure 1b). Not the product: a candidate, measured end to end.
* **naive** - one event at a time (issue baseline b): poll one record, decode it,
  ``Predictor.predict`` it alone (forward + search + admission), send its output and wait
  for the acknowledgement (flush), commit its offset; the same adapters as the daemon.

The machine is shared, so one run's absolute rate says little. Each round therefore runs
the bare path before the first other path and again after every other path (order
rotated each round); a path's speed in a round is taken relative to the mean per-event
time of the two bare runs that bracket it, which cancels slow drift in the machine's
load. Ratios between paths are ratios of these relative speeds, per round; the report
gives their median over rounds and their range, and calls a difference only when every
round agrees on its sign. CPU time (this process and its children, the broker included)
is read over each timed window too. Per-stage times come from the worker's own stage
histogram over the same window.

The compute side (peak matmul FLOP/s, achieved FLOP/s, forward-pass variants) is in
``forward.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks.common import BATCH, Context, batches, torch_threads, tree_cpu_seconds
from benchmarks.forward import build_network
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
from model.predictor import Predictor
from streams.contracts import InputEvent, decode_event
from streams.kafka import BatchConsumer, OutputProducer, next_offsets

REFERENCE = "bare"
#: every path but the reference, in the order of the first round
OTHERS = ("daemon", "naive", "bare_noexplain", "daemon_1thread", "daemon_bf16")
PATHS = (REFERENCE, *OTHERS)


def _timed(events: int, seconds: float, cpu_seconds: float) -> dict[str, Any]:
    return {
        "measured_events": events,
        "seconds": seconds,
        "eps": events / seconds,
        "cpu_ms_per_event": 1000 * cpu_seconds / events,
    }


def bare_forward(predictor: Predictor, texts: Sequence[str], explain: bool) -> dict[str, Any]:
    """``Predictor.forward`` over 64-event batches; the first batch is an untimed warm-up."""
    first, *rest = batches(texts, BATCH)
    predictor.forward(first, explain=explain)
    if not rest:
        raise ValueError("bare_forward needs at least two batches")
    cpu0, started = tree_cpu_seconds(), time.perf_counter()
    for chunk in rest:
        predictor.forward(chunk, explain=explain)
    seconds = time.perf_counter() - started
    return _timed(sum(len(c) for c in rest), seconds, tree_cpu_seconds() - cpu0)


def run_daemon(
    predictor: Predictor,
    bootstrap: str,
    texts: Sequence[str],
    tag: str,
    timeout_s: float,
    session_ms: int = 6_000,
) -> dict[str, Any]:
    """The predictor loop over a backlog of ``texts``; timed from the first commit."""
    kafka, topics = prepare_topics(bootstrap, tag, session_ms)
    produce_backlog(bootstrap, topics.input, texts, tag)
    n = len(texts)
    settings = daemon_settings(kafka, topics, max_size=BATCH)

    def watch(running: RunningWorker) -> dict[str, Any]:
        if not wait_until(
            lambda: running.worker.batches_done >= 1 or running.stopped(), timeout_s, 0.005
        ):
            raise RuntimeError(f"daemon {tag}: no batch within {timeout_s} s")
        t0, cpu0, done0 = time.perf_counter(), tree_cpu_seconds(), running.processed()
        stages0, batches0 = running.stage_seconds(), running.worker.batches_done
        if (
            not wait_until(lambda: running.processed() >= n or running.stopped(), timeout_s, 0.005)
            or running.processed() < n
        ):
            raise RuntimeError(f"daemon {tag}: {running.processed()}/{n} in {timeout_s} s")
        t1, cpu1 = time.perf_counter(), tree_cpu_seconds()
        stages = {k: v - stages0.get(k, 0.0) for k, v in running.stage_seconds().items()}
        measured = n - done0
        return {
            **_timed(measured, t1 - t0, cpu1 - cpu0),
            "batches": running.worker.batches_done,
            "measured_batches": running.worker.batches_done - batches0,
            "stage_ms_per_event": {k: 1000 * v / measured for k, v in sorted(stages.items())},
        }

    result = serve(settings, predictor, watch)
    seen = output_ids(bootstrap, topics)
    wanted = {f"{tag}-{i}" for i in range(n)}
    result.update(
        every_event_once=set(seen) >= wanted and all(seen[i] == 1 for i in wanted),
        duplicates=sum(max(0, seen.get(i, 0) - 1) for i in wanted),
        missing=len(wanted - set(seen)),
    )
    return result


def run_naive(
    predictor: Predictor,
    bootstrap: str,
    texts: Sequence[str],
    tag: str,
    timeout_s: float,
    session_ms: int = 6_000,
) -> dict[str, Any]:
    """Consume one, predict one, produce one + wait for the ack, commit one.

    The first ``BATCH`` events are an untimed warm-up, as on the other paths.
    """
    kafka, topics = prepare_topics(bootstrap, tag, session_ms)
    produce_backlog(bootstrap, topics.input, texts, tag)
    consumer = BatchConsumer(kafka, [topics.input], group_id=kafka.group_id)
    producer = OutputProducer(kafka)
    warmup = min(BATCH, len(texts) - 1)
    done, t0, cpu0 = 0, 0.0, 0.0
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
            if not isinstance(event, InputEvent):
                raise RuntimeError(f"naive loop: undecodable benchmark event {record.offset}")
            pred = predictor.predict([event.text]).predictions[0]
            t_predicted = time.perf_counter()
            if pred.admitted:
                message: Any = label_record(event, record, pred, predictor.version)
                producer.send(topics.output, event.id, message)
            else:
                message = adjudication_request(event, record, pred, predictor.version)
                producer.send(topics.adjudication, event.id, message)
            producer.flush(kafka.request_timeout_ms / 1000)
            t_flushed = time.perf_counter()
            consumer.commit(next_offsets(records))
            done += 1
            if done == warmup:
                t0, cpu0 = time.perf_counter(), tree_cpu_seconds()
            elif done > warmup:
                steps["poll"] += t_polled - t
                steps["predict"] += t_predicted - t_polled
                steps["produce_flush"] += t_flushed - t_predicted
                steps["commit"] += time.perf_counter() - t_flushed
        seconds, cpu = time.perf_counter() - t0, tree_cpu_seconds() - cpu0
    finally:
        producer.close()
        consumer.close()
    measured = len(texts) - warmup
    return {
        **_timed(measured, seconds, cpu),
        "step_ms_per_event": {k: 1000 * v / measured for k, v in steps.items()},
    }


def path_runners(
    predictor: Predictor, bootstrap: str, session_ms: int
) -> dict[str, Callable[[Sequence[str], str], dict[str, Any]]]:
    """One callable per path: ``(texts, tag) -> timed result``."""
    bf16 = Predictor(
        build_network(predictor.network, "bf16_encoder"),
        predictor.tokenizer,
        predictor.store,
        predictor.thresholds,
        predictor.version,
        batch_size=predictor.batch_size,
    )

    def timeout(texts: Sequence[str]) -> float:
        return 60.0 + 2.0 * len(texts)

    def daemon(p: Predictor, threads: int | None = None) -> Callable[..., dict[str, Any]]:
        def run(texts: Sequence[str], tag: str) -> dict[str, Any]:
            with torch_threads(threads):
                return run_daemon(p, bootstrap, texts, tag, timeout(texts), session_ms)

        return run

    return {
        "bare": lambda texts, _tag: bare_forward(predictor, texts, explain=True),
        "bare_noexplain": lambda texts, _tag: bare_forward(predictor, texts, explain=False),
        "daemon": daemon(predictor),
        "daemon_1thread": daemon(predictor, threads=1),
        "daemon_bf16": daemon(bf16),
        "naive": lambda texts, tag: run_naive(
            predictor, bootstrap, texts, tag, 60.0 + 5.0 * len(texts), session_ms
        ),
    }


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, range and every value of a per-round quantity."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "rounds": list(values),
    }


def measure(ctx: Context, predictor: Predictor, bootstrap: str) -> dict[str, Any]:
    """Rounds over fresh segments of the stream; the bare path brackets every other path."""
    sizes = ctx.sizes
    per_round = sizes.throughput_events // sizes.throughput_rounds
    if per_round % BATCH or per_round < 2 * BATCH:
        raise ValueError(f"events per round ({per_round}) must be a multiple of {BATCH}, >= 2x")
    texts = ctx.stream_texts(per_round * sizes.throughput_rounds)
    segments = batches(texts, per_round)
    runners = path_runners(predictor, bootstrap, sizes.kafka_session_ms)
    predictor.predict(texts[:BATCH])  # page the store in before the first round
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
    relative: dict[str, list[float]] = {p: [] for p in OTHERS}
    for r, segment in enumerate(segments):
        order = OTHERS[r % len(OTHERS) :] + OTHERS[: r % len(OTHERS)]
        before = runners[REFERENCE](segment, f"{REFERENCE}-{r}-0")
        runs[REFERENCE].append(before)
        for i, path in enumerate(order):
            result = runners[path](segment, f"{path}-{r}")
            after = runners[REFERENCE](segment, f"{REFERENCE}-{r}-{i + 1}")
            runs[path].append(result)
            runs[REFERENCE].append(after)
            # bare's speed at the time: the mean per-event time of the bracketing runs
            bare_eps = 2 / (1 / before["eps"] + 1 / after["eps"])
            relative[path].append(result["eps"] / bare_eps)
            before = after
        ctx.say(
            f"throughput round {r + 1}/{len(segments)} ({len(segment)} events, "
            f"{len(segment) - BATCH} timed): bare {runs[REFERENCE][-1]['eps']:.1f} ev/s; "
            + ", ".join(f"{p} {relative[p][-1]:.2f}x" for p in OTHERS)
        )

    def ratio(a: str, b: str | None = None) -> dict[str, Any]:
        """Per-round speed of path ``a`` over path ``b`` (default: the bare forward)."""
        if b is None:
            return spread(relative[a])
        return spread([x / y for x, y in zip(relative[a], relative[b], strict=True)])

    summary = {
        p: {
            "eps": statistics.median(r["eps"] for r in v),
            "eps_runs": [r["eps"] for r in v],
            "cpu_ms_per_event": statistics.median(r["cpu_ms_per_event"] for r in v),
            "vs_bare": ratio(p) if p in relative else None,
        }
        for p, v in runs.items()
    }
    ratios = {
        "daemon_vs_bare": ratio("daemon"),
        "daemon_vs_naive": ratio("daemon", "naive"),
        "bare_noexplain_vs_bare": ratio("bare_noexplain"),
        "daemon_1thread_vs_daemon": ratio("daemon_1thread", "daemon"),
        "daemon_bf16_vs_daemon": ratio("daemon_bf16", "daemon"),
    }
    daemon_eps = summary["daemon"]["eps"]
    ctx.shared["daemon_eps"] = daemon_eps
    ctx.say(
        f"  daemon / bare {ratios['daemon_vs_bare']['median']:.3f}, daemon / naive "
        f"{ratios['daemon_vs_naive']['median']:.2f} (medians over {len(segments)} rounds)"
    )
    return {
        "daemon_eps": daemon_eps,
        "bare_forward_eps": summary["bare"]["eps"],
        "naive_eps": summary["naive"]["eps"],
        "daemon_vs_bare": ratios["daemon_vs_bare"]["median"],
        "daemon_vs_naive": ratios["daemon_vs_naive"]["median"],
        "ratios": ratios,
        "paths": summary,
        "daemon": _daemon_detail(runs["daemon"]),
        "daemon_1thread": _daemon_detail(runs["daemon_1thread"]),
        "daemon_bf16": _daemon_detail(runs["daemon_bf16"]),
        "naive": {
            "step_ms_per_event": _mean_of(r["step_ms_per_event"] for r in runs["naive"]),
        },
        "rounds": len(segments),
        "events_per_round": per_round,
        "timed_events_per_round": per_round - BATCH,
        "batch_size": BATCH,
        "forward_size": predictor.batch_size,
        "torch_threads_default": torch.get_num_threads(),
        "support_set": ctx.shared.get("daemon_support_size"),
    }


def _mean_of(dicts: Any) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for d in dicts:
        for k, v in d.items():
            values.setdefault(k, []).append(v)
    return {k: statistics.mean(v) for k, v in sorted(values.items())}


def _daemon_detail(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "every_event_once": all(r["every_event_once"] for r in runs),
        "missing": sum(r["missing"] for r in runs),
        "duplicates": sum(r["duplicates"] for r in runs),
        "batches": sum(r["batches"] for r in runs),
        "measured_batches": sum(r["measured_batches"] for r in runs),
        "measured_events": sum(r["measured_events"] for r in runs),
        "stage_ms_per_event": _mean_of(r["stage_ms_per_event"] for r in runs),
        "wall_ms_per_event": statistics.mean(1000 / r["eps"] for r in runs),
    }
