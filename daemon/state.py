"""The curator's persistent state: one sqlite3 file (WAL mode) next to the model registry.

Tables:

* ``pending``    events the predictor routed to humans (id, text, its prediction), so a
                 decision that names only the event id can become a support exemplar;
                 written in the predictor's batch *before* the adjudication request is
                 produced, so a decision can never arrive before its row.
* ``candidates`` admitted events whose nearest exemplar lay close (distance / tau under
                 the configured ratio): pseudo-labelled rows for the next fine-tune,
                 counted per nearest exemplar and per label.
* ``audit``      every change a human made (who, when, old -> new, source event), in
                 order; listed by ``exemplar audit``; replayed onto a version promoted
                 while decisions kept arriving.
* ``runs``       fine-tune runs: trigger, outcome, reason, metrics, duration.
* ``kv``         small facts (last promotion time, ...).

Nothing is pickled; vectors are not kept (the curator re-embeds texts with the network
that serves at decision time, so a vector always lives in the serving model's space).
Writes of one batch are one transaction; re-delivered records replace their rows (ids
are primary keys), so at-least-once delivery never double counts.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from model.errors import ExemplarError

STATE_FILE = "lifecycle.sqlite3"
_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    id TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    predicted_label TEXT NOT NULL,
    reasons TEXT NOT NULL,
    model_version TEXT NOT NULL,
    created_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'open'
);
CREATE INDEX IF NOT EXISTS pending_created ON pending(created_at);
CREATE TABLE IF NOT EXISTS candidates (
    id TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    label TEXT NOT NULL,
    nearest_id TEXT NOT NULL,
    nearest_label TEXT NOT NULL,
    distance REAL NOT NULL,
    ratio REAL NOT NULL,
    model_version TEXT NOT NULL,
    created_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending'
);
CREATE INDEX IF NOT EXISTS candidates_status ON candidates(status);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    decided_at TEXT,
    reviewer TEXT NOT NULL,
    action TEXT NOT NULL,
    target_id TEXT NOT NULL,
    source_event TEXT,
    old_label TEXT,
    new_label TEXT,
    old_source TEXT,
    new_source TEXT,
    note TEXT,
    text TEXT,
    model_version TEXT NOT NULL,
    decision_ref TEXT UNIQUE
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,
    finished_at REAL,
    trigger TEXT NOT NULL,
    outcome TEXT,
    reason TEXT,
    version TEXT,
    serving_version TEXT,
    metrics TEXT,
    audit_seq INTEGER
);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StateError(ExemplarError):
    """The lifecycle state file cannot be opened or written."""


def _iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if ts is None else ts, UTC).isoformat(
        timespec="seconds"
    )


@dataclass(frozen=True)
class PendingEvent:
    """An adjudicated event awaiting (or past) a human decision."""

    id: str
    text: str
    predicted_label: str
    reasons: tuple[str, ...]
    model_version: str
    created_at: float
    status: str


@dataclass(frozen=True)
class Candidate:
    """An admitted event that landed close to an existing exemplar."""

    id: str
    text: str
    label: str
    nearest_id: str
    nearest_label: str
    distance: float
    ratio: float
    model_version: str


@dataclass(frozen=True)
class AuditEntry:
    """One change to the support set, as ``exemplar audit`` shows it."""

    seq: int
    at: str
    decided_at: str | None
    reviewer: str
    action: str  # add | relabel | discard | delete
    target_id: str
    source_event: str | None
    old_label: str | None
    new_label: str | None
    old_source: str | None
    new_source: str | None
    note: str | None
    text: str | None
    model_version: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class RunRecord:
    id: int
    started_at: float
    finished_at: float | None
    trigger: str
    outcome: str | None
    reason: str | None
    version: str | None
    serving_version: str | None
    metrics: dict[str, Any]
    audit_seq: int | None


class LifecycleState:
    """Thread-safe access to the state file; one connection guarded by a lock."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / STATE_FILE
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, timeout=10.0, check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._db.execute(
                "INSERT OR IGNORE INTO kv VALUES ('schema', ?)", (str(_SCHEMA_VERSION),)
            )
        except (sqlite3.Error, OSError) as exc:
            raise StateError(f"cannot open lifecycle state {self.path}: {exc}") from exc
        self._lock = threading.RLock()
        self._closed = False

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise StateError(f"lifecycle state {self.path} is closed")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StateError(f"lifecycle state {self.path}: {exc}") from exc

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            if self._closed:
                raise StateError(f"lifecycle state {self.path} is closed")
            try:
                return list(self._db.execute(sql, args))
            except sqlite3.Error as exc:
                raise StateError(f"lifecycle state {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    # ------------------------------------------------------------ predictor side
    def record_batch(
        self,
        pending: Sequence[PendingEvent],
        candidates: Sequence[Candidate],
        pending_ttl_s: float | None = None,
    ) -> None:
        """One predictor batch: rejected events and close admitted ones, one transaction."""
        if not pending and not candidates:
            return
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "INSERT INTO pending(id, text, predicted_label, reasons, model_version, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "text=excluded.text, predicted_label=excluded.predicted_label, "
                "reasons=excluded.reasons, model_version=excluded.model_version",
                [
                    (
                        p.id,
                        p.text,
                        p.predicted_label,
                        json.dumps(list(p.reasons)),
                        p.model_version,
                        now,
                    )
                    for p in pending
                ],
            )
            db.executemany(
                "INSERT INTO candidates(id, text, label, nearest_id, nearest_label, distance, "
                "ratio, model_version, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO NOTHING",
                [
                    (
                        c.id,
                        c.text,
                        c.label,
                        c.nearest_id,
                        c.nearest_label,
                        c.distance,
                        c.ratio,
                        c.model_version,
                        now,
                    )
                    for c in candidates
                ],
            )
            if pending_ttl_s is not None and pending:
                db.execute("DELETE FROM pending WHERE created_at < ?", (now - pending_ttl_s,))

    # ------------------------------------------------------------ pending adjudications
    def pending(self, event_id: str) -> PendingEvent | None:
        rows = self._query(
            "SELECT id, text, predicted_label, reasons, model_version, created_at, status "
            "FROM pending WHERE id = ?",
            (event_id,),
        )
        if not rows:
            return None
        r = rows[0]
        return PendingEvent(r[0], r[1], r[2], tuple(json.loads(r[3])), r[4], r[5], r[6])

    def close_pending(self, event_id: str, status: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE pending SET status = ? WHERE id = ?", (status, event_id))

    def count_pending(self) -> int:
        return int(self._query("SELECT count(*) FROM pending WHERE status = 'open'")[0][0])

    # ------------------------------------------------------------ candidates
    def candidate_counts(self, max_ratio: float | None = None) -> dict[str, dict[str, int]]:
        """Pending candidates counted per label and per nearest exemplar."""
        args = (max_ratio, max_ratio)
        by_label = self._query(
            "SELECT label, count(*) FROM candidates WHERE status = 'pending' "
            "AND (? IS NULL OR ratio <= ?) GROUP BY label",
            args,
        )
        by_nearest = self._query(
            "SELECT nearest_id, count(*) FROM candidates WHERE status = 'pending' "
            "AND (? IS NULL OR ratio <= ?) GROUP BY nearest_id",
            args,
        )
        return {
            "label": {str(k): int(v) for k, v in by_label},
            "nearest": {str(k): int(v) for k, v in by_nearest},
        }

    def count_candidates(self, max_ratio: float | None = None) -> int:
        return sum(self.candidate_counts(max_ratio)["label"].values())

    def candidates(self, max_ratio: float | None = None) -> list[Candidate]:
        rows = self._query(
            "SELECT id, text, label, nearest_id, nearest_label, distance, ratio, model_version "
            "FROM candidates WHERE status = 'pending' AND (? IS NULL OR ratio <= ?) "
            "ORDER BY created_at",
            (max_ratio, max_ratio),
        )
        return [Candidate(*r) for r in rows]

    def candidate_statuses(self) -> dict[str, int]:
        """Candidates per status: ``pending`` or ``used:<version>``."""
        return {
            str(k): int(v)
            for k, v in self._query("SELECT status, count(*) FROM candidates GROUP BY status")
        }

    def mark_candidates_used(self, ids: Sequence[str], version: str) -> None:
        with self._tx() as db:
            db.executemany(
                "UPDATE candidates SET status = ? WHERE id = ?",
                [(f"used:{version}", i) for i in ids],
            )

    # ------------------------------------------------------------ audit trail
    def has_decision(self, decision_ref: str) -> bool:
        return bool(self._query("SELECT 1 FROM audit WHERE decision_ref = ?", (decision_ref,)))

    def append_audit(
        self,
        *,
        reviewer: str,
        action: str,
        target_id: str,
        source_event: str | None,
        old_label: str | None,
        new_label: str | None,
        old_source: str | None,
        new_source: str | None,
        note: str | None,
        text: str | None,
        model_version: str,
        decided_at: str | None,
        decision_ref: str | None,
    ) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO audit(at, decided_at, reviewer, action, target_id, source_event, "
                "old_label, new_label, old_source, new_source, note, text, model_version, "
                "decision_ref) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    _iso(),
                    decided_at,
                    reviewer,
                    action,
                    target_id,
                    source_event,
                    old_label,
                    new_label,
                    old_source,
                    new_source,
                    note,
                    text,
                    model_version,
                    decision_ref,
                ),
            )
            return int(cur.lastrowid or 0)

    def audit(
        self, limit: int | None = None, target_id: str | None = None, after_seq: int = 0
    ) -> list[AuditEntry]:
        """Audit entries in order (the newest ``limit`` when given)."""
        sql = (
            "SELECT seq, at, decided_at, reviewer, action, target_id, source_event, "
            "old_label, new_label, old_source, new_source, note, text, model_version "
            "FROM audit WHERE seq > ?"
        )
        args: list[Any] = [after_seq]
        if target_id is not None:
            sql += " AND target_id = ?"
            args.append(target_id)
        sql += " ORDER BY seq DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [AuditEntry(*r) for r in reversed(self._query(sql, args))]

    def last_audit_seq(self) -> int:
        return int(self._query("SELECT coalesce(max(seq), 0) FROM audit")[0][0])

    def count_decisions_since(self, seq: int) -> int:
        return int(self._query("SELECT count(*) FROM audit WHERE seq > ?", (seq,))[0][0])

    # ------------------------------------------------------------ fine-tune runs
    def start_run(self, trigger: str, serving_version: str, audit_seq: int) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO runs(started_at, trigger, serving_version, audit_seq) "
                "VALUES (?, ?, ?, ?)",
                (time.time(), trigger, serving_version, audit_seq),
            )
            return int(cur.lastrowid or 0)

    def finish_run(
        self, run_id: int, outcome: str, reason: str, version: str | None, metrics: dict[str, Any]
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET finished_at = ?, outcome = ?, reason = ?, version = ?, "
                "metrics = ? WHERE id = ?",
                (time.time(), outcome, reason, version, json.dumps(metrics), run_id),
            )

    def runs(self, limit: int = 20) -> list[RunRecord]:
        rows = self._query(
            "SELECT id, started_at, finished_at, trigger, outcome, reason, version, "
            "serving_version, metrics, audit_seq FROM runs ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [
            RunRecord(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                r[7],
                json.loads(r[8]) if r[8] else {},
                r[9],
            )
            for r in reversed(rows)
        ]

    def abandon_unfinished_runs(self) -> int:
        """Runs that never finished (the process died): mark them failed."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE runs SET finished_at = ?, outcome = 'failed', "
                "reason = 'process ended during the job' WHERE finished_at IS NULL",
                (time.time(),),
            )
            return cur.rowcount

    # ------------------------------------------------------------ small facts
    def get(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM kv WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def put(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO kv VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                "value = excluded.value",
                (key, value),
            )
