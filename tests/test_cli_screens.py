"""What a person sees (issue 24): every table whole at 40, 80 and 120 columns, prose wrapped
at words with paths whole, no Python repr; and the HTML report, self-contained.

The commands run on a real pseudo-terminal of each width (tests/screen.py), as in a tmux
pane; the renderers alone run on one in this process. A screen's rules are checked by
screen.check_screen: no line wider than the terminal unless it is one word standing
alone, no `…`, no `{'`, `['`, True/False/None, and each value given whole on one line.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import tables, write_recorded_job
from rich.text import Text
from screen import check_screen, run_on_terminal, terminal_console
from typer.testing import CliRunner

from serveless.cli import app
from serveless.report.document import print_markdown
from serveless.report.tables import Table, print_table
from serveless.report.wrap import wrap_text
from serveless.store import Store

WIDTHS = (40, 80, 120)
LONG_JOB = "photos-20261204-1-holiday-pictures-2026"  # 39 characters
runner = CliRunner()


# -- prose: words, not characters -----------------------------------------------------------


def test_prose_breaks_at_words_and_a_path_stands_alone_whole():
    path = "/data/" + "/".join(["folder-name"] * 8) + "/predictions/*.jsonl"
    text = Text(f"wrote 60 rows of predictions to {path} in 1.2 s; see the log")
    text.stylize("bold", 0, 5)
    out = wrap_text(text, 30)
    lines = out.plain.split("\n")
    assert lines[0] == "wrote 60 rows of predictions"
    assert path in lines and all(len(x) <= 30 for x in lines if x != path)
    assert " ".join(lines) == text.plain  # nothing lost or added but the breaks
    assert out.spans[0].style == "bold" and out.plain[:5] == "wrote"  # styles kept
    hung = wrap_text("- an item whose words run on past the width", 20, hang="  ")
    assert hung.plain.split("\n")[1].startswith("  ") and "\n- " not in hung.plain
    assert wrap_text("short enough", 80).plain == "short enough"


@pytest.mark.parametrize("columns", WIDTHS)
def test_the_console_wraps_prose_at_words_on_a_terminal(columns):
    path = "/" + "/".join(["folder-name"] * 12) + "/00001.tfrecord"
    line = f"{path}: byte 120: data CRC mismatch, the record is refused before any call"
    with terminal_console(columns) as (console, shown):
        console.print(line, markup=False, highlight=False)
        screen = shown()
    check_screen(screen, columns, whole=[path])
    assert " ".join(screen.split()) == line
    if columns < len(line):
        assert len(screen.strip().splitlines()) > 1


# -- tables: whole, split, or one record per block ------------------------------------------


def _jobs_table() -> Table:
    rows = [[LONG_JOB, "done", "3/3", "1,500", "0", "0.000734", "0.49", "2026-12-04 09:12:44"],
            ["b", "failed", "1/4", "100", "12", "0.000010", "0.10", "-"]]
    return Table(["job", "state", "records", "images", "failed images", "cost $", "$ per 1M",
                  "last run (UTC)"], rows, "jobs in /tmp/store", left=2)


@pytest.mark.parametrize("columns", [*WIDTHS, 200])
def test_a_table_is_printed_whole_split_or_by_record_never_cut(columns):
    t = _jobs_table()
    with terminal_console(columns) as (console, shown):
        print_table(console, t)
        screen = shown()
    check_screen(screen, columns, whole=[c for r in t.rows for c in r] + list(t.columns))
    one_header = any(all(c in line for c in t.columns) for line in screen.splitlines())
    if columns == 200:
        assert one_header and "(1 of" not in screen
    elif columns == 80:  # the name and what fits beside it, as often as it takes
        assert not one_header and "jobs in /tmp/store (1 of 3)" in screen
        assert "jobs in /tmp/store (3 of 3)" in screen
        assert screen.count(LONG_JOB) == 3  # each part names its rows
    elif columns == 40:  # not even the name and one more column: a block per job
        # "job <name>" is 44 columns: the name stands alone on the next line, whole
        assert f"job\n{LONG_JOB}\n  state: done" in screen, screen
        assert "job b\n  state: failed" in screen, screen


def test_a_name_that_leaves_room_for_one_value_per_table_gives_a_block_per_row():
    """`serveless jobs` at 80 columns with a 51-character job name: four tables of the name
    and one value each would be split, so each job is printed as a block."""
    t = _jobs_table()
    t.rows[0][0] = "holiday-photos-from-the-summer-of-2026-20261204-1"
    with terminal_console(80) as (console, shown):
        print_table(console, t)
        screen = shown()
    check_screen(screen, 80, whole=[c for r in t.rows for c in r])
    assert "(1 of" not in screen
    assert f"job {t.rows[0][0]}\n  state: done\n  records: 3/3" in screen, screen


def test_a_caller_s_column_groups_are_kept_when_they_fit():
    t = Table(["stage", "a-long-column", "b-long-col", "c-long-column"],
              [["0", "1", "2", "3"]], "T", left=0,
              groups=[("T: a and b", [0, 1, 2]), ("T: c", [0, 3])])
    with terminal_console(40) as (console, shown):
        print_table(console, t)
        screen = shown()
    check_screen(screen, 40)
    assert "T: a and b" in screen and "T: c" in screen and "(1 of" not in screen


# -- the experiments' reports, rendered from their markdown --------------------------------


def _experiment_markdowns(store: Store, job: str, rows: list[dict]) -> dict[str, str]:
    from serveless.experiments import (
        baseline_from,
        baseline_markdown,
        memory_compare_from_logs,
        memory_compare_markdown,
        sweep_from_logs,
        sweep_markdown,
    )
    from serveless.experiments.profile import profile_markdown
    from serveless.report.machine import machine_info

    info = machine_info()
    sweep = sweep_from_logs({1: rows, 2: rows}, [1769, 1769], "x86_64")
    sweep.update({"model": "alexnet", "records": 4, "jobs": [job], "store": store.url,
                  "memory": [1769, 1769], "arch": "x86_64", "machine": info})
    mem = memory_compare_from_logs({("memMin", 25): rows}, {"memMin": [1769, 1769]}, "x86_64")
    mem.update({"model": "alexnet", "sizes": [25], "concurrency": 1, "store": store.url,
                "arch": "x86_64", "machine": info})
    base = {"records": [{"images": 25, "seconds": 0.5}], "provider": "CPUExecutionProvider",
            "threads": 1, "provider_note": "as asked", "load_s": 0.25}
    b = baseline_from(rows, base, [25])
    b.update({"baseline": base, "model": "alexnet", "job": job, "store": store.url,
              "cuts": ["pool5"], "memory": [1769, 1769], "micro_batch": 25, "machine": info})
    stage = {"stage": 0, "peak_mb": 181.2, "recommended_mb": 256,
             "sizes": {"100": {"invocations": 1, "peak_mb": 181.2, "duration_s": 2.5}}}
    profile = {"sizes": [100], "stages": [stage, {**stage, "stage": 1}], "step": 64,
               "cuts": ["pool5"], "model": "alexnet", "micro_batch": 32, "repeat": 1,
               "memory_mb_profiled": 3008, "store": store.url, "jobs": [job],
               "recommended_mb": [256, 256], "machine": info}
    return {"sweep": sweep_markdown(sweep), "memory-compare": memory_compare_markdown(mem),
            "baseline": baseline_markdown(b), "profile": profile_markdown(profile, [2048, 768])}


@pytest.mark.parametrize("columns", WIDTHS)
def test_experiment_reports_fit_the_terminal(recorded_job, columns, tmp_path):
    store, job, rows = recorded_job
    for name, md in _experiment_markdowns(store, job, rows).items():
        with terminal_console(columns) as (console, shown):
            print_markdown(console, md, tmp_path)
            screen = shown()
        cells = [c for t in tables(md) for r in t for c in r.values()]
        check_screen(screen, columns, whole=[str(tmp_path / f"{name}.png")], prose=cells)
        assert "|" not in screen and not re.search(r"^#", screen, re.M), screen


# -- the HTML report --------------------------------------------------------------------------


class _Page(HTMLParser):
    """Every start tag with its attributes, the text, and whether tags nest correctly."""

    VOID = {"meta", "br", "img", "hr", "input", "link", "path", "use", "stop", "rect",
            "circle", "line", "polyline", "polygon", "ellipse", "image"}

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.stack: list[str] = []
        self.text: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
            return
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.close()
    assert not p.errors and not p.stack, (p.errors, p.stack)
    return p


def _no_external_reference(p: _Page, page: str) -> None:
    for tag, attrs in p.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed", "img"), tag
        for name in ("src", "href", "xlink:href", "action"):
            value = attrs.get(name)
            if value is not None:  # only references inside the page (#id)
                assert value.startswith("#"), (tag, name, value)
    assert "url(http" not in page and "@import" not in page


@pytest.fixture
def reported(recorded_job, tmp_path):
    """The recorded job with a failed image whose name is markup, a plan stored with it,
    reported with --out and --html."""
    store, job, rows = recorded_job
    log = [json.loads(x) for x in store.get_bytes(f"{job}/invocations.jsonl").splitlines()]
    last = max(r["stage"] for r in log)
    final = [r for r in log if r["stage"] == last][0]
    final["image_errors"] = 1
    final["failed_images"] = [["<script>alert(1)</script>.jpg", "broken JPEG: truncated"]]
    store.put_bytes(f"{job}/invocations.jsonl",
                    "".join(json.dumps(r) + "\n" for r in log).encode())
    plan = {"kind": "serveless-plan", "images": 100, "predicted": {
        "label": "planner model (simulated)", "wall_s": 10.0, "cost": 5e-5,
        "per_million": 0.5, "peak_mb": [200.0, 400.0]}}
    store.put_bytes(f"{job}/plan.json", json.dumps(plan).encode())
    out = tmp_path / "report"
    res = runner.invoke(app, ["report", job, "--store", store.url, "--out", str(out),
                              "--html", str(tmp_path / "one.html")])
    assert res.exit_code == 0, res.output
    return store, job, log, out, tmp_path / "one.html"


def test_the_html_report_holds_what_the_markdown_holds_and_nothing_external(reported):
    store, job, log, out, one = reported
    md = (out / "report.md").read_text()
    beside = (out / "report.html").read_text()
    page = one.read_text()
    assert beside == page  # --out writes the same page beside report.md
    p = _parse(page)
    _no_external_reference(p, page)
    text = " ".join("".join(p.text).split())
    for t in tables(md):
        for row in t:
            for cell in row.values():
                assert " ".join(cell.replace("`", "").split()) in text, cell
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(figures) == 3 and all((out / f).is_file() for f in figures)
    assert sum(1 for tag, _ in p.tags if tag == "svg") == len(figures)
    assert sum(1 for tag, _ in p.tags if tag == "figure") == len(figures)
    # markup in a file name is text: escaped, never a tag
    assert "<script>alert(1)</script>.jpg" in text
    assert not any(tag == "script" for tag, _ in p.tags)
    assert '<meta name="viewport"' in page and "overflow-x: auto" in page


def test_a_job_run_from_a_plan_is_reported_against_it(reported):
    store, job, log, out, _ = reported
    md = (out / "report.md").read_text()
    (plan_table,) = [t for t in tables(md) if t and "planned (simulated)" in t[0]]
    by = {r[""]: r for r in plan_table}
    per_million = float(by["$ per 1M images"]["measured"])
    assert by["$ per 1M images"]["planned (simulated)"] == "0.500"
    assert float(by["$ per 1M images"]["measured / planned"]) == pytest.approx(
        per_million / 0.5, abs=1e-3)
    span = max(r["started"] + (r["init_ms"] + r["duration_ms"]) / 1000 for r in log) - min(
        r["started"] for r in log)
    assert float(by["wall s"]["measured"]) == pytest.approx(span, abs=0.01)
    assert by["wall s"]["planned (simulated)"] == "10.00"
    peak1 = max(r["peak_mb"] for r in log if r["stage"] == 1 and r["error"] is None)
    assert float(by["peak MB, stage 1"]["measured"]) == pytest.approx(peak1, abs=0.5)


# -- the commands on a terminal ---------------------------------------------------------------


@pytest.fixture(scope="module")
def screens_store(tmp_path_factory) -> Path:
    """A store with the recorded job under a long name and a short one."""
    root = tmp_path_factory.mktemp("screens") / "a-store-folder-with-a-long-name"
    store = Store(str(root))
    write_recorded_job(store, LONG_JOB)
    write_recorded_job(store, "short")
    return root


def _on_terminals(commands: list[list[str]]) -> dict[tuple[int, int], tuple[int, str, str]]:
    """Each command at each width, a few at a time: (command index, width) -> result. A
    `{columns}` in an argument becomes the width (an output file per width)."""
    jobs = [(k, w) for k in range(len(commands)) for w in WIDTHS]

    def one(kw: tuple[int, int]) -> tuple[int, str, str]:
        k, w = kw
        return run_on_terminal(*[a.replace("{columns}", str(w)) for a in commands[k]],
                               columns=w)

    with ThreadPoolExecutor(3) as pool:
        results = pool.map(one, jobs)
        return dict(zip(jobs, results, strict=True))


@pytest.mark.e2e
def test_every_table_printing_command_fits_40_80_and_120_columns(screens_store, tiny_plan,
                                                                 tmp_path):
    root, plan = tiny_plan
    store = str(screens_store)
    commands = [
        ["jobs", "--store", store],
        ["jobs", "show", LONG_JOB, "--store", store],
        ["report", LONG_JOB, "--store", store],
        ["models", "list"],
        ["partition", str(root / "tiny.onnx"), "--list"],
        ["simulate", "--plan", str(root / "plan.json")],
        ["plan", str(root / "tiny.onnx"), "--images", "60", "--deadline", "3600", "--target",
         "local", "--max-concurrency", "2", "--calibration", str(root / "cal.json"),
         "--memory-step", "256", "--out", str(tmp_path / "plan-{columns}.json")],
        ["fit", LONG_JOB, "--store", store, "--calibration",
         str(Path(__file__).resolve().parent / "data" / "replay-calibration.json"), "--out",
         str(tmp_path / "profile-{columns}.json")],
    ]
    expect = [[LONG_JOB, "4/4", store],
              [LONG_JOB, "float32, uncompressed", "none (not running)"],
              ["Per stage", "images/s"],
              ["alexnet"],
              ["per-sample shape"],
              ["wall s"],
              ["chosen plan"],
              ["cpu_factor, stage 1, 1 vCPU", "platform_init_ms"]]
    for (k, columns), (code, screen, err) in _on_terminals(commands).items():
        assert code == 0, (commands[k], err, screen)
        check_screen(screen, columns, whole=expect[k])


@pytest.mark.e2e
@pytest.mark.parametrize("columns", WIDTHS)
def test_calibrate_and_an_experiment_fit_the_terminal(tiny_plan, tmp_path, columns):
    root, _ = tiny_plan
    code, screen, err = run_on_terminal(
        "calibrate", str(root / "tiny.onnx"), "--out", str(tmp_path / "cal.json"), "--store",
        str(tmp_path / "store"), columns=columns)
    assert code == 0, err + screen
    check_screen(screen, columns, whole=["ms/image, 1 vCPU", str(tmp_path / "cal.json")])
    out = tmp_path / "sweep"
    code, screen, err = run_on_terminal(
        "sweep", "--model", str(root / "tiny.onnx"), "--concurrency", "1", "--images", "4",
        "--per-record", "4", "--store", str(tmp_path / "store"), "--out", str(out),
        columns=columns)
    assert code == 0, err + screen
    md = (out / "sweep.md").read_text()
    cells = [c for t in tables(md) for r in t for c in r.values()]
    check_screen(screen, columns, whole=[str(out / "sweep.png")], prose=cells)
