"""A discrete-event simulation of a whole job: the one place that knows Lambda's limits.

Given a plan (cuts, memory per stage, images per record, micro-batch, concurrency) and a
calibration, it replays what the driver (`driver.scheduler.run_job`) does: at most C invocations in
flight, the deepest ready stage first, a warm instance reused while it is kept alive, else a
cold start. Target `lambda` adds the platform's limits: the account's concurrency limit, the
scaling ramp of each function (1,000 more execution environments per 10 s), throttled
invocations retried with backoff, cold start = platform init + model download + measured
model load, S3 request rates per prefix, a per-function network bandwidth, the 900 s
timeout, and a CPU speed factor (Lambda's processors are not this machine's). Target
`local` models this machine's backend instead: its cores shared by the instances in flight
and the store's measured bandwidth.

Every invocation becomes a log row like the driver's, billed through `cost.py`; the result
is labelled simulated everywhere it is shown. The driver's own store requests (uploads,
job.json, log segments, resume checks, the lease) are counted as driver.json will count
them (driver/requestmodel.py) and kept apart, as a measured summary keeps them, so the
simulated cost and a job's measured cost compare like for like.
"""

from __future__ import annotations

import heapq
import math
import os
import random
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..cost import LAMBDA_GB_SECOND, bill, billed_ms, store_request_cost, vcpus
from ..driver.requestmodel import driver_requests
from ..errors import SimulationError
from ..runtime.protocol import TIMEOUT, InvocationError
from ..store import READ_BLOCK
from .embeddings import last_stage_puts
from .figures import figure_sources
from .stagemodel import StageModel, stage_models

SIMULATED = "simulated"


