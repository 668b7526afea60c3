"""A function instance of the local backend: `python -m serveless.backends.local.worker FD`.

It waits to be placed in its cgroup and for its spec (the store, the stage model, its
threads) over the socket FD, loads its stage (the cold start), then serves JSON events from
the driver over the same socket until told to stop or the driver goes away. A spec with
no stage model (`model_key` "") is a calibration function's: its cold start imports what
every stage's does (onnxruntime with the handler) and loads nothing, so the init the
backend measures is the platform's start alone. Nothing of the
store is on its command line; the store's credentials are in its environment.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing.connection as mpc
import signal
import sys


def _die_with_parent() -> None:
    """Die with the driver, even when it is SIGKILLed (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(fd: int) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides when we stop
    conn = mpc.Connection(fd)
    try:
        spec = json.loads(conn.recv_bytes())["go"]
    except (EOFError, OSError, ValueError, KeyError, TypeError):
        return  # the driver went away, or this is not a driver
    from ...runtime.cpu import usable_threads
    from ...runtime.handler import handle
    from ...runtime.loader import load_stage
    from ...runtime.protocol import error_of
    from ...store import Store

    try:
        if spec["model_key"]:
            load_stage(Store.from_spec(spec["store"]), spec["model_key"],
                       usable_threads(spec["threads"]))
        else:
            import onnxruntime  # noqa: F401  (a stage's load imports it: part of its start)
    except Exception as exc:  # the driver logs it; a traceback on its terminal would not
        conn.send_bytes(json.dumps({"error": error_of(exc).to_dict()}).encode())
        return
    conn.send_bytes(b'{"ready": true}')
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if msg == b"stop":
            return
        try:
            reply = {"ok": handle(json.loads(msg))}
        except Exception as exc:  # reported to the driver, which decides on retries
            reply = {"error": error_of(exc).to_dict()}
        conn.send_bytes(json.dumps(reply).encode())


if __name__ == "__main__":
    main(int(sys.argv[1]))
