"""An embeddings job priced: the calibration of the job that stores a tensor's vectors.

`run --output embeddings --tensor NAME` runs the model up to NAME and writes, per image, its
vector (D × 4 bytes, or 2 with --float16) and a short row, where a predictions job writes a
row of top-5 scores (about 260 bytes). So the planner and the simulator price it with the
same calibration, changed in three places (`for_output`):

- the blocks after NAME are dropped: NAME must be one of the calibration's block
  boundaries, as a cut must (compact tensors, the usual embeddings, are the boundaries
  the calibration keeps longest: it drops the largest first; `calibrate --keep NAME`
  keeps any);
- the last block writes the vector and the row per image (`bytes_out_per_image`), which
  the store's bandwidth and request figures then price as any stage output;
- the function's output-side CPU per image is the calibration's write cost per MB of
  those bytes, in place of the time it measured to build predictions rows; and the last
  stage makes two PUTs per record, not one (`last_stage_puts`).

For the model's own output (no --tensor) the width is the calibration's
`output_bytes_per_image`, which calibrations record since embeddings came in.
"""

from __future__ import annotations

import copy
from typing import Any

from ..errors import CalibrationError

EMBEDDING_ROW_BYTES = 184
"""One embeddings row (record, index, filename, id, label, class_name, error): the mean of
30 rows of a folder job with class folders, `class_000/img_000000.jpg` as filename and id."""


def for_output(cal: dict[str, Any], output: str = "predictions", tensor: str = "",
               float16: bool = False) -> dict[str, Any]:
    """The calibration of a job with this output: `cal` itself for predictions, else a copy
    that ends at `tensor` and writes its vectors (see the module's docstring). The copy
    says what it prices under "output", which plan.json keeps for `run --plan`."""
    if output == "predictions":
        if tensor or float16:
            raise CalibrationError("--tensor and --float16 price an --output embeddings job")
        return cal
    if output != "embeddings":
        raise CalibrationError(f"--output must be predictions or embeddings, got {output!r}")
    out = copy.deepcopy(cal)
    bounds = list(cal["boundaries"])
    if tensor:
        if tensor not in bounds:
            raise CalibrationError(
                f"--tensor {tensor!r} is not a block boundary of the calibration of "
                f"{cal.get('model')}, so its blocks cannot be priced up to it; its "
                f"boundaries are {', '.join(bounds) or 'none'} (`serveless calibrate "
                f"MODEL --keep {tensor}` keeps it one)")
        end = bounds.index(tensor)
        out["blocks"] = copy.deepcopy(cal["blocks"][:end + 1])
        out["boundaries"] = bounds[:end]
        width = float(cal["blocks"][end]["bytes_out_per_image"])
        out["whole_load_ms"] = out["whole_model_bytes"] = None  # of the whole model
    else:
        width = cal.get("output_bytes_per_image")
        if not width:
            raise CalibrationError(
                "this calibration predates embeddings and does not know the model output's "
                f"width; run `serveless calibrate {cal.get('model')}` again, or give "
                "--tensor")
        width = float(width)
    vector = width / 2 if float16 else width
    written = vector + EMBEDDING_ROW_BYTES
    out["blocks"][-1]["bytes_out_per_image"] = written
    out["predictions_ms_per_image"] = float(cal.get("write_ms_per_mb") or 0.0) * written / 2**20
    out["output"] = {"kind": "embeddings", "tensor": tensor,
                     "dtype": "float16" if float16 else "float32",
                     "vector_bytes_per_image": vector}
    return out


def last_stage_puts(cal: dict[str, Any]) -> int:
    """Objects the last stage writes per record: its rows, and an embeddings job's vectors
    before them."""
    return 2 if output_of(cal)["kind"] == "embeddings" else 1


def output_of(cal: dict[str, Any]) -> dict[str, Any]:
    """What a (possibly changed) calibration prices: {"kind": "predictions"} or the
    embeddings' kind, tensor and dtype."""
    return cal.get("output") or {"kind": "predictions"}
