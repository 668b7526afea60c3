"""Progress bars on long work: a run's records (with images per second and the ETA), and a
manifest's images fetched while the job is set up (without them the command looks hung)."""

from __future__ import annotations

import time


class _Bar:
    """`done` of `total` things on a rich progress bar, labelled; off when not `enabled`
    (a pipe, or asked not to). `rate`: show images per second since the bar started."""

    def __init__(self, label: str, total: int, done: int, enabled: bool, rate: bool,
                 stderr: bool):
        self.enabled = enabled
        self.rate = rate
        self.t0 = time.perf_counter()
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

        columns = [TextColumn(label), BarColumn(), MofNCompleteColumn()]
        if rate:
            columns.append(TextColumn("{task.fields[rate]}"))
        columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        self.progress = Progress(*columns, transient=False,
                                 console=Console(stderr=True) if stderr else None)
        self.task = self.progress.add_task(label, total=total, completed=done, rate="")
        self.progress.start()

    def _advance(self, steps: int, images: int) -> None:
        if not self.enabled:
            return
        fields = {}
        if self.rate:
            rate = images / max(1e-9, time.perf_counter() - self.t0)
            fields["rate"] = f"{rate:.1f} images/s"
        self.progress.update(self.task, advance=steps, **fields)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()


class Progress(_Bar):
    """Records done / total, images/s and ETA, while a job runs."""

    def __init__(self, total: int, done: int, enabled: bool):
        super().__init__("records", total, done, enabled, rate=True, stderr=False)

    def advance(self, images: int) -> None:
        """One more record done; `images`: the images this run has served so far."""
        self._advance(1, images)


class FetchProgress(_Bar):
    """Images fetched / listed while a manifest is packed, on stderr."""

    def __init__(self, total: int, enabled: bool):
        super().__init__("fetching", total, 0, enabled, rate=False, stderr=True)

    def advance(self, images: int) -> None:
        """`images` more fetched."""
        self._advance(images, 0)