@dataclass
class Target:
    """Where the job runs. Defaults for `lambda` are AWS's documented limits or guesses,
    each settable; figures.py names the source of each, or says it is a guess.

    - concurrency_limit: the account's default concurrent executions (AWS: 1,000).
    - ramp_per_10s: new execution environments per function per 10 s (AWS since 2023: 1,000).
    - platform_init_ms: runtime start before our code runs (Python with numpy and
      onnxruntime: a guess of 800 ms; the model download and load come on top).
    - bandwidth_mb_s: network throughput of one function to S3 (a guess of 80 MB/s).
    - request_ms: latency of one S3 GET or PUT (a guess of 20 ms).
    - s3_get_per_s / s3_put_per_s: per prefix (AWS: 5,500 GET/s and 3,500 PUT/s).
    - invoke_ms: invocation overhead per call (a guess of 30 ms).
    - keep_alive_s: idle time before an environment is reclaimed (undocumented by AWS: a
      guess of 600 s).
    - timeout_s: the function timeout (Lambda's maximum, 900 s).
    - tmp_mb: /tmp size, which must hold a stage's model files (Lambda's default 512 MB).
    - cpu_factor: this machine's time per image / Lambda's at the same CPU share, i.e. the
      speed of one core (a guess of 1.0: same speed).
    - cpu_quota: the CPU share an instance gets over what its memory buys (vCPUs = memory
      / 1769 MB, AWS's documented rule: 1.0). Not a speed: a quota of 0.5 makes a 1769 MB
      instance run as the calibration's 0.5 vCPU child, and a 3008 MB one (1.7 vCPUs, 2
      threads) as a 0.85 vCPU one, where a speed factor of 0.5 would stretch the time of
      1.7 vCPUs, whose Amdahl speed-up the quota never lets it have (the local backend's
      `cpu_scale` is such a quota; on 2026-12-04 the speed factor overestimated the 3008
      MB stage of bench_fit by 19% in cost). The model's threads stay the memory's vCPUs
      rounded up, as the driver sets them: a quota above them serves only the input thread.
    - init_fixed_ms: a part of each cold start's init that no CPU share speeds up (the
      local backend's `platform_init_ms`, a platform's own setup), on top of
      platform_init_ms; fitted from a job's log (planning/fit.py), else 0.
    - start_cpu_bound: platform_init_ms is the process start, run under the instance's CPU
      share (local: the backend places a new instance in its cgroup at once, so a 0.5 vCPU
      instance starts about half as fast as the calibration's 1 vCPU child); init_fixed_ms
      is not scaled. On Lambda the platform init is an assumption of its own, not scaled.
    - store_in_cpu: local only, a folder store with a calibration that timed the function's
      reads and writes (its `write_ms_per_mb` ...): those are CPU work of the function,
      counted in the stage's time at its CPU share, so no bandwidth term is added on top.
    - object_store: the job's store is an object store (S3; a local calibration's store
      URL says), so the driver probes it before setup and before the run.
    - cores: local only: the cores the instances in flight share. Each progresses at its
      vCPU share × min(1, cores / the vCPUs of all in flight), recomputed whenever one
      starts or ends (processor sharing), init and handler alike.
    """

    name: str = "lambda"
    concurrency_limit: int | None = 1000
    ramp_per_10s: int | None = 1000
    platform_init_ms: float = 800.0
    bandwidth_mb_s: float = 80.0
    request_ms: float = 20.0
    s3_get_per_s: float | None = 5500.0
    s3_put_per_s: float | None = 3500.0
    invoke_ms: float = 30.0
    keep_alive_s: float = 600.0
    timeout_s: float = 900.0
    tmp_mb: int = 512
    cpu_factor: float = 1.0
    cpu_quota: float = 1.0
    init_fixed_ms: float = 0.0
    cores: float | None = None  # local: instances share this many cores
    throttle_backoff_max_s: float = 20.0
    start_cpu_bound: bool = False
    store_in_cpu: bool = False
    object_store: bool = True
    profile: dict[str, Any] | None = None  # the platform profile some figures came from

    @property
    def bytes_per_ms(self) -> float:
        """Store throughput of one function (inf where the calibration times it as CPU)."""
        return math.inf if self.store_in_cpu else self.bandwidth_mb_s * 2**20 / 1000

    @classmethod
    def make(cls, name: str, cal: dict[str, Any] | None = None, **overrides: Any) -> Target:
        """`lambda` with AWS's limits, or `local` with this machine's measured figures."""
        if name == "lambda":
            t = cls()
        elif name == "local":
            store = (cal or {}).get("store", {})
            t = cls(name="local", concurrency_limit=None, ramp_per_10s=None,
                    platform_init_ms=float((cal or {}).get("start_ms", 300.0)),
                    bandwidth_mb_s=float(min(store.get("read_mb_s", 1000.0),
                                             store.get("write_mb_s", 1000.0))),
                    request_ms=float(store.get("request_ms", 1.0)), s3_get_per_s=None,
                    s3_put_per_s=None, invoke_ms=5.0, keep_alive_s=300.0, tmp_mb=10**6,
                    cores=float(os.cpu_count() or 1), start_cpu_bound=True,
                    store_in_cpu=("://" not in str(store.get("url", "://"))
                                  and "write_ms_per_mb" in (cal or {})),
                    object_store="://" in str(store.get("url", "://"))
                    and not str(store.get("url")).startswith("file://"))
        else:
            raise SimulationError(f"target must be lambda or local, got {name!r}")
        for key, value in overrides.items():
            if key not in cls.__dataclass_fields__:
                raise SimulationError(f"unknown target setting {key!r}")
            setattr(t, key, value)
        if t.cpu_factor <= 0 or t.cpu_quota <= 0 or t.bandwidth_mb_s <= 0:
            raise SimulationError("cpu_factor, cpu_quota and bandwidth must be > 0")
        if t.init_fixed_ms < 0:
            raise SimulationError("init_fixed_ms must be >= 0")
        return t

    def share(self, memory_mb: int) -> float:
        """The vCPUs of CPU quota an instance of `memory_mb` gets: its memory's × cpu_quota."""
        return vcpus(memory_mb) * self.cpu_quota

    def start_ms(self, share: float) -> float:
        """A cold start's init before the model load, at a CPU share: the process start
        (slower below 1 vCPU where it runs under the share) and the fixed part."""
        scale = min(share, 1.0) if self.start_cpu_bound else 1.0
        return self.platform_init_ms / scale + self.init_fixed_ms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Env:
    id: str
    stage: int
    last_used: float


@dataclass(eq=False)
class _Running:
    """An invocation in flight: its init and handler work in ms at its full CPU share, and
    the wall ms each has taken so far (more than the work while it shares the cores)."""

    row: dict[str, Any]
    env: _Env
    rec: int
    attempt: int
    init_work: float
    dur_work: float
    last: float  # s: when its progress was last brought up to date
    t0: float = 0.0  # s: when it started
    init_ms: float = 0.0
    dur_ms: float = 0.0
    version: int = 0  # of its end event: a share change moves the end
    timed_out: bool = False
    demand: float = 0.0  # local: the vCPUs it uses now (a process start uses one at most)

    def advance(self, t: float, share: float) -> None:
        work = (t - self.last) * 1000 * share
        self.last = t
        use = min(work, self.init_work)
        self.init_work -= use
        self.init_ms += use / share
        use = min(work - use, self.dur_work)
        self.dur_work -= use
        self.dur_ms += use / share

    def left_ms(self) -> float:
        return self.init_work + self.dur_work


