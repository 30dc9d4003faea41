"""Fixtures of the lifecycle tests (curator, fine-tuning, split roles)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.lifecycle import LifecycleService
from tests.integration.test_curator import make_registry, service_starter


@pytest.fixture
def registry_root(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A model registry whose one (serving) version is a copy of the tiny bundle."""
    return make_registry(tiny_bundle, tmp_path)


@pytest.fixture
def start_service() -> Iterator[Callable[..., LifecycleService]]:
    """Starts services as ``exemplar run`` would; stops them all at the end."""
    yield from service_starter()
