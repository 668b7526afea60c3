"""The planner: cuts, memory per stage, images per record, micro-batch and concurrency for
N images under a deadline (cheapest) or a budget (fastest), from a calibration.

The planner's job model is analytical and additive over stages, which makes an exact search
possible: with R images per record (n = N/R records), C invocations in flight and per stage
k an invocation time D_k and a cold start I_k (both functions of its memory),

    wall  ≈ ⌈n/C⌉ × Σ D_k + Σ I_k + ramp(C)
    cost  =  n × Σ bill(D_k) + min(n, C) × Σ bill(I_k)       (billed through cost.py)

so for each (R, micro-batch, C) a dynamic programme over block boundaries, keeping per
boundary the Pareto front of (time, cost) of every way to reach it (cuts × memory on the
`memory_step` grid), is exact; configurations whose cheapest possible plan cannot beat the
best found, or whose fastest cannot meet the deadline, are pruned without the front.
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

from .calibrate import StageModel, stage_models
from .cost import (
    LAMBDA_GB_SECOND,
    LAMBDA_REQUEST,
    MAX_MEMORY_MB,
    MIN_MEMORY_MB,
    S3_GET,
    S3_PUT,
    vcpus,
)
from .simulate import READ_BLOCK, Target

PLAN_KIND = "serveless-plan"
RECORD_SIZES = (25, 50, 100, 200, 500, 1000, 2000, 5000)
MICRO_BATCHES = (1, 4, 8, 16, 32, 64)
PAPER_MEM_MAX = 3008
PAPER_MEM_MIN = {"alexnet": [2048, 1280, 1024, 768]}


class PlanError(ValueError):
    """No plan meets the request, or a plan file is wrong or unsafe to run."""


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


class Model:
    """Per-stage (time, cost) arrays over the memory grid, for one calibration and target."""

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
        v = np.array([vcpus(int(m)) for m in grid])
        if target.cores is not None:
            v = np.minimum(v, target.cores)
        self.v = v
        self.price = LAMBDA_GB_SECOND[arch]
        self.k = len(cal["blocks"])
        self.bw = target.bandwidth_mb_s * 2**20 / 1000  # bytes per ms
        self._stage: dict[tuple[int, int, int], tuple[StageModel, np.ndarray, np.ndarray]] = {}
        self._bases: dict[tuple[int, ...], Any] = {}

    def stage(self, i: int, j: int, b: int) -> tuple[StageModel, np.ndarray, np.ndarray]:
        """The stage of blocks i..j at micro-batch b: (model, ms per image, load ms) per m."""
        key = (i, j, b)
        if key not in self._stage:
            s = StageModel(self.cal, i, j, b)
            t = self.target
            self._stage[key] = (s, np.asarray(s.ms_per_image(self.v, t.cpu_factor), float),
                                np.asarray(s.load_ms(self.v, t.cpu_factor), float))
        return self._stage[key]

    def options(self, i: int, j: int, cfg: Config,
                pareto: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(time weight s, cost $, memory index) of every feasible memory for stage i..j."""
        base = self._base(i, j, cfg)
        if base is None:
            return np.zeros(0), np.zeros(0), np.zeros(0, dtype=int)
        idx, d, init, cost_d, cost_i = base
        n_rec = self.images / cfg.per_record
        alpha = float(math.ceil(n_rec / cfg.concurrency))  # waves of records
        tau = (alpha * d + init) / 1000
        cost = n_rec * cost_d + min(cfg.concurrency, math.ceil(n_rec)) * cost_i
        if not pareto:
            return tau, cost, idx
        keep = _pareto(tau, cost)
        return tau[keep], cost[keep], idx[keep]

    def _base(self, i: int, j: int, cfg: Config) -> Any:
        """What does not depend on concurrency (except on the local target, where instances
        in flight share the cores): feasible memories, invocation and init ms, their bills."""
        t = self.target
        key = (i, j, cfg.micro_batch, cfg.per_record,
               cfg.concurrency if t.cores is not None else 0)
        if key in self._bases:
            return self._bases[key]
        s, ms_img, load = self.stage(i, j, cfg.micro_batch)
        if s.model_bytes > t.tmp_mb * 2**20:
            self._bases[key] = None
            return None
        r = cfg.per_record
        n_rec = self.images / r
        b_in, b_out = r * s.bytes_in_per_image, r * s.bytes_out_per_image
        gets = max(1, math.ceil(b_in / READ_BLOCK)) + (1 if j == self.k - 1 and i > 0 else 0)
        puts = 1 + (1 if i == 0 and j < self.k - 1 else 0)
        stretch: Any = 1.0
        if t.cores is not None:
            stretch = np.maximum(1.0, min(cfg.concurrency, math.ceil(n_rec)) * self.v / t.cores)
        io = b_in / self.bw + b_out / self.bw + t.request_ms * (gets + puts)
        d = t.invoke_ms + io + r * ms_img * stretch  # ms per invocation
        dl = 0.0 if t.name == "local" else s.model_bytes / self.bw + t.request_ms
        init = t.platform_init_ms + dl + load * stretch
        ok = (self.mem >= s.memory_needed()) & ((d + init) <= t.timeout_s * 1000)
        gb = self.mem / 1024 / 1000
        cost_d = self.price * gb * np.ceil(d) + LAMBDA_REQUEST + gets * S3_GET + puts * S3_PUT
        cost_i = (self.price * gb * np.ceil(init)
                  + max(1, math.ceil(s.model_bytes / READ_BLOCK)) * S3_GET)
        idx = np.nonzero(ok)[0]
        d, init = np.broadcast_to(d, self.mem.shape), np.broadcast_to(init, self.mem.shape)
        out = (idx, d[idx], init[idx], cost_d[idx], cost_i[idx])
        self._bases[key] = out
        return out

    def overhead_s(self, cfg: Config) -> float:
        return ramp_loss_s(min(cfg.concurrency, math.ceil(self.images / cfg.per_record)),
                           self.target)


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


