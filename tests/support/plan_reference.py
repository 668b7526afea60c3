"""Reference implementations the planner's tests hold `planning.search` to: the planner's
value of one given plan (`predict`), and every plan enumerated (`brute_force`). Test code:
nothing in the package calls them."""

from __future__ import annotations

from typing import Any

import numpy as np

from serveless.cost import MAX_MEMORY_MB, MIN_MEMORY_MB
from serveless.errors import PlanError
from serveless.planning.jobmodel import Config, Model
from serveless.planning.search import Candidate, _configs
from serveless.planning.simulate import Target


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
