"""Shared fixtures: a real Kafka-compatible broker (Tansu) and per-test topics and groups.

``kafka_broker`` starts one embedded broker per test session on a free port and
yields its bootstrap string; ``kafka_config`` points a fast-timing client
configuration at it with a fresh consumer group (``make_kafka_config`` does the
same for any broker); ``make_topics``/``unique_topics`` give each test its own
topic names so tests never see each other's records.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from streams.broker import EmbeddedBroker
from streams.config import KafkaConfig, TopicsConfig

# the tiny-encoder and tiny-bundle fixtures, for unit and integration tests alike
pytest_plugins = ["tests.model_fixtures"]

# Tansu answers a group join after about session_timeout/2 (never under ~1 s), and
# a stopped broker should fail sends within seconds, not minutes: keep these short.
FAST_KAFKA: dict[str, Any] = {
    "request_timeout_ms": 3_000,
    "bootstrap_timeout_ms": 3_000,
    "session_timeout_ms": 1_000,
    "heartbeat_interval_ms": 300,
    "max_poll_interval_ms": 10_000,
    "delivery_timeout_ms": 5_000,
    "max_block_ms": 3_000,
    "linger_ms": 0,
}


@pytest.fixture(autouse=True)
def _restore_logging_config() -> Iterator[None]:
    """Undo logging set-up a test does (e.g. the CLI's ``configure_logging``).

    A logger factory or handler bound to ``sys.stderr`` during a test holds pytest's
    capture stream, which is closed afterwards: later tests would log into a closed
    file (structlog raises ``ValueError: I/O operation on closed file``).
    """
    structlog_config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**structlog_config)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of an embedded Tansu broker shared by the whole session."""
    log_path = tmp_path_factory.mktemp("tansu") / "broker.log"
    with EmbeddedBroker(log_path=log_path) as broker:
        yield broker.bootstrap_servers


@pytest.fixture
def make_kafka_config() -> Callable[..., KafkaConfig]:
    """Factory of client settings with short timeouts and a fresh consumer group."""

    def make(bootstrap_servers: str, **overrides: Any) -> KafkaConfig:
        settings = {"group_id": f"test-{uuid.uuid4().hex[:8]}", **FAST_KAFKA, **overrides}
        return KafkaConfig(bootstrap_servers=bootstrap_servers, **settings)

    return make


@pytest.fixture
def kafka_config(kafka_broker: str, make_kafka_config: Callable[..., KafkaConfig]) -> KafkaConfig:
    """Client settings for the session broker (see ``make_kafka_config``)."""
    return make_kafka_config(kafka_broker)


@pytest.fixture
def make_topics() -> Callable[..., TopicsConfig]:
    """Factory of ``TopicsConfig`` objects whose topic names no other test uses."""

    def make(**overrides: Any) -> TopicsConfig:
        suffix = uuid.uuid4().hex[:10]
        names = {
            role: f"test-{suffix}-{role.replace('_', '-')}" for role in TopicsConfig().by_role()
        }
        return TopicsConfig(**{**names, **overrides})

    return make


@pytest.fixture
def unique_topics(make_topics: Callable[..., TopicsConfig]) -> TopicsConfig:
    """One set of fresh topic names with the default partition count."""
    return make_topics()
