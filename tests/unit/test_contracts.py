"""Message contracts: the input decoder's verdicts, and the exported JSON Schemas."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel, ValidationError

from streams.contracts import (
    CONTRACTS,
    MAX_ID_CHARS,
    SCHEMA_DIR,
    AdjudicationRequest,
    DeadLetter,
    DeadLetterReason,
    Decision,
    InputEvent,
    LabelRecord,
    LifecycleNote,
    ModelUpdate,
    Neighbor,
    WordContribution,
    decode_event,
    decode_message,
    encode_message,
    export_schemas,
    make_dead_letter,
)

TOPIC, PARTITION, OFFSET = "exemplar.events", 2, 41
MAX_TEXT = 100


def decode(value: bytes | None, key: bytes | None = b"user-7", **kwargs: Any) -> Any:
    return decode_event(value, key, TOPIC, PARTITION, OFFSET, MAX_TEXT, **kwargs)


def wire(obj: Any) -> bytes:
    return json.dumps(obj).encode("utf-8")


# --- decode_event: happy path and ids ------------------------------------------------


def test_event_with_id_text_and_meta() -> None:
    event = decode(wire({"id": "evt-1", "text": "fine film", "meta": {"lang": "en", "n": [1]}}))
    assert event == InputEvent(id="evt-1", text="fine film", meta={"lang": "en", "n": [1]})


def test_event_without_id_gets_topic_partition_offset_not_the_key() -> None:
    event = decode(wire({"text": "fine film"}), key=b"user-7")
    assert isinstance(event, InputEvent)
    assert event.id == f"{TOPIC}:{PARTITION}:{OFFSET}"
    assert event.meta == {}


@pytest.mark.parametrize("absent", [{}, {"id": None}, {"meta": None}])
def test_null_id_and_meta_count_as_absent(absent: dict[str, Any]) -> None:
    event = decode(wire({"text": "ok", **absent}))
    assert isinstance(event, InputEvent)
    assert event.id == f"{TOPIC}:{PARTITION}:{OFFSET}"


def test_text_limit_counts_utf8_bytes_and_allows_exactly_the_limit() -> None:
    assert isinstance(decode(wire({"text": "a" * MAX_TEXT})), InputEvent)
    # 51 characters, 102 bytes: over a 100-byte limit although under 100 characters.
    rejected = decode(wire({"text": "é" * 51}))
    assert isinstance(rejected, DeadLetter)
    assert rejected.reason == DeadLetterReason.TEXT_TOO_LONG


def test_surrogate_pair_escapes_are_fine() -> None:
    event = decode(b'{"text": "\\ud83d\\ude00 great"}')
    assert isinstance(event, InputEvent)
    assert event.text == "\N{GRINNING FACE} great"


# --- decode_event: every reason code -------------------------------------------------

REJECTIONS = [
    pytest.param(None, {}, DeadLetterReason.NULL_VALUE, id="tombstone"),
    pytest.param(wire({"text": "x" * 50}), {"max_value_bytes": 20}, "value_too_large", id="big"),
    pytest.param(b'{"text": "caf\xe9"}', {}, DeadLetterReason.NOT_UTF8, id="latin1"),
    pytest.param(b'{"text": "\\ud800 lone"}', {}, DeadLetterReason.NOT_UTF8, id="surrogate"),
    pytest.param(b'{"text": "unterminated', {}, DeadLetterReason.NOT_JSON, id="truncated"),
    pytest.param(b'{"text": "a", "n": NaN}', {}, DeadLetterReason.NOT_JSON, id="nan"),
    pytest.param(b"", {}, DeadLetterReason.NOT_JSON, id="empty-bytes"),
    pytest.param(b"[1, 2]", {}, DeadLetterReason.NOT_OBJECT, id="array"),
    pytest.param(b'"just text"', {}, DeadLetterReason.NOT_OBJECT, id="string"),
    pytest.param(wire({"text": "a", "lang": "en"}), {}, "unknown_field", id="extra-field"),
    pytest.param(wire({"meta": {}}), {}, DeadLetterReason.MISSING_TEXT, id="no-text"),
    pytest.param(wire({"text": None}), {}, DeadLetterReason.MISSING_TEXT, id="null-text"),
    pytest.param(wire({"text": 42}), {}, DeadLetterReason.WRONG_TYPE, id="int-text"),
    pytest.param(wire({"text": "a", "meta": [1]}), {}, DeadLetterReason.WRONG_TYPE, id="list-meta"),
    pytest.param(wire({"id": 7, "text": "a"}), {}, DeadLetterReason.WRONG_TYPE, id="int-id"),
    pytest.param(wire({"id": "", "text": "a"}), {}, DeadLetterReason.INVALID_ID, id="empty-id"),
    pytest.param(
        wire({"id": "x" * (MAX_ID_CHARS + 1), "text": "a"}),
        {},
        DeadLetterReason.INVALID_ID,
        id="long-id",
    ),
    pytest.param(wire({"text": ""}), {}, DeadLetterReason.EMPTY_TEXT, id="empty-text"),
    pytest.param(wire({"text": " \n\t "}), {}, DeadLetterReason.EMPTY_TEXT, id="blank-text"),
    pytest.param(wire({"text": "x" * 101}), {}, DeadLetterReason.TEXT_TOO_LONG, id="long-text"),
]


@pytest.mark.parametrize(("value", "kwargs", "reason"), REJECTIONS)
def test_bad_input_becomes_a_dead_letter(
    value: bytes | None, kwargs: dict[str, Any], reason: str
) -> None:
    letter = decode(value, key=b"user-\xff", **kwargs)
    assert isinstance(letter, DeadLetter)
    assert letter.reason == reason
    assert letter.detail
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        TOPIC,
        PARTITION,
        OFFSET,
    )
    assert letter.key == "user-\N{REPLACEMENT CHARACTER}"
    if value is None:
        assert letter.raw_value_b64 is None
        assert letter.raw_value_size is None
    else:
        assert base64.b64decode(letter.raw_value_b64 or "") == value
        assert letter.raw_value_size == len(value)
    assert letter.produced_at.tzinfo is not None


def test_every_decoder_reason_code_is_exercised() -> None:
    exercised = {str(param.values[2]) for param in REJECTIONS}
    assert exercised == {code.value for code in DeadLetterReason} - {"schema_violation"}


def test_dead_letter_keeps_a_valid_given_id_else_the_derived_one() -> None:
    kept = decode(wire({"id": "evt-9", "text": ""}))
    assert isinstance(kept, DeadLetter)
    assert kept.id == "evt-9"
    derived = decode(wire({"id": "", "text": "a"}))
    assert isinstance(derived, DeadLetter)
    assert derived.id == f"{TOPIC}:{PARTITION}:{OFFSET}"


def test_value_too_large_is_decided_before_parsing_and_raw_bytes_are_capped() -> None:
    value = b"\xff" * 5000  # not UTF-8 either: size must win
    letter = decode(value, max_value_bytes=4096, max_dead_letter_bytes=1024)
    assert isinstance(letter, DeadLetter)
    assert letter.reason == DeadLetterReason.VALUE_TOO_LARGE
    assert base64.b64decode(letter.raw_value_b64 or "") == value[:1024]
    assert letter.raw_value_size == 5000
    assert letter.raw_value_truncated


def test_default_value_limit_leaves_room_for_escaped_text() -> None:
    escaped = json.dumps({"text": "\x01" * MAX_TEXT}).encode()  # 6 bytes per character
    assert len(escaped) > 5 * MAX_TEXT
    assert isinstance(decode(escaped), InputEvent)


# --- other contracts --------------------------------------------------------------------


def test_decision_needs_a_label_unless_discarding() -> None:
    with pytest.raises(ValidationError, match="label is required"):
        Decision(id="evt-1", reviewer="ana")
    assert Decision(id="evt-1", reviewer="ana", action="discard").label is None


def test_decode_message_reads_decisions_and_dead_letters_the_rest() -> None:
    good = decode_message(
        Decision, wire({"id": "e", "label": "pos", "reviewer": "ana"}), None, "d", 0, 3
    )
    assert isinstance(good, Decision)
    assert good.decided_at.tzinfo is not None
    bad = decode_message(Decision, wire({"id": "e", "reviewer": "ana"}), b"k", "d", 0, 4)
    assert isinstance(bad, DeadLetter)
    assert bad.reason == DeadLetterReason.SCHEMA_VIOLATION
    assert "label is required" in bad.detail
    assert bad.id == "d:0:4"
    not_json = decode_message(ModelUpdate, b"{", None, "m", 1, 0)
    assert isinstance(not_json, DeadLetter)
    assert not_json.reason == DeadLetterReason.NOT_JSON


def test_timestamps_are_normalised_to_utc_and_naive_ones_refused() -> None:
    plus_two = datetime(2025, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    update = ModelUpdate(version="v2", promoted_at=plus_two)
    assert update.promoted_at == datetime(2025, 1, 1, 10, tzinfo=UTC)
    assert update.promoted_at.utcoffset() == timedelta(0)
    with pytest.raises(ValidationError, match="UTC offset"):
        ModelUpdate(version="v2", promoted_at=datetime(2025, 1, 1))


def test_outputs_refuse_unknown_fields_and_non_finite_numbers() -> None:
    with pytest.raises(ValidationError):
        Neighbor(exemplar_id="t:1", label="pos", distance=0.1, source="train", extra=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        WordContribution(word="good", score=float("nan"))
    with pytest.raises(ValidationError):
        WordContribution(word="good", score=1.0, start=5, end=2)


# --- JSON Schemas -------------------------------------------------------------------------


def test_committed_schemas_equal_freshly_generated(tmp_path: Path) -> None:
    written = export_schemas(tmp_path)
    assert {p.name for p in written} == {f"{name}.schema.json" for name in CONTRACTS}
    committed = {p.name: p.read_text(encoding="utf-8") for p in SCHEMA_DIR.glob("*.schema.json")}
    fresh = {p.name: p.read_text(encoding="utf-8") for p in written}
    assert committed == fresh, (
        "streams/schemas is stale; regenerate with "
        "python -c 'from streams.contracts import export_schemas; export_schemas()'"
    )


def schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text("utf-8"))
    jsonschema.Draft202012Validator.check_schema(loaded)
    return loaded


SOURCE: dict[str, Any] = {
    "source_topic": TOPIC,
    "source_partition": PARTITION,
    "source_offset": OFFSET,
}
NEIGHBOR = Neighbor(exemplar_id="train:12", label="pos", distance=0.42, source="train", text="ok")
SAMPLES: dict[str, BaseModel] = {
    "input_event": InputEvent(id="evt-1", text="a fine film", meta={"lang": "en"}),
    "label_record": LabelRecord(
        id="evt-1",
        label="pos",
        scores={"pos": 0.9, "neg": 0.1},
        model_version="v1",
        admitted_by="exemplar_support",
        nearest_distance=0.42,
        support=3,
        **SOURCE,
    ),
    "adjudication_request": AdjudicationRequest(
        id="evt-2",
        text="hmm",
        meta={"lang": "en"},
        predicted_label="neg",
        scores={"pos": 0.45, "neg": 0.55},
        reasons=["label_disagreement", "low_margin"],
        nearest=[NEIGHBOR, NEIGHBOR.model_copy(update={"text": None})],
        contributions=[WordContribution(word="hmm", score=-0.3, start=0, end=3)],
        model_version="v1",
        **SOURCE,
    ),
    "dead_letter": make_dead_letter(
        "not_json", "nope", topic=TOPIC, partition=0, offset=1, key=None, value=b"{"
    ),
    "decision": Decision(id="evt-2", label="pos", reviewer="ana", note="sarcasm"),
    "model_update": ModelUpdate(version="v2", previous_version="v1", metrics={"coverage": 0.7}),
    "lifecycle_note": LifecycleNote(
        kind="candidate",
        id="evt-3",
        text="great fun",
        label="pos",
        model_version="v1",
        nearest_id="ex-1",
        nearest_label="pos",
        distance=0.1,
        ratio=0.2,
    ),
}


def test_a_candidate_note_needs_its_neighbour() -> None:
    with pytest.raises(ValidationError, match="nearest_id, distance and ratio"):
        LifecycleNote(kind="candidate", id="e", text="t", label="pos", model_version="v1")
    pending = LifecycleNote(
        kind="pending", id="e", text="t", label="pos", model_version="v1", reasons=["low_margin"]
    )
    assert pending.nearest_id is None


def test_samples_cover_every_contract() -> None:
    assert set(SAMPLES) == set(CONTRACTS)


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_produced_messages_validate_against_exported_schemas(name: str) -> None:
    message = json.loads(encode_message(SAMPLES[name]).decode("utf-8"))
    jsonschema.validate(message, schema(name), cls=jsonschema.Draft202012Validator)


def test_schemas_reject_what_the_models_reject() -> None:
    label = json.loads(encode_message(SAMPLES["label_record"]))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**label, "extra": 1}, schema("label_record"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**label, "scores": {"pos": 1.5}}, schema("label_record"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"id": "x", "text": "   "}, schema("input_event"))
    letter = json.loads(encode_message(SAMPLES["dead_letter"]))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**letter, "reason": "Not A Code"}, schema("dead_letter"))


def test_input_schema_allows_the_id_to_be_absent_on_the_wire() -> None:
    jsonschema.validate({"text": "a fine film", "meta": {"any": ["thing"]}}, schema("input_event"))
    decoded = decode(wire({"text": "a fine film"}))
    assert isinstance(decoded, InputEvent)
    jsonschema.validate(json.loads(encode_message(decoded)), schema("input_event"))
