"""Deployment and operations artefacts (deploy/, ops/, docs/runbook.md) against the real thing.

* Prometheus rules: ``promtool check rules``, the rules' unit tests
  (``promtool test rules``) and ``promtool check config`` of the compose scrape config.
* Every metric the rules and the Grafana dashboard reference is exported by a running
  predictor (a real daemon on the Tansu broker, scraped over HTTP) or a running curator
  (a real ``--role curator`` service beside it, qdrant-client's local mode standing in
  for the store server, with a decision applied, one rejected and a fine-tune run that
  failed); the dashboard's "Lifelong learning" row shows every metric the curator
  exports.
* A real Prometheus (Debian's binary) scrapes both under the job names the alerts
  select on, loads the rules, and answers every alert and dashboard expression without
  error; the curator's failed run fires ExemplarFinetuneFailing.
* Compose (``docker compose config`` where the CLI has compose) and Kubernetes
  manifests (``kubectl kustomize`` where kubectl exists): structure, probes on the
  paths the daemon serves, scaling limits; every daemon container's environment (image
  ENV + compose / ConfigMap + env) loaded into the daemon's own ``Settings``, so a split
  role the daemon would refuse at start-up fails here; predictors and curator share the
  store server and the registry volume, which only the curator writes.
* The container entrypoint, the topic script (every topic of ``TopicsConfig``), the
  registry-seeding script and the predictors' wait for the support set, run here with
  stand-ins for Kafka's tools and Qdrant (the seeding with the real ``exemplar``).
* A real Apache Kafka and a real Qdrant server through testcontainers, where a
  Docker engine exists.
"""

from __future__ import annotations

import gc
import http.server
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka import KafkaProducer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from qdrant_client import QdrantClient

from daemon.app import Loaded, load
from daemon.config import Settings, known_variables, load_settings
from daemon.http import Health, HttpEndpoint
from daemon.lifecycle import LifecycleService
from daemon.metrics import DaemonMetrics, LifecycleMetrics
from daemon.retry import Backoff
from daemon.worker import PredictorWorker, RunState
from streams.config import KafkaConfig, TopicsConfig
from tests.conftest import FAST_KAFKA
from tests.integration.test_curator import make_registry
from tests.integration.test_split_roles import SerializedClient
from tests.model_fixtures import copy_bundle

