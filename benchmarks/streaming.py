"""Kafka plumbing the throughput and latency figures share: settings, events, a worker thread.

Everything runs against the real embedded Tansu broker, on fresh topics of one partition
each (the consumer then reads events in the order they were produced). Client timings
are shorter than production defaults (a Tansu group join takes about session_timeout/2)
but long enough that a busy 2-core machine does not miss heartbeats.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from prometheus_client import CollectorRegistry

from daemon.config import BatchConfig, MetricsConfig, Settings
from daemon.metrics import DaemonMetrics
from daemon.retry import Backoff
from daemon.worker import PredictorWorker, RunState
from model.predictor import Predictor
from streams.config import KafkaConfig, TopicsConfig
from streams.kafka import ensure_topics

T = TypeVar("T")

with warnings.catch_warnings():
    # kafka-python reads its protocol schemas through deprecated importlib.resources calls.
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

BENCH_KAFKA: dict[str, Any] = {
    "request_timeout_ms": 10_000,
    "bootstrap_timeout_ms": 10_000,
    "session_timeout_ms": 6_000,
    "heartbeat_interval_ms": 1_000,
    "max_poll_interval_ms": 120_000,
    "delivery_timeout_ms": 30_000,
    "max_block_ms": 10_000,
    "linger_ms": 0,
}


def kafka_config(bootstrap: str, tag: str, session_ms: int = 6_000) -> KafkaConfig:
    """Client settings; ``session_ms`` sets the group session (heartbeat a third of it)."""
    timings = {
        **BENCH_KAFKA,
        "session_timeout_ms": session_ms,
        "heartbeat_interval_ms": session_ms // 3,
    }
    return KafkaConfig(
        bootstrap_servers=bootstrap, group_id=f"bench-{tag}-{uuid.uuid4().hex[:6]}", **timings
    )


def fresh_topics(tag: str) -> TopicsConfig:
    """New topics with one partition: the consumer reads the input in the order produced."""
    suffix = f"{tag}-{uuid.uuid4().hex[:6]}"
    names = {role: f"bench-{suffix}-{role.replace('_', '-')}" for role in TopicsConfig().by_role()}
    return TopicsConfig.model_validate({**names, "partitions": 1})


def daemon_settings(
    kafka: KafkaConfig, topics: TopicsConfig, max_size: int = 64, max_wait_ms: int = 100
) -> Settings:
    return Settings(
        model_dir=Path("unused"),
        kafka=kafka,
        topics=topics,
        batch=BatchConfig(max_size=max_size, max_wait_ms=max_wait_ms),
        metrics=MetricsConfig(enabled=False),
    )


def event_value(event_id: str, text: str) -> bytes:
    return json.dumps({"id": event_id, "text": text}).encode()


def produce_backlog(bootstrap: str, topic: str, texts: Sequence[str], prefix: str) -> None:
    """Put every event on the input topic before the consumer starts (saturating load)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    for i, text in enumerate(texts):
        producer.send(topic, key=f"{prefix}-{i}".encode(), value=event_value(f"{prefix}-{i}", text))
    producer.flush(60)
    producer.close()


def caught_up(consumer: Any, parts: Sequence[Any]) -> bool:
    """Every assigned partition read up to its high watermark (known after a fetch)."""
    for tp in parts:
        high = consumer.highwater(tp)
        if high is None or consumer.position(tp) < high:
            return False
    return True


def output_ids(bootstrap: str, topics: TopicsConfig, timeout_s: float = 60.0) -> dict[str, int]:
    """event id -> how many output records (labels, adjudication, dead letters) carry it.

    Reads every output partition up to its high watermark: called after the worker
    stopped, whose outputs were all acknowledged before it committed.
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        consumer.topics()
        parts = [
            TopicPartition(t, p)
            for t in (topics.output, topics.adjudication, topics.dead_letter)
            for p in (consumer.partitions_for_topic(t) or [])
        ]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)  # ListOffsets LATEST is wrong on Tansu
        counts: dict[str, int] = {}
        deadline = time.monotonic() + timeout_s
        while True:
            for batch in consumer.poll(timeout_ms=100).values():
                for record in batch:
                    key = record.key.decode() if record.key else ""
                    counts[key] = counts.get(key, 0) + 1
            if caught_up(consumer, parts):
                return counts
            if time.monotonic() > deadline:
                raise RuntimeError(f"output topics not read to their end in {timeout_s} s")
    finally:
        consumer.close()


@dataclass
class RunningWorker:
    worker: PredictorWorker
    metrics: DaemonMetrics

    def processed(self) -> int:
        t = self.worker.totals
        return t.admitted + t.adjudication + t.dead_letter

    def stopped(self) -> bool:
        return self.worker.state == RunState.STOPPED

    def stage_seconds(self) -> dict[str, float]:
        """Total seconds per stage, from the worker's own stage histogram."""
        out: dict[str, float] = {}
        for family in self.metrics.registry.collect():
            if family.name != "exemplar_stage_duration_seconds":
                continue
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    out[sample.labels["stage"]] = sample.value
        return out


def serve(settings: Settings, predictor: Predictor, driver: Callable[[RunningWorker], T]) -> T:
    """Run a ``PredictorWorker`` on *this* thread, as ``exemplar run`` does, while
    ``driver`` watches it from another thread; the worker stops when the driver returns.

    The thread matters: torch's intra-op thread team behaves differently on the main
    thread than on a secondary one when the cores are oversubscribed, so the daemon is
    measured where production runs it.
    """
    metrics = DaemonMetrics.create(CollectorRegistry())
    worker = PredictorWorker(
        settings, predictor, metrics, backoff=Backoff(initial_s=0.1, maximum_s=1.0)
    )
    running = RunningWorker(worker, metrics)
    outcome: dict[str, Any] = {}

    def drive() -> None:
        try:
            outcome["value"] = driver(running)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread below
            outcome["error"] = exc
        finally:
            worker.request_stop()

    thread = threading.Thread(target=drive, name="bench-driver", daemon=True)
    thread.start()
    try:
        worker.run()
    finally:
        worker.request_stop()
        thread.join(120)
    if "error" in outcome:
        raise outcome["error"]
    if "value" not in outcome:
        raise RuntimeError("the benchmark driver did not finish")
    return cast(T, outcome["value"])


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def prepare_topics(
    bootstrap: str, tag: str, session_ms: int = 6_000
) -> tuple[KafkaConfig, TopicsConfig]:
    kafka = kafka_config(bootstrap, tag, session_ms)
    topics = fresh_topics(tag)
    ensure_topics(kafka, topics)
    return kafka, topics
