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

from daemon.app import effective_thresholds
from daemon.config import AdmissionOverrides
from daemon.stores import StoreConfig, open_store
from model.bundle import Bundle, load_bundle
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
    overrides: AdmissionOverrides,
    batch_size: int = 64,
    store_config: StoreConfig | None = None,
    store_client: object | None = None,
    publish: bool = True,
) -> ServingVersion:
    """Load the bundle at ``path`` with its store (embedded or server) behind a lock.

    ``store_client`` (a ``QdrantClient``) stands in for ``EXEMPLAR_STORE__URL``; tests
    share one local-mode client between roles with it."""
    bundle = load_bundle(path)
    thresholds = effective_thresholds(bundle, overrides)
    store = LockedStore(
        open_store(store_config or StoreConfig(), bundle, store_client, publish=publish)
    )
    predictor = Predictor(
        bundle.network,
        bundle.tokenizer,
        store,
        thresholds,
        bundle.info.version,
        batch_size=batch_size,
    )
    return ServingVersion(Path(path), bundle, store, predictor)


#: Called with (new version, retire): hand the new predictor over, then ``retire(old)``
#: once nothing uses the old one.
SwapListener = Callable[[ServingVersion, Callable[[Predictor], None]], None]


class ServingModel:
    """The serving version and the lock that orders every change to it."""

    def __init__(
        self,
        current: ServingVersion,
        registry: Registry | None,
        overrides: AdmissionOverrides,
        batch_size: int = 64,
        store_config: StoreConfig | None = None,
        store_client: object | None = None,
        publish: bool = True,
    ) -> None:
        """``publish=False`` (a split deployment's predictor): only open versions that a
        curator has published to the store server."""
        self.current = current
        self.store_config = store_config or StoreConfig()
        self.store_client = store_client
        self.publish = publish
        self.registry = registry
        self.overrides = overrides
        self.batch_size = batch_size
        self.lock = threading.RLock()
        self._listeners: list[SwapListener] = []
        self._retiring: dict[int, ServingVersion] = {}

    @classmethod
    def open(
        cls,
        bundle_path: Path,
        registry: Registry | None,
        overrides: AdmissionOverrides,
        batch_size: int = 64,
        store_config: StoreConfig | None = None,
        store_client: object | None = None,
        publish: bool = True,
    ) -> ServingModel:
        current = open_version(
            bundle_path, overrides, batch_size, store_config, store_client, publish
        )
        return cls(current, registry, overrides, batch_size, store_config, store_client, publish)

    def open_version(self, path: Path) -> ServingVersion:
        return open_version(
            path,
            self.overrides,
            self.batch_size,
            self.store_config,
            self.store_client,
            self.publish,
        )

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
