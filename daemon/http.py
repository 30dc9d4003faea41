"""The daemon's HTTP endpoint: /metrics for Prometheus, /healthz and /readyz for probes.

* ``/healthz`` (liveness): the main loop has made progress recently — a poll, a
  batch, or a retry attempt. A loop stuck for longer than ``stall_after_s`` fails it,
  so an orchestrator restarts the process.
* ``/readyz`` (readiness): the predictor is connected and consuming (state
  ``running``); while it starts or retries a broker connection it is not ready.

Binds to localhost unless configured otherwise.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class Health:
    """Liveness heartbeat and readiness flag, updated by the main loop."""

    def __init__(self, stall_after_s: float = 120.0) -> None:
        self.stall_after_s = stall_after_s
        self._beat = time.monotonic()
        self._state = "starting"
        self._lock = threading.Lock()

    def beat(self, state: str | None = None) -> None:
        with self._lock:
            self._beat = time.monotonic()
            if state is not None:
                self._state = state

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            age = time.monotonic() - self._beat
            return {
                "state": self._state,
                "last_progress_s": round(age, 3),
                "live": age <= self.stall_after_s and self._state != "stopped",
                "ready": self._state == "running" and age <= self.stall_after_s,
            }


def _handler(registry: CollectorRegistry, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                snap = health.snapshot()
                ok = snap["live"] if path == "/healthz" else snap["ready"]
                self._send(200 if ok else 503, json.dumps(snap).encode(), "application/json")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Probes hit this every few seconds; keep them out of the logs."""

    return Handler


class HttpEndpoint:
    """A background HTTP server; ``close()`` stops it."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        self._server = ThreadingHTTPServer((host, port), _handler(registry, health))
        self._server.daemon_threads = True
        address = self._server.server_address
        self.host, self.port = str(address[0]), int(address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="exemplar-http", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(host: str, port: int, registry: CollectorRegistry, health: Health) -> HttpEndpoint:
    return HttpEndpoint(host, port, registry, health)
