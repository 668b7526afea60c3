"""The planner: cuts, memory per stage, images per record, micro-batch and concurrency for
N images under a deadline (cheapest) or a budget (fastest), from a calibration.

The planner's job model is analytical and additive over stages, which makes an exact search
possible: with R images per record (n = N/R records), C invocations in flight and per stage
k an invocation time D_k and a cold start I_k (both functions of its memory),

    wall  ≈ ⌈n/C⌉ × Σ D_k + Σ I_k + ramp(C)
    cost  =  n × Σ bill(D_k) + min(n, C) × Σ bill(I_k)       (billed through cost.py)

so for each (R, micro-batch, C) a dynamic programme over block boundaries, keeping per
boundary the Pareto front of (time, cost) of every way to reach it (cuts × memory on the
`memory_step` grid, 1 MB by default), is exact. What keeps it fast at 1 MB: every candidate
stage's time and cost over all memory sizes are numpy arrays built at once; Lagrangian bounds
(min of cost + λ·time per stage, summed along the best cut set) drop every memory and every
partial plan that cannot beat the best feasible plan known; configurations whose cheapest
possible plan cannot beat the best found, or whose fastest cannot meet the deadline, are
pruned from closed-form bounds without building their arrays.
The chosen plan, the paper's presets and the fastest plan are then run through the
discrete-event simulator (`simulate.py`), which knows Lambda's limits in full.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .calibrate import (
    CAL_BATCH,
    StageModel,
    calibration_batch,
    speedup,
    stage_models,
    wall_ms_per_image,
)
from .cost import (
    LAMBDA_GB_SECOND,
    LAMBDA_REQUEST,
    MAX_MEMORY_MB,
    MB_PER_VCPU,
    MIN_MEMORY_MB,
    S3_GET,
    S3_PUT,
    vcpus,
)
from .errors import PlanError
from .simulate import Target
from .store import READ_BLOCK

PLAN_KIND = "serveless-plan"
RECORD_SIZES = (25, 50, 100, 200, 500, 1000, 2000, 5000)
MICRO_BATCHES = (1, 4, 8, 16, 32, 64)


@dataclass
class Config:
    per_record: int
    micro_batch: int
    concurrency: int


@dataclass
class Candidate:
    """One plan as the planner's model sees it."""

    cuts: list[str]
    memory: list[int]
    per_record: int
    micro_batch: int
    concurrency: int
    wall_s: float
    cost: float


@dataclass
class Search:
    best: Candidate | None
    fastest: Candidate | None
    front: list[tuple[float, float]] = field(default_factory=list)  # (wall s, $) Pareto
    configs: int = 0
    configs_searched: int = 0
    seconds: float = 0.0  # the search
    front_seconds: float = 0.0  # the Pareto front drawn around the chosen plan


def _pareto(tau: np.ndarray, cost: np.ndarray) -> np.ndarray:
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
            raise PlanError(f"--arch must be one of {sorted(LAMBDA_GB_SECOND)}, got {arch!r}")
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
        keep = _pareto(tt, cc)
        return tt[keep], cc[keep], idx[keep]

    def overhead_s(self, cfg: Config) -> float:
        return ramp_loss_s(self.in_flight(cfg), self.target)


def _configs(images: int, max_conc: int, per_record: list[int] | None,
             micro_batch: list[int] | None, concurrency: list[int] | None) -> list[Config]:
    sizes = per_record or [r for r in RECORD_SIZES if r <= images] or [images]
    conc = concurrency or sorted({min(max_conc, 2**p) for p in range(0, 16)} | {max_conc})
    out = []
    for r in sizes:
        n_rec = math.ceil(images / r)
        for b in micro_batch or MICRO_BATCHES:
            if b > r:
                continue
            for c in conc:
                if c > n_rec and c != min(conc, key=lambda x: abs(x - n_rec)):
                    continue  # more chains than records changes nothing
                out.append(Config(r, b, c))
    return out


def _path(model: Model, h: np.ndarray) -> tuple[list[float], list[float], list[int]]:
    """Least sums of per-stage values h along cut sets: from the start to each boundary
    (pre), from each boundary to the end (suf), and the stage ending the best prefix."""
    k, idx = model.k, model.index
    pre, arg = [math.inf] * (k + 1), [-1] * (k + 1)
    pre[0] = 0.0
    for j in range(1, k + 1):
        for i in range(j):
            v = pre[i] + h[idx[(i, j - 1)]]
            if v < pre[j]:
                pre[j], arg[j] = v, idx[(i, j - 1)]
    suf = [math.inf] * (k + 1)
    suf[k] = 0.0
    for i in range(k - 1, -1, -1):
        for j in range(i + 1, k + 1):
            v = h[idx[(i, j - 1)]] + suf[j]
            if v < suf[i]:
                suf[i] = v
    return pre, suf, arg


