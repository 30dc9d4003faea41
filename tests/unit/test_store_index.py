"""How the stores index and search: HNSW and int8 settings, their bounds, where they go.

The contract suite (test_store_contract.py) checks what every store returns; this file
checks the index settings: an indexed, int8-quantized embedded store still returns the
true L2 distances and nearly the exact neighbours, bad settings stop with the variable
to fix, and the server back end creates and searches collections with them.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from pydantic import ValidationError
from qdrant_client import QdrantClient

from daemon.config import load_settings
from daemon.stores import StoreConfig
from model.errors import ConfigError
from model.store import EdgeStore, Exemplar, ServerStore
from model.store.base import IndexSettings

DIM = 64
K = 8


def _clustered(n: int, seed: int) -> npt.NDArray[np.float32]:
    """Non-negative vectors around 40 centres, like ReLU'd max-pooled exemplars."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(2.0, 1.0, (40, DIM))
    points = centres[rng.integers(0, 40, n)] + rng.normal(0.0, 0.4, (n, DIM))
    return np.maximum(points, 0.0).astype(np.float32)


def _exemplars(vectors: npt.NDArray[np.float32]) -> list[Exemplar]:
    return [
        Exemplar(id=f"train:{i}", vector=v, label="a", predicted="a", text=f"doc {i}")
        for i, v in enumerate(vectors)
    ]


def test_int8_hnsw_keeps_recall_and_returns_true_distances(tmp_path: Path) -> None:
    points, queries = _clustered(3000, seed=1), _clustered(50, seed=2)
    settings = IndexSettings(quantization="int8", search_ef=64)
    with EdgeStore(tmp_path / "s", dim=DIM, index=settings, indexing_threshold_kb=1) as store:
        store.upsert(_exemplars(points))
        assert store.optimize() is True
        assert store.indexed_count == len(points)  # searches go through the graph now
        hits = store.search(queries, K)
    true = np.linalg.norm(queries[:, None, :] - points[None, :, :], axis=-1)
    exact_ids = [{f"train:{i}" for i in np.argsort(row)[:K]} for row in true]
    found = [{n.id for n in row} for row in hits]
    recall = np.mean([len(a & b) / K for a, b in zip(found, exact_ids, strict=True)])
    assert recall >= 0.9
    for q, row in enumerate(hits):
        # rescored with the float32 vectors: no int8 rounding in what admission compares
        got = [n.distance for n in row]
        want = [true[q, int(n.id.split(":")[1])] for n in row]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        assert got == sorted(got)


def test_exact_handle_on_an_int8_index_is_the_ground_truth(tmp_path: Path) -> None:
    points, queries = _clustered(1500, seed=3), _clustered(10, seed=4)
    path = tmp_path / "s"
    with EdgeStore(path, dim=DIM, indexing_threshold_kb=1) as store:  # default: int8
        store.upsert(_exemplars(points))
        store.optimize()
    with EdgeStore(path, exact=True) as exact:
        hits = exact.search(queries, K)
    true = np.linalg.norm(queries[:, None, :] - points[None, :, :], axis=-1)
    for q, row in enumerate(hits):
        assert [n.id for n in row] == [f"train:{i}" for i in np.argsort(true[q])[:K]]


def test_reopening_keeps_the_build_settings_and_takes_new_search_settings(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s"
    EdgeStore(path, dim=DIM, index=IndexSettings(hnsw_m=8, quantization="none")).close()
    with EdgeStore(path, index=IndexSettings(search_ef=200)) as store:
        assert store.index.search_ef == 200
        store.upsert(_exemplars(_clustered(10, seed=5)))
        assert store.count() == 10


@pytest.mark.parametrize(
    ("field", "value"),
    [("hnsw_m", 2), ("hnsw_m", 129), ("hnsw_ef_construct", 4), ("search_ef", 5000)],
)
def test_index_settings_refuse_out_of_range_values(field: str, value: int) -> None:
    changes: dict[str, Any] = {field: value}
    with pytest.raises(ConfigError, match=field):
        replace(IndexSettings(), **changes)
    with pytest.raises(ValidationError, match=field):
        StoreConfig.model_validate({field: value})


def test_index_settings_refuse_unknown_quantization_and_oversampling() -> None:
    with pytest.raises(ConfigError, match="quantization"):
        IndexSettings(quantization="int4")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="oversampling"):
        IndexSettings(oversampling=0.5)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EXEMPLAR_STORE__HNSW_M", "1"),
        ("EXEMPLAR_STORE__SEARCH_EF", "0"),
        ("EXEMPLAR_STORE__QUANTIZATION", "int4"),
        ("EXEMPLAR_STORE__OVERSAMPLING", "100"),
    ],
)
def test_bad_store_index_variables_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        load_settings()


def test_store_index_variables_reach_the_index_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXEMPLAR_STORE__HNSW_M", "32")
    monkeypatch.setenv("EXEMPLAR_STORE__SEARCH_EF", "128")
    monkeypatch.setenv("EXEMPLAR_STORE__QUANTIZATION", "none")
    settings = load_settings().store.index_settings()
    assert (settings.hnsw_m, settings.search_ef, settings.quantization) == (32, 128, "none")
    assert settings.hnsw_ef_construct == IndexSettings().hnsw_ef_construct


class _ServerLikeClient(QdrantClient):
    """Local mode that records what a server would be sent (and passes the rest on)."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.created: dict[str, dict[str, Any]] = {}
        self.search_params: list[Any] = []

    @property
    def init_options(self) -> dict[str, Any]:
        return {"url": "http://qdrant.invalid:6333"}  # not local: search params are sent

    def create_collection(self, collection_name: str, **kwargs: Any) -> bool:  # type: ignore[override]
        self.created[collection_name] = kwargs
        return super().create_collection(collection_name, **kwargs)

    def query_batch_points(self, collection_name: str, requests: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self.search_params.extend(r.params for r in requests)
        plain = [r.model_copy(update={"params": None}) for r in requests]  # local mode warns
        return super().query_batch_points(collection_name, plain, **kwargs)


def test_server_store_creates_and_searches_with_the_index_settings() -> None:
    client = _ServerLikeClient()
    settings = IndexSettings(hnsw_m=24, hnsw_ef_construct=200, search_ef=96, oversampling=3.0)
    with warnings.catch_warnings():  # local mode: payload indexes have no effect there
        warnings.filterwarnings("ignore", message="Payload indexes have no effect")
        store = ServerStore("v1", DIM, client=client, index=settings)
    created = client.created["v1"]
    assert (created["hnsw_config"].m, created["hnsw_config"].ef_construct) == (24, 200)
    assert created["quantization_config"].scalar.type.value == "int8"
    store.upsert(_exemplars(_clustered(20, seed=6)))
    assert len(store.search(_clustered(2, seed=7), 3)[0]) == 3
    [params, _] = client.search_params
    assert params.hnsw_ef == 96
    assert params.quantization.rescore is True  # true L2 distances, as on the edge store
    assert params.quantization.oversampling == 3.0
    store.close()
    client.close()
