"""Which exemplar store a process serves from: the bundle's embedded one, or a Qdrant server.

* ``edge`` (default, one machine): the Qdrant engine in-process on the bundle's
  ``store/`` directory.
* ``server`` (many replicas): a collection per model version on a Qdrant server,
  ``<prefix><version>``, shared by every predictor and the curator, so a human decision
  applied once is seen by all replicas at their next search. The curator (or a
  ``--role all`` process) uploads a version's support set into its collection and then
  points the ``<prefix>serving`` alias at the first one; predictors of a split
  deployment only read, and wait for that alias (``open_store(publish=False)``).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from model.bundle import Bundle
from model.errors import ConfigError, StoreError
from model.store.base import (
    HNSW_EF_CONSTRUCT_RANGE,
    HNSW_M_RANGE,
    SEARCH_EF_RANGE,
    ExemplarStore,
    IndexSettings,
    Quantization,
)
from model.store.edge import EdgeStore

_UPLOAD_BATCH = 512
_INDEX = IndexSettings()  # the defaults


class StoreConfig(BaseModel):
    """``EXEMPLAR_STORE__*``: where the support set lives."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["edge", "server"] = "edge"
    url: str | None = None
    api_key: SecretStr | None = None
    collection_prefix: str = Field(default="exemplar-", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    timeout_s: int = Field(default=10, ge=1, le=600)
    # How the support set is indexed (model.store.base.IndexSettings). Build settings
    # apply where a store is created: the server collection of a version here, a
    # bundle's embedded store where its builder passes them (BuildOptions.index); an
    # embedded store keeps those it was built with. Search settings: every search.
    hnsw_m: int = Field(
        default=_INDEX.hnsw_m,
        ge=HNSW_M_RANGE[0],
        le=HNSW_M_RANGE[1],
        description="HNSW links per node (build)",
    )
    hnsw_ef_construct: int = Field(
        default=_INDEX.hnsw_ef_construct,
        ge=HNSW_EF_CONSTRUCT_RANGE[0],
        le=HNSW_EF_CONSTRUCT_RANGE[1],
        description="HNSW candidates while building the graph (build)",
    )
    quantization: Quantization = Field(
        default=_INDEX.quantization,
        description="int8: search a scalar-quantized copy, rescore hits exactly (build)",
    )
    search_ef: int = Field(
        default=_INDEX.search_ef,
        ge=SEARCH_EF_RANGE[0],
        le=SEARCH_EF_RANGE[1],
        description="HNSW candidates kept per search (search)",
    )
    oversampling: float = Field(
        default=_INDEX.oversampling,
        ge=1.0,
        le=16.0,
        description="with int8: candidates rescored per hit asked for (search)",
    )

    def index_settings(self) -> IndexSettings:
        """The index settings the stores take."""
        return IndexSettings(
            hnsw_m=self.hnsw_m,
            hnsw_ef_construct=self.hnsw_ef_construct,
            quantization=self.quantization,
            search_ef=self.search_ef,
            oversampling=self.oversampling,
        )

    @model_validator(mode="after")
    def _server_needs_url(self) -> StoreConfig:
        if self.backend == "server" and not self.url:
            raise ValueError(
                "EXEMPLAR_STORE__BACKEND=server needs EXEMPLAR_STORE__URL (e.g. http://qdrant:6333)"
            )
        return self


def collection_name(prefix: str, version: str) -> str:
    """Qdrant collection of one model version (only characters Qdrant accepts)."""
    return prefix + re.sub(r"[^A-Za-z0-9_.-]", "_", version)


def publish_support_set(bundle: Bundle, target: ExemplarStore) -> int:
    """Copy the bundle's embedded support set into ``target``; returns the count copied."""
    copied = 0
    with EdgeStore(bundle.store_path) as source:
        batch = []
        for exemplar in source.iter_exemplars(batch_size=_UPLOAD_BATCH, with_vectors=True):
            batch.append(exemplar)
            if len(batch) >= _UPLOAD_BATCH:
                target.upsert(batch)
                copied += len(batch)
                batch = []
        if batch:
            target.upsert(batch)
            copied += len(batch)
    return copied


def open_store(
    config: StoreConfig, bundle: Bundle, client: object | None = None, publish: bool = True
) -> ExemplarStore:
    """The store the predictor searches for ``bundle``'s version.

    On the server back end only a publisher (``--role curator`` or ``all``) uploads the
    bundle's support set, and points the serving alias at it when no version serves yet:
    the alias is set only after a complete upload, so a publisher that died midway
    uploads again (upserts by id) at its next start. A predictor of a split deployment
    (``publish=False``) only reads: it refuses a server where no version serves yet.

    ``client`` (a ``QdrantClient``) replaces the URL for the server back end; tests
    pass qdrant-client's local mode here.
    """
    if config.backend == "edge":
        return EdgeStore(bundle.store_path, index=config.index_settings())
    from model.store.server import ServerStore

    name = collection_name(config.collection_prefix, bundle.info.version)
    dim = bundle.info.network.num_filters
    if client is not None:
        store = ServerStore(
            name,
            dim=dim,
            client=client,  # type: ignore[arg-type]
            index=config.index_settings(),
        )
    elif config.url is not None:
        store = ServerStore(
            name,
            dim=dim,
            url=config.url,
            api_key=config.api_key,
            timeout=config.timeout_s,
            index=config.index_settings(),
        )
    else:  # the validator already refuses this; keeps type checkers informed
        raise ConfigError("EXEMPLAR_STORE__URL is required for the server back end")
    alias = serving_alias(config)
    serving = store.alias_target(alias)
    if not publish:
        if serving is None or store.count() == 0:
            store.close()
            raise StoreError(
                f"the support set of {bundle.info.version} is not on the Qdrant server yet "
                f"(no alias {alias!r}, or {name!r} is empty): the curator (--role curator) "
                "publishes it when it starts and when it promotes a version"
            )
        return store
    if serving is None or store.count() == 0:
        publish_support_set(bundle, store)
    if serving is None:
        store.promote(alias, name)
    return store


def serving_alias(config: StoreConfig) -> str:
    """The server alias that names the serving version's collection."""
    return config.collection_prefix + "serving"


def point_serving_alias(config: StoreConfig, store: ExemplarStore) -> str | None:
    """After a promotion, point the serving alias at ``store``'s collection (one atomic
    alias update); returns the collection it named before. The embedded back end has
    no alias: the registry's SERVING pointer alone says which version serves."""
    from model.store.locked import LockedStore
    from model.store.server import ServerStore

    inner = store.inner if isinstance(store, LockedStore) else store
    if not isinstance(inner, ServerStore):
        return None
    alias = serving_alias(config)
    previous = inner.alias_target(alias)
    inner.promote(alias, inner.collection)
    return previous