@dataclass
class _Sol:
    obj: float
    con: float
    stages: list[tuple[int, int]]  # (stage row, memory index)


def _lagrange(model: Model, obj: np.ndarray, con: np.ndarray,
              lam: float) -> tuple[np.ndarray, _Sol]:
    """Per stage min over memory of obj + λ·con, and the plan minimising it over cut sets."""
    h = obj + lam * con if lam else obj
    m = np.argmin(h, axis=1)
    rows = np.arange(len(model.pairs))
    hm = h[rows, m]
    _pre, _suf, arg = _path(model, hm)
    j, picks = model.k, []
    while j > 0 and arg[j] >= 0:
        s = arg[j]
        picks.append((s, int(m[s])))
        j = model.first[s]
    picks.reverse()
    return hm, _Sol(float(sum(obj[s, mm] for s, mm in picks)),
                    float(sum(con[s, mm] for s, mm in picks)), picks)


def _solve(model: Model, obj: np.ndarray, con: np.ndarray, limit: float,
           upper: float = math.inf) -> _Sol | None:
    """Exact: the plan (cut set × memory per stage) of least total `obj` whose total `con`
    is at most `limit`, if it is below `upper`; None otherwise.

    Lagrangian bounds make it fast: for any λ ≥ 0 every plan within the limit has
    obj ≥ min(obj + λ·con) − λ·limit, summed stage by stage along the best cut set, so a
    memory (or a partial plan) whose best completion cannot beat the best feasible plan known
    is dropped. λ is bisected towards the tightest bound; the few memories left per stage
    are combined by a dynamic programme over block boundaries that keeps, per boundary, the
    Pareto front of (con, obj) of every partial plan that can still win."""
    if not np.isfinite(obj).any():
        return None
    h0, s0 = _lagrange(model, obj, con, 0.0)
    if not s0.stages:
        return None
    if s0.con <= limit:
        return s0 if s0.obj < upper else None
    if _pathmin(model, con.min(axis=1)) > limit:
        return None
    _h, fast = _lagrange(model, con, obj, 0.0)  # the least con (its obj: fast.con)
    tol = 1e-9
    best, feasible = upper, None
    lo, hi = 0.0, None  # λ whose plan exceeds the limit; λ whose plan meets it
    lams: list[tuple[float, np.ndarray]] = [(0.0, h0)]
    lam = max(fast.con - s0.obj, 1e-30) / max(s0.con - fast.obj, 1e-30)

    def meets(lam: float) -> bool:
        """The plan that λ gives: kept as a bound, and as the best plan if it meets the
        limit and beats the best so far; whether it meets the limit."""
        nonlocal best, feasible
        hm, sol = _lagrange(model, obj, con, lam)
        lams.append((lam, hm))
        if sol.con <= limit and sol.obj < best:
            best, feasible = sol.obj, sol
        return bool(sol.con <= limit)

    for _ in range(60):  # find a λ whose plan meets the limit
        if meets(lam):
            hi = lam
            break
        lo, lam = lam, lam * 8
    if hi is None:
        return _front(model, obj, con, limit, best, lams, tol)
    for _ in range(10):  # bisect (geometrically) for a tighter bound and a better plan
        lam = math.sqrt(lo * hi) if lo > 0 else hi / 8
        if meets(lam):
            hi = lam
        else:
            lo = lam
        lb = max(_pathmin(model, h) - la * limit for la, h in lams)
        if best - lb <= tol * abs(best):
            break
    # The best plan λ gave is often a little worse than the optimum, and the search keeps
    # every plan whose bound is below it: with 1 MB steps, many. So first search below a
    # guess close to the lower bound: a plan found under the guess is the optimum (every
    # plan below the guess was kept); if none, the guess grows until it is the known best.
    lb = max(_pathmin(model, h) - la * limit for la, h in lams)
    for frac in (1e-4, 1e-2):
        guess = lb + (best - lb) * frac
        if not math.isfinite(guess) or guess <= lb or guess >= best:
            break
        found = _front(model, obj, con, limit, guess, lams, tol)
        if found is not None:
            return found
    found = _front(model, obj, con, limit, best, lams, tol)
    if found is not None and found.obj <= best:
        return found
    return feasible if best < upper else None


