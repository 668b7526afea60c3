"""The run summary (report/summary.py) as `run` and `report` print it: every value whole at
any terminal width, the first ten failed images listed, and the accuracy of a labelled job
with why the untrained built-in AlexNet scores near zero."""

from __future__ import annotations

import io

import pytest
from datakit import encode, image_folder, picture, save, tiny_classifier
from rich.console import Console
from typer.testing import CliRunner

from serveless.cli import app
from serveless.driver.log import load_log
from serveless.report.summary import print_summary, stage_cells, summarize
from serveless.store import Store

runner = CliRunner()


# -- the summary at 80, 100 and 160 columns ---------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("width", [40, 80, 100, 160])
def test_summary_fits_the_terminal_with_every_value_whole(done_store, width):
    rows = load_log(Store(str(done_store)), "done")
    out = io.StringIO()
    print_summary(rows, 12.5, "x86_64", Console(file=out, width=width, force_terminal=False))
    text = out.getvalue()
    assert "…" not in text
    lines = text.splitlines()
    table_lines = [line for line in lines if not line.startswith("total ")]
    assert max(len(line.rstrip()) for line in table_lines) <= width, text
    tokens = set(" ".join(lines).replace(",", " ").split()) | set(text.split())
    for row in stage_cells(summarize(rows)):
        for value in row:
            whole = value in tokens or any(f"{value}{end}" in text for end in ",:")
            assert whole, (value, text)


# -- failed images and accuracy ---------------------------------------------------------------


@pytest.mark.e2e
def test_a_runs_summary_lists_the_first_ten_failed_images(tmp_path):
    src = tmp_path / "photos"
    image_folder(src, per_class=3, classes=("a",))
    whole = encode(picture(5, (200, 150)), "JPEG")
    for i in range(12):
        (src / "a" / f"bad_{i:02d}.jpg").write_bytes(whole[:400 + 10 * i])
    model = save(tiny_classifier(), tmp_path / "m.onnx")
    store = tmp_path / "store"
    result = runner.invoke(app, ["run", "--job", "j", "--input", str(src), "--model", model,
                                 "--store", str(store), "--per-record", "20"])
    assert result.exit_code == 1, result.output  # failed images make the run's status 1
    lines = result.output.splitlines()
    start = lines.index("12 images could not be served (their prediction rows carry the error):")
    assert lines[start + 1:start + 12] == [
        *(f"  a/bad_{i:02d}.jpg: truncated JPEG file (the image data ends early)"
          for i in range(10)),
        "  … and 2 more",
    ]
    assert "accuracy on 3 labelled images: top-1 " in result.output
    assert result.output.count("skipped") == 0  # every file there is an image (broken or not)
    report = runner.invoke(app, ["report", "j", "--store", str(store)])
    assert "12 images could not be served" in report.output and "  … and 2 more" in report.output


def test_accuracy_of_the_untrained_builtin_alexnet_says_why_it_is_near_zero(monkeypatch):
    """A new user's first labelled job on the built-in AlexNet scores about 0%: the summary
    says that its weights are untrained, and says nothing of the kind for other models."""
    from serveless.report import summary as report

    monkeypatch.setattr(report, "accuracy", lambda store, job: {
        "labelled": 300, "top1": 0.0, "top5": 0.0033})
    (line,) = report.job_notes(None, "j", None, "alexnet")
    assert line.startswith("accuracy on 300 labelled images: top-1 0.00%, top-5 0.33% (")
    assert "untrained" in line
    for other in ("digits", "/models/resnet50.onnx", None):
        assert report.job_notes(None, "j", None, other) == [
            "accuracy on 300 labelled images: top-1 0.00%, top-5 0.33%"]
