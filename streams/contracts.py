"""Message contracts of exemplar's topics, and the edge decoder for raw records.

Every message is a pydantic model serialised as UTF-8 JSON. Outputs forbid
unknown fields; inputs too, except inside the free-form ``meta`` object. The
JSON Schemas exported from these models live in ``streams/schemas/`` (a unit
test keeps them equal to the models); regenerate them with
``python -c "from streams.contracts import export_schemas; export_schemas()"``.

``decode_event`` turns one raw input record into an ``InputEvent`` or a
``DeadLetter`` carrying a reason code. It never raises on bad input, so the
predictor can route every record to exactly one of labels/adjudication/dlq.

Event ids: an input without ``id`` gets ``"{topic}:{partition}:{offset}"``. The
record key is deliberately *not* used as the id: producers key by entity for
partitioning (many events share a key), while downstream consumers de-duplicate
outputs by id, so a key-derived id would merge distinct events. The derived id
is stable across re-deliveries, which is what at-least-once de-duplication needs.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

MAX_ID_CHARS: Final = 256
#: Raw bytes of an offending value kept in a dead letter; more would risk making
#: the dead letter itself too large to produce (a poison pill for the predictor).
DEFAULT_DEAD_LETTER_RAW_BYTES: Final = 64 * 1024
#: Room for ``id``, ``meta`` and JSON framing on top of the text itself.
_ENVELOPE_BYTES: Final = 64 * 1024
SCHEMA_DIR: Final = Path(__file__).with_name("schemas")

ReasonCode = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]
EventId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]
NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


def _as_utc(value: datetime) -> datetime:
    if value.utcoffset() is None:
        raise ValueError("timestamp must carry a UTC offset")
    return value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]


def utc_now() -> datetime:
    """The current time, timezone-aware UTC (what every ``*_at`` field holds)."""
    return datetime.now(UTC)


class DeadLetterReason(StrEnum):
    """Reason codes the decoders in this module produce (other producers may add codes)."""

    NULL_VALUE = "null_value"
    VALUE_TOO_LARGE = "value_too_large"
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    UNKNOWN_FIELD = "unknown_field"
    WRONG_TYPE = "wrong_type"
    INVALID_ID = "invalid_id"
    MISSING_TEXT = "missing_text"
    EMPTY_TEXT = "empty_text"
    TEXT_TOO_LONG = "text_too_long"
    SCHEMA_VIOLATION = "schema_violation"


class _Contract(BaseModel):
    # NaN/inf would serialise as null and then fail every consumer's validation.
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        json_schema_serialization_defaults_required=True,
    )


class _FromRecord(_Contract):
    """Fields pointing back at the input record a message was made from."""

    source_topic: NonEmptyStr
    source_partition: NonNegativeInt
    source_offset: NonNegativeInt


def _id_optional_on_wire(schema: dict[str, Any]) -> None:
    schema["required"] = [name for name in schema.get("required", []) if name != "id"]


class InputEvent(_Contract):
    """A text to classify (topic ``exemplar.events``); extra data goes in ``meta``."""

    model_config = ConfigDict(json_schema_extra=_id_optional_on_wire)

    id: EventId = Field(
        description="Optional on the wire; when absent it is '{topic}:{partition}:{offset}'."
    )
    text: Annotated[str, StringConstraints(pattern=r"\S")]
    meta: dict[str, Any] = Field(default_factory=dict)


class Neighbor(_Contract):
    """One support exemplar shown as evidence for a prediction."""

    exemplar_id: NonEmptyStr
    label: NonEmptyStr
    distance: float = Field(ge=0.0, description="L2 distance to the prediction's exemplar.")
    source: NonEmptyStr
    text: str | None = None


class WordContribution(_Contract):
    """How much one word pushed the prediction (for 2 classes: s_1 - s_0)."""

    word: NonEmptyStr
    score: float
    start: NonNegativeInt | None = Field(
        default=None, description="Character offset of the word in the text."
    )
    end: NonNegativeInt | None = None

    @model_validator(mode="after")
    def _check_span(self) -> WordContribution:
        if self.start is not None and self.end is not None and self.end < self.start:
            raise ValueError("end must not precede start")
        return self


class LabelRecord(_FromRecord):
    """An admitted prediction (topic ``exemplar.labels``), keyed by event id."""

    id: EventId
    label: NonEmptyStr
    scores: dict[str, Probability]
    model_version: NonEmptyStr
    admitted_by: ReasonCode = Field(description="e.g. exemplar_support, human_mapping")
    nearest_distance: float = Field(ge=0.0)
    support: int = Field(ge=0, description="q: agreeing nearest neighbours, nearest first.")
    produced_at: UtcDatetime = Field(default_factory=utc_now)


class AdjudicationRequest(_FromRecord):
    """A prediction that was not admitted, with its evidence (``exemplar.adjudication``)."""

    id: EventId
    text: str
    meta: dict[str, Any] = Field(default_factory=dict)
    predicted_label: NonEmptyStr
    scores: dict[str, Probability]
    reasons: list[ReasonCode] = Field(
        min_length=1, description="e.g. label_disagreement, too_far, low_margin, no_support"
    )
    nearest: list[Neighbor] = Field(default_factory=list)
    contributions: list[WordContribution] = Field(default_factory=list)
    model_version: NonEmptyStr
    produced_at: UtcDatetime = Field(default_factory=utc_now)


class DeadLetter(_FromRecord):
    """A record that could not be used (``exemplar.dlq``), with its raw bytes."""

    id: EventId = Field(description="The record's own id when readable, else the derived one.")
    reason: ReasonCode
    detail: str
    key: str | None = Field(description="Raw key, UTF-8 decoded with replacement characters.")
    raw_value_b64: str | None = Field(description="Raw value, base64; None for a null value.")
    raw_value_size: int | None = Field(ge=0, description="Size of the whole raw value in bytes.")
    raw_value_truncated: bool = False
    produced_at: UtcDatetime = Field(default_factory=utc_now)


class Decision(_Contract):
    """A human verdict on an adjudicated event or exemplar (``exemplar.decisions``)."""

    id: EventId = Field(description="Event id or exemplar id the decision is about.")
    label: NonEmptyStr | None = None
    reviewer: NonEmptyStr
    note: str | None = None
    action: Literal["label", "discard"] = "label"
    decided_at: UtcDatetime = Field(default_factory=utc_now)

    @model_validator(mode="after")
    def _label_when_labelling(self) -> Decision:
        if self.action == "label" and self.label is None:
            raise ValueError("label is required when action is 'label'")
        return self


class ModelUpdate(_Contract):
    """A promoted model version that predictors should hot-swap to (``exemplar.models``)."""

    version: NonEmptyStr
    previous_version: str | None = None
    promoted_at: UtcDatetime = Field(default_factory=utc_now)
    metrics: dict[str, float] = Field(default_factory=dict)


class LifecycleNote(_Contract):
    """What a predictor hands the curator about one event (``exemplar.lifecycle``).

    Only split deployments (``--role predictor`` and ``--role curator`` in separate
    processes) use it: ``pending`` is an event routed to humans, which a decision may
    later map; ``candidate`` is an admitted event close to its nearest exemplar, counted
    towards the next fine-tune.
    """

    kind: Literal["pending", "candidate"]
    id: EventId
    text: str
    label: NonEmptyStr = Field(description="predicted label (pending) or admitted label")
    model_version: NonEmptyStr
    reasons: list[ReasonCode] = Field(default_factory=list)
    nearest_id: str | None = None
    nearest_label: str | None = None
    distance: float | None = Field(default=None, ge=0.0)
    ratio: float | None = Field(default=None, ge=0.0, description="distance / tau of the label")
    produced_at: UtcDatetime = Field(default_factory=utc_now)

    @model_validator(mode="after")
    def _candidate_has_neighbour(self) -> LifecycleNote:
        if self.kind == "candidate" and (
            self.nearest_id is None or self.distance is None or self.ratio is None
        ):
            raise ValueError("a candidate needs nearest_id, distance and ratio")
        return self


#: Contract name -> (model, whether it is read from the outside world).
CONTRACTS: Final[dict[str, tuple[type[BaseModel], bool]]] = {
    "input_event": (InputEvent, True),
    "label_record": (LabelRecord, False),
    "adjudication_request": (AdjudicationRequest, False),
    "dead_letter": (DeadLetter, False),
    "decision": (Decision, True),
    "model_update": (ModelUpdate, True),
    "lifecycle_note": (LifecycleNote, True),
}

M = TypeVar("M", bound=BaseModel)


def encode_message(message: BaseModel) -> bytes:
    """The wire form of a contract: compact UTF-8 JSON."""
    return message.model_dump_json().encode("utf-8")


def derive_event_id(topic: str, partition: int, offset: int) -> str:
    """The id of an event that came without one: unique and stable across re-deliveries."""
    return f"{topic}:{partition}:{offset}"


def make_dead_letter(
    reason: str,
    detail: str,
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    event_id: str | None = None,
    max_raw_bytes: int = DEFAULT_DEAD_LETTER_RAW_BYTES,
) -> DeadLetter:
    """A dead letter for one record, keeping at most ``max_raw_bytes`` of its value."""
    kept = value[:max_raw_bytes] if value is not None else None
    return DeadLetter(
        id=event_id or derive_event_id(topic, partition, offset),
        reason=reason,
        detail=detail,
        source_topic=topic,
        source_partition=partition,
        source_offset=offset,
        key=key.decode("utf-8", errors="replace") if key is not None else None,
        raw_value_b64=base64.b64encode(kept).decode("ascii") if kept is not None else None,
        raw_value_size=len(value) if value is not None else None,
        raw_value_truncated=value is not None and len(value) > max_raw_bytes,
    )


class _Rejected(Exception):  # internal control flow; never escapes this module
    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


# A \uD800-\uDFFF escape may decode to a lone surrogate, which cannot be re-encoded.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _parse_object(value: bytes | None, max_value_bytes: int) -> dict[str, Any]:
    """Raw bytes -> JSON object, or ``_Rejected`` naming the first thing wrong."""
    if value is None:
        raise _Rejected(DeadLetterReason.NULL_VALUE, "record value is null (a tombstone?)")
    if len(value) > max_value_bytes:
        raise _Rejected(
            DeadLetterReason.VALUE_TOO_LARGE,
            f"value is {len(value)} bytes, more than the {max_value_bytes} allowed",
        )
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Rejected(DeadLetterReason.NOT_UTF8, f"value is not UTF-8: {exc}") from None
    try:
        parsed = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise _Rejected(DeadLetterReason.NOT_JSON, f"value is not JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(parsed, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise _Rejected(
                DeadLetterReason.NOT_UTF8, "value escapes a lone UTF-16 surrogate"
            ) from None
    if not isinstance(parsed, dict):
        raise _Rejected(
            DeadLetterReason.NOT_OBJECT, f"value is a JSON {type(parsed).__name__}, not an object"
        )
    return parsed


def _check_id(obj: Mapping[str, Any]) -> str | None:
    if "id" not in obj or obj["id"] is None:
        return None
    given = obj["id"]
    if not isinstance(given, str):
        raise _Rejected(
            DeadLetterReason.WRONG_TYPE, f"id is a {type(given).__name__}, not a string"
        )
    if not given or len(given) > MAX_ID_CHARS:
        raise _Rejected(
            DeadLetterReason.INVALID_ID, f"id must be 1 to {MAX_ID_CHARS} characters long"
        )
    return given


def _check_event(obj: Mapping[str, Any], max_text_bytes: int) -> tuple[str, dict[str, Any]]:
    unknown = sorted(set(obj) - set(InputEvent.model_fields))
    if unknown:
        raise _Rejected(
            DeadLetterReason.UNKNOWN_FIELD,
            f"unknown top-level field(s) {unknown}; put extra data inside 'meta'",
        )
    text = obj.get("text")
    if text is None:
        raise _Rejected(DeadLetterReason.MISSING_TEXT, "field 'text' is missing or null")
    if not isinstance(text, str):
        raise _Rejected(
            DeadLetterReason.WRONG_TYPE, f"text is a {type(text).__name__}, not a string"
        )
    if not text.strip():
        raise _Rejected(DeadLetterReason.EMPTY_TEXT, "text is empty or only whitespace")
    size = len(text.encode("utf-8"))
    if size > max_text_bytes:
        raise _Rejected(
            DeadLetterReason.TEXT_TOO_LONG,
            f"text is {size} bytes in UTF-8, more than the {max_text_bytes} allowed",
        )
    meta = obj.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise _Rejected(
            DeadLetterReason.WRONG_TYPE, f"meta is a {type(meta).__name__}, not an object"
        )
    return text, meta


def default_max_value_bytes(max_text_bytes: int) -> int:
    """The raw-size limit implied by a text limit: JSON escapes can take 6 bytes a character."""
    return 6 * max_text_bytes + _ENVELOPE_BYTES


def decode_event(
    value: bytes | None,
    key: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    max_text_bytes: int,
    *,
    max_value_bytes: int | None = None,
    max_dead_letter_bytes: int = DEFAULT_DEAD_LETTER_RAW_BYTES,
) -> InputEvent | DeadLetter:
    """One raw input record -> an ``InputEvent``, or a ``DeadLetter`` saying why not.

    Never raises on bad input. ``max_value_bytes`` (checked before parsing)
    defaults to ``default_max_value_bytes(max_text_bytes)``.
    """
    limit = default_max_value_bytes(max_text_bytes) if max_value_bytes is None else max_value_bytes
    given_id: str | None = None
    try:
        obj = _parse_object(value, limit)
        given_id = _check_id(obj)
        text, meta = _check_event(obj, max_text_bytes)
        event_id = given_id or derive_event_id(topic, partition, offset)
        return InputEvent(id=event_id, text=text, meta=meta)
    except _Rejected as rejected:
        reason, detail = rejected.reason, rejected.detail
    except ValidationError as exc:  # a rule of the model the checks above do not mirror
        reason, detail = DeadLetterReason.SCHEMA_VIOLATION, _summarise(exc)
    return make_dead_letter(
        reason,
        detail,
        topic=topic,
        partition=partition,
        offset=offset,
        key=key,
        value=value,
        event_id=given_id,
        max_raw_bytes=max_dead_letter_bytes,
    )


def decode_message(
    model: type[M],
    value: bytes | None,
    key: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    *,
    max_value_bytes: int = 1_048_576,
    max_dead_letter_bytes: int = DEFAULT_DEAD_LETTER_RAW_BYTES,
) -> M | DeadLetter:
    """Decode a record of any other contract (a ``Decision``, a ``ModelUpdate``); never raises."""
    try:
        return model.model_validate(_parse_object(value, max_value_bytes))
    except _Rejected as rejected:
        reason, detail = rejected.reason, rejected.detail
    except ValidationError as exc:
        reason, detail = DeadLetterReason.SCHEMA_VIOLATION, _summarise(exc)
    return make_dead_letter(
        reason,
        detail,
        topic=topic,
        partition=partition,
        offset=offset,
        key=key,
        value=value,
        max_raw_bytes=max_dead_letter_bytes,
    )


def _summarise(exc: ValidationError) -> str:
    parts = [
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
        for err in exc.errors(include_url=False, include_input=False)
    ]
    return "; ".join(parts)[:1000]


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema (draft 2020-12) of every contract, keyed by contract name."""
    schemas = {}
    for name, (model, is_input) in CONTRACTS.items():
        schema = model.model_json_schema(mode="validation" if is_input else "serialization")
        schemas[name] = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    return schemas


def export_schemas(directory: Path | str = SCHEMA_DIR) -> list[Path]:
    """Write ``<name>.schema.json`` for every contract into ``directory``; return the paths."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = target / f"{name}.schema.json"
        path.write_text(
            json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
        written.append(path)
    return written
