"""Child processes that leave when the process that started them dies.

A parent killed with SIGKILL cannot stop its children (multiprocessing's daemon children
end only at the parent's normal exit), so each child watches its parent and exits when
it is gone.  This module is torch-free on purpose: a spawned child must start watching
*before* it imports the runtime -- importing torch takes seconds on a loaded machine, and
a parent killed in that window left its profiling workers running until their import
finished (``run_watched``).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (state first), or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_state(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process from /proc, or None when it is gone."""
    fields = proc_stat(pid)
    return None if fields is None or len(fields) < 20 else (fields[0], fields[19])


def watch_parent(pid: int, poll_s: float = 0.5) -> None:
    """Exit this process (``os._exit(1)``) once process ``pid`` is gone, a zombie, or its pid
    reused; never returns.  Not os.getppid(): a forkserver worker's parent is the forkserver,
    which lives on while any worker holds its "alive" pipe -- that is, as long as we do."""
    first = proc_state(pid)
    if first is None and not os.path.isdir("/proc"):  # no procfs: the parent will have to do
        first = ("R", "")
    while True:
        time.sleep(poll_s)
        now = proc_state(pid) if os.path.isdir("/proc") else ("R", "")
        if now is None or now[0] in ("Z", "X") or (first and now[1] != first[1]):
            os._exit(1)


def start_watching(pid: int) -> None:
    threading.Thread(target=watch_parent, args=(pid,), daemon=True, name="hpipe-watch-parent").start()


def run_watched(target: str, payload: bytes, *args) -> None:
    """Entry of a spawned child: ignore Ctrl-C (the parent's to handle), watch the parent,
    and only then import ``target`` ("module:function") and call it with the unpickled
    ``payload`` and ``args``.  The payload travels pickled so that unpickling it, which
    imports the target's module (and torch), happens after the watch has started."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = mp.parent_process()  # the pid it had when it spawned us, even if we were re-parented since
    start_watching(parent.pid if parent else os.getppid())
    module, name = target.split(":")
    getattr(importlib.import_module(module), name)(pickle.loads(payload), *args)
