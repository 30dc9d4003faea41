"""Embedded exemplar store: the Qdrant engine in-process, on disk (``qdrant-edge-py``).

The default back end for one machine. A store is a directory::

    <path>/store.json   format version and vector dim (written last: the commit marker)
    <path>/shard/       the qdrant-edge shard (segments, WAL, payload indexes)

Search is exact (a full scan of plain segments) until ``optimize()`` builds an HNSW
index on segments larger than the indexing threshold (``model.build`` does this for
every bundle it writes); points written after that land in a small plain segment
again, which is scanned exactly. How the index is built (HNSW links, int8
quantization) is fixed when the store is created and persisted in the shard; how it
is searched (``search_ef``, rescoring) is chosen by whoever opens it (``IndexSettings``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import qdrant_edge as qe

from model.errors import ConfigError, StoreError
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

FORMAT_VERSION = 1
_SIDECAR = "store.json"
_SHARD_DIR = "shard"
_UPSERT_CHUNK = 1024
#: HNSW full-scan threshold (KB): a filtered search whose matches hold fewer vectors
#: than this scans them instead of walking the graph (the engine's default).
_FULL_SCAN_THRESHOLD_KB = 10_000
#: int8 quantization maps this central share of each dimension's values onto 256 steps
#: (outliers clip); rescoring with the float32 vectors makes the returned distances exact.
_INT8_QUANTILE = 0.99


# --- the embedded back end ----------------------------------------------------------


@contextmanager
def _engine(action: str) -> Iterator[None]:
    """Translate qdrant-edge failures into ``StoreError``.

    The binding raises bare ``Exception`` for every engine error, so that is what
    has to be caught; the original stays attached as ``__cause__``.
    """
    try:
        yield
    except Exception as exc:
        raise StoreError(f"edge store: {action} failed: {exc}") from exc


def _filter(where: Mapping[str, str]) -> qe.Filter | None:
    if not where:
        return None
    conditions: list[Any] = [
        qe.FieldCondition(key, match=qe.MatchValue(value)) for key, value in where.items()
    ]
    return qe.Filter(must=conditions)


def _search_params(index: IndexSettings, exact: bool) -> qe.SearchParams:
    """Search parameters of every query: a full scan, or HNSW with rescored quantization.

    Rescoring must be asked for: qdrant-edge 0.9 does not rescore by default, and its
    int8 scores differ from the true L2 distance by up to a few tenths, which would
    move every distance the admission thresholds compare against.
    """
    if exact:
        return qe.SearchParams(exact=True, quantization=qe.QuantizationSearchParams(ignore=True))
    return qe.SearchParams(
        hnsw_ef=index.search_ef,
        quantization=qe.QuantizationSearchParams(rescore=True, oversampling=index.oversampling),
    )


class EdgeStore(EngineStore):
    """Exemplar store in a local directory, searched in-process by the Qdrant engine."""

    def __init__(
        self,
        path: Path,
        dim: int | None = None,
        *,
        exact: bool = False,
        indexing_threshold_kb: int | None = None,
        index: IndexSettings | None = None,
    ) -> None:
        """Open the store at ``path``, creating it when the directory is absent or empty.

        ``dim`` is required to create and checked when opening. ``exact`` forces full
        scans even on HNSW-indexed segments. ``indexing_threshold_kb`` sets the segment
        size from which ``optimize()`` builds HNSW (engine default: about 10 MB of
        vectors); given when opening, it is written into the shard's config.
        ``index`` (default ``IndexSettings()``): its build settings apply only when the
        store is created (an existing store keeps those it was built with), its search
        settings to every search of this handle.
        """
        self.path = Path(path)
        self.index = index or IndexSettings()
        self._params = _search_params(self.index, exact)
        self._closed = False
        sidecar = self.path / _SIDECAR
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} is a file, not an edge store directory")
        is_new = not self.path.exists() or not any(self.path.iterdir())
        if is_new:
            if dim is None or dim < 1:
                raise ConfigError(f"creating an edge store at {self.path} needs dim >= 1")
            self.dim = dim
            config = self._config(indexing_threshold_kb, self.index)
            with _engine(f"creating shard at {self.path}"):
                self._shard = qe.EdgeShard.create(str(self.path / _SHARD_DIR), config)
        else:
            self.dim = self._read_sidecar(sidecar, dim)
            # A config given to load() overwrites the stored one; only send one to change it.
            changed = self._config(indexing_threshold_kb, None) if indexing_threshold_kb else None
            with _engine(f"opening shard at {self.path} (is it open elsewhere?)"):
                self._shard = qe.EdgeShard.load(str(self.path / _SHARD_DIR), changed)
        try:
            self._ensure_indexes()
            if is_new:
                self._write_sidecar(sidecar)
        except StoreError:
            self.close()  # release the shard's WAL lock before giving up
            raise

    def _config(
        self, indexing_threshold_kb: int | None, index: IndexSettings | None
    ) -> qe.EdgeConfig:
        """Shard config; ``index=None`` leaves the HNSW and quantization settings unsaid
        (when loading: the shard keeps the ones it has)."""
        optimizers = (
            qe.EdgeOptimizersConfig(indexing_threshold=indexing_threshold_kb)
            if indexing_threshold_kb
            else None
        )
        hnsw, quantization = None, None
        if index is not None:
            hnsw = qe.HnswIndexConfig(
                m=index.hnsw_m,
                ef_construct=index.hnsw_ef_construct,
                full_scan_threshold=_FULL_SCAN_THRESHOLD_KB,
            )
            if index.quantization == "int8":
                quantization = qe.ScalarQuantizationConfig(
                    qe.ScalarType.Int8, quantile=_INT8_QUANTILE, memory=qe.Memory.Cached
                )
        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=self.dim, distance=qe.Distance.Euclid),
            hnsw_config=hnsw,
            quantization_config=quantization,
            optimizers=optimizers,
        )

    def _write_sidecar(self, sidecar: Path) -> None:
        tmp = sidecar.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"format": FORMAT_VERSION, "dim": self.dim}) + "\n")
            tmp.replace(sidecar)
        except OSError as exc:
            raise StoreError(f"cannot write {sidecar}: {exc}") from exc

    def _read_sidecar(self, sidecar: Path, dim: int | None) -> int:
        try:
            info = json.loads(sidecar.read_text())
        except FileNotFoundError as exc:
            raise StoreError(f"{self.path} is not an exemplar edge store (no {_SIDECAR})") from exc
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {sidecar}: {exc}") from exc
        if info.get("format") != FORMAT_VERSION:
            raise StoreError(
                f"{sidecar}: store format {info.get('format')!r}, this code reads {FORMAT_VERSION}"
            )
        stored = int(info["dim"])
        if dim is not None and dim != stored:
            raise StoreError(f"{self.path} holds vectors of dim {stored}, not {dim}")
        return stored

    def _ensure_indexes(self) -> None:
        with _engine("creating payload indexes"):
            present = set(self._shard.info().payload_schema)
            for key in INDEXED_KEYS:
                if key not in present:
                    self._shard.update(
                        qe.UpdateOperation.create_field_index(key, qe.PayloadSchemaType.Keyword)
                    )

    def _live(self) -> qe.EdgeShard:
        if self._closed:
            raise StoreError(f"edge store at {self.path} is closed")
        return self._shard

    def upsert(self, exemplars: Sequence[Exemplar]) -> None:
        if not exemplars:
            return
        vectors = check_exemplars(exemplars, self.dim)
        shard = self._live()
        for start in range(0, len(exemplars), _UPSERT_CHUNK):
            points = [
                qe.Point(point_uuid(ex.id), vectors[start + i].tolist(), exemplar_payload(ex))
                for i, ex in enumerate(exemplars[start : start + _UPSERT_CHUNK])
            ]
            with _engine("upsert"):
                shard.update(qe.UpdateOperation.upsert_points(points))

    def search(
        self,
        vectors: npt.NDArray[np.float32],
        k: int,
        where: Mapping[str, str] | None = None,
    ) -> list[list[Neighbor]]:
        check_k(k)
        queries = check_vectors(vectors, self.dim)
        flt = _filter(check_where(where))
        shard = self._live()
        if len(queries) == 0:
            return []
        batch = qe.QueryBatchRequest(
            [
                qe.QueryRequest(
                    limit=k,
                    query=qe.Query.Nearest(q.tolist()),
                    filter=flt,
                    with_payload=True,
                    params=self._params,
                )
                for q in queries
            ]
        )
        with _engine("search"):
            results = shard.query_batch(batch)
        # For Euclid the engine's score is already the true L2 distance (not squared).
        return [
            [neighbor_from_payload(hit.payload or {}, hit.score) for hit in hits]
            for hits in results
        ]

    def _records(self, ids: Sequence[str], with_vectors: bool) -> dict[str, Exemplar]:
        shard = self._live()
        with _engine("retrieve"):
            records = shard.retrieve([point_uuid(i) for i in ids], True, with_vectors)
        found = (exemplar_from_payload(r.payload or {}, r.vector) for r in records)
        return {ex.id: ex for ex in found}

    def _set_payload(self, exemplar_id: str, change: Mapping[str, Any]) -> None:
        operation = qe.UpdateOperation.set_payload([point_uuid(exemplar_id)], dict(change))
        with _engine("relabel"):
            self._live().update(operation)

    def _delete_points(self, ids: Sequence[str]) -> None:
        operation = qe.UpdateOperation.delete_points([point_uuid(i) for i in ids])
        with _engine("delete"):
            self._live().update(operation)

    def count(self, where: Mapping[str, str] | None = None) -> int:
        request = qe.CountRequest(exact=True, filter=_filter(check_where(where)))
        with _engine("count"):
            return self._live().count(request)

    def iter_exemplars(
        self, batch_size: int = 1024, with_vectors: bool = False
    ) -> Iterator[Exemplar]:
        offset: Any = None
        while True:
            request = qe.ScrollRequest(
                offset=offset, limit=batch_size, with_payload=True, with_vector=with_vectors
            )
            with _engine("scroll"):
                records, offset = self._live().scroll(request)
            for record in records:
                yield exemplar_from_payload(record.payload or {}, record.vector)
            if offset is None:
                return

    def optimize(self) -> bool:
        """Merge segments and build HNSW where a segment exceeds the indexing threshold.

        Blocks until done; returns whether anything changed. Until this runs (and
        on segments below the threshold) search is an exact scan.
        """
        with _engine("optimize"):
            return self._live().optimize()

    @property
    def indexed_count(self) -> int:
        """How many vectors sit in HNSW-indexed segments (0: every search is exact)."""
        with _engine("info"):
            return self._live().info().indexed_vectors_count

    def flush(self) -> None:
        """Make every write so far durable without closing."""
        with _engine("flush"):
            self._live().flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _engine("close"):
            self._shard.flush()
            self._shard.close()
