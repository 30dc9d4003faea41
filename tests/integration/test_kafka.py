"""The Kafka adapters against a real broker (embedded Tansu): topics, batches, commits, failures.

Also the settings they are built from (no broker needed for those) and the
embedded broker's own life cycle.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, codec
from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.errors import BrokerUnavailable, ConfigError, StreamError
from streams.broker import EmbeddedBroker, free_port, run_broker
from streams.config import KafkaConfig, TopicsConfig
from streams.contracts import InputEvent
from streams.kafka import (
    BatchConsumer,
    ConsumedRecord,
    OutputProducer,
    Partition,
    RebalanceEvent,
    client_options,
    ensure_topics,
    next_offsets,
    start_offsets,
)

# --- helpers ----------------------------------------------------------------------------


def produce(cfg: KafkaConfig, topic: str, count: int, prefix: str = "e") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(count)]
    with OutputProducer(cfg) as producer:
        for event_id in ids:
            producer.send(topic, event_id, InputEvent(id=event_id, text=f"text of {event_id}"))
        sent = producer.flush(timeout_s=10)
    assert len(sent) == count
    return ids


def drain(consumer: BatchConsumer, expected: int, timeout_s: float = 10.0) -> list[ConsumedRecord]:
    """Poll until ``expected`` records arrived (or the timeout passed)."""
    records: list[ConsumedRecord] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < expected and time.monotonic() < deadline:
        records += consumer.poll_batch(max_records=expected - len(records), timeout_s=0.5)
    return records


def ids_of(records: list[ConsumedRecord]) -> list[str]:
    return [InputEvent.model_validate_json(r.value or b"").id for r in records]


@pytest.fixture
def topics(make_topics: Callable[..., TopicsConfig], kafka_config: KafkaConfig) -> TopicsConfig:
    created = make_topics()
    ensure_topics(kafka_config, created)
    return created


# --- configuration (no broker) ------------------------------------------------------------


class _Settings(BaseSettings):
    """The shape the daemon's settings class nests these configs in."""

    model_config = SettingsConfigDict(env_prefix="EXEMPLAR_", env_nested_delimiter="__")
    kafka: KafkaConfig = KafkaConfig()
    topics: TopicsConfig = TopicsConfig()