# qdrant-client's local mode (the curator's store here) warns that payload indexes and
# search parameters do nothing in it; the curator fixture spans several tests.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning"),
    pytest.mark.filterwarnings("ignore:Local mode performs exact:UserWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "ops" / "prometheus"
RULE_FILES = (PROM_DIR / "recording.yml", PROM_DIR / "alerts.yml")
RULE_TESTS = PROM_DIR / "rules.test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "exemplar.json"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"

#: The dashboard row of the curator's metrics (lifelong learning).
LIFECYCLE_ROW = "Lifelong learning"
#: Series Prometheus makes itself.
BUILTIN_SERIES = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds"})
#: The predictors' and the curator's scrape jobs; alerts.yml selects on them.
PREDICTOR_JOB = "exemplar-predictor"
CURATOR_JOB = "exemplar-curator"
#: Grafana variables in the dashboard's queries, and what they stand for here.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$instance": ".*",
}
#: Words of PromQL that look like metric names: modifiers, operators, literals.
_PROMQL_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "and",
        "or",
        "unless",
        "inf",
        "nan",
    }
)
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# ------------------------------------------------------------------ PromQL helpers
def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (no functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(\s*\()?", text):
        word, is_call = match.group(1), match.group(2)
        if not is_call and word.lower() not in _PROMQL_KEYWORDS:
            names.add(word)
    return names


def base_name(series: str) -> str:
    for suffix in _HISTOGRAM_SUFFIXES:
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


def exported_series(exposition: str) -> set[str]:
    """Every series name a /metrics page offers, declared (# TYPE) or sampled."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names.update(name + s for s in _HISTOGRAM_SUFFIXES)
            elif kind == "summary":
                names.update((name + "_sum", name + "_count"))
        elif line and not line.startswith("#"):
            match = re.match(r"[A-Za-z_:][\w:]*", line)
            assert match, line
            names.add(match.group(0))
    return names


def sample_labels(exposition: str, series: str) -> list[dict[str, str]]:
    """The label sets of every sample of ``series`` on a /metrics page."""
    return [
        sample.labels
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == series
    ]


def lifecycle_metric_names() -> set[str]:
    """The metrics the curator registers (LifecycleMetrics), without ``_created`` series."""
    registry = CollectorRegistry()
    LifecycleMetrics.create(registry)
    exposition = generate_latest(registry).decode()
    return {base_name(n) for n in exported_series(exposition) if not n.endswith("_created")}


def test_metric_name_extraction_sees_selectors_only() -> None:
    expr = (
        'sum by (le, stage) (rate(a_bucket{le=~"1(\\\\.0)?", job="x"}[5m])) / on (job) '
        "group_left(version) b:c:d offset 5m > bool 1e3 and ignoring (x) "
        'histogram_quantile(0.9, c_total) unless absent(up{job="y"} == 1) or nan'
    )
    assert metric_names(expr) == {"a_bucket", "b:c:d", "c_total", "up"}
    assert metric_names('time() - max(x_seconds{instance=~"$instance"} > 0)') == {"x_seconds"}


# ------------------------------------------------------------------ rule and dashboard loading
def load_rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in load_rules() if "record" in rule}


def alert_rules() -> list[dict[str, Any]]:
    return [rule for rule in load_rules() if "alert" in rule]


@dataclass(frozen=True)
class DashboardQuery:
    row: str
    panel: str
    expr: str

    def promql(self) -> str:
        """The query as Grafana would send it for 'all replicas'."""
        expr = self.expr
        for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{self.panel}: unknown Grafana variable in {expr}"
        return expr


def dashboard_queries() -> list[DashboardQuery]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries: list[DashboardQuery] = []
    row = ""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            for child in panel.get("panels", []):
                queries += [
                    DashboardQuery(row, child["title"], t["expr"]) for t in child["targets"]
                ]
        else:
            queries += [DashboardQuery(row, panel["title"], t["expr"]) for t in panel["targets"]]
    return queries


def test_dashboard_covers_the_operational_questions() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    all_panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"]
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "instance"}
    for panel in all_panels:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel
    used = {base_name(n) for q in dashboard_queries() for n in metric_names(q.expr)}
    # throughput, admission, latency, lag, drift, dead letters, retries, errors,
    # support set, serving model (the list of panels)
    assert used >= {
        "exemplar_events_total",
        "exemplar_admission_ratio",
        "exemplar_event_latency_seconds",
        "exemplar_stage_duration_seconds",
        "exemplar_consumer_lag",
        "exemplar_nearest_distance_ratio",
        "exemplar_dead_letters_total",
        "exemplar_retries_total",
        "exemplar_errors_total",
        "exemplar_support_set_size",
        "exemplar_model_info",
        "exemplar_rejections_total",
        "exemplar_last_batch_timestamp_seconds",
    }
    quantiles = [q.expr for q in dashboard_queries() if "histogram_quantile" in q.expr]
    assert any("exemplar_event_latency_seconds_bucket" in e for e in quantiles)
    assert any("exemplar_stage_duration_seconds_bucket" in e for e in quantiles)
    assert any("exemplar_finetune_duration_seconds_bucket" in e for e in quantiles)
    adjudication = [p for p in all_panels if p["title"] == "Adjudication inflow"]
    assert adjudication and "does not see the reviewers' consumer" in adjudication[0]["description"]
    # lifelong learning: an open row showing everything the curator exports, and the
    # curator's serving version set against the predictors' model version
    row = [p for p in dashboard["panels"] if p["type"] == "row" and p["title"] == LIFECYCLE_ROW]
    assert row and not row[0]["collapsed"] and not row[0]["panels"]
    in_row = {
        base_name(n)
        for q in dashboard_queries()
        if q.row == LIFECYCLE_ROW
        for n in metric_names(q.expr)
    }
    lifecycle = lifecycle_metric_names()
    assert len(lifecycle) == 6 and in_row >= lifecycle | {"exemplar_model_info"}
    versions = {"exemplar_model_info", "exemplar_serving_info"}
    assert any(versions <= metric_names(q.expr) for q in dashboard_queries())
    assert not [p["title"] for p in all_panels if "pending)" in p["title"].lower()]


def test_every_alert_has_a_runbook_entry() -> None:
    runbook = RUNBOOK.read_text()
    sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", runbook, re.M | re.S))
    for rule in alert_rules():
        name = rule["alert"]
        assert name in sections, f"docs/runbook.md has no '## {name}' section"
        for part in ("**Meaning**", "**First checks**", "**Commands**", "**Fixes**"):
            assert part in sections[name], f"runbook {name}: {part} missing"
        assert rule["annotations"]["runbook"] == f"docs/runbook.md#{name.lower()}"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    # the curator's fine-tunes, decisions and serving version are watched too
    watched = {base_name(n) for rule in load_rules() for n in metric_names(rule["expr"])}
    assert watched >= {
        "exemplar_finetune_runs_total",
        "exemplar_decisions_total",
        "exemplar_serving_info",
        "exemplar_model_info",
    }


# ------------------------------------------------------------------ (a) promtool
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool not installed (Debian package 'prometheus'; .ci/run installs "
            "it when apt is reachable)"
        )
    return path


def run_tool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_checks_the_rules() -> None:
    result = run_tool(promtool(), "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_FILES)


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = run_tool(promtool(), "test", "rules", RULE_TESTS.name, cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in alert_rules()}, "every alert needs a unit test"


def test_promtool_checks_the_compose_prometheus_config(tmp_path: Path) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    mounted = {Path(p).name for p in config["rule_files"]}
    assert mounted == {p.name for p in RULE_FILES}
    # the container paths point at ops/prometheus through compose's bind mounts
    config["rule_files"] = [str(p) for p in RULE_FILES]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    result = run_tool(promtool(), "check", "config", str(local))
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert PREDICTOR_JOB in jobs


def test_rules_and_dashboard_select_the_scrape_jobs_of_the_deployment() -> None:
    """A job name in a selector that no scrape config uses makes an alert silently empty."""
    exprs = [rule["expr"] for rule in load_rules()] + [q.expr for q in dashboard_queries()]
    selected = {job for expr in exprs for job in re.findall(r'\bjob="([^"]*)"', expr)}
    assert selected == {PREDICTOR_JOB, CURATOR_JOB}
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert selected <= {job["job_name"] for job in config["scrape_configs"]}


# ------------------------------------------------------------------ a running daemon
@dataclass
class RunningDaemon:
    worker: PredictorWorker
    endpoint: HttpEndpoint
    bootstrap: str
    topics: TopicsConfig
    produced: int = 0

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.endpoint.url + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def scrape(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200
        return body

    def produce(self, good: int, malformed: int) -> None:
        """Send events and wait until the predictor has committed all of them."""
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=0)
        texts = [
            "The film was wonderful and charming.",
            "The script was dreadful and boring.",
            "The cast was average and routine.",
            "Une phrase qui ne ressemble à rien.",
        ]
        for i in range(good):
            event_id = f"ops-{uuid.uuid4().hex[:8]}"
            body = {"id": event_id, "text": texts[i % len(texts)], "meta": {}}
            producer.send(self.topics.input, key=event_id.encode(), value=json.dumps(body).encode())
        for _ in range(malformed):
            producer.send(self.topics.input, key=b"bad", value=b"not json at all")
        producer.flush(10)
        producer.close()
        self.produced += good + malformed
        totals = self.worker.totals
        assert wait_for(
            lambda: totals.admitted + totals.adjudication + totals.dead_letter >= self.produced, 60
        ), "the predictor did not process the events"


def wait_for(predicate: Callable[[], bool], timeout_s: float, every_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every_s)
    return False


@pytest.fixture(scope="module")
def daemon(
    kafka_broker: str, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningDaemon]:
    """A predictor with its HTTP endpoint on a free port, some events already processed."""
    suffix = uuid.uuid4().hex[:10]
    topics = TopicsConfig(
        **{role: f"ops-{suffix}-{role.replace('_', '-')}" for role in TopicsConfig().by_role()}
    )
    kafka = KafkaConfig(bootstrap_servers=kafka_broker, group_id=f"ops-{suffix}", **FAST_KAFKA)
    bundle = copy_bundle(tiny_bundle, tmp_path_factory.mktemp("ops") / "bundle")
    settings = Settings(
        model_dir=bundle,
        kafka=kafka,
        topics=topics,
        batch={"max_size": 16, "max_wait_ms": 100},
        metrics={"host": "127.0.0.1", "port": 0},
    )
    loaded: Loaded = load(settings, str(bundle), batch_size=16)
    metrics = DaemonMetrics.create(CollectorRegistry())
    health = Health()
    endpoint = HttpEndpoint(settings.metrics.host, settings.metrics.port, metrics.registry, health)
    worker = PredictorWorker(
        settings,
        loaded.predictor,
        metrics,
        backoff=Backoff(initial_s=0.1, maximum_s=0.5),
        health=health,
    )
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    running = RunningDaemon(worker, endpoint, kafka_broker, topics)
    try:
        assert wait_for(lambda: worker.state == RunState.RUNNING, 60), worker.state
        running.produce(good=12, malformed=2)  # admitted/adjudication and dead-letter series
        assert wait_for(lambda: "exemplar_consumer_lag{" in running.scrape(), 10)
        yield running
    finally:
        worker.request_stop()
        thread.join(30)
        endpoint.close()
        loaded.close()


# ------------------------------------------------------------------ a running curator
@dataclass
class RunningCurator:
    service: LifecycleService
    endpoint: HttpEndpoint

    def scrape(self) -> str:
        with urllib.request.urlopen(self.endpoint.url + "/metrics", timeout=5) as response:
            return response.read().decode()


@pytest.fixture(scope="module")
def curator(
    daemon: RunningDaemon, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningCurator]:
    """``exemplar run --role curator`` beside the predictor (same broker, topics and model
    version), on a registry of the tiny bundle, with qdrant-client's local mode for the
    store server (as in test_split_roles.py). One decision applied, one rejected, and
    one fine-tune run that failed: the calibration rows it is given do not exist."""
    work = tmp_path_factory.mktemp("curator")
    settings = Settings(
        role="curator",
        model_dir=make_registry(tiny_bundle, work),
        kafka=daemon.worker.settings.kafka,  # its group: <the predictors' group>-curator
        topics=daemon.topics,
        metrics={"host": "127.0.0.1", "port": 0},
        # never dialled: the local-mode client below stands in for the server
        store={"backend": "server", "url": "http://qdrant.invalid:6333"},
        curator={"calib_path": work / "no-such-calib.jsonl"},
    )
    client = QdrantClient(":memory:")
    service = LifecycleService(
        settings,
        backoff=Backoff(initial_s=0.1, maximum_s=0.5),
        schedule=False,
        store_client=SerializedClient(client),
    )
    endpoint = HttpEndpoint(
        settings.metrics.host, settings.metrics.port, service.prometheus, service.health
    )
    running = RunningCurator(service, endpoint)
    try:
        service.start()
        assert service.curator is not None and service.runner is not None
        current = service.serving.current
        exemplar = next(iter(current.store.iter_exemplars()))
        other = next(label for label in current.labels if label != exemplar.label)
        producer = KafkaProducer(bootstrap_servers=daemon.bootstrap, acks="all", linger_ms=0)
        for decision in (
            {"id": exemplar.id, "label": other, "reviewer": "ops", "action": "label"},
            {"id": exemplar.id, "label": "no-such-label", "reviewer": "ops"},
        ):
            producer.send(daemon.topics.decisions, value=json.dumps(decision).encode())
        producer.flush(10)
        producer.close()
        worker = service.curator
        assert wait_for(lambda: worker.applied >= 1 and worker.rejected >= 1, 60), (
            worker.applied,
            worker.rejected,
        )
        result = service.runner.run("test_ops")
        assert result.outcome == "failed" and "file not found" in result.reason, result
        yield running
    finally:
        service.stop()
        endpoint.close()
        client.close()


def test_every_metric_the_rules_and_dashboard_use_is_exported(
    daemon: RunningDaemon, curator: RunningCurator
) -> None:
    exposition = daemon.scrape()
    curator_exposition = curator.scrape()
    exported = exported_series(exposition) | exported_series(curator_exposition)
    own = recorded_names() | BUILTIN_SERIES
    sources = [
        (f"alerts/recording rule {r.get('alert') or r.get('record')}", r["expr"])
        for r in load_rules()
    ]
    sources += [(f"dashboard panel {q.panel!r}", q.expr) for q in dashboard_queries()]
    missing = {
        source: sorted(names)
        for source, expr in sources
        if (names := metric_names(expr) - own - exported)
    }
    assert not missing, f"referenced but exported by neither predictor nor curator: {missing}"
    referenced = {n for _, expr in sources for n in metric_names(expr)} - own
    assert len({base_name(n) for n in referenced}) >= 20  # the check has something to check
    # the curator exports what LifecycleMetrics declares (nothing here was named by hand)
    assert lifecycle_metric_names() <= {base_name(n) for n in exported_series(curator_exposition)}

    # labelled series the panels and alerts group by are really there after traffic
    for sample in (
        'exemplar_events_total{outcome="dead_letter"}',
        "exemplar_model_info{",
        "exemplar_admission_ratio{predicted_label=",
        'exemplar_nearest_distance_ratio_bucket{le="1.0"',
    ):
        assert sample in exposition, sample
    decisions = sample_labels(curator_exposition, "exemplar_decisions_total")
    assert sorted((d["result"], d["action"]) for d in decisions) == [
        ("applied", "relabel"),
        ("rejected", "label"),
    ]
    runs = sample_labels(curator_exposition, "exemplar_finetune_runs_total")
    # every outcome is exported from the start (at 0), so increase() sees the first run
    assert sorted(r["outcome"] for r in runs) == ["failed", "promoted", "rejected"]
    assert 'exemplar_finetune_runs_total{outcome="failed"} 1.0' in curator_exposition
    serving = sample_labels(curator_exposition, "exemplar_serving_info")
    assert serving == [{"version": daemon.worker.predictor.version}]
    assert sample_labels(curator_exposition, "exemplar_finetune_duration_seconds_bucket")


def test_probe_paths_of_the_manifests_are_served(daemon: RunningDaemon) -> None:
    paths = {
        probe["httpGet"]["path"]
        for container in workload_containers()
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
        if (probe := container.get(kind))
    }
    assert paths == {"/healthz", "/readyz"}
    for path in sorted(paths):
        status, body = daemon.get(path)
        assert status == 200, (path, status, body)
        assert json.loads(body)["state"] == "running"
    assert daemon.get("/nothing-here")[0] == 404


# ------------------------------------------------------------------ (e) a real Prometheus
@dataclass
class RunningPrometheus:
    url: str

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as r:
            payload = json.loads(r.read())
        assert payload["status"] == "success", payload
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        try:
            data = self.api("query", query=expr)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{expr}\n-> {exc.code} {exc.read().decode()}") from None
        return list(data["result"]) if data["resultType"] == "vector" else [data["result"]]

    def scrapes(self) -> int:
        result = self.query(f'count_over_time(up{{job="{PREDICTOR_JOB}"}}[5m])')
        return int(float(result[0]["value"][1])) if result else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def prometheus(
    daemon: RunningDaemon, curator: RunningCurator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningPrometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "prometheus server not installed (Debian package 'prometheus'; .ci/run "
            "installs it when apt is reachable)"
        )
    work = tmp_path_factory.mktemp("prometheus")
    config = {
        # 1 s so the test sees several scrapes and rule evaluations within seconds
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in RULE_FILES],
        "scrape_configs": [
            {
                "job_name": PREDICTOR_JOB,
                "static_configs": [{"targets": [f"{daemon.endpoint.host}:{daemon.endpoint.port}"]}],
            },
            {
                "job_name": CURATOR_JOB,
                "static_configs": [
                    {"targets": [f"{curator.endpoint.host}:{curator.endpoint.port}"]}
                ],
            },
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (work / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = RunningPrometheus(f"http://127.0.0.1:{port}")

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        assert wait_for(ready, 30), (work / "prometheus.log").read_text()
        assert wait_for(lambda: server.scrapes() >= 2, 30), "no scrape of the daemon"
        curator_up = f'up{{job="{CURATOR_JOB}"}} == 1'
        assert wait_for(lambda: bool(server.query(curator_up)), 30), "no scrape of the curator"
        yield server
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def test_prometheus_scrapes_the_daemon_and_evaluates_every_rule(
    prometheus: RunningPrometheus,
) -> None:
    targets = prometheus.api("targets")["activeTargets"]
    health = sorted((t["labels"]["job"], t["health"]) for t in targets)
    assert health == [(CURATOR_JOB, "up"), (PREDICTOR_JOB, "up")], targets

    def all_evaluated() -> bool:
        groups = prometheus.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return len(rules) == len(load_rules()) and all(r["lastEvaluation"] > "2000" for r in rules)

    assert wait_for(all_evaluated, 20)
    for group in prometheus.api("rules")["groups"]:
        for rule in group["rules"]:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    # the recording rules produce series from the daemon's metrics (rates need two
    # scrapes inside an evaluation: wait for the next ones)
    for recorded in (
        "exemplar:admission_ratio_by_label:avg",
        "exemplar:nearest_beyond_tau:ratio30m",
        "exemplar:events:rate5m",
    ):
        assert wait_for(lambda r=recorded: bool(prometheus.query(r)), 10), recorded
    for rule in load_rules():
        prometheus.query(rule["expr"])  # parses and runs

    # The curator's run failed before the first scrape: its series starts at 1, which
    # increase() alone would not count; the recording rule does, and the alert fires.
    def runs() -> dict[str, float]:
        result = prometheus.query("exemplar:finetune_runs:increase24h")
        return {r["metric"]["outcome"]: float(r["value"][1]) for r in result}

    assert wait_for(lambda: runs() == {"failed": 1.0, "promoted": 0.0, "rejected": 0.0}, 10), runs()
    firing = 'ALERTS{alertname="ExemplarFinetuneFailing", alertstate="firing"}'
    assert wait_for(lambda: bool(prometheus.query(firing)), 10), "ExemplarFinetuneFailing"
    # predictor and curator serve the same version: no mismatch
    (mismatch,) = [r for r in alert_rules() if r["alert"] == "ExemplarPredictorVersionMismatch"]
    assert prometheus.query(f'exemplar_serving_info{{job="{CURATOR_JOB}"}}')
    assert prometheus.query(mismatch["expr"]) == []


def test_dashboard_queries_run_on_prometheus_and_show_the_traffic(
    daemon: RunningDaemon, prometheus: RunningPrometheus
) -> None:
    before = prometheus.scrapes()
    daemon.produce(good=16, malformed=1)  # traffic inside the rate windows
    assert wait_for(lambda: prometheus.scrapes() >= before + 2, 20)
    empty = []
    results: dict[str, list[dict[str, Any]]] = {}
    for query in dashboard_queries():
        result = prometheus.query(query.promql())  # every query parses and runs
        results.setdefault(query.panel, []).extend(result)
        if not result:
            empty.append(query.panel)
    # Panels about failures (retries, errors) have nothing to show on a healthy run,
    # and a fresh registry has no promotion yet.
    quiet = {"Retries by operation", "Errors by kind", "Since last promotion"}
    assert set(empty) <= quiet, f"panels without data after traffic: {sorted(set(empty))}"
    # the curator and the predictor serve the same version: nobody is off it
    off = results["Predictors off the curator's version"]
    assert [float(r["value"][1]) for r in off] == [0.0]
    by_process = {
        (r["metric"]["job"], r["metric"]["version"])
        for r in results["Model version: curator and predictors"]
    }
    serving = daemon.worker.predictor.version
    assert by_process == {(CURATOR_JOB, serving), (PREDICTOR_JOB, serving)}
    by_outcome = {
        r["metric"]["outcome"]: float(r["value"][1])
        for r in prometheus.query("sum by (outcome) (increase(exemplar_events_total[1m]))")
    }
    assert by_outcome.get("dead_letter", 0) > 0
    assert by_outcome.get("admitted", 0) + by_outcome.get("adjudication", 0) > 0
    # (the curator registers the predictor's metrics too: its exemplar_model_info has no version)
    version = prometheus.query(f'max by (version) (exemplar_model_info{{job="{PREDICTOR_JOB}"}})')
    assert version and version[0]["metric"]["version"] == daemon.worker.predictor.version


# ------------------------------------------------------------------ settings of a container
#: A split deployment: N predictors and one curator, on a store server and one registry.
SPLIT_ROLES = ("predictor", "curator")
#: The directory the image's bundle lies in (baked, or mounted); it seeds the registry.
IMAGE_BUNDLE = "/opt/exemplar/model"
_COMPOSE_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_]\w*)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> str:
    """A compose value as compose passes it on, every ``${VAR:-default}`` at its default."""

    def replace(match: re.Match[str]) -> str:
        return "$" if match.group(0) == "$$" else match.group(2) or ""

    return _COMPOSE_VARIABLE.sub(replace, str(value))


def image_env() -> dict[str, str]:
    """The exemplar settings (and BUNDLE_SOURCE) the image's ENV sets (deploy/Dockerfile)."""
    lines = [
        line
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    env: dict[str, str] = {}
    for instruction in "\n".join(lines).replace("\\\n", " ").splitlines():
        if instruction.startswith("ENV "):
            for token in instruction[4:].split():
                key, _, value = token.partition("=")
                env[key] = value
    return {k: v for k, v in env.items() if k.startswith("EXEMPLAR_") or k == "BUNDLE_SOURCE"}


def load_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> Settings:
    """``load_settings`` as the daemon runs it with exactly ``env`` as its environment;
    raises ``ConfigError`` where ``exemplar run`` would refuse to start."""
    with monkeypatch.context() as patch:
        for key in list(os.environ):
            if key.upper().startswith("EXEMPLAR_"):
                patch.delenv(key)
        for key, value in env.items():
            patch.setenv(key, value)
        return load_settings(**overrides)


def role_of(args: list[str], env: dict[str, str]) -> str:
    """The role ``exemplar run`` takes: ``--role`` on the command line, else EXEMPLAR_ROLE."""
    if "--role" in args:
        return args[args.index("--role") + 1]
    return env.get("EXEMPLAR_ROLE", "all")


def check_split_roles(settings: dict[str, Settings], where: str) -> None:
    """What a predictor and the curator must agree on (docs/lifelong.md, "Roles")."""
    assert set(settings) == set(SPLIT_ROLES), where
    for role, s in settings.items():
        assert s.role == role, where
        assert s.store.backend == "server" and s.store.url, f"{where} {role}: needs a store server"
    predictor, curator = settings["predictor"], settings["curator"]
    for name in ("store", "topics", "model_dir"):
        assert getattr(predictor, name) == getattr(curator, name), f"{where}: {name} differs"
    assert predictor.kafka.group_id == curator.kafka.group_id, where  # curator: <group>-curator
    assert predictor.curator.candidate_ratio == curator.curator.candidate_ratio, where


# ------------------------------------------------------------------ (c) compose
def compose_file() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    return {k: interpolate(v) for k, v in service.get("environment", {}).items()}


def exemplar_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The compose services that run the daemon (``exemplar run``)."""
    return {
        name: s
        for name, s in compose["services"].items()
        if s.get("build", {}).get("dockerfile") == "deploy/Dockerfile"
        and s.get("command", ["run"])[0] == "run"
    }


def volume_at(service: dict[str, Any], target: str) -> dict[str, Any]:
    found = [v for v in service.get("volumes", []) if isinstance(v, dict) and v["target"] == target]
    assert found, f"nothing mounted at {target}"
    return found[0]


def test_compose_file_describes_the_stack() -> None:
    compose = compose_file()
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["qdrant"]["image"].startswith("qdrant/qdrant:")
    assert {"prometheus", "grafana", "kafka-init", "model-init"} <= set(services)
    for name, service in services.items():
        if "image" in service:
            tag = service["image"].rsplit(":", 1)
            assert len(tag) == 2 and tag[1] not in {"latest", ""}, f"{name}: pin the image"
        # the whole stack starts with a plain `up`: no service hides behind a profile
        assert "profiles" not in service, name
    daemons = exemplar_services(compose)
    assert set(daemons) == set(SPLIT_ROLES)
    assert services["predictor"]["command"] == ["run", "--role", "predictor"]
    assert services["curator"]["command"] == ["run", "--role", "curator"]
    assert services["curator"]["deploy"]["replicas"] == 1
    assert "REQUIRES" not in COMPOSE.read_text()
    for name, service in daemons.items():
        env = compose_env(service)
        assert env["EXEMPLAR_METRICS__HOST"] == "0.0.0.0", name
        assert env["EXEMPLAR_ROLE"] == role_of(service["command"], env), name
        assert service["depends_on"]["kafka-init"]["condition"] == (
            "service_completed_successfully"
        )
    init = services["kafka-init"]
    assert init["image"] == services["kafka"]["image"]
    # every file compose bind-mounts from the repository exists
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":", 1)[0]
            if source.startswith(".") and "$" not in source:
                assert (DEPLOY / source).exists(), source


def test_compose_services_start_with_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each daemon's environment (image ENV + compose) passes the daemon's own checks:
    a split role without a store server would stop at start-up here."""
    compose = compose_file()
    settings = {}
    for name, service in exemplar_services(compose).items():
        env = {**image_env(), **compose_env(service)}
        role = role_of(service["command"], env)
        settings[role] = load_from(env, monkeypatch, role=role)
        url = urllib.parse.urlsplit(settings[role].store.url or "")
        assert url.hostname in compose["services"], f"{name}: {url.hostname} is no service"
        published = [p.rsplit(":", 2)[-1] for p in compose["services"][url.hostname]["ports"]]
        assert str(url.port) in published, f"{name}: qdrant does not serve on {url.port}"
        # the entrypoint copies BUNDLE_SOURCE over EXEMPLAR_MODEL_DIR unless it is empty:
        # that would replace the shared registry with a bundle
        assert env["BUNDLE_SOURCE"] == "", name
    check_split_roles(settings, "compose")
    # an operator's exemplar.env reaches both roles alike
    assert all(
        s["env_file"] == compose["services"]["predictor"]["env_file"]
        for s in exemplar_services(compose).values()
    )


def test_compose_roles_share_the_model_registry() -> None:
    compose = compose_file()
    services = compose["services"]
    mounts = {}
    for role in SPLIT_ROLES:
        model_dir = compose_env(services[role])["EXEMPLAR_MODEL_DIR"]
        mounts[role] = volume_at(services[role], model_dir)
        assert mounts[role]["type"] == "volume", f"{role}: the registry is a named volume"
    assert mounts["predictor"]["source"] == mounts["curator"]["source"]
    assert mounts["curator"]["source"] in compose["volumes"]
    assert mounts["predictor"].get("read_only") is True, "predictors only read the registry"
    assert not mounts["curator"].get("read_only"), "the curator writes the registry"

    seed = services["model-init"]
    seed_dir = compose_env(seed)["EXEMPLAR_MODEL_DIR"]
    seed_mount = volume_at(seed, seed_dir)
    assert seed_mount["source"] == mounts["curator"]["source"] and not seed_mount.get("read_only")
    bundle = volume_at(seed, IMAGE_BUNDLE)
    assert bundle["read_only"] is True and bundle["bind"]["create_host_path"] is False
    assert seed.get("restart") == "no"
    # the registry is seeded before the curator opens it, and the curator has published
    # the support set to Qdrant before a predictor (read-only registry) starts
    assert services["curator"]["depends_on"]["model-init"]["condition"] == (
        "service_completed_successfully"
    )
    assert services["predictor"]["depends_on"]["curator"]["condition"] == "service_healthy"


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None or run_tool(docker, "compose", "version").returncode != 0:
        pytest.skip("the docker CLI here has no compose plugin ('docker compose')")
    result = run_tool(docker, "compose", "-f", str(COMPOSE), "config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_env_example_names_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every variable exemplar.env.example offers is spelled right and, all of them
    uncommented, still lets both roles start."""
    example = dict(
        re.findall(r"^# (EXEMPLAR_\w+)=(.*)$", (DEPLOY / "exemplar.env.example").read_text(), re.M)
    )
    assert {"EXEMPLAR_CURATOR__CANDIDATE_RATIO", "EXEMPLAR_BATCH__FORWARD_SIZE"} <= set(example)
    assert set(example) <= known_variables()
    for role in SPLIT_ROLES:
        service = compose_file()["services"][role]
        env = {**image_env(), **example, **compose_env(service)}
        assert load_from(env, monkeypatch, role=role).role == role


# ------------------------------------------------------------------ Kubernetes
def k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").rglob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def workloads(docs: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    docs = k8s_documents() if docs is None else docs
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}


def workload_containers() -> list[dict[str, Any]]:
    return [c for d in workloads().values() for c in d["spec"]["template"]["spec"]["containers"]]


def container_env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """Image ENV, then the ConfigMaps of ``envFrom``, then ``env`` (Kubernetes' order)."""
    config_maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    env = image_env()
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def claim_mounted_at(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, bool]:
    """(claim name, read-only) of the PersistentVolumeClaim ``container`` mounts at ``path``."""
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    assert mounts, f"{container['name']}: nothing mounted at {path}"
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
    assert "persistentVolumeClaim" in volume, f"{container['name']}: {path} is not on a claim"
    claim = volume["persistentVolumeClaim"]
    return claim["claimName"], bool(mounts[0].get("readOnly") or claim.get("readOnly"))


def check_k8s_split_roles(docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every exemplar container starts with valid settings; predictors and curator share
    the store server and the registry claim (ReadWriteMany), only the curator writes it."""
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    settings: dict[str, Settings] = {}
    registry_claims: dict[str, tuple[str, bool]] = {}
    for deployment in workloads(docs).values():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            if container["image"].split(":")[0].rsplit("/", 1)[-1] != "exemplar":
                continue
            env = container_env(container, docs)
            args = container.get("args", [])
            if args[:1] != ["run"]:  # init containers: their settings load too
                load_from(env, monkeypatch)
                continue
            role = role_of(args, env)
            s = load_from(env, monkeypatch, role=role)
            settings[role] = s
            assert env["BUNDLE_SOURCE"] == "", (
                f"{role}: the entrypoint would copy over the registry"
            )
            registry_claims[role] = claim_mounted_at(pod, container, str(s.model_dir))
            if s.curator.state_dir is not None:  # the curator's state outlives the pod
                claim_mounted_at(pod, container, str(s.curator.state_dir))
    check_split_roles(settings, "kubernetes")
    claim, predictor_read_only = registry_claims["predictor"]
    assert registry_claims["curator"] == (claim, False), "the curator writes the registry"
    assert predictor_read_only, "predictors mount the registry read-only"
    assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"], "shared across nodes"
    assert workloads(docs)["exemplar-curator"]["spec"]["replicas"] == 1


def test_kubernetes_manifests_parse_and_agree_with_the_daemon() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (DEPLOY / resource).is_file(), resource
    # everything in k8s/ is deployed, save the Secret template and k8s/optional/
    assert set(kustomization["resources"]) == {
        f"k8s/{p.name}" for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "secret.example.yaml"
    }
    assert "REQUIRES" not in (DEPLOY / "kustomization.yaml").read_text()
    for generated in kustomization["configMapGenerator"]:
        for file in generated["files"]:
            assert (DEPLOY / file).is_file(), file
    docs = k8s_documents()
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert config["EXEMPLAR_METRICS__HOST"] == "0.0.0.0"
    port = int(config["EXEMPLAR_METRICS__PORT"])
    partitions = int(config["EXEMPLAR_TOPICS__PARTITIONS"])
    assert set(config) <= known_variables(), "every key is a setting the daemon knows"

    deployments = workloads()
    predictor, curator = deployments["exemplar-predictor"], deployments["exemplar-curator"]
    assert predictor["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "run",
        "--role",
        "predictor",
    ]
    assert curator["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "run",
        "--role",
        "curator",
    ]
    assert curator["spec"]["replicas"] == 1 and curator["spec"]["strategy"]["type"] == "Recreate"
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "exemplar-predictor"
    assert hpa["spec"]["maxReplicas"] == partitions, "replicas beyond the partitions idle"

    for deployment in deployments.values():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod.get("initContainers", []) + pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
        for container in pod["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["http"] == port
            assert {
                r["configMapRef"]["name"] for r in container["envFrom"] if "configMapRef" in r
            } == {"exemplar-config"}
            assert any(r.get("secretRef", {}).get("optional") for r in container["envFrom"])
            probes = {
                k: container[k]["httpGet"]
                for k in ("startupProbe", "livenessProbe", "readinessProbe")
            }
            assert probes["livenessProbe"]["path"] == "/healthz"
            assert probes["readinessProbe"]["path"] == "/readyz"
            assert all(p["port"] in ("http", port) for p in probes.values())
    job = next(d for d in docs if d["kind"] == "Job")
    assert (
        job["spec"]["template"]["spec"]["containers"][0]["image"]
        == (compose_file()["services"]["kafka"]["image"])
    )


def test_kubernetes_workloads_start_with_valid_settings_and_share_the_registry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check_k8s_split_roles(k8s_documents(), monkeypatch)


def test_kustomize_renders_the_whole_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    result = run_tool(kubectl, "kustomize", str(DEPLOY))
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    rendered = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {
        ("Deployment", "exemplar-predictor"),
        ("Deployment", "exemplar-curator"),
        ("PersistentVolumeClaim", "exemplar-registry"),
        ("Job", "exemplar-create-topics"),
    } <= rendered
    assert all(
        d["metadata"].get("namespace") == "exemplar" for d in docs if d["kind"] != "Namespace"
    )
    check_k8s_split_roles(docs, monkeypatch)


# ------------------------------------------------------------------ seeding and waiting
def seed_scripts() -> dict[str, str]:
    """The registry-seeding script of compose's model-init and of the curator's init
    container, as the shell receives each."""
    compose = compose_file()["services"]["model-init"]
    init = next(
        c
        for c in workloads()["exemplar-curator"]["spec"]["template"]["spec"]["initContainers"]
        if c["name"] == "init-registry"
    )
    assert compose["entrypoint"] == init["command"] == ["/bin/sh", "-ec"]
    return {"compose": interpolate(compose["command"][0]), "kubernetes": init["args"][0]}


def test_registry_seed_script_seeds_once_and_leaves_a_registry_alone(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from model.bundle import read_info
    from model.registry import Registry

    scripts = seed_scripts()
    assert scripts["compose"] == scripts["kubernetes"], "one script for both"
    assert IMAGE_BUNDLE in scripts["compose"]
    # a bundle as a read-only mount may present it: no write permission anywhere
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    for path in bundle.rglob("*"):
        path.chmod(0o555 if path.is_dir() else 0o444)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "exemplar", f'exec "{sys.executable}" -m daemon.cli "$@"\n')
    registry = tmp_path / "registry"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "EXEMPLAR_MODEL_DIR": str(registry),
    }
    script = scripts["compose"].replace(IMAGE_BUNDLE, str(bundle))

    def seed() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["/bin/sh", "-ec", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            cwd=tmp_path,
        )

    version = read_info(bundle).version
    first = seed()
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().endswith(f"serves {version}")
    assert Registry(registry).serving_version() == version
    # the curator opens the version's embedded store (to publish it) read-write
    for path in (registry / "versions").rglob("*"):
        assert path.stat().st_mode & stat.S_IWUSR, path

    _stub(bin_dir / "exemplar", "echo 'exemplar must not run again' >&2; exit 1\n")
    again = seed()
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().endswith(f"serves {version}")
    assert [e.version for e in Registry(registry).versions()] == [version]


def test_predictors_wait_for_the_published_support_set(tmp_path: Path) -> None:
    """The predictors' init container polls Qdrant's aliases until the curator has set
    the serving one (a refused or failing request, another alias: keep waiting)."""
    pod = workloads()["exemplar-predictor"]["spec"]["template"]["spec"]
    init = next(c for c in pod["initContainers"] if c["name"] == "wait-for-support-set")
    assert init["command"][:2] == ["python", "-c"]

    def aliases(name: str) -> dict[str, Any]:
        return {"result": {"aliases": [{"alias_name": name, "collection_name": "exemplar-v1"}]}}

    answers = [
        (503, {"status": {"error": "starting"}}),
        (200, aliases("other-serving")),
        (200, aliases("exemplar-serving")),
    ]
    seen: list[tuple[str, str | None]] = []

    class Qdrant(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("api-key")))
            status, body = answers[min(len(seen), len(answers)) - 1]
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Qdrant)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {
            "PATH": os.environ["PATH"],
            "EXEMPLAR_STORE__URL": f"http://127.0.0.1:{server.server_address[1]}/",
            "EXEMPLAR_STORE__API_KEY": "sesame",
        }
        result = subprocess.run(
            [sys.executable, "-c", init["command"][2]],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert seen == [("/aliases", "sesame")] * 3
    assert "exemplar-serving" in result.stdout


# ------------------------------------------------------------------ entrypoint and topics
def _stub(path: Path, script: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_entrypoint_copies_the_bundle_then_execs_exemplar(tmp_path: Path) -> None:
    source = tmp_path / "shipped"
    (source / "store").mkdir(parents=True)
    (source / "bundle.json").write_text('{"version": "v1"}')
    (source / "store" / "data").write_text("x")
    (source / "store" / "data").chmod(0o400)  # read-only, as a mounted bundle may be
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "exemplar", 'echo "exemplar $* model=$EXEMPLAR_MODEL_DIR"\n')
    target = tmp_path / "work" / "model"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "BUNDLE_SOURCE": str(source),
        "EXEMPLAR_MODEL_DIR": str(target),
    }
    entrypoint = str(DEPLOY / "docker-entrypoint.sh")

    result = subprocess.run(
        [entrypoint, "run"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"exemplar run model={target}"
    assert (target / "bundle.json").read_text() == '{"version": "v1"}'
    assert os.access(target / "store" / "data", os.W_OK)  # the private copy is writable

    (target / "store" / "data").write_text("human mapping")  # a restart keeps local changes
    assert (
        subprocess.run(
            [entrypoint, "run"], env=env, capture_output=True, timeout=30, check=False
        ).returncode
        == 0
    )
    assert (target / "store" / "data").read_text() == "human mapping"
    (source / "bundle.json").write_text('{"version": "v2"}')  # an upgrade replaces the copy
    assert (
        subprocess.run(
            [entrypoint, "run"], env=env, capture_output=True, timeout=30, check=False
        ).returncode
        == 0
    )
    assert (target / "bundle.json").read_text() == '{"version": "v2"}'
    assert (target / "store" / "data").read_text() == "x"

    (source / "bundle.json").unlink()
    result = subprocess.run(
        [entrypoint, "run"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2 and "no model bundle" in result.stderr
    # other commands (config, eval, ...) run without a bundle copy
    result = subprocess.run(
        [entrypoint, "config"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0 and result.stdout.startswith("exemplar config")


def test_entrypoint_uses_the_shared_registry_in_place(tmp_path: Path) -> None:
    """With the split roles' environment (compose and Kubernetes alike) the entrypoint
    execs the daemon on the registry as it is: no bundle copied over it."""
    registry = tmp_path / "registry"
    (registry / "versions" / "v1").mkdir(parents=True)
    (registry / "SERVING").write_text("v1\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "exemplar", 'echo "exemplar $*"\n')
    service = compose_file()["services"]["predictor"]
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        **{k: v for k, v in image_env().items() if k == "BUNDLE_SOURCE"},
        **{k: v for k, v in compose_env(service).items() if k == "BUNDLE_SOURCE"},
        "EXEMPLAR_MODEL_DIR": str(registry),
    }
    assert env["BUNDLE_SOURCE"] == ""
    result = subprocess.run(
        [str(DEPLOY / "docker-entrypoint.sh"), *service["command"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "exemplar run --role predictor"

    # a bundle source left set by mistake must not replace the registry
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "bundle.json").write_text('{"version": "v9"}')
    result = subprocess.run(
        [str(DEPLOY / "docker-entrypoint.sh"), *service["command"]],
        env={**env, "BUNDLE_SOURCE": str(shipped)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2 and "is a model registry" in result.stderr
    assert (registry / "SERVING").read_text() == "v1\n" and (registry / "versions" / "v1").is_dir()
    assert sorted(p.name for p in registry.iterdir()) == ["SERVING", "versions"]
    assert (registry / "SERVING").read_text() == "v1\n"


def run_create_topics(tmp_path: Path, **env: str) -> tuple[list[str], dict[str, str]]:
    """Run deploy/create-topics.sh against stand-ins for Kafka's tools; returns the
    tools' calls and the topics the script reports, role -> name. The topic named
    my.events exists with 2 partitions, any other with 4."""
    calls = tmp_path / "calls.log"
    _stub(
        tmp_path / "kafka-topics.sh",
        f"""echo "topics $*" >> {calls}
if [[ "$*" == *"--describe --topic my.events"* ]]; then
  echo "Topic: my.events	TopicId: x	PartitionCount: 2	ReplicationFactor: 1"
elif [[ "$*" == *--describe* ]]; then
  echo "Topic: t	TopicId: x	PartitionCount: 4	ReplicationFactor: 1"
fi
""",
    )
    _stub(tmp_path / "kafka-configs.sh", f'echo "configs $*" >> {calls}\n')
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EXEMPLAR_", "RETENTION_"))}
    result = subprocess.run(
        ["bash", str(DEPLOY / "create-topics.sh")],
        env={**base, "KAFKA_BIN": str(tmp_path), "WAIT_S": "5", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    reported = dict(re.findall(r"^create-topics: (\w+) (\S+) partitions=", result.stdout, re.M))
    return calls.read_text().splitlines(), reported


def test_create_topics_script_sets_partitions_and_retention(tmp_path: Path) -> None:
    log, reported = run_create_topics(
        tmp_path,
        BOOTSTRAP_SERVERS="broker:9092",
        EXEMPLAR_TOPICS__PARTITIONS="4",
        EXEMPLAR_TOPICS__INPUT="my.events",
        RETENTION_DEAD_LETTER_MS="1000",
    )
    # every topic the daemon uses, under its role's name: a topic added to
    # TopicsConfig and forgotten here fails
    expected = {**TopicsConfig().by_role(), "input": "my.events"}
    assert reported == expected
    creates = {line.split("--topic ")[1].split()[0]: line for line in log if "--create" in line}
    assert set(creates) == set(expected.values())
    assert all("--bootstrap-server broker:9092" in line for line in log)
    assert "--partitions 4" in creates["my.events"]
    assert "retention.ms=604800000" in creates["my.events"]  # a week
    assert "--partitions 1" in creates["exemplar.models"]
    assert "retention.ms=-1" in creates["exemplar.decisions"]  # the audit trail stays
    assert "retention.ms=1000" in creates["exemplar.dlq"]
    # the predictors' hand-off to the curator: as wide as the input, outlives an outage
    lifecycle = creates[expected["lifecycle"]]
    assert "--partitions 4" in lifecycle and "retention.ms=604800000" in lifecycle
    retention = [line for line in log if line.startswith("configs") and "my.events" in line]
    assert retention and "--add-config retention.ms=604800000" in retention[0]
    grow = [line for line in log if "--alter --topic" in line]
    assert grow == [
        "topics --bootstrap-server broker:9092 --alter --topic my.events --partitions 4"
    ]


def test_create_topics_script_takes_every_name_and_retention_from_the_environment(
    tmp_path: Path,
) -> None:
    roles = TopicsConfig().by_role()
    names = {role: f"site.{role}" for role in roles}
    env = {f"EXEMPLAR_TOPICS__{role.upper()}": name for role, name in names.items()}
    env.update({f"RETENTION_{role.upper()}_MS": str(1000 + i) for i, role in enumerate(roles)})
    log, reported = run_create_topics(tmp_path, **env)
    assert reported == names
    for i, (role, name) in enumerate(names.items()):
        create = next(line for line in log if "--create" in line and f"--topic {name} " in line)
        assert f"retention.ms={1000 + i}" in create, role
    # the variables are the daemon's own: the same environment configures its topics
    assert TopicsConfig(**names).by_role() == names


def test_dockerfile_builds_a_cpu_non_root_image() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in dockerfile
    assert re.search(r"^USER \$\{UID\}:\$\{UID\}$", dockerfile, re.M)
    assert "ARG UID=10001" in dockerfile
    for setting in ("HF_HUB_OFFLINE=1", "EXEMPLAR_METRICS__HOST=0.0.0.0"):
        assert setting in dockerfile
    stages = re.findall(r"^FROM \S+ AS (\w+)$", dockerfile, re.M)
    assert stages[-1] == "runtime" and "baked" in stages
    entrypoint = DEPLOY / "docker-entrypoint.sh"
    assert os.access(entrypoint, os.X_OK)
    assert subprocess.run(["sh", "-n", str(entrypoint)], check=False).returncode == 0


# ------------------------------------------------------------------ (d) real Kafka and Qdrant
def docker_engine_available() -> bool:
    """Whether a Docker engine answers (DOCKER_HOST, or the default local socket)."""
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    import docker

    # A refused connection leaves the docker client's socket to the garbage collector;
    # collect it here, where its ResourceWarning is expected, not in a later test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env()
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False
        finally:
            gc.collect()


@pytest.mark.docker
def test_daemon_against_apache_kafka_and_a_qdrant_server(tiny_bundle: Path, tmp_path: Path) -> None:
    if not docker_engine_available():
        pytest.skip("no Docker engine")
    from testcontainers.community.qdrant import QdrantContainer
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.wait_strategies import LogMessageWaitStrategy

    from model.predictor import Predictor
    from model.store.server import ServerStore

    images = {
        name: s["image"]
        for name, s in compose_file()["services"].items()
        if name in ("kafka", "qdrant")
    }
    port = free_port()  # advertised to clients, so fixed before the broker starts
    kafka = (
        DockerContainer(images["kafka"])
        .with_bind_ports(9092, port)
        .with_envs(
            CLUSTER_ID="nD6c57NiSQOLxAauNbQ1jw",
            KAFKA_NODE_ID="1",
            KAFKA_PROCESS_ROLES="broker,controller",
            KAFKA_LISTENERS="PLAINTEXT://:9092,CONTROLLER://:9093",
            KAFKA_ADVERTISED_LISTENERS=f"PLAINTEXT://localhost:{port}",
            KAFKA_CONTROLLER_LISTENER_NAMES="CONTROLLER",
            KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            KAFKA_CONTROLLER_QUORUM_VOTERS="1@localhost:9093",
            KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1",
            KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
            KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1",
            KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS="0",
        )
        .waiting_for(LogMessageWaitStrategy("Kafka Server started"))
    )
    with kafka, QdrantContainer(images["qdrant"]) as qdrant:
        bootstrap = f"localhost:{port}"
        suffix = uuid.uuid4().hex[:8]
        topics = TopicsConfig(
            partitions=2,
            **{role: f"tc-{suffix}-{role.replace('_', '-')}" for role in TopicsConfig().by_role()},
        )
        # a real broker's group.min.session.timeout.ms is 6 s: default client timings
        settings = Settings(
            model_dir=tiny_bundle,
            kafka=KafkaConfig(bootstrap_servers=bootstrap, group_id=f"tc-{suffix}"),
            topics=topics,
            batch={"max_size": 16, "max_wait_ms": 100},
            metrics={"port": 0},
        )
        loaded = load(settings, str(copy_bundle(tiny_bundle, tmp_path / "bundle")), 16)
        url = f"http://{qdrant.get_container_host_ip()}:{qdrant.get_exposed_port(6333)}"
        store = ServerStore(f"exemplar-{suffix}", dim=loaded.store.dim, url=url)
        store.upsert(list(loaded.store.iter_exemplars(with_vectors=True)))
        predictor = Predictor(
            loaded.bundle.network,
            loaded.bundle.tokenizer,
            store,
            loaded.predictor.thresholds,
            loaded.predictor.version,
            16,
        )
        metrics = DaemonMetrics.create(CollectorRegistry())
        health = Health()
        endpoint = HttpEndpoint("127.0.0.1", 0, metrics.registry, health)
        worker = PredictorWorker(
            settings,
            predictor,
            metrics,
            health=health,
            backoff=Backoff(initial_s=0.2, maximum_s=2.0),
        )
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        running = RunningDaemon(worker, endpoint, bootstrap, topics)
        try:
            assert wait_for(lambda: worker.state == RunState.RUNNING, 120), worker.state
            running.produce(good=20, malformed=1)
            assert worker.totals.dead_letter == 1
            assert worker.totals.admitted + worker.totals.adjudication == 20
            exposition = running.scrape()
            assert f"exemplar_support_set_size {float(store.count())}" in exposition
            assert running.get("/readyz")[0] == 200
        finally:
            worker.request_stop()
            thread.join(60)
            endpoint.close()
            store.close()
            loaded.close()
