"""The exemplar store interface: one small contract, several Qdrant back ends.

A store holds the *support set* of one model version: for every exemplar its
document vector and a payload (true label, the model's prediction on it, source,
optionally the text). The predictor asks it for the k nearest exemplars of a
batch of vectors; the curator relabels, adds and deletes. Distances are L2
(Euclidean), smaller is closer.

Ids are the caller's strings (event ids, ``train:123``); back ends map them to
what the engine accepts and return the caller's id unchanged.

``EngineStore`` is the base of the engine back ends: it does the id bookkeeping of
``get``, ``relabel`` and ``delete`` once, over three engine primitives each back end
implements. ``IndexSettings`` says how a back end indexes and searches its vectors.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self

import numpy as np
import numpy.typing as npt

from model.errors import ConfigError

#: Where an exemplar came from. ``human`` exemplars carry a reviewer's label as truth.
SOURCES = ("train", "index", "human", "candidate")

#: Filters accept equality on these payload keys only.
FILTERABLE_KEYS = ("label", "predicted", "source")

_ID_NAMESPACE = uuid.UUID("6f1c3a56-6a86-4c55-9a39-4b7e0c0e4e31")

Quantization = Literal["none", "int8"]


def point_uuid(exemplar_id: str) -> str:
    """Stable engine-side id for a caller id (Qdrant accepts only ints and UUIDs)."""
    return str(uuid.uuid5(_ID_NAMESPACE, exemplar_id))


@dataclass(frozen=True)
class Exemplar:
    """One support-set entry: a document exemplar vector and what is known about it."""

    id: str
    vector: npt.NDArray[np.float32]
    label: str
    predicted: str
    source: str = "train"
    text: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Neighbor:
    """A search hit: the exemplar's payload and its L2 distance to the query."""

    id: str
    distance: float
    label: str
    predicted: str
    source: str
    text: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


#: Bounds of the index settings (also the ``EXEMPLAR_STORE__*`` bounds): HNSW needs a
#: few links per node and at least a few construction candidates; past these values
#: build time and memory grow with no recall left to gain at k ~ 8.
HNSW_M_RANGE = (4, 128)
HNSW_EF_CONSTRUCT_RANGE = (8, 1024)
SEARCH_EF_RANGE = (8, 4096)


@dataclass(frozen=True)
class IndexSettings:
    """How a store indexes and searches its vectors; both back ends read the same fields.

    Build settings, fixed when a store is created (an embedded store keeps the ones it
    was built with; a server collection gets them at creation):

    * ``hnsw_m``: links per node of the HNSW graph (more: better recall, more memory);
    * ``hnsw_ef_construct``: candidates kept while building the graph (more: better
      graph, slower build);
    * ``quantization``: ``"int8"`` keeps a scalar-quantized copy of the vectors that the
      graph search scores with (about 4x less to read per comparison); the best
      ``oversampling x k`` candidates are then rescored with the float32 vectors, so the
      distances a search returns stay exact L2.

    Search settings, applied to every search:

    * ``search_ef``: candidates an HNSW search keeps (more: better recall, slower);
    * ``oversampling``: with quantization, candidates rescored per hit asked for.

    Segments too small for an index (and points written after it was built) are
    always scanned exactly, whatever these say.
    """

    hnsw_m: int = 16
    hnsw_ef_construct: int = 100
    quantization: Quantization = "int8"
    search_ef: int = 64
    oversampling: float = 2.0

    def __post_init__(self) -> None:
        for name, (low, high) in (
            ("hnsw_m", HNSW_M_RANGE),
            ("hnsw_ef_construct", HNSW_EF_CONSTRUCT_RANGE),
            ("search_ef", SEARCH_EF_RANGE),
        ):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(f"index setting {name} must be in [{low}, {high}], got {value}")
        if self.quantization not in ("none", "int8"):
            raise ConfigError(f"quantization must be 'none' or 'int8', got {self.quantization!r}")
        if not 1.0 <= self.oversampling <= 16.0:
            raise ConfigError(f"oversampling must be in [1, 16], got {self.oversampling}")


class ExemplarStore(ABC):
    """Support set of one model version. Implementations must be safe to call from one thread."""

    dim: int

    @abstractmethod
    def upsert(self, exemplars: Sequence[Exemplar]) -> None:
        """Insert or replace exemplars by id. Vectors must have ``dim`` floats."""

    @abstractmethod
    def search(
        self,
        vectors: npt.NDArray[np.float32],
        k: int,
        where: Mapping[str, str] | None = None,
    ) -> list[list[Neighbor]]:
        """k nearest exemplars of each row of ``vectors`` ([n, dim]), nearest first.

        ``where`` restricts hits to exemplars whose payload equals every given
        key/value (keys from ``FILTERABLE_KEYS``). One call, one engine round trip
        where the back end allows it.
        """

    @abstractmethod
    def get(self, ids: Sequence[str], with_vectors: bool = False) -> list[Exemplar | None]:
        """Exemplars by id, ``None`` where absent. Vectors are empty arrays unless asked for."""

    @abstractmethod
    def relabel(
        self,
        exemplar_id: str,
        label: str,
        source: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Exemplar:
        """Set an exemplar's true label (and optionally its source / extra meta).

        Returns the exemplar as it was *before* the change; raises ``KeyError``
        when the id is unknown.
        """

    @abstractmethod
    def delete(self, ids: Sequence[str]) -> int:
        """Remove exemplars by id; returns how many existed."""

    @abstractmethod
    def count(self, where: Mapping[str, str] | None = None) -> int:
        """Number of exemplars (matching ``where`` when given)."""

    @abstractmethod
    def iter_exemplars(
        self, batch_size: int = 1024, with_vectors: bool = False
    ) -> Iterator[Exemplar]:
        """Every exemplar, in no particular order (for re-embedding and export)."""

    @abstractmethod
    def close(self) -> None:
        """Flush to disk and release resources. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EngineStore(ExemplarStore):
    """A store on a vector engine: ``get``, ``relabel`` and ``delete`` over three primitives.

    Back ends implement only the engine calls: fetch records by id, overwrite some
    payload keys of one point, delete points. The read-modify-write of ``relabel``
    (the old exemplar returned, extra meta merged into the stored meta) lives here once.
    """

    @abstractmethod
    def _records(self, ids: Sequence[str], with_vectors: bool) -> dict[str, Exemplar]:
        """The exemplars among ``ids`` that exist, by caller id (``ids`` is not empty)."""

    @abstractmethod
    def _set_payload(self, exemplar_id: str, change: Mapping[str, Any]) -> None:
        """Overwrite the given payload keys of one existing exemplar, leave the rest."""

    @abstractmethod
    def _delete_points(self, ids: Sequence[str]) -> None:
        """Remove exemplars that exist (``ids`` is not empty)."""

    def get(self, ids: Sequence[str], with_vectors: bool = False) -> list[Exemplar | None]:
        found = self._records(ids, with_vectors) if ids else {}
        return [found.get(i) for i in ids]

    def relabel(
        self,
        exemplar_id: str,
        label: str,
        source: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Exemplar:
        before = self._records([exemplar_id], with_vectors=True).get(exemplar_id)
        if before is None:
            raise KeyError(exemplar_id)
        change: dict[str, Any] = {"label": label}
        if source is not None:
            change["source"] = source
        if meta:
            change["meta"] = {**before.meta, **meta}
        self._set_payload(exemplar_id, change)
        return before

    def delete(self, ids: Sequence[str]) -> int:
        existing = list(self._records(ids, with_vectors=False)) if ids else []
        if existing:
            self._delete_points(existing)
        return len(existing)
