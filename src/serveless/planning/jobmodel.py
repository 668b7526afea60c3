"""The planner's model of a job: every candidate stage's invocation time, cold start and
bill over the whole memory grid, as numpy arrays built at once.

A stage is a run of calibration blocks (stagemodel.py prices one stage at one size); the
search (search.py) needs every stage at every memory size for each (images per record,
micro-batch, concurrency), which here is a few array operations rather than a loop. Its
closed-form lower bounds (`bounds`) let the search skip configurations that cannot win
without building their arrays at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..cost import (
    LAMBDA_GB_SECOND,
    LAMBDA_REQUEST,
    MAX_MEMORY_MB,
    MB_PER_VCPU,
    MIN_MEMORY_MB,
    S3_GET,
    S3_PUT,
    vcpus,
)
from ..errors import PlanError
from ..store import READ_BLOCK
from .simulate import Target
from .stagemodel import StageModel, speedup, wall_ms_per_image

RECORD_SIZES = (25, 50, 100, 200, 500, 1000, 2000, 5000)
MICRO_BATCHES = (1, 4, 8, 16, 32, 64)


@dataclass
class Config:
    per_record: int
    micro_batch: int
    concurrency: int


def pareto(tau: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats in both time and cost."""
    if tau.size == 0:
        return np.zeros(0, dtype=int)
    order = np.lexsort((cost, tau))
    c = cost[order]
    prev_min = np.minimum.accumulate(np.concatenate(([np.inf], c[:-1])))
    return order[c < prev_min]


def ramp_loss_s(concurrency: int, target: Target) -> float:
    """Seconds of full capacity lost while a function scales up to `concurrency`."""
    r = target.ramp_per_10s
    if r is None or concurrency <= r:
        return 0.0
    steps = math.ceil(concurrency / r)
    return sum(10.0 * (concurrency - r * i) / concurrency for i in range(1, steps))



@dataclass
class _Group:
    """Per candidate stage × memory: invocation ms, init ms and their bills, for one images
    per record and micro-batch (and, on the local target, instances in flight); infeasible
    memories are inf. Rows follow `Model.pairs`."""

    d: np.ndarray
    init: np.ndarray
    cost_d: np.ndarray
    cost_i: np.ndarray


