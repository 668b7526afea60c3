"""What one invocation did, counted as it happens: read, compute and write time, bytes in
and out, and store requests by kind (the function's share of the bill)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..store import READ_BLOCK


@dataclass
class Counters:
    read_ms: float = 0.0
    compute_ms: float = 0.0
    write_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    gets: int = 0
    heads: int = 0
    puts: int = 0

    def got(self, size: int, requests: int | None = None) -> None:
        """Bytes read with `requests` GETs: counted where the store makes real requests
        (S3), else modelled as one ranged GET per 64 MiB as an object store would serve."""
        self.bytes_in += size
        self.gets += max(1, math.ceil(size / READ_BLOCK)) if requests is None else requests

    def put(self, size: int) -> None:
        self.bytes_out += size
        self.puts += 1
