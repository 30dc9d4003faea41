"""Adapters over kafka-python: topic setup, a batch consumer and an output producer.

The predictor loop these are built for::

    records = consumer.poll_batch(max_records, timeout_s)   # rebalances happen only here
    ... decode, predict, producer.send(topic, event_id, message) for each ...
    producer.flush(timeout_s)                                # raises if any send failed
    consumer.commit(next_offsets(records))                   # only after a clean flush

Because offsets are committed before the next ``poll_batch``, nothing processed is
ever uncommitted when the group rebalances, which is the "commit before revoke"
guarantee; records of a partition revoked *while* a batch is being gathered are
dropped from that batch (the new owner reads them from the committed offset).
When a flush fails, ``consumer.seek(start_offsets(records))`` rewinds so the
batch is read again.

kafka-python's exceptions never cross this module: transient ones (timeouts,
connection loss, ``retriable`` broker errors) become ``BrokerUnavailable``,
the rest ``StreamError`` (``ConfigError`` for client configuration problems).
Kafka's own types stay inside too: callers see ``Partition`` and
``ConsumedRecord``.

Tansu quirks handled here (DESIGN §6): existing topics are listed with a
consumer's ``topics()`` (admin ``list_topics``/``describe_*`` fail there), and
lag uses ``highwater()`` from the last fetch (ListOffsets LATEST is wrong there).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, wait
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NamedTuple, Self

import structlog
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka import errors as kafka_errors
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from pydantic import BaseModel

from model.errors import BrokerUnavailable, ConfigError, StreamError
from streams.config import TOPICS_ENV_PREFIX, KafkaConfig, TopicsConfig
from streams.contracts import encode_message

log = structlog.get_logger(__name__)

# Errors that mean "the cluster cannot be reached right now" although kafka-python
# does not flag them retriable.
_UNAVAILABLE = (kafka_errors.BrokerNotAvailableError,)


def translate_error(exc: kafka_errors.KafkaError, action: str) -> StreamError | ConfigError:
    """The exemplar error for one kafka-python error, its message saying what failed."""
    message = f"{action} failed: {type(exc).__name__}: {exc}"
    if isinstance(exc, kafka_errors.KafkaConfigurationError):
        return ConfigError(message)
    if getattr(exc, "retriable", False) or isinstance(exc, _UNAVAILABLE):
        return BrokerUnavailable(message)
    return StreamError(message)


@contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except kafka_errors.KafkaError as exc:
        raise translate_error(exc, action) from exc


class Partition(NamedTuple):
    """A topic partition (equal to, and hashed like, kafka-python's ``TopicPartition``)."""

    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class ConsumedRecord:
    """One record as read from the broker: raw bytes, undecoded."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None

    @property
    def source(self) -> Partition:
        return Partition(self.topic, self.partition)


@dataclass(frozen=True, slots=True)
class SentRecord:
    """Where the broker stored a produced record."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class RebalanceEvent:
    """Partitions taken from (``revoked``, ``lost``) or given to (``assigned``) this consumer."""

    kind: Literal["revoked", "assigned", "lost"]
    partitions: frozenset[Partition]


def next_offsets(records: Iterable[ConsumedRecord]) -> dict[Partition, int]:
    """The offsets to commit once ``records`` are done: last offset + 1 per partition."""
    offsets: dict[Partition, int] = {}
    for record in records:
        offsets[record.source] = max(offsets.get(record.source, 0), record.offset + 1)
    return offsets


def start_offsets(records: Iterable[ConsumedRecord]) -> dict[Partition, int]:
    """The first offset per partition of ``records``: where to seek to read them again."""
    offsets: dict[Partition, int] = {}
    for record in records:
        offsets[record.source] = min(offsets.get(record.source, record.offset), record.offset)
    return offsets


def client_options(cfg: KafkaConfig) -> dict[str, Any]:
    """kafka-python keyword arguments shared by consumers, producers and admin clients.

    The only place where secrets leave their ``SecretStr``.
    """
    options: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers.split(","),
        "client_id": cfg.client_id,
        "security_protocol": cfg.security_protocol,
        "request_timeout_ms": cfg.request_timeout_ms,
        "bootstrap_timeout_ms": cfg.bootstrap_timeout_ms,
    }
    if cfg.security_protocol.startswith("SASL_"):
        options["sasl_mechanism"] = cfg.sasl_mechanism
        options["sasl_plain_username"] = cfg.sasl_username
        if cfg.sasl_password is not None:
            options["sasl_plain_password"] = cfg.sasl_password.get_secret_value()
    if cfg.security_protocol.endswith("SSL"):
        options["ssl_check_hostname"] = cfg.ssl_check_hostname
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(cfg, name)
            if path is not None:
                options[name] = str(path)
        if cfg.ssl_password is not None:
            options["ssl_password"] = cfg.ssl_password.get_secret_value()
    return options


