"""The curator: human decisions change the support set at once, with an audit trail.

A :class:`~streams.contracts.Decision` on ``exemplar.decisions`` names an event id or
an exemplar id:

* an exemplar already in the support set is **relabelled**: its truth becomes the
  reviewer's label and its source ``human`` (so it takes part in admission with that
  label, and overrides the model's output for near-duplicates: DESIGN §3);
* an adjudicated event (the predictor recorded it in the lifecycle state when it
  routed it to humans) becomes a **new mapping**: its text is embedded by the network
  that serves now and added with the reviewer's label, source ``human``;
* ``action="discard"`` deletes an exemplar, or closes an adjudicated event unmapped.

Invalid decisions (malformed, unknown label, unknown id) go to the dead-letter topic
with a reason code. Every change is appended to the audit trail (who, when, old ->
new, source event); a re-delivered decision (same topic/partition/offset) is skipped.

:class:`CuratorWorker` is the Kafka loop around :class:`DecisionApplier`: poll a batch,
apply, send dead letters, flush, commit (at-least-once, like the predictor).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from daemon.config import Settings
from daemon.handoff import LifecycleFeed
from daemon.metrics import LifecycleMetrics
from daemon.retry import Backoff, StopRequested, retry
from daemon.serving import ServingModel
from daemon.state import LifecycleState
from model.errors import StreamError
from model.predictor import Predictor
from model.store.base import Exemplar, ExemplarStore
from streams.contracts import DeadLetter, Decision, decode_message, make_dead_letter
from streams.kafka import (
    BatchConsumer,
    ConsumedRecord,
    OutputProducer,
    ensure_topics,
    next_offsets,
)

log = structlog.get_logger(__name__)

UNKNOWN_LABEL = "unknown_label"
UNKNOWN_ID = "unknown_id"


@dataclass(frozen=True)
class Applied:
    """A decision that changed the support set (or was already applied)."""

    action: str  # add | relabel | delete | discard
    target_id: str
    duplicate: bool = False


@dataclass(frozen=True)
class Invalid:
    """A decision that could not be applied; it goes to the dead-letter topic."""

    reason: str
    detail: str


class DecisionApplier:
    """Applies one decision to the serving support set and the audit trail."""

    def __init__(
        self,
        serving: ServingModel,
        state: LifecycleState,
        catch_up: Callable[[str], bool] | None = None,
    ) -> None:
        """``catch_up(event_id)`` (split roles) reads the predictors' notes until the
        event is known or a timeout passed, before a decision's id is called unknown."""
        self.serving = serving
        self.state = state
        self.catch_up = catch_up

    def apply(self, decision: Decision, ref: str | None = None) -> Applied | Invalid:
        """Apply ``decision``; ``ref`` (topic:partition:offset) makes re-delivery a no-op."""
        with self.serving.lock:
            current = self.serving.current
            if ref is not None and self.state.has_decision(ref):
                return Applied("duplicate", decision.id, duplicate=True)
            labels = current.labels
            if decision.action == "label" and decision.label not in labels:
                return Invalid(
                    UNKNOWN_LABEL, f"label {decision.label!r} is not one of the model's {labels}"
                )
            common: dict[str, Any] = {
                "reviewer": decision.reviewer,
                "note": decision.note,
                "model_version": current.version,
                "decided_at": decision.decided_at.isoformat(timespec="seconds"),
                "decision_ref": ref,
            }
            meta = {"reviewer": decision.reviewer, "decided_at": common["decided_at"]}
            if decision.note:
                meta["note"] = decision.note
            existing = current.store.get([decision.id])[0]
            if existing is not None:
                if decision.action == "discard":
                    current.store.delete([decision.id])
                    self.state.append_audit(
                        action="delete",
                        target_id=decision.id,
                        source_event=None,
                        old_label=existing.label,
                        new_label=None,
                        old_source=existing.source,
                        new_source=None,
                        text=None,
                        **common,
                    )
                    return Applied("delete", decision.id)
                assert decision.label is not None
                relabel_as_human(
                    current.predictor,
                    current.store,
                    existing,
                    decision.label,
                    {**meta, "previous_source": existing.source},
                )
                self.state.append_audit(
                    action="relabel",
                    target_id=decision.id,
                    source_event=existing.meta.get("event_id"),
                    old_label=existing.label,
                    new_label=decision.label,
                    old_source=existing.source,
                    new_source="human",
                    text=None,
                    **common,
                )
                return Applied("relabel", decision.id)
            pending = self.state.pending(decision.id)
            if pending is None and self.catch_up is not None and self.catch_up(decision.id):
                pending = self.state.pending(decision.id)
            if pending is None:
                return Invalid(
                    UNKNOWN_ID,
                    f"{decision.id!r} is neither an adjudicated event "
                    "nor an exemplar of the support set",
                )
            if decision.action == "discard":
                self.state.close_pending(decision.id, "discarded")
                self.state.append_audit(
                    action="discard",
                    target_id=decision.id,
                    source_event=decision.id,
                    old_label=pending.predicted_label,
                    new_label=None,
                    old_source="adjudication",
                    new_source=None,
                    text=pending.text,
                    **common,
                )
                return Applied("discard", decision.id)
            assert decision.label is not None
            add_mapping(
                current.predictor,
                current.store,
                decision.id,
                pending.text,
                decision.label,
                {**meta, "event_id": decision.id},
            )
            self.state.close_pending(decision.id, "mapped")
            self.state.append_audit(
                action="add",
                target_id=decision.id,
                source_event=decision.id,
                old_label=pending.predicted_label,
                new_label=decision.label,
                old_source="adjudication",
                new_source="human",
                text=pending.text,
                **common,
            )
            return Applied("add", decision.id)


