"""The one settings class: read the environment once, hand typed sub-configs out.

Every setting is an environment variable with prefix ``EXEMPLAR_`` and ``__``
between nesting levels, e.g. ``EXEMPLAR_KAFKA__BOOTSTRAP_SERVERS`` or
``EXEMPLAR_ADMISSION__ALPHA``. Components never read the environment themselves;
they receive the sub-config they need from ``daemon.app``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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
            (self.alpha is not None, self.q_min is not None, self.tau, self.margin,
             self.near_duplicate is not None)
        )


class BatchConfig(_Frozen):
    """Micro-batching of the predictor: a batch closes at max_size or max_wait_ms."""

    max_size: int = Field(default=64, ge=1, le=4096)
    max_wait_ms: int = Field(default=200, ge=1, le=60_000)
    max_text_bytes: int = Field(default=20_000, ge=16, le=1_000_000)


class MetricsConfig(_Frozen):
    """Prometheus exposition; localhost unless an operator opens it up."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535)


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
    kafka: KafkaConfig = KafkaConfig()
    topics: TopicsConfig = TopicsConfig()
    admission: AdmissionOverrides = AdmissionOverrides()
    batch: BatchConfig = BatchConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()

    @field_validator("model_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


def _variable(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + "__".join(str(p).upper() for p in loc if not isinstance(p, int))


def load_settings(**overrides: Any) -> Settings:
    """Read the environment; bad values stop here with the variable to fix."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_variable(err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
    except ValueError as exc:  # e.g. a nested value that is not valid JSON
        raise ConfigError(f"invalid configuration: {exc}") from None


def masked(settings: Settings) -> dict[str, Any]:
    """Effective settings as JSON-able data, secrets shown as '**********'."""
    return settings.model_dump(mode="json")
