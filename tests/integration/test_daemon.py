"""The streaming predictor against a real Kafka-protocol broker (Tansu) and the real store.

Covers: routing to the three topics with schema-valid messages; two predictors in one
group; kill -9 and restart losing nothing; a broker that appears late; SIGTERM
mid-stream committing what was processed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from daemon.app import load
from daemon.config import Settings
from daemon.metrics import DaemonMetrics
from daemon.retry import Backoff
from daemon.worker import PredictorWorker, RunState
from streams.broker import EmbeddedBroker
from streams.config import KafkaConfig, TopicsConfig
from streams.kafka import TopicFollower, ensure_topics
from tests.conftest import FAST_KAFKA
from tests.model_fixtures import copy_bundle

SCHEMAS = Path(__file__).resolve().parents[2] / "streams" / "schemas"
OUTPUT_ROLES = ("output", "adjudication", "dead_letter")


def produce(bootstrap: str, topic: str, values: list[tuple[bytes | None, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    for key, value in values:
        producer.send(topic, key=key, value=value)
    producer.flush(10)
    producer.close()


def read_topic(bootstrap: str, topic: str, expect: int, timeout_s: float = 30.0) -> list[Any]:
    """All records of ``topic`` (no group): until ``expect`` arrived, or (``expect=0``)
    until the topic goes quiet."""
    follower = TopicFollower(KafkaConfig(bootstrap_servers=bootstrap), topic)
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    idle_polls = 0
    try:
        while time.monotonic() < deadline and (expect == 0 or len(records) < expect):
            polled = follower.poll(0.3)
            records.extend(polled)
            idle_polls = 0 if polled else idle_polls + 1
            if expect == 0 and idle_polls >= 2:
                break  # read everything there is
    finally:
        follower.close()
    return records


def outputs_by_id(
    bootstrap: str, topics: TopicsConfig, expect: int, timeout_s: float = 60.0
) -> dict[str, set[str]]:
    """event id -> the set of output roles it appeared in (waits for ``expect`` ids)."""
    deadline = time.monotonic() + timeout_s
    seen: dict[str, set[str]] = {}
    while time.monotonic() < deadline:
        seen = {}
        for role in OUTPUT_ROLES:
            for record in read_topic(bootstrap, getattr(topics, role), 0, timeout_s=1.5):
                seen.setdefault(json.loads(record.value)["id"], set()).add(role)
        if len(seen) >= expect:
            break
        time.sleep(0.5)
    return seen


def settings_for(bundle: Path, kafka: KafkaConfig, topics: TopicsConfig, **batch: Any) -> Settings:
    return Settings(
        model_dir=bundle,
        kafka=kafka,
        topics=topics,
        batch={"max_size": 16, "max_wait_ms": 100, **batch},
        metrics={"enabled": False},
    )


@pytest.fixture
def start_worker(
    tmp_path: Path, tiny_bundle: Path
) -> Iterator[Callable[[Settings], PredictorWorker]]:
    started: list[tuple[PredictorWorker, threading.Thread, Any]] = []

    def start(settings: Settings) -> PredictorWorker:
        private = copy_bundle(tiny_bundle, tmp_path / f"bundle-{len(started)}")
        loaded = load(settings, str(private), batch_size=16)
        worker = PredictorWorker(
            settings,
            loaded.predictor,
            DaemonMetrics.create(CollectorRegistry()),
            backoff=Backoff(initial_s=0.1, maximum_s=0.5),
        )
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        started.append((worker, thread, loaded))
        return worker

    yield start
    for worker, thread, loaded in started:
        worker.request_stop()
        thread.join(30)
        loaded.close()


GOOD_TEXTS = [
    "The film was wonderful and charming.",
    "The script was dreadful and boring.",
    "The cast was average and routine.",
    "Une phrase qui ne ressemble à rien.",
]


def good_events(n: int, prefix: str) -> list[tuple[bytes | None, bytes]]:
    return [
        (
            f"{prefix}-{i}".encode(),
            json.dumps(
                {"id": f"{prefix}-{i}", "text": GOOD_TEXTS[i % len(GOOD_TEXTS)], "meta": {"i": i}}
            ).encode(),
        )
        for i in range(n)
    ]


MALFORMED: list[tuple[bytes | None, bytes]] = [
    (b"bad-1", b"not json at all"),
    (b"bad-2", b"\xff\xfe\x00garbage"),
    (b"bad-3", json.dumps({"id": "bad-3", "meta": {}}).encode()),
    (b"bad-4", json.dumps({"id": "bad-4", "text": ""}).encode()),
    (b"bad-5", json.dumps({"id": "bad-5", "text": 42}).encode()),
    (b"bad-6", json.dumps({"id": "bad-6", "text": "x" * 30_000}).encode()),
    (b"bad-7", json.dumps(["a", "list"]).encode()),
]


def test_every_event_lands_in_exactly_one_topic_with_valid_messages(
    kafka_broker: str,
    kafka_config: KafkaConfig,
    unique_topics: TopicsConfig,
    start_worker: Callable[[Settings], PredictorWorker],
) -> None:
    settings = settings_for(Path("unused"), kafka_config, unique_topics)
    ensure_topics(kafka_config, unique_topics)
    produce(kafka_broker, unique_topics.input, good_events(40, "ev") + MALFORMED)
    worker = start_worker(settings)
    seen = outputs_by_id(kafka_broker, unique_topics, expect=47)
    assert worker.state == RunState.RUNNING
    # ids of malformed records without a readable id are derived from topic:partition:offset
    assert len(seen) == 47, sorted(seen)
    assert all(len(roles) == 1 for roles in seen.values())
    for i in range(40):
        assert seen[f"ev-{i}"] <= {"output", "adjudication"}
    dead = [i for i, roles in seen.items() if roles == {"dead_letter"}]
    assert len(dead) == len(MALFORMED)

    contract = {
        "output": "label_record",
        "adjudication": "adjudication_request",
        "dead_letter": "dead_letter",
    }
    reasons = set()
    for role, name in contract.items():
        schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
        for record in read_topic(kafka_broker, getattr(unique_topics, role), 0, 3):
            message = json.loads(record.value)
            jsonschema.validate(message, schema)
            assert record.key.decode() == message["id"]
            if role == "dead_letter":
                reasons.add(message["reason"])
            if role == "adjudication":
                assert message["reasons"] and message["nearest"] and message["contributions"]
    assert len(reasons) >= 5  # distinct reason codes for distinct faults


def test_two_predictors_split_the_partitions(
    kafka_broker: str,
    make_kafka_config: Callable[..., KafkaConfig],
    make_topics: Callable[..., TopicsConfig],
    start_worker: Callable[[Settings], PredictorWorker],
) -> None:
    topics = make_topics(partitions=4)
    kafka = make_kafka_config(kafka_broker)
    ensure_topics(kafka, topics)
    settings = settings_for(Path("unused"), kafka, topics)
    first, second = start_worker(settings), start_worker(settings)
    # Produce only once the group has settled with both members, so each owns some input.
    assert _wait_for(
        lambda: bool(first.assigned_partitions()) and bool(second.assigned_partitions()), 60
    )
    produce(kafka_broker, topics.input, good_events(120, "split"))
    seen = outputs_by_id(kafka_broker, topics, expect=120)
    assert {f"split-{i}" for i in range(120)} <= set(seen)
    assert first.batches_done > 0 and second.batches_done > 0


def _lag_series(worker: PredictorWorker) -> set[tuple[str, str]]:
    return {
        (sample.labels["topic"], sample.labels["partition"])
        for metric in worker.metrics.consumer_lag.collect()
        for sample in metric.samples
    }


def _owned(worker: PredictorWorker) -> set[tuple[str, str]]:
    return {(p.topic, str(p.partition)) for p in worker.assigned_partitions()}


def test_consumer_lag_is_reported_for_owned_partitions_only(
    kafka_broker: str,
    make_kafka_config: Callable[..., KafkaConfig],
    make_topics: Callable[..., TopicsConfig],
    start_worker: Callable[[Settings], PredictorWorker],
) -> None:
    topics = make_topics(partitions=2)
    kafka = make_kafka_config(kafka_broker)
    ensure_topics(kafka, topics)
    settings = settings_for(Path("unused"), kafka, topics)
    first = start_worker(settings)
    produce(kafka_broker, topics.input, good_events(20, "before"))
    everything = {(topics.input, "0"), (topics.input, "1")}
    assert _wait_for(lambda: _lag_series(first) == everything, 60), _lag_series(first)

    second = start_worker(settings)
    assert _wait_for(lambda: bool(_owned(first)) and bool(_owned(second)), 60)
    produce(kafka_broker, topics.input, good_events(40, "after"))
    outputs_by_id(kafka_broker, topics, expect=60)
    # a partition handed to the other member is no longer reported by this one: a stale
    # series would add its last lag to every sum over the group
    assert _wait_for(lambda: _lag_series(first) == _owned(first), 10), _lag_series(first)
    assert _wait_for(lambda: _lag_series(second) == _owned(second), 10), _lag_series(second)


def _env(bundle: Path, kafka: KafkaConfig, topics: TopicsConfig) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXEMPLAR_")}
    env.update(
        {
            "EXEMPLAR_MODEL_DIR": str(bundle),
            "EXEMPLAR_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "EXEMPLAR_KAFKA__GROUP_ID": kafka.group_id,
            "EXEMPLAR_METRICS__ENABLED": "false",
            "EXEMPLAR_BATCH__MAX_SIZE": "8",
            "EXEMPLAR_BATCH__MAX_WAIT_MS": "50",
            "EXEMPLAR_LOG__FORMAT": "json",
        }
    )
    for name, value in FAST_KAFKA.items():
        env[f"EXEMPLAR_KAFKA__{name.upper()}"] = str(value)
    for role, value in topics.model_dump().items():
        if value is not None:
            env[f"EXEMPLAR_TOPICS__{role.upper()}"] = str(value)
    return env


def _spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).parent / "exemplar"
    with log.open("ab") as err:
        return subprocess.Popen([str(exe), "run"], env=env, stdout=subprocess.DEVNULL, stderr=err)


def _wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


@pytest.mark.slow
def test_kill_9_mid_stream_then_restart_loses_nothing(
    kafka_broker: str,
    kafka_config: KafkaConfig,
    unique_topics: TopicsConfig,
    tiny_bundle: Path,
    tmp_path: Path,
) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    ensure_topics(kafka_config, unique_topics)
    n = 400
    produce(kafka_broker, unique_topics.input, good_events(n, "kill"))
    env = _env(bundle, kafka_config, unique_topics)
    log = tmp_path / "daemon.log"
    proc = _spawn(env, log)
    # let it get part of the way, then kill it without warning
    assert _wait_for(
        lambda: (
            len(
                read_topic(kafka_broker, unique_topics.output, 1, 1.0)
                + read_topic(kafka_broker, unique_topics.adjudication, 1, 1.0)
            )
            > 0
        ),
        120,
    ), log.read_text()
    proc.kill()
    proc.wait(10)
    proc = _spawn(env, log)
    try:
        seen = outputs_by_id(kafka_broker, unique_topics, expect=n, timeout_s=180)
    finally:
        proc.terminate()
        proc.wait(30)
    missing = {f"kill-{i}" for i in range(n)} - set(seen)
    assert not missing, f"lost {len(missing)} events"
    assert all(len(roles) == 1 for roles in seen.values())


def test_broker_unavailable_at_start_then_appears(
    make_kafka_config: Callable[..., KafkaConfig],
    make_topics: Callable[..., TopicsConfig],
    start_worker: Callable[[Settings], PredictorWorker],
    tmp_path: Path,
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bootstrap = f"127.0.0.1:{port}"
    kafka = make_kafka_config(bootstrap)
    topics = make_topics(partitions=1)
    worker = start_worker(settings_for(Path("unused"), kafka, topics))
    time.sleep(3)
    assert worker.state == RunState.STARTING  # still retrying, not crashed
    with EmbeddedBroker(port=port, log_path=tmp_path / "late.log"):
        assert _wait_for(lambda: worker.state == RunState.RUNNING, 60)
        produce(bootstrap, topics.input, good_events(10, "late"))
        seen = outputs_by_id(bootstrap, topics, expect=10)
        assert {f"late-{i}" for i in range(10)} <= set(seen)
        worker.request_stop()
        assert _wait_for(lambda: worker.state == RunState.STOPPED, 30)


@pytest.mark.slow
def test_sigterm_mid_stream_exits_cleanly_with_the_batch_committed(
    kafka_broker: str,
    kafka_config: KafkaConfig,
    unique_topics: TopicsConfig,
    tiny_bundle: Path,
    tmp_path: Path,
) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    ensure_topics(kafka_config, unique_topics)
    produce(kafka_broker, unique_topics.input, good_events(300, "term"))
    env = _env(bundle, kafka_config, unique_topics)
    log = tmp_path / "daemon.log"
    proc = _spawn(env, log)
    assert _wait_for(
        lambda: (
            len(
                read_topic(kafka_broker, unique_topics.output, 1, 1.0)
                + read_topic(kafka_broker, unique_topics.adjudication, 1, 1.0)
            )
            > 0
        ),
        120,
    ), log.read_text()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log.read_text()
    assert "predictor_stopped" in log.read_text()
    # Everything processed before the stop was committed: a consumer in the same group
    # starts exactly after the processed events, so no event is processed twice.
    processed = outputs_by_id(kafka_broker, unique_topics, expect=1, timeout_s=5)
    consumer = KafkaConsumer(
        bootstrap_servers=kafka_broker, group_id=kafka_config.group_id, enable_auto_commit=False
    )
    parts = [
        TopicPartition(unique_topics.input, p)
        for p in consumer.partitions_for_topic(unique_topics.input) or []
    ]
    committed = sum(consumer.committed(tp) or 0 for tp in parts)
    consumer.close()
    assert committed == len(processed)
