"""From labelled text to a servable bundle: train, build the support set, calibrate.

Steps, each reported on the terminal:

1. hold out a seeded, stratified dev slice of TRAIN for early stopping (and a
   calibration slice too when no calibration file is given);
2. train the network (frozen encoder features cached);
3. embed every TRAIN row and upsert it into the embedded store as a support
   exemplar with its true label and the model's own prediction; build the store's
   HNSW index (``optimize``) once the support set fills more than the indexing
   threshold, so the bundle ships searching through the index, not by full scans;
4. on the calibration split: predict, search (through the index, as serving
   does), and choose the admission thresholds for ``alpha``; calibrate the softmax
   baseline to the same ``alpha``;
5. write the bundle (safetensors + JSON) next to its store, with the calibration rows
   (``calib.jsonl``) so a later fine-tune can shadow-evaluate old and new versions on
   exactly the same data.

``origins`` lets a rebuild (the curator's fine-tune job) keep where each support
exemplar came from: a human mapping stays ``source="human"`` with its reviewer's
label as truth, in the new store too.
"""

from __future__ import annotations

import math
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from model.admission import (
    CalibrationStats,
    Thresholds,
    calibrate,
    calibrate_softmax_threshold,
    near_duplicate_threshold,
    trivial_edits,
)
from model.bundle import (
    STORE_DIR,
    BundleInfo,
    encoder_fingerprint,
    fingerprint_texts,
    save_bundle,
)
from model.data import Example, read_examples, stratified_split, write_jsonl
from model.errors import DataError
from model.network import ExemplarNetwork, NetworkConfig, load_encoder, resolve_encoder_path
from model.predictor import Predictor
from model.store.base import Exemplar, IndexSettings
from model.store.edge import EdgeStore
from model.train import (
    CachedFeatures,
    TrainOptions,
    cached_outputs,
    encode_features,
    seed_everything,
    train_network,
)

log = structlog.get_logger(__name__)

#: The calibration rows, kept with the bundle (id, text, label per line).
CALIB_ROWS_FILE = "calib.jsonl"


@dataclass(frozen=True)
class Origin:
    """Where a training row came from; carried into its support exemplar's payload."""

    source: str = "train"
    meta: Mapping[str, Any] = field(default_factory=dict)


def calibration_rows(bundle_dir: Path) -> list[Example]:
    """The calibration rows a bundle was calibrated on (``DataError`` when not kept)."""
    path = Path(bundle_dir) / CALIB_ROWS_FILE
    if not path.is_file():
        raise DataError(
            f"{bundle_dir}: no {CALIB_ROWS_FILE} (bundles built before it was kept); give the "
            "calibration file with `exemplar models init --calib` or "
            "EXEMPLAR_CURATOR__CALIB_PATH"
        )
    return read_examples(path, require_labels=True)


@dataclass(frozen=True)
class BuildOptions:
    """What ``exemplar train`` controls."""

    alpha: float = 0.95
    k: int = 8
    confidence: float = 0.8
    dev_fraction: float = 0.1
    calib_fraction: float = 0.15
    store_text: bool = True
    network: NetworkConfig | None = None  # labels are filled in from the data
    train: TrainOptions = field(default_factory=TrainOptions)
    #: how the support set is indexed (``EXEMPLAR_STORE__*``: ``StoreConfig.index_settings()``)
    index: IndexSettings = field(default_factory=IndexSettings)
    #: KB of vectors from which the support set gets an HNSW index (None: the engine's
    #: 10 MB, about 2,500 exemplars of 1,000 floats); below it searches are full scans
    indexing_threshold_kb: int | None = None


def _check_labels(examples: Sequence[Example], what: str) -> None:
    missing = [e.id for e in examples if e.label is None]
    if missing:
        raise DataError(f"{what}: {len(missing)} rows have no label (first: {missing[0]!r})")


def new_version() -> str:
    """Sortable, unique version id: UTC time plus a short random suffix."""
    now = datetime.now(UTC)
    # milliseconds keep two versions built within one second in creation order
    return now.strftime("v%Y%m%d-%H%M%S") + f"{now.microsecond // 1000:03d}-" + uuid.uuid4().hex[:6]


