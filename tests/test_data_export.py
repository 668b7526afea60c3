"""`serveless export` (issue 11, item 5): one merged table in Parquet, CSV or JSONL, the same
rows whatever the format; the whole score vectors with --with-scores; accuracy of labelled
jobs in the summary."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from datakit import CLASSES, encode, image_folder, picture, save, tiny_classifier
from helpers import rows_of
from typer.testing import CliRunner

from serveless.cli import app
from serveless.data.export import COLUMNS, export
from serveless.errors import ExportError
from serveless.store import Store

pq = pytest.importorskip("pyarrow.parquet")
runner = CliRunner()


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, Path]:
    """A labelled job of 9 images in records of 4, one image broken, scores kept."""
    root = tmp_path_factory.mktemp("export")
    photos = root / "photos"
    image_folder(photos, per_class=4, classes=("cat", "dog"))
    (photos / "dog" / "broken.png").write_bytes(encode(picture(1), "PNG")[:100])
    model = save(tiny_classifier(softmax=False), root / "m.onnx")
    store = root / "store"
    result = runner.invoke(app, ["run", "--job", "ex", "--input", str(photos), "--model", model,
                                 "--store", str(store), "--per-record", "4", "--save-scores"])
    assert result.exit_code == 1, result.output  # one failed image
    return root, store, result.output


def cli_export(store: Path, out: Path, *args: str) -> str:
    result = runner.invoke(app, ["export", "ex", "--store", str(store), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.e2e
def test_parquet_reads_back_row_for_row_equal_to_the_jsonl(job):
    root, store, _ = job
    assert cli_export(store, root / "p.parquet") == f"wrote 9 rows to {root / 'p.parquet'}\n"
    cli_export(store, root / "p.jsonl", "--format", "jsonl")
    lines = [json.loads(line) for line in (root / "p.jsonl").read_text().splitlines()]
    table = pq.read_table(root / "p.parquet")
    assert table.column_names == list(COLUMNS)
    assert table.to_pylist() == lines
    assert [(r["record"], r["index"]) for r in lines] == sorted(
        (r["record"], r["index"]) for r in lines)
    stored = {(r["record"], r["index"]): r for r in rows_of(Store(str(store)), "ex")}
    assert len(stored) == 9
    for r in lines:
        s = stored[(r["record"], r["index"])]
        assert (r["filename"], r["label"], r["class_name"], r["top5"], r["top5_scores"],
                r["scores"]) == (s["filename"], s["label"], s["class_name"], s["top5"],
                                 s["probs"], "softmax(logits)")
        assert r["error"] == (s["error"]["message"] if s["error"] else None)
    broken = [r for r in lines if r["filename"] == "dog/broken.png"]
    assert broken[0]["error"] == "truncated PNG file (the image data ends early)"
    assert broken[0]["top5"] is None and broken[0]["class_name"] == "dog"


@pytest.mark.e2e
def test_csv_has_the_same_rows(job):
    root, store, _ = job
    cli_export(store, root / "p.csv", "--format", "csv")
    cli_export(store, root / "q.jsonl", "--format", "jsonl")
    lines = [json.loads(line) for line in (root / "q.jsonl").read_text().splitlines()]
    with open(root / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(COLUMNS) and len(rows) == len(lines)
    for c, j in zip(rows, lines, strict=True):
        assert c["filename"] == j["filename"] and int(c["index"]) == j["index"]
        assert (json.loads(c["top5"]) if c["top5"] else None) == j["top5"]
        assert (c["error"] or None) == j["error"]


@pytest.mark.e2e
def test_with_scores_adds_the_whole_score_vector(job):
    root, store, _ = job
    cli_export(store, root / "s.parquet", "--with-scores")
    rows = pq.read_table(root / "s.parquet").to_pylist()
    for r in rows:
        if r["error"]:
            assert r["all_scores"] is None
            continue
        scores = np.array(r["all_scores"])
        assert scores.shape == (CLASSES,) and abs(scores.sum() - 1) < 1e-5
        assert list(np.argsort(-scores, kind="stable")[:5]) == r["top5"]
        np.testing.assert_allclose(scores[r["top5"]], r["top5_scores"], rtol=1e-5)


@pytest.mark.e2e
def test_with_scores_needs_a_job_that_kept_them(tmp_path, job, records_dir):
    _, store, _ = job
    st = Store(str(store))
    spec = json.loads((store / "ex" / "job.json").read_text())
    spec["save_scores"] = False
    (store / "ex" / "job.json").write_text(json.dumps(spec))
    try:
        with pytest.raises(ExportError, match="run without --save-scores"):
            export(st, "ex", "parquet", str(tmp_path / "x.parquet"), with_scores=True)
    finally:
        spec["save_scores"] = True
        (store / "ex" / "job.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match="--format must be one of parquet, csv, jsonl"):
        export(st, "ex", "xlsx", str(tmp_path / "x.xlsx"))
    with pytest.raises(ExportError, match="job 'nope' has no predictions"):
        export(st, "nope", "csv", str(tmp_path / "x.csv"))


@pytest.mark.e2e
def test_labelled_jobs_get_accuracy_in_summary_and_report(job):
    root, store, output = job
    rows = [r for r in rows_of(Store(str(store)), "ex") if r["error"] is None]
    assert len(rows) == 8
    top1 = sum(r["top5"][0] == r["label"] for r in rows)
    top5 = sum(r["label"] in r["top5"] for r in rows)
    line = f"accuracy on 8 labelled images: top-1 {top1 / 8:.2%}, top-5 {top5 / 8:.2%}"
    assert line in output.splitlines()
    assert "1 images could not be served (their prediction rows carry the error):" in (
        output.splitlines())
    assert "  dog/broken.png: truncated PNG file (the image data ends early)" in output
    result = runner.invoke(app, ["report", "ex", "--store", str(store), "--out",
                                 str(root / "report")])
    assert result.exit_code == 0, result.output
    md = (root / "report" / "report.md").read_text()
    assert "Failed images: 1." in md and line in md


def test_a_recorded_jobs_predictions_are_one_table_in_every_format(recorded_job, tmp_path):
    """export() on the predictions a store holds (a recorded job: nothing run): one row per
    image in record then index order, the stored row's values under the table's columns,
    the same rows in JSONL, CSV and Parquet."""
    store, job, _ = recorded_job
    stored = rows_of(store, job)
    assert export(store, job, "jsonl", str(tmp_path / "t.jsonl")) == len(stored) == 100
    lines = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [(r["record"], r["index"]) for r in lines] == sorted(
        (s["record"], s["index"]) for s in stored)
    by_key = {(s["record"], s["index"]): s for s in stored}
    for r in lines:
        s = by_key[(r["record"], r["index"])]
        assert list(r) == list(COLUMNS)
        assert (r["filename"], r["label"], r["top5"], r["top5_scores"], r["scores"],
                r["error"], r["class_name"]) == (s["filename"], s["label"], s["top5"],
                                                 s["probs"], "probs", None, None)
    assert export(store, job, "csv", str(tmp_path / "t.csv")) == 100
    with open(tmp_path / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(c["record"], int(c["index"]), json.loads(c["top5"])) for c in rows] == [
        (r["record"], r["index"], r["top5"]) for r in lines]
    assert export(store, job, "parquet", str(tmp_path / "t.parquet")) == 100
    assert pq.read_table(tmp_path / "t.parquet").to_pylist() == lines
    with pytest.raises(ExportError, match="was run without --save-scores"):
        export(store, job, "jsonl", str(tmp_path / "s.jsonl"), with_scores=True)
