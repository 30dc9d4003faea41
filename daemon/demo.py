"""``exemplar demo``: the whole streaming loop on one machine, with no Kafka to install.

Starts the embedded Tansu broker, the predictor in a background thread with its
/metrics and /healthz endpoint, then produces a few hundred events: held-out
reviews, film plots (a shifted domain), emails and foreign-language sentences
(far from anything the model was trained on) and a handful of malformed records.
It waits until every event came out on exactly one of the labels / adjudication /
dead-letter topics and prints what happened. The demo knows the gold labels of
the held-out reviews; the daemon never sees them.

Progress and results go to stdout. Daemon logs stay on stderr, at warning level
unless ``EXEMPLAR_LOG__LEVEL`` is set.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from daemon.app import load
from daemon.config import Settings
from daemon.http import Health, HttpEndpoint
from daemon.logs import configure_logging
from daemon.metrics import DaemonMetrics
from daemon.worker import PredictorWorker, RunState
from model.data import Example, ood_paths, read_examples
from model.errors import BundleError, DataError, StreamError
from streams.broker import EmbeddedBroker
from streams.config import KafkaConfig, TopicsConfig
from streams.contracts import AdjudicationRequest, DeadLetter, LabelRecord
from streams.kafka import BatchConsumer, ensure_topics, produce_raw

WAIT_S = 120.0
#: outcome -> (topic role, contract); the outcome names are what the demo prints
OUTCOMES: dict[str, tuple[str, type[BaseModel]]] = {
    "admitted": ("output", LabelRecord),
    "routed to humans": ("adjudication", AdjudicationRequest),
    "dead-lettered": ("dead_letter", DeadLetter),
}
SOURCES = ("test", "plots", "emails", "foreign", "malformed")
REASON_HINTS = {
    "low_margin": "the model itself was unsure",
    "too_far": "no training exemplar close enough",
    "label_disagreement": "the nearest exemplars carry another label",
    "no_support": "the support set returned nothing",
    "uncalibrated_label": "this label never reached the target accuracy",
}
# Tansu answers a group join after about session_timeout/2: keep it short here.
DEMO_KAFKA: dict[str, Any] = dict(
    group_id="exemplar-demo",
    session_timeout_ms=3_000,
    heartbeat_interval_ms=1_000,
    request_timeout_ms=5_000,
    bootstrap_timeout_ms=5_000,
    delivery_timeout_ms=10_000,
    max_block_ms=5_000,
    linger_ms=0,
)


@dataclass(frozen=True)
class DemoEvent:
    id: str
    source: str
    value: bytes
    gold: str | None = None


def _say(message: str = "") -> None:
    print(message, flush=True)


def plan_events(data_dir: Path, events: int, max_text_bytes: int, seed: int = 7) -> list[DemoEvent]:
    """Mostly held-out test texts, some plots and far-away texts, five malformed records."""
    test_path, plots_path = data_dir / "test.jsonl", data_dir / "plots.jsonl"
    if not test_path.is_file():
        raise DataError(
            f"{test_path} not found: prepare the data with `make demo-model` "
            f"(or `exemplar data rotten-tomatoes --out {data_dir}`)"
        )
    pools: dict[str, list[Example]] = {"test": read_examples(test_path)}
    pools["plots"] = read_examples(plots_path) if plots_path.is_file() else []
    pools.update({name: read_examples(path) for name, path in ood_paths().items()})
    rng = random.Random(seed)  # noqa: S311 - picks demo texts, not secrets
    side = max(1, events // 12)
    counts = {name: min(side, len(pools[name])) for name in ("plots", "emails", "foreign")}
    bad = _malformed(max_text_bytes)
    counts["test"] = min(len(pools["test"]), events - len(bad) - sum(counts.values()))
    if counts["test"] < 1:
        raise DataError(f"--events {events} is too few for the demo; use at least 20")
    planned = [
        DemoEvent(
            eid,
            source,
            json.dumps({"id": eid, "text": ex.text, "meta": {"source": source}}).encode(),
            ex.label if source == "test" else None,
        )
        for source, n in counts.items()
        for i, ex in enumerate(rng.sample(pools[source], n))
        for eid in [f"{source}-{i + 1:03d}"]
    ]
    planned += [DemoEvent(eid, "malformed", value) for eid, value in bad]
    rng.shuffle(planned)
    return planned


def _malformed(max_text_bytes: int) -> list[tuple[str, bytes]]:
    too_long = "so long " * (max_text_bytes // 8 + 1)
    return [
        ("bad-not-json", b"this is not JSON {"),
        ("bad-not-utf8", b'{"id": "bad-not-utf8", "text": "caf\xe9 cr\xe8me"}'),
        ("bad-no-text", json.dumps({"id": "bad-no-text", "meta": {}}).encode()),
        ("bad-empty-text", json.dumps({"id": "bad-empty-text", "text": "   "}).encode()),
        ("bad-too-long", json.dumps({"id": "bad-too-long", "text": too_long}).encode()),
    ]


def _produce(cfg: KafkaConfig, topic: str, planned: list[DemoEvent]) -> None:
    produce_raw(cfg, topic, [(e.id.encode(), e.value) for e in planned])


def _start_http(settings: Settings, metrics: DaemonMetrics, health: Health) -> HttpEndpoint:
    host, port = settings.metrics.host, settings.metrics.port
    try:
        return HttpEndpoint(host, port, metrics.registry, health)
    except OSError:
        endpoint = HttpEndpoint(host, 0, metrics.registry, health)
        _say(f"      (port {port} is busy, perhaps another exemplar; using {endpoint.port})")
        return endpoint


class _Background:
    """The predictor loop in a thread; ``check`` re-raises its error in the caller's thread."""

    def __init__(self, worker: PredictorWorker) -> None:
        self.worker = worker
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="exemplar-demo", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread by check()
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise self.error
        if not self.thread.is_alive():
            raise StreamError("the predictor stopped unexpectedly")

    def wait_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            self.check()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def stop(self) -> None:
        self.worker.request_stop()
        self.thread.join(30)


