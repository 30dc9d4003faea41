"""The predictor loop: micro-batch in, exactly one output per event, then commit.

For every micro-batch (closed at ``batch.max_size`` records or ``batch.max_wait_ms``):

1. decode each record: an :class:`InputEvent`, or a :class:`DeadLetter` with a reason;
2. one batched forward pass, one batched store search, the admission rule;
3. send admitted events to the labels topic, the rest with their evidence to the
   adjudication topic, malformed input to the dead-letter topic — keyed by event id;
4. flush: wait until the broker acknowledged every output;
5. only then commit the batch's offsets.

A crash anywhere before 5 re-delivers the batch to whoever owns the partitions
next (at-least-once; outputs are keyed by event id so consumers can de-duplicate).
Transient failures (broker or store unreachable) are retried with backoff while
the consumer's partitions are paused, so nothing new is fetched meanwhile and the
group does not evict the member. A stop request (SIGTERM/SIGINT) only sets a flag:
the loop finishes the batch in hand, commits it, and closes everything.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

import structlog

from daemon.config import Settings
from daemon.http import Health
from daemon.metrics import AdmissionWindow, DaemonMetrics
from daemon.retry import Backoff, StopRequested, retry
from model.errors import StreamError
from model.predictor import Prediction, Predictor
from streams.contracts import (
    AdjudicationRequest,
    DeadLetter,
    InputEvent,
    LabelRecord,
    Neighbor,
    WordContribution,
    decode_event,
)
from streams.kafka import (
    BatchConsumer,
    ConsumedRecord,
    OutputProducer,
    Partition,
    ensure_topics,
    next_offsets,
    start_offsets,
)

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: nearest exemplars and words attached to an adjudication request
EVIDENCE_NEIGHBOURS = 5


class RunState(StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class BatchOutcome:
    """Counts of one committed batch (tests and the demo read these)."""

    admitted: int = 0
    adjudication: int = 0
    dead_letter: int = 0
    committed: dict[Partition, int] = field(default_factory=dict)


def adjudication_request(
    event: InputEvent, record: ConsumedRecord, pred: Prediction, version: str
) -> AdjudicationRequest:
    return AdjudicationRequest(
        id=event.id,
        text=event.text,
        meta=event.meta,
        predicted_label=pred.predicted_label,
        scores=pred.scores,
        reasons=list(pred.verdict.reasons),
        nearest=[
            Neighbor(
                exemplar_id=n.id,
                label=n.label,
                distance=max(0.0, n.distance),
                source=n.source,
                text=n.text,
            )
            for n in pred.nearest[:EVIDENCE_NEIGHBOURS]
        ],
        contributions=[
            WordContribution(word=w.word, score=w.score, start=w.start, end=w.end)
            for w in pred.words
            if w.word.strip()
        ],
        model_version=version,
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
    )


def label_record(
    event: InputEvent, record: ConsumedRecord, pred: Prediction, version: str
) -> LabelRecord:
    return LabelRecord(
        id=event.id,
        label=pred.label,
        scores=pred.scores,
        model_version=version,
        admitted_by=pred.verdict.admitted_by or "exemplar_support",
        nearest_distance=max(0.0, pred.verdict.distance or 0.0),
        support=pred.verdict.support,
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
    )


class PredictorWorker:
    """Consumes the input topic and routes every event to exactly one output topic."""

    def __init__(
        self,
        settings: Settings,
        predictor: Predictor,
        metrics: DaemonMetrics,
        backoff: Backoff | None = None,
        consumer_factory: Callable[[], BatchConsumer] | None = None,
        producer_factory: Callable[[], OutputProducer] | None = None,
        health: Health | None = None,
        on_predictions: Callable[[Sequence[tuple[InputEvent, Prediction]], Predictor], None]
        | None = None,
    ) -> None:
        """``on_predictions`` sees every batch's predictions before its outputs are sent
        (the lifecycle state records rejected and close admitted events there); a
        transient failure in it is retried like the rest of the batch."""
        self.settings = settings
        self._on_predictions = on_predictions
        self.health = health or Health()
        self.predictor = predictor
        self.metrics = metrics
        self.backoff = backoff or Backoff()
        self.state = RunState.CREATED
        self.stop_event = threading.Event()
        self._consumer_factory = consumer_factory or (
            lambda: BatchConsumer(
                settings.kafka, [settings.topics.input], group_id=settings.kafka.group_id
            )
        )
        self._producer_factory = producer_factory or (lambda: OutputProducer(settings.kafka))
        self._consumer: BatchConsumer | None = None
        self._producer: OutputProducer | None = None
        self._window = AdmissionWindow()
        self._pending_predictor: Predictor | None = None
        self._on_swapped: Callable[[Predictor], None] | None = None
        self._swap_lock = threading.Lock()
        self._last_support_check = 0.0
        self._lag_series: set[tuple[str, str]] = set()
        self.batches_done = 0
        self.totals = BatchOutcome()

    # ------------------------------------------------------------ control
    def assigned_partitions(self) -> frozenset[Partition]:
        """Input partitions this member owns now (empty before it joined the group)."""
        consumer = self._consumer
        return consumer.assignment() if consumer is not None else frozenset()

    def request_stop(self) -> None:
        """Ask the loop to finish its batch and stop; safe from a signal handler."""
        self.stop_event.set()

    def swap_predictor(
        self, predictor: Predictor, on_swapped: Callable[[Predictor], None] | None = None
    ) -> None:
        """Serve ``predictor`` from the next batch on (never in the middle of one).

        ``on_swapped(old)`` runs on the loop's thread once no batch uses the old
        predictor any more (the place to close its store).
        """
        with self._swap_lock:
            self._pending_predictor = predictor
            self._on_swapped = on_swapped

    # ------------------------------------------------------------ main loop
    def _set_state(self, state: RunState) -> None:
        self.state = state
        self.health.beat(state.value)

    def run(self) -> None:
        self._set_state(RunState.STARTING)
        stop = self.stop_event
        with ExitStack() as stack:
            try:
                if self.settings.topics.create_missing:
                    retry(
                        "ensure_topics",
                        lambda: ensure_topics(self.settings.kafka, self.settings.topics),
                        stop,
                        self.backoff,
                        self._count_retry,
                    )
                self._consumer = retry(
                    "connect_consumer",
                    self._consumer_factory,
                    stop,
                    self.backoff,
                    self._count_retry,
                )
                stack.callback(self._consumer.close)
                self._producer = retry(
                    "connect_producer",
                    self._producer_factory,
                    stop,
                    self.backoff,
                    self._count_retry,
                )
                stack.callback(self._producer.close)
            except StopRequested:
                self._set_state(RunState.STOPPED)
                return
            self._publish_model()
            self._set_state(RunState.RUNNING)
            self.metrics.running.set(1)
            log.info(
                "predictor_running",
                input=self.settings.topics.input,
                group=self.settings.kafka.group_id,
                model=self.predictor.version,
            )
            try:
                while not stop.is_set():
                    self.health.beat()
                    self._apply_swap()
                    records = retry(
                        "poll", lambda: self._poll(), stop, self.backoff, self._count_retry
                    )
                    if records:
                        self.process(records)
                    self._observe_lag()
            except StopRequested:
                log.info("stopped_during_retry")
            finally:
                self._set_state(RunState.STOPPING)
                self.metrics.running.set(0)
        self._set_state(RunState.STOPPED)
        log.info("predictor_stopped", batches=self.batches_done)

    def _poll(self) -> list[ConsumedRecord]:
        assert self._consumer is not None
        batch = self.settings.batch
        return self._consumer.poll_batch(batch.max_size, batch.max_wait_ms / 1000)

    # ------------------------------------------------------------ one batch
    def process(self, records: Sequence[ConsumedRecord]) -> BatchOutcome:
        """Route one micro-batch and commit it. Retries transient failures in place."""
        assert self._consumer is not None and self._producer is not None
        started = time.perf_counter()
        stage = self.metrics.stage_duration
        self.metrics.batch_size.observe(len(records))
        max_text = self.settings.batch.max_text_bytes

        t0 = time.perf_counter()
        decoded = [
            decode_event(r.value, r.key, r.topic, r.partition, r.offset, max_text) for r in records
        ]
        stage.labels("decode").observe(time.perf_counter() - t0)
        events = [
            (r, d) for r, d in zip(records, decoded, strict=True) if isinstance(d, InputEvent)
        ]
        texts = [d.text for _, d in events]

        predictor = self.predictor
        result = self._with_paused("predict", lambda: predictor.predict(texts))
        for name, seconds in result.timings.items():
            stage.labels(name).observe(seconds)
        if self._on_predictions is not None:
            observed = [
                (event, pred) for (_, event), pred in zip(events, result.predictions, strict=True)
            ]
            hook = self._on_predictions
            self._with_paused("record", lambda: hook(observed, predictor))

        outcome = BatchOutcome()
        messages: list[tuple[str, str, object]] = []
        topics = self.settings.topics
        for (record, event), pred in zip(events, result.predictions, strict=True):
            self._observe_prediction(pred)
            if pred.admitted:
                messages.append(
                    (topics.output, event.id, label_record(event, record, pred, predictor.version))
                )
                outcome.admitted += 1
            else:
                messages.append(
                    (
                        topics.adjudication,
                        event.id,
                        adjudication_request(event, record, pred, predictor.version),
                    )
                )
                outcome.adjudication += 1
        for item in decoded:
            if isinstance(item, DeadLetter):
                messages.append((topics.dead_letter, item.id, item))
                outcome.dead_letter += 1
                self.metrics.dead_letters.labels(item.reason).inc()

        t0 = time.perf_counter()
        self._with_paused("produce", lambda: self._send_all(messages))
        stage.labels("produce").observe(time.perf_counter() - t0)

        t0 = time.perf_counter()
        offsets = next_offsets(records)
        try:
            self._with_paused("commit", lambda: self._consumer.commit(offsets))  # type: ignore[union-attr]
            outcome.committed = offsets
        except StreamError as exc:
            # The group moved the partitions elsewhere: the new owner re-reads from the
            # last commit, so these events are re-processed there (at least once).
            self.metrics.errors.labels("commit_rejected").inc()
            log.warning("commit_rejected", error=str(exc), partitions=sorted(offsets))
        stage.labels("commit").observe(time.perf_counter() - t0)

        now_ms = time.time() * 1000
        for r in records:
            if r.timestamp_ms is not None:
                self.metrics.event_latency.observe(max(0.0, (now_ms - r.timestamp_ms) / 1000))
        for name, count in (
            ("admitted", outcome.admitted),
            ("adjudication", outcome.adjudication),
            ("dead_letter", outcome.dead_letter),
        ):
            if count:
                self.metrics.events.labels(name).inc(count)
        self.metrics.batches.inc()
        self.metrics.last_batch.set(time.time())
        stage.labels("batch").observe(time.perf_counter() - started)
        self.batches_done += 1
        self.totals.admitted += outcome.admitted
        self.totals.adjudication += outcome.adjudication
        self.totals.dead_letter += outcome.dead_letter
        log.debug(
            "batch_committed",
            records=len(records),
            admitted=outcome.admitted,
            adjudication=outcome.adjudication,
            dead_letter=outcome.dead_letter,
        )
        return outcome

    def _send_all(self, messages: Sequence[tuple[str, str, object]]) -> None:
        """Send every output of the batch and wait for all acknowledgements.

        A retry sends the whole batch again: duplicates are possible, losses are not.
        """
        assert self._producer is not None
        for topic, key, message in messages:
            self._producer.send(topic, key, message)  # type: ignore[arg-type]
        self._producer.flush(self.settings.kafka.request_timeout_ms / 1000)

    def _with_paused(self, operation: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; while it fails transiently, pause fetching and keep the membership."""
        assert self._consumer is not None
        consumer = self._consumer
        paused: set[Partition] = set()

        def wait(seconds: float) -> None:
            assigned = consumer.assignment()
            consumer.pause(assigned - paused)
            paused.update(assigned)
            # Polling a paused consumer fetches nothing but keeps it in the group.
            # Anything that still arrives (a partition assigned meanwhile) is rewound.
            try:
                stray = consumer.poll_batch(1_000_000, seconds)
            except StreamError:
                self.stop_event.wait(seconds)
                return
            if stray:
                consumer.seek(start_offsets(stray))

        try:
            # The stop flag is not consulted here: the batch in hand must finish so
            # its offsets can be committed; a separate Event lets retries run on.
            return retry(
                operation, fn, threading.Event(), self.backoff, self._count_retry, wait=wait
            )
        finally:
            if paused:
                consumer.resume(paused)

    # ------------------------------------------------------------ metrics
    def _count_retry(self, operation: str, _exc: BaseException) -> None:
        self.metrics.retries.labels(operation).inc()
        self.health.beat()  # retrying is progress: alive, and visibly not stuck

    def _observe_prediction(self, pred: Prediction) -> None:
        m = self.metrics
        label = pred.predicted_label
        if pred.admitted:
            m.admitted.labels(pred.label, pred.verdict.admitted_by or "").inc()
        else:
            for reason in pred.verdict.reasons:
                m.rejections.labels(reason, label).inc()
        if pred.verdict.distance is not None:
            m.nearest_distance.labels(label).observe(pred.verdict.distance)
            tau = self.predictor.thresholds.tau.get(label)
            if tau:
                m.nearest_distance_ratio.labels(label).observe(pred.verdict.distance / tau)
        m.admission_ratio.labels(label).set(self._window.add(label, pred.admitted))

    def _observe_lag(self) -> None:
        assert self._consumer is not None
        try:
            seen: set[tuple[str, str]] = set()
            for part, lag in self._consumer.lag().items():
                if lag is not None:
                    key = (part.topic, str(part.partition))
                    self.metrics.consumer_lag.labels(*key).set(lag)
                    seen.add(key)
            # A partition that moved to another member is that member's to report; a
            # stale series here would add its last lag to every sum forever.
            for key in self._lag_series - seen:
                self.metrics.consumer_lag.remove(*key)
            self._lag_series = seen
        except StreamError as exc:
            log.debug("lag_unavailable", error=str(exc))
        now = time.monotonic()
        if now - self._last_support_check > 15.0:
            self._last_support_check = now
            self.metrics.support_set_size.set(self.predictor.store.count())

    def _publish_model(self) -> None:
        self.metrics.model_info.info({"version": self.predictor.version})
        self.metrics.support_set_size.set(self.predictor.store.count())
        self._last_support_check = time.monotonic()

    def _apply_swap(self) -> None:
        with self._swap_lock:
            pending, self._pending_predictor = self._pending_predictor, None
            on_swapped, self._on_swapped = self._on_swapped, None
        if pending is not None:
            log.info("model_swapped", old=self.predictor.version, new=pending.version)
            old, self.predictor = self.predictor, pending
            self._publish_model()
            if on_swapped is not None:
                on_swapped(old)
