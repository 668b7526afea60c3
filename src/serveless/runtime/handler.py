"""The function that serves one stage on one record: `handle(event) -> metrics`.

Any backend calls it (a local worker process, a Lithops call, a Lambda handler). An event
of kind `calibrate` is a calibration call instead (`calibration.py`), imported only then:
a stage's cold start does not pay for it. For a stage, it keeps
the stage's onnxruntime session for the life of the instance (warm starts, `loader.py`),
streams its input object in micro-batches while the next block is read and decoded on a
second thread (`inputs.py`), writes its output object atomically (`outputs.py`), and
returns small JSON-safe metrics (`protocol.Metrics`); tensors only ever go through the
store.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from ..cost import vcpus
from ..data.predictions import parse_classes, parse_meta
from ..data.tensors import TensorFormat
from ..store import JobLayout, Store
from .counters import Counters
from .cpu import usable_threads
from .inputs import InputObject, image_blocks, prefetch, run_blocks, tensor_blocks
from .loader import load_stage, reported
from .memory import ChargeSampler, cgroup_peak_mb, enforced_peak_mb
from .memory import reset_rss_peak as reset_peak
from .memory import rss_peak_mb as peak_mb
from .outputs import write_embeddings, write_predictions, write_tensor
from .protocol import CALIBRATE, Event, Metrics, call_metadata

_invocations = 0


def handle(event: dict[str, Any]) -> dict[str, Any]:
    """Run one stage of the model on one record; return its metrics (`Metrics`, as JSON).
    A calibration event (kind `calibrate`) is answered by runtime/calibration.py."""
    global _invocations
    if event.get("kind") == CALIBRATE:
        from .calibration import serve

        return serve(event)
    t0 = time.perf_counter()
    if _invocations:  # a cold invocation's peak includes its init (process start, model load)
        reset_peak()
    _invocations += 1
    ev = Event.parse(event)
    ev = replace(ev, threads=usable_threads(ev.threads))
    store = Store.from_spec(ev.store)
    layout = JobLayout(ev.job)
    fmt = TensorFormat.from_dict(ev.format)
    c = Counters()

    model_key = ev.model or layout.stage_model(ev.stage)
    loaded = load_stage(store, model_key, ev.threads)
    # The first call after an instance's init (the local backend loads the stage before
    # the first event) reports that load: where the model came from, and its requests.
    call = _Call(ev, t0, loaded.init_ms, reported(loaded))
    if call.load.bytes:
        c.got(call.load.bytes, call.load.gets)
    c.heads += call.load.heads
    with ChargeSampler() as call.sampler:  # the peak the memory cap is held to (memory.py)
        n, meta, written, failed = _serve(ev, store, layout, fmt, loaded.session, c, call)
    errors = len(meta.get("errors", {})) if meta else 0
    return call.metrics(c, n, errors, written, failed).to_dict()


class _Call:
    """One invocation being served: its figures at any moment, for its metrics at the end
    and for the call stored with its output (which resume recovers a lost log row from)."""

    def __init__(self, ev: Event, t0: float, init_ms: float, load: Any):
        self.ev, self.t0, self.init_ms, self.load = ev, t0, init_ms, load
        self.started = time.time() - (time.perf_counter() - t0)  # wall clock, at the call
        self.cpu0 = time.process_time()
        self.sampler: ChargeSampler | None = None

    def metrics(self, c: Counters, n: int, errors: int, written: dict[str, Any] | None,
                failed: list[list[str]] | None, writing: int | None = None) -> Metrics:
        """The call's metrics now; `writing`: the bytes of an object being written, counted
        as one more PUT."""
        rss_peak, cgroup_peak = peak_mb(), cgroup_peak_mb()
        sampled = self.sampler.peak_mb if self.sampler is not None else None
        charges = [p for p in (sampled, self.load.charge_peak_mb) if p is not None]
        peak = enforced_peak_mb(rss_peak, max(charges) if charges else None)
        # CPU of all the process's threads while serving: below duration × vCPUs, the call
        # waited (on the store, or on cores shared with other instances), not on its quota.
        cpu_ms = (time.process_time() - self.cpu0) * 1000
        return Metrics(
            stage=self.ev.stage,
            record=self.ev.record,
            images=n,
            image_errors=errors,
            cold=self.init_ms > 0,
            model_source=self.load.source,
            handler_init_ms=round(self.init_ms, 3),
            duration_ms=round((time.perf_counter() - self.t0) * 1000 - self.init_ms, 3),
            read_ms=round(c.read_ms, 3),
            compute_ms=round(c.compute_ms, 3),
            write_ms=round(c.write_ms, 3),
            cpu_ms=round(cpu_ms, 3),
            threads=self.ev.threads,
            bytes_in=c.bytes_in,
            bytes_out=c.bytes_out + (writing or 0),
            gets=c.gets,
            heads=c.heads,
            puts=c.puts + (writing is not None),
            peak_mb=round(peak, 1),
            peak_rss_mb=round(rss_peak, 1),
            peak_cgroup_mb=round(cgroup_peak, 1) if cgroup_peak else None,
            # the sampled charge less file cache (None without a cgroup of its own)
            peak_working_set_mb=round(max(charges), 1) if charges else None,
            output=written,
            failed_images=failed,
        )

    def stored(self, c: Counters, n: int, errors: Callable[[], int],
               ) -> Callable[[int], dict[str, str]]:
        """What a writer stores with the call's output: the call, as it stands when the
        object of `size` bytes is written."""
        return lambda size: call_metadata(
            self.ev, self.metrics(c, n, errors(), None, None, writing=size), self.started)


def _serve(ev: Event, store: Store, layout: JobLayout, fmt: TensorFormat, session: Any,
           c: Counters, call: _Call) -> tuple[int, dict[str, Any] | None, dict[str, Any],
                                              list[list[str]] | None]:
    """Read the input, run the stage, write the output: (images, record meta, written
    object, the failed images the last stage lists)."""
    input_name = session.get_inputs()[0].name
    last = ev.stage == ev.stages - 1

    if ev.stage == 0:
        in_key = layout.record(ev.record, ev.record_format)
    else:
        in_key = layout.stage_output(ev.stage - 1, ev.record, fmt.suffix)

    with InputObject(store, in_key, whole=ev.stage == 0) as src:
        if ev.stage == 0:
            n, blocks, meta = image_blocks(src.file, store.path(in_key), ev, c)
        else:
            n, blocks = tensor_blocks(src.file, fmt, ev.micro_batch, c)
            meta = None
        fixed = session.get_inputs()[0].shape[0]
        if ev.stage > 0 or vcpus(ev.memory_mb) > 1.0:
            blocks = prefetch(blocks)
        outputs = run_blocks(session, input_name, blocks, c,
                             fixed if isinstance(fixed, int) and fixed > 0 else None)
        failed: list[list[str]] | None = None
        if last:
            if meta is None:
                raw = store.get_bytes(layout.record_meta(ev.record))
                c.got(len(raw), 1 if store.s3 else None)
                meta = parse_meta(raw, layout.record_meta(ev.record))
            classes = None
            if ev.classes:
                raw = store.get_bytes(layout.labels)
                c.got(len(raw))
                classes = parse_classes(raw, layout.labels)
            out_key = layout.predictions(ev.record)
            kept: list[np.ndarray] | None = [] if ev.save_scores else None
            errors = meta.get("errors", {})
            stored = call.stored(c, meta["n"], lambda: len(errors))
            if ev.output == "embeddings":  # the vectors in the tensor format's dtype
                written, failed = write_embeddings(
                    store, layout.embeddings(ev.record), out_key, ev.record, outputs, meta, c,
                    fmt.dtype, classes, stored)
            else:
                written, failed = write_predictions(
                    store, out_key, ev.record, outputs, meta, c, ev.scores, classes, kept,
                    stored)
            if kept is not None:
                buf = io.BytesIO()
                np.save(buf, np.concatenate(kept) if kept else np.zeros((0, 0), np.float32))
                store.put_bytes(layout.scores(ev.record), buf.getvalue())
                c.put(buf.tell())
        else:
            out_key = layout.stage_output(ev.stage, ev.record, fmt.suffix)
            found = meta.get("errors", {}) if meta is not None else {}

            def put_meta() -> None:
                """Stage 0's record meta: its errors are known once every image is
                decoded, and it is written before the tensor appears, so a tensor in the
                store always has its meta (resume counts stage 0 done by the tensor)."""
                if meta is not None:
                    data = json.dumps(meta).encode()
                    store.put_bytes(layout.record_meta(ev.record), data)
                    c.put(len(data))

            written = write_tensor(store, out_key, n, outputs, fmt, c,
                                   call.stored(c, n, lambda: len(found)), put_meta)
        src.count(c)

    return n, meta, written, failed
