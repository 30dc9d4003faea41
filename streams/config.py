"""Typed settings for the Kafka side: connection/client options and topic layout.

These are pydantic sub-configs, nested by the daemon's one settings class (prefix
``EXEMPLAR_``, nested delimiter ``__``), so every field name here becomes an
environment variable such as ``EXEMPLAR_KAFKA__BOOTSTRAP_SERVERS`` or
``EXEMPLAR_TOPICS__PARTITIONS``. Nothing in this module reads the environment;
validators fail fast with a message naming the variable to set.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from kafka import codec
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from model.errors import ConfigError

KAFKA_ENV_PREFIX = "EXEMPLAR_KAFKA__"
TOPICS_ENV_PREFIX = "EXEMPLAR_TOPICS__"

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
# OAUTHBEARER and GSSAPI need a token provider object / Kerberos setup that an
# environment variable cannot express, so only the credential-based mechanisms are offered.
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
Compression = Literal["gzip", "snappy", "lz4", "zstd"]

_CODEC_AVAILABLE = {
    "gzip": codec.has_gzip,
    "snappy": codec.has_snappy,
    "lz4": codec.has_lz4,
    "zstd": codec.has_zstd,
}
_CODEC_PACKAGE = {"snappy": "python-snappy", "lz4": "lz4", "zstd": "zstandard"}

PositiveInt = Annotated[int, Field(gt=0)]


def _env(prefix: str, field: str) -> str:
    return f"{prefix}{field.upper()}"


class KafkaConfig(BaseModel):
    """How to reach the cluster, and client behaviour shared by consumer and producer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092", description="Comma-separated host:port list of brokers."
    )
    client_id: str = Field(default="exemplar", min_length=1)
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_password: SecretStr | None = Field(
        default=None, description="Password of an encrypted key file."
    )
    ssl_check_hostname: bool = True

    request_timeout_ms: PositiveInt = 30_000
    bootstrap_timeout_ms: PositiveInt = Field(
        default=30_000, description="How long a new client waits for the first broker to answer."
    )

    group_id: str = Field(default="exemplar-predictor", min_length=1)
    session_timeout_ms: PositiveInt = 45_000
    heartbeat_interval_ms: PositiveInt = 3_000
    max_poll_interval_ms: PositiveInt = 300_000
    fetch_max_wait_ms: PositiveInt = Field(
        default=100,
        description="How long the broker may hold a fetch for new records (Kafka's default "
        "is 500). Lower: less latency at light load; the latency benchmark saw p50 fall by "
        "about 150 ms from 500 to 100, while saturated throughput measured ~5% lower in "
        "one run (within its noise).",
    )

    acks: Literal["all", "1", "0"] = Field(
        default="all",
        description="'all' is what at-least-once needs; weaker values lose idempotence.",
    )
    linger_ms: Annotated[int, Field(ge=0)] = 5
    compression: Compression | None = None
    max_request_bytes: PositiveInt = Field(
        default=1_048_576, description="Largest produce request."
    )
    delivery_timeout_ms: PositiveInt = Field(
        default=120_000, description="Upper bound for a send to succeed or fail, retries included."
    )
    max_block_ms: PositiveInt = Field(
        default=60_000, description="How long send() may block for metadata or buffer space."
    )

    @field_validator("bootstrap_servers")
    @classmethod
    def _check_servers(cls, value: str) -> str:
        servers = [part.strip() for part in value.split(",") if part.strip()]
        bad = [
            s for s in servers if not re.fullmatch(r"[^\s:]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}", s)
        ]
        if not servers or bad:
            raise ConfigError(
                f"bootstrap_servers {value!r} is not a comma-separated host:port list; "
                f"set {_env(KAFKA_ENV_PREFIX, 'bootstrap_servers')}=host:9092[,host2:9092]"
            )
        return ",".join(servers)

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile")
    @classmethod
    def _check_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and not value.is_file():
            name = info.field_name or "ssl file"
            raise ConfigError(
                f"{name} {str(value)!r} is not a readable file; "
                f"fix or unset {_env(KAFKA_ENV_PREFIX, name)}"
            )
        return value

    @field_validator("compression")
    @classmethod
    def _check_codec(cls, value: Compression | None) -> Compression | None:
        if value is not None and not _CODEC_AVAILABLE[value]():
            raise ConfigError(
                f"compression {value!r} needs the Python package {_CODEC_PACKAGE[value]!r}, "
                f"which is not installed; install it or set "
                f"{_env(KAFKA_ENV_PREFIX, 'compression')} to gzip or leave it unset"
            )
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> KafkaConfig:
        self._check_security()
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ConfigError(
                f"heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be below "
                f"session_timeout_ms ({self.session_timeout_ms}), ideally a third of it; "
                f"lower {_env(KAFKA_ENV_PREFIX, 'heartbeat_interval_ms')}"
            )
        if self.request_timeout_ms <= self.fetch_max_wait_ms:
            raise ConfigError(
                f"request_timeout_ms must exceed fetch_max_wait_ms ({self.fetch_max_wait_ms}); "
                f"raise {_env(KAFKA_ENV_PREFIX, 'request_timeout_ms')}"
            )
        if self.delivery_timeout_ms < self.linger_ms + self.request_timeout_ms:
            raise ConfigError(
                "delivery_timeout_ms must be at least linger_ms + request_timeout_ms; "
                f"raise {_env(KAFKA_ENV_PREFIX, 'delivery_timeout_ms')}"
            )
        return self

    def _check_security(self) -> None:
        sasl = self.security_protocol.startswith("SASL_")
        tls = self.security_protocol.endswith("SSL")
        protocol_var = _env(KAFKA_ENV_PREFIX, "security_protocol")
        if sasl:
            if self.sasl_mechanism is None:
                raise ConfigError(
                    f"security_protocol {self.security_protocol} needs a SASL mechanism; set "
                    f"{_env(KAFKA_ENV_PREFIX, 'sasl_mechanism')} to PLAIN, SCRAM-SHA-256 "
                    "or SCRAM-SHA-512"
                )
            missing = [
                _env(KAFKA_ENV_PREFIX, name)
                for name in ("sasl_username", "sasl_password")
                if not getattr(self, name)
            ]
            if missing:
                raise ConfigError(
                    f"SASL {self.sasl_mechanism} needs credentials; set {' and '.join(missing)}"
                )
        elif self.sasl_mechanism or self.sasl_username or self.sasl_password:
            raise ConfigError(
                f"SASL settings are given but security_protocol is {self.security_protocol}; "
                f"set {protocol_var} to SASL_PLAINTEXT or SASL_SSL, or unset the SASL variables"
            )
        if not tls:
            given = [
                name
                for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password")
                if getattr(self, name) is not None
            ]
            if given:
                raise ConfigError(
                    f"{', '.join(given)} given but security_protocol is "
                    f"{self.security_protocol}; set {protocol_var} to SSL or SASL_SSL"
                )


