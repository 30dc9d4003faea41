"""Human decisions against a real broker (Tansu), the real embedded store, a real tiny model.

The whole service runs as ``exemplar run --role all`` does (predictor and curator threads
sharing one store handle): a rejected event, a decision on it, and the same text sent
again is admitted with the reviewer's label — no retraining; a relabelled training
exemplar changes the next prediction that matches it; invalid decisions reach the
dead-letter topic with a reason; the audit trail and the candidate counts survive a
restart and ``exemplar audit`` lists them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import main
from daemon.config import Settings
from daemon.lifecycle import LifecycleService
from daemon.retry import Backoff
from daemon.state import LifecycleState
from model.registry import Registry
from streams.config import KafkaConfig, TopicsConfig
from streams.kafka import ensure_topics
from tests.integration.test_daemon import outputs_by_id, produce, read_topic

ODD_TEXT = "Quarterly invoice attached, please remit payment by Friday."


def make_registry(bundle: Path, directory: Path) -> Path:
    """A registry whose one (serving) version is a copy of ``bundle``."""
    registry = Registry.create(directory / "models")
    registry.promote(registry.register(bundle))
    return registry.root


def lifecycle_settings(
    model_dir: Path, kafka: KafkaConfig, topics: TopicsConfig, **curator: Any
) -> Settings:
    return Settings(
        model_dir=model_dir,
        kafka=kafka,
        topics=topics,
        batch={"max_size": 16, "max_wait_ms": 100},
        metrics={"enabled": False},
        curator={"finetune": False, **curator},
    )


def service_starter() -> Iterator[Callable[..., LifecycleService]]:
    """Starts services as ``exemplar run`` would (threads); stops them all at the end."""
    started: list[LifecycleService] = []

    def start(settings: Settings, **kwargs: Any) -> LifecycleService:
        service = LifecycleService(
            settings, backoff=Backoff(initial_s=0.1, maximum_s=0.5), **kwargs
        )
        service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


def wait_for(predicate: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def message(bootstrap: str, topic: str, event_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """The first message on ``topic`` whose id is ``event_id``."""

    def find() -> dict[str, Any] | None:
        for record in read_topic(bootstrap, topic, 0, timeout_s=1.0):
            body = json.loads(record.value)
            if body["id"] == event_id:
                return body
        return None

    return wait_for(find, timeout_s)


def send(bootstrap: str, topic: str, *bodies: dict[str, Any]) -> None:
    produce(
        bootstrap, topic, [(str(b.get("id", "")).encode(), json.dumps(b).encode()) for b in bodies]
    )


@contextmanager
def steady_stream(bootstrap: str, topic: str, texts: list[str]) -> Iterator[list[str]]:
    """Sends 5 events every 0.25 s on a thread while the body runs; yields the ids sent
    (the list grows until the body ends)."""
    sent: list[str] = []
    stop = threading.Event()

    def stream() -> None:
        i = 0
        while not stop.is_set():
            batch = [{"id": f"s-{i + j}", "text": texts[(i + j) % len(texts)]} for j in range(5)]
            send(bootstrap, topic, *batch)
            sent.extend(b["id"] for b in batch)
            i += 5
            time.sleep(0.25)

    streamer = threading.Thread(target=stream)
    streamer.start()
    try:
        yield sent
    finally:
        stop.set()
        streamer.join()


def assert_served_across_the_swap(
    bootstrap: str, topics: TopicsConfig, sent: list[str], expect: int, versions: set[str]
) -> None:
    """Every sent event came out exactly once, and both versions served some of them."""
    seen = outputs_by_id(bootstrap, topics, expect=expect, timeout_s=90)
    missing = set(sent) - set(seen)
    assert not missing, f"lost {len(missing)} events"
    assert all(len(roles) == 1 for roles in seen.values())
    served = {
        json.loads(r.value)["model_version"]
        for role in ("output", "adjudication")
        for r in read_topic(bootstrap, getattr(topics, role), 0, 3.0)
    }
    assert served == versions  # served by both, around the swap


def other_label(labels: list[str], label: str) -> str:
    return next(lab for lab in labels if lab != label)


def test_decision_on_a_rejected_event_is_used_at_once_without_retraining(
    kafka_broker: str,
    kafka_config: KafkaConfig,
    unique_topics: TopicsConfig,
    registry_root: Path,
    start_service: Callable[..., LifecycleService],
    capsys: pytest.CaptureFixture[str],
) -> None:
    ensure_topics(kafka_config, unique_topics)
    service = start_service(lifecycle_settings(registry_root, kafka_config, unique_topics))
    version = service.serving.current.version
    send(kafka_broker, unique_topics.input, {"id": "odd-1", "text": ODD_TEXT})
    rejected = message(kafka_broker, unique_topics.adjudication, "odd-1")
    human = other_label(service.serving.current.labels, rejected["predicted_label"])

    send(
        kafka_broker,
        unique_topics.decisions,
        {"id": "odd-1", "label": human, "reviewer": "alice", "note": "billing noise"},
    )
    assert service.curator is not None
    wait_for(lambda: service.curator.applied >= 1)  # type: ignore[union-attr]
    send(kafka_broker, unique_topics.input, {"id": "odd-2", "text": ODD_TEXT})
    admitted = message(kafka_broker, unique_topics.output, "odd-2")
    assert admitted["label"] == human and admitted["admitted_by"] == "human_mapping"
    assert admitted["nearest_distance"] < 1e-3
    assert admitted["model_version"] == version  # no retraining, no new version
    assert len(Registry(registry_root).versions()) == 1
    # a text close to a training exemplar is admitted and counted as a fine-tune candidate
    close = service.serving.current.store.get(["toy:11:2"])[0]
    assert close is not None and close.text
    send(kafka_broker, unique_topics.input, {"id": "close-1", "text": close.text})
    assert message(kafka_broker, unique_topics.output, "close-1")["admitted_by"] == (
        "exemplar_support"
    )
    metrics = service.prometheus
    assert (
        metrics.get_sample_value("exemplar_decisions_total", {"result": "applied", "action": "add"})
        == 1.0
    )
    service.stop()

    # the audit trail and the candidates survive a restart
    state = LifecycleState(registry_root / "state")
    entries = state.audit()
    assert [(e.action, e.target_id, e.old_label, e.new_label, e.reviewer) for e in entries] == [
        ("add", "odd-1", rejected["predicted_label"], human, "alice")
    ]
    assert entries[0].source_event == "odd-1" and entries[0].note == "billing noise"
    counts = state.candidate_counts()
    # counted per label and per nearest exemplar (the toy corpus repeats texts, so the
    # nearest may be a twin of toy:11:2)
    assert counts["label"] == {close.label: 1} and sum(counts["nearest"].values()) == 1
    state.close()
    assert main(["audit", "--model", str(registry_root)]) == 0
    listed = capsys.readouterr().out
    assert "alice" in listed and "odd-1" in listed and f"-> {human}" in listed


def test_relabelling_an_exemplar_changes_the_next_matching_prediction(
    kafka_broker: str,
    kafka_config: KafkaConfig,
    unique_topics: TopicsConfig,
    registry_root: Path,
    start_service: Callable[..., LifecycleService],
) -> None:
    ensure_topics(kafka_config, unique_topics)
    service = start_service(lifecycle_settings(registry_root, kafka_config, unique_topics))
    store = service.serving.current.store
    exemplar = store.get(["toy:11:0"])[0]
    assert exemplar is not None and exemplar.text
    send(kafka_broker, unique_topics.input, {"id": "before", "text": exemplar.text})
    before = message(kafka_broker, unique_topics.output, "before")
    assert before["label"] == exemplar.label

    new_label = other_label(service.serving.current.labels, exemplar.label)
    send(
        kafka_broker,
        unique_topics.decisions,
        {"id": "toy:11:0", "label": new_label, "reviewer": "bob", "action": "label"},
    )
    wait_for(lambda: service.curator.applied >= 1)  # type: ignore[union-attr]
    send(kafka_broker, unique_topics.input, {"id": "after", "text": exemplar.text})
    after = message(kafka_broker, unique_topics.output, "after")
    assert after["label"] == new_label and after["admitted_by"] == "human_mapping"
    changed = store.get(["toy:11:0"])[0]
    assert changed is not None and changed.source == "human"
    assert changed.meta["previous_source"] == "train"
    entry = service.state.audit()[-1]
    assert (entry.action, entry.old_label, entry.new_label, entry.old_source) == (
        "relabel",
        exemplar.label,
        new_label,
        "train",
    )


def test_invalid_decisions_reach_the_dead_letter_topic_with_a_reason(
    kafka_broker: str,
    kafka_config: KafkaConfig,
    unique_topics: TopicsConfig,
    registry_root: Path,
    start_service: Callable[..., LifecycleService],
) -> None:
    ensure_topics(kafka_config, unique_topics)
    service = start_service(lifecycle_settings(registry_root, kafka_config, unique_topics))
    produce(
        kafka_broker,
        unique_topics.decisions,
        [
            (
                b"d1",
                json.dumps(
                    {"id": "toy:11:1", "label": "no-such-label", "reviewer": "carol"}
                ).encode(),
            ),
            (
                b"d2",
                json.dumps({"id": "never-seen", "label": "good", "reviewer": "carol"}).encode(),
            ),
            (b"d3", b"{not json"),
            (b"d4", json.dumps({"id": "toy:11:1", "label": "good"}).encode()),  # no reviewer
        ],
    )
    letters = wait_for(
        lambda: (
            (found := read_topic(kafka_broker, unique_topics.dead_letter, 4, 2.0))
            and len(found) >= 4
            and found
        )
    )
    reasons = {json.loads(r.value)["id"]: json.loads(r.value)["reason"] for r in letters}
    assert reasons["toy:11:1"] == "unknown_label"
    assert reasons["never-seen"] == "unknown_id"
    assert sorted(reasons.values()) == sorted(
        ["unknown_label", "unknown_id", "not_json", "schema_violation"]
    )
    assert all(json.loads(r.value)["source_topic"] == unique_topics.decisions for r in letters)
    assert service.state.audit() == []  # nothing changed
    metrics = service.prometheus
    assert (
        metrics.get_sample_value(
            "exemplar_decisions_total", {"result": "rejected", "action": "label"}
        )
        == 2.0
    )
    assert (
        metrics.get_sample_value(
            "exemplar_decisions_total", {"result": "rejected", "action": "malformed"}
        )
        == 2.0
    )


def test_registry_from_the_command_line(
    tiny_bundle: Path, tiny_encoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.model_fixtures import toy_corpus, write_jsonl

    root = tmp_path / "imported"
    assert main(["models", "init", "--model", str(root), "--from", str(tiny_bundle)]) == 0
    registry = Registry(root)
    version = registry.serving_version()
    assert version is not None and (registry.path_of(version) / "calib.jsonl").is_file()
    capsys.readouterr()
    assert main(["models", "--model", str(root)]) == 0
    assert capsys.readouterr().out.startswith(f"* {version}  serving")
    assert main(["models", "--model", str(tmp_path / "nowhere")]) == 2
    assert "not a model registry" in capsys.readouterr().err

    rows = toy_corpus(120, seed=5)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:90])
    calib = write_jsonl(tmp_path / "calib.jsonl", rows[90:])
    trained = tmp_path / "trained"
    args = [
        "train",
        "--data",
        str(train),
        "--calib",
        str(calib),
        "--out",
        str(trained),
        "--register",
        "--base-model",
        str(tiny_encoder),
        "--filters",
        "16",
        "--layers",
        "2",
        "--epochs",
        "3",
        "--k",
        "4",
        "--quiet",
    ]
    assert main(args) == 0 and main(args) == 0  # the second one is registered, not served
    versions = Registry(trained).versions()
    assert [v.status for v in versions] == ["serving", "registered"]
    assert main(["models", "--model", str(trained), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [v["serving"] for v in listed] == [True, False]
