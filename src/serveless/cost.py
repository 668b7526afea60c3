"""Pricing tables and billing arithmetic, in one place.

Sources: aws.amazon.com/lambda/pricing and aws.amazon.com/s3/pricing, us-east-1, as read
for this project in 2026 (Lambda bills the init phase of cold starts since 2025-08-01).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PRICES_AS_OF = "2026-11 (us-east-1)"
LAMBDA_GB_SECOND = {"x86_64": 0.0000166667, "arm64": 0.0000133334}
LAMBDA_REQUEST = 0.20 / 1_000_000
LAMBDA_EPHEMERAL_GB_SECOND = 0.0000000309  # /tmp above the free 512 MB, per GB-s
FREE_EPHEMERAL_MB = 512  # /tmp up to 512 MB is free (the Lambda pricing page above)
S3_PUT = 0.005 / 1000
S3_GET = 0.0004 / 1000

def store_request_cost(counts: dict[str, int]) -> float:
    """S3 request charges for counts by kind: GET and HEAD at the GET price, PUT and LIST
    at the PUT price, DELETE free."""
    reads = int(counts.get("get", 0)) + int(counts.get("head", 0))
    writes = int(counts.get("put", 0)) + int(counts.get("list", 0))
    return reads * S3_GET + writes * S3_PUT


# Lambda's memory sizes and CPU share, from AWS's documentation as read in 2026:
# 128-10,240 MB in 1 MB steps, and one vCPU at 1,769 MB ("Configure Lambda function
# memory", docs.aws.amazon.com/lambda/latest/dg/configuration-memory.html); at most six
# vCPUs (AWS News Blog, 2020-12, when 10,240 MB came: "up to 6 vCPUs").
MIN_MEMORY_MB = 128
MAX_MEMORY_MB = 10_240
MB_PER_VCPU = 1769
MAX_VCPUS = 6


def check_memory(mb: int) -> int:
    if not MIN_MEMORY_MB <= mb <= MAX_MEMORY_MB:
        raise ValueError(f"memory {mb} MB is outside Lambda's {MIN_MEMORY_MB}-{MAX_MEMORY_MB} MB")
    return mb


def vcpus(memory_mb: int) -> float:
    """Lambda's CPU share: proportional to memory, one vCPU at 1769 MB, at most six."""
    return min(memory_mb / MB_PER_VCPU, MAX_VCPUS)


def billed_ms(duration_ms: float, init_ms: float = 0.0) -> int:
    """Duration rounded up to 1 ms, plus the init phase of a cold start (also rounded up)."""
    return math.ceil(duration_ms) + (math.ceil(init_ms) if init_ms else 0)


def gb_seconds(memory_mb: int, billed: float) -> float:
    return memory_mb / 1024 * billed / 1000


@dataclass
class Bill:
    invocations: int = 0
    gb_s: float = 0.0
    gets: int = 0
    puts: int = 0
    heads: int = 0  # HEAD requests: priced as GETs
    ephemeral_gb_s: float = 0.0  # configured /tmp above the free 512 MB, over billed time
    arch: str = "x86_64"

    @property
    def compute(self) -> float:
        return self.gb_s * LAMBDA_GB_SECOND[self.arch]

    @property
    def requests(self) -> float:
        return self.invocations * LAMBDA_REQUEST

    @property
    def store_ops(self) -> float:
        return (self.gets + self.heads) * S3_GET + self.puts * S3_PUT

    @property
    def ephemeral(self) -> float:
        return self.ephemeral_gb_s * LAMBDA_EPHEMERAL_GB_SECOND

    @property
    def total(self) -> float:
        return self.compute + self.requests + self.store_ops + self.ephemeral

    def add(self, row: dict[str, Any]) -> None:
        self.invocations += 1
        self.gb_s += gb_seconds(row["memory_mb"], row["billed_ms"])
        self.gets += int(row.get("gets", 0))
        self.puts += int(row.get("puts", 0))
        self.heads += int(row.get("heads", 0) or 0)
        extra_mb = int(row.get("ephemeral_mb") or FREE_EPHEMERAL_MB) - FREE_EPHEMERAL_MB
        if extra_mb > 0:
            self.ephemeral_gb_s += gb_seconds(extra_mb, row["billed_ms"])


def bill(rows: Iterable[dict[str, Any]], arch: str = "x86_64") -> dict[int | str, Bill]:
    """Per-stage bills and a 'total' from invocation log rows."""
    if arch not in LAMBDA_GB_SECOND:
        raise ValueError(f"arch must be one of {', '.join(sorted(LAMBDA_GB_SECOND))}, got {arch!r}")
    out: dict[int | str, Bill] = {"total": Bill(arch=arch)}
    for row in rows:
        if row.get("throttled"):  # refused by the platform before running: not billed
            continue
        out.setdefault(int(row["stage"]), Bill(arch=arch)).add(row)
        out["total"].add(row)
    return out
