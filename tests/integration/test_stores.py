"""Serving from a Qdrant server: a bundle's support set is published once per version.

The server API runs through qdrant-client's local mode here (no Qdrant server binary
on this machine); tests/integration/test_ops.py runs a real server where Docker exists.
Also: the embedded store a bundle ships with is HNSW-indexed once it is large enough.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from daemon.stores import StoreConfig, collection_name, open_store
from model.build import BuildOptions, build_bundle
from model.bundle import load_bundle
from model.data import Example
from model.network import NetworkConfig
from model.store.base import IndexSettings
from model.store.edge import EdgeStore
from model.train import TrainOptions
from tests.model_fixtures import copy_bundle, toy_corpus


def test_server_backend_publishes_the_bundle_and_serves_the_same_neighbours(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    bundle = load_bundle(copy_bundle(tiny_bundle, tmp_path / "b"))
    client = QdrantClient(":memory:")
    config = StoreConfig(backend="server", url="http://unused:6333")
    with warnings.catch_warnings():
        # local mode says payload indexes have no effect there; a real server uses them
        warnings.filterwarnings("ignore", message="Payload indexes have no effect")
        server = open_store(config, bundle, client=client)
        again = open_store(config, bundle, client=client)  # a second replica: no re-upload
    edge = EdgeStore(bundle.store_path)
    try:
        assert server.count() == edge.count() == again.count() > 0
        name = collection_name("exemplar-", bundle.info.version)
        assert server.alias_target("exemplar-serving") == name  # type: ignore[attr-defined]
        queries = np.random.default_rng(0).random((5, edge.dim), dtype=np.float32)
        for a, b in zip(edge.search(queries, 4), server.search(queries, 4), strict=True):
            assert [n.id for n in a] == [n.id for n in b]
            assert [n.distance for n in a] == pytest.approx([n.distance for n in b], rel=1e-4)
    finally:
        edge.close()
        server.close()
        again.close()
        client.close()


def test_server_backend_requires_a_url() -> None:
    with pytest.raises(ValueError, match="EXEMPLAR_STORE__URL"):
        StoreConfig(backend="server")


def test_a_bundle_above_the_indexing_threshold_ships_an_indexed_store(
    tiny_encoder: Path, tmp_path: Path
) -> None:
    rows = [Example(r["id"], r["text"], r["label"]) for r in toy_corpus(120, seed=5)]
    options = BuildOptions(
        alpha=0.9,
        k=4,
        network=NetworkConfig(
            labels=("_", "__"), encoder=str(tiny_encoder), num_filters=32, max_length=64
        ),
        train=TrainOptions(max_epochs=2, progress=False),
        index=IndexSettings(hnsw_m=8, quantization="int8"),
        indexing_threshold_kb=1,  # 90 support exemplars x 32 floats = 11 KB
    )
    out = build_bundle(rows[:90], tmp_path / "b", rows[90:], options)
    bundle = load_bundle(out)
    index = bundle.info.training["store_index"]
    with EdgeStore(bundle.store_path) as store:
        assert store.count() == bundle.info.training["rows"] == 90
        assert store.indexed_count == index["indexed_vectors"] == 90
    assert (index["hnsw_m"], index["quantization"]) == (8, "int8")


def test_a_bundle_below_the_indexing_threshold_stays_a_plain_scan(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    bundle = load_bundle(copy_bundle(tiny_bundle, tmp_path / "b"))
    rows = bundle.info.training["rows"]
    assert 0 < rows * bundle.info.network.num_filters * 4 < 10_000 * 1024  # the engine's 10 MB
    assert bundle.info.training["store_index"]["indexed_vectors"] == 0
    with EdgeStore(bundle.store_path) as store:
        assert store.indexed_count == 0
        assert store.count() == rows
