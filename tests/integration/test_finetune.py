"""Scheduled fine-tuning end to end: real broker, real store, real (tiny) training job.

* low thresholds: candidates trigger the APScheduler check, the job trains, the new
  version is promoted, announced on the models topic and swapped into the running
  predictor while events keep flowing — none lost, none processed twice; a human
  mapping made before the job and a relabel made while it ran are both in the new
  version;
* a model trained on shuffled labels is not promoted, and the reason is recorded;
* a job killed with SIGKILL midway leaves the old version serving.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.lifecycle import LifecycleService
from model.data import Example
from model.registry import Registry
from streams.config import KafkaConfig, TopicsConfig
from streams.kafka import ensure_topics
from tests.integration.test_curator import (
    ODD_TEXT,
    assert_served_across_the_swap,
    lifecycle_settings,
    message,
    other_label,
    send,
    steady_stream,
    wait_for,
)
from tests.integration.test_daemon import read_topic
from tests.model_fixtures import toy_corpus


@pytest.mark.slow
def test_candidates_trigger_a_fine_tune_that_is_promoted_and_swapped_in_mid_stream(
    kafka_broker: str,
    kafka_config: KafkaConfig,
    unique_topics: TopicsConfig,
    registry_root: Path,
    start_service: Callable[..., LifecycleService],
    capsys: pytest.CaptureFixture[str],
) -> None:
    ensure_topics(kafka_config, unique_topics)
    settings = lifecycle_settings(
        registry_root,
        kafka_config,
        unique_topics,
        finetune=True,
        check_interval_s=1.0,
        min_candidates=20,
        min_decisions=1000,
        min_interval_s=600.0,
        candidate_ratio=1.0,
        max_epochs=10,
    )
    service = start_service(settings, fault_delay_s=2.0)
    old_version = service.serving.current.version
    labels = service.serving.current.labels

    # a human mapping made before the job must be in the new version
    send(kafka_broker, unique_topics.input, {"id": "odd-1", "text": ODD_TEXT})
    predicted = message(kafka_broker, unique_topics.adjudication, "odd-1")["predicted_label"]
    human = other_label(labels, predicted)
    send(
        kafka_broker, unique_topics.decisions, {"id": "odd-1", "label": human, "reviewer": "alice"}
    )
    wait_for(lambda: service.curator.applied >= 1)  # type: ignore[union-attr]

    # a steady stream of in-domain events: candidates accumulate, the job starts, the
    # swap happens while events are still arriving
    texts = [r["text"] for r in toy_corpus(60, seed=99)]
    with steady_stream(kafka_broker, unique_topics.input, texts) as sent:
        runner = service.runner
        assert runner is not None
        wait_for(lambda: runner.process is not None, 90)
        # a decision made while the job runs lands on the old version and is replayed
        relabel = other_label(labels, "good")
        send(
            kafka_broker,
            unique_topics.decisions,
            {"id": "toy:11:1", "label": relabel, "reviewer": "bob"},
        )
        wait_for(lambda: service.curator.applied >= 2)  # type: ignore[union-attr]
        registry = Registry(registry_root)
        wait_for(lambda: registry.serving_version() != old_version, 120)
        new_version = registry.serving_version()
        wait_for(lambda: service.worker.predictor.version == new_version, 30)  # type: ignore[union-attr]
        time.sleep(1.5)  # keep streaming through and past the swap

    assert_served_across_the_swap(
        kafka_broker, unique_topics, sent, len(sent) + 1, {old_version, str(new_version)}
    )

    updates = [
        json.loads(r.value) for r in read_topic(kafka_broker, unique_topics.model_updates, 1)
    ]
    assert updates[0]["version"] == new_version
    assert updates[0]["previous_version"] == old_version

    store = service.serving.current.store
    mapping, relabelled = store.get(["odd-1", "toy:11:1"])
    assert mapping is not None and (mapping.source, mapping.label) == ("human", human)
    assert relabelled is not None and (relabelled.source, relabelled.label) == ("human", relabel)
    send(kafka_broker, unique_topics.input, {"id": "odd-again", "text": ODD_TEXT})
    again = message(kafka_broker, unique_topics.output, "odd-again")
    assert (again["label"], again["admitted_by"], again["model_version"]) == (
        human,
        "human_mapping",
        new_version,
    )

    metrics = service.prometheus
    assert metrics.get_sample_value("exemplar_finetune_runs_total", {"outcome": "promoted"}) == 1.0
    assert metrics.get_sample_value("exemplar_finetune_duration_seconds_count") == 1.0
    assert (metrics.get_sample_value("exemplar_last_promotion_timestamp_seconds") or 0) > 0
    used = service.state.candidate_statuses().get(f"used:{new_version}", 0)
    assert used >= 20  # the candidates the run trained on are not counted again
    lifecycle = registry.read_lifecycle(new_version or "")
    assert lifecycle["status"] == "promoted" and lifecycle["replayed_decisions"] >= 1
    assert main(["models", "--model", str(registry_root)]) == 0
    listed = capsys.readouterr().out
    assert f"* {new_version}  serving" in listed and f"  {old_version}  retired" in listed

    # a rollback goes through the curator: a decision made on the new version is
    # replayed onto the old one before it serves again
    late = next(ex for ex in store.iter_exemplars() if ex.source == "train" and ex.id != "toy:11:1")
    late_label = other_label(labels, late.label)
    send(
        kafka_broker,
        unique_topics.decisions,
        {"id": late.id, "label": late_label, "reviewer": "carol"},
    )
    wait_for(lambda: service.curator.applied >= 3)  # type: ignore[union-attr]
    assert main(["models", "promote", old_version, "--model", str(registry_root)]) == 0
    assert registry.serving_version() == old_version
    wait_for(lambda: service.worker.predictor.version == old_version, 30)  # type: ignore[union-attr]
    rolled_back = service.serving.current
    assert rolled_back.version == old_version
    mapping, relabelled, late_now = rolled_back.store.get(["odd-1", "toy:11:1", late.id])
    assert mapping is not None and mapping.label == human
    assert relabelled is not None and relabelled.label == relabel
    assert late_now is not None and (late_now.source, late_now.label) == ("human", late_label)
    assert "requested by" in registry.read_lifecycle(old_version)["reason"]
    service.stop()
    assert main(["models", "promote", "v-nope", "--model", str(registry_root)]) == 2


def shuffled(rows: list[Example]) -> list[Example]:
    labels = [r.label for r in rows]
    random.Random(3).shuffle(labels)
    return [Example(r.id, r.text, label) for r, label in zip(rows, labels, strict=True)]


def test_a_worse_model_is_not_promoted_and_the_reason_is_recorded(
    kafka_config: KafkaConfig,
    unique_topics: TopicsConfig,
    registry_root: Path,
) -> None:
    settings = lifecycle_settings(
        registry_root, kafka_config, unique_topics, finetune=True, max_epochs=10
    )
    service = LifecycleService(settings, schedule=False, row_transform=shuffled)
    try:
        old_version = service.serving.current.version
        assert service.runner is not None
        result = service.runner.run("test: shuffled labels")
        assert result.outcome == "rejected", result
        assert "worse than the serving version" in result.reason
        registry = Registry(registry_root)
        assert registry.serving_version() == old_version
        assert service.serving.current.version == old_version
        rejected = next(e for e in registry.versions() if e.version == result.version)
        assert rejected.status == "rejected" and "worse" in rejected.lifecycle["reason"]
        assert not (rejected.path / "store").exists()  # its disk is freed
        run = service.state.runs()[-1]
        assert (run.outcome, run.version) == ("rejected", result.version)
        assert (
            service.prometheus.get_sample_value(
                "exemplar_finetune_runs_total", {"outcome": "rejected"}
            )
            == 1.0
        )
    finally:
        service.stop()


def test_a_job_killed_midway_leaves_the_old_version_serving(
    kafka_config: KafkaConfig,
    unique_topics: TopicsConfig,
    registry_root: Path,
) -> None:
    settings = lifecycle_settings(
        registry_root, kafka_config, unique_topics, finetune=True, max_epochs=10
    )
    service = LifecycleService(settings, schedule=False, fault_delay_s=120.0)
    try:
        old_version = service.serving.current.version
        runner = service.runner
        assert runner is not None
        results = []
        job = threading.Thread(target=lambda: results.append(runner.run("test: kill")))
        job.start()

        def midway() -> bool:
            job_dir = runner.last_job_dir
            progress = job_dir / "progress" if job_dir else None
            return bool(progress and progress.exists() and "embedding" in progress.read_text())

        wait_for(midway, 90)  # trained, now writing the new store
        process = runner.process
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)
        job.join(60)
        result = results[0]
        assert result.outcome == "failed" and "SIGKILL" in result.reason
        registry = Registry(registry_root)
        assert registry.serving_version() == old_version
        assert [e.version for e in registry.versions()] == [old_version]
        assert not list(registry.versions_dir.glob(".staging-*"))
        prediction = service.serving.current.predictor.predict([ODD_TEXT]).predictions[0]
        assert prediction.label in service.serving.current.labels  # still serving
        assert service.state.runs()[-1].outcome == "failed"
    finally:
        service.stop()
