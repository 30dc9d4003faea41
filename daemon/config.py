"""The one settings class: read the environment once, hand typed sub-configs out.

Every setting is an environment variable with prefix ``EXEMPLAR_`` and ``__``
between nesting levels, e.g. ``EXEMPLAR_KAFKA__BOOTSTRAP_SERVERS`` or
``EXEMPLAR_ADMISSION__ALPHA``. Components never read the environment themselves;
they receive the sub-config they need from ``daemon.app``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from daemon.stores import StoreConfig
from model.errors import ConfigError
from streams.config import KafkaConfig, TopicsConfig

ENV_PREFIX = "EXEMPLAR_"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AdmissionOverrides(_Frozen):
    """Operator overrides of the thresholds calibrated with the model.

    ``alpha`` recalibrates from the calibration statistics stored in the bundle
    (milliseconds, no data needed); the others replace calibrated values outright.
    """

    alpha: float | None = Field(default=None, gt=0.0, lt=1.0)
    q_min: int | None = Field(default=None, ge=0)
    tau: dict[str, float] = Field(default_factory=dict)
    margin: dict[str, float] = Field(default_factory=dict)
    near_duplicate: float | None = Field(default=None, ge=0.0)

    def active(self) -> bool:
        return any(
            (
                self.alpha is not None,
                self.q_min is not None,
                self.tau,
                self.margin,
                self.near_duplicate is not None,
            )
        )


class BatchConfig(_Frozen):
    """Micro-batching of the predictor: a batch closes at max_size or max_wait_ms.

    ``forward_size`` splits a micro-batch into length-sorted forward passes: padding to
    the longest text of a large batch costs more than the larger GEMMs save on CPU
    (benchmarks/RESULTS.md, forward-pass variants).
    """

    max_size: int = Field(default=64, ge=1, le=4096)
    forward_size: int = Field(default=16, ge=1, le=4096)
    max_wait_ms: int = Field(default=100, ge=1, le=60_000)
    max_text_bytes: int = Field(default=20_000, ge=16, le=1_000_000)


class ComputeConfig(_Frozen):
    """How the model computes (EXEMPLAR_COMPUTE__*).

    ``encoder_dtype=bfloat16`` runs the transformer encoder in bfloat16 and the exemplar
    head in float32: about 1.6x the throughput on CPUs with AVX512-BF16 or AMX, with
    99.6% of admission decisions unchanged on Rotten Tomatoes (benchmarks/RESULTS.md).
    The thresholds stay those calibrated in float32. On CPUs without bf16 arithmetic it
    is slower, and the daemon says so at start. ``torch_threads`` caps torch's intra-op
    threads (default: one per core); set it when several replicas share a node.
    """

    encoder_dtype: Literal["float32", "bfloat16"] = "float32"
    torch_threads: int | None = Field(default=None, ge=1, le=1024)


class MetricsConfig(_Frozen):
    """Prometheus exposition; localhost unless an operator opens it up."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535)


class CuratorConfig(_Frozen):
    """Lifelong learning: decisions, candidates, scheduled fine-tuning (EXEMPLAR_CURATOR__*).

    A fine-tune runs when, at a check (every ``check_interval_s`` and on ``cron``), at
    least ``min_candidates`` close admitted events (nearest distance <= ``candidate_ratio``
    times the label's tau) or ``min_decisions`` human decisions have accumulated since
    the last run, and ``min_interval_s`` has passed since the last run started. The new
    version is promoted only if its ``promote_metric`` on the calibration rows is at
    least the serving version's minus ``tolerance``.
    """

    candidate_ratio: float = Field(default=0.5, gt=0.0, le=1.0)
    min_candidates: int = Field(default=500, ge=1)
    min_decisions: int = Field(default=50, ge=1)
    check_interval_s: float = Field(default=300.0, gt=0.0)
    cron: str | None = Field(default=None, description="crontab line, e.g. '0 3 * * *'")
    min_interval_s: float = Field(default=3600.0, ge=0.0)
    promote_metric: Literal["coverage_at_alpha", "accuracy"] = "coverage_at_alpha"
    tolerance: float = Field(default=0.0, ge=0.0, le=1.0)
    finetune: bool = Field(default=True, description="false: decisions and candidates only")
    job_timeout_s: float = Field(default=6 * 3600.0, gt=0.0)
    max_epochs: int | None = Field(default=None, ge=1)
    group_id: str | None = Field(default=None, description="default: <kafka group>-curator")
    model_check_interval_s: float = Field(
        default=10.0,
        gt=0.0,
        description="how often a predictor checks the registry for a promoted version "
        "(besides the announcements on exemplar.models)",
    )
    pending_ttl_s: float = Field(default=30 * 86400.0, gt=0.0)
    calib_path: Path | None = Field(
        default=None, description="calibration rows when the serving bundle has no calib.jsonl"
    )
    state_dir: Path | None = Field(default=None, description="default: <model_dir>/state")

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value, timezone="UTC")
        except ValueError as exc:
            raise ValueError(f"not a crontab line ({exc}); e.g. '0 3 * * *'") from None
        return value


class LogConfig(_Frozen):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Settings(BaseSettings):
    """All of exemplar's configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    model_dir: Path = Path("models/current")
    role: Literal["predictor", "curator", "all"] = "all"
    kafka: KafkaConfig = KafkaConfig()
    topics: TopicsConfig = TopicsConfig()
    admission: AdmissionOverrides = AdmissionOverrides()
    batch: BatchConfig = BatchConfig()
    compute: ComputeConfig = ComputeConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    curator: CuratorConfig = CuratorConfig()
    store: StoreConfig = StoreConfig()

    @field_validator("model_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _split_roles_share_a_store(self) -> Settings:
        if self.role != "all" and self.store.backend == "edge":
            raise ConfigError(
                f"EXEMPLAR_ROLE={self.role} runs beside a separate "
                f"{'curator' if self.role == 'predictor' else 'predictor'}, and both must "
                "see one support set: set EXEMPLAR_STORE__BACKEND=server and "
                "EXEMPLAR_STORE__URL, or run EXEMPLAR_ROLE=all (one process, embedded store)"
            )
        return self


def _variable(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + "__".join(str(p).upper() for p in loc if not isinstance(p, int))


def known_variables() -> set[str]:
    """Every EXEMPLAR_* variable the settings understand (nested one level deep)."""
    names = set()
    for name, info in Settings.model_fields.items():
        names.add(ENV_PREFIX + name.upper())
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            names.update(f"{ENV_PREFIX}{name.upper()}__{f.upper()}" for f in sub.model_fields)
    return names


def _check_unknown(environ: Mapping[str, str]) -> None:
    """A misspelt variable would be ignored silently; refuse it with a suggestion."""
    known = known_variables()
    for key in sorted(environ):
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        if any(upper.startswith(k + "__") for k in known):  # deeper nesting, e.g. a dict key
            continue
        close = difflib.get_close_matches(upper, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown setting {key}{hint}; `exemplar config` lists them all")


def load_settings(**overrides: Any) -> Settings:
    """Read the environment; bad values stop here with the variable to fix."""
    _check_unknown(os.environ)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_variable(err['loc'])}: {err['msg']}"
            if err["loc"]
            else err["msg"].removeprefix("Value error, ")
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
    except ValueError as exc:  # e.g. a nested value that is not valid JSON
        raise ConfigError(f"invalid configuration: {exc}") from None


def masked(settings: Settings) -> dict[str, Any]:
    """Effective settings as JSON-able data, secrets shown as '**********'."""
    return settings.model_dump(mode="json")
