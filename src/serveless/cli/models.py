"""`serveless models` (the built-in models) and `serveless partition` (cut candidates, stages)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..report.tables import Table, print_table
from ..store.layout import stage_file
from .app import app, models_app
from .common import (
    CalibrationOpt,
    QuantizeOpt,
    WeightsOpt,
    console,
    fail,
    guarded,
    say,
)


@models_app.command("export")
def models_export(
    name: Annotated[str, typer.Argument(help="built-in model name, e.g. alexnet")],
    file: Annotated[Path, typer.Argument(help="where to write the .onnx file")],
    seed: Annotated[int, typer.Option(help="seed of the deterministic weights")] = 0,
) -> None:
    """Write a built-in model as one ONNX file."""
    from ..errors import ModelError
    from ..model.builtins import BUILTIN
    from ..model.graph import save_model

    if name not in BUILTIN:
        fail(f"unknown built-in model {name!r}; known: {', '.join(sorted(BUILTIN))}")
    try:
        save_model(BUILTIN[name](seed=seed), file)
    except ModelError as exc:
        fail(str(exc))
    say(f"wrote {file} ({file.stat().st_size / 1e6:.1f} MB)")


@models_app.command("list")
def models_list() -> None:
    """List the built-in models."""
    from ..model.builtins import BUILTIN
    from ..model.presets import PAPER_PRESET

    rows = [[name, ",".join(PAPER_PRESET.get(name, [])) or "-"] for name in sorted(BUILTIN)]
    print_table(console, Table(["model", "paper preset cuts (--preset paper)"], rows,
                               "built-in models", left=2))


@app.command("partition")
def partition_cmd(
    model: Annotated[str, typer.Argument(help="built-in name or path to an .onnx file")],
    list_cuts: Annotated[bool, typer.Option("--list", help="list candidate cut tensors")] = False,
    cuts: Annotated[str | None, typer.Option(help="comma-separated cut tensors")] = None,
    preset: Annotated[str | None, typer.Option(help="'paper' for the paper's stages")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for stage-<k>.onnx")] = None,
    quantize: QuantizeOpt = None,
    weights: WeightsOpt = None,
    calibration_images: CalibrationOpt = 64,
    records: Annotated[str | None, typer.Option(
        help="folder or glob of .tfrecord files to calibrate and measure --quantize on")] = None,
) -> None:
    """List cut candidates, or split a model into stages and check them against it."""
    from ..data.sources import find_records
    from ..model import quantize as q
    from ..model.graph import input_hw, preprocessing, save_model
    from ..model.loading import load_model
    from ..model.partition import list_cuts as candidates
    from ..model.partition import output_of, partition, resolve_cuts

    def go() -> None:
        onnx_model = load_model(model)
        if list_cuts:
            rows = [[c.name, c.op, "×".join(map(str, c.shape)),
                     f"{c.bytes_per_sample / 1024:,.1f}"]
                    for c in [*candidates(onnx_model), output_of(onnx_model)]]
            rows[-1][1] = f"{rows[-1][1]} (output)"
            print_table(console, Table(
                ["tensor", "op", "per-sample shape", "per-sample KB"], rows,
                f"cut candidates of {model} (topological order), and its output", left=3))
            say("Any of these tensors can be run's --tensor for --output embeddings; a cut "
                "must come before it.")
            return
        if out is None:
            fail("give --out DIR (or --list)")
        names = resolve_cuts(model, cuts, preset)
        q.check_settings(quantize, weights, calibration_images)
        mode = q.mode_name(quantize, weights)
        if mode is None:
            stages = partition(onnx_model, names, out_dir=out)
            say(f"wrote {len(stages)} stages to {out}; chained output matches the model")
            return
        if records is None:
            fail(f"--quantize/--weights need --records: images to calibrate and measure {mode} on")
        files = find_records(records)
        openers = [(f, lambda f=f: open(f, "rb")) for f in files]
        stages = partition(onnx_model, names)
        stages, info = q.prepare(None, onnx_model, names, stages, openers, quantize, weights,
                                 input_hw(onnx_model), preprocessing(onnx_model),
                                 calibration_images)
        for k, stage in enumerate(stages):
            save_model(stage, out / stage_file(k))
        say(f"wrote {len(stages)} {mode} stages to {out}")
        for line in q.summary_lines(info):
            say(line)

    guarded(go)


