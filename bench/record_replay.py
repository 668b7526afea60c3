"""Record the small local job and calibration that tests/test_planning_simulate.py replays.

    python bench/record_replay.py tests/data

Calibrates AlexNet on 100 sample photos, then runs them (4 records of 25, cuts at pool5,
1769 MB per stage, concurrency 1) on the local backend, right after, so both see the
same machine load. Writes replay-calibration.json and replay-invocations.jsonl (the job's
invocation log as measured) into the folder given.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main(dest: Path) -> None:
    from serveless.data.samples import make_sample_images

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="serveless-replay-") as tmp:
        root = Path(tmp)
        make_sample_images(root / "img", 100, classes=2, seed=3)
        sv = [sys.executable, "-m", "serveless"]
        store = str(root / "store")
        subprocess.run([*sv, "pack", str(root / "img"), str(root / "rec"), "--per-record", "25"],
                       check=True)
        subprocess.run([*sv, "calibrate", "alexnet", "--records", str(root / "rec"), "--out",
                        str(dest / "replay-calibration.json"), "--store", store], check=True)
        subprocess.run([*sv, "run", "--store", store, "--job", "replay", "--records",
                        str(root / "rec"), "--cuts", "pool5", "--memory", "1769",
                        "--concurrency", "1", "--micro-batch", "25"], check=True)
        shutil.copy(root / "store" / "replay" / "invocations.jsonl",
                    dest / "replay-invocations.jsonl")
    rows = [json.loads(x) for x in (dest / "replay-invocations.jsonl").read_text().splitlines()]
    print(f"wrote {len(rows)} invocations and the calibration to {dest}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data"))
