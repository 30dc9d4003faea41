"""The one place that wires model, store and (later) streams together from settings."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from prometheus_client import CollectorRegistry

from daemon.config import AdmissionOverrides, Settings
from daemon.http import Health, HttpEndpoint
from daemon.metrics import DaemonMetrics
from daemon.stores import open_store
from daemon.worker import PredictorWorker
from model.admission import Thresholds, calibrate
from model.bundle import Bundle, load_bundle
from model.errors import ConfigError
from model.predictor import Predictor
from model.store.base import ExemplarStore

log = structlog.get_logger(__name__)


@dataclass
class Loaded:
    """A bundle with its open store and a ready predictor; close() when done."""

    bundle: Bundle
    store: ExemplarStore
    predictor: Predictor

    def close(self) -> None:
        self.store.close()


def effective_thresholds(bundle: Bundle, overrides: AdmissionOverrides) -> Thresholds:
    """Calibrated thresholds of the bundle with the operator's overrides applied."""
    t = bundle.thresholds
    if overrides.alpha is not None and overrides.alpha != t.alpha:
        t = calibrate(
            bundle.calibration,
            bundle.info.labels,
            overrides.alpha,
            t.k,
            t.near_duplicate,
            t.confidence,
        )
    try:
        return t.with_overrides(
            q_min=overrides.q_min,
            tau=overrides.tau or None,
            margin=overrides.margin or None,
            near_duplicate=overrides.near_duplicate,
        )
    except ValueError as exc:
        raise ConfigError(f"EXEMPLAR_ADMISSION__*: {exc}") from None


def load(settings: Settings, model_dir: str | None = None, batch_size: int = 64) -> Loaded:
    """Load the bundle at ``model_dir`` (default: settings) with its store (EXEMPLAR_STORE__*)."""
    bundle = load_bundle(model_dir or settings.model_dir)
    thresholds = effective_thresholds(bundle, settings.admission)
    store = open_store(settings.store, bundle)
    predictor = Predictor(
        bundle.network,
        bundle.tokenizer,
        store,
        thresholds,
        bundle.info.version,
        batch_size=batch_size,
    )
    return Loaded(bundle, store, predictor)


def install_stop_handlers(request_stop: Callable[[], None]) -> None:
    """SIGTERM/SIGINT only ask the loop to stop; the loop does the rest (thin handlers)."""

    def handler(signum: int, _frame: object) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        request_stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run_predictor(settings: Settings, registry: CollectorRegistry | None = None) -> int:
    """`exemplar run`: serve the model in ``settings.model_dir`` until asked to stop."""
    loaded = load(settings, batch_size=settings.batch.forward_size)
    metrics = DaemonMetrics.create(registry or CollectorRegistry())
    health = Health()
    endpoint: HttpEndpoint | None = None
    try:
        if settings.metrics.enabled:
            endpoint = HttpEndpoint(
                settings.metrics.host, settings.metrics.port, metrics.registry, health
            )
            log.info(
                "http_listening",
                metrics=f"{endpoint.url}/metrics",
                health=f"{endpoint.url}/healthz",
                ready=f"{endpoint.url}/readyz",
            )
        worker = PredictorWorker(settings, loaded.predictor, metrics, health=health)
        install_stop_handlers(worker.request_stop)
        worker.run()
    finally:
        if endpoint is not None:
            endpoint.close()
        loaded.close()
    return 0
