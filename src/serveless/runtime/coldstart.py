"""A fresh process that imports what a function imports, and says how long that took:
`python -m serveless.runtime.coldstart T0` prints `{"start_ms", "rss_mb"}` as one JSON line,
T0 being the wall-clock time (time.time()) at which its parent spawned it.

A function's cold start begins with a process starting and importing onnxruntime and the
handler: part of every cold start, billed as init, and the memory every instance holds
before its model (`runtime_mb`). The calibration times it in a fresh process because only
a fresh process has not imported them yet: on this machine under the local backend's CPU
quota (planning/probe.py, planning/calibrate.py), and on a backend from inside the
function (runtime/calibration.py), at the function's own CPU share.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from .memory import rss_mb


def started(t_spawn: float) -> dict[str, Any]:
    """Import what a function imports; ms since `t_spawn` and the resident MB after."""
    import onnxruntime  # noqa: F401  (import time is part of a function's cold start)

    from . import handler  # noqa: F401

    return {"start_ms": (time.time() - t_spawn) * 1000, "rss_mb": rss_mb()}


def main() -> None:
    """The child: one JSON line, then exit."""
    t_spawn = float(sys.argv[1]) if len(sys.argv) > 1 else time.time()
    print(json.dumps(started(t_spawn)), flush=True)


if __name__ == "__main__":
    main()
