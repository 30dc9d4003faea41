"""The command line end to end: train, eval, explain, index, and clear errors on bad input.

Real files on disk, a real (tiny, random) transformer, the real embedded Qdrant store.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.cli import main
from tests.model_fixtures import toy_corpus, write_jsonl


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("toy")
    rows = toy_corpus(300, seed=7)
    return {
        "train": write_jsonl(d / "train.jsonl", rows[:180]),
        "calib": write_jsonl(d / "calib.jsonl", rows[180:240]),
        "test": write_jsonl(d / "test.jsonl", rows[240:]),
    }


@pytest.fixture(scope="module")
def bundle(
    tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Path, toy_files: dict[str, Path]
) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "toy"
    code = main(
        [
            "train",
            "--data",
            str(toy_files["train"]),
            "--calib",
            str(toy_files["calib"]),
            "--out",
            str(out),
            "--base-model",
            str(tiny_encoder),
            "--filters",
            "32",
            "--epochs",
            "25",
            "--alpha",
            "0.9",
            "--k",
            "4",
            "--quiet",
        ]
    )
    assert code == 0
    return out


def test_train_writes_a_complete_bundle(bundle: Path) -> None:
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["format"] == "exemplar-bundle"
    assert info["labels"] == ["bad", "good", "meh"]
    assert info["training"]["data_fingerprint"]
    assert (bundle / "head.safetensors").is_file()
    assert (bundle / "store" / "store.json").is_file()
    calibration = json.loads((bundle / "calibration.json").read_text())
    assert calibration["thresholds"]["alpha"] == 0.9
    assert not list(bundle.rglob("*.pkl")) and not list(bundle.rglob("*.bin"))


def test_eval_report_has_the_contract_keys(
    bundle: Path, toy_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_path, plot = tmp_path / "r.json", tmp_path / "r.png"
    code = main(
        [
            "eval",
            "--model",
            str(bundle),
            "--data",
            str(toy_files["test"]),
            "--json",
            str(report_path),
            "--plot",
            str(plot),
        ]
    )
    assert code == 0
    report = json.loads(report_path.read_text())
    for key in (
        "n",
        "coverage",
        "admitted_accuracy",
        "accuracy",
        "aurc",
        "per_class",
        "reject_reasons",
    ):
        assert key in report
    assert report["n"] == 60
    assert report["accuracy"] > 0.8  # the toy task is easy even for a random encoder
    assert set(report["per_class"]) == {"bad", "good", "meh"}
    for row in report["per_class"].values():
        assert "coverage" in row and "admitted_accuracy" in row
    assert "coverage" in report["baselines"]["softmax"]
    assert "admitted_accuracy" in report["baselines"]["softmax"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "exemplar admission" in capsys.readouterr().out


def test_eval_on_unlabelled_and_unknown_labels_counts_coverage_only(
    bundle: Path, tmp_path: Path
) -> None:
    data = write_jsonl(
        tmp_path / "u.jsonl",
        [
            {"text": "The film was wonderful and charming."},
            {"text": "The cast was dreadful and boring.", "label": "sarcastic"},
        ],
    )
    report_path = tmp_path / "u.json"
    assert (
        main(["eval", "--model", str(bundle), "--data", str(data), "--json", str(report_path)]) == 0
    )
    report = json.loads(report_path.read_text())
    assert report["n"] == 2 and report["n_labelled"] == 0
    assert report["accuracy"] is None and report["admitted_accuracy"] is None
    assert 0.0 <= report["coverage"] <= 1.0


def test_explain_json(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["explain", "--model", str(bundle), "--json", "The script was superb and moving."])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["label"] in {"bad", "good", "meh"}
    assert isinstance(out["admitted"], bool)
    assert out["admitted"] or out["reasons"]
    assert len(out["nearest"]) >= 1 and out["nearest"][0]["text"]
    assert [w["word"] for w in out["words"]] == [
        "The",
        "script",
        "was",
        "superb",
        "and",
        "moving",
        ".",
    ]
    distances = [n["distance"] for n in out["nearest"]]
    assert distances == sorted(distances)


def test_explain_readable(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["explain", "--model", str(bundle), "--color", "always", "The ending was tedious."])
        == 0
    )
    out = capsys.readouterr().out
    assert "nearest training exemplars" in out and "\033[" in out


def test_index_adds_exemplars_used_at_once(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = "A completely new sentence about the lighting design."
    data = write_jsonl(tmp_path / "new.jsonl", [{"id": "new:1", "text": text, "label": "meh"}])
    assert main(["index", "--model", str(bundle), "--data", str(data)]) == 0
    capsys.readouterr()
    assert main(["explain", "--model", str(bundle), "--json", text]) == 0
    nearest = json.loads(capsys.readouterr().out)["nearest"][0]
    assert nearest["id"] == "new:1" and nearest["source"] == "index"
    assert nearest["distance"] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "no rows"),
        (b'{"label": "good"}\n', 'missing "text"'),
        (b'{"text": "caf\xe9", "label": "good"}\n', "not UTF-8"),
        (b"not json\n", "not JSON"),
    ],
)
def test_bad_training_input_is_one_line(
    tmp_path: Path, content: bytes, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_not_a_bundle_is_one_line(
    tmp_path: Path, toy_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "--model", str(tmp_path), "--data", str(toy_files["test"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a model bundle" in err and len(err.splitlines()) == 1


def test_console_script_reports_errors_without_traceback(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "exemplar"
    proc = subprocess.run(
        [str(exe), "explain", "--model", str(tmp_path / "nope"), "hi"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "not a directory" in proc.stderr
