"""Serving from a Qdrant server: a bundle's support set is published once per version.

The server API runs through qdrant-client's local mode here (no Qdrant server binary
on this machine); tests/integration/test_ops.py runs a real server where Docker exists.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from daemon.stores import StoreConfig, collection_name, open_store
from model.bundle import load_bundle
from model.store.edge import EdgeStore
from tests.model_fixtures import copy_bundle


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
