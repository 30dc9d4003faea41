"""``exemplar run``: the predictor, the curator and the fine-tune scheduler, wired by role.

``--role all`` (the single-machine default) runs them in one process: the predictor
loop and the curator loop on their own threads share one store handle
(:mod:`daemon.serving`), and a promoted version is swapped into the predictor between
two batches.

Split roles share a Qdrant server (``EXEMPLAR_STORE__BACKEND=server``; the embedded
store opens in one process only, so configuration refuses the split without it) and
the model registry directory (a shared volume):

* ``--role predictor`` (any number of replicas) serves, publishes rejected and close
  admitted events on ``exemplar.lifecycle`` for the curator, and follows promotions
  (:class:`~daemon.handoff.ModelWatcher`);
* ``--role curator`` (exactly one) records those events, applies decisions to the
  shared collection (every predictor sees them at its next search), and runs the
  fine-tunes; a promotion publishes the new version's collection, replays decisions
  onto it, flips the serving alias and the SERVING pointer, and announces it.

The curator re-embeds a decided event's text with the network serving *at decision
time*, so the vector lives in the right space even after a hot swap.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry

from daemon.app import install_stop_handlers
from daemon.config import Settings
from daemon.curator import CuratorWorker, DecisionApplier
from daemon.finetune import FinetuneRunner, FinetuneScheduler
from daemon.handoff import LifecycleFeed, ModelWatcher, StateRecorder, TopicRecorder
from daemon.http import Health, HttpEndpoint
from daemon.metrics import DaemonMetrics, LifecycleMetrics
from daemon.retry import Backoff, StopRequested, retry
from daemon.serving import ServingModel
from daemon.state import LifecycleState
from daemon.worker import PredictorWorker
from model.data import Example
from model.errors import ExemplarError
from model.registry import resolve_model_dir, state_dir_for
from streams.contracts import ModelUpdate
from streams.kafka import OutputProducer

log = structlog.get_logger(__name__)

#: How long a promotion keeps trying to reach the broker to announce itself.
ANNOUNCE_TIMEOUT_S = 30.0


class LifecycleService:
    """Everything ``exemplar run`` starts for one role; ``start``/``stop`` or ``run``."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        backoff: Backoff | None = None,
        health: Health | None = None,
        row_transform: Callable[[list[Example]], list[Example]] | None = None,
        fault_delay_s: float = 0.0,
        schedule: bool = True,
        store_client: object | None = None,
    ) -> None:
        """``schedule=False`` keeps the APScheduler off (a test then calls ``runner.run``);
        ``row_transform`` and ``fault_delay_s`` are passed to the fine-tune runner;
        ``store_client`` (a ``QdrantClient``) stands in for ``EXEMPLAR_STORE__URL``."""
        self.settings = settings
        role = settings.role
        backoff = backoff or Backoff()
        self.health = health or Health()
        self.prometheus = registry or CollectorRegistry()
        bundle_path, model_registry = resolve_model_dir(settings.model_dir)
        # The state and the staging area are the curator's; a predictor of a split
        # deployment shares the registry directory and must not touch them.
        self.state: LifecycleState | None = None
        if role != "predictor":
            if model_registry is not None:
                model_registry.clean_staging()
            self.state = LifecycleState(
                settings.curator.state_dir or state_dir_for(settings.model_dir)
            )
            abandoned = self.state.abandon_unfinished_runs()
            if abandoned:
                log.warning("finetune_abandoned", runs=abandoned)
        try:
            self.serving = ServingModel.open(
                bundle_path,
                model_registry,
                settings,
                store_client,
                publish=role != "predictor",
            )
        except BaseException:
            if self.state is not None:
                self.state.close()
            raise
        # The predictor's metrics only where a predictor loop runs: a curator exporting
        # them empty would show on every predictor panel as one more (idle) instance.
        self.metrics = DaemonMetrics.create(
            self.prometheus if role != "curator" else CollectorRegistry()
        )
        # Likewise the curator's metrics only where a curator runs (a predictor's own
        # version is its exemplar_model_info).
        self.lifecycle_metrics = LifecycleMetrics.create(
            self.prometheus if role != "predictor" else CollectorRegistry()
        )
        self.lifecycle_metrics.serving_version.info({"version": self.serving.current.version})
        last = self.state.get("last_promotion_at") if self.state is not None else None
        if last is not None:
            self.lifecycle_metrics.last_promotion.set(float(last))
        self.stop_event = threading.Event()
        self.worker: PredictorWorker | None = None
        self.recorder: StateRecorder | TopicRecorder | None = None
        self.watcher: ModelWatcher | None = None
        self.curator: CuratorWorker | None = None
        self.feed: LifecycleFeed | None = None
        self.runner: FinetuneRunner | None = None
        self.scheduler: FinetuneScheduler | None = None
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._stopped = False
        if role in ("predictor", "all"):
            self.recorder = (
                StateRecorder(self.state, settings.curator)
                if self.state is not None
                else TopicRecorder(settings)
            )
            worker = PredictorWorker(
                settings,
                self.serving.current.predictor,
                self.metrics,
                backoff,
                health=self.health,
                on_predictions=self.recorder,
            )
            self.serving.add_listener(
                lambda new, retire: worker.swap_predictor(new.predictor, retire)
            )
            self.worker = worker
            if role == "predictor" and model_registry is not None:
                self.watcher = ModelWatcher(
                    settings,
                    self.serving,
                    model_registry,
                    self.lifecycle_metrics,
                    self.stop_event,
                )
        if self.state is not None:
            if role == "curator":
                self.feed = LifecycleFeed(settings, self.state)
            self.curator = CuratorWorker(
                settings,
                DecisionApplier(self.serving, self.state),
                self.lifecycle_metrics,
                backoff,
                on_idle=self.on_curator_idle,
                feed=self.feed,
            )
            if model_registry is not None:  # fine-tunes, and `exemplar models promote`
                self.runner = FinetuneRunner(
                    settings,
                    self.serving,
                    self.state,
                    self.lifecycle_metrics,
                    announce=self.announce,
                    stop=self.stop_event,
                    row_transform=row_transform,
                    fault_delay_s=fault_delay_s,
                )
                if schedule and settings.curator.finetune:
                    self.scheduler = FinetuneScheduler(self.runner, settings.curator)
            elif settings.curator.finetune:
                log.warning(
                    "finetune_disabled",
                    model_dir=str(settings.model_dir),
                    reason="a plain bundle has no versions; create a registry with "
                    "`exemplar models init`",
                )

    # ------------------------------------------------------------ control
    def request_stop(self) -> None:
        """Thin: safe from a signal handler."""
        self.stop_event.set()
        if self.worker is not None:
            self.worker.request_stop()
        if self.curator is not None:
            self.curator.request_stop()

    def _guard(self, name: str, target: Callable[[], None]) -> Callable[[], None]:
        def body() -> None:
            try:
                target()
            except BaseException as exc:
                log.exception("component_failed", component=name)
                self.errors.append(exc)
                self.request_stop()

        return body

    def start(self) -> None:
        if self.worker is not None:
            self._threads.append(
                threading.Thread(
                    target=self._guard("predictor", self.worker.run), name="predictor", daemon=True
                )
            )
        if self.curator is not None:
            self._threads.append(
                threading.Thread(
                    target=self._guard("curator", self.curator.run), name="curator", daemon=True
                )
            )
        if self.watcher is not None:
            self._threads.append(
                threading.Thread(
                    target=self._guard("model_watcher", self.watcher.run),
                    name="model-watcher",
                    daemon=True,
                )
            )
        for thread in self._threads:
            thread.start()
        if self.scheduler is not None:
            self.scheduler.start()
        self.refresh_gauges()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop everything and release the store and the state file. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.request_stop()
        if self.scheduler is not None:
            self.scheduler.shutdown()
        for thread in self._threads:
            thread.join(timeout_s)
        if self.recorder is not None:
            self.recorder.close()
        self.serving.close()
        if self.state is not None:
            self.state.close()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT or a component fails; 0 on a clean stop."""
        endpoint: HttpEndpoint | None = None
        metrics_cfg = self.settings.metrics
        if metrics_cfg.enabled:
            endpoint = HttpEndpoint(
                metrics_cfg.host, metrics_cfg.port, self.prometheus, self.health
            )
            log.info(
                "http_listening",
                metrics=f"{endpoint.url}/metrics",
                health=f"{endpoint.url}/healthz",
            )
        install_stop_handlers(self.request_stop)
        log.info(
            "service_starting",
            role=self.settings.role,
            version=self.serving.current.version,
            finetune=self.scheduler is not None,
        )
        try:
            self.start()
            if self.worker is None:
                self.health.beat("running")
            while not self.stop_event.wait(1.0):
                if self.worker is None:
                    self.health.beat()
        finally:
            self.stop()
            if endpoint is not None:
                endpoint.close()
        return 1 if self.errors else 0

    # ------------------------------------------------------------ callbacks
    def on_curator_idle(self) -> None:
        """Every few seconds on the curator's thread: gauges, and promotion requests."""
        if self.runner is not None:
            try:
                self.runner.apply_promotion_request()
            except ExemplarError as exc:
                log.error("promotion_request_failed", error=str(exc))
        self.refresh_gauges()

    def refresh_gauges(self) -> None:
        if self.state is None:
            return
        try:
            count = self.state.count_candidates(self.settings.curator.candidate_ratio)
        except ExemplarError as exc:
            log.warning("state_unreadable", error=str(exc))
            return
        self.lifecycle_metrics.candidates_pending.set(count)

    def announce(self, version: str, previous: str | None, metrics: dict[str, float]) -> None:
        """Tell every predictor on ``exemplar.models`` which version serves now."""
        update = ModelUpdate(
            version=version,
            previous_version=previous,
            metrics={k: float(v) for k, v in metrics.items()},
        )
        topic = self.settings.topics.model_updates

        def send() -> None:
            producer = OutputProducer(self.settings.kafka)
            try:
                producer.send(topic, version, update)
                producer.flush(self.settings.kafka.request_timeout_ms / 1000)
            finally:
                producer.close()

        # Bounded: the swap in this process already happened; other processes find the
        # version in the registry at their next start even if the broker stays away.
        give_up = threading.Event()
        timer = threading.Timer(ANNOUNCE_TIMEOUT_S, give_up.set)
        timer.start()
        try:
            retry("announce_model", send, give_up, Backoff(maximum_s=5.0))
        except (StopRequested, ExemplarError) as exc:
            log.error("model_not_announced", version=version, error=str(exc))
        finally:
            timer.cancel()


def run_service(settings: Settings) -> int:
    """``exemplar run``: build the service for ``settings.role`` and run it."""
    return LifecycleService(settings).run()


def model_dir_state(model_dir: Path) -> LifecycleState:
    """The lifecycle state of a model directory (``exemplar audit`` reads it)."""
    return LifecycleState(state_dir_for(model_dir))
