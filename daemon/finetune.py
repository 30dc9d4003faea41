"""Scheduled fine-tuning: trigger check, a killable training job, shadow check, promotion.

::

    APScheduler (interval + optional cron) -> TriggerPolicy.due()  counts met?
      -> FinetuneRunner.run()
           1. snapshot (under the serving lock): the support set (texts, labels, sources),
              pending candidates, the audit position, the calibration rows
           2. child process ``python -m daemon.finetune SPEC``: build_bundle() into a
              staging directory of the registry (train, re-embed the support set into a
              new store, recalibrate) and measure the new version on the calibration rows
           3. measure the serving version on the same rows, the same way
           4. not worse on ``promote_metric`` (within ``tolerance``)?
                no  -> register as rejected (reason recorded, store dropped)
                yes -> register, replay decisions made since the snapshot onto it,
                       flip SERVING, hot-swap in process, announce on exemplar.models

The job runs in a child process, so it can be killed at any point: a failed, killed or
timed-out child leaves only a staging directory (removed at the next run) and the
serving version untouched. Human mappings survive a new version: they are in the
support set the job trains on and re-embeds, and decisions made while it ran are
replayed onto it before the flip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from daemon.config import CuratorConfig, Settings
from daemon.metrics import LifecycleMetrics
from daemon.serving import ServingModel, ServingVersion
from daemon.state import AuditEntry, LifecycleState
from daemon.stores import point_serving_alias
from model.admission import CalibrationStats, Thresholds, calibrate, decide
from model.build import Origin, calibration_rows
from model.data import Example, read_examples, write_jsonl
from model.errors import DataError, ExemplarError
from model.predictor import Predictor
from model.registry import Registry
from model.store.base import ExemplarStore

log = structlog.get_logger(__name__)

PROMOTED, REJECTED, FAILED = "promoted", "rejected", "failed"
_JOBS_DIR = "jobs"


# ---------------------------------------------------------------- shadow evaluation
def calib_metrics(
    predictor: Predictor, rows: Sequence[Example], thresholds: Thresholds
) -> dict[str, float]:
    """Coverage at alpha and accuracy of one version on labelled rows.

    The thresholds are recalibrated on ``rows`` for ``thresholds.alpha`` (the same
    procedure for every version), then the full admission rule, human mappings
    included, decides every row.
    """
    texts = [r.text for r in rows]
    gold = [str(r.label) for r in rows]
    fwd = predictor.forward(texts, explain=False)
    neighbors = predictor.store.search(fwd.exemplars, thresholds.k)
    top2 = np.sort(fwd.probs, axis=1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    predicted = [predictor.labels[int(i)] for i in fwd.probs.argmax(axis=1)]
    stats = CalibrationStats.build(predicted, gold, margins.tolist(), neighbors)
    t = calibrate(
        stats,
        predictor.labels,
        thresholds.alpha,
        thresholds.k,
        thresholds.near_duplicate,
        thresholds.confidence,
    )
    admitted = correct = 0
    for label, margin, near, truth in zip(predicted, margins, neighbors, gold, strict=True):
        verdict = decide(label, float(margin), near, t)
        if verdict.admitted:
            admitted += 1
            correct += verdict.label == truth
    n = max(len(rows), 1)
    return {
        "coverage_at_alpha": admitted / n,
        "admitted_accuracy": correct / admitted if admitted else 0.0,
        "accuracy": float(np.mean([p == g for p, g in zip(predicted, gold, strict=True)]))
        if rows
        else 0.0,
        "rows": float(len(rows)),
    }


# ---------------------------------------------------------------- the job spec
@dataclass
class JobSpec:
    """Everything the child process needs, as JSON in the job directory."""

    job_dir: str
    out_dir: str
    base_bundle: str
    alpha: float
    k: int
    confidence: float
    train_options: dict[str, Any] = field(default_factory=dict)
    #: how the new version's support set is indexed (``EXEMPLAR_STORE__*``)
    index: dict[str, Any] = field(default_factory=dict)
    #: test-only fault injection: seconds to sleep once training is done, before the
    #: new store is written (lets a test kill the job midway)
    fault_delay_s: float = 0.0

    @property
    def train_path(self) -> Path:
        return Path(self.job_dir) / "train.jsonl"

    @property
    def calib_path(self) -> Path:
        return Path(self.job_dir) / "calib.jsonl"

    @property
    def origins_path(self) -> Path:
        return Path(self.job_dir) / "origins.json"

    @property
    def result_path(self) -> Path:
        return Path(self.job_dir) / "result.json"

    @property
    def progress_path(self) -> Path:
        return Path(self.job_dir) / "progress"

    def write(self) -> Path:
        path = Path(self.job_dir) / "spec.json"
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: Path) -> JobSpec:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def training_rows(
    store: ExemplarStore, candidates: Sequence[Any]
) -> tuple[list[Example], dict[str, Origin]]:
    """The support set (every source, humans' labels as truth) plus accepted candidates."""
    rows: list[Example] = []
    origins: dict[str, Origin] = {}
    missing_text = 0
    for ex in store.iter_exemplars():
        if ex.text is None:
            missing_text += 1
            continue
        rows.append(Example(ex.id, ex.text, ex.label))
        if ex.source != "train":
            origins[ex.id] = Origin(ex.source, dict(ex.meta))
    if missing_text:
        raise DataError(
            f"{missing_text} support exemplars have no stored text, so the set "
            "cannot be retrained on; rebuild the model without --no-store-text"
        )
    seen = {r.id for r in rows}
    for c in candidates:
        if c.id in seen:
            continue
        rows.append(Example(c.id, c.text, c.label))
        origins[c.id] = Origin(
            "candidate", {"nearest_id": c.nearest_id, "distance": c.distance, "ratio": c.ratio}
        )
    return rows, origins


# ---------------------------------------------------------------- the child process
def _child(spec_path: Path) -> int:
    """Train, re-embed, recalibrate into ``spec.out_dir``; write metrics to result.json."""
    from daemon.curator import refresh_human_vectors
    from model.build import BuildOptions, build_bundle
    from model.bundle import load_bundle, read_info
    from model.store.base import IndexSettings
    from model.store.edge import EdgeStore
    from model.train import TrainOptions

    spec = JobSpec.read(spec_path)

    def progress(message: str) -> None:
        with spec.progress_path.open("a", encoding="utf-8") as fh:
            fh.write(message + "\n")
        if spec.fault_delay_s and message.startswith("embedding"):
            time.sleep(spec.fault_delay_s)

    progress("loading")
    train = read_examples(spec.train_path, require_labels=True)
    calib = read_examples(spec.calib_path, require_labels=True)
    origins = {
        k: Origin(v["source"], v.get("meta", {}))
        for k, v in json.loads(spec.origins_path.read_text(encoding="utf-8")).items()
    }
    base = read_info(Path(spec.base_bundle))
    known = set(TrainOptions.__dataclass_fields__)
    options = BuildOptions(
        alpha=spec.alpha,
        k=spec.k,
        confidence=spec.confidence,
        index=IndexSettings(**spec.index),
        network=base.network,
        train=TrainOptions(
            **{k: v for k, v in spec.train_options.items() if k in known}, progress=False
        ),
    )
    progress("training")
    out = Path(spec.out_dir)
    build_bundle(train, out, calib, options, say=progress, origins=origins)
    progress("evaluating")
    bundle = load_bundle(out)
    with EdgeStore(bundle.store_path) as store:
        predictor = Predictor(
            bundle.network, bundle.tokenizer, store, bundle.thresholds, bundle.info.version
        )
        humans = refresh_human_vectors(predictor, store)
        progress(f"re-embedded {humans} human mappings on the live path")
        metrics = calib_metrics(predictor, calib, bundle.thresholds)
    spec.result_path.write_text(
        json.dumps({"version": bundle.info.version, "metrics": metrics}) + "\n", encoding="utf-8"
    )
    progress("done")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m daemon.finetune SPEC``: the job's child process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m daemon.finetune SPEC.json", file=sys.stderr)
        return 2
    try:
        return _child(Path(args[0]))
    except ExemplarError as exc:
        print(f"fine-tune job: error: {exc}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------- the parent side
@dataclass(frozen=True)
class RunResult:
    outcome: str  # promoted | rejected | failed
    reason: str
    version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0


class TriggerPolicy:
    """Whether a fine-tune is due: counts met, and not too soon after the last run."""

    def __init__(self, state: LifecycleState, config: CuratorConfig) -> None:
        self.state = state
        self.config = config

    def due(self, now: float | None = None) -> str | None:
        """The reason to run now, or ``None``."""
        now = time.time() if now is None else now
        last = self.state.get("finetune_started_at")
        if last is not None and now - float(last) < self.config.min_interval_s:
            return None
        candidates = self.state.count_candidates(self.config.candidate_ratio)
        if candidates >= self.config.min_candidates:
            return f"{candidates} candidates >= {self.config.min_candidates}"
        since = int(self.state.get("finetune_audit_seq") or 0)
        decisions = self.state.count_decisions_since(since)
        if decisions >= self.config.min_decisions:
            return f"{decisions} decisions >= {self.config.min_decisions}"
        return None


def replay(entries: Sequence[AuditEntry], version: ServingVersion) -> int:
    """Apply audit entries (decisions made after a job's snapshot) to a new version."""
    from daemon.curator import add_mapping, relabel_as_human

    applied = 0
    for e in entries:
        meta = {"reviewer": e.reviewer, "decided_at": e.decided_at or e.at}
        if e.action == "add" and e.text is not None and e.new_label is not None:
            add_mapping(
                version.predictor,
                version.store,
                e.target_id,
                e.text,
                e.new_label,
                {**meta, "event_id": e.target_id},
            )
        elif e.action == "relabel" and e.new_label is not None:
            existing = version.store.get([e.target_id])[0]
            if existing is None:
                log.warning("replay_target_missing", id=e.target_id)
                continue
            relabel_as_human(
                version.predictor,
                version.store,
                existing,
                e.new_label,
                {**meta, "previous_source": existing.source},
            )
        elif e.action == "delete":
            version.store.delete([e.target_id])
        else:
            continue
        applied += 1
    return applied


class FinetuneRunner:
    """Runs one fine-tune at a time and decides what becomes of its result."""

    def __init__(
        self,
        settings: Settings,
        serving: ServingModel,
        state: LifecycleState,
        metrics: LifecycleMetrics,
        announce: Callable[[str, str | None, dict[str, float]], None] | None = None,
        stop: threading.Event | None = None,
        row_transform: Callable[[list[Example]], list[Example]] | None = None,
        fault_delay_s: float = 0.0,
    ) -> None:
        """``row_transform`` edits the training rows before the job (tests corrupt labels
        with it); ``fault_delay_s`` pauses the child midway (tests kill it there)."""
        if serving.registry is None:
            raise ExemplarError(
                "fine-tuning needs a model registry, not a plain bundle; "
                "create one with `exemplar models init`"
            )
        self.registry: Registry = serving.registry
        self.settings = settings
        self.config = settings.curator
        self.serving = serving
        self.state = state
        self.metrics = metrics
        self.announce = announce
        self.stop = stop or threading.Event()
        self.row_transform = row_transform
        self.fault_delay_s = fault_delay_s
        self._run_lock = threading.Lock()
        self.process: subprocess.Popen[bytes] | None = None
        self.last_job_dir: Path | None = None

    def run_if_due(self, trigger: str) -> RunResult | None:
        """The scheduler's entry point: run when the policy says so (and none runs)."""
        reason = TriggerPolicy(self.state, self.config).due()
        if reason is None:
            return None
        return self.run(f"{trigger}: {reason}")

    def run(self, trigger: str) -> RunResult:
        if not self._run_lock.acquire(blocking=False):
            return RunResult(FAILED, "another fine-tune is running")
        started = time.time()
        try:
            result = self._run(trigger, started)
        except ExemplarError as exc:
            result = RunResult(FAILED, str(exc))
        finally:
            self._run_lock.release()
        result = RunResult(
            result.outcome, result.reason, result.version, result.metrics, time.time() - started
        )
        self.metrics.finetune_runs.labels(result.outcome).inc()
        self.metrics.finetune_duration.observe(result.duration_s)
        log.info(
            "finetune_finished",
            outcome=result.outcome,
            reason=result.reason,
            version=result.version,
            duration_s=round(result.duration_s, 2),
        )
        return result

    def apply_promotion_request(self) -> RunResult | None:
        """Serve the version ``exemplar models promote`` asked for, if it asked.

        Every decision in the audit trail is replayed onto that version first (a
        rollback target predates the newer ones), then it is promoted like a fine-tuned
        one. The outcome goes to the version's lifecycle record and the log."""
        request = self.registry.promotion_request()
        if request is None:
            return None
        if not self._run_lock.acquire(blocking=False):
            return None  # a fine-tune is running: the request waits for it
        version = request.get("version", "")
        reason = f"requested by {request.get('requested_by', '?')}: {request.get('reason', '')}"
        try:
            if version == self.serving.current.version:
                result = RunResult(PROMOTED, "already serving", version)
            else:
                self._promote(version, 0, [], reason.strip(), {})
                result = RunResult(PROMOTED, reason, version)
        except ExemplarError as exc:
            result = RunResult(FAILED, f"cannot promote {version!r}: {exc}", version)
            try:
                if self.registry.path_of(version).is_dir():
                    self.registry.update_lifecycle(
                        version, {"promotion_failed": str(exc), "failed_at": time.time()}
                    )
            except ExemplarError:
                pass  # not a version name at all: the log says so
        finally:
            self.registry.clear_promotion_request()
            self._run_lock.release()
        log.info("promotion_request", outcome=result.outcome, version=version, reason=result.reason)
        return result

    # ------------------------------------------------------------ steps
    def _calibration_rows(self, version: ServingVersion) -> list[Example]:
        if self.config.calib_path is not None:
            return read_examples(self.config.calib_path, require_labels=True)
        return calibration_rows(version.path)

    def _run(self, trigger: str, started: float) -> RunResult:
        # Recorded first: a run that fails at any step still waits min_interval_s.
        self.state.put("finetune_started_at", str(started))
        self.registry.clean_staging()
        with self.serving.lock:  # no decision may land between the snapshot and its seq
            snapshot = self.serving.current
            audit_seq = self.state.last_audit_seq()
            candidates = self.state.candidates(self.config.candidate_ratio)
            rows, origins = training_rows(snapshot.store, candidates)
        run_id = self.state.start_run(trigger, snapshot.version, audit_seq)
        self.state.put("finetune_audit_seq", str(audit_seq))
        log.info(
            "finetune_started",
            trigger=trigger,
            rows=len(rows),
            candidates=len(candidates),
            serving=snapshot.version,
        )
        try:
            calib = self._calibration_rows(snapshot)
            if self.row_transform is not None:
                rows = self.row_transform(rows)
            result = self._train_and_decide(snapshot, rows, origins, calib, candidates, audit_seq)
        except (ExemplarError, OSError, ValueError, KeyError) as exc:
            log.exception("finetune_error")
            result = RunResult(FAILED, f"{type(exc).__name__}: {exc}")
        self.state.finish_run(run_id, result.outcome, result.reason, result.version, result.metrics)
        return result

    def _train_and_decide(
        self,
        snapshot: ServingVersion,
        rows: list[Example],
        origins: dict[str, Origin],
        calib: list[Example],
        candidates: Sequence[Any],
        audit_seq: int,
    ) -> RunResult:
        job_dir = self.registry.state_dir / _JOBS_DIR / f"job-{int(time.time() * 1000)}"
        job_dir.mkdir(parents=True)
        self.last_job_dir = job_dir
        staging = self.registry.new_staging()
        t = snapshot.predictor.thresholds
        options = dict(snapshot.bundle.info.training.get("options", {}))
        if self.config.max_epochs is not None:
            options["max_epochs"] = self.config.max_epochs
        spec = JobSpec(
            job_dir=str(job_dir),
            out_dir=str(staging),
            base_bundle=str(snapshot.path),
            alpha=t.alpha,
            k=t.k,
            confidence=t.confidence,
            train_options=options,
            index=asdict(self.settings.store.index_settings()),
            fault_delay_s=self.fault_delay_s,
        )
        write_jsonl(spec.train_path, rows)
        write_jsonl(spec.calib_path, calib)
        spec.origins_path.write_text(
            json.dumps({k: {"source": o.source, "meta": dict(o.meta)} for k, o in origins.items()}),
            encoding="utf-8",
        )
        failure = self._run_child(spec.write(), job_dir)
        if failure is not None:
            self.registry.clean_staging()
            return RunResult(FAILED, failure)
        result = json.loads(spec.result_path.read_text(encoding="utf-8"))
        new_metrics: dict[str, float] = result["metrics"]
        serving_metrics = calib_metrics(snapshot.predictor, calib, t)
        metric, tol = self.config.promote_metric, self.config.tolerance
        new, old = new_metrics[metric], serving_metrics[metric]
        shadow = {
            "new": new_metrics,
            "serving": serving_metrics,
            "metric": metric,
            "tolerance": tol,
            "serving_version": snapshot.version,
            "training_rows": len(rows),
            "candidates": len(candidates),
        }
        summary = {f"new_{k}": v for k, v in new_metrics.items()}
        summary.update({f"serving_{k}": v for k, v in serving_metrics.items()})
        if new < old - tol:
            reason = (
                f"{metric} {new:.4f} is worse than the serving version's {old:.4f} "
                f"(tolerance {tol})"
            )
            version = self.registry.commit_staging(
                staging,
                {"status": REJECTED, "reason": reason, "shadow": shadow, "decided_at": time.time()},
            )
            self.registry.drop_store(version)
            return RunResult(REJECTED, reason, version, summary)
        version = self.registry.commit_staging(
            staging, {"status": "registered", "shadow": shadow, "decided_at": time.time()}
        )
        reason = f"{metric} {new:.4f} >= serving {old:.4f} - {tol}"
        self._promote(version, audit_seq, [c.id for c in candidates], reason, new_metrics)
        return RunResult(PROMOTED, reason, version, summary)

    def _run_child(self, spec_path: Path, job_dir: Path) -> str | None:
        """Run the job; ``None`` on success, else why it failed. Killable at any point."""
        stderr_path = job_dir / "stderr.log"
        with stderr_path.open("wb") as err:
            self.process = subprocess.Popen(  # noqa: S603 - our own module, no shell
                [sys.executable, "-m", "daemon.finetune", str(spec_path)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + self.config.job_timeout_s
        proc = self.process
        try:
            while proc.poll() is None:
                if self.stop.wait(0.2):
                    proc.kill()
                    proc.wait()
                    return "stopped: the service is shutting down"
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    return f"timed out after {self.config.job_timeout_s:.0f} s"
        finally:
            self.process = None
        if proc.returncode == 0:
            return None
        if proc.returncode < 0:
            return f"job killed by {signal.Signals(-proc.returncode).name}"
        tail = stderr_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return f"job exited with {proc.returncode}: {tail[-1] if tail else 'no output'}"

    def _promote(
        self,
        version: str,
        audit_seq: int,
        candidate_ids: list[str],
        reason: str,
        metrics: dict[str, float],
    ) -> None:
        new = self.serving.open_version(self.registry.path_of(version))
        try:
            with self.serving.lock:
                replayed = replay(self.state.audit(after_seq=audit_seq), new)
                # The alias first: if it cannot flip, nothing changed. The SERVING
                # pointer, which predictors follow, flips last; should that write fail,
                # the alias goes back.
                config = self.serving.settings.store
                old_alias = point_serving_alias(config, new.store)
                try:
                    previous = self.registry.promote(version)
                except BaseException:
                    if old_alias is not None:
                        point_serving_alias(config, self.serving.current.store)
                    raise
                self.serving.swap(new)
        except BaseException:
            if self.serving.current is not new:
                new.store.close()
            raise
        now = time.time()
        if previous is not None and previous != version:
            self.registry.update_lifecycle(
                previous, {"status": "retired", "retired_at": now, "replaced_by": version}
            )
        self.registry.update_lifecycle(
            version,
            {
                "status": PROMOTED,
                "reason": reason,
                "promoted_at": now,
                "replayed_decisions": replayed,
            },
        )
        self.state.mark_candidates_used(candidate_ids, version)
        self.state.put("last_promotion_at", str(now))
        self.metrics.last_promotion.set(now)
        self.metrics.serving_version.info({"version": version})
        log.info("model_promoted", version=version, previous=previous, replayed=replayed)
        if self.announce is not None:
            self.announce(version, previous, metrics)


class FinetuneScheduler:
    """APScheduler 3 background scheduler: interval check, plus cron when configured."""

    def __init__(self, runner: FinetuneRunner, config: CuratorConfig) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        self.runner = runner
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.results: list[RunResult] = []
        self.scheduler.add_job(
            self._check,
            IntervalTrigger(seconds=config.check_interval_s, timezone="UTC"),
            args=["interval"],
            id="finetune-interval",
            max_instances=1,
            coalesce=True,
        )
        if config.cron:
            self.scheduler.add_job(
                self._check,
                CronTrigger.from_crontab(config.cron, timezone="UTC"),
                args=["cron"],
                id="finetune-cron",
                max_instances=1,
                coalesce=True,
            )

    def _check(self, trigger: str) -> None:
        try:
            result = self.runner.run_if_due(trigger)
        except ExemplarError as exc:  # a broken state file must not kill the scheduler
            log.error("finetune_check_failed", error=str(exc))
            return
        if result is not None:
            self.results.append(result)

    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self) -> None:
        self.runner.stop.set()  # kills a running job; the serving version stays
        self.scheduler.shutdown(wait=True)


if __name__ == "__main__":
    raise SystemExit(main())
