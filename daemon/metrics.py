"""Prometheus metrics of the daemon, built on a registry passed in (tests use a fresh one).

Names follow the Prometheus conventions: ``exemplar_`` prefix, base units
(seconds), ``_total`` on counters. The nearest distance is exported twice: raw
(engine units, depends on the model) and as a ratio to the label's calibrated
threshold ``tau`` (scale-free, comparable across model versions: a drift signal).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DISTANCE_BUCKETS = tuple(round(0.01 * 1.6**i, 4) for i in range(26))  # 0.01 .. ~1.3e3
RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)


@dataclass
class DaemonMetrics:
    """Every metric the predictor exports, registered on one registry."""

    registry: CollectorRegistry
    events: Counter
    rejections: Counter
    dead_letters: Counter
    admitted: Counter
    batch_size: Histogram
    batches: Counter
    event_latency: Histogram
    stage_duration: Histogram
    nearest_distance: Histogram
    nearest_distance_ratio: Histogram
    admission_ratio: Gauge
    consumer_lag: Gauge
    support_set_size: Gauge
    model_info: Info
    retries: Counter
    errors: Counter
    last_batch: Gauge
    running: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> DaemonMetrics:
        r = registry
        return cls(
            registry=r,
            events=Counter(
                "exemplar_events_total", "Input events by final outcome.", ["outcome"], registry=r
            ),
            rejections=Counter(
                "exemplar_rejections_total",
                "Reasons of predictions routed to adjudication (one event may carry several).",
                ["reason", "predicted_label"],
                registry=r,
            ),
            dead_letters=Counter(
                "exemplar_dead_letters_total",
                "Malformed input sent to the dead-letter topic.",
                ["reason"],
                registry=r,
            ),
            admitted=Counter(
                "exemplar_admitted_total",
                "Admitted predictions.",
                ["label", "admitted_by"],
                registry=r,
            ),
            batch_size=Histogram(
                "exemplar_batch_size", "Records per micro-batch.", buckets=BATCH_BUCKETS, registry=r
            ),
            batches=Counter(
                "exemplar_batches_total", "Micro-batches completed (committed).", registry=r
            ),
            event_latency=Histogram(
                "exemplar_event_latency_seconds",
                "From the record's broker timestamp to its batch commit.",
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            stage_duration=Histogram(
                "exemplar_stage_duration_seconds",
                "Time per batch spent in each stage.",
                ["stage"],
                buckets=STAGE_BUCKETS,
                registry=r,
            ),
            nearest_distance=Histogram(
                "exemplar_nearest_distance",
                "L2 distance to the nearest support exemplar.",
                ["predicted_label"],
                buckets=DISTANCE_BUCKETS,
                registry=r,
            ),
            nearest_distance_ratio=Histogram(
                "exemplar_nearest_distance_ratio",
                "Nearest distance divided by the label's calibrated threshold tau.",
                ["predicted_label"],
                buckets=RATIO_BUCKETS,
                registry=r,
            ),
            admission_ratio=Gauge(
                "exemplar_admission_ratio",
                "Share admitted among the last 1000 predictions per label.",
                ["predicted_label"],
                registry=r,
            ),
            consumer_lag=Gauge(
                "exemplar_consumer_lag",
                "Records behind the partition's high watermark.",
                ["topic", "partition"],
                registry=r,
            ),
            support_set_size=Gauge(
                "exemplar_support_set_size", "Exemplars in the serving support set.", registry=r
            ),
            model_info=Info("exemplar_model", "The serving model version.", registry=r),
            retries=Counter(
                "exemplar_retries_total",
                "Retried operations after a transient failure.",
                ["operation"],
                registry=r,
            ),
            errors=Counter("exemplar_errors_total", "Errors by kind.", ["kind"], registry=r),
            last_batch=Gauge(
                "exemplar_last_batch_timestamp_seconds",
                "Unix time of the last committed batch.",
                registry=r,
            ),
            running=Gauge("exemplar_running", "1 while the predictor loop runs.", registry=r),
        )


class AdmissionWindow:
    """Admission share over the last ``size`` predictions of each label."""

    def __init__(self, size: int = 1000) -> None:
        self.size = size
        self._windows: dict[str, deque[bool]] = {}

    def add(self, label: str, admitted: bool) -> float:
        window = self._windows.setdefault(label, deque(maxlen=self.size))
        window.append(admitted)
        return sum(window) / len(window)


FINETUNE_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0, 7200.0)


@dataclass
class LifecycleMetrics:
    """What the curator exports: decisions, candidates, fine-tune runs, promotions.

    Time since the last promotion is ``time() - exemplar_last_promotion_timestamp_seconds``
    in PromQL (a timestamp gauge, as Prometheus recommends, rather than an ageing value).
    """

    decisions: Counter
    candidates_pending: Gauge
    finetune_runs: Counter
    finetune_duration: Histogram
    last_promotion: Gauge
    serving_version: Info

    @classmethod
    def create(cls, registry: CollectorRegistry) -> LifecycleMetrics:
        metrics = cls._declare(registry)
        # Every outcome exists from the start at 0, so increase() counts the first run.
        for outcome in ("promoted", "rejected", "failed"):
            metrics.finetune_runs.labels(outcome)
        return metrics

    @classmethod
    def _declare(cls, registry: CollectorRegistry) -> LifecycleMetrics:
        r = registry
        return cls(
            decisions=Counter(
                "exemplar_decisions_total",
                "Human decisions by result (applied or rejected to the dead-letter "
                "topic) and action.",
                ["result", "action"],
                registry=r,
            ),
            candidates_pending=Gauge(
                "exemplar_candidates_pending",
                "Close admitted events waiting for the next fine-tune.",
                registry=r,
            ),
            finetune_runs=Counter(
                "exemplar_finetune_runs_total",
                "Fine-tune runs by outcome (promoted, rejected, failed).",
                ["outcome"],
                registry=r,
            ),
            finetune_duration=Histogram(
                "exemplar_finetune_duration_seconds",
                "Wall time of a fine-tune run, start to decision.",
                buckets=FINETUNE_BUCKETS,
                registry=r,
            ),
            last_promotion=Gauge(
                "exemplar_last_promotion_timestamp_seconds",
                "Unix time of the last promotion of a model version.",
                registry=r,
            ),
            serving_version=Info(
                "exemplar_serving", "The version the curator serves (registry pointer).", registry=r
            ),
        )
