"""Exemplar store on a Qdrant server (or cluster) through ``qdrant-client``.

For many replicas: every model version gets its own collection, and the replicas
read through an alias that ``promote`` flips atomically from one version to the
next. Tests run the same code on ``QdrantClient(":memory:")`` (local mode).

Payload and input checks are shared with the embedded back end (``model.store.codec``)
so both return exactly the same exemplars and distances. The same ``IndexSettings``
apply: the HNSW and quantization settings when a collection is created (the server's
background optimizer builds the index), the search settings on every query. Local
mode always searches exactly, so it is sent no search settings (it warns about them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from pydantic import SecretStr
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from model.errors import ConfigError, ExemplarError, StoreError, StoreUnavailable
from model.store.base import EngineStore, Exemplar, IndexSettings, Neighbor, point_uuid
from model.store.codec import (
    INDEXED_KEYS,
    check_exemplars,
    check_k,
    check_vectors,
    check_where,
    exemplar_from_payload,
    exemplar_payload,
    neighbor_from_payload,
)

#: HTTP statuses worth retrying: overload, a restarting node, a proxy timeout.
_TRANSIENT_HTTP = frozenset({429, 502, 503, 504})
_TRANSIENT_GRPC = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
_UPSERT_CHUNK = 512  # keeps each request well under the server's 32 MB body limit
_INT8_QUANTILE = 0.99  # as in the embedded back end


@contextmanager
def _client_errors(action: str) -> Iterator[None]:
    """Translate qdrant-client failures into ``StoreError`` / ``StoreUnavailable``."""
    try:
        yield
    except ResponseHandlingException as exc:  # connection refused, reset, timeout
        raise StoreUnavailable(f"qdrant: {action}: cannot reach server: {exc.source}") from exc
    except UnexpectedResponse as exc:
        error = StoreUnavailable if exc.status_code in _TRANSIENT_HTTP else StoreError
        raise error(f"qdrant: {action} failed: {exc}") from exc
    except grpc.RpcError as exc:  # only with a caller-made prefer_grpc client
        code = exc.code() if isinstance(exc, grpc.Call) else None
        error = StoreUnavailable if code in _TRANSIENT_GRPC else StoreError
        raise error(f"qdrant: {action} failed: {exc}") from exc
    except (ValueError, RuntimeError) as exc:  # local mode and client-side validation
        raise StoreError(f"qdrant: {action} failed: {exc}") from exc


def _filter(where: Mapping[str, str]) -> models.Filter | None:
    if not where:
        return None
    conditions: list[Any] = [
        models.FieldCondition(key=key, match=models.MatchValue(value=value))
        for key, value in where.items()
    ]
    return models.Filter(must=conditions)


def _alias_targets(client: QdrantClient) -> dict[str, str]:
    with _client_errors("listing aliases"):
        aliases = client.get_aliases().aliases
    return {a.alias_name: a.collection_name for a in aliases}


def _search_params(index: IndexSettings) -> models.SearchParams:
    """HNSW with rescored quantization: the returned distances are the true L2 ones."""
    return models.SearchParams(
        hnsw_ef=index.search_ef,
        quantization=models.QuantizationSearchParams(rescore=True, oversampling=index.oversampling),
    )


def _is_local(client: QdrantClient) -> bool:
    """Whether ``client`` runs qdrant-client's local mode (in memory or on a path)."""
    options = client.init_options
    return options.get("location") == ":memory:" or options.get("path") is not None