def add_mapping(
    predictor: Predictor,
    store: ExemplarStore,
    exemplar_id: str,
    text: str,
    label: str,
    meta: Mapping[str, Any],
) -> None:
    """Embed ``text`` with the serving network and add it as a human mapping."""
    fwd = predictor.forward([text], explain=False)
    predicted = predictor.labels[int(fwd.probs[0].argmax())]
    store.upsert(
        [
            Exemplar(
                id=exemplar_id,
                vector=fwd.exemplars[0],
                label=label,
                predicted=predicted,
                source="human",
                text=text,
                meta=meta,
            )
        ]
    )


def relabel_as_human(
    predictor: Predictor,
    store: ExemplarStore,
    existing: Exemplar,
    label: str,
    meta: Mapping[str, Any],
) -> None:
    """Make ``existing`` a human mapping with ``label``.

    When its text is stored, the vector is recomputed by the serving network's live
    path too: support vectors written at build time come from cached bf16 encoder
    features, a few thousandths away from what the same text yields when it streams
    in, which is farther than the near-duplicate distance a human mapping needs to
    override the output.
    """
    if existing.text is None:
        store.relabel(existing.id, label, source="human", meta=meta)
        return
    add_mapping(predictor, store, existing.id, existing.text, label, {**existing.meta, **meta})


def refresh_human_vectors(predictor: Predictor, store: ExemplarStore) -> int:
    """Re-embed every human mapping with the live path (after a rebuild); returns how many."""
    humans = [ex for ex in store.iter_exemplars() if ex.source == "human" and ex.text]
    if not humans:
        return 0
    fwd = predictor.forward([str(ex.text) for ex in humans], explain=False)
    store.upsert(
        [
            Exemplar(
                id=ex.id,
                vector=fwd.exemplars[i],
                label=ex.label,
                predicted=predictor.labels[int(fwd.probs[i].argmax())],
                source="human",
                text=ex.text,
                meta=ex.meta,
            )
            for i, ex in enumerate(humans)
        ]
    )
    return len(humans)


