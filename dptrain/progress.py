"""Progress bars that suit where they are shown.

In a terminal: tqdm's usual bar. Anywhere else (a log file, a CI job, a Slurm output file) a
redrawn bar becomes hundreds of carriage-return updates in one line, so there the bar prints a
full line each time progress crosses another `LOG_STEP` of the total (or, with no total, at most
every `LOG_INTERVAL_S` seconds), and once at the end.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

LOG_STEP = 0.05
LOG_INTERVAL_S = 60.0


class LogLines(tqdm):
    """A tqdm whose every display is one complete line, printed only at milestones."""

    def __init__(self, *args, **kwargs):
        kwargs.update(mininterval=0, miniters=1, dynamic_ncols=False, ascii=True)
        self._printed_n = None
        self._next_fraction = LOG_STEP
        self._next_time = 0.0
        super().__init__(*args, **kwargs)

    @staticmethod
    def format_meter(n, total, elapsed, **kwargs):
        if total and not kwargs.get("bar_format"):  # no bar: a log line is read, not watched
            kwargs["bar_format"] = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
        return tqdm.format_meter(n, total, elapsed, **kwargs)

    def _due(self) -> bool:
        if self.total:
            return self.n / self.total >= self._next_fraction
        return time.monotonic() >= self._next_time

    def _print_line(self) -> None:
        self.fp.write(self.__str__().strip() + "\n")
        self.fp.flush()
        self._printed_n = self.n
        if self.total:
            while self._next_fraction <= self.n / self.total:
                self._next_fraction += LOG_STEP
        self._next_time = time.monotonic() + LOG_INTERVAL_S

    def display(self, msg=None, pos=None):
        if msg is None and self._printed_n != self.n and self._due():
            self._print_line()
        return False  # nothing to clear: tqdm must not write a carriage return

    def close(self):
        if not self.disable and self._printed_n != self.n and hasattr(self, "fp"):
            self._print_line()
        self.leave = False
        super().close()


def progress_bar(*args, **kwargs) -> tqdm:
    """`tqdm(...)` in a terminal, `LogLines(...)` elsewhere; same arguments."""
    stream = kwargs.get("file") or sys.stderr
    interactive = hasattr(stream, "isatty") and stream.isatty()
    return (tqdm if interactive else LogLines)(*args, **kwargs)
