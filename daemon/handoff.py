"""What the predictor hands the curator, and how predictors learn of a promotion.

**Events for the curator.** Rejected events may come back as human decisions, close
admitted ones count towards the next fine-tune; the curator keeps both in its
lifecycle state.

* One process (``--role all``): :class:`StateRecorder` writes them straight into the
  state file. The row is committed before the adjudication request is produced, so a
  decision can never race ahead of it.
* Split roles (``--role predictor`` and ``--role curator``, store server):
  :class:`TopicRecorder` publishes them as :class:`~streams.contracts.LifecycleNote`
  records on ``exemplar.lifecycle`` and waits for the broker's ack before the batch's
  outputs are produced. The curator reads that topic beside the decisions;
  :class:`LifecycleFeed` records a batch's notes before its decisions are applied, and
  reads on before it calls a decision's id unknown: the decision follows the
  adjudication request a reviewer saw, which follows the note, so the note is in the
  log by then.

**Promotions.** :class:`ModelWatcher` runs beside a predictor in its own process: it
follows ``exemplar.models`` and, on each announcement and every
``curator.model_check_interval_s``, reads the registry's SERVING pointer; when that
names another version, the version is opened and swapped in between two batches.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import structlog

from daemon.config import CuratorConfig, Settings
from daemon.metrics import LifecycleMetrics
from daemon.retry import Backoff, StopRequested, retry
from daemon.serving import ServingModel
from daemon.state import Candidate, LifecycleState, PendingEvent
from model.admission import EXEMPLAR_SUPPORT
from model.errors import ExemplarError
from model.predictor import Prediction, Predictor
from model.registry import Registry
from streams.contracts import DeadLetter, InputEvent, LifecycleNote, decode_message
from streams.kafka import (
    BatchConsumer,
    ConsumedRecord,
    OutputProducer,
    TopicFollower,
    next_offsets,
    start_offsets,
)

log = structlog.get_logger(__name__)

Observed = Sequence[tuple[InputEvent, Prediction]]

#: How long a curator keeps draining ``exemplar.lifecycle`` for a decision's unknown id.
CATCH_UP_S = 5.0


def sort_out(
    items: Observed, predictor: Predictor, config: CuratorConfig
) -> tuple[list[PendingEvent], list[Candidate]]:
    """Rejected events (pending a decision) and admitted ones close to their exemplar."""
    pending: list[PendingEvent] = []
    candidates: list[Candidate] = []
    for event, pred in items:
        verdict = pred.verdict
        if not verdict.admitted:
            pending.append(
                PendingEvent(
                    event.id,
                    event.text,
                    pred.predicted_label,
                    verdict.reasons,
                    predictor.version,
                    0.0,
                    "open",
                )
            )
            continue
        tau = predictor.thresholds.tau.get(pred.label)
        if (
            verdict.admitted_by != EXEMPLAR_SUPPORT
            or not pred.nearest
            or not tau
            or verdict.distance is None
        ):
            continue
        ratio = verdict.distance / tau
        if ratio <= config.candidate_ratio:
            nearest = pred.nearest[0]
            candidates.append(
                Candidate(
                    event.id,
                    event.text,
                    pred.label,
                    nearest.id,
                    nearest.label,
                    verdict.distance,
                    ratio,
                    predictor.version,
                )
            )
    return pending, candidates


class StateRecorder:
    """The predictor's hook in one process: straight into the lifecycle state."""

    def __init__(self, state: LifecycleState, config: CuratorConfig) -> None:
        self.state = state
        self.config = config

    def __call__(self, items: Observed, predictor: Predictor) -> None:
        pending, candidates = sort_out(items, predictor, self.config)
        self.state.record_batch(pending, candidates, self.config.pending_ttl_s)

    def close(self) -> None:
        """Nothing of its own to release (the state belongs to the service)."""


def to_notes(
    pending: Sequence[PendingEvent], candidates: Sequence[Candidate]
) -> list[LifecycleNote]:
    notes = [
        LifecycleNote(
            kind="pending",
            id=p.id,
            text=p.text,
            label=p.predicted_label,
            model_version=p.model_version,
            reasons=list(p.reasons),
        )
        for p in pending
    ]
    notes.extend(
        LifecycleNote(
            kind="candidate",
            id=c.id,
            text=c.text,
            label=c.label,
            model_version=c.model_version,
            nearest_id=c.nearest_id,
            nearest_label=c.nearest_label,
            distance=c.distance,
            ratio=c.ratio,
        )
        for c in candidates
    )
    return notes


def from_notes(notes: Sequence[LifecycleNote]) -> tuple[list[PendingEvent], list[Candidate]]:
    pending = [
        PendingEvent(n.id, n.text, n.label, tuple(n.reasons), n.model_version, 0.0, "open")
        for n in notes
        if n.kind == "pending"
    ]
    candidates = [
        Candidate(
            n.id,
            n.text,
            n.label,
            str(n.nearest_id),
            str(n.nearest_label or n.label),
            float(n.distance or 0.0),
            float(n.ratio or 0.0),
            n.model_version,
        )
        for n in notes
        if n.kind == "candidate"
    ]
    return pending, candidates


