"""Where each assumed figure of the `lambda` target comes from: AWS's documentation, or a
guess, said plainly.

A plan for Lambda rests on figures this machine cannot measure. Some AWS documents (the
account's concurrency, the scaling rate, the timeout, /tmp, S3's request rates); the rest
nobody here has measured on Lambda, and each is named a guess, so that a user reads
which of a plan's seconds rest on what. `simulate` prints them with every result, and
its JSON carries them (`figures`): a figure changed for a run (`--platform-init-ms`, …)
says so instead of its default's source, one taken from a platform profile
(`--profile`, fitted from a job's log by planning/fit.py) names the profile, and the CPU
factor of a calibration timed in a function on the cloud platform itself (`calibrate
--backend lithops`) is said measured. The pages were read for this project in 2026.
"""

from __future__ import annotations

from typing import Any

LAMBDA_QUOTAS = "docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html"
LAMBDA_SCALING = "docs.aws.amazon.com/lambda/latest/dg/scaling-behavior.html"
LAMBDA_MEMORY = "docs.aws.amazon.com/lambda/latest/dg/configuration-memory.html"
S3_PERFORMANCE = "docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance.html"
S3_WHITEPAPER = ("docs.aws.amazon.com/whitepapers/latest/s3-optimizing-performance-best-"
                 "practices/timeouts-and-retries-for-latency-sensitive-applications.html")

AWS = "AWS documentation"
GUESS = "a guess"

LAMBDA_FIGURES: dict[str, tuple[str, str]] = {
    "concurrency_limit": (AWS, f"the default concurrent executions per account and Region "
                               f"({LAMBDA_QUOTAS})"),
    "ramp_per_10s": (AWS, f"1,000 new execution environments per function every 10 s, "
                          f"since 2023 ({LAMBDA_SCALING})"),
    "platform_init_ms": (GUESS, "the Python runtime's start with numpy and onnxruntime "
                                "imported, before the model is downloaded and loaded; not "
                                "measured on Lambda"),
    "bandwidth_mb_s": (GUESS, "one function's throughput to S3 in its Region; not "
                              "measured on Lambda"),
    "request_ms": (GUESS, f"one S3 request's latency; AWS puts the median of requests "
                          f"under 512 KB 'often in the tens of milliseconds' "
                          f"({S3_WHITEPAPER})"),
    "s3_get_per_s": (AWS, f"at least 5,500 GET/HEAD per second per partitioned prefix "
                          f"({S3_PERFORMANCE})"),
    "s3_put_per_s": (AWS, f"at least 3,500 PUT/COPY/POST/DELETE per second per partitioned "
                          f"prefix ({S3_PERFORMANCE})"),
    "invoke_ms": (GUESS, "the Invoke API's overhead per call; not measured on Lambda"),
    "keep_alive_s": (GUESS, "how long an idle execution environment is kept: AWS does not "
                            "document it"),
    "timeout_s": (AWS, f"the longest function timeout, 900 s ({LAMBDA_QUOTAS})"),
    "tmp_mb": (AWS, f"/tmp is 512 MB unless configured, up to 10,240 MB ({LAMBDA_QUOTAS})"),
    "cpu_factor": (GUESS, "Lambda's CPU as fast per vCPU as this machine's (1.0)"),
    "cpu_quota": (AWS, f"CPU in proportion to memory, one vCPU at 1,769 MB (1.0: the "
                       f"share cost.vcpus gives; {LAMBDA_MEMORY})"),
    "init_fixed_ms": (GUESS, "no part of the init apart from platform_init_ms (0)"),
}
"""Each assumed figure of the `lambda` target: (AWS documentation or a guess, what and
where)."""


def measured_platform(cal: dict[str, Any] | None) -> str | None:
    """The cloud platform a calibration was measured on, inside a function there
    (`calibrate --backend lithops` with a cloud engine: 'aws_lambda', …), or None: this
    machine, the local backend, or Lithops' localhost engine."""
    m = (cal or {}).get("measured_on")
    if not isinstance(m, dict) or m.get("where") != "backend" or m.get("backend") != "lithops":
        return None
    engine = m.get("lithops_backend")
    return str(engine) if engine and engine != "localhost" else None


def figure_sources(target: Any, cal: dict[str, Any] | None = None,
                   ) -> dict[str, dict[str, Any]]:
    """Each figure of a `lambda` target: its value, and where it comes from (`kind`: AWS
    documentation, a guess, measured, or set for this run). {} for the `local` target,
    whose figures are this machine's, from the calibration. A calibration measured in a
    function on the cloud platform (`measured_platform`) makes the CPU factor of 1.0 a
    measurement, not a guess: the blocks were timed on that platform's own CPU."""
    profile = getattr(target, "profile", None) or {}
    fitted = set(profile.get("figures", []))
    where = (f"fitted by `serveless fit` from job {profile.get('job')} "
             f"({profile.get('calls')} calls): {profile.get('path')}")
    if target.name != "lambda":  # the local target's figures are the calibration's
        return {name: {"value": getattr(target, name), "kind": "fitted", "source": where}
                for name in sorted(fitted)}
    default = type(target)()
    out = {}
    for name, (kind, what) in LAMBDA_FIGURES.items():
        value = getattr(target, name)
        platform = measured_platform(cal)
        if name in fitted:
            kind, what = "fitted", where
        elif name == "cpu_factor" and platform and value == 1.0:
            m = (cal or {})["measured_on"]
            kind, what = "measured", (f"the calibration was timed in a function on "
                                      f"{platform} at {m.get('memory_mb')} MB (CPU "
                                      f"{m.get('cpu_model') or '?'}): the platform's own speed")
        elif value != getattr(default, name):
            kind, what = "set for this run", "given on the command line or by the caller"
        out[name] = {"value": value, "kind": kind, "source": what}
    return out


def figures_line(figures: dict[str, dict[str, Any]]) -> str:
    """One line for a terminal: the guessed figures, those from AWS's documentation and
    those set for this run, by name and value."""
    groups: dict[str, list[str]] = {}
    for name, f in figures.items():
        groups.setdefault(f["kind"], []).append(f"{name} {f['value']:g}"
                                                if isinstance(f["value"], int | float)
                                                else f"{name} {f['value']}")
    parts = [f"{kind}: {', '.join(names)}" for kind, names in groups.items()]
    return "Lambda figures (" + "; ".join(parts) + "; sources in --json)"
