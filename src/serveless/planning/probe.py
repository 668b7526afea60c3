"""The calibration's measuring process on this machine: a child placed under a function's
CPU quota that runs the function side's measurements (runtime/calibration.py) as a
function instance of that size would.

`python -m serveless.planning.probe T0`. The parent (calibrate.py) writes the config (the
block files, the sample images) as one JSON line on stdin, then the commands `phase1` (at
1 vCPU: load, time and memory of every block; stage 0's decode; the function's own code
around the model) and `phase2` (at 2 vCPUs: compute per block), and reads one JSON line
back for each. Its first line says how long it took to start (from T0, its spawn) and
import what a function imports (runtime/coldstart.py), and its memory then.

It runs apart from the parent because the parent cannot be placed under a CPU quota
without slowing everything else it does, and because a fresh process is what a function
is: imports, page faults and arenas are counted as they are in a cold instance. On a
backend (`calibrate --backend`) the same measurements run inside a function call instead
(runtime/calibration.py's `serve`): this module only carries them to a local child.
"""

from __future__ import annotations

import json
import sys
import time

from ..runtime.calibration import describe_function, phase1, phase2
from ..runtime.coldstart import started


def main() -> None:
    """`python -m serveless.planning.probe`: the child. Reads its config and commands on
    stdin."""
    t_start = float(sys.argv[1]) if len(sys.argv) > 1 else time.time()
    start = started(t_start)
    cfg = json.loads(sys.stdin.readline())
    print(json.dumps({"ready": True, **start, "function": describe_function()}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "phase1":
            print(json.dumps(phase1(cfg)), flush=True)
        elif cmd == "phase2":
            print(json.dumps(phase2(cfg)), flush=True)
        else:
            return


if __name__ == "__main__":
    main()