def _collect(
    reader: BatchConsumer, topics: TopicsConfig, expected: set[str], background: _Background
) -> dict[str, dict[str, Any]]:
    """outcome -> event id -> message, read until every expected id came out or time is up."""
    by_topic = {getattr(topics, role): (name, model) for name, (role, model) in OUTCOMES.items()}
    out: dict[str, dict[str, Any]] = {name: {} for name in OUTCOMES}
    deadline, next_report = time.monotonic() + WAIT_S, time.monotonic() + 5
    while True:
        for record in reader.poll_batch(1000, 0.3):
            name, model = by_topic[record.topic]
            msg: Any = model.model_validate_json(record.value or b"")
            # a record whose own id is unreadable gets a derived id; its key is ours
            key = msg.key if isinstance(msg, DeadLetter) and msg.key in expected else msg.id
            out[name][key] = msg
        seen = sum(1 for i in expected if any(i in d for d in out.values()))
        if seen == len(expected) or time.monotonic() > deadline:
            return out
        background.check()
        if time.monotonic() > next_report:
            _say(f"      ... {seen}/{len(expected)} events out so far")
            next_report += 5


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "n/a"


def _short(text: str | None, limit: int) -> str | None:
    return text if text is None or len(text) <= limit else text[: limit - 1] + "…"


def _abridged(request: AdjudicationRequest) -> str:
    """The request as JSON, long fields cut, one neighbour or word per line."""
    dumped = request.model_dump(mode="json")
    provenance = ("source_topic", "source_partition", "source_offset", "produced_at")
    record = {k: v for k, v in dumped.items() if k not in provenance}
    record.update({k: dumped[k] for k in provenance})  # where it came from, last
    record["text"] = _short(request.text, 200)
    record["scores"] = {k: round(v, 3) for k, v in request.scores.items()}
    record["nearest"] = [
        {
            "label": n.label,
            "distance": round(n.distance, 3),
            "source": n.source,
            "text": _short(n.text, 80),
        }
        for n in request.nearest[:3]
    ]
    top = sorted(request.contributions, key=lambda w: -abs(w.score))[:8]
    record["contributions"] = [{"word": w.word, "score": round(w.score, 3)} for w in top]
    lines = []
    for key, value in record.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            items = ",\n".join(f"    {json.dumps(v, ensure_ascii=False)}" for v in value)
            lines.append(f'  "{key}": [\n{items}\n  ]')
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n" + ",\n".join(lines) + "\n}"


