"""Model bundles on disk: safetensors + JSON, never pickle.

A bundle is a directory::

    bundle.json          format marker, version id, labels, network config, encoder
                         reference and fingerprint, training-data fingerprint, metrics
    head.safetensors     CNN + linear head weights
    encoder/             only when the encoder was fine-tuned (safetensors + tokenizer)
    calibration.json     thresholds + the per-row calibration statistics (recalibrate
                         for another alpha without the data)
    store/               the embedded exemplar store (support set) of this version

Everything is validated on load, and a directory that is not a bundle says so in
one line (:class:`model.errors.BundleError`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from model.admission import CalibrationStats, Thresholds
from model.errors import BundleError
from model.network import ExemplarNetwork, NetworkConfig, load_encoder, resolve_encoder_path

FORMAT = "exemplar-bundle"
FORMAT_VERSION = 1
BUNDLE_FILE = "bundle.json"
HEAD_FILE = "head.safetensors"
CALIBRATION_FILE = "calibration.json"
ENCODER_DIR = "encoder"
STORE_DIR = "store"


@dataclass
class BundleInfo:
    """The JSON half of a bundle."""

    version: str
    created_at: str
    network: NetworkConfig
    encoder_fingerprint: str
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return list(self.network.labels)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "created_at": self.created_at,
            "labels": self.labels,
            "network": self.network.to_json(),
            "encoder_fingerprint": self.encoder_fingerprint,
            "training": self.training,
            "metrics": self.metrics,
            "baseline": self.baseline,
        }


@dataclass
class Bundle:
    """A loaded bundle: ready-to-run network, tokenizer and calibration."""

    path: Path
    info: BundleInfo
    network: ExemplarNetwork
    tokenizer: PreTrainedTokenizerBase
    thresholds: Thresholds
    calibration: CalibrationStats

    @property
    def store_path(self) -> Path:
        return self.path / STORE_DIR


def fingerprint_files(paths: Iterable[Path]) -> str:
    """sha256 over file names and contents, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def encoder_fingerprint(directory: Path) -> str:
    return fingerprint_files(p for p in directory.glob("*.safetensors"))


def fingerprint_texts(rows: Iterable[tuple[str, str | None]]) -> str:
    """Fingerprint of training data: (text, label) pairs, order-independent."""
    digest = hashlib.sha256()
    for text, label in sorted(rows, key=lambda r: (r[0], r[1] or "")):
        digest.update(text.encode())
        digest.update(b"\x00")
        digest.update((label or "").encode())
        digest.update(b"\x01")
    return digest.hexdigest()


def _head_state(network: ExemplarNetwork) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().contiguous()
        for k, v in network.state_dict().items()
        if not k.startswith("encoder.")
    }


def save_bundle(
    directory: Path,
    info: BundleInfo,
    network: ExemplarNetwork,
    tokenizer: PreTrainedTokenizerBase,
    thresholds: Thresholds,
    calibration: CalibrationStats,
) -> None:
    """Write every file of a bundle except the store (which the builder fills in place)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_head_state(network), str(directory / HEAD_FILE))
    # safetensors creates the file owner-only; a bundle is read by other users (a
    # container's service account), and it holds no secret.
    (directory / HEAD_FILE).chmod(0o644)
    if network.config.fine_tune_encoder:
        network.encoder.save_pretrained(directory / ENCODER_DIR, safe_serialization=True)
        tokenizer.save_pretrained(directory / ENCODER_DIR)
    write_calibration(directory, thresholds, calibration)
    (directory / BUNDLE_FILE).write_text(
        json.dumps(info.to_json(), indent=2, sort_keys=False) + "\n", encoding="utf-8"
    )


def write_calibration(directory: Path, thresholds: Thresholds, stats: CalibrationStats) -> None:
    data = {"thresholds": thresholds.to_json(), "stats": stats.to_json()}
    (directory / CALIBRATION_FILE).write_text(json.dumps(data) + "\n", encoding="utf-8")


def read_info(directory: Path) -> BundleInfo:
    """Read and validate bundle.json only (cheap; no weights)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"{directory}: not a directory (expected a model bundle)")
    meta_path = directory / BUNDLE_FILE
    if not meta_path.is_file():
        raise BundleError(
            f"{directory}: not a model bundle (no {BUNDLE_FILE}; create one with `exemplar train`)"
        )
    try:
        data = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{meta_path}: damaged ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{meta_path}: not an exemplar bundle file")
    if data.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{meta_path}: bundle format {data.get('format_version')} is not supported "
            f"(this exemplar reads format {FORMAT_VERSION})"
        )
    try:
        return BundleInfo(
            version=str(data["version"]),
            created_at=str(data["created_at"]),
            network=NetworkConfig.from_json(data["network"]),
            encoder_fingerprint=str(data["encoder_fingerprint"]),
            training=dict(data.get("training", {})),
            metrics=dict(data.get("metrics", {})),
            baseline=dict(data.get("baseline", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{meta_path}: damaged ({exc!r})") from exc


def load_bundle(directory: Path | str) -> Bundle:
    """Load a bundle for inference; checks the encoder is the one it was trained with."""
    directory = Path(directory)
    info = read_info(directory)
    for required in (HEAD_FILE, CALIBRATION_FILE):
        if not (directory / required).is_file():
            raise BundleError(f"{directory}: incomplete bundle, {required} is missing")
    config = info.network
    encoder_ref = str(directory / ENCODER_DIR) if config.fine_tune_encoder else config.encoder
    encoder_dir = resolve_encoder_path(encoder_ref)
    actual = encoder_fingerprint(encoder_dir)
    if actual != info.encoder_fingerprint:
        raise BundleError(
            f"{directory}: encoder at {encoder_dir} differs from the one this model was "
            "trained with (fingerprint mismatch); install the same encoder or retrain"
        )
    encoder, tokenizer = load_encoder(encoder_ref)
    network = ExemplarNetwork(config, encoder)
    try:
        head = load_file(str(directory / HEAD_FILE))
        missing, unexpected = network.load_state_dict(head, strict=False)
    except (OSError, RuntimeError) as exc:
        raise BundleError(f"{directory / HEAD_FILE}: cannot load weights ({exc})") from exc
    missing = [k for k in missing if not k.startswith("encoder.")]
    if missing or unexpected:
        raise BundleError(
            f"{directory / HEAD_FILE}: weights do not match the config "
            f"(missing {missing}, unexpected {unexpected})"
        )
    network.eval()
    try:
        cal = json.loads((directory / CALIBRATION_FILE).read_text(encoding="utf-8"))
        thresholds = Thresholds.from_json(cal["thresholds"])
        stats = CalibrationStats.from_json(cal["stats"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{directory / CALIBRATION_FILE}: damaged ({exc!r})") from exc
    return Bundle(directory, info, network, tokenizer, thresholds, stats)