class ServerStore(EngineStore):
    """Exemplar store in one Qdrant collection (or behind one alias)."""

    def __init__(
        self,
        collection: str,
        dim: int | None = None,
        *,
        client: QdrantClient | None = None,
        url: str | None = None,
        api_key: SecretStr | None = None,
        timeout: int | None = None,
        index: IndexSettings | None = None,
    ) -> None:
        """Open ``collection`` (a collection or an alias), creating it when missing.

        Pass a ready ``client`` (it stays the caller's to close) or a ``url`` (and
        ``api_key``) to get a client this store owns. ``dim`` is required to create
        and checked when opening. Opened through an alias, every call follows the
        alias, so a ``promote`` is seen by the next call. ``index`` (default
        ``IndexSettings()``): its build settings apply to a collection this store
        creates, its search settings to every search.
        """
        if (client is None) == (url is None):
            raise ConfigError("ServerStore needs exactly one of client= or url=")
        self._owns_client = client is None
        if client is None:
            key = api_key.get_secret_value() if api_key is not None else None
            # The client's version check runs on a background thread and only warns, out of
            # reach of the error translation here; opening the collection below fails fast.
            client = QdrantClient(url=url, api_key=key, timeout=timeout, check_compatibility=False)
        self._client = client
        self.collection = collection
        self.index = index or IndexSettings()
        self._params = None if _is_local(client) else _search_params(self.index)
        self._closed = False
        try:
            self.dim = self._open_or_create(dim)
        except ExemplarError:
            if self._owns_client:
                self._client.close()
            raise

    def _open_or_create(self, dim: int | None) -> int:
        target = _alias_targets(self._client).get(self.collection, self.collection)
        with _client_errors(f"opening collection {self.collection!r}"):
            exists = self._client.collection_exists(target)
        if exists:
            return self._stored_dim(target, dim)
        if dim is None or dim < 1:
            raise ConfigError(f"creating Qdrant collection {self.collection!r} needs dim >= 1")
        self._create(self.collection, dim)
        return dim

    def _stored_dim(self, target: str, dim: int | None) -> int:
        with _client_errors(f"reading collection {target!r}"):
            vectors = self._client.get_collection(target).config.params.vectors
        if not isinstance(vectors, models.VectorParams):
            raise StoreError(f"collection {target!r} has named vectors; expected one unnamed")
        if vectors.distance != models.Distance.EUCLID:
            raise StoreError(f"collection {target!r} uses {vectors.distance}, not Euclid")
        if dim is not None and dim != vectors.size:
            raise StoreError(
                f"collection {target!r} holds vectors of dim {vectors.size}, not {dim}"
            )
        return vectors.size

    def _create(self, name: str, dim: int) -> None:
        index = self.index
        quantization = (
            models.ScalarQuantization(
                scalar=models.ScalarQuantizationConfig(
                    type=models.ScalarType.INT8, quantile=_INT8_QUANTILE, always_ram=True
                )
            )
            if index.quantization == "int8"
            else None
        )
        with _client_errors(f"creating collection {name!r}"):
            self._client.create_collection(
                name,
                vectors_config=models.VectorParams(size=dim, distance=models.Distance.EUCLID),
                hnsw_config=models.HnswConfigDiff(
                    m=index.hnsw_m, ef_construct=index.hnsw_ef_construct
                ),
                quantization_config=quantization,
            )
            for key in INDEXED_KEYS:
                self._client.create_payload_index(name, key, models.PayloadSchemaType.KEYWORD)

    def _live(self) -> QdrantClient:
        if self._closed:
            raise StoreError(f"store on collection {self.collection!r} is closed")
        return self._client

    # --- versions and promotion ------------------------------------------------------

    def create_version(self, collection: str) -> ServerStore:
        """A new, empty collection of the same dim on the same client (fails if it exists)."""
        with _client_errors(f"checking collection {collection!r}"):
            exists = self._live().collection_exists(collection)
        if exists or collection in _alias_targets(self._client):
            raise StoreError(f"collection {collection!r} already exists")
        return ServerStore(collection, self.dim, client=self._client, index=self.index)

    def promote(self, alias: str, collection: str) -> None:
        """Point ``alias`` at ``collection`` in one atomic alias update."""
        client = self._live()
        operations: list[Any] = []
        if alias in _alias_targets(client):  # deleting an absent alias fails on a server
            operations.append(
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))
            )
        operations.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)
            )
        )
        with _client_errors(f"pointing alias {alias!r} at {collection!r}"):
            client.update_collection_aliases(change_aliases_operations=operations)

    def alias_target(self, alias: str) -> str | None:
        """The collection ``alias`` points at now, or ``None``."""
        return _alias_targets(self._live()).get(alias)

    # --- the store contract ----------------------------------------------------------

    def upsert(self, exemplars: Sequence[Exemplar]) -> None:
        if not exemplars:
            return
        vectors = check_exemplars(exemplars, self.dim)
        client = self._live()
        for start in range(0, len(exemplars), _UPSERT_CHUNK):
            points = [
                models.PointStruct(
                    id=point_uuid(ex.id),
                    vector=vectors[start + i].tolist(),
                    payload=exemplar_payload(ex),
                )
                for i, ex in enumerate(exemplars[start : start + _UPSERT_CHUNK])
            ]
            with _client_errors("upsert"):
                client.upsert(self.collection, points=points, wait=True)

    def search(
        self,
        vectors: npt.NDArray[np.float32],
        k: int,
        where: Mapping[str, str] | None = None,
    ) -> list[list[Neighbor]]:
        check_k(k)
        queries = check_vectors(vectors, self.dim)
        flt = _filter(check_where(where))
        client = self._live()
        if len(queries) == 0:
            return []
        requests = [
            models.QueryRequest(
                query=q.tolist(), limit=k, filter=flt, with_payload=True, params=self._params
            )
            for q in queries
        ]
        with _client_errors("search"):
            responses = client.query_batch_points(self.collection, requests=requests)
        # For Euclid, server and local mode both score with the true L2 distance.
        return [
            [neighbor_from_payload(hit.payload or {}, hit.score) for hit in response.points]
            for response in responses
        ]

    def _records(self, ids: Sequence[str], with_vectors: bool) -> dict[str, Exemplar]:
        client = self._live()
        with _client_errors("retrieve"):
            records = client.retrieve(
                self.collection,
                [point_uuid(i) for i in ids],
                with_payload=True,
                with_vectors=with_vectors,
            )
        found = (exemplar_from_payload(r.payload or {}, r.vector) for r in records)
        return {ex.id: ex for ex in found}

    def _set_payload(self, exemplar_id: str, change: Mapping[str, Any]) -> None:
        with _client_errors("relabel"):
            self._live().set_payload(
                self.collection, dict(change), points=[point_uuid(exemplar_id)], wait=True
            )

    def _delete_points(self, ids: Sequence[str]) -> None:
        selector = models.PointIdsList(points=[point_uuid(i) for i in ids])
        with _client_errors("delete"):
            self._live().delete(self.collection, points_selector=selector, wait=True)

    def count(self, where: Mapping[str, str] | None = None) -> int:
        flt = _filter(check_where(where))
        with _client_errors("count"):
            return self._live().count(self.collection, count_filter=flt, exact=True).count

    def iter_exemplars(
        self, batch_size: int = 1024, with_vectors: bool = False
    ) -> Iterator[Exemplar]:
        offset: Any = None
        while True:
            with _client_errors("scroll"):
                records, offset = self._live().scroll(
                    self.collection,
                    limit=batch_size,
                    offset=offset,
                    with_payload=True,
                    with_vectors=with_vectors,
                )
            for record in records:
                yield exemplar_from_payload(record.payload or {}, record.vector)
            if offset is None:
                return

    def close(self) -> None:
        """Release the client if this store made it; a caller's client stays open."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            with _client_errors("closing client"):
                self._client.close()
