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
from .embeddings import last_stage_puts
from .simulate import Target
from .stagemodel import StageModel, speedup, wall_ms_per_image

RECORD_SIZES = (25, 50, 100, 200, 500, 1000, 2000, 5000)
AHEAD_SHARE = 0.25  # a partial record this small runs ahead of full ones (see Weights)
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


@dataclass
class Weights:
    """How the records of a configuration weigh on each stage: time = init_time × init +
    waves_full × d(R) + waves_rest × d(rest), cost = full × bill(d(R)) + bill(d(rest))
    + instances × bill(init) (init_time and instances per stage row, as (rows × 1)).

    Why not ⌈n/C⌉ × d(R) + init and min(C, n) instances, as before: the driver runs C
    chains, each carrying a record through every stage before its next, so the slowest
    chain holds ⌈n/C⌉ records, and the partial last record (`rest` images) is one of
    them only when it is alone in the last wave; pricing it as a full record predicted
    21.4 s for a 600-image job in records of 500 at C=1 where the simulation said 13.3 s
    and the job took 13.7 s (issue 22). And when the partial record shares the one wave
    with full ones, its chain runs ahead and leaves each later stage's instance warm for
    one of them: one cold start fewer per later stage, and with one full record none on
    its path (600 images in records of 500 at C=2, AlexNet on Lambda: 37% over the
    simulation without this). Only while the partial record is at most AHEAD_SHARE of a
    full one: one of half a record (350 images in records of 100 at C=8) is not done
    when the full ones arrive, and counting on its instance put the cost 11% under the
    simulation."""

    rest: int  # images of the partial last record, 0 if none
    full: int  # full records
    waves_full: float
    waves_rest: float
    init_time: np.ndarray
    instances: np.ndarray


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
        # the CPU quota of each size (its memory's vCPUs × the target's cpu_quota), and the
        # model's threads (the memory's vCPUs rounded up, as the driver sets them)
        # (what it can use: no more than its threads, StageModel.ms_per_image)
        self.threads = np.ceil([vcpus(int(m)) for m in grid])
        self.v = np.minimum([target.share(int(m)) for m in grid], self.threads)
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
        """Instances of each stage the job starts: one per chain, at most one per record."""
        return min(cfg.concurrency, math.ceil(self.images / cfg.per_record))

    def sharing(self, cfg: Config) -> float:
        """Records in flight as the cores see them (local target): a partial last record
        counts for its share of a full one, since it ends that much sooner. Counted as a
        whole, 350 images in records of 100 at C=8 on 2 cores came out 14% slower than
        the simulation (4 records sharing the cores all the way instead of 3.5)."""
        return min(float(cfg.concurrency), self.images / cfg.per_record)

    def _io(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per stage at r images per record: store ms of an invocation, its GETs and PUTs."""
        t = self.target
        b_in, b_out = r * self.bytes_in, r * self.bytes_out
        last_in = ((self.last == self.k - 1) & (self.first > 0)).astype(float)
        gets = np.maximum(1, np.ceil(b_in / READ_BLOCK)) + last_in
        puts = (1 + ((self.first == 0) & (self.last < self.k - 1)).astype(float)
                + (self.last == self.k - 1) * (last_stage_puts(self.cal) - 1))
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
        start = start + t.init_fixed_ms  # Target.start_ms
        return start, np.multiply.outer(self.load_ms, 1 / below) if np.ndim(v) else \
            self.load_ms / below

    def group(self, cfg: Config, r: int | None = None) -> _Group:
        """What does not depend on concurrency (except on the local target, where instances
        in flight share the cores), cached for the last few (record size, micro-batch).
        `r`: a record of r images under `cfg` (the partial last record), else a full one."""
        t = self.target
        r = int(r or cfg.per_record)
        key = (r, cfg.micro_batch, self.sharing(cfg) if t.cores is not None else 0)
        if key in self._groups:
            return self._groups[key]
        io, gets, puts = self._io(r)
        dl, req, model_gets = self._fixed()
        stretch: Any = 1.0
        stretch_i: Any = 1.0  # an init runs on one thread: it uses 1 vCPU at most
        if t.cores is not None:
            stretch = np.maximum(1.0, self.sharing(cfg) * self.v / t.cores)[None, :]
            stretch_i = np.maximum(1.0, self.sharing(cfg) * np.minimum(self.v, 1.0)
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
        if len(self._groups) >= 8:
            self._groups.pop(next(iter(self._groups)))
        self._groups[key] = g
        return g

    def _mins(self, cfg: Config, r: int | None = None) -> tuple[np.ndarray, ...]:
        """Per stage: least invocation ms and init ms over memory, and lower bounds of their
        bills, without building the grid. Time falls with memory until the instances in
        flight fill the cores (local: at vCPUs = cores / instances) and rises past it, so
        its least is at one of a few columns; memory × time rises with memory (CPU share ∝
        memory up to 1 vCPU, Amdahl past it, sharing never speeds up), so a bill is at
        least memory × unrounded time at the smallest size allowed."""
        t, r = self.target, int(r or cfg.per_record)
        io, gets, puts = self._io(r)
        dl, req, model_gets = self._fixed()
        ms = self.ms_per_image(min(cfg.micro_batch, r))
        rows = np.arange(len(self.pairs))
        size = self.mem.size
        lo = np.minimum(np.searchsorted(self.mem, self.need(cfg.micro_batch)), size - 1)
        # the quota reaches 1 vCPU; a thread more (a quota above the memory's vCPUs); the
        # instances in flight fill the cores
        turns = [MB_PER_VCPU / t.cpu_quota]
        if t.cpu_quota != 1.0:
            turns += [MB_PER_VCPU * n for n in range(1, 7)]
        inflight = self.sharing(cfg)
        if t.cores is not None:
            turns.append(t.cores / inflight * MB_PER_VCPU / t.cpu_quota)
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
            start = (t.platform_init_ms / below if t.start_cpu_bound else
                     np.full(c.shape, t.platform_init_ms)) + t.init_fixed_ms
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

    def weights(self, cfg: Config) -> Weights:
        """How the records weigh on each stage's time and bill (see `Weights`)."""
        r, c = cfg.per_record, cfg.concurrency
        full, rest = divmod(self.images, r)
        n_rec = full + (1 if rest else 0)
        waves = math.ceil(n_rec / c)
        alone = bool(rest) and n_rec - (waves - 1) * c == 1
        inst = self.in_flight(cfg)
        ahead = 0 < rest <= r * AHEAD_SHARE and n_rec <= c and full >= 1
        first = (self.first == 0)[:, None]
        return Weights(
            rest=rest, full=full,
            waves_full=float(waves - 1 if alone else waves), waves_rest=1.0 if alone else 0.0,
            init_time=np.where(first, 1.0, 0.0 if ahead and full == 1 else 1.0),
            instances=np.where(first, float(inst), float(inst - 1 if ahead else inst)))

    def _combine(self, w: Weights, full: tuple[np.ndarray, ...] | None,
                 part: tuple[np.ndarray, ...] | None) -> tuple[np.ndarray, np.ndarray]:
        """(time s, cost $) from (d, init, bill of d, bill of init) of a full record and of
        the partial one, as `Weights` weighs them."""
        init, cost_i = (full or part)[1], (full or part)[3]  # type: ignore[index]
        finite = np.isfinite(init)  # an infeasible memory stays inf, never 0 x inf
        tau = np.where(finite, w.init_time * np.where(finite, init, 0.0), np.inf)
        cost = np.where(finite, w.instances * np.where(finite, cost_i, 0.0), np.inf)
        for n, waves, x in ((w.full, w.waves_full, full), (1, w.waves_rest, part)):
            if x is None:
                continue
            if waves:
                tau = tau + waves * x[0]
            cost = cost + n * x[2]
        return tau / 1000, cost

    def arrays(self, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
        """(stages × memory) time weight in s and cost in $ under this configuration."""
        w = self.weights(cfg)
        g = self.group(cfg) if w.full else None
        p = self.group(cfg, w.rest) if w.rest else None
        return self._combine(w, g and (g.d, g.init, g.cost_d, g.cost_i),
                             p and (p.d, p.init, p.cost_d, p.cost_i))

    def bounds(self, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
        """Per stage, lower bounds of its time and cost over memory (exact for time when
        time falls with memory, as on Lambda)."""
        w = self.weights(cfg)
        tau, cost = self._combine(
            w, tuple(x[:, None] for x in self._mins(cfg)) if w.full else None,
            tuple(x[:, None] for x in self._mins(cfg, w.rest)) if w.rest else None)
        return tau[:, 0], cost[:, 0]

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
