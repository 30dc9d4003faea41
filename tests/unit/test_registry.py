"""The model registry (versions + atomic SERVING pointer) and the curator's sqlite state.

No services: real directories and a real sqlite file; bundles are bundle.json stubs
(the registry reads nothing else of them).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from daemon.state import Candidate, LifecycleState, PendingEvent
from model.errors import BundleError
from model.registry import SERVING_FILE, Registry, is_registry, resolve_model_dir


def stub_bundle(
    directory: Path, version: str, created_at: str = "2026-01-01T00:00:00+00:00"
) -> Path:
    directory.mkdir(parents=True)
    (directory / "store").mkdir()
    (directory / "bundle.json").write_text(
        json.dumps(
            {
                "format": "exemplar-bundle",
                "format_version": 1,
                "version": version,
                "created_at": created_at,
                "labels": ["a", "b"],
                "network": {"labels": ["a", "b"]},
                "encoder_fingerprint": "x",
                "metrics": {"calib_coverage": 0.5},
            }
        )
    )
    return directory


def test_register_promote_and_list(tmp_path: Path) -> None:
    registry = Registry.create(tmp_path / "reg")
    assert is_registry(registry.root) and registry.serving_version() is None
    with pytest.raises(BundleError, match="no version is serving"):
        registry.serving_path()
    v1 = registry.register(stub_bundle(tmp_path / "b1", "v1", "2026-01-01T00:00:00+00:00"))
    v2 = registry.register(stub_bundle(tmp_path / "b2", "v2", "2026-02-01T00:00:00+00:00"))
    assert registry.promote(v1) is None
    assert registry.promote(v2) == "v1"
    assert (registry.root / SERVING_FILE).read_text() == "v2\n"
    assert not list(registry.root.glob(".*.tmp"))  # the temp file was renamed, not left
    entries = registry.versions()
    assert [(e.version, e.serving) for e in entries] == [("v1", False), ("v2", True)]
    assert entries[1].status == "serving" and entries[0].metrics["calib_coverage"] == 0.5
    bundle, found = resolve_model_dir(registry.root)
    assert bundle == registry.path_of("v2") and found is not None
    plain, none = resolve_model_dir(tmp_path / "b1")
    assert plain == tmp_path / "b1" and none is None


def test_registering_twice_and_promoting_incomplete_versions_fail(tmp_path: Path) -> None:
    registry = Registry.create(tmp_path / "reg")
    registry.register(stub_bundle(tmp_path / "b1", "v1"))
    with pytest.raises(BundleError, match="already registered"):
        registry.register(tmp_path / "b1")
    with pytest.raises(BundleError, match="not a complete bundle"):
        registry.promote("v9")
    with pytest.raises(BundleError, match="not a version name"):
        registry.path_of("../escape")
    with pytest.raises(BundleError, match="not a model registry"):
        Registry(tmp_path / "b1")


def test_staging_is_invisible_until_committed_and_cleaned(tmp_path: Path) -> None:
    registry = Registry.create(tmp_path / "reg")
    staging = registry.new_staging()
    (staging / "half-written").write_text("x")
    assert registry.versions() == []
    assert registry.clean_staging() == [staging] and not staging.exists()
    staging = registry.new_staging()
    stub_bundle(staging / "b", "v7")
    for path in (staging / "b").iterdir():
        path.rename(staging / path.name)
    version = registry.commit_staging(staging, {"status": "rejected", "reason": "worse"})
    assert version == "v7" and registry.read_lifecycle("v7")["reason"] == "worse"
    registry.drop_store("v7")
    assert not (registry.path_of("v7") / "store").exists()
    assert registry.versions()[0].status == "rejected"


def test_pointer_readers_never_see_a_partial_write(tmp_path: Path) -> None:
    registry = Registry.create(tmp_path / "reg")
    for name in ("va", "vb"):
        registry.register(stub_bundle(tmp_path / name, name))
    registry.promote("va")
    seen: set[str | None] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.add(registry.serving_version())

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(200):
        registry.promote("vb" if i % 2 else "va")
    done.set()
    reader.join()
    assert seen <= {"va", "vb"}


def test_state_survives_reopen_and_counts_candidates(tmp_path: Path) -> None:
    state = LifecycleState(tmp_path)
    state.record_batch(
        [PendingEvent("e1", "some text", "a", ("too_far",), "v1", 0.0, "open")],
        [
            Candidate("e2", "close one", "a", "x1", "a", 0.1, 0.2, "v1"),
            Candidate("e3", "close two", "b", "x1", "a", 0.2, 0.4, "v1"),
            Candidate("e4", "farther", "b", "x2", "b", 0.5, 0.9, "v1"),
        ],
    )
    # re-delivery of the same batch changes nothing
    state.record_batch([], [Candidate("e2", "close one", "a", "x1", "a", 0.1, 0.2, "v1")])
    seq = state.append_audit(
        reviewer="ann",
        action="add",
        target_id="e1",
        source_event="e1",
        old_label="a",
        new_label="b",
        old_source="adjudication",
        new_source="human",
        note=None,
        text="some text",
        model_version="v1",
        decided_at=None,
        decision_ref="t:0:5",
    )
    state.close()

    state = LifecycleState(tmp_path)
    assert state.pending("e1") is not None and state.pending("e1").reasons == ("too_far",)  # type: ignore[union-attr]
    assert state.candidate_counts(0.5) == {"label": {"a": 1, "b": 1}, "nearest": {"x1": 2}}
    assert state.count_candidates() == 3
    assert state.has_decision("t:0:5") and not state.has_decision("t:0:6")
    assert [e.seq for e in state.audit()] == [seq] and state.count_decisions_since(0) == 1
    state.mark_candidates_used(["e2"], "v2")
    assert state.count_candidates(0.5) == 1
    run = state.start_run("test", "v1", seq)
    assert state.abandon_unfinished_runs() == 1
    assert state.runs()[-1].id == run and state.runs()[-1].outcome == "failed"
    state.close()


def test_trigger_policy_counts_thresholds_and_min_interval(tmp_path: Path) -> None:
    from daemon.config import CuratorConfig
    from daemon.finetune import TriggerPolicy

    state = LifecycleState(tmp_path)
    config = CuratorConfig(
        min_candidates=2, min_decisions=2, candidate_ratio=0.5, min_interval_s=100.0
    )
    policy = TriggerPolicy(state, config)
    assert policy.due(now=1000.0) is None
    state.record_batch(
        [],
        [
            Candidate("c1", "t", "a", "x", "a", 0.1, 0.2, "v1"),
            Candidate("c2", "t", "a", "x", "a", 0.1, 0.9, "v1"),
        ],
    )
    assert policy.due(now=1000.0) is None  # the second one is too far to count
    state.record_batch([], [Candidate("c3", "t", "b", "y", "b", 0.1, 0.4, "v1")])
    assert policy.due(now=1000.0) == "2 candidates >= 2"
    state.put("finetune_started_at", "950")
    assert policy.due(now=1000.0) is None  # too soon after the last run
    state.mark_candidates_used(["c1", "c3"], "v2")
    for i in range(2):
        state.append_audit(
            reviewer="r",
            action="add",
            target_id=f"e{i}",
            source_event=None,
            old_label=None,
            new_label="a",
            old_source=None,
            new_source="human",
            note=None,
            text="t",
            model_version="v1",
            decided_at=None,
            decision_ref=None,
        )
    assert policy.due(now=1100.0) == "2 decisions >= 2"
    state.put("finetune_audit_seq", str(state.last_audit_seq()))
    assert policy.due(now=1100.0) is None
    state.close()


def test_scheduler_registers_the_interval_and_the_cron_check() -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    from daemon.config import CuratorConfig
    from daemon.finetune import FinetuneScheduler

    runner = cast(Any, SimpleNamespace(stop=threading.Event(), run_if_due=lambda _t: None))
    scheduler = FinetuneScheduler(runner, CuratorConfig(check_interval_s=60, cron="0 3 * * *"))
    jobs = {job.id: job for job in scheduler.scheduler.get_jobs()}
    assert set(jobs) == {"finetune-interval", "finetune-cron"}
    assert "cron" in str(jobs["finetune-cron"].trigger)
    scheduler.start()
    scheduler.shutdown()
    assert runner.stop.is_set()  # shutting down kills a running job
