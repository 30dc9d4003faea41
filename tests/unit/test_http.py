"""The HTTP endpoint: Prometheus exposition and the probes' answers follow the loop's state."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry

from daemon.http import Health, HttpEndpoint
from daemon.metrics import DaemonMetrics


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_probes_follow_the_state_and_metrics_are_exposed() -> None:
    metrics = DaemonMetrics.create(CollectorRegistry())
    metrics.events.labels("admitted").inc(3)
    health = Health(stall_after_s=60)
    endpoint = HttpEndpoint("127.0.0.1", 0, metrics.registry, health)
    try:
        assert endpoint.host == "127.0.0.1"
        status, body = _get(f"{endpoint.url}/readyz")
        assert status == 503 and json.loads(body)["state"] == "starting"
        assert _get(f"{endpoint.url}/healthz")[0] == 200  # starting is alive
        health.beat("running")
        assert _get(f"{endpoint.url}/readyz")[0] == 200
        status, body = _get(f"{endpoint.url}/metrics")
        assert status == 200 and 'exemplar_events_total{outcome="admitted"} 3.0' in body
        health.beat("stopped")
        assert _get(f"{endpoint.url}/healthz")[0] == 503
        assert _get(f"{endpoint.url}/nope")[0] == 404
    finally:
        endpoint.close()


def test_a_stalled_loop_fails_liveness() -> None:
    health = Health(stall_after_s=0.0)
    health.beat("running")
    snap = health.snapshot()
    assert not snap["live"] and not snap["ready"]