class TopicRecorder:
    """The predictor's hook across processes: notes on ``exemplar.lifecycle``, acked.

    Runs inside the predictor's retry (partitions paused), so a broker hiccup delays
    the batch rather than losing a note; a retry may send a note twice, which the
    curator's state absorbs (keyed by event id).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: OutputProducer | None = None

    def __call__(self, items: Observed, predictor: Predictor) -> None:
        notes = to_notes(*sort_out(items, predictor, self.settings.curator))
        if not notes:
            return
        if self._producer is None:
            self._producer = OutputProducer(self.settings.kafka)
        topic = self.settings.topics.lifecycle
        try:
            for note in notes:
                self._producer.send(topic, note.id, note)
            self._producer.flush(self.settings.kafka.request_timeout_ms / 1000)
        except BaseException:
            self.close()  # the next attempt starts on a fresh connection
            raise

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.close()


class LifecycleFeed:
    """The curator's side of ``exemplar.lifecycle``: notes into the lifecycle state.

    The curator's one consumer reads this topic beside ``exemplar.decisions`` (one
    group membership to keep alive); each polled batch's notes are recorded before its
    decisions are applied, and ``catch_up`` reads on with the decisions paused.
    """

    def __init__(self, settings: Settings, state: LifecycleState) -> None:
        self.topic = settings.topics.lifecycle
        self.pending_ttl_s = settings.curator.pending_ttl_s
        self.state = state
        self.recorded = 0

    def record(self, records: Sequence[ConsumedRecord]) -> int:
        """Record the notes among ``records`` (others are ignored); returns how many."""
        notes: list[LifecycleNote] = []
        for r in records:
            if r.topic != self.topic:
                continue
            decoded = decode_message(LifecycleNote, r.value, r.key, r.topic, r.partition, r.offset)
            if isinstance(decoded, DeadLetter):  # only our predictors write here
                log.error(
                    "lifecycle_note_unreadable",
                    reason=decoded.reason,
                    detail=decoded.detail,
                    partition=r.partition,
                    offset=r.offset,
                )
                continue
            notes.append(decoded)
        pending, candidates = from_notes(notes)
        self.state.record_batch(pending, candidates, self.pending_ttl_s)
        self.recorded += len(notes)
        return len(notes)

    def catch_up(
        self, consumer: BatchConsumer, event_id: str, timeout_s: float = CATCH_UP_S
    ) -> bool:
        """Read notes (decisions paused) until ``event_id`` is known or ``timeout_s`` passed.

        Offsets of the notes read here are committed at once: the state has them."""
        deadline = time.monotonic() + timeout_s
        others = {tp for tp in consumer.assignment() if tp.topic != self.topic}
        consumer.pause(others)
        try:
            while self.state.pending(event_id) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                records = consumer.poll_batch(512, min(0.5, remaining))
                stray = [r for r in records if r.topic != self.topic]
                if stray:  # a partition assigned meanwhile: read it again later
                    consumer.seek(start_offsets(stray))
                notes = [r for r in records if r.topic == self.topic]
                if notes:
                    self.record(notes)
                    consumer.commit(next_offsets(notes))
            return True
        finally:
            consumer.resume(others)


class ModelWatcher:
    """Swaps the version the registry's SERVING pointer names into a predictor process."""

    def __init__(
        self,
        settings: Settings,
        serving: ServingModel,
        registry: Registry,
        metrics: LifecycleMetrics,
        stop: threading.Event,
        backoff: Backoff | None = None,
    ) -> None:
        self.settings = settings
        self.serving = serving
        self.registry = registry
        self.metrics = metrics
        self.stop = stop
        self.backoff = backoff or Backoff(maximum_s=10.0)
        self.swaps = 0

    def check(self) -> str | None:
        """Swap in the version SERVING names if it is not the current one; returns it."""
        version = self.registry.serving_version()
        if version is None or version == self.serving.current.version:
            return None
        try:
            new = self.serving.open_version(self.registry.path_of(version))
        except ExemplarError as exc:  # e.g. the pointer names a version still being copied
            log.warning("model_not_loadable", version=version, error=str(exc))
            return None
        old = self.serving.swap(new)
        self.swaps += 1
        self.metrics.serving_version.info({"version": version})
        log.info("model_followed", version=version, previous=old.version)
        return version

    def run(self) -> None:
        interval = self.settings.curator.model_check_interval_s
        try:
            follower = retry(
                "follow_models",
                lambda: TopicFollower(self.settings.kafka, self.settings.topics.model_updates),
                self.stop,
                self.backoff,
            )
        except StopRequested:
            return
        log.info(
            "model_watcher_running", topic=self.settings.topics.model_updates, interval_s=interval
        )
        last_check = time.monotonic()
        try:
            while not self.stop.is_set():
                try:
                    announced = follower.poll(min(1.0, interval))
                except ExemplarError as exc:
                    log.warning("model_updates_unreadable", error=str(exc))
                    announced = []
                    self.stop.wait(1.0)
                if announced or time.monotonic() - last_check >= interval:
                    last_check = time.monotonic()
                    self.check()
        finally:
            follower.close()