# Kafka's own rule for topic names (legal characters, at most 249 of them).
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


class TopicsConfig(BaseModel):
    """The topics the deployment uses, and how to create them when they are missing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: str = "exemplar.events"
    output: str = "exemplar.labels"
    adjudication: str = "exemplar.adjudication"
    decisions: str = "exemplar.decisions"
    dead_letter: str = "exemplar.dlq"
    model_updates: str = "exemplar.models"
    lifecycle: str = Field(
        default="exemplar.lifecycle",
        description="predictor -> curator: adjudicated and candidate events (split roles)",
    )

    partitions: Annotated[int, Field(ge=1)] = 3
    replication_factor: Annotated[int, Field(ge=1)] = 1
    retention_ms: Annotated[int, Field(ge=-1)] | None = Field(
        default=None,
        description="retention.ms for created topics; -1 keeps forever; unset: broker default.",
    )
    create_missing: bool = True

    @field_validator(
        "input", "output", "adjudication", "decisions", "dead_letter", "model_updates", "lifecycle"
    )
    @classmethod
    def _check_name(cls, value: str, info: ValidationInfo) -> str:
        if not _TOPIC_NAME.fullmatch(value) or value in {".", ".."}:
            name = info.field_name or "topic"
            raise ConfigError(
                f"topic name {value!r} is not legal in Kafka (letters, digits, '.', '_', '-', "
                f"at most 249); fix {_env(TOPICS_ENV_PREFIX, name)}"
            )
        return value

    @field_validator("retention_ms")
    @classmethod
    def _check_retention(cls, value: int | None) -> int | None:
        if value == 0:
            raise ConfigError(
                f"retention_ms 0 would delete everything at once; set "
                f"{_env(TOPICS_ENV_PREFIX, 'retention_ms')} to a positive value or -1"
            )
        return value

    @model_validator(mode="after")
    def _check_distinct(self) -> TopicsConfig:
        seen: dict[str, str] = {}
        for role, name in self.by_role().items():
            # Kafka refuses topics that differ only by '.' vs '_' (they collide in metric names).
            canonical = name.replace(".", "_")
            if canonical in seen:
                raise ConfigError(
                    f"topics {seen[canonical]} and {role} both resolve to {name!r} (Kafka treats "
                    f"'.' and '_' alike); give {_env(TOPICS_ENV_PREFIX, role)} another name"
                )
            seen[canonical] = role
        return self

    def by_role(self) -> dict[str, str]:
        """Every topic name keyed by its role (the field name), in a stable order."""
        return {
            "input": self.input,
            "output": self.output,
            "adjudication": self.adjudication,
            "decisions": self.decisions,
            "dead_letter": self.dead_letter,
            "model_updates": self.model_updates,
            "lifecycle": self.lifecycle,
        }
