"""The one progress display of every command: a tqdm bar on a terminal, and a plain line
every :data:`LINE_EVERY_S` seconds anywhere else.

A bar redraws itself with carriage returns many times a second; written to a log file, a
pipe or a CI console that is thousands of overwritten lines in one.  Where stderr is not a
terminal the same counter is therefore printed as whole lines (ASCII, no carriage return),
often enough to show a job is alive and slow enough to keep the log readable.
"""
from __future__ import annotations

import functools
import sys
from typing import Iterable

#: Seconds between two progress lines when stderr is not a terminal.
LINE_EVERY_S = 10.0


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):     # no isatty, or a closed stream
        return False


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, initial: int = 0,
                 desc: str | None = None, unit: str = "it", enabled: bool = True, leave: bool = True):
    """A tqdm object on stderr (``update``, ``set_postfix``, ``close``, iteration, ``with``);
    ``enabled=False`` shows nothing (``--quiet``).  ``leave=False`` clears a terminal bar when
    done; as lines, the last one is always kept."""
    from tqdm import tqdm

    stream = sys.stderr
    kwargs = dict(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, file=stream)
    if _is_terminal(stream):
        return tqdm(iterable, dynamic_ncols=True, leave=leave, **kwargs)
    return _lines_class()(iterable, leave=False, ascii=True, ncols=80, mininterval=LINE_EVERY_S, **kwargs)


@functools.cache
def _lines_class():
    """Made on first use: tqdm is imported only by commands that show progress."""
    from tqdm import tqdm

    class Lines(tqdm):
        """tqdm's counter as whole lines: ``display`` prints a line.  Made with ``leave=False``,
        ``close`` asks for the bar to be cleared (``msg=''``): the final count is printed
        instead (unless the last line said it), and the False returned keeps ``close`` from
        adding a carriage return."""

        shown = None

        def display(self, msg=None, pos=None):
            if msg == "" and self.shown == self.n:
                return False
            self.fp.write(self.__str__() + "\n")
            self.fp.flush()
            self.shown = self.n
            return False

    return Lines
