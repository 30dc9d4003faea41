"""Split roles: ``--role predictor`` and ``--role curator`` as separate services.

Real broker (Tansu), real tiny model, the server store back end through qdrant-client.
The two services share what separate processes share in production: the broker, the
model registry directory, and the Qdrant server. No Qdrant server binary runs here, so
qdrant-client's local mode stands in for it (DESIGN §5); local mode lives inside one
process, so both services run in this test process, each with its own threads, Kafka
clients, store handles and settings, and talk to each other only through those shared
parts. Local mode is not thread-safe the way a server is, so calls to it are serialised.

* the curator learns of rejected events from ``exemplar.lifecycle``; a decision it
  applies to the shared collection is seen by the predictor at its next search;
* candidates reach the curator's state the same way; an unknown id still goes to the
  dead-letter topic;
* a promotion made by the curator flips the Qdrant alias and the SERVING pointer, and the
  predictor swaps to it while events keep flowing, none lost.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qdrant_client import QdrantClient

from daemon.config import Settings
from daemon.lifecycle import LifecycleService
from daemon.stores import StoreConfig, collection_name, open_store, serving_alias
from model.bundle import load_bundle
from model.errors import StoreError
from model.registry import Registry
from model.store.edge import EdgeStore
from model.store.server import ServerStore
from streams.config import KafkaConfig, TopicsConfig
from streams.kafka import ensure_topics
from tests.integration.test_curator import (
    ODD_TEXT,
    assert_served_across_the_swap,
    message,
    other_label,
    send,
    steady_stream,
    wait_for,
)
from tests.integration.test_daemon import outputs_by_id, read_topic
from tests.model_fixtures import toy_corpus

# local mode warns that payload indexes and search parameters do nothing in it
pytestmark = [
    pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning"),
    pytest.mark.filterwarnings("ignore:Local mode performs exact:UserWarning"),
]


class SerializedClient:
    """One lock around every call: local mode is one process' data structures."""

    def __init__(self, inner: QdrantClient) -> None:
        self._inner = inner
        self._lock = threading.RLock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return call


@pytest.fixture
def qdrant() -> Iterator[SerializedClient]:
    client = QdrantClient(":memory:")
    yield SerializedClient(client)
    client.close()


def role_settings(
    role: str, model_dir: Path, kafka: KafkaConfig, topics: TopicsConfig, **curator: Any
) -> Settings:
    return Settings(
        role=role,  # type: ignore[arg-type]
        model_dir=model_dir,
        kafka=kafka,
        topics=topics,
        batch={"max_size": 16, "max_wait_ms": 100},
        metrics={"enabled": False},
        # the URL is never dialled: the shared local-mode client replaces it
        store={"backend": "server", "url": "http://qdrant.invalid:6333"},
        curator={"finetune": False, "model_check_interval_s": 1.0, **curator},
    )


def test_split_roles_hand_over_events_and_share_decisions(
    kafka_broker: str,
    kafka_config: KafkaConfig,
    unique_topics: TopicsConfig,
    registry_root: Path,
    qdrant: SerializedClient,
    start_service: Callable[..., LifecycleService],
) -> None:
    ensure_topics(kafka_config, unique_topics)
    # the curator publishes the support set; the predictor picks the candidates, by
    # the same EXEMPLAR_CURATOR__CANDIDATE_RATIO
    curator = start_service(
        role_settings("curator", registry_root, kafka_config, unique_topics, candidate_ratio=1.0),
        store_client=qdrant,
    )
    predictor = start_service(
        role_settings("predictor", registry_root, kafka_config, unique_topics, candidate_ratio=1.0),
        store_client=qdrant,
    )
    assert predictor.state is None and predictor.curator is None and predictor.watcher
    assert curator.worker is None and curator.state is not None and curator.feed is not None
    version = predictor.serving.current.version
    labels = predictor.serving.current.labels

    # rejected by the predictor; the curator hears of it on exemplar.lifecycle only
    send(kafka_broker, unique_topics.input, {"id": "odd-1", "text": ODD_TEXT})
    rejected = message(kafka_broker, unique_topics.adjudication, "odd-1")
    note = message(kafka_broker, unique_topics.lifecycle, "odd-1")
    assert note["kind"] == "pending" and note["text"] == ODD_TEXT
    human = other_label(labels, rejected["predicted_label"])
    send(
        kafka_broker,
        unique_topics.decisions,
        {"id": "odd-1", "label": human, "reviewer": "alice"},
        {"id": "never-seen", "label": human, "reviewer": "alice"},
    )
    assert curator.curator is not None
    wait_for(lambda: curator.curator.applied >= 1 and curator.curator.rejected >= 1)  # type: ignore[union-attr]
    dead = message(kafka_broker, unique_topics.dead_letter, "never-seen")
    assert dead["reason"] == "unknown_id"

    # the predictor sees the curator's mapping at its next search: same collection
    send(kafka_broker, unique_topics.input, {"id": "odd-2", "text": ODD_TEXT})
    admitted = message(kafka_broker, unique_topics.output, "odd-2")
    assert admitted["label"] == human and admitted["admitted_by"] == "human_mapping"
    assert admitted["model_version"] == version
    assert curator.state is not None
    assert [e.action for e in curator.state.audit()] == ["add"]

    # close admitted events become the curator's candidates
    texts = [r["text"] for r in toy_corpus(20, seed=5)]
    send(
        kafka_broker,
        unique_topics.input,
        *({"id": f"c-{i}", "text": t} for i, t in enumerate(texts)),
    )
    outputs_by_id(kafka_broker, unique_topics, expect=len(texts) + 2, timeout_s=60)
    outputs = [json.loads(r.value) for r in read_topic(kafka_broker, unique_topics.output, 0, 2.0)]
    by_support = {o["id"] for o in outputs if o["admitted_by"] == "exemplar_support"}
    notes = [json.loads(r.value) for r in read_topic(kafka_broker, unique_topics.lifecycle, 0, 2.0)]
    noted = {n["id"] for n in notes if n["kind"] == "candidate"}
    assert noted, "the tiny model admitted nothing close: no candidates to hand over"
    assert noted <= by_support
    state = curator.state
    wait_for(lambda: {c.id for c in state.candidates(1.0)} == noted, 30)