def test_settings_read_nested_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXEMPLAR_KAFKA__BOOTSTRAP_SERVERS", "k1:9093, k2:9093")
    monkeypatch.setenv("EXEMPLAR_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("EXEMPLAR_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("EXEMPLAR_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("EXEMPLAR_KAFKA__SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("EXEMPLAR_TOPICS__PARTITIONS", "6")
    settings = _Settings()
    assert settings.kafka.bootstrap_servers == "k1:9093,k2:9093"
    assert settings.topics.partitions == 6
    assert "s3cret" not in repr(settings)
    options = client_options(settings.kafka)
    assert options["bootstrap_servers"] == ["k1:9093", "k2:9093"]
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_password"] == "s3cret"
    assert "ssl_cafile" not in options


@pytest.mark.parametrize(
    ("settings", "variable"),
    [
        ({"security_protocol": "SASL_SSL"}, "EXEMPLAR_KAFKA__SASL_MECHANISM"),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"},
            "EXEMPLAR_KAFKA__SASL_PASSWORD",
        ),
        ({"sasl_username": "svc"}, "EXEMPLAR_KAFKA__SECURITY_PROTOCOL"),
        (
            {"security_protocol": "SSL", "ssl_cafile": "/no/such/ca.pem"},
            "EXEMPLAR_KAFKA__SSL_CAFILE",
        ),
        ({"bootstrap_servers": "no-port"}, "EXEMPLAR_KAFKA__BOOTSTRAP_SERVERS"),
        ({"session_timeout_ms": 1000, "heartbeat_interval_ms": 1000}, "HEARTBEAT_INTERVAL_MS"),
        ({"request_timeout_ms": 3000, "delivery_timeout_ms": 2000}, "DELIVERY_TIMEOUT_MS"),
    ],
)
def test_bad_kafka_settings_name_the_variable_to_set(
    settings: dict[str, Any], variable: str
) -> None:
    with pytest.raises(ValidationError, match=variable):
        KafkaConfig(**settings)


def test_ssl_files_are_passed_as_paths_and_secrets_unwrapped(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    cfg = KafkaConfig(security_protocol="SSL", ssl_cafile=ca, ssl_password=SecretStr("pw"))
    options = client_options(cfg)
    assert options["ssl_cafile"] == str(ca)
    assert options["ssl_password"] == "pw"
    assert "sasl_mechanism" not in options


def test_compression_codec_must_be_importable() -> None:
    missing = [name for name in ("lz4", "zstd", "snappy") if not getattr(codec, f"has_{name}")()]
    if not missing:
        pytest.skip("every codec library is installed here")
    with pytest.raises(ValidationError, match="EXEMPLAR_KAFKA__COMPRESSION"):
        KafkaConfig.model_validate({"compression": missing[0]})
    assert KafkaConfig(compression="gzip").compression == "gzip"


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"input": "bad topic!"}, "EXEMPLAR_TOPICS__INPUT"),
        ({"output": "x" * 250}, "EXEMPLAR_TOPICS__OUTPUT"),
        ({"output": "exemplar.events"}, "EXEMPLAR_TOPICS__OUTPUT"),
        ({"dead_letter": "exemplar_events"}, "EXEMPLAR_TOPICS__DEAD_LETTER"),
        ({"retention_ms": 0}, "EXEMPLAR_TOPICS__RETENTION_MS"),
    ],
)
def test_bad_topic_settings_name_the_variable_to_set(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        TopicsConfig(**settings)


# --- topics -------------------------------------------------------------------------------


def test_ensure_topics_creates_missing_topics_once(
    kafka_config: KafkaConfig, make_topics: Callable[..., TopicsConfig]
) -> None:
    wanted = make_topics(partitions=2, retention_ms=3_600_000)
    assert sorted(ensure_topics(kafka_config, wanted)) == sorted(wanted.by_role().values())
    checker = KafkaConsumer(**client_options(kafka_config))
    try:
        for topic in wanted.by_role().values():
            assert checker.partitions_for_topic(topic) == {0, 1}
    finally:
        checker.close()
    assert ensure_topics(kafka_config, wanted) == []


def test_ensure_topics_refuses_to_create_when_told_not_to(
    kafka_config: KafkaConfig, make_topics: Callable[..., TopicsConfig]
) -> None:
    with pytest.raises(ConfigError, match="EXEMPLAR_TOPICS__CREATE_MISSING"):
        ensure_topics(kafka_config, make_topics(create_missing=False))


# --- consuming and committing --------------------------------------------------------------


def test_new_member_resumes_exactly_after_the_committed_offsets(
    kafka_config: KafkaConfig, topics: TopicsConfig
) -> None:
    all_ids = produce(kafka_config, topics.input, 12)
    with BatchConsumer(kafka_config, [topics.input]) as first:
        batch = drain(first, 7)
        assert len(batch) == 7
        assert batch == sorted(batch, key=lambda r: (r.partition, r.offset))
        first.commit(next_offsets(batch))
    with BatchConsumer(kafka_config, [topics.input]) as second:
        rest = drain(second, 5)
        assert second.poll_batch(max_records=10, timeout_s=0.5) == []
    assert sorted(ids_of(batch) + ids_of(rest)) == sorted(all_ids)


def test_uncommitted_records_are_delivered_again(
    kafka_config: KafkaConfig, topics: TopicsConfig
) -> None:
    all_ids = produce(kafka_config, topics.input, 6)
    with BatchConsumer(kafka_config, [topics.input]) as first:
        seen = ids_of(drain(first, 4))
        assert len(seen) == 4
    with BatchConsumer(kafka_config, [topics.input]) as second:
        again = ids_of(drain(second, 6))
    assert sorted(again) == sorted(all_ids)
    assert set(seen) <= set(again)


def test_lag_seek_pause_and_resume(
    kafka_config: KafkaConfig, make_topics: Callable[..., TopicsConfig]
) -> None:
    topics = make_topics(partitions=1)
    ensure_topics(kafka_config, topics)
    produce(kafka_config, topics.input, 10)
    only = Partition(topics.input, 0)
    with BatchConsumer(kafka_config, [topics.input]) as consumer:
        batch = drain(consumer, 4)
        assert [r.offset for r in batch] == [0, 1, 2, 3]
        assert consumer.lag() == {only: 6}

        consumer.seek(start_offsets(batch[2:]))  # e.g. after a failed flush
        assert [r.offset for r in consumer.poll_batch(2, timeout_s=5)] == [2, 3]
        consumer.commit(next_offsets(batch))

        consumer.pause([only])
        assert consumer.paused() == {only}
        assert consumer.poll_batch(max_records=10, timeout_s=1.0) == []
        consumer.resume([only])
        assert consumer.paused() == frozenset()
        rest = drain(consumer, 6)
        assert [r.offset for r in rest] == list(range(4, 10))
        assert consumer.lag() == {only: 0}


def test_rebalance_events_reach_the_caller_thread(
    kafka_config: KafkaConfig, topics: TopicsConfig
) -> None:
    every = frozenset(Partition(topics.input, p) for p in range(topics.partitions))
    events: list[RebalanceEvent] = []
    callback_threads: set[threading.Thread] = set()

    def record(event: RebalanceEvent) -> None:
        callback_threads.add(threading.current_thread())
        events.append(event)

    with BatchConsumer(kafka_config, [topics.input], on_rebalance=record) as first:
        deadline = time.monotonic() + 10
        while first.assignment() != every and time.monotonic() < deadline:
            first.poll_batch(max_records=1, timeout_s=0.2)
        assert events == [RebalanceEvent("assigned", every)]

        stop = threading.Event()
        second = BatchConsumer(kafka_config, [topics.input])
        second_assignment: list[frozenset[Partition]] = [frozenset()]

        def keep_polling() -> None:
            while not stop.is_set():
                second.poll_batch(max_records=1, timeout_s=0.2)
                second_assignment[0] = second.assignment()

        poller = threading.Thread(target=keep_polling)
        poller.start()
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and (
                len(events) < 3 or first.assignment() | second_assignment[0] != every
            ):
                first.poll_batch(max_records=1, timeout_s=0.2)
        finally:
            stop.set()
            poller.join()
        try:
            assert events[1] == RebalanceEvent("revoked", every)
            assert events[2].kind == "assigned"
            assert events[2].partitions == first.assignment()
            assert first.assignment() | second.assignment() == every
            assert not first.assignment() & second.assignment()
        finally:
            second.close()
    assert callback_threads == {threading.main_thread()}


# --- producing ------------------------------------------------------------------------------


@pytest.fixture
def reap_refused_sockets(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Quietly collect the sockets kafka-python leaks when a broker refuses connections.

    kafka-python 3.0 does not close the socket of a refused connect
    (``kafka/net/inet.py``, ``sock_connect``); without this their ResourceWarning
    would fail whichever later test happens to trigger garbage collection. Its
    error logs are muted too: captured log records keep those sockets reachable
    (through the logged exceptions' tracebacks) until after teardown.
    """
    caplog.set_level(logging.CRITICAL + 1, logger="kafka")
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.mark.usefixtures("reap_refused_sockets")
def test_flush_raises_broker_unavailable_once_the_broker_is_gone(
    tmp_path: Path, make_kafka_config: Callable[..., KafkaConfig]
) -> None:
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as broker:
        cfg = make_kafka_config(
            broker.bootstrap_servers, request_timeout_ms=1_000, delivery_timeout_ms=1_500
        )
        topics = TopicsConfig(partitions=1)
        ensure_topics(cfg, topics)
        producer = OutputProducer(cfg)
        try:
            future = producer.send(topics.output, "evt-1", InputEvent(id="evt-1", text="ok"))
            assert producer.flush(timeout_s=5) == [future.result()]
            broker.stop()
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable):
                producer.send(topics.output, "evt-2", InputEvent(id="evt-2", text="lost"))
                producer.flush(timeout_s=10)
            assert time.monotonic() - started < 8
        finally:
            producer.close(timeout_s=1)


# --- the embedded broker ----------------------------------------------------------------------


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_embedded_broker_starts_on_a_free_port_and_stops() -> None:
    broker = EmbeddedBroker()
    assert broker.stop() is None  # never started: nothing to do
    broker.start()
    try:
        assert broker.running
        assert broker.bootstrap_servers == f"127.0.0.1:{broker.port}"
        assert _listening(broker.port)
        log_path = broker.log_path
        assert log_path is not None
        assert log_path.exists()
    finally:
        broker.stop()
    assert not broker.running
    assert not _listening(broker.port)
    assert not log_path.exists()  # a temporary log goes with the broker


def test_a_taken_port_is_refused(kafka_broker: str) -> None:
    taken = int(kafka_broker.rsplit(":", 1)[1])
    with pytest.raises(StreamError, match="already in use"):
        EmbeddedBroker(taken).start()


def test_missing_binary_is_a_stream_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CALF_TANSU_BIN", str(tmp_path / "no-tansu"))
    with pytest.raises(StreamError, match="CALF_TANSU_BIN"):
        EmbeddedBroker().start()
    monkeypatch.delenv("CALF_TANSU_BIN")
    with pytest.raises(StreamError, match="not an executable file"):
        EmbeddedBroker(binary=tmp_path / "no-tansu").start()


def test_a_broker_that_dies_at_start_reports_its_output(tmp_path: Path) -> None:
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'cannot start: no storage' >&2\nexit 0\n")
    fake.chmod(0o755)
    with pytest.raises(StreamError, match="cannot start: no storage"):
        EmbeddedBroker(binary=fake, startup_timeout_s=2).start()


def test_run_broker_serves_until_sigterm() -> None:
    port = free_port()
    served = threading.Event()

    def terminate_when_listening() -> None:
        deadline = time.monotonic() + 10
        while not _listening(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        served.set()
        os.kill(os.getpid(), signal.SIGTERM)

    handler_before = signal.getsignal(signal.SIGTERM)
    killer = threading.Thread(target=terminate_when_listening)
    killer.start()
    status = run_broker(port)
    killer.join()
    assert served.is_set()
    assert status == 0
    assert not _listening(port)
    assert signal.getsignal(signal.SIGTERM) == handler_before


def test_run_broker_stops_on_event_off_the_main_thread() -> None:
    port = free_port()
    stop = threading.Event()
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(run_broker(port, stop=stop)))
    runner.start()
    deadline = time.monotonic() + 10
    while not _listening(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _listening(port)
    stop.set()
    runner.join(timeout=10)
    assert result == [0]
