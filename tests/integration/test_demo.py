"""``exemplar demo`` end to end: embedded broker, predictor thread, HTTP endpoint, report."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from daemon.config import Settings
from daemon.demo import plan_events, run_demo
from model.errors import BundleError
from tests.model_fixtures import copy_bundle, tiny_bundle, tiny_encoder, toy_corpus, write_jsonl  # noqa: F401


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:  # noqa: F811 - the fixture, injected
    """A private copy: the embedded store opens in one process at a time."""
    return copy_bundle(tiny_bundle, tmp_path / "bundle")


@pytest.fixture
def demo_data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "test.jsonl", toy_corpus(60, seed=5))
    plots = [{"id": r["id"], "text": r["text"]} for r in toy_corpus(10, seed=6)]
    write_jsonl(data / "plots.jsonl", plots)
    return data


def test_plan_has_every_source_and_unique_ids(demo_data: Path) -> None:
    planned = plan_events(demo_data, 40, max_text_bytes=20_000)
    assert len(planned) == 40
    assert len({e.id for e in planned}) == 40
    assert {e.source for e in planned} == {"test", "plots", "emails", "foreign", "malformed"}
    assert all(e.gold for e in planned if e.source == "test")
    assert all(b'"label"' not in e.value for e in planned)  # the daemon never sees gold labels


def test_demo_streams_every_event_to_exactly_one_topic(
    bundle: Path, demo_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(metrics={"port": 0}, batch={"max_size": 16, "max_wait_ms": 100})
    assert run_demo(settings, model_dir=bundle, data_dir=demo_data, events=40) == 0
    out = capsys.readouterr().out
    assert "all 40 events came out, each on exactly one topic" in out
    counts = {
        name: int(m.group(1))
        for name in ("admitted", "routed to humans", "dead-lettered")
        if (m := re.search(rf"^  {name}\s+(\d+)", out, re.MULTILINE))
    }
    assert len(counts) == 3 and sum(counts.values()) == 40, out
    assert counts["dead-lettered"] == 5
    assert "one adjudication request" in out
    assert '"reasons": [' in out and '"nearest": [' in out
    assert 'exemplar_events_total{outcome="dead_letter"} 5.0' in out
    assert "/healthz: HTTP 200" in out


def test_demo_without_a_bundle_says_how_to_build_one(demo_data: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="make demo-model"):
        run_demo(Settings(), model_dir=tmp_path / "nothing", data_dir=demo_data, events=40)