def _pathmin(model: Model, h: np.ndarray) -> float:
    pre, _suf, _arg = _path(model, h)
    return pre[model.k]


def _front(model: Model, obj: np.ndarray, con: np.ndarray, limit: float, upper: float,
           lams: list[tuple[float, np.ndarray]], tol: float) -> _Sol | None:
    """The exact search behind `_solve`: memories and partial plans pruned by the bounds of
    every λ tried, the rest combined boundary by boundary keeping Pareto fronts."""
    k = model.k
    ub = upper + tol * abs(upper) if math.isfinite(upper) else math.inf
    lim = limit + 1e-12 * abs(limit)
    cmin, omin = con.min(axis=1), obj.min(axis=1)
    pre_c, suf_c, _ = _path(model, cmin)
    pre_o, suf_o, _ = _path(model, omin)
    bounds = [(la, *_path(model, h)[:2]) for la, h in lams]
    opts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for s, (i, j) in enumerate(model.pairs):
        o, c = obj[s], con[s]
        keep = (pre_c[i] + c + suf_c[j + 1] <= lim) & (pre_o[i] + o + suf_o[j + 1] <= ub)
        for la, pre, suf in bounds:
            keep &= pre[i] + (o + la * c if la else o) + suf[j + 1] - la * limit <= ub
        idx = np.nonzero(keep)[0]
        if idx.size:
            p = _pareto(c[idx], o[idx])
            opts[s] = (c[idx][p], o[idx][p], idx[p])
    fronts: list[Any] = [None] * (k + 1)
    fronts[0] = (np.zeros(1), np.zeros(1), np.full(1, -1), np.full(1, -1), np.full(1, -1))
    for j in range(1, k + 1):
        parts: list[list[np.ndarray]] = [[], [], [], [], []]
        for i in range(j):
            f, s = fronts[i], model.index[(i, j - 1)]
            if f is None or f[0].size == 0 or s not in opts:
                continue
            c_o, o_o, m_o = opts[s]
            cc = (f[0][:, None] + c_o[None, :]).ravel()
            oo = (f[1][:, None] + o_o[None, :]).ravel()
            ok = (cc + suf_c[j] <= lim) & (oo + suf_o[j] <= ub)
            for la, _pre, suf in bounds:
                ok &= oo + la * cc + suf[j] - la * limit <= ub
            sel = np.nonzero(ok)[0]
            if sel.size:
                for lst, val in zip(parts, (cc[sel], oo[sel], np.full(sel.size, s),
                                            sel // c_o.size, m_o[sel % c_o.size]), strict=True):
                    lst.append(val)
        if not parts[0]:
            fronts[j] = None
            continue
        cc, oo = np.concatenate(parts[0]), np.concatenate(parts[1])
        keep = _pareto(cc, oo)
        fronts[j] = (cc[keep], oo[keep], np.concatenate(parts[2])[keep],
                     np.concatenate(parts[3])[keep], np.concatenate(parts[4])[keep])
    f = fronts[k]
    if f is None or f[0].size == 0:
        return None
    n = int(np.argmin(f[1]))
    if f[1][n] >= upper:
        return None
    j, picks = k, []
    while j > 0:
        _c, _o, ss, pp, mm = fronts[j]
        s = int(ss[n])
        picks.append((s, int(mm[n])))
        j, n = int(model.first[s]), int(pp[n])
    picks.reverse()
    return _Sol(float(sum(obj[s, m] for s, m in picks)),
                float(sum(con[s, m] for s, m in picks)), picks)


def _candidate(model: Model, cfg: Config, sol: _Sol, over: float, tau: np.ndarray,
               cost: np.ndarray) -> Candidate:
    cuts = [model.cal["boundaries"][model.last[s]] for s, _m in sol.stages[:-1]]
    mem = [int(model.mem[m]) for _s, m in sol.stages]
    return Candidate(cuts, mem, cfg.per_record, cfg.micro_batch, cfg.concurrency,
                     float(sum(tau[s, m] for s, m in sol.stages)) + over,
                     float(sum(cost[s, m] for s, m in sol.stages)))


def search(cal: dict[str, Any], images: int, target: Target, arch: str = "x86_64",
           deadline_s: float | None = None, budget: float | None = None,
           max_concurrency: int | None = None, memory_step: int = 1,
           per_record: list[int] | None = None, micro_batch: list[int] | None = None,
           concurrency: list[int] | None = None, front: bool = True) -> Search:
    """The cheapest plan within the deadline, or the fastest within the budget (exact under
    the planner's model, on the memory grid), and the fastest plan of all."""
    if (deadline_s is None) == (budget is None):
        raise PlanError("give exactly one of --deadline or --budget")
    if images < 1:
        raise PlanError("--images must be >= 1")
    if deadline_s is not None and deadline_s <= 0 or budget is not None and budget <= 0:
        raise PlanError("--deadline and --budget must be > 0")
    t0 = time.perf_counter()
    limit = target.concurrency_limit
    max_c = max_concurrency or (limit if limit is not None else int(target.cores or 1))
    if limit is not None:
        max_c = min(max_c, limit)
    if max_c < 1:
        raise PlanError("--max-concurrency must be >= 1")
    model = Model(cal, target, arch, memory_step, images)
    if micro_batch is None:  # past the calibration batch nothing is measured to gain, only
        # memory to lose (StageModel._ms_at_batch): not worth a row in the plans shown
        top = max(CAL_BATCH, calibration_batch(cal))
        micro_batch = [b for b in MICRO_BATCHES if b <= top]
    configs = _configs(images, max_c, per_record, micro_batch, concurrency)
    scored = []
    for cfg in configs:  # lower bounds of time and cost per configuration, from per-stage mins
        bt, bc = model.bounds(cfg)
        over = model.overhead_s(cfg)
        min_t = _pathmin(model, bt) + over
        if math.isinf(min_t):
            continue
        scored.append((cfg, over, min_t, _pathmin(model, bc)))
    if not scored:
        raise PlanError("no stage of this model fits any Lambda memory size, timeout or /tmp")
    fastest: Candidate | None = None
    for cfg, over, min_t, _min_c in sorted(scored, key=lambda s: s[2]):
        if fastest is not None and min_t >= fastest.wall_s:
            break
        tau, cost = model.arrays(cfg)
        t_min = _pathmin(model, tau.min(axis=1))
        sol = _solve(model, cost, tau, t_min * (1 + 1e-12))
        if sol is not None and (fastest is None or sol.con + over < fastest.wall_s):
            fastest = _candidate(model, cfg, sol, over, tau, cost)
    assert fastest is not None
    best: Candidate | None = None
    searched = 0
    if deadline_s is not None:
        for cfg, over, min_t, min_c in sorted(scored, key=lambda s: s[3]):
            if best is not None and min_c >= best.cost:
                break  # cheapest lower bound first: nothing later can beat it
            if min_t > deadline_s:
                continue
            searched += 1
            tau, cost = model.arrays(cfg)
            sol = _solve(model, cost, tau, deadline_s - over,
                         best.cost if best else math.inf)
            if sol is not None:
                best = _candidate(model, cfg, sol, over, tau, cost)
    else:
        for cfg, over, min_t, min_c in sorted(scored, key=lambda s: s[2]):
            if best is not None and min_t >= best.wall_s:
                break
            if min_c > budget:  # type: ignore[operator]
                continue
            searched += 1
            tau, cost = model.arrays(cfg)
            sol = _solve(model, tau, cost, budget,  # type: ignore[arg-type]
                         best.wall_s - over if best else math.inf)
            if sol is not None:
                best = _candidate(model, cfg, sol, over, tau, cost)
    search_s = time.perf_counter() - t0
    pts: list[tuple[float, float]] = []
    if best is not None and front:
        pts = _front_points(model, scored, best)
    return Search(best, fastest, pts, len(configs), searched, search_s,
                  time.perf_counter() - t0 - search_s)


def _front_points(model: Model, scored: list[Any], best: Candidate) -> list[tuple[float, float]]:
    """The (time, cost) front drawn around the chosen plan: at its record size and
    micro-batch, concurrency C/8..8C, the plans that minimise cost + λ·time for λ across six
    decades (the front's convex-hull points), within 10× its time and 3× its cost."""
    pts = [(best.wall_s, best.cost)]
    scale = best.cost / max(best.wall_s, 1e-9)
    for cfg, over, _min_t, _min_c in scored:
        if ((cfg.per_record, cfg.micro_batch) != (best.per_record, best.micro_batch)
                or not best.concurrency / 8 <= cfg.concurrency <= best.concurrency * 8):
            continue
        tau, cost = model.arrays(cfg)
        for lam in scale * np.geomspace(1e-3, 1e3, 19):
            _h, sol = _lagrange(model, cost, tau, float(lam))
            if sol.stages:
                pts.append((sol.con + over, sol.obj))
    arr = np.array([p for p in pts if p[0] <= 10 * best.wall_s and p[1] <= 3 * best.cost])
    return sorted({(float(arr[i, 0]), float(arr[i, 1])) for i in _pareto(arr[:, 0], arr[:, 1])})


def predict(cal: dict[str, Any], cand: Candidate, images: int, target: Target,
            arch: str) -> tuple[float, float]:
    """The planner's (wall s, $) of one given plan: the same model `search` optimises."""
    model = Model(cal, target, arch, 1, images)
    cfg = Config(cand.per_record, cand.micro_batch, cand.concurrency)
    tau_a, cost_a = model.arrays(cfg)
    tau = cost = 0.0
    bounds = cal["boundaries"]
    starts = [0, *[bounds.index(c) + 1 for c in cand.cuts]]
    ends = [*[bounds.index(c) for c in cand.cuts], model.k - 1]
    for n, ((i, j), m) in enumerate(zip(zip(starts, ends, strict=True), cand.memory,
                                        strict=True)):
        s, col = model.index[(i, j)], int(m) - MIN_MEMORY_MB
        if not MIN_MEMORY_MB <= int(m) <= MAX_MEMORY_MB or not np.isfinite(tau_a[s, col]):
            raise PlanError(f"stage {n} at {m} MB is not a feasible option")
        tau += float(tau_a[s, col])
        cost += float(cost_a[s, col])
    return tau + model.overhead_s(cfg), cost


def brute_force(cal: dict[str, Any], images: int, target: Target, arch: str,
                deadline_s: float | None, memory_step: int, per_record: list[int],
                micro_batch: list[int], concurrency: list[int],
                budget: float | None = None) -> Candidate | None:
    """Every cut set × every memory per stage × every configuration: the reference the
    tests hold `search` to (small calibrations; the last stage's memories as one array).
    The cheapest within `deadline_s`, or the fastest within `budget`."""
    from itertools import product

    model = Model(cal, target, arch, memory_step, images)
    k = model.k
    best = None
    for cfg in _configs(images, max(concurrency), per_record, micro_batch, concurrency):
        over = model.overhead_s(cfg)
        for mask in range(1 << (k - 1)):
            cut_idx = [b for b in range(k - 1) if mask >> b & 1]
            starts, ends = [0, *[c + 1 for c in cut_idx]], [*cut_idx, k - 1]
            per_stage = [model.options(i, j, cfg, pareto=False)
                         for i, j in zip(starts, ends, strict=True)]
            *head, last = per_stage
            for choice in product(*[range(len(p[0])) for p in head]):
                t0 = sum(p[0][c] for p, c in zip(head, choice, strict=True)) + over
                c0 = sum(p[1][c] for p, c in zip(head, choice, strict=True))
                tau, cost = t0 + last[0], c0 + last[1]
                if budget is None:
                    ok = np.nonzero(tau <= deadline_s)[0]
                    key = cost
                else:
                    ok = np.nonzero(cost <= budget)[0]
                    key = tau
                if not ok.size:
                    continue
                n = ok[int(np.argmin(key[ok]))]
                if best is None or (cost[n] < best.cost - 1e-15 if budget is None
                                    else tau[n] < best.wall_s - 1e-12):
                    mem = [int(model.mem[p[2][c]]) for p, c in zip(head, choice, strict=True)]
                    best = Candidate([cal["boundaries"][c] for c in cut_idx],
                                     [*mem, int(model.mem[last[2][n]])], cfg.per_record,
                                     cfg.micro_batch, cfg.concurrency, float(tau[n]),
                                     float(cost[n]))
    return best


# -- plan files -------------------------------------------------------------------------------


def make_plan(cal: dict[str, Any], cand: Candidate, images: int, target: Target, arch: str,
              request: dict[str, Any]) -> dict[str, Any]:
    """plan.json: what to run, what the planner predicts, and the calibration it rests on."""
    stages = stage_models(cal, cand.cuts, cand.micro_batch)
    return {
        "kind": PLAN_KIND, "version": 1, "model": cal["model"], "images": images,
        "cuts": cand.cuts, "memory": cand.memory, "images_per_record": cand.per_record,
        "micro_batch": cand.micro_batch, "concurrency": cand.concurrency, "arch": arch,
        "quantize": cal.get("quantize"), "target": target.to_dict(), "request": request,
        "predicted": {"label": "planner model (simulated)", "wall_s": cand.wall_s,
                      "cost": cand.cost, "per_million": cand.cost / images * 1e6,
                      "peak_mb": [round(s.peak_mb(), 1) for s in stages]},
        "calibration": cal,
    }


def load_plan(path: str | Path) -> dict[str, Any]:
    from .calibrate import validate
    from .errors import CalibrationError

    p = Path(path)
    if not p.is_file():
        raise PlanError(f"no plan file at {p}")
    try:
        plan = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise PlanError(f"{p} is not JSON: {exc}") from exc
    if not isinstance(plan, dict) or plan.get("kind") != PLAN_KIND:
        raise PlanError(f"{p} is not a serveless plan (expected kind {PLAN_KIND!r})")
    for key, typ in (("cuts", list), ("memory", list), ("images_per_record", int),
                     ("micro_batch", int), ("concurrency", int), ("images", int),
                     ("model", str), ("calibration", dict)):
        if not isinstance(plan.get(key), typ):
            raise PlanError(f"{p}: field {key!r} missing or of the wrong type")
    try:
        validate(plan["calibration"], f"{p} (its calibration)")
    except CalibrationError as exc:
        raise PlanError(str(exc)) from exc
    if plan.get("quantize") != plan["calibration"].get("quantize"):
        raise PlanError(f"{p}: its quantize {plan.get('quantize')!r} is not its calibration's "
                        f"{plan['calibration'].get('quantize')!r}")
    if len(plan["memory"]) != len(plan["cuts"]) + 1:
        raise PlanError(f"{p}: {len(plan['memory'])} memory sizes for "
                        f"{len(plan['cuts']) + 1} stages")
    return plan


def check_plan(plan: dict[str, Any]) -> None:
    """Refuse, before anything runs, a plan whose stage would not fit: predicted peak over
    its memory, an invocation over the function timeout, or a model over /tmp."""
    from .errors import CalibrationError

    cal = plan["calibration"]
    try:
        stages = stage_models(cal, list(plan["cuts"]), int(plan["micro_batch"]))
    except CalibrationError as exc:
        raise PlanError(str(exc)) from exc
    target = Target(**plan.get("target", {})) if plan.get("target") else Target()
    problems = []
    for k, (s, mem) in enumerate(zip(stages, plan["memory"], strict=True)):
        if not MIN_MEMORY_MB <= int(mem) <= MAX_MEMORY_MB:
            problems.append(f"stage {k}: memory {mem} MB outside {MIN_MEMORY_MB}-"
                            f"{MAX_MEMORY_MB} MB")
            continue
        need = s.memory_needed()
        if mem < need:
            problems.append(f"stage {k}: predicted peak {s.peak_mb():.0f} MB (+25% headroom = "
                            f"{need} MB) exceeds its memory {mem} MB")
        v = vcpus(int(mem))
        r = int(plan["images_per_record"])
        secs = (s.ms_per_record(r, v, target.cpu_factor)
                + float(s.load_ms(v, target.cpu_factor)) + target.platform_init_ms) / 1000
        if secs > target.timeout_s:
            problems.append(f"stage {k}: a record of {r} images takes a predicted {secs:.0f} s, "
                            f"over the {target.timeout_s:.0f} s timeout")
        if s.model_bytes > target.tmp_mb * 2**20:
            problems.append(f"stage {k}: model files {s.model_bytes / 2**20:.0f} MB exceed "
                            f"/tmp of {target.tmp_mb} MB")
    if problems:
        raise PlanError("plan refused before any invocation: " + "; ".join(problems))


def plot_pareto(front: list[tuple[float, float]], marks: dict[str, tuple[float, float]],
                images: int, path: str | Path, title: str) -> Path:
    """Cost against predicted wall time: the Pareto front and the named plans."""
    from matplotlib.figure import Figure

    from .plots import _save

    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    if front:
        xs, ys = zip(*front, strict=True)
        ax.step(xs, [y / images * 1e6 for y in ys], where="post", color="#444",
                label="Pareto front, its convex-hull plans (planner model, chosen record size "
                "and micro-batch)")
    for (name, (x, y)), mk in zip(marks.items(), "o^sDv", strict=False):
        ax.plot([x], [y / images * 1e6], mk, markersize=8, label=f"{name} (simulated)")
    ax.set_xscale("log")
    ax.set_xlabel("predicted wall time (s)")
    ax.set_ylabel("predicted USD per 1M images")
    ax.set_title(f"simulated: {title}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
