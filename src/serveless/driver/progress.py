"""The run's progress bar: records done of all, images per second and the ETA."""

from __future__ import annotations

import time


class Progress:
    """Records done / total, images/s and ETA on a rich progress bar."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.enabled = enabled
        self.t0 = time.perf_counter()
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("records"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), transient=False,
        )
        self.task = self.progress.add_task("run", total=total, completed=done, rate="")
        self.progress.start()

    def advance(self, images: int) -> None:
        if not self.enabled:
            return
        rate = images / max(1e-9, time.perf_counter() - self.t0)
        self.progress.update(self.task, advance=1, rate=f"{rate:.1f} images/s")

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()


class FetchProgress:
    """Images fetched / listed while a manifest is packed, on a rich bar on stderr: the
    fetch is the slow part of setting such a job up, and without it the command looks hung."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("fetching"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True),
            transient=False,
        )
        self.task = self.progress.add_task("fetch", total=total)
        self.progress.start()

    def advance(self, images: int) -> None:
        if self.enabled:
            self.progress.update(self.task, advance=images)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
