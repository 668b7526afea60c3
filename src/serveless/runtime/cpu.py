"""A function's CPU quota as it sees it, and what follows from it.

A function can be given less CPU than its memory buys (the local backend's `cpu_scale`,
any platform that gives less), and work that is paced by the wall clock, not by the
work itself, then costs it more of what it has. Two things in a function are sized from
the quota here, read once per instance from its own cgroup (cgroups.cpu_quota; None
where none is visible, as on Lambda and Lithops, and then nothing changes):

- the model's and the decoder's threads (`usable_threads`): no more than the quota,
  rounded up;
- how often the memory sampler wakes (`per_quota`, runtime/memory.ChargeSampler): its
  interval grows as the quota shrinks below a core, so it costs the same share of the
  function's CPU at any quota.
"""

from __future__ import annotations

import functools
import math

from ..cgroups import cpu_quota


@functools.cache
def own_quota() -> float | None:
    """This instance's CPU quota in CPUs, or None. Cached: the local backend puts an
    instance in its cgroup before it sends it anything to do, and it never moves."""
    quota = cpu_quota()
    return quota if quota is not None and quota > 0 else None


def usable_threads(threads: int) -> int:
    """The model and decode threads a function runs: the `threads` the driver asked for
    (its memory's vCPUs, rounded up), but no more than its own CPU quota, rounded up, where
    it can read one. Two threads in less than one core only spin at each other's barriers
    while each throttle stops one of them mid-operator: AlexNet at a quota of 0.85 ran
    15.3-16.2 ms per image on one thread and 17.1-21.6 on two (3 runs each, 2026-12-04),
    and bench_fit's 3008 MB stages at cpu_scale 0.5 ran 7-11% slower than the model of
    one thread at that quota."""
    quota = own_quota()
    if quota is None:
        return threads
    return max(1, min(threads, math.ceil(quota - 1e-9)))


def per_quota(interval_s: float) -> float:
    """A wall-clock interval of work that should cost a fixed share of the function's CPU
    whatever its quota: `interval_s` at a core or more, longer in proportion below it.
    The memory sampler's wake costs about 0.2-0.3 ms of CPU here (thread wake, two reads),
    14-15 ms per second at its 20 ms: 1.5% of a core, but 10% of the 0.145 of a core a
    512 MB function has under cpu_scale 0.5, which made bench_fit's 512 MB stages run
    7-10% slower than simulated (2026-12-04). Activations live that much longer in wall
    time at a smaller quota, so the grid still sees them."""
    quota = own_quota()
    return interval_s if quota is None else interval_s / min(1.0, quota)