def _http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our own http URL
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:  # /healthz answers 503 when not live
        return exc.code, exc.read().decode()


def _report(
    planned: list[DemoEvent], out: dict[str, dict[str, Any]], topics: TopicsConfig, alpha: float
) -> None:
    admitted, humans, dead = (out[name] for name in OUTCOMES)
    _say("\n== where the events went")
    for name, (role, _model) in OUTCOMES.items():
        _say(f"  {name:<17}{len(out[name]):>5}   -> {getattr(topics, role)}")

    tests = [e for e in planned if e.source == "test" and e.gold is not None]
    ok_admitted = [e.gold == admitted[e.id].label for e in tests if e.id in admitted]
    predicted = {
        **{i: m.label for i, m in admitted.items()},
        **{i: m.predicted_label for i, m in humans.items()},
    }
    ok_all = [e.gold == predicted[e.id] for e in tests if e.id in predicted]
    _say("\n== accuracy on the held-out reviews (the demo knows their labels; the daemon didn't)")
    for what, ok, note in (
        ("admitted predictions", ok_admitted, f"the target calibrated with the model: {alpha:.0%}"),
        ("every prediction made", ok_all, "the model alone, without the exemplar check"),
    ):
        _say(f"  {what:<23}{sum(ok):>4}/{len(ok):<4} correct ({_pct(sum(ok), len(ok))}; {note})")

    _say("\n== admission rate per source")
    for source in SOURCES:
        ids = [e.id for e in planned if e.source == source]
        if ids:
            n = sum(i in admitted for i in ids)
            n_dead = sum(i in dead for i in ids)
            extra = f", {n_dead} dead-lettered" if n_dead else ""
            _say(f"  {source:<10}{n:>4}/{len(ids):<4} admitted ({_pct(n, len(ids))}){extra}")

    reasons = Counter(r for m in humans.values() for r in m.reasons)
    _say("\n== why events went to humans (one event may have several reasons)")
    for reason, n in reasons.most_common():
        _say(f"  {reason:<20}{n:>4}   {REASON_HINTS.get(reason, '')}")
    dead_reasons = Counter(m.reason for m in dead.values())
    _say("== why events were dead-lettered")
    _say("  " + (", ".join(f"{r}: {n}" for r, n in dead_reasons.most_common()) or "none"))

    if humans:
        source_of = {e.id: e.source for e in planned}
        pick = min(humans, key=lambda i: (source_of.get(i) != "emails", i))
        _say("\n== one adjudication request, as a reviewer receives it (abridged)")
        _say(_abridged(humans[pick]))