class Model:
    """The planner's closed-form model of every candidate stage over the whole memory grid,
    built with numpy at once for all stages (a stage is a run of calibration blocks)."""

    def __init__(self, cal: dict[str, Any], target: Target, arch: str, memory_step: int,
                 images: int):
        if arch not in LAMBDA_GB_SECOND:
            raise PlanError(f"--arch must be one of {', '.join(sorted(LAMBDA_GB_SECOND))}, "
                            f"got {arch!r}")
        if memory_step < 1:
            raise PlanError("--memory-step must be >= 1")
        self.cal, self.target, self.arch, self.images = cal, target, arch, images
        grid = list(range(MIN_MEMORY_MB, MAX_MEMORY_MB + 1, memory_step))
        if grid[-1] != MAX_MEMORY_MB:
            grid.append(MAX_MEMORY_MB)
        self.mem = np.array(grid, dtype=float)
        self.v = np.array([vcpus(int(m)) for m in grid])
        self.price = LAMBDA_GB_SECOND[arch]
        self.k = k = len(cal["blocks"])
        self.bw = target.bytes_per_ms
        self.pairs = [(i, j) for i in range(k) for j in range(i, k)]
        self.index = {p: s for s, p in enumerate(self.pairs)}
        self.first = np.array([i for i, _ in self.pairs])
        self.last = np.array([j for _, j in self.pairs])
        stages = [StageModel(cal, i, j, 1) for i, j in self.pairs]
        self.model_bytes = np.array([s.model_bytes for s in stages], dtype=float)
        self.bytes_in = np.array([s.bytes_in_per_image for s in stages])
        self.bytes_out = np.array([s.bytes_out_per_image for s in stages])
        # a cold start's CPU at 1 vCPU: the model load, then the first call's extra work
        self.load_ms = np.array([float(s.load_ms(1.0, target.cpu_factor))
                                 + s.first_call_ms() / target.cpu_factor for s in stages])
        self.inp = np.array([s.input_ms_per_image() for s in stages])[:, None]
        self.out = np.array([s.output_ms_per_image() for s in stages])[:, None]
        self._ms: dict[int, np.ndarray] = {}
        self._need: dict[int, np.ndarray] = {}
        self._groups: dict[tuple[int, int, int], _Group] = {}

    def ms_per_image(self, b: int) -> np.ndarray:
        """(stages × memory) wall ms per image at micro-batch b: StageModel.ms_per_image for
        every stage at once (block sums by cumulative sums)."""
        if b not in self._ms:
            blocks = self.cal["blocks"]
            sm = StageModel(self.cal, 0, 0, b)
            t = np.array([sm._ms_at_batch(blk) for blk in blocks])
            per = np.stack([t[n] / speedup(self.v, blk["speedup_2vcpu"])
                            for n, blk in enumerate(blocks)])
            cum = np.vstack([np.zeros(self.mem.size), np.cumsum(per, axis=0)])
            c = cum[self.last + 1] - cum[self.first]
            cum1 = np.concatenate([[0.0], np.cumsum(t)])
            c1 = (cum1[self.last + 1] - cum1[self.first])[:, None]
            c = wall_ms_per_image(self.inp, c1, c, self.out, self.v[None, :])
            self._ms[b] = c / self.target.cpu_factor
        return self._ms[b]

    def record_ms(self, r: int, b: int) -> np.ndarray:
        """(stages × memory) wall ms of a record of r images at micro-batch b: full batches,
        then the rest as one smaller one (StageModel.ms_per_record). At least r × the time
        per image at b, which the lower bounds of `_mins` use."""
        full, rest = divmod(int(r), int(b))
        ms = full * b * self.ms_per_image(b)
        return ms + rest * self.ms_per_image(rest) if rest else ms

    def need(self, b: int) -> np.ndarray:
        """Per stage: the least memory allowed at micro-batch b (peak × headroom)."""
        if b not in self._need:
            self._need[b] = np.array([StageModel(self.cal, i, j, b).memory_needed()
                                      for i, j in self.pairs], dtype=float)
        return self._need[b]

    def in_flight(self, cfg: Config) -> int:
        return min(cfg.concurrency, math.ceil(self.images / cfg.per_record))

    def _io(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per stage at r images per record: store ms of an invocation, its GETs and PUTs."""
        t = self.target
        b_in, b_out = r * self.bytes_in, r * self.bytes_out
        last_in = ((self.last == self.k - 1) & (self.first > 0)).astype(float)
        gets = np.maximum(1, np.ceil(b_in / READ_BLOCK)) + last_in
        puts = 1 + ((self.first == 0) & (self.last < self.k - 1)).astype(float)
        return b_in / self.bw + b_out / self.bw + t.request_ms * (gets + puts), gets, puts

    def _fixed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per stage: the model download ms of a cold start, the bill of a call's requests
        apart from its GETs and PUTs, and the GETs of the model download."""
        t = self.target
        dl = np.zeros_like(self.model_bytes) if t.name == "local" else \
            self.model_bytes / self.bw + t.request_ms
        return (dl, np.full(self.model_bytes.shape, LAMBDA_REQUEST),
                np.maximum(1, np.ceil(self.model_bytes / READ_BLOCK)))

    def _cold_cpu(self, v: Any) -> tuple[Any, Any]:
        """(start ms, model load ms) of a cold start at v vCPUs: the load slows below 1 vCPU;
        the process start too where it runs under the instance's share (local)."""
        t, below = self.target, np.minimum(v, 1.0)
        start = t.platform_init_ms / below if t.start_cpu_bound else t.platform_init_ms
        return start, np.multiply.outer(self.load_ms, 1 / below) if np.ndim(v) else \
            self.load_ms / below

    def group(self, cfg: Config) -> _Group:
        """What does not depend on concurrency (except on the local target, where instances
        in flight share the cores), cached for the last few (record size, micro-batch)."""
        t = self.target
        key = (cfg.per_record, cfg.micro_batch,
               self.in_flight(cfg) if t.cores is not None else 0)
        if key in self._groups:
            return self._groups[key]
        r = cfg.per_record
        io, gets, puts = self._io(r)
        dl, req, model_gets = self._fixed()
        stretch: Any = 1.0
        stretch_i: Any = 1.0  # an init runs on one thread: it uses 1 vCPU at most
        if t.cores is not None:
            stretch = np.maximum(1.0, self.in_flight(cfg) * self.v / t.cores)[None, :]
            stretch_i = np.maximum(1.0, self.in_flight(cfg) * np.minimum(self.v, 1.0)
                                   / t.cores)[None, :]
        d = t.invoke_ms + io[:, None] + self.record_ms(r, cfg.micro_batch) * stretch
        start, load = self._cold_cpu(self.v)
        if t.start_cpu_bound:
            init = dl[:, None] + (start[None, :] + load) * stretch_i
        else:
            init = dl[:, None] + start + load * stretch_i
        ok = ((self.mem[None, :] >= self.need(cfg.micro_batch)[:, None])
              & ((d + init) <= t.timeout_s * 1000)
              & (self.model_bytes <= t.tmp_mb * 2**20)[:, None])
        gb = self.price * self.mem / 1024 / 1000
        cost_d = gb * np.ceil(d) + (req + gets * S3_GET + puts * S3_PUT)[:, None]
        cost_i = gb * np.ceil(init) + (model_gets * S3_GET)[:, None]
        d, init = np.where(ok, d, np.inf), np.where(ok, init, np.inf)
        cost_d, cost_i = np.where(ok, cost_d, np.inf), np.where(ok, cost_i, np.inf)
        g = _Group(d, init, cost_d, cost_i)
        if len(self._groups) >= 4:
            self._groups.pop(next(iter(self._groups)))
        self._groups[key] = g
        return g

    def _mins(self, cfg: Config) -> tuple[np.ndarray, ...]:
        """Per stage: least invocation ms and init ms over memory, and lower bounds of their
        bills, without building the grid. Time falls with memory until the instances in
        flight fill the cores (local: at vCPUs = cores / instances) and rises past it, so
        its least is at one of a few columns; memory × time rises with memory (CPU share ∝
        memory up to 1 vCPU, Amdahl past it, sharing never speeds up), so a bill is at
        least memory × unrounded time at the smallest size allowed."""
        t, r = self.target, cfg.per_record
        io, gets, puts = self._io(r)
        dl, req, model_gets = self._fixed()
        ms = self.ms_per_image(cfg.micro_batch)
        rows = np.arange(len(self.pairs))
        size = self.mem.size
        lo = np.minimum(np.searchsorted(self.mem, self.need(cfg.micro_batch)), size - 1)
        turns = [MB_PER_VCPU]
        inflight = self.in_flight(cfg)
        if t.cores is not None:
            turns.append(t.cores / inflight * MB_PER_VCPU)
        cand = {size - 1}
        for mb in turns:
            j = int(np.searchsorted(self.mem, mb))
            cand |= {min(max(j - 1, 0), size - 1), min(j, size - 1)}
        cols = np.array(sorted(cand))

        def at(c: np.ndarray, ms_c: np.ndarray, col: bool) -> tuple[np.ndarray, np.ndarray]:
            """(invocation ms, init ms) at columns c: shared by all stages (col) or one
            per stage."""
            below = np.minimum(self.v[c], 1.0)
            st = (np.maximum(1.0, inflight * self.v[c] / t.cores) if t.cores is not None
                  else np.ones(c.shape))
            sti = (np.maximum(1.0, inflight * np.minimum(self.v[c], 1.0) / t.cores)
                   if t.cores is not None else np.ones(c.shape))
            start = t.platform_init_ms / below if t.start_cpu_bound else \
                np.full(c.shape, t.platform_init_ms)
            if col:
                st, sti = st[None, :], sti[None, :]
                start, below = start[None, :], below[None, :]
                io_, dl_, load = io[:, None], dl[:, None], self.load_ms[:, None] / below
            else:
                io_, dl_, load = io, dl, self.load_ms / below
            d = t.invoke_ms + io_ + r * ms_c * st
            if t.start_cpu_bound:
                return d, dl_ + (start + load) * sti
            return d, dl_ + start + load * sti

        d_c, init_c = at(cols, ms[:, cols], True)
        mask = cols[None, :] >= lo[:, None]
        d_lo, init_lo = at(lo, ms[rows, lo], False)
        min_d = np.minimum(np.where(mask, d_c, np.inf).min(axis=1), d_lo)
        min_init = np.minimum(np.where(mask, init_c, np.inf).min(axis=1), init_lo)
        ok = ((self.need(cfg.micro_batch) <= self.mem[-1])
              & (min_d + min_init <= t.timeout_s * 1000)
              & (self.model_bytes <= t.tmp_mb * 2**20))
        gb = self.price * self.mem[lo] / 1024 / 1000
        inf = np.inf
        return (np.where(ok, min_d, inf), np.where(ok, min_init, inf),
                np.where(ok, gb * d_lo + req + gets * S3_GET + puts * S3_PUT, inf),
                np.where(ok, gb * init_lo + model_gets * S3_GET, inf))

    def weights(self, cfg: Config) -> tuple[float, float, float]:
        """(waves of records, records, instances in flight): time = waves × d + init, cost
        = records × bill(d) + instances × bill(init)."""
        n_rec = self.images / cfg.per_record
        return float(math.ceil(n_rec / cfg.concurrency)), n_rec, float(self.in_flight(cfg))

    def arrays(self, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
        """(stages × memory) time weight in s and cost in $ under this configuration."""
        g = self.group(cfg)
        alpha, n_rec, inst = self.weights(cfg)
        return (alpha * g.d + g.init) / 1000, n_rec * g.cost_d + inst * g.cost_i

    def bounds(self, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
        """Per stage, lower bounds of its time and cost over memory (exact for time when
        time falls with memory, as on Lambda)."""
        min_d, min_init, min_cost_d, min_cost_i = self._mins(cfg)
        alpha, n_rec, inst = self.weights(cfg)
        return (alpha * min_d + min_init) / 1000, n_rec * min_cost_d + inst * min_cost_i

    def options(self, i: int, j: int, cfg: Config,
                pareto: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(time weight s, cost $, memory index) of every feasible memory for stage i..j."""
        tau, cost = self.arrays(cfg)
        s = self.index[(i, j)]
        idx = np.nonzero(np.isfinite(tau[s]))[0]
        tt, cc = tau[s][idx], cost[s][idx]
        if not pareto:
            return tt, cc, idx
        keep = pareto(tt, cc)
        return tt[keep], cc[keep], idx[keep]

    def overhead_s(self, cfg: Config) -> float:
        return ramp_loss_s(self.in_flight(cfg), self.target)
