"""Fig. 4: time per record, the serverless pipeline against the whole model in one process."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.records import Example, iter_record
from ..report.machine import machine_info, machine_markdown
from ..report.tables import markdown_table
from ..store.layout import record_name
from .common import Setup, fmt, model_label, pack_records, record_times, write_json


def baseline_session(model_bytes: bytes, threads: int) -> tuple[Any, str, str]:
    """An onnxruntime session on the GPU when onnxruntime-gpu sees one, else on the CPU.

    Returns (session, provider used, why): the report must say which one ran, since a GPU
    changes the comparison entirely (the paper's Fig. 4 is against one GPU).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    available = ort.get_available_providers()
    why = "onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu is not installed)"
    if "CUDAExecutionProvider" in available:
        try:
            sess = ort.InferenceSession(
                model_bytes, opts, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            if sess.get_providers()[0] == "CUDAExecutionProvider":
                return sess, "CUDAExecutionProvider", "onnxruntime-gpu found a GPU"
            why = "CUDAExecutionProvider is installed but no GPU is usable"
        except Exception as exc:  # a broken CUDA install must not stop the CPU baseline
            why = f"CUDAExecutionProvider failed: {exc}"
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    return sess, "CPUExecutionProvider", why


def time_whole_model(model: str, paths: Sequence[Path], micro_batch: int,
                     threads: int) -> dict[str, Any]:
    """The plain single-process script: read, decode and run each record, timed per record.

    Same preprocessing (serveless.data.images.preprocess) and micro-batch as stage 0, the whole
    model in one session, decoding and inference one after the other on this thread.
    """
    from ..data.images import preprocess
    from ..model.graph import input_hw, preprocessing
    from ..model.loading import load_model

    t0 = time.perf_counter()
    onnx_model = load_model(model)
    size = input_hw(onnx_model)  # (H, W): non-square inputs too
    resize = preprocessing(onnx_model).get("resize")
    sess, provider, why = baseline_session(onnx_model.SerializeToString(), threads)
    del onnx_model
    load_s = time.perf_counter() - t0
    name = sess.get_inputs()[0].name
    per_record = []
    for path in paths:
        t = time.perf_counter()
        n = 0
        batch: list[np.ndarray] = []
        with open(path, "rb") as f:
            for ex in iter_record(f, str(path)):  # type: ignore[arg-type]
                try:
                    batch.append(preprocess(ex.encoded, size, resize=resize))
                except ValueError:
                    batch.append(np.zeros((3, *size), np.float32))
                n += 1
                if len(batch) == micro_batch:
                    _top5(sess, name, batch)
                    batch = []
        if batch:
            _top5(sess, name, batch)
        per_record.append({"record": record_name(path.name), "images": n,
                           "seconds": time.perf_counter() - t})
    return {"provider": provider, "provider_note": why, "threads": threads,
            "load_s": load_s, "records": per_record}


def _top5(sess: Any, name: str, batch: list[np.ndarray]) -> np.ndarray:
    """Run one micro-batch and rank it, as the last stage does for its predictions."""
    (probs,) = sess.run(None, {name: np.stack(batch)})
    return np.argsort(-probs.reshape(len(probs), -1), axis=1)[:, :5]


def run_baseline(setup: Setup, sizes: list[int], pool: Sequence[Example], out: Path,
                 memory: list[int], repeat: int = 1, threads: int | None = None,
                 job: str = "baseline-pipeline") -> dict[str, Any]:
    """Fig. 4: time per record, the serverless pipeline against one process, per size.

    The pipeline runs first, at concurrency 1 (one record's chain at a time, as the single
    process does), then the single process on the same record files, so the two never
    compete for the cores.
    """
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    threads = threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="serveless-baseline-") as tmp:
        folder = Path(tmp) / "records"
        paths = []
        for size in sizes:
            paths += pack_records(pool, size, repeat, folder, f"n{size:05d}")
        spec = setup.prepare(job, memory, folder)
        rows = setup.run(spec, concurrency=1)
        setup.say(f"running the whole model in one process ({threads} threads)…")
        base = time_whole_model(setup.model, paths, setup.micro_batch, threads)
    result = baseline_from(rows, base, sizes)
    result.update({"kind": "serveless-baseline", "model": setup.model, "cuts": setup.cuts,
                   "memory": spec.memory, "micro_batch": setup.micro_batch, "repeat": repeat,
                   "job": job, "store": setup.store.url, "machine": info, "baseline": base})
    write_json(out / "baseline.json", result)
    from ..report.plots import plot_baseline

    label = f"one process, {base['provider'].removesuffix('ExecutionProvider')}"
    if base["provider"] == "CPUExecutionProvider":
        label += f" ({threads} threads)"
    rs = result["sizes"]
    plot_baseline(sizes, [r["serverless_s"] for r in rs], [r["serverless_span_s"] for r in rs],
                  [r["baseline_s"] for r in rs], out / "baseline.png",
                  f"{model_label(setup.model)}: serverless pipeline vs one process, per record",
                  label)
    (out / "baseline.md").write_text(baseline_markdown(result, setup.backends_seen))
    return result


def baseline_from(rows: list[dict[str, Any]], base: dict[str, Any],
                  sizes: list[int]) -> dict[str, Any]:
    """Mean time per record of each size, the pipeline's from its log."""
    times = record_times(rows)
    out = []
    for size in sizes:
        sls = [t for t in times.values() if t["images"] == size]
        one = [r["seconds"] for r in base["records"] if r["images"] == size]
        entry = {
            "images_per_record": size,
            "records": len(sls),
            "serverless_s": statistics.fmean(t["stages_s"] for t in sls) if sls else 0.0,
            "serverless_span_s": statistics.fmean(t["span_s"] for t in sls) if sls else 0.0,
            "baseline_s": statistics.fmean(one) if one else 0.0,
        }
        entry["ratio"] = (entry["serverless_s"] / entry["baseline_s"]
                          if entry["baseline_s"] else None)
        out.append(entry)
    return {"sizes": out}


def baseline_markdown(b: dict[str, Any], backends: Sequence[dict[str, Any]] = ()) -> str:
    base = b["baseline"]
    rows = [[r["images_per_record"], r["records"], fmt(r["serverless_s"], 3),
             fmt(r["serverless_span_s"], 3), fmt(r["baseline_s"], 3), fmt(r["ratio"], 2),
             fmt(r["images_per_record"] / r["baseline_s"] if r["baseline_s"] else None, 1)]
            for r in b["sizes"]]
    table = markdown_table(
        ["images per record", "records", "serverless s (sum of stages)",
         "serverless s (end to end)", "one process s", "serverless / one process",
         "one process images/s"], rows)
    return "\n".join([
        f"# Serverless pipeline vs one process: {b['model']} (Fig. 4)",
        "",
        f"The same record files through the pipeline (job `{b['job']}` in `{b['store']}`, "
        f"{len(b['cuts']) + 1} stages at {'/'.join(map(str, b['memory']))} MB, concurrency 1, "
        f"micro-batch {b['micro_batch']}) and through the whole model in one process "
        "(read, decode with serveless.data.images.preprocess, run; one after the other).",
        "",
        f"**One process ran on {base['provider']}** with {base['threads']} intra-op threads "
        f"({base['provider_note']}); loading the model took {base['load_s']:.2f} s, "
        "not counted per record.",
        "",
        "![baseline](baseline.png)",
        "",
        markdown_table(["column", "what it measures"], [
            ["sum of stages", "the record's stage invocations' `duration_ms` summed (from the "
             "log): what the functions worked"],
            ["end to end", "first invocation start to last invocation end of the record "
             "(from the log): adds cold starts and hand-offs"],
            ["one process", "wall time of the record in the single process (baseline.json)"],
        ], right=set()),
        table,
        "Values are means over the records of each size.",
        "",
        machine_markdown(b["machine"], backends),
    ])