def run_demo(settings: Settings, model_dir: Path, data_dir: Path, events: int = 300) -> int:
    """Run the streaming demo; 0 when every event came out on exactly one output topic."""
    started = time.monotonic()
    if not (model_dir / "bundle.json").is_file():
        raise BundleError(
            f"no model bundle at {model_dir}: build it with `make demo-model` "
            f"(or `exemplar train --data {data_dir}/train.jsonl --calib {data_dir}/calib.jsonl "
            f"--out {model_dir}`)"
        )
    planned = plan_events(data_dir, events, settings.batch.max_text_bytes)
    _say("exemplar demo: a streaming classifier that admits only what its exemplars support")

    with ExitStack() as stack:
        if threading.current_thread() is threading.main_thread():
            # SIGTERM ends the demo like Ctrl-C: everything below is stopped in order
            previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
            stack.callback(signal.signal, signal.SIGTERM, previous)
        if "level" not in settings.log.model_fields_set:
            configure_logging(settings.log.model_copy(update={"level": "warning"}))
            # kafka-python warns whenever the model's forward pass holds the GIL a while
            kafka_log = logging.getLogger("kafka")
            stack.callback(kafka_log.setLevel, kafka_log.level)
            kafka_log.setLevel(logging.ERROR)
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="exemplar-demo-"))
        broker = stack.enter_context(EmbeddedBroker(0, log_path=Path(tmp) / "tansu.log"))
        _say(f"[1/5] broker: embedded Tansu on {broker.bootstrap_servers} (in memory)")
        kafka = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, **DEMO_KAFKA)
        settings = settings.model_copy(update={"model_dir": model_dir, "kafka": kafka})
        topics = settings.topics
        ensure_topics(kafka, topics)

        t0 = time.monotonic()
        loaded = load(settings, str(model_dir), batch_size=settings.batch.forward_size)
        stack.callback(loaded.close)
        _say(
            f"[2/5] model {loaded.predictor.version} loaded from {model_dir} in "
            f"{time.monotonic() - t0:.1f} s; {loaded.store.count()} exemplars in its support set"
        )

        metrics, health = DaemonMetrics.create(CollectorRegistry()), Health()
        endpoint = _start_http(settings, metrics, health)
        stack.callback(endpoint.close)
        background = _Background(
            PredictorWorker(settings, loaded.predictor, metrics, health=health)
        )
        stack.callback(background.stop)
        if not background.wait_until(lambda: background.worker.state == RunState.RUNNING, 60):
            raise StreamError("the predictor did not join its consumer group within 60 s")
        _say(
            f"[3/5] predictor running: {topics.input} -> {topics.output} | "
            f"{topics.adjudication} | {topics.dead_letter}"
        )
        _say(f"      metrics: {endpoint.url}/metrics   health: {endpoint.url}/healthz")

        reader = BatchConsumer(
            kafka,
            [topics.output, topics.adjudication, topics.dead_letter],
            group_id=f"exemplar-demo-reader-{uuid.uuid4().hex[:6]}",
        )
        stack.callback(reader.close)
        t0 = time.monotonic()
        _produce(kafka, topics.input, planned)
        mix = Counter(e.source for e in planned)
        _say(
            f"[4/5] produced {len(planned)} events to {topics.input}: "
            + ", ".join(f"{mix[s]} {s}" for s in SOURCES if mix[s])
        )

        out = _collect(reader, topics, {e.id for e in planned}, background)
        where = {e.id: [name for name in OUTCOMES if e.id in out[name]] for e in planned}
        problems = {
            f"did not come out within {WAIT_S:.0f} s": sorted(i for i, n in where.items() if not n),
            "came out on more than one topic": sorted(i for i, n in where.items() if len(n) > 1),
        }
        for what, ids in problems.items():
            if ids:
                _say(f"FAILED: {len(ids)} of {len(planned)} events {what}: {', '.join(ids[:10])}")
        if any(problems.values()):
            return 1
        took = time.monotonic() - t0
        _say(
            f"[5/5] all {len(planned)} events came out, each on exactly one topic, in "
            f"{took:.1f} s ({len(planned) / took:.0f} events/s on this machine)"
        )
        _report(planned, out, topics, loaded.predictor.thresholds.alpha)

        # the counters move just after the outputs are acknowledged: let the last batch land
        totals = background.worker.totals
        background.wait_until(
            lambda: totals.admitted + totals.adjudication + totals.dead_letter >= len(planned), 5
        )
        status, body = _http_get(f"{endpoint.url}/metrics")
        _say(f"\n== {endpoint.url}/metrics (HTTP {status}), a few of its lines")
        for line in body.splitlines():
            if line.startswith(("exemplar_events_total", "exemplar_batches_total")):
                _say(f"  {line}")
        status, body = _http_get(f"{endpoint.url}/healthz")
        _say(f"== {endpoint.url}/healthz: HTTP {status} {body}")
    _say(f"\ndone in {time.monotonic() - started:.0f} s; predictor and broker stopped.")
    return 0
