"""The one place that wires model, store and (later) streams together from settings."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from daemon.config import AdmissionOverrides, ComputeConfig, Settings
from daemon.stores import open_store
from model.admission import Thresholds, calibrate
from model.bundle import Bundle, load_bundle
from model.errors import ConfigError
from model.predictor import Predictor
from model.store.base import ExemplarStore
from model.store.locked import LockedStore

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


def cpu_has_bf16() -> bool | None:
    """Whether the CPU does bfloat16 arithmetic natively (None: cannot tell)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


_warned_slow_dtype = False


def configure_compute(compute: ComputeConfig) -> None:
    """Process-wide settings of the model's arithmetic; call once at start."""
    if compute.torch_threads is not None:
        torch.set_num_threads(compute.torch_threads)
    global _warned_slow_dtype
    if compute.encoder_dtype == "bfloat16" and not _warned_slow_dtype and cpu_has_bf16() is False:
        _warned_slow_dtype = True
        log.warning(
            "encoder_dtype_slow",
            detail="EXEMPLAR_COMPUTE__ENCODER_DTYPE=bfloat16 on a CPU without AVX512-BF16 "
            "or AMX: bfloat16 is emulated there and slower than float32",
        )


def load_serving_bundle(path: str | Path, compute: ComputeConfig) -> Bundle:
    """A bundle ready to serve: its network in the configured precision."""
    bundle = load_bundle(path)
    if compute.encoder_dtype == "bfloat16":
        bundle.network.set_encoder_dtype(torch.bfloat16)
    return bundle


def load(
    settings: Settings,
    model_dir: str | Path | None = None,
    batch_size: int | None = None,
    *,
    store_client: object | None = None,
    publish: bool = True,
    locked: bool = False,
) -> Loaded:
    """Load the bundle at ``model_dir`` (default: settings) with its store, ready to serve
    as ``settings`` say (admission overrides, precision, store, forward chunk size).

    ``store_client``/``publish``: see :func:`daemon.stores.open_store`; ``locked`` puts
    the store behind a lock for threads that share it (predictor and curator)."""
    configure_compute(settings.compute)
    bundle = load_serving_bundle(model_dir or settings.model_dir, settings.compute)
    thresholds = effective_thresholds(bundle, settings.admission)
    store: ExemplarStore = open_store(settings.store, bundle, store_client, publish=publish)
    if locked:
        store = LockedStore(store)
    predictor = Predictor(
        bundle.network,
        bundle.tokenizer,
        store,
        thresholds,
        bundle.info.version,
        batch_size=batch_size or settings.batch.forward_size,
    )
    return Loaded(bundle, store, predictor)


def install_stop_handlers(request_stop: Callable[[], None]) -> None:
    """SIGTERM/SIGINT only ask the loop to stop; the loop does the rest (thin handlers)."""

    def handler(signum: int, _frame: object) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        request_stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
