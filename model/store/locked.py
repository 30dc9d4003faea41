"""A store shared by threads: every call on the wrapped store holds one lock.

The embedded store allows one open handle per directory, and the engine binding is
meant for one thread at a time; when the predictor and the curator run in one process
(``--role all``) they share one handle through this wrapper. ``iter_exemplars``
materialises the scroll under the lock, so a relabel cannot interleave with it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from model.store.base import Exemplar, ExemplarStore, Neighbor


class LockedStore(ExemplarStore):
    """Serialises every operation on ``inner``; ``lock`` may be held by callers too."""

    def __init__(self, inner: ExemplarStore, lock: threading.RLock | None = None) -> None:
        self.inner = inner
        self.dim = inner.dim
        self.lock = lock or threading.RLock()

    def upsert(self, exemplars: Sequence[Exemplar]) -> None:
        with self.lock:
            self.inner.upsert(exemplars)

    def search(
        self, vectors: npt.NDArray[np.float32], k: int, where: Mapping[str, str] | None = None
    ) -> list[list[Neighbor]]:
        with self.lock:
            return self.inner.search(vectors, k, where)

    def get(self, ids: Sequence[str], with_vectors: bool = False) -> list[Exemplar | None]:
        with self.lock:
            return self.inner.get(ids, with_vectors)

    def relabel(
        self,
        exemplar_id: str,
        label: str,
        source: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Exemplar:
        with self.lock:
            return self.inner.relabel(exemplar_id, label, source, meta)

    def delete(self, ids: Sequence[str]) -> int:
        with self.lock:
            return self.inner.delete(ids)

    def count(self, where: Mapping[str, str] | None = None) -> int:
        with self.lock:
            return self.inner.count(where)

    def iter_exemplars(
        self, batch_size: int = 1024, with_vectors: bool = False
    ) -> Iterator[Exemplar]:
        with self.lock:
            items = list(self.inner.iter_exemplars(batch_size, with_vectors))
        return iter(items)

    def flush(self) -> None:
        with self.lock:
            flush = getattr(self.inner, "flush", None)
            if flush is not None:
                flush()

    def close(self) -> None:
        with self.lock:
            self.inner.close()
