"""Payload codec and input checks shared by every exemplar store back end.

Both Qdrant back ends store and return exactly the same fields through these, and
refuse bad input with the same ``DataError`` messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from model.errors import DataError
from model.store.base import FILTERABLE_KEYS, Exemplar, Neighbor

#: Keyword payload indexes: the filterable keys plus the caller's id.
INDEXED_KEYS = (*FILTERABLE_KEYS, "id")


def exemplar_payload(ex: Exemplar) -> dict[str, Any]:
    """The payload stored with an exemplar's vector."""
    return {
        "id": ex.id,
        "label": ex.label,
        "predicted": ex.predicted,
        "source": ex.source,
        "text": ex.text,
        "meta": dict(ex.meta),
    }


def exemplar_from_payload(payload: Mapping[str, Any], vector: Any = None) -> Exemplar:
    """Rebuild an exemplar from a stored payload (and vector, when one was fetched)."""
    if isinstance(vector, dict):  # named-vector form; ours is the unnamed default ""
        vector = vector.get("")
    array = np.asarray(vector, dtype=np.float32) if vector is not None else np.empty(0, np.float32)
    return Exemplar(
        id=payload["id"],
        vector=array,
        label=payload["label"],
        predicted=payload["predicted"],
        source=payload["source"],
        text=payload.get("text"),
        meta=payload.get("meta") or {},
    )


def neighbor_from_payload(payload: Mapping[str, Any], distance: float) -> Neighbor:
    """A search hit; ``distance`` must already be the true L2 distance."""
    return Neighbor(
        id=payload["id"],
        distance=float(distance),
        label=payload["label"],
        predicted=payload["predicted"],
        source=payload["source"],
        text=payload.get("text"),
        meta=payload.get("meta") or {},
    )


def check_vectors(vectors: Any, dim: int) -> npt.NDArray[np.float32]:
    """A finite float32 [n, dim] array, or ``DataError`` saying what is wrong."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != dim:
        raise DataError(f"expected vectors of shape [n, {dim}], got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise DataError("vectors contain NaN or infinite values")
    return array


def check_exemplars(exemplars: Sequence[Exemplar], dim: int) -> npt.NDArray[np.float32]:
    """The exemplars' vectors stacked as [n, dim], after checking each one's shape."""
    for ex in exemplars:
        shape = np.shape(ex.vector)
        if shape != (dim,):
            raise DataError(f"exemplar {ex.id!r}: expected a vector of {dim} floats, got {shape}")
    return check_vectors(np.stack([ex.vector for ex in exemplars]), dim)


def check_where(where: Mapping[str, str] | None) -> dict[str, str]:
    """The filter as a plain dict, refusing keys the stores do not filter on."""
    if not where:
        return {}
    unknown = sorted(set(where) - set(FILTERABLE_KEYS))
    if unknown:
        raise DataError(f"cannot filter on {unknown}; filterable keys are {FILTERABLE_KEYS}")
    return dict(where)


def check_k(k: int) -> None:
    """Refuse a non-positive neighbour count early, with a message."""
    if k < 1:
        raise DataError(f"k must be at least 1, got {k}")
