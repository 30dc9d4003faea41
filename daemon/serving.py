"""The model version in service, shared by the predictor and curator of one process.

The embedded store allows one open handle per directory, so the predictor's searches
and the curator's relabels go through one :class:`~model.store.locked.LockedStore`.
``ServingModel.lock`` is held by whoever changes the support set or swaps versions
(the curator applying a decision, a promotion replaying decisions onto a new version);
the predictor never takes it, it only searches through the store's own lock.

A swap hands the new predictor to the listeners (the predictor loop applies it between
batches) and closes the old store only once the loop reports it no longer uses it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from daemon.app import load
from daemon.config import Settings
from model.bundle import Bundle
from model.predictor import Predictor
from model.registry import Registry
from model.store.locked import LockedStore

log = structlog.get_logger(__name__)


@dataclass
class ServingVersion:
    """One loaded version: bundle, its (shared) store and a ready predictor."""

    path: Path
    bundle: Bundle
    store: LockedStore
    predictor: Predictor

    @property
    def version(self) -> str:
        return self.bundle.info.version

    @property
    def labels(self) -> list[str]:
        return list(self.predictor.labels)


def open_version(
    path: Path,
    settings: Settings,
    store_client: object | None = None,
    publish: bool = True,
) -> ServingVersion:
    """Load the bundle at ``path`` with its store (embedded or server) behind a lock,
    as ``settings`` say (admission overrides, forward chunk size, store, precision).

    ``store_client`` (a ``QdrantClient``) stands in for ``EXEMPLAR_STORE__URL``; tests
    share one local-mode client between roles with it. ``publish=False`` (a split
    deployment's predictor) only opens versions a curator published to the server."""
    loaded = load(settings, path, store_client=store_client, publish=publish, locked=True)
    assert isinstance(loaded.store, LockedStore)
    return ServingVersion(Path(path), loaded.bundle, loaded.store, loaded.predictor)


#: Called with (new version, retire): hand the new predictor over, then ``retire(old)``
#: once nothing uses the old one.
SwapListener = Callable[[ServingVersion, Callable[[Predictor], None]], None]


class ServingModel:
    """The serving version and the lock that orders every change to it."""

    def __init__(
        self,
        current: ServingVersion,
        registry: Registry | None,
        settings: Settings,
        store_client: object | None = None,
        publish: bool = True,
    ) -> None:
        self.current = current
        self.registry = registry
        self.settings = settings
        self.store_client = store_client
        self.publish = publish
        self.lock = threading.RLock()
        self._listeners: list[SwapListener] = []
        self._retiring: dict[int, ServingVersion] = {}

    @classmethod
    def open(
        cls,
        bundle_path: Path,
        registry: Registry | None,
        settings: Settings,
        store_client: object | None = None,
        publish: bool = True,
    ) -> ServingModel:
        current = open_version(bundle_path, settings, store_client, publish)
        return cls(current, registry, settings, store_client, publish)

    def open_version(self, path: Path) -> ServingVersion:
        return open_version(path, self.settings, self.store_client, self.publish)

    def add_listener(self, listener: SwapListener) -> None:
        self._listeners.append(listener)

    def swap(self, new: ServingVersion) -> ServingVersion:
        """Serve ``new`` from now on; the old store closes once no listener uses it."""
        with self.lock:
            old, self.current = self.current, new
            if not self._listeners:
                old.store.close()
                return old
            self._retiring[id(old.predictor)] = old
            pending = {"count": len(self._listeners)}

            def retire(predictor: Predictor) -> None:
                with self.lock:
                    pending["count"] -= 1
                    if pending["count"] == 0:
                        version = self._retiring.pop(id(predictor), None)
                        if version is not None:
                            version.store.close()
                            log.info("version_retired", version=version.version)

            for listener in self._listeners:
                listener(new, retire)
            return old

    def close(self) -> None:
        with self.lock:
            for version in self._retiring.values():
                version.store.close()
            self._retiring.clear()
            self.current.store.close()
