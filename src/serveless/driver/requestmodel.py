"""The driver's own store requests for a job, modeled: what `driver.json` will count.

A job's measured cost adds the driver's requests (driver.json, written by log.py) to the
functions': on a 60-image job of 3 records they were 15 PUTs, 6 LISTs, 4 HEADs and 2 GETs,
$0.000107 of $0.000237. A simulation that left them out said 27% less than the job cost
with its GB-s 1% apart (issue 22). So the simulator asks this module for the same count,
request by request, as the code that makes them does them today:

- setup (prepare.py): job.json looked for (HEAD), the job folder and its records listed
  (2 LIST), one PUT per record uploaded, the stage models' manifest read (GET) and then
  either every stage file and the manifest uploaded (PUT each) or, when reused, every file
  checked (HEAD each; on a local folder also read whole for its SHA-256: HEAD and GET
  each), labels.json (PUT, when the images came in class folders), job.json (PUT),
  driver.json (HEAD, PUT);
- the run (scheduler.py): stale temporaries and the log listed (2 LIST, and a HEAD for an
  old one-file log), each stage's outputs listed for the resume check (LIST per stage),
  one log segment per flush that had rows (a flush every FLUSH_EVERY_S, or at MAX_ROWS),
  the segments joined into one (PUT) when there were two or more, the lease renewed every
  RENEW_S (PUT), driver.json read and written again (HEAD, GET, PUT);
- on an object store, `Store.check` in both: a probe written, read and deleted.

The lease's first write and its removal fall outside what driver.json counts (the CLI takes
the lease before setup and releases it after the last count), so they are not modeled here
either. Deletes are free on S3 and counted only to match driver.json.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from .lease import RENEW_S
from .log import FLUSH_EVERY_S, MAX_ROWS


def log_segments(call_ends_s: Iterable[float], flush_every_s: float = FLUSH_EVERY_S,
                 max_rows: int = MAX_ROWS) -> int:
    """Segments the log's writer uploads for calls ending at these times (s since the run
    began): one per flush period in which a call ended, more where one held more than
    `max_rows` rows (the writer is woken early), the last one written at close."""
    per_period = Counter(math.floor(t / flush_every_s) for t in call_ends_s)
    return sum(math.ceil(n / max_rows) for n in per_period.values())


def driver_requests(*, records: int, stages: int, model_files: int, call_ends_s: Iterable[float],
                    wall_s: float, object_store: bool, models_uploaded: bool = True,
                    labels: bool = False) -> dict[str, int]:
    """The requests, by kind (as driver.json keeps them), of a new job laid out and run to
    its end by one `serveless run`: `records` uploaded, `stages` stages whose stage models
    are `model_files` files (a stage with weights is two: graph and weights), calls ending
    at `call_ends_s`, the run lasting `wall_s`."""
    n = Counter()
    n.update(head=1, list=2, put=records, get=1)  # job.json?, folder and records listed
    if models_uploaded:
        n.update(put=model_files + 1)  # every file and the manifest
    else:
        n.update(head=model_files)  # sizes checked; on a local folder also their SHA-256
        if not object_store:
            n.update(head=model_files, get=model_files)
    n.update(put=(1 if labels else 0) + 1)  # labels.json, job.json
    n.update(head=1, put=1)  # driver.json: none yet, then written
    n.update(list=2 + stages, head=1)  # temporaries, the log, each stage's outputs
    segments = log_segments(call_ends_s)
    n.update(put=segments + (1 if segments >= 2 else 0),
             delete=segments if segments >= 2 else 0)
    n.update(put=int(wall_s // RENEW_S))  # the lease renewed
    n.update(head=1, get=1, put=1)  # driver.json read and written again
    if object_store:
        n.update(put=2, get=2, delete=2)  # Store.check, before setup and before the run
    return {k: int(v) for k, v in sorted(n.items()) if v}
