"""What the terminal shows while a run works: one line per stage (shards done of total, rows, elapsed,
an estimate of what is left), redrawn in place on a terminal by rich's live progress and printed as
plain lines otherwise (logs, CI). The estimate is its own, not rich's: shards found cached in the
store finish at once and would make rich's rate promise too much. The full logs stay in Prefect's
run logs and in the run's log file (flows/cli.py).

Stages report through the module functions (`begin`, `shards`, `shard_done`, `steps`, `note`, `end`); they
do nothing until a command `install`s a reporter, so library use and tests print nothing extra.
Limit: one process. Shards that other workers run are counted as their results are read back.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console
from rich.progress import Progress, ProgressColumn
from rich.text import Text

PLAIN_EVERY = 0.25  # without a terminal: a line at each quarter of a stage's shards


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class _Stage:
    name: str
    started: float = field(default_factory=time.time)
    total: int = 0  # shards (or steps) expected; 0 while unknown
    done: int = 0
    cached: int = 0  # shards found complete in the store: not counted in the estimate
    rows: int = 0
    unit: str = "shards"
    counting_since: float = 0.0  # when the shards (or steps) began: the estimate's clock
    printed_at: float = 0.0  # fraction of the stage last printed as a plain line

    def line(self, now: float) -> str:
        elapsed = now - self.started
        parts = [f"{self.name:<9}"]
        if self.total:
            parts.append(f"{self.done}/{self.total} {self.unit}")
        if self.rows:
            parts.append(f"{self.rows:,} rows")
        parts.append(f"{_clock(elapsed)} elapsed")
        computed = self.done - self.cached
        if self.total and 0 < computed and self.done < self.total:
            per_item = (now - self.counting_since) / computed
            parts.append(f"~{_clock(per_item * (self.total - self.done))} left")
        return "  ".join(parts)


class _StageColumn(ProgressColumn):
    """rich's column for the running stage: its own line (`_Stage.line`, the same as the plain
    lines), redrawn at each of rich's refreshes."""

    def render(self, task) -> Text:
        return Text(task.fields["stage"].line(time.time()))


class Reporter:
    """Shows the current stage's line on `stream`: on a terminal (`live`) a rich live display, one
    line per stage redrawn in place (rich refreshes it, prints notes above it and restores the
    cursor at the end); otherwise plain lines, one at each quarter of a stage and its last."""

    def __init__(self, stream: TextIO, live: bool | None = None, refresh_seconds: float = 1.0):
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self.stage: _Stage | None = None
        self._lock = threading.Lock()
        self._task = None
        self._rich: Progress | None = None
        if self.live:
            self._rich = Progress(_StageColumn(), console=Console(file=stream, force_terminal=True),
                                  refresh_per_second=1.0 / refresh_seconds)
            self._rich.start()

    def _draw(self, final: bool = False) -> None:
        if self._rich is not None:
            if final:  # the finished stage's line goes above the live display, which keeps the current one
                self._rich.remove_task(self._task)
                self._rich.console.print(self.stage.line(time.time()) + "  done", markup=False, highlight=False)
            self._rich.refresh()
            return
        self.stream.write(self.stage.line(time.time()) + ("  done" if final else "") + "\n")
        self.stream.flush()

    def begin(self, name: str) -> None:
        with self._lock:
            if self.stage is not None:  # a stage inside a stage (a sub-step): close the outer line first
                self._draw(final=True)
            self.stage = _Stage(name)
            if self._rich is not None:
                self._task = self._rich.add_task(name, stage=self.stage)

    def shards(self, total: int, unit: str = "shards") -> None:
        with self._lock:
            if self.stage is not None:
                self.stage.total, self.stage.done, self.stage.unit = total, 0, unit
                self.stage.counting_since = time.time()

    def shard_done(self, rows: int = 0, cached: bool = False) -> None:
        with self._lock:
            stage = self.stage
            if stage is None:
                return
            stage.done += 1
            stage.rows += rows
            stage.cached += cached
            if self.live:
                self._draw()
            elif stage.total and stage.done / stage.total >= stage.printed_at + PLAIN_EVERY \
                    and stage.done < stage.total:
                stage.printed_at = stage.done / stage.total
                self._draw()

    def steps(self, done: int, total: int) -> None:
        """Progress counted in steps (training): the latest count replaces the previous."""
        with self._lock:
            stage = self.stage
            if stage is None:
                return
            if stage.unit != "steps":
                stage.counting_since = time.time()
            stage.total, stage.done, stage.unit = total, done, "steps"
            if self.live:
                self._draw()
            elif done / max(total, 1) >= stage.printed_at + PLAIN_EVERY and done < total:
                stage.printed_at = done / total
                self._draw()

    def note(self, text: str) -> None:
        """A line of its own above the stage's (a stage's projection or warning)."""
        with self._lock:
            if self._rich is not None:
                self._rich.console.print(text, markup=False, highlight=False)
                return
            self.stream.write(text + "\n")
            self.stream.flush()

    def end(self) -> None:
        with self._lock:
            if self.stage is not None:
                self._draw(final=True)
                self.stage = None

    def close(self) -> None:
        self.end()
        if self._rich is not None:
            self._rich.stop()


_reporter: Reporter | None = None


def install(stream: TextIO, live: bool | None = None) -> Reporter:
    """Start showing progress on `stream` (a command's terminal); `uninstall` stops."""
    global _reporter
    _reporter = Reporter(stream, live)
    return _reporter


def uninstall() -> None:
    global _reporter
    if _reporter is not None:
        _reporter.close()
    _reporter = None


def begin(name: str) -> None:
    if _reporter is not None:
        _reporter.begin(name)


def shards(total: int) -> None:
    if _reporter is not None:
        _reporter.shards(total)


def shard_done(rows: int = 0, cached: bool = False) -> None:
    if _reporter is not None:
        _reporter.shard_done(rows, cached)


def steps(done: int, total: int) -> None:
    if _reporter is not None:
        _reporter.steps(done, total)


def note(text: str) -> None:
    if _reporter is not None:
        _reporter.note(text)


def end() -> None:
    if _reporter is not None:
        _reporter.end()