def consumer_options(cfg: KafkaConfig, group_id: str | None = None) -> dict[str, Any]:
    """Options of a manually committing group consumer that starts from the earliest record."""
    return {
        **client_options(cfg),
        "group_id": group_id or cfg.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": cfg.heartbeat_interval_ms,
        "max_poll_interval_ms": cfg.max_poll_interval_ms,
        "fetch_max_wait_ms": cfg.fetch_max_wait_ms,
    }


def producer_options(cfg: KafkaConfig) -> dict[str, Any]:
    """Options of the output producer (idempotent when ``acks`` is ``all``)."""
    return {
        **client_options(cfg),
        "acks": "all" if cfg.acks == "all" else int(cfg.acks),
        # kafka-python warns when weaker acks silently switch idempotence off; say it outright.
        "enable_idempotence": cfg.acks == "all",
        "linger_ms": cfg.linger_ms,
        "compression_type": cfg.compression,
        "max_request_size": cfg.max_request_bytes,
        "delivery_timeout_ms": cfg.delivery_timeout_ms,
        "max_block_ms": cfg.max_block_ms,
    }


def ensure_topics(cfg: KafkaConfig, topics_cfg: TopicsConfig) -> list[str]:
    """Create the configured topics that do not exist yet; return the names created.

    Existing topics are left alone (a partition count differing from the
    configuration is logged, not changed: Tansu cannot add partitions).
    """
    wanted = list(topics_cfg.by_role().values())
    with _translated("listing topics"):
        # Tansu: admin list_topics/describe_* fail on an unknown ACL operation code.
        lister = KafkaConsumer(**client_options(cfg), enable_auto_commit=False)
    try:
        with _translated("listing topics"):
            existing = lister.topics()
            for topic in sorted(set(wanted) & existing):
                count = len(lister.partitions_for_topic(topic) or ())
                if count != topics_cfg.partitions:
                    log.warning(
                        "topic_partitions_differ",
                        topic=topic,
                        partitions=count,
                        configured=topics_cfg.partitions,
                    )
        missing = [topic for topic in wanted if topic not in existing]
        if not missing:
            return []
        if not topics_cfg.create_missing:
            raise ConfigError(
                f"topics {missing} do not exist; create them or set "
                f"{TOPICS_ENV_PREFIX}CREATE_MISSING=true"
            )
        created = _create_topics(cfg, topics_cfg, missing)
        _await_topics(lister, missing, timeout_s=cfg.request_timeout_ms / 1000)
    finally:
        lister.close()
    return created


def _create_topics(cfg: KafkaConfig, topics_cfg: TopicsConfig, names: Sequence[str]) -> list[str]:
    configs = (
        {} if topics_cfg.retention_ms is None else {"retention.ms": str(topics_cfg.retention_ms)}
    )
    spec = {
        "num_partitions": topics_cfg.partitions,
        "replication_factor": topics_cfg.replication_factor,
        "configs": configs,
    }
    with _translated("creating topics"):
        admin = KafkaAdminClient(**client_options(cfg))
    try:
        with _translated("creating topics"):
            result = admin.create_topics({name: dict(spec) for name in names}, raise_errors=False)
    finally:
        admin.close()
    created = []
    for topic in result["topics"]:
        error = kafka_errors.for_code(topic["error_code"])
        if error is kafka_errors.NoError:
            created.append(topic["name"])
            log.info("topic_created", topic=topic["name"], partitions=topics_cfg.partitions)
        elif error is not kafka_errors.TopicAlreadyExistsError:  # another replica was quicker
            raise translate_error(
                error(topic.get("error_message") or ""), f"creating topic {topic['name']!r}"
            )
    return created


