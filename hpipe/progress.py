"""Progress bars for long work, on stderr only.

Off when stderr is not a terminal or with --quiet, so `--json -` keeps stdout
pure JSON and logs stay clean.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress


class _Null:
    """A stand-in with Progress's few methods, for when bars are off."""

    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass


def enabled(quiet: bool = False) -> bool:
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def progress(quiet: bool = False) -> Iterator[Progress | _Null]:
    """``with progress(quiet) as p: t = p.add_task("profiling", total=n); p.advance(t)``"""
    if not enabled(quiet):
        yield _Null()
        return
    # imported only when a bar is drawn: `hpipe plan` off a terminal need not pay for it
    from rich.console import Console
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.text import Text

    class Count(ProgressColumn):
        """'3/7'; nothing for a task of unknown length (``total=None``: a pulsing bar)."""

        def render(self, task) -> Text:
            return Text("" if task.total is None else f"{task.completed:g}/{task.total:g}")

    # plain text: a description carries the user's values (a swept [int8] vanished as markup)
    bar = Progress(TextColumn("{task.description}", markup=False, style="bold"), BarColumn(), Count(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    with bar:
        yield bar
