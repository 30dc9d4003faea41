"""One contract, every exemplar store back end: the same tests run on each.

``EdgeStore`` runs on a shard in ``tmp_path``; ``ServerStore`` runs on qdrant-client's
local mode (``QdrantClient(":memory:")``), which needs no server.
"""

from __future__ import annotations

import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydantic import SecretStr
from qdrant_client import QdrantClient

from model.errors import ConfigError, StoreError, StoreUnavailable
from model.store import EdgeStore, Exemplar, ExemplarStore, ServerStore

DIM = 32
LABELS = ("sports", "politics", "tech")


def _server_store(client: QdrantClient, collection: str, dim: int = DIM) -> ServerStore:
    # Local mode warns that payload indexes have no effect there; a real server uses
    # them, so the store creates them anyway. Silence exactly that warning, only here.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Payload indexes have no effect", category=UserWarning
        )
        return ServerStore(collection, dim, client=client)


@pytest.fixture(params=["edge", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ExemplarStore]:
    """A fresh, empty store of each back end."""
    if request.param == "edge":
        with EdgeStore(tmp_path / "store", dim=DIM) as edge:
            yield edge
    else:
        client = QdrantClient(":memory:")
        with _server_store(client, "exemplars") as server:
            yield server
        client.close()


def _vectors(n: int, seed: int = 0) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def _exemplars(vectors: npt.NDArray[np.float32], prefix: str = "train:") -> list[Exemplar]:
    return [
        Exemplar(
            id=f"{prefix}{i}",
            vector=vec,
            label=LABELS[i % 3],
            predicted=LABELS[(i + 1) % 3],
            source="train" if i % 2 else "human",
            text=f"document {i}",
            meta={"row": i},
        )
        for i, vec in enumerate(vectors)
    ]


def test_upsert_then_count(store: ExemplarStore) -> None:
    store.upsert(_exemplars(_vectors(50)))
    assert store.count() == 50
    assert store.count({"label": "sports"}) == 17


def test_search_matches_brute_force_l2(store: ExemplarStore) -> None:
    points, queries = _vectors(500, seed=1), _vectors(20, seed=2)
    store.upsert(_exemplars(points))
    hits = store.search(queries, k=10)
    true = np.linalg.norm(queries[:, None, :] - points[None, :, :], axis=-1)  # not squared
    for row, neighbors in enumerate(hits):
        order = np.argsort(true[row])[:10]
        assert [n.id for n in neighbors] == [f"train:{i}" for i in order]
        np.testing.assert_allclose(
            [n.distance for n in neighbors], true[row, order], rtol=1e-5, atol=1e-5
        )


def test_search_payload_and_exact_match_distance(store: ExemplarStore) -> None:
    points = _vectors(5)
    store.upsert(_exemplars(points))
    [[first, *_]] = store.search(points[3:4], k=2)
    assert first.id == "train:3"
    assert first.distance == pytest.approx(0.0, abs=1e-6)
    assert (first.label, first.predicted, first.source) == ("sports", "politics", "train")
    assert first.text == "document 3"
    assert dict(first.meta) == {"row": 3}


def test_batched_search_shapes(store: ExemplarStore) -> None:
    store.upsert(_exemplars(_vectors(7)))
    hits = store.search(_vectors(4, seed=3), k=10)
    assert len(hits) == 4
    assert all(len(row) == 7 for row in hits)  # fewer exemplars than k
    assert [len(row) for row in store.search(_vectors(3, seed=4), k=2)] == [2, 2, 2]
    assert store.search(np.empty((0, DIM), np.float32), k=3) == []


def test_search_where_filters_on_label_and_source(store: ExemplarStore) -> None:
    store.upsert(_exemplars(_vectors(60)))
    for row in store.search(_vectors(5, seed=5), k=8, where={"label": "tech"}):
        assert len(row) == 8
        assert {n.label for n in row} == {"tech"}
    both = {"label": "sports", "source": "human"}
    for row in store.search(_vectors(2, seed=6), k=50, where=both):
        assert len(row) == store.count(both) == 10
        assert all((n.label, n.source) == ("sports", "human") for n in row)
    assert store.search(_vectors(1), k=3, where={"predicted": "nope"}) == [[]]


def test_filter_on_unknown_key_is_refused(store: ExemplarStore) -> None:
    with pytest.raises(ValueError, match="cannot filter"):
        store.search(_vectors(1), k=1, where={"text": "x"})


def test_get_present_absent_and_vectors(store: ExemplarStore) -> None:
    points = _vectors(3)
    store.upsert(_exemplars(points))
    found, missing = store.get(["train:2", "nope"])
    assert missing is None
    assert found is not None
    assert (found.id, found.label, found.text, dict(found.meta)) == (
        "train:2",
        "tech",
        "document 2",
        {"row": 2},
    )
    assert found.vector.size == 0
    [with_vec] = store.get(["train:2"], with_vectors=True)
    assert with_vec is not None
    np.testing.assert_allclose(with_vec.vector, points[2], rtol=1e-6)
    assert store.get([]) == []


def test_relabel_returns_old_and_search_sees_new(store: ExemplarStore) -> None:
    points = _vectors(10)
    store.upsert(_exemplars(points))
    before = store.relabel("train:5", "politics", source="human", meta={"reviewer": "ann"})
    assert (before.label, before.source, dict(before.meta)) == ("tech", "train", {"row": 5})
    [[hit]] = store.search(points[5:6], k=1)
    assert (hit.id, hit.label, hit.source) == ("train:5", "politics", "human")
    assert dict(hit.meta) == {"row": 5, "reviewer": "ann"}
    assert hit.predicted == "sports"  # the model's prediction is not touched
    assert store.count({"label": "politics"}) == 4


def test_relabel_unknown_id_raises_key_error(store: ExemplarStore) -> None:
    with pytest.raises(KeyError):
        store.relabel("nope", "tech")


def test_delete_returns_how_many_existed(store: ExemplarStore) -> None:
    store.upsert(_exemplars(_vectors(5)))
    assert store.delete(["train:0", "train:1", "nope"]) == 2
    assert store.delete(["train:0"]) == 0
    assert store.delete([]) == 0
    assert store.count() == 3
    assert store.get(["train:0"]) == [None]


def test_upsert_same_id_replaces(store: ExemplarStore) -> None:
    store.upsert(_exemplars(_vectors(5)))
    replacement = Exemplar(
        id="train:1", vector=np.full(DIM, 9.0, np.float32), label="tech", predicted="tech"
    )
    store.upsert([replacement])
    assert store.count() == 5
    [[hit]] = store.search(np.full((1, DIM), 9.0, np.float32), k=1)
    assert (hit.id, hit.label, hit.distance) == ("train:1", "tech", pytest.approx(0.0, abs=1e-6))
    assert hit.text is None and dict(hit.meta) == {}


def test_iter_exemplars_yields_all(store: ExemplarStore) -> None:
    points = _vectors(25)
    store.upsert(_exemplars(points))
    seen = {ex.id: ex for ex in store.iter_exemplars(batch_size=7, with_vectors=True)}
    assert set(seen) == {f"train:{i}" for i in range(25)}
    np.testing.assert_allclose(seen["train:11"].vector, points[11], rtol=1e-6)
    assert all(ex.vector.size == 0 for ex in store.iter_exemplars(batch_size=10))


def test_empty_store(store: ExemplarStore) -> None:
    assert store.count() == 0
    assert store.search(_vectors(2), k=5) == [[], []]
    assert list(store.iter_exemplars()) == []


def test_wrong_dim_is_refused(store: ExemplarStore) -> None:
    bad = Exemplar(id="x", vector=np.zeros(DIM + 1, np.float32), label="a", predicted="a")
    with pytest.raises(ValueError, match=str(DIM)):
        store.upsert([bad])
    with pytest.raises(ValueError, match=str(DIM)):
        store.search(np.zeros((2, DIM - 1), np.float32), k=1)
    with pytest.raises(ValueError, match="shape"):
        store.search(np.zeros(DIM, np.float32), k=1)  # one query still needs [1, dim]
    assert store.count() == 0


def test_non_finite_vectors_and_bad_k_are_refused(store: ExemplarStore) -> None:
    with pytest.raises(ValueError, match="NaN"):
        store.search(np.full((1, DIM), np.nan, np.float32), k=1)
    with pytest.raises(ValueError, match="k must"):
        store.search(_vectors(1), k=0)


def test_text_none_and_unicode_round_trip(store: ExemplarStore) -> None:
    vecs = _vectors(2)
    text = "Zürich — 東京 🚀 naïve café"
    store.upsert(
        [
            Exemplar(
                id="human:ünï-1",
                vector=vecs[0],
                label="ß",
                predicted="ß",
                source="human",
                text=text,
                meta={"note": "é"},
            ),
            Exemplar(id="index:2", vector=vecs[1], label="tech", predicted="tech", text=None),
        ]
    )
    uni, none = store.get(["human:ünï-1", "index:2"])
    assert uni is not None and none is not None
    assert (uni.text, uni.label, dict(uni.meta)) == (text, "ß", {"note": "é"})
    assert none.text is None
    [[hit]] = store.search(vecs[:1], k=1, where={"label": "ß"})
    assert (hit.id, hit.text) == ("human:ünï-1", text)


def test_closed_store_refuses_calls(store: ExemplarStore) -> None:
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.count()


def test_back_ends_agree_on_distances(tmp_path: Path) -> None:
    points, queries = _vectors(200, seed=7), _vectors(5, seed=8)
    with (
        EdgeStore(tmp_path / "edge", dim=DIM) as edge,
        _server_store(QdrantClient(":memory:"), "agree") as server,
    ):
        for s in (edge, server):
            s.upsert(_exemplars(points))
        a, b = edge.search(queries, k=5), server.search(queries, k=5)
    assert [[n.id for n in row] for row in a] == [[n.id for n in row] for row in b]
    np.testing.assert_allclose(
        [[n.distance for n in row] for row in a],
        [[n.distance for n in row] for row in b],
        rtol=1e-5,
    )


# --- embedded back end only ---------------------------------------------------------


def test_edge_close_and_reopen_keeps_everything(tmp_path: Path) -> None:
    path, points = tmp_path / "store", _vectors(40)
    with EdgeStore(path, dim=DIM) as store:
        store.upsert(_exemplars(points))
        store.relabel("train:3", "politics")
        store.delete(["train:39"])
    with EdgeStore(path) as reopened:
        assert reopened.dim == DIM
        assert reopened.count() == 39
        assert reopened.count({"label": "politics"}) == 14
        [[hit]] = reopened.search(points[3:4], k=1)
        assert (hit.id, hit.label) == ("train:3", "politics")
        assert reopened.get(["train:39"]) == [None]


def test_edge_optimize_builds_index_and_search_stays_right(tmp_path: Path) -> None:
    points, queries = _vectors(300, seed=9), _vectors(3, seed=10)
    with EdgeStore(tmp_path / "store", dim=DIM, indexing_threshold_kb=1) as store:
        store.upsert(_exemplars(points))
        assert store.indexed_count == 0  # plain segment: every search is a full scan
        assert store.optimize() is True
        assert store.indexed_count == 300
        true = np.linalg.norm(queries[:, None, :] - points[None, :, :], axis=-1)
        for row, hits in enumerate(store.search(queries, k=3)):
            assert hits[0].id == f"train:{np.argmin(true[row])}"


def test_edge_open_checks_dim_and_layout(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dim"):
        EdgeStore(tmp_path / "new")
    EdgeStore(tmp_path / "store", dim=DIM).close()
    with pytest.raises(StoreError, match="dim"):
        EdgeStore(tmp_path / "store", dim=DIM + 1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("not a store")
    with pytest.raises(StoreError, match="not an exemplar edge store"):
        EdgeStore(tmp_path / "other")


def test_edge_second_open_of_same_path_is_a_store_error(tmp_path: Path) -> None:
    with EdgeStore(tmp_path / "store", dim=DIM), pytest.raises(StoreError):
        EdgeStore(tmp_path / "store")


# --- server back end only -----------------------------------------------------------


def test_server_promote_flips_alias() -> None:
    client = QdrantClient(":memory:")
    v1 = _server_store(client, "exemplars_v1")
    v1.upsert(_exemplars(_vectors(3), prefix="v1:"))
    with warnings.catch_warnings():  # same local-mode payload index warning as above
        warnings.filterwarnings("ignore", message="Payload indexes have no effect")
        v2 = v1.create_version("exemplars_v2")
    v2.upsert(_exemplars(_vectors(5), prefix="v2:"))
    v1.promote("live", "exemplars_v1")
    live = ServerStore("live", client=client)
    assert (live.dim, live.count(), v1.alias_target("live")) == (DIM, 3, "exemplars_v1")
    v1.promote("live", "exemplars_v2")
    assert (live.count(), v1.alias_target("live")) == (5, "exemplars_v2")
    assert {n.id.split(":")[0] for n in live.search(_vectors(1), k=5)[0]} == {"v2"}
    with pytest.raises(StoreError, match="already exists"):
        v1.create_version("exemplars_v2")
    for s in (live, v1, v2):
        s.close()
    client.close()


def test_server_needs_exactly_one_of_client_or_url() -> None:
    with pytest.raises(ConfigError):
        ServerStore("x", DIM)
    client = QdrantClient(":memory:")
    with pytest.raises(ConfigError):
        ServerStore("x", DIM, client=client, url="http://localhost:6333")
    client.close()


def _nobody_listens() -> str:
    """URL of a local port that was free a moment ago: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_server_unreachable_is_store_unavailable() -> None:
    client = QdrantClient(url=_nobody_listens(), timeout=2, check_compatibility=False)
    with pytest.raises(StoreUnavailable):
        ServerStore("x", DIM, client=client)
    client.close()


def test_server_from_url_owns_its_client_and_reports_unreachable() -> None:
    with warnings.catch_warnings():  # qdrant-client's nudge towards https for api keys
        warnings.filterwarnings("ignore", message="Api key is used with an insecure connection")
        with pytest.raises(StoreUnavailable, match="cannot reach"):
            ServerStore("x", DIM, url=_nobody_listens(), api_key=SecretStr("k"))