@dataclass
class SimResult:
    target: dict[str, Any]
    wall_s: float
    rows: list[dict[str, Any]]
    images: int
    throttles: int
    timeouts: int
    failed_records: int
    arch: str
    per_stage: list[dict[str, Any]] = field(default_factory=list)
    cost: float = 0.0
    gb_s: float = 0.0
    invocations: int = 0
    cold_starts: int = 0
    driver_requests: dict[str, int] = field(default_factory=dict)
    driver_store_ops: float = 0.0  # $, included in cost
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)  # figures.py

    @property
    def functions_cost(self) -> float:
        """The invocations' own cost (compute, requests, their S3 requests): `cost` less
        the driver's requests, to set beside `cost.bill` of a job's log alone."""
        return self.cost - self.driver_store_ops

    def summary(self) -> dict[str, Any]:
        """The JSON form: what was simulated, on which assumptions, and its figures."""
        return {
            "label": SIMULATED, "target": self.target, "cpu_factor": self.target["cpu_factor"],
            "figures": self.figures,
            "wall_s": self.wall_s, "images": self.images, "cost": self.cost,
            "per_million": self.cost / self.images * 1e6 if self.images else None,
            "gb_s": self.gb_s, "invocations": self.invocations,
            "cold_starts": self.cold_starts,
            "throttles": self.throttles, "timeouts": self.timeouts,
            "failed_records": self.failed_records, "arch": self.arch,
            "per_stage": self.per_stage,
            "functions_cost": self.functions_cost,
            "driver_requests": self.driver_requests,
            "driver_store_ops": self.driver_store_ops,
        }


def _gets(nbytes: float) -> int:
    return max(1, math.ceil(nbytes / READ_BLOCK))