def build_bundle(
    train: Sequence[Example],
    out_dir: Path,
    calib: Sequence[Example] | None = None,
    options: BuildOptions | None = None,
    say: Callable[[str], None] = lambda _msg: None,
    origins: Mapping[str, Origin] | None = None,
) -> Path:
    """Train and write a complete bundle into ``out_dir``; returns ``out_dir``.

    ``origins`` maps row ids to the source (and meta) their support exemplars get;
    rows not in it are ``source="train"``.
    """
    origins = origins or {}
    options = options or BuildOptions()
    _check_labels(train, "training data")
    labels = tuple(sorted({e.label for e in train if e.label is not None}))
    if len(labels) < 2:
        raise DataError(f"training data has {len(labels)} label(s); need at least two")
    seed_everything(options.train.seed)
    if calib is None:
        parts = stratified_split(
            list(train),
            {"train": 1 - options.calib_fraction, "calib": options.calib_fraction},
            seed=options.train.seed,
        )
        fit_rows, calib = parts["train"], parts["calib"]
        say(f"no --calib given: held out {len(calib)} of {len(train)} rows for calibration")
    else:
        fit_rows = list(train)
        _check_labels(calib, "calibration data")
    calib = [e for e in calib if e.label in labels]
    if not calib:
        raise DataError("calibration data has no row with a label the training data knows")
    parts = stratified_split(
        list(fit_rows),
        {"fit": 1 - options.dev_fraction, "dev": options.dev_fraction},
        seed=options.train.seed,
    )
    fit, dev = parts["fit"], parts["dev"]
    index = {lab: i for i, lab in enumerate(labels)}

    base = options.network or NetworkConfig(labels=labels)
    config = replace(base, labels=labels)
    encoder, tokenizer = load_encoder(config.encoder)
    network = ExemplarNetwork(config, encoder)
    say(
        f"training on {len(fit)} rows (dev {len(dev)}), labels {list(labels)}, "
        f"encoder {config.encoder}, {config.num_filters} filters"
    )
    fit_texts, dev_texts = [e.text for e in fit], [e.text for e in dev]
    caches = None
    if not config.fine_tune_encoder:  # encode once; training and the support set share it
        opts = options.train
        caches = (
            encode_features(
                network,
                tokenizer,
                fit_texts,
                opts.encode_batch_size,
                opts.progress,
                "encoding train",
            ),
            encode_features(
                network, tokenizer, dev_texts, opts.encode_batch_size, opts.progress, "encoding dev"
            ),
        )
    result = train_network(
        network,
        tokenizer,
        fit_texts,
        [index[str(e.label)] for e in fit],
        dev_texts,
        [index[str(e.label)] for e in dev],
        options.train,
        caches=caches,
    )
    say(
        f"best epoch {result.best_epoch}/{result.epochs_run}: dev accuracy "
        f"{result.best_dev_accuracy:.4f}"
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    store_path = out_dir / STORE_DIR
    if store_path.exists():
        shutil.rmtree(store_path)
    store = EdgeStore(
        store_path,
        dim=config.num_filters,
        index=options.index,
        indexing_threshold_kb=options.indexing_threshold_kb,
    )
    try:
        predictor = Predictor(network, tokenizer, store, _placeholder(labels, options), "build")
        support_rows = [*fit, *dev]
        say(f"embedding {len(support_rows)} support exemplars")
        if caches is not None:
            probs, vectors = cached_outputs(
                network,
                CachedFeatures(
                    caches[0].features + caches[1].features,
                    caches[0].token_masks + caches[1].token_masks,
                ),
            )
        else:
            fwd = predictor.forward([e.text for e in support_rows], explain=False)
            probs, vectors = fwd.probs, fwd.exemplars
        predicted = probs.argmax(axis=1)
        batch = 2048
        for start in range(0, len(support_rows), batch):
            store.upsert(
                [
                    Exemplar(
                        id=e.id,
                        vector=vectors[start + i],
                        label=str(e.label),
                        predicted=labels[int(predicted[start + i])],
                        source=origins[e.id].source if e.id in origins else "train",
                        text=e.text if options.store_text else None,
                        meta=origins[e.id].meta if e.id in origins else {},
                    )
                    for i, e in enumerate(support_rows[start : start + batch])
                ]
            )
        started = time.perf_counter()
        store.optimize()
        indexed, index_s = store.indexed_count, time.perf_counter() - started
        if indexed:
            say(f"built the HNSW index of {indexed} support exemplars in {index_s:.1f} s")
        support_accuracy = float(
            np.mean(
                [labels[int(p)] == e.label for p, e in zip(predicted, support_rows, strict=True)]
            )
        )

        say(f"calibrating on {len(calib)} rows for alpha={options.alpha}")
        cal_fwd = predictor.forward([e.text for e in calib], explain=False)
        neighbors = store.search(cal_fwd.exemplars, options.k)
        cal_pred = [labels[int(i)] for i in cal_fwd.probs.argmax(axis=1)]
        top2 = np.sort(cal_fwd.probs, axis=1)[:, -2:]
        stats = CalibrationStats.build(
            cal_pred, [str(e.label) for e in calib], list(top2[:, 1] - top2[:, 0]), neighbors
        )
        near_dup = _near_duplicate(predictor, calib, cal_fwd.exemplars, stats)
        thresholds = calibrate(
            stats, labels, options.alpha, options.k, near_dup, options.confidence
        )
        correct = np.asarray(cal_pred) == np.asarray([e.label for e in calib])
        softmax_t = calibrate_softmax_threshold(
            top2[:, 1], correct, options.alpha, options.confidence
        )
    finally:
        store.close()

    admitted = _calib_coverage(stats, thresholds)
    info = BundleInfo(
        version=new_version(),
        created_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        network=config,
        encoder_fingerprint=encoder_fingerprint(resolve_encoder_path(config.encoder)),
        training={
            "rows": len(support_rows),
            "fit_rows": len(fit),
            "dev_rows": len(dev),
            "calib_rows": len(calib),
            "data_fingerprint": fingerprint_texts((e.text, e.label) for e in support_rows),
            "calib_fingerprint": fingerprint_texts((e.text, e.label) for e in calib),
            "seed": options.train.seed,
            "options": {k: v for k, v in vars(options.train).items() if k != "progress"},
            "history": result.history,
            "store_index": {
                **asdict(options.index),
                "indexed_vectors": indexed,
                "index_build_s": round(index_s, 3),
            },
        },
        metrics={
            "dev_accuracy": result.best_dev_accuracy,
            "dev_loss": result.best_dev_loss,
            "best_epoch": result.best_epoch,
            "support_accuracy": support_accuracy,
            "calib_accuracy": float(correct.mean()),
            "calib_coverage": admitted,
        },
        baseline={"softmax_threshold": None if math.isinf(softmax_t) else softmax_t},
    )
    write_jsonl(out_dir / CALIB_ROWS_FILE, calib)
    save_bundle(out_dir, info, network, tokenizer, thresholds, stats)
    say(f"wrote bundle {info.version} to {out_dir} (calibration coverage {admitted:.3f})")
    return out_dir


def _placeholder(labels: Sequence[str], options: BuildOptions) -> Thresholds:
    """Thresholds used only while building (forward passes never consult them)."""
    return Thresholds(
        alpha=options.alpha,
        k=options.k,
        q_min=1,
        tau=dict.fromkeys(labels, None),
        margin=dict.fromkeys(labels, 0.0),
        near_duplicate=0.0,
    )


def _near_duplicate(
    predictor: Predictor,
    calib: Sequence[Example],
    vectors: np.ndarray,
    stats: CalibrationStats,
    limit: int = 400,
) -> float:
    """Calibrate the near-duplicate distance from trivially edited calibration texts."""
    chosen = list(range(min(limit, len(calib))))
    originals, edited = [], []
    for i in chosen:
        for text in trivial_edits(calib[i].text):
            originals.append(i)
            edited.append(text)
    if not edited:
        return 1e-6
    fwd = predictor.forward(edited, explain=False)
    diffs = np.linalg.norm(fwd.exemplars - vectors[originals], axis=1)
    return near_duplicate_threshold(diffs, stats.distance)


def _calib_coverage(stats: CalibrationStats, t: Thresholds) -> float:
    """Fraction of calibration rows the chosen thresholds admit."""
    admitted = 0
    for pred, m, d, q in zip(
        stats.predicted, stats.margin, stats.distance, stats.support, strict=True
    ):
        tau = t.tau.get(pred)
        if tau is not None and q >= t.q_min and d <= tau and m >= t.margin.get(pred, 0.0):
            admitted += 1
    return admitted / len(stats.predicted)
