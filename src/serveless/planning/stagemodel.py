"""The performance model of a stage, from a calibration: its wall time per image at any
memory size and micro-batch, its model load, its bytes in and out, and its peak memory.

A stage is a run of consecutive calibration blocks, so its figures are sums of the
blocks'; both the planner's search (jobmodel.py, on whole grids at once) and the
simulator (simulate.py, one invocation at a time) price stages through this one model,
so the plan and the simulation of the same job cannot disagree about a stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CalibrationError

HEADROOM = 1.25
"""Memory must exceed the predicted peak by 25%: the model is built from per-block figures
and missed a whole stage 0's measured peak by 15% (138 vs 162 MB, AlexNet to pool5)."""


def _path(cal: dict[str, Any], key: str) -> float:
    return float(cal.get(key) or 0.0)


def calibration_batch(cal: dict[str, Any]) -> int:
    """The micro-batch a calibration timed its blocks at (16 before it was recorded)."""
    return int(cal.get("calibration_batch", 16))


def wall_ms_per_image(inp: Any, c1: Any, c: Any, out: Any, v: Any) -> Any:
    """Wall ms per image of a stage at v vCPUs from its CPU ms per image at 1 vCPU: `inp`
    on the input side (decode or read, on the prefetch thread), `c1` the model (`c` its wall
    time at v, by `speedup`), `out` on the output side (on the calling thread, after each
    micro-batch). Up to 1 vCPU everything shares the quota; above it, the two threads
    overlap and the slower one, or the quota, sets the pace."""
    v = np.asarray(v, dtype=float)
    vv = np.maximum(v, 1e-9)
    below = (inp + out) / vv + c
    above = np.maximum(np.maximum(inp, c + out), (inp + c1 + out) / vv)
    return np.where(v <= 1.0, below, above)


def speedup(vcpus: Any, s2: float) -> Any:
    """Speed-up over 1 vCPU at `vcpus`: proportional below 1 vCPU (a CPU quota), Amdahl's law
    above it with the parallel fraction that gives the measured speed-up `s2` at 2 vCPUs."""
    v = np.asarray(vcpus, dtype=float)
    p = min(1.0, max(0.0, 2.0 * (1.0 - 1.0 / max(s2, 1.0))))
    return np.where(v <= 1.0, v, 1.0 / ((1.0 - p) + p / np.maximum(v, 1e-9)))


