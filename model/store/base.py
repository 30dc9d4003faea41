"""The exemplar store interface: one small contract, several Qdrant back ends.

A store holds the *support set* of one model version: for every exemplar its
document vector and a payload (true label, the model's prediction on it, source,
optionally the text). The predictor asks it for the k nearest exemplars of a
batch of vectors; the curator relabels, adds and deletes. Distances are L2
(Euclidean), smaller is closer.

Ids are the caller's strings (event ids, ``train:123``); back ends map them to
what the engine accepts and return the caller's id unchanged.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

#: Where an exemplar came from. ``human`` exemplars carry a reviewer's label as truth.
SOURCES = ("train", "index", "human", "candidate")

#: Filters accept equality on these payload keys only.
FILTERABLE_KEYS = ("label", "predicted", "source")

_ID_NAMESPACE = uuid.UUID("6f1c3a56-6a86-4c55-9a39-4b7e0c0e4e31")


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

    def __enter__(self) -> ExemplarStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