def _scalar_dp(model: Model, cfg: Config, opts: dict[tuple[int, int], Any], which: int) -> float:
    """The least total of time (which=0) or cost (which=1) over every cut set, no constraint."""
    k = model.k
    best = [math.inf] * (k + 1)
    best[0] = 0.0
    for j in range(1, k + 1):
        for i in range(j):
            o = opts[(i, j - 1)]
            if o[which].size and best[i] < math.inf:
                best[j] = min(best[j], best[i] + float(o[which].min()))
    return best[k]


def _suffix(model: Model, opts: dict[tuple[int, int], Any], which: int) -> list[float]:
    """Least time or cost to go from boundary i to the end."""
    k = model.k
    best = [math.inf] * (k + 1)
    best[k] = 0.0
    for i in range(k - 1, -1, -1):
        for j in range(i + 1, k + 1):
            o = opts[(i, j - 1)]
            if o[which].size and best[j] < math.inf:
                best[i] = min(best[i], float(o[which].min()) + best[j])
    return best


def _front_dp(model: Model, cfg: Config, opts: dict[tuple[int, int], Any], tau_max: float,
              cost_max: float) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """Exact Pareto front (time, cost) of whole plans with time <= tau_max, cost <= cost_max,
    and a way to rebuild each point's cuts and memory."""
    k = model.k
    suf_t, suf_c = _suffix(model, opts, 0), _suffix(model, opts, 1)
    fronts: list[Any] = [None] * (k + 1)
    fronts[0] = (np.zeros(1), np.zeros(1), np.full(1, -1), np.full(1, -1), np.full(1, -1))
    for j in range(1, k + 1):
        parts_t, parts_c, parts_i, parts_p, parts_m = [], [], [], [], []
        for i in range(j):
            f = fronts[i]
            tau_o, cost_o, mem_o = opts[(i, j - 1)]
            if f is None or f[0].size == 0 or tau_o.size == 0:
                continue
            tt = (f[0][:, None] + tau_o[None, :]).ravel()
            cc = (f[1][:, None] + cost_o[None, :]).ravel()
            ok = (tt + suf_t[j] <= tau_max) & (cc + suf_c[j] <= cost_max)
            if not ok.any():
                continue
            sel = np.nonzero(ok)[0]
            parts_t.append(tt[sel])
            parts_c.append(cc[sel])
            parts_i.append(np.full(sel.size, i))
            parts_p.append(sel // tau_o.size)
            parts_m.append(mem_o[sel % tau_o.size])
        if not parts_t:
            fronts[j] = (np.zeros(0), np.zeros(0), np.zeros(0, int), np.zeros(0, int),
                         np.zeros(0, int))
            continue
        tt, cc = np.concatenate(parts_t), np.concatenate(parts_c)
        keep = _pareto(tt, cc)
        fronts[j] = (tt[keep], cc[keep], np.concatenate(parts_i)[keep],
                     np.concatenate(parts_p)[keep], np.concatenate(parts_m)[keep])
    return fronts[k][0], fronts[k][1], fronts


def _rebuild(model: Model, fronts: list[Any], idx: int) -> tuple[list[str], list[int]]:
    j, cuts, mem = model.k, [], []
    while j > 0:
        _t, _c, ii, pp, mm = fronts[j]
        i, p, m = int(ii[idx]), int(pp[idx]), int(mm[idx])
        mem.append(int(model.mem[m]))
        if i > 0:
            cuts.append(model.cal["boundaries"][i - 1])
        j, idx = i, p
    return cuts[::-1], mem[::-1]


def search(cal: dict[str, Any], images: int, target: Target, arch: str = "x86_64",
           deadline_s: float | None = None, budget: float | None = None,
           max_concurrency: int | None = None, memory_step: int = 64,
           per_record: list[int] | None = None, micro_batch: list[int] | None = None,
           concurrency: list[int] | None = None) -> Search:
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
    configs = _configs(images, max_c, per_record, micro_batch, concurrency)
    k = model.k
    scored = []
    fastest: Candidate | None = None
    all_points: list[tuple[float, float]] = []
    for cfg in configs:
        opts = {(i, j): model.options(i, j, cfg) for i in range(k) for j in range(i, k)}
        over = model.overhead_s(cfg)
        min_t = _scalar_dp(model, cfg, opts, 0) + over
        min_c = _scalar_dp(model, cfg, opts, 1)
        if math.isinf(min_t):
            continue
        scored.append((cfg, opts, over, min_t, min_c))
        if fastest is None or min_t < fastest.wall_s:
            tt, cc, fronts = _front_dp(model, cfg, opts, min_t - over + 1e-9, math.inf)
            i = int(np.argmin(tt))
            cuts, mem = _rebuild(model, fronts, i)
            fastest = Candidate(cuts, mem, cfg.per_record, cfg.micro_batch, cfg.concurrency,
                                float(tt[i]) + over, float(cc[i]))
    if fastest is None:
        raise PlanError("no stage of this model fits any Lambda memory size, timeout or /tmp")
    best: Candidate | None = None
    searched = 0
    if deadline_s is not None:
        scored.sort(key=lambda s: s[4])  # cheapest lower bound first
        for cfg, opts, over, min_t, min_c in scored:
            if min_t > deadline_s or (best is not None and min_c >= best.cost):
                continue
            searched += 1
            tt, cc, fronts = _front_dp(model, cfg, opts, deadline_s - over,
                                       best.cost if best else math.inf)
            all_points += [(float(a) + over, float(b)) for a, b in zip(tt, cc, strict=True)]
            if tt.size:
                i = int(np.argmin(cc))
                if best is None or cc[i] < best.cost:
                    cuts, mem = _rebuild(model, fronts, i)
                    best = Candidate(cuts, mem, cfg.per_record, cfg.micro_batch,
                                     cfg.concurrency, float(tt[i]) + over, float(cc[i]))
    else:
        scored.sort(key=lambda s: s[3])  # fastest lower bound first
        for cfg, opts, over, min_t, min_c in scored:
            if min_c > budget or (best is not None and min_t >= best.wall_s):  # type: ignore
                continue
            searched += 1
            lim = (best.wall_s if best else math.inf) - over
            tt, cc, fronts = _front_dp(model, cfg, opts, lim, budget)  # type: ignore[arg-type]
            all_points += [(float(a) + over, float(b)) for a, b in zip(tt, cc, strict=True)]
            if tt.size:
                i = int(np.argmin(tt))
                if best is None or tt[i] + over < best.wall_s:
                    cuts, mem = _rebuild(model, fronts, i)
                    best = Candidate(cuts, mem, cfg.per_record, cfg.micro_batch,
                                     cfg.concurrency, float(tt[i]) + over, float(cc[i]))
    search_s = time.perf_counter() - t0
    if best is not None:  # the front drawn: concurrency C/8..8C at the chosen record size and
        # micro-batch, within 10× the chosen plan's time and 3× its cost
        for cfg, opts, over, _min_t, _min_c in scored:
            if ((cfg.per_record, cfg.micro_batch) == (best.per_record, best.micro_batch)
                    and best.concurrency / 8 <= cfg.concurrency <= best.concurrency * 8):
                tt, cc, _f = _front_dp(model, cfg, opts, 10 * best.wall_s - over, 3 * best.cost)
                all_points += [(float(a) + over, float(b)) for a, b in zip(tt, cc, strict=True)]
    pts = np.array(all_points) if all_points else np.zeros((0, 2))
    front = [tuple(map(float, pts[i])) for i in _pareto(pts[:, 0], pts[:, 1])] if len(pts) \
        else []
    return Search(best, fastest, sorted(front), len(configs), searched,  # type: ignore[arg-type]
                  search_s, time.perf_counter() - t0 - search_s)


def predict(cal: dict[str, Any], cand: Candidate, images: int, target: Target,
            arch: str) -> tuple[float, float]:
    """The planner's (wall s, $) of one given plan: the same model `search` optimises."""
    model = Model(cal, target, arch, 1, images)
    cfg = Config(cand.per_record, cand.micro_batch, cand.concurrency)
    tau = cost = 0.0
    bounds = cal["boundaries"]
    starts = [0, *[bounds.index(c) + 1 for c in cand.cuts]]
    ends = [*[bounds.index(c) for c in cand.cuts], model.k - 1]
    for (i, j), m in zip(zip(starts, ends, strict=True), cand.memory, strict=True):
        tt, cc, mi = model.options(i, j, cfg)
        hit = np.nonzero(model.mem[mi] == m)[0]
        if hit.size == 0:  # off the Pareto set or infeasible: evaluate directly
            raise PlanError(f"stage {len(starts)} at {m} MB is not a feasible option")
        tau += float(tt[hit[0]])
        cost += float(cc[hit[0]])
    return tau + model.overhead_s(cfg), cost


def brute_force(cal: dict[str, Any], images: int, target: Target, arch: str,
                deadline_s: float, memory_step: int, per_record: list[int],
                micro_batch: list[int], concurrency: list[int]) -> Candidate | None:
    """Every cut set × every memory per stage × every configuration: the reference the
    tests hold `search` to (small calibrations only)."""
    from itertools import product

    model = Model(cal, target, arch, memory_step, images)
    k = model.k
    best = None
    for cfg in _configs(images, max(concurrency), per_record, micro_batch, concurrency):
        over = model.overhead_s(cfg)
        for mask in range(1 << (k - 1)):
            cut_idx = [b for b in range(k - 1) if mask >> b & 1]
            starts, ends = [0, *[c + 1 for c in cut_idx]], [*cut_idx, k - 1]
            per_stage = []
            for i, j in zip(starts, ends, strict=True):
                per_stage.append(_all_options(model, i, j, cfg))
            for choice in product(*[range(len(p[0])) for p in per_stage]):
                tau = sum(p[0][c] for p, c in zip(per_stage, choice, strict=True)) + over
                cost = sum(p[1][c] for p, c in zip(per_stage, choice, strict=True))
                if tau <= deadline_s and (best is None or cost < best.cost - 1e-15):
                    best = Candidate([cal["boundaries"][c] for c in cut_idx],
                                     [int(model.mem[p[2][c]]) for p, c in
                                      zip(per_stage, choice, strict=True)],
                                     cfg.per_record, cfg.micro_batch, cfg.concurrency, tau, cost)
    return best


def _all_options(model: Model, i: int, j: int, cfg: Config) -> tuple[list, list, list]:
    """Every feasible memory of a stage, on the Pareto set or not (for brute_force)."""
    tt, cc, mm = model.options(i, j, cfg, pareto=False)
    return list(tt), list(cc), list(mm)


# -- plan files -------------------------------------------------------------------------------


def make_plan(cal: dict[str, Any], cand: Candidate, images: int, target: Target, arch: str,
              request: dict[str, Any]) -> dict[str, Any]:
    """plan.json: what to run, what the planner predicts, and the calibration it rests on."""
    stages = stage_models(cal, cand.cuts, cand.micro_batch)
    return {
        "kind": PLAN_KIND, "version": 1, "model": cal["model"], "images": images,
        "cuts": cand.cuts, "memory": cand.memory, "images_per_record": cand.per_record,
        "micro_batch": cand.micro_batch, "concurrency": cand.concurrency, "arch": arch,
        "target": target.to_dict(), "request": request,
        "predicted": {"label": "planner model (simulated)", "wall_s": cand.wall_s,
                      "cost": cand.cost, "per_million": cand.cost / images * 1e6,
                      "peak_mb": [round(s.peak_mb(), 1) for s in stages]},
        "calibration": cal,
    }


def load_plan(path: str | Path) -> dict[str, Any]:
    from .calibrate import CalibrationError, validate

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
    if len(plan["memory"]) != len(plan["cuts"]) + 1:
        raise PlanError(f"{p}: {len(plan['memory'])} memory sizes for "
                        f"{len(plan['cuts']) + 1} stages")
    return plan


def check_plan(plan: dict[str, Any]) -> None:
    """Refuse, before anything runs, a plan whose stage would not fit: predicted peak over
    its memory, an invocation over the function timeout, or a model over /tmp."""
    from .calibrate import CalibrationError

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
        secs = (r * float(s.ms_per_image(v, target.cpu_factor))
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
                label="Pareto front (planner model, chosen record size and micro-batch)")
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