@dataclass
class StageModel:
    """Blocks first..last (inclusive) of a calibration as one stage at micro-batch B."""

    cal: dict[str, Any]
    first: int
    last: int
    micro_batch: int

    @property
    def blocks(self) -> list[dict[str, Any]]:
        return self.cal["blocks"][self.first:self.last + 1]

    def _ms_at_batch(self, b: dict[str, Any]) -> float:
        """ms per image at 1 vCPU at this micro-batch: between 1 and the calibration batch,
        a per-call part shrinking as 1/B; above it, the calibration batch's figure. The 1/B
        law does not hold past it: a fully connected layer's weight reads, the per-call
        part at batch 1, overlap its arithmetic at larger batches. Extrapolated from 16 to
        32 it predicted AlexNet's FC stage 20% faster than it ran."""
        bc = float(calibration_batch(self.cal))
        t1, tc = b["ms_per_image_b1"], b["ms_per_image"]
        if self.micro_batch >= bc or bc <= 1:
            return float(tc)
        tinf = max(0.0, (bc * tc - t1) / (bc - 1))
        return tinf + max(0.0, t1 - tinf) / self.micro_batch

    def input_ms_per_image(self) -> float:
        """CPU ms per image at 1 vCPU on the input side (the prefetch thread): stage 0 parses
        its record and decodes; a later stage reads the intermediate tensor."""
        if self.first == 0:
            return float(self.cal["decode_ms_per_image"]) + _path(self.cal,
                                                                  "record_ms_per_image")
        return _path(self.cal, "read_ms_per_mb") * self.bytes_in_per_image / 2**20

    def output_ms_per_image(self) -> float:
        """CPU ms per image at 1 vCPU on the output side (after each micro-batch, on the
        calling thread): the intermediate tensor written, or the predictions."""
        if self.last == len(self.cal["blocks"]) - 1:
            return _path(self.cal, "predictions_ms_per_image")
        return _path(self.cal, "write_ms_per_mb") * self.bytes_out_per_image / 2**20

    def first_call_ms(self) -> float:
        """CPU ms at 1 vCPU that an instance's first call costs beyond a warm one: each
        block's first onnxruntime run, and stage 0's import of its decoders."""
        extra = sum(float(b.get("first_run_ms", 0.0)) for b in self.blocks)
        return extra + (_path(self.cal, "stage0_first_call_ms") if self.first == 0 else 0.0)

    def ms_per_image(self, vcpus: Any, cpu_factor: float = 1.0, threads: Any = None) -> Any:
        """Wall ms per image at a CPU share of `vcpus` (array or scalar); see
        `wall_ms_per_image`. `threads`: the model's intra-op threads where they may be
        fewer than the share (a platform whose quota exceeds what its memory's vCPUs
        would give: 1769 MB at 1.5 vCPUs runs 1 thread); the stage then runs as at
        min(vcpus, threads). Its input thread does not use the rest: under the local
        backend's cpu_scale=1.5 a 1769 MB whole-model stage used 1.01 cores, and a share
        of 1.5 made its simulation 12% fast (bench_fit, 2026-12-04). None: as many
        threads as the share, rounded up (the driver's rule)."""
        v = np.asarray(vcpus, dtype=float)
        if threads is not None:
            v = np.minimum(v, np.asarray(threads, dtype=float))
        c = sum(self._ms_at_batch(b) / speedup(v, b["speedup_2vcpu"]) for b in self.blocks)
        c1 = sum(self._ms_at_batch(b) for b in self.blocks)
        return wall_ms_per_image(self.input_ms_per_image(), c1, c,
                                 self.output_ms_per_image(), v) / cpu_factor

    def ms_per_record(self, images: int, vcpus: float, cpu_factor: float = 1.0,
                      threads: float | None = None) -> float:
        """Wall ms of a call on `images` images: full micro-batches, then the rest as one
        smaller batch, which pays a whole per-call part for fewer images (AlexNet's FC
        stage reads its 230 MB of weights for a last batch of 4 as for one of 32: 7% of a
        100-image record's time)."""
        full, rest = divmod(int(images), self.micro_batch)
        ms = full * self.micro_batch * float(self.ms_per_image(vcpus, cpu_factor, threads))
        if rest:
            tail = StageModel(self.cal, self.first, self.last, rest)
            ms += rest * float(tail.ms_per_image(vcpus, cpu_factor, threads))
        return ms

    @property
    def bytes_in_per_image(self) -> float:
        if self.first == 0:
            return float(self.cal["input_bytes_per_image"])
        return float(self.cal["blocks"][self.first - 1]["bytes_out_per_image"])

    @property
    def bytes_out_per_image(self) -> float:
        return float(self.blocks[-1]["bytes_out_per_image"])

    @property
    def model_bytes(self) -> int:
        return int(sum(b["model_bytes"] for b in self.blocks))

    def load_ms(self, vcpus: Any, cpu_factor: float = 1.0) -> Any:
        """Model load (session creation), measured at 1 vCPU, slower below 1 vCPU."""
        ms = self.cal["load_ms_fixed"] + self.cal["load_ms_per_mb"] * self.model_bytes / 2**20
        return ms / np.minimum(np.asarray(vcpus, dtype=float), 1.0) / cpu_factor

    def peak_mb(self) -> float:
        """Predicted peak memory of an instance: runtime + weights + the largest block's
        activations at this micro-batch + the prefetched next micro-batch; or the cold
        peak of the model load, whichever is higher. Independent of images per record:
        the function streams its input and output."""
        base = float(self.cal["runtime_mb"])
        weights = sum(b["weights_mb"] for b in self.blocks)
        act = max(b["act_mb_base"] + b["act_mb_per_image"] * self.micro_batch
                  for b in self.blocks)
        first_in = 4.0 * 3 * np.prod(self.cal.get("input_hw", [224, 224])) if self.first == 0 \
            else self.bytes_in_per_image
        prefetch = self.micro_batch * first_in / 2**20
        cold = sum(b.get("load_peak_mb", b["weights_mb"]) for b in self.blocks)
        return base + max(weights + act + prefetch, cold)

    def memory_needed(self) -> int:
        """The smallest memory size (MB) this stage is allowed: peak × HEADROOM."""
        return int(math.ceil(self.peak_mb() * HEADROOM))


def stage_ranges(cal: dict[str, Any], cuts: list[str]) -> list[tuple[int, int]]:
    """(first, last) block of each stage for cuts that are calibration boundaries."""
    bounds = list(cal["boundaries"])
    idx = []
    for c in cuts:
        if c not in bounds:
            raise CalibrationError(f"cut {c!r} is not a block boundary of the calibration "
                                   f"(boundaries: {', '.join(bounds)})")
        idx.append(bounds.index(c))
    if idx != sorted(set(idx)):
        raise CalibrationError(f"cuts {cuts} are not in the model's order")
    ends = [*idx, len(cal["blocks"]) - 1]
    starts = [0, *[i + 1 for i in idx]]
    return list(zip(starts, ends, strict=True))


def stage_models(cal: dict[str, Any], cuts: list[str], micro_batch: int) -> list[StageModel]:
    return [StageModel(cal, a, b, micro_batch) for a, b in stage_ranges(cal, cuts)]
