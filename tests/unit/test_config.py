"""Settings: read from EXEMPLAR_* once, bad values stop start-up naming the variable."""

from __future__ import annotations

import json

import pytest

from daemon.cli import main
from daemon.config import load_settings
from model.errors import ConfigError


def test_defaults_and_nested_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXEMPLAR_KAFKA__BOOTSTRAP_SERVERS", "broker-1:9092,broker-2:9092")
    monkeypatch.setenv("EXEMPLAR_TOPICS__INPUT", "reviews.in")
    monkeypatch.setenv("EXEMPLAR_ADMISSION__ALPHA", "0.9")
    monkeypatch.setenv("EXEMPLAR_ADMISSION__TAU", '{"fresh": 12.5}')
    s = load_settings()
    assert s.kafka.bootstrap_servers == "broker-1:9092,broker-2:9092"
    assert s.topics.input == "reviews.in"
    assert s.topics.output == "exemplar.labels"
    assert s.admission.alpha == 0.9 and s.admission.tau == {"fresh": 12.5}
    assert s.metrics.host == "127.0.0.1" and s.metrics.port == 9108
    assert s.compute.encoder_dtype == "float32" and s.compute.torch_threads is None
    assert s.batch.forward_size == 16


@pytest.mark.parametrize(
    ("name", "value", "variable"),
    [
        ("EXEMPLAR_ADMISSION__ALPHA", "1.5", "EXEMPLAR_ADMISSION__ALPHA"),
        ("EXEMPLAR_BATCH__MAX_SIZE", "0", "EXEMPLAR_BATCH__MAX_SIZE"),
        ("EXEMPLAR_BATCH__FORWARD_SIZE", "0", "EXEMPLAR_BATCH__FORWARD_SIZE"),
        ("EXEMPLAR_COMPUTE__ENCODER_DTYPE", "float16", "EXEMPLAR_COMPUTE__ENCODER_DTYPE"),
        ("EXEMPLAR_COMPUTE__TORCH_THREADS", "0", "EXEMPLAR_COMPUTE__TORCH_THREADS"),
        ("EXEMPLAR_METRICS__PORT", "http", "EXEMPLAR_METRICS__PORT"),
        ("EXEMPLAR_KAFKA__SECURITY_PROTOCOL", "SASL_SSL", "EXEMPLAR_KAFKA__SASL_MECHANISM"),
        ("EXEMPLAR_NO_SUCH_SETTING", "1", "EXEMPLAR_NO_SUCH_SETTING"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, variable: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=variable):
        load_settings()


def test_config_command_masks_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXEMPLAR_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("EXEMPLAR_KAFKA__SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("EXEMPLAR_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("EXEMPLAR_KAFKA__SASL_PASSWORD", "hunter2")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    assert json.loads(out)["kafka"]["sasl_password"] == "**********"


def test_bad_configuration_stops_the_cli_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXEMPLAR_BATCH__MAX_WAIT_MS", "-3")
    assert main(["run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "EXEMPLAR_BATCH__MAX_WAIT_MS" in err and len(err.splitlines()) == 1
