"""Kafka side of exemplar: message contracts, consumer/producer adapters, the embedded broker.

Depends only on ``model.errors`` of this project; ``daemon`` wires it to the model.
"""

from streams.broker import EmbeddedBroker, resolve_tansu_binary, run_broker
from streams.config import KafkaConfig, TopicsConfig
from streams.contracts import (
    AdjudicationRequest,
    DeadLetter,
    DeadLetterReason,
    Decision,
    InputEvent,
    LabelRecord,
    ModelUpdate,
    Neighbor,
    WordContribution,
    decode_event,
    decode_message,
    derive_event_id,
    encode_message,
    export_schemas,
    make_dead_letter,
)
from streams.kafka import (
    BatchConsumer,
    ConsumedRecord,
    OutputProducer,
    Partition,
    RebalanceEvent,
    SentRecord,
    client_options,
    ensure_topics,
    next_offsets,
    start_offsets,
)

__all__ = [
    "AdjudicationRequest",
    "BatchConsumer",
    "ConsumedRecord",
    "DeadLetter",
    "DeadLetterReason",
    "Decision",
    "EmbeddedBroker",
    "InputEvent",
    "KafkaConfig",
    "LabelRecord",
    "ModelUpdate",
    "Neighbor",
    "OutputProducer",
    "Partition",
    "RebalanceEvent",
    "SentRecord",
    "TopicsConfig",
    "WordContribution",
    "client_options",
    "decode_event",
    "decode_message",
    "derive_event_id",
    "encode_message",
    "ensure_topics",
    "export_schemas",
    "make_dead_letter",
    "next_offsets",
    "resolve_tansu_binary",
    "run_broker",
    "start_offsets",
]
