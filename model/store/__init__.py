"""Exemplar stores: the interface in ``base`` and its Qdrant back ends.

``EdgeStore`` (embedded, ``model.store.edge``) and ``ServerStore`` (Qdrant server,
``model.store.server``) are imported on first use, so a process that only needs the
interface or the embedded store does not pay for importing ``qdrant-client``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from model.store.base import Exemplar, ExemplarStore, Neighbor

if TYPE_CHECKING:
    from model.store.edge import EdgeStore
    from model.store.server import ServerStore

__all__ = ["EdgeStore", "Exemplar", "ExemplarStore", "Neighbor", "ServerStore"]

_LAZY = {"EdgeStore": "model.store.edge", "ServerStore": "model.store.server"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