def test_split_roles_without_a_store_server_are_refused(registry_root: Path) -> None:
    with pytest.raises(Exception, match="EXEMPLAR_STORE__BACKEND=server"):
        Settings(role="predictor", model_dir=registry_root)


def test_only_a_publisher_uploads_and_a_partial_upload_is_completed(
    tiny_bundle: Path, qdrant: SerializedClient
) -> None:
    bundle = load_bundle(tiny_bundle)
    config = StoreConfig(backend="server", url="http://qdrant.invalid:6333")
    with EdgeStore(bundle.store_path) as shipped:
        everything = list(shipped.iter_exemplars(with_vectors=True))
    # a predictor of a split deployment never uploads: it waits for the curator
    with pytest.raises(StoreError, match="curator"):
        open_store(config, bundle, qdrant, publish=False)
    # a curator that died midway through its upload left part of it and no alias ...
    name = collection_name(config.collection_prefix, bundle.info.version)
    dim = bundle.info.network.num_filters
    with ServerStore(name, dim=dim, client=qdrant) as early:  # type: ignore[arg-type]
        early.upsert(everything[:3])
    with pytest.raises(StoreError, match="curator"):
        open_store(config, bundle, qdrant, publish=False)
    # ... so the next start uploads it all, then points the alias at it
    with open_store(config, bundle, qdrant) as store:
        assert store.count() == len(everything) > 3
    aliases = {a.alias_name: a.collection_name for a in qdrant.get_aliases().aliases}
    assert aliases[serving_alias(config)] == name
    with open_store(config, bundle, qdrant, publish=False) as reader:
        assert reader.count() == len(everything)


@pytest.mark.slow
def test_a_promotion_by_the_curator_reaches_a_separate_predictor_mid_stream(
    kafka_broker: str,
    kafka_config: KafkaConfig,
    unique_topics: TopicsConfig,
    registry_root: Path,
    qdrant: SerializedClient,
    start_service: Callable[..., LifecycleService],
) -> None:
    ensure_topics(kafka_config, unique_topics)
    curator = start_service(
        role_settings(
            "curator",
            registry_root,
            kafka_config,
            unique_topics,
            finetune=True,
            min_candidates=1,
            min_decisions=1000,
            min_interval_s=600.0,
            candidate_ratio=1.0,
            max_epochs=5,
            tolerance=1.0,  # the promotion gate is test_finetune's; here: what follows it
        ),
        store_client=qdrant,
        schedule=False,
    )
    predictor = start_service(
        role_settings("predictor", registry_root, kafka_config, unique_topics, candidate_ratio=1.0),
        store_client=qdrant,
    )
    old_version = predictor.serving.current.version
    prefix = predictor.settings.store.collection_prefix
    alias = serving_alias(predictor.settings.store)
    assert qdrant.get_aliases().aliases[0].collection_name == collection_name(prefix, old_version)

    texts = [r["text"] for r in toy_corpus(60, seed=99)]
    with steady_stream(kafka_broker, unique_topics.input, texts) as sent:
        state = curator.state
        assert state is not None and curator.runner is not None
        wait_for(lambda: state.count_candidates(1.0) >= 1, 60)
        result = curator.runner.run("test")
        assert result.outcome == "promoted", result.reason
        new_version = result.version
        assert Registry(registry_root).serving_version() == new_version
        aliases = {a.alias_name: a.collection_name for a in qdrant.get_aliases().aliases}
        assert aliases[alias] == collection_name(prefix, str(new_version))
        assert predictor.worker is not None
        worker = predictor.worker
        wait_for(lambda: worker.predictor.version == new_version, 30)
        time.sleep(1.5)  # keep streaming through and past the swap

    assert_served_across_the_swap(
        kafka_broker, unique_topics, sent, len(sent), {old_version, str(new_version)}
    )
    announced = [
        json.loads(r.value)["version"]
        for r in read_topic(kafka_broker, unique_topics.model_updates, 0, 2.0)
    ]
    assert announced == [new_version]