class CuratorWorker:
    """Consumes ``exemplar.decisions`` and applies each decision, at least once."""

    def __init__(
        self,
        settings: Settings,
        applier: DecisionApplier,
        metrics: LifecycleMetrics,
        backoff: Backoff | None = None,
        on_idle: Callable[[], None] | None = None,
        feed: LifecycleFeed | None = None,
    ) -> None:
        """``feed`` (split roles): the predictors' notes, read beside the decisions."""
        self.settings = settings
        self.feed = feed
        self._consumer: BatchConsumer | None = None
        if feed is not None:
            applier.catch_up = self._catch_up
        self.applier = applier
        self.metrics = metrics
        self.backoff = backoff or Backoff()
        self.stop_event = threading.Event()
        self.on_idle = on_idle
        self.group_id = settings.curator.group_id or f"{settings.kafka.group_id}-curator"
        self.running = threading.Event()
        self.applied = 0
        self.rejected = 0

    def request_stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        stop = self.stop_event
        topics = self.settings.topics
        try:
            if topics.create_missing:
                retry(
                    "ensure_topics",
                    lambda: ensure_topics(self.settings.kafka, topics),
                    stop,
                    self.backoff,
                )
            consumer = retry(
                "connect_curator",
                lambda: BatchConsumer(self.settings.kafka, self._topics(), group_id=self.group_id),
                stop,
                self.backoff,
            )
            self._consumer = consumer
        except StopRequested:
            return
        try:
            producer = retry(
                "connect_producer", lambda: OutputProducer(self.settings.kafka), stop, self.backoff
            )
        except StopRequested:
            consumer.close()
            return
        self.running.set()
        log.info("curator_running", decisions=topics.decisions, group=self.group_id)
        last_idle = 0.0
        try:
            while not stop.is_set():
                records = retry(
                    "poll_decisions", lambda: consumer.poll_batch(64, 0.5), stop, self.backoff
                )
                if records:
                    self._process(records, consumer, producer)
                now = time.monotonic()
                if self.on_idle is not None and now - last_idle > 2.0:
                    last_idle = now
                    self.on_idle()
        except StopRequested:
            pass
        finally:
            self.running.clear()
            producer.close()
            consumer.close()
            log.info("curator_stopped", applied=self.applied, rejected=self.rejected)

    def _topics(self) -> list[str]:
        topics = self.settings.topics
        return [topics.decisions] + ([topics.lifecycle] if self.feed is not None else [])

    def _catch_up(self, event_id: str) -> bool:
        assert self.feed is not None and self._consumer is not None
        return self.feed.catch_up(self._consumer, event_id)

    def _process(
        self, records: Sequence[ConsumedRecord], consumer: BatchConsumer, producer: OutputProducer
    ) -> None:
        dead: list[DeadLetter] = []
        if self.feed is not None:
            self.feed.record(records)  # the batch's notes first: its decisions may need them
        decisions = self.settings.topics.decisions
        for r in records:
            if r.topic != decisions:
                continue
            decoded = decode_message(Decision, r.value, r.key, r.topic, r.partition, r.offset)
            if isinstance(decoded, DeadLetter):
                dead.append(decoded)
                self.metrics.decisions.labels("rejected", "malformed").inc()
                continue
            ref = f"{r.topic}:{r.partition}:{r.offset}"
            outcome = self.applier.apply(decoded, ref)
            if isinstance(outcome, Invalid):
                dead.append(
                    make_dead_letter(
                        outcome.reason,
                        outcome.detail,
                        topic=r.topic,
                        partition=r.partition,
                        offset=r.offset,
                        key=r.key,
                        value=r.value,
                        event_id=decoded.id,
                    )
                )
                self.metrics.decisions.labels("rejected", decoded.action).inc()
                self.rejected += 1
                log.info(
                    "decision_rejected", id=decoded.id, reason=outcome.reason, detail=outcome.detail
                )
            else:
                if not outcome.duplicate:
                    self.metrics.decisions.labels("applied", outcome.action).inc()
                    self.applied += 1
                log.info(
                    "decision_applied",
                    id=decoded.id,
                    action=outcome.action,
                    reviewer=decoded.reviewer,
                    duplicate=outcome.duplicate,
                )
        rejected_malformed = sum(1 for d in dead if d.reason not in (UNKNOWN_ID, UNKNOWN_LABEL))
        self.rejected += rejected_malformed
        stop = threading.Event()  # the batch in hand finishes even when a stop was asked

        def send() -> None:
            for letter in dead:
                producer.send(self.settings.topics.dead_letter, letter.id, letter)
            producer.flush(self.settings.kafka.request_timeout_ms / 1000)

        if dead:
            retry("send_dead_letters", send, stop, self.backoff)
        try:
            retry(
                "commit_decisions",
                lambda: consumer.commit(next_offsets(records)),
                stop,
                self.backoff,
            )
        except StreamError as exc:  # partitions moved: re-delivery is de-duplicated by ref
            log.warning("commit_rejected", error=str(exc))