def _await_topics(consumer: KafkaConsumer, names: Sequence[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with _translated("waiting for new topics"):
            missing = set(names) - consumer.topics()
        if not missing:
            return
        if time.monotonic() > deadline:
            raise BrokerUnavailable(f"created topics {sorted(missing)} are not visible yet")
        time.sleep(0.05)


def _kafka_tp(partition: Partition) -> TopicPartition:
    return TopicPartition(partition.topic, partition.partition)


class _Listener(ConsumerRebalanceListener):
    """Queues rebalance callbacks, which kafka-python runs on its IO thread.

    That thread must not block nor call back into the consumer, so the events are
    handed to the caller's thread by ``BatchConsumer.poll_batch``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[RebalanceEvent] = []

    def _push(self, kind: Literal["revoked", "assigned", "lost"], tps: Iterable[Any]) -> None:
        event = RebalanceEvent(kind, frozenset(Partition(tp.topic, tp.partition) for tp in tps))
        if not event.partitions:  # a first join "revokes" nothing; not worth an event
            return
        with self._lock:
            self._events.append(event)

    def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
        self._push("revoked", revoked)

    def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
        self._push("assigned", assigned)

    def on_partitions_lost(self, lost: Iterable[Any]) -> None:
        self._push("lost", lost)

    def drain(self) -> list[RebalanceEvent]:
        with self._lock:
            events, self._events = self._events, []
        return events


class BatchConsumer:
    """A group consumer that hands out micro-batches and commits exactly what it is told."""

    def __init__(
        self,
        cfg: KafkaConfig,
        topics: Sequence[str],
        *,
        group_id: str | None = None,
        on_rebalance: Callable[[RebalanceEvent], None] | None = None,
    ) -> None:
        """``on_rebalance`` runs on the caller's thread, inside ``poll_batch``."""
        self._on_rebalance = on_rebalance
        self._listener = _Listener()
        with _translated("connecting consumer"):
            self._consumer = KafkaConsumer(**consumer_options(cfg, group_id))
        try:
            with _translated(f"subscribing to {list(topics)}"):
                self._consumer.subscribe(topics=list(topics), listener=self._listener)
        except StreamError:
            self._consumer.close(autocommit=False)
            raise
        self._commit_timeout_ms = cfg.request_timeout_ms
        self._closed = False

    def poll_batch(self, max_records: int, timeout_s: float) -> list[ConsumedRecord]:
        """Up to ``max_records`` records, gathered for at most ``timeout_s`` seconds.

        Returns early once ``max_records`` are in hand; records come sorted by
        topic, partition and offset.
        """
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        deadline = time.monotonic() + timeout_s
        batch: list[ConsumedRecord] = []
        while True:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            with _translated("polling"):
                polled = self._consumer.poll(
                    timeout_ms=remaining_ms, max_records=max_records - len(batch)
                )
            taken = self._dispatch_rebalance()
            if taken:
                batch = [record for record in batch if record.source not in taken]
            for records in polled.values():
                batch.extend(
                    ConsumedRecord(
                        topic=r.topic,
                        partition=r.partition,
                        offset=r.offset,
                        key=r.key,
                        value=r.value,
                        timestamp_ms=r.timestamp
                        if r.timestamp is not None and r.timestamp >= 0
                        else None,
                    )
                    for r in records
                )
            if len(batch) >= max_records or remaining_ms == 0:
                break
        batch.sort(key=lambda r: (r.topic, r.partition, r.offset))
        return batch

    def _dispatch_rebalance(self) -> set[Partition]:
        """Hand queued rebalance events to the caller; return the partitions taken away."""
        taken: set[Partition] = set()
        for event in self._listener.drain():
            log.info("partitions_" + event.kind, partitions=sorted(event.partitions))
            if event.kind != "assigned":
                taken |= event.partitions
            if self._on_rebalance is not None:
                self._on_rebalance(event)
        return taken

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        """Commit exactly these next-to-read offsets, synchronously.

        A ``StreamError`` here after a rebalance means another member owns the
        partition now and will re-deliver the uncommitted records (at least once).
        """
        if not offsets:
            return
        payload = {
            _kafka_tp(tp): OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()
        }
        with _translated("committing offsets"):
            self._consumer.commit(payload, timeout_ms=self._commit_timeout_ms)

    def seek(self, offsets: Mapping[Partition, int]) -> None:
        """Read again from these offsets (those of partitions no longer assigned are ignored)."""
        assigned = self.assignment()
        with _translated("seeking"):
            for tp, offset in offsets.items():
                if tp in assigned:
                    self._consumer.seek(_kafka_tp(tp), offset)

    def pause(self, partitions: Iterable[Partition]) -> None:
        """Stop fetching from these partitions (backpressure) without leaving the group."""
        assigned = self.assignment()
        with _translated("pausing"):
            self._consumer.pause(*(_kafka_tp(tp) for tp in partitions if tp in assigned))

    def resume(self, partitions: Iterable[Partition]) -> None:
        """Fetch again from paused partitions."""
        assigned = self.assignment()
        with _translated("resuming"):
            self._consumer.resume(*(_kafka_tp(tp) for tp in partitions if tp in assigned))

    def paused(self) -> frozenset[Partition]:
        return frozenset(Partition(tp.topic, tp.partition) for tp in self._consumer.paused())

    def assignment(self) -> frozenset[Partition]:
        return frozenset(Partition(tp.topic, tp.partition) for tp in self._consumer.assignment())

    def lag(self) -> dict[Partition, int | None]:
        """Records behind the end, per assigned partition; None before its first fetch.

        Uses the highwater mark of the last fetch: Tansu answers ListOffsets
        LATEST wrongly, so ``end_offsets`` is not used.
        """
        lags: dict[Partition, int | None] = {}
        with _translated("computing lag"):
            for tp in self._consumer.assignment():
                highwater = self._consumer.highwater(tp)
                position = (
                    None
                    if highwater is None
                    else self._consumer.position(tp, timeout_ms=self._commit_timeout_ms)
                )
                key = Partition(tp.topic, tp.partition)
                lags[key] = (
                    None if highwater is None or position is None else max(0, highwater - position)
                )
        return lags

    def close(self) -> None:
        """Leave the group; uncommitted records go to whoever gets the partitions."""
        if self._closed:
            return
        self._closed = True
        with _translated("closing consumer"):
            self._consumer.close(autocommit=False)
        self._listener.drain()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class TopicFollower:
    """Reads every partition of one topic from its start, without a consumer group.

    For small announcement topics (``exemplar.models``) that every process must see in
    full: no offsets are committed and no group membership is kept, so any number of
    followers can read side by side.
    """

    def __init__(self, cfg: KafkaConfig, topic: str) -> None:
        self.topic = topic
        options = {
            **client_options(cfg),
            "group_id": None,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "fetch_max_wait_ms": cfg.fetch_max_wait_ms,
        }
        with _translated("connecting follower"):
            self._consumer = KafkaConsumer(**options)
        self._assigned = False

    def _assign(self) -> bool:
        with _translated(f"reading the partitions of {self.topic!r}"):
            # partitions_for_topic reads only the metadata cache; topics() refreshes it
            if self.topic not in self._consumer.topics():
                return False
            partitions = self._consumer.partitions_for_topic(self.topic)
            if not partitions:
                return False
            self._consumer.assign([TopicPartition(self.topic, p) for p in sorted(partitions)])
        self._assigned = True
        return True

    def poll(self, timeout_s: float) -> list[ConsumedRecord]:
        """Records that arrived since the last call (all of them on the first call)."""
        if not self._assigned and not self._assign():
            time.sleep(timeout_s)  # the topic does not exist yet
            return []
        with _translated("polling"):
            polled = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
        records = [
            ConsumedRecord(
                r.topic,
                r.partition,
                r.offset,
                r.key,
                r.value,
                r.timestamp if r.timestamp is not None and r.timestamp >= 0 else None,
            )
            for batch in polled.values()
            for r in batch
        ]
        records.sort(key=lambda r: (r.partition, r.offset))
        return records

    def close(self) -> None:
        with _translated("closing follower"):
            self._consumer.close(autocommit=False)


class OutputProducer:
    """Produces contract messages as JSON, keyed by event id; ``flush`` reports failures."""

    def __init__(self, cfg: KafkaConfig) -> None:
        with _translated("connecting producer"):
            self._producer = KafkaProducer(**producer_options(cfg))
        self._pending: list[Future[SentRecord]] = []
        self._closed = False

    def send(self, topic: str, key: str | None, message: BaseModel) -> Future[SentRecord]:
        """Queue ``message`` for ``topic``; the future resolves once the broker acknowledged it."""
        future: Future[SentRecord] = Future()
        headers = [
            ("content-type", b"application/json"),
            ("exemplar-contract", type(message).__name__.encode("ascii")),
        ]
        with _translated(f"sending to {topic!r}"):
            sent = self._producer.send(
                topic,
                key=key.encode("utf-8") if key is not None else None,
                value=encode_message(message),
                headers=headers,
            )

        def delivered(metadata: Any) -> None:
            future.set_result(SentRecord(metadata.topic, metadata.partition, metadata.offset))

        def failed(exc: BaseException) -> None:
            if isinstance(exc, kafka_errors.KafkaError):
                exc = translate_error(exc, f"delivering to {topic!r}")
            future.set_exception(exc)

        sent.add_callback(delivered)
        sent.add_errback(failed)
        self._pending.append(future)
        return future

    def flush(self, timeout_s: float | None = None) -> list[SentRecord]:
        """Wait until every send since the last flush is acknowledged.

        Raises ``BrokerUnavailable``/``StreamError`` when any of them failed or
        the timeout passed, so the caller commits input offsets only on success.
        """
        pending, self._pending = self._pending, []
        started = time.monotonic()
        with _translated("flushing"):
            self._producer.flush(timeout=timeout_s)
        # Delivery callbacks run on kafka-python's IO thread; give them a moment to land.
        remaining = (
            None if timeout_s is None else max(0.1, timeout_s - (time.monotonic() - started))
        )
        _, not_done = wait(pending, timeout=remaining)
        if not_done:
            raise BrokerUnavailable(f"{len(not_done)} of {len(pending)} sends still unacknowledged")
        failures = [exc for f in pending if (exc := f.exception()) is not None]
        if failures:
            first = failures[0]
            kind = type(first) if isinstance(first, StreamError) else StreamError
            raise kind(f"{len(failures)} of {len(pending)} sends failed; first: {first}") from first
        return [f.result() for f in pending]

    def close(self, timeout_s: float = 5.0) -> None:
        """Close without waiting longer than ``timeout_s`` for queued sends."""
        if self._closed:
            return
        self._closed = True
        with _translated("closing producer"):
            self._producer.close(timeout=timeout_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def produce_raw(
    cfg: KafkaConfig, topic: str, records: Sequence[tuple[bytes | None, bytes | None]]
) -> None:
    """Send raw key/value pairs and wait for every acknowledgement (tools, demos, tests)."""
    with _translated(f"producing to {topic!r}"):
        producer = KafkaProducer(**producer_options(cfg))
        try:
            futures = [producer.send(topic, key=k, value=v) for k, v in records]
            for future in futures:
                future.get(timeout=cfg.delivery_timeout_ms / 1000)
        finally:
            producer.close(timeout=5)
