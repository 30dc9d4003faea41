"""The benchmark scripts still run end to end: ``benchmarks.run --smoke`` (toy model, toy
sizes, real broker and store) writes every figure, so the scripts cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = ("meta", "throughput", "compute", "latency", "quality", "matching", "memory", "targets")


@pytest.mark.slow
def test_smoke_run_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--smoke",
            "--out",
            str(out),
            "--work-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(TOP_LEVEL) <= set(results), sorted(results)
    throughput = results["throughput"]
    for key in ("daemon_eps", "bare_forward_eps", "naive_eps", "daemon_vs_bare", "daemon_vs_naive"):
        assert throughput[key] > 0, key
    assert throughput["daemon"]["every_event_once"]
    rounds = results["meta"]["sizes"]["throughput_rounds"]
    for ratio in throughput["ratios"].values():
        assert len(ratio["rounds"]) == rounds
        assert ratio["min"] <= ratio["median"] <= ratio["max"]
    # the daemon's batches are the bare path's: full micro-batches of 64
    assert throughput["daemon"]["measured_events"] == 64 * throughput["daemon"]["measured_batches"]
    checked = {v["variant"] for v in results["compute"]["variants"] if "test" in v}
    assert {"bf16 encoder, fp32 head", "bf16 weights"} <= checked
    assert len(results["latency"]["levels"]) == 3
    assert all(level["received"] == level["sent"] for level in results["latency"]["levels"])
    cases = results["matching"]["cases"]
    assert len(cases) == len(results["meta"]["sizes"]["matching"])
    assert all("exact" in c["search"] for c in cases)
    assert set(results["quality"]["aurc"]) == {"exemplar", "softmax", "trust_score", "knn"}
    assert results["quality"]["index_vs_exact"]["admission_agreement"] > 0
    assert results["targets"]
    assert "SMOKE RUN" in (out / "RESULTS.md").read_text()
