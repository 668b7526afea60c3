"""The planner: cuts, memory per stage, images per record, micro-batch and concurrency for
N images under a deadline (cheapest) or a budget (fastest), from a calibration.

The planner's job model is analytical and additive over stages, which makes an exact search
possible: with R images per record (n = N/R records), C invocations in flight and per stage
k an invocation time D_k and a cold start I_k (both functions of its memory),

    wall  ≈ ⌈n/C⌉ × Σ D_k + Σ I_k + ramp(C)
    cost  =  n × Σ bill(D_k) + min(n, C) × Σ bill(I_k)       (billed through cost.py)

with a partial last record priced at its own size, on the critical path only when it is
alone in the last wave, and running ahead of full records in a single wave
(jobmodel.Weights): still a sum over stages, which is what the search needs.

so for each (R, micro-batch, C) a dynamic programme over block boundaries, keeping per
boundary the Pareto front of (time, cost) of every way to reach it (cuts × memory on the
`memory_step` grid, 1 MB by default), is exact. What keeps it fast at 1 MB: every candidate
stage's time and cost over all memory sizes are numpy arrays built at once; Lagrangian bounds
(min of cost + λ·time per stage, summed along the best cut set) drop every memory and every
partial plan that cannot beat the best feasible plan known; configurations whose cheapest
possible plan cannot beat the best found, or whose fastest cannot meet the deadline, are
pruned from closed-form bounds without building their arrays.
The model itself is jobmodel.py; the plan files are plan.py. The chosen plan, the paper's
presets and the fastest plan are then run through the discrete-event simulator
(`simulate.py`), which knows Lambda's limits in full.
"""


from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import PlanError
from ..runtime.protocol import CAL_BATCH
from .jobmodel import MICRO_BATCHES, RECORD_SIZES, Config, Model, pareto
from .simulate import Target
from .stagemodel import calibration_batch


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
            p = pareto(c[idx], o[idx])
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
        keep = pareto(cc, oo)
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
    return sorted({(float(arr[i, 0]), float(arr[i, 1])) for i in pareto(arr[:, 0], arr[:, 1])})