def simulate(plan: dict[str, Any], cal: dict[str, Any], target: Target,
             images: int | None = None, retries: int = 3, seed: int = 0,
             keep_rows: bool = True, models_uploaded: bool = True,
             labels: bool = False) -> SimResult:
    """Simulate the plan's job; `images` overrides the plan's image count.

    The driver's requests are those of a new job: its records uploaded, its stage models
    too unless `models_uploaded` is False (a store that holds them from an earlier job),
    labels.json written when `labels` (images in class folders)."""
    n_images = int(images if images is not None else plan["images"])
    per_record = int(plan["images_per_record"])
    conc = int(plan["concurrency"])
    memory = [int(m) for m in plan["memory"]]
    micro_batch = int(plan["micro_batch"])
    if n_images < 1 or per_record < 1 or conc < 1 or micro_batch < 1:
        raise SimulationError("images, images per record, concurrency and micro-batch "
                              "must be >= 1")
    stages: list[StageModel] = stage_models(cal, list(plan["cuts"]), micro_batch)
    if len(memory) != len(stages):
        raise SimulationError(f"{len(memory)} memory sizes for {len(stages)} stages")
    arch = plan.get("arch", "x86_64")
    if arch not in LAMBDA_GB_SECOND:
        raise SimulationError(f"arch must be one of {', '.join(sorted(LAMBDA_GB_SECOND))}")
    n_rec = math.ceil(n_images / per_record)
    sizes = [per_record] * (n_rec - 1) + [n_images - per_record * (n_rec - 1)]
    k_last = len(stages) - 1
    last_puts = last_stage_puts(cal)
    v = [vcpus(m) for m in memory]  # the memory's vCPUs: logged, and the model's threads
    threads = [float(math.ceil(x)) for x in v]
    # the CPU quota each instance runs under, as much of it as its threads can use (a
    # function caps its threads at its quota rounded up, runtime/cpu.usable_threads,
    # which leaves this minimum as it is)
    q = [min(target.share(m), n) for m, n in zip(memory, threads, strict=True)]
    record_ms: dict[tuple[int, int], float] = {}  # (stage, images): a call's compute

    def compute(stage: int, n: int) -> float:
        if (stage, n) not in record_ms:
            record_ms[stage, n] = stages[stage].ms_per_record(n, q[stage], target.cpu_factor,
                                                              threads[stage])
        return record_ms[stage, n]

    load = [float(s.load_ms(q[k], target.cpu_factor)) for k, s in enumerate(stages)]
    first = [s.first_call_ms() / min(q[k], 1.0) / target.cpu_factor  # a cold start's 1st call
             for k, s in enumerate(stages)]
    bw = target.bytes_per_ms
    rng = random.Random(seed)

    idle: list[deque[_Env]] = [deque() for _ in stages]  # oldest first
    busy = [0] * len(stages)
    first_call: list[float | None] = [None] * len(stages)
    env_ids = [0] * len(stages)
    per_second: dict[tuple[str, int], int] = {}  # requests per prefix in each second
    cpu_demand = 0.0  # local: vCPUs of the invocations in flight
    share = 1.0  # local: the part of its vCPUs each invocation in flight gets
    running: set[_Running] = set()
    start_ms = [target.start_ms(x) for x in q]
    ready: list[tuple[int, int, int]] = [(0, r, 0) for r in range(n_rec)]  # (-stage, rec, try)
    delayed: list[tuple[float, int, int, int]] = []  # (not_before, -stage, record, attempt)
    throttled: dict[tuple[int, int], int] = {}
    events: list[tuple[float, int, str, Any]] = []
    seq = 0
    rows: list[dict[str, Any]] = []
    stats = {"throttles": 0, "timeouts": 0, "failed": 0}
    inflight = 0
    now = 0.0

    def push(t: float, kind: str, data: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    def rate_delay(prefix: str, count: int, rate: float | None, t: float) -> float:
        """Seconds the requests at t wait for the prefix's request rate: S3 serves `rate`
        per second per prefix, so they go in the first second from t that has room.
        (Requests are booked in the order calls start, not in the order they are made: a
        queue of the next free instant made a short call's write, started after a long
        one, wait for the long one's write 1.5 s later.)"""
        if rate is None:
            return 0.0
        sec = math.floor(t)
        while per_second.get((prefix, sec), 0) and per_second[prefix, sec] + count > rate:
            sec += 1
        per_second[prefix, sec] = per_second.get((prefix, sec), 0) + count
        return max(0.0, sec - t)

    def start(stage: int, rec: int, attempt: int, t: float) -> bool:
        """Begin an invocation at t; False when the platform throttles it."""
        nonlocal cpu_demand
        env = None
        pool = idle[stage]
        while pool and t - pool[0].last_used > target.keep_alive_s:
            pool.popleft()  # reclaimed after the keep-alive
        if pool:
            env = pool.pop()
        total_busy = sum(busy)
        if target.concurrency_limit is not None and total_busy >= target.concurrency_limit:
            if env is not None:
                pool.append(env)
            return False
        if env is None and target.ramp_per_10s is not None:
            t0 = first_call[stage] if first_call[stage] is not None else t
            cap = target.ramp_per_10s * (1 + math.floor((t - t0) / 10.0))
            if busy[stage] >= cap:
                return False
        if first_call[stage] is None:
            first_call[stage] = t
        cold = env is None
        if cold:
            env_ids[stage] += 1
            env = _Env(f"stage{stage}-{memory[stage]}mb-{env_ids[stage]}", stage, t)
        busy[stage] += 1
        s = stages[stage]
        n = sizes[rec]
        init_ms = 0.0
        gets = puts = 0
        if cold:
            dl = 0.0 if target.name == "local" else s.model_bytes / bw + target.request_ms
            init_ms = start_ms[stage] + dl + load[stage]
            gets += _gets(s.model_bytes)
        b_in = n * s.bytes_in_per_image
        b_out = n * s.bytes_out_per_image
        g_in = _gets(b_in) + (1 if stage == k_last and stage > 0 else 0)
        p_out = (1 + (1 if stage == 0 and stage != k_last else 0)
                 + (last_puts - 1 if stage == k_last else 0))
        gets += g_in
        puts += p_out
        tt = t + init_ms / 1000
        src = "records" if stage == 0 else f"stage-{stage - 1}"
        read_ms = b_in / bw + target.request_ms * g_in + 1000 * rate_delay(
            src + ":get", g_in, target.s3_get_per_s, tt)
        compute_ms = compute(stage, n) + (first[stage] if cold else 0.0)
        write_at = tt + (read_ms + compute_ms) / 1000
        write_ms = b_out / bw + target.request_ms * p_out + 1000 * rate_delay(
            f"stage-{stage}:put", p_out, target.s3_put_per_s, write_at)
        duration = target.invoke_ms + read_ms + compute_ms + write_ms
        row = {"stage": stage, "record": f"r{rec:06d}", "attempt": attempt,
               "started": round(t, 6), "memory_mb": memory[stage], "vcpus": round(v[stage], 3),
               "cold": cold, "init_ms": init_ms, "duration_ms": duration,
               "billed_ms": 0, "images": n, "image_errors": 0,
               "read_ms": round(read_ms, 3), "compute_ms": round(compute_ms, 3),
               "write_ms": round(write_ms, 3), "bytes_in": int(b_in), "bytes_out": int(b_out),
               "gets": gets, "puts": puts, "instance": env.id, "error": None,
               "label": SIMULATED}
        job = _Running(row, env, rec, attempt, init_ms, duration, t, t)
        if target.cores is None:
            if (init_ms + duration) / 1000 > target.timeout_s:
                duration = max(0.0, target.timeout_s * 1000 - init_ms)
                job.timed_out = True
            job.init_ms, job.dur_ms, job.init_work, job.dur_work = init_ms, duration, 0.0, 0.0
            push(t + (init_ms + duration) / 1000, "end", (job, 0))
        else:
            # The process start and the model load run on one thread: until the init is
            # done an instance above 1 vCPU uses 1 (two 3008 MB cold starts on 2 cores
            # took 280 ms each, as alone, not the 1.7x longer full demand would give).
            job.demand = min(q[stage], 1.0) if init_ms > 0 else q[stage]
            cpu_demand += job.demand
            running.add(job)
            reshare(t)
        return True

    def reshare(t: float) -> None:
        """Processor sharing (local): bring every invocation in flight up to t at the old
        share, then give all the share the cores allow now and move their ends."""
        nonlocal share
        for job in running:
            job.advance(t, share)
        share = min(1.0, target.cores / cpu_demand) if cpu_demand > 0 else 1.0  # type: ignore
        for job in running:
            job.version += 1
            end = min(t + job.left_ms() / share / 1000, job.t0 + target.timeout_s)
            push(end, "end", (job, job.version))
            if job.demand < q[job.row["stage"]]:  # still in its init (or just done)
                push(min(t + max(job.init_work, 0.0) / share / 1000, end), "init done",
                     (job, job.version))

    def finish(job: _Running, t: float) -> dict[str, Any]:
        """The invocation's log row once it ends at t (timeouts on the wall time taken)."""
        nonlocal cpu_demand
        if target.cores is not None:
            job.advance(t, share)
            if job.left_ms() > 1e-6:  # ended by the timeout, work left
                job.timed_out = True
            else:  # the float residue of the last step
                job.init_ms += job.init_work / share
                job.dur_ms += job.dur_work / share
            running.discard(job)
            cpu_demand -= job.demand
            reshare(t)
        row, init_ms, duration = job.row, job.init_ms, job.dur_ms
        stretch = duration / row["duration_ms"] if row["duration_ms"] else 1.0
        for key in ("read_ms", "compute_ms", "write_ms"):
            row[key] = round(row[key] * stretch, 3)
        error = None
        if job.timed_out:
            error = InvocationError(TIMEOUT, f"ran past {target.timeout_s:.0f} s").to_dict()
            stats["timeouts"] += 1
        row.update(init_ms=round(init_ms, 3), duration_ms=round(duration, 3),
                   billed_ms=billed_ms(duration, init_ms), error=error)
        return row

    def fill(t: float) -> None:
        nonlocal inflight
        while delayed and delayed[0][0] <= t:
            _, neg_stage, rec, attempt = heapq.heappop(delayed)
            heapq.heappush(ready, (neg_stage, rec, attempt))
        while ready and inflight < conc:
            neg_stage, rec, attempt = heapq.heappop(ready)
            if start(-neg_stage, rec, attempt, t):
                inflight += 1
            else:  # throttled (429): the caller backs off and tries again
                stats["throttles"] += 1
                n = throttled[(neg_stage, rec)] = throttled.get((neg_stage, rec), 0) + 1
                delay = min(target.throttle_backoff_max_s, 0.2 * 2 ** min(n - 1, 10))
                delay *= 0.5 + rng.random()  # throttles do not use up the retries
                heapq.heappush(delayed, (t + delay, neg_stage, rec, attempt))
                push(t + delay, "wake", None)

    fill(0.0)
    while events:
        now, _, kind, data = heapq.heappop(events)
        if kind == "init done":
            job, version = data
            if version == job.version and job in running:  # now its handler: all its vCPUs
                job.advance(now, share)
                cpu_demand += q[job.row["stage"]] - job.demand
                job.demand = q[job.row["stage"]]
                reshare(now)
            continue
        if kind == "end":
            job, version = data
            if version != job.version:
                continue  # moved by a change of share: a later end event stands
            row = finish(job, now)
            env, rec, attempt = job.env, job.rec, job.attempt
            stage = row["stage"]
            inflight -= 1
            busy[stage] -= 1
            env.last_used = now
            if row["error"] is None:
                idle[stage].append(env)
            rows.append(row)
            if row["error"] is None:
                if stage < k_last:
                    heapq.heappush(ready, (-(stage + 1), rec, 0))
            elif attempt < retries:
                heapq.heappush(delayed, (now + 0.2 * 2 ** attempt, -stage, rec, attempt + 1))
                push(now + 0.2 * 2 ** attempt, "wake", None)
            else:
                stats["failed"] += 1
        fill(now)
    wall = max((r["started"] + (r["init_ms"] + r["duration_ms"]) / 1000 for r in rows),
               default=0.0)
    bills = bill(rows, arch)
    per_stage = []
    for k in range(len(stages)):
        b = bills.get(k)
        ks = [r for r in rows if r["stage"] == k]
        per_stage.append({
            "stage": k, "memory_mb": memory[k], "vcpus": round(v[k], 3),
            "invocations": len(ks), "cold_starts": sum(1 for r in ks if r["cold"]),
            "gb_s": b.gb_s if b else 0.0, "cost": b.total if b else 0.0,
            "mean_duration_s": (sum(r["duration_ms"] for r in ks) / len(ks) / 1000) if ks else 0,
            "peak_mb_predicted": round(stages[k].peak_mb(), 1),
        })
    done = sum(r["images"] for r in rows if r["stage"] == k_last and r["error"] is None)
    driver = driver_requests(
        records=n_rec, stages=len(stages),
        model_files=sum(2 if s.model_bytes > 1024 else 1 for s in stages),  # graph + weights
        call_ends_s=[r["started"] + (r["init_ms"] + r["duration_ms"]) / 1000 for r in rows],
        wall_s=wall, object_store=target.object_store, models_uploaded=models_uploaded,
        labels=labels)
    driver_cost = store_request_cost(driver)
    return SimResult(target=target.to_dict(), wall_s=wall, rows=rows if keep_rows else [],
                     images=done, throttles=stats["throttles"], timeouts=stats["timeouts"],
                     failed_records=stats["failed"], arch=arch, per_stage=per_stage,
                     cost=bills["total"].total + driver_cost, gb_s=bills["total"].gb_s,
                     invocations=len(rows), cold_starts=sum(1 for r in rows if r["cold"]),
                     driver_requests=driver, driver_store_ops=driver_cost,
                     figures=figure_sources(target, cal))


# -- output ----------------------------------------------------------------------------------


def title(plan: dict[str, Any], res: SimResult) -> str:
    t = res.target
    return (f"simulated on {t['name']} (CPU speed factor {t['cpu_factor']:g}): "
            f"{res.images:,} images, {len(plan['memory'])} stages, "
            f"C={plan['concurrency']}, {plan['images_per_record']} per record")


def plot_timeline(rows: list[dict[str, Any]], path: str | Path, title_text: str,
                  max_lanes: int = 60) -> Path:
    """Instances as lanes (like the report's timeline) when few; else invocations in flight
    per stage over time. The title always says simulated."""
    from matplotlib.figure import Figure

    from ..report.plots import save_figure, stage_color

    if not title_text.startswith(SIMULATED):
        title_text = f"{SIMULATED}: {title_text}"
    instances = {r["instance"] for r in rows}
    if len(instances) <= max_lanes:
        from ..report.plots import plot_timeline as lanes

        return lanes(rows, path, title_text)
    fig = Figure(figsize=(10, 4.2))
    ax = fig.subplots()
    for k in sorted({r["stage"] for r in rows}):
        deltas: list[tuple[float, int]] = []
        for r in rows:
            if r["stage"] == k:
                deltas.append((r["started"], 1))
                deltas.append((r["started"] + (r["init_ms"] + r["duration_ms"]) / 1000, -1))
        deltas.sort()
        xs, ys, level = [0.0], [0], 0
        for x, d in deltas:
            xs.append(x)
            ys.append(level)
            level += d
            xs.append(x)
            ys.append(level)
        ax.plot(xs, ys, color=stage_color(k), label=f"stage {k}", linewidth=1)
    ax.set_xlabel("time since the job started (s)")
    ax.set_ylabel("invocations in flight")
    ax.set_title(title_text, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
