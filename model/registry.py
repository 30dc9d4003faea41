"""Model registry of the embedded back end: versioned bundles and an atomic serving pointer.

A registry is a directory::

    <root>/versions/<version>/   one complete bundle per version (its own store/)
    <root>/versions/<version>/lifecycle.json
                                 how the version came to be and what happened to it:
                                 shadow metrics, promoted or rejected and why
    <root>/versions/.staging-*/  a fine-tune job's work in progress (never served;
                                 removed by ``clean_staging``)
    <root>/SERVING               the serving version's name, one line
    <root>/state/                the curator's sqlite state (see ``daemon.state``)

``promote`` flips ``SERVING`` atomically (write a temporary file, fsync, ``os.replace``),
so a reader sees either the old or the new version, never a mix; a job that dies before
``promote`` leaves the old pointer in place.

``EXEMPLAR_MODEL_DIR`` may name a registry root or a plain bundle; :func:`resolve_model_dir`
tells them apart. On a plain bundle the lifecycle features work in place (no versions).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.bundle import BUNDLE_FILE, STORE_DIR, read_info
from model.errors import BundleError

#: ``exemplar models promote`` leaves this in the state directory for the curator.
PROMOTION_REQUEST_FILE = "promotion-request.json"

VERSIONS_DIR = "versions"
SERVING_FILE = "SERVING"
LIFECYCLE_FILE = "lifecycle.json"
STATE_DIR = "state"
_STAGING_PREFIX = ".staging-"


def is_registry(path: Path) -> bool:
    """True when ``path`` is a registry root (has ``versions/``)."""
    return (Path(path) / VERSIONS_DIR).is_dir()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new content, whole."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class VersionEntry:
    """One version of the registry as ``exemplar models`` lists it."""

    version: str
    path: Path
    created_at: str
    serving: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    lifecycle: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.serving:
            return "serving"
        return str(self.lifecycle.get("status", "registered"))


class Registry:
    """Versions of one model under a root directory, and which of them serves."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not is_registry(self.root):
            raise BundleError(
                f"{self.root}: not a model registry (no {VERSIONS_DIR}/); create one with "
                "`exemplar models init` or `exemplar train --register`"
            )

    @classmethod
    def create(cls, root: Path) -> Registry:
        """Make an empty registry at ``root`` (or open the one already there)."""
        root = Path(root)
        if (root / BUNDLE_FILE).exists():
            raise BundleError(f"{root} is a bundle; a registry needs its own directory")
        (root / VERSIONS_DIR).mkdir(parents=True, exist_ok=True)
        return cls(root)

    @property
    def versions_dir(self) -> Path:
        return self.root / VERSIONS_DIR

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    def path_of(self, version: str) -> Path:
        if not version or "/" in version or version.startswith("."):
            raise BundleError(f"{version!r} is not a version name")
        return self.versions_dir / version

    # ------------------------------------------------------------ the pointer
    def serving_version(self) -> str | None:
        """The version ``SERVING`` names, or ``None`` before the first promotion."""
        try:
            name = (self.root / SERVING_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return name or None

    def serving_path(self) -> Path:
        """The serving bundle's directory; ``BundleError`` when nothing serves yet."""
        version = self.serving_version()
        if version is None:
            raise BundleError(
                f"{self.root}: no version is serving yet ({SERVING_FILE} is missing); "
                "register one with `exemplar models init` or `exemplar train --register`"
            )
        path = self.path_of(version)
        if not (path / BUNDLE_FILE).is_file():
            raise BundleError(f"{self.root}: {SERVING_FILE} names {version!r}, which is missing")
        return path

    def promote(self, version: str) -> str | None:
        """Make ``version`` the serving one, atomically; returns the previous version."""
        path = self.path_of(version)
        if not (path / BUNDLE_FILE).is_file() or not (path / STORE_DIR).is_dir():
            raise BundleError(f"cannot promote {version!r}: {path} is not a complete bundle")
        previous = self.serving_version()
        write_atomic(self.root / SERVING_FILE, version + "\n")
        return previous

    # ------------------------------------------------------------ promotion requests
    def request_promotion(self, version: str, requested_by: str, reason: str) -> None:
        """Ask the curator to serve ``version`` (a rollback, or a version registered by
        hand). Only the curator changes what serves: it replays the decisions onto the
        version, flips the pointer and announces it, in order with its other changes."""
        path = self.path_of(version)
        if not (path / BUNDLE_FILE).is_file() or not (path / STORE_DIR).is_dir():
            raise BundleError(
                f"cannot promote {version!r}: {path} is not a complete bundle "
                "(a rejected version's store is deleted)"
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        request = {"version": version, "requested_by": requested_by, "reason": reason}
        write_atomic(self.state_dir / PROMOTION_REQUEST_FILE, json.dumps(request) + "\n")

    def promotion_request(self) -> dict[str, str] | None:
        """The pending promotion request, if any (``clear_promotion_request`` when done)."""
        try:
            text = (self.state_dir / PROMOTION_REQUEST_FILE).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            request = json.loads(text)
        except json.JSONDecodeError:
            return {"version": "", "requested_by": "?", "reason": "unreadable request"}
        return {k: str(v) for k, v in request.items()}

    def clear_promotion_request(self) -> None:
        (self.state_dir / PROMOTION_REQUEST_FILE).unlink(missing_ok=True)

    # ------------------------------------------------------------ versions
    def versions(self) -> list[VersionEntry]:
        """Every committed version, oldest first."""
        serving = self.serving_version()
        entries = []
        for path in self.versions_dir.iterdir():
            if path.name.startswith(".") or not (path / BUNDLE_FILE).is_file():
                continue
            info = read_info(path)
            entries.append(
                VersionEntry(
                    version=path.name,
                    path=path,
                    created_at=info.created_at,
                    serving=path.name == serving,
                    metrics=info.metrics,
                    lifecycle=self.read_lifecycle(path.name),
                )
            )
        return sorted(entries, key=lambda e: (e.created_at, e.version))

    def read_lifecycle(self, version: str) -> dict[str, Any]:
        path = self.path_of(version) / LIFECYCLE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path}: damaged ({exc})") from exc
        return data if isinstance(data, dict) else {}

    def update_lifecycle(self, version: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``changes`` into the version's lifecycle record; returns the record."""
        record = {**self.read_lifecycle(version), **changes}
        write_atomic(self.path_of(version) / LIFECYCLE_FILE, json.dumps(record, indent=2) + "\n")
        return record

    def register(self, bundle: Path, lifecycle: Mapping[str, Any] | None = None) -> str:
        """Copy a finished bundle in as a new version (not promoted); returns its name."""
        info = read_info(bundle)
        target = self.path_of(info.version)
        if target.exists():
            raise BundleError(f"{self.root}: version {info.version!r} is already registered")
        staging = self.new_staging()
        shutil.copytree(bundle, staging, dirs_exist_ok=True)
        return self.commit_staging(staging, lifecycle)

    # ------------------------------------------------------------ staging
    def new_staging(self) -> Path:
        """A fresh work directory for a job; invisible to readers until committed."""
        path = self.versions_dir / f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        path.mkdir()
        return path

    def commit_staging(self, staging: Path, lifecycle: Mapping[str, Any] | None = None) -> str:
        """Turn a complete bundle in ``staging`` into a registered version (atomic rename)."""
        info = read_info(staging)
        if lifecycle:
            write_atomic(staging / LIFECYCLE_FILE, json.dumps(dict(lifecycle), indent=2) + "\n")
        target = self.path_of(info.version)
        if target.exists():
            raise BundleError(f"{self.root}: version {info.version!r} is already registered")
        os.replace(staging, target)
        _fsync_dir(self.versions_dir)
        return info.version

    def clean_staging(self) -> list[Path]:
        """Remove what dead jobs left behind; returns the removed directories."""
        removed = []
        for path in self.versions_dir.glob(f"{_STAGING_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed

    def drop_store(self, version: str) -> None:
        """Free the disk of a version that will never serve (keeps its JSON record)."""
        if version == self.serving_version():
            raise BundleError(f"{version!r} is serving; its store stays")
        shutil.rmtree(self.path_of(version) / STORE_DIR, ignore_errors=True)


def resolve_model_dir(model_dir: Path) -> tuple[Path, Registry | None]:
    """The bundle to serve for ``EXEMPLAR_MODEL_DIR``, and the registry when it is one."""
    model_dir = Path(model_dir)
    if is_registry(model_dir):
        registry = Registry(model_dir)
        return registry.serving_path(), registry
    return model_dir, None


def state_dir_for(model_dir: Path) -> Path:
    """Where the curator keeps its state for ``EXEMPLAR_MODEL_DIR`` (registry or bundle)."""
    return Path(model_dir) / STATE_DIR
