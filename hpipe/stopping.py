"""How hpipe stops when asked to: Ctrl-C (exit 130), SIGTERM (exit 143) and SIGHUP (exit
129: the terminal or ssh session closed; left ignored under ``nohup``).

SIGTERM and SIGHUP are turned into a KeyboardInterrupt (``Terminated``) in the main thread,
so the clean-up written for Ctrl-C runs for them too: the workers are stopped first, nothing
is left running (a SIGHUP had left emulated hosts' namespaces and cgroups behind).  Kept apart from ``hpipe.__main__``, which ``python -m hpipe`` loads a
second time as ``__main__``: the flag below must be one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

_terminated = 0
"""The signal that asked hpipe to stop (SIGTERM, SIGHUP), 0 if none: click turns any
KeyboardInterrupt into its own Abort, losing the subclass."""

STOPPING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""Handled as SIGTERM is (``on_sigterm``)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler) or SIGHUP (the terminal closed), raised where
    Ctrl-C would be."""


def on_sigterm(signum, frame) -> None:
    global _terminated
    _terminated = signum
    if signum == signal.SIGHUP:
        _off_the_terminal()
    raise Terminated()


def _off_the_terminal() -> None:
    """After a hang-up, the standard streams that were the terminal write to /dev/null.  The
    terminal is gone, and a write to it as the clean-up unwound failed with EIO in place of the
    hang-up: exit 1, in four runs of four beside a busy loop (the closed-terminal test).
    Streams redirected to files or pipes are left as they are."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in (0, 1, 2):
            try:
                if os.isatty(fd):
                    os.dup2(null, fd)
            except OSError:
                pass
    finally:
        os.close(null)


_interrupted = False
"""Set by Ctrl-C, and never cleared: a KeyboardInterrupt that lands where something swallows it
(a finalizer's "Exception ignored", a library's broad except) is raised again at the next
``check_interrupted`` (a CI run beside a busy loop once profiled on after a Ctrl-C at 1 s)."""


def on_sigint(signum, frame) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt()


def check_interrupted() -> None:
    """Raise the Ctrl-C (or SIGTERM) that came and was lost; called where long work polls."""
    if _terminated:
        raise Terminated()
    if _interrupted:
        raise KeyboardInterrupt()


def install_sigterm():
    """Handle SIGTERM and SIGHUP as above (SIGHUP not where it is ignored, as ``nohup`` does),
    and Ctrl-C with ``on_sigint`` (where Python's own handler is in place); the handlers it
    replaces, {signal: handler}, for ``restore`` (None off the main thread, where no handler
    can be set)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    before = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm)}
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        before[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_sigterm)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored
        before[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)
    return before


def restore(before) -> None:
    """An in-process caller (tests) gets its own handlers back, and a clean slate."""
    global _interrupted, _terminated
    for sig, handler in (before or {}).items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    _interrupted, _terminated = False, 0


@contextlib.contextmanager
def signals_held(sigs=(signal.SIGINT, *STOPPING_SIGNALS)):
    """Run a clean-up that must finish with Ctrl-C and SIGTERM held: one that arrives
    meanwhile is acted on, by the handler it was meant for, once the block ends.  A second
    Ctrl-C (``timeout -s INT`` sends two) once interrupted the removal of emulated hosts
    half-way and left namespaces and cgroups behind.  Off the main thread, where no handler
    can be set, the block runs as it is."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():  # None: set outside Python; the default, then
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if pending:
            signal.raise_signal(pending[0])


def exit_interrupted(e: BaseException | None = None) -> None:
    """Exit 130 after a Ctrl-C (143 after SIGTERM, 129 after SIGHUP), for certain.

    ``sys.exit(130)`` is not enough: when the KeyboardInterrupt escaped code run by
    ``exec`` of a string (dataclasses build their methods so, e.g. during an import),
    CPython 3.11 has already marked it "unhandled" and kills itself with SIGINT at exit,
    whatever we raise.  The workers are stopped by then; the forkserver and resource
    tracker leave when our end of their pipes closes.  ``os._exit`` skips multiprocessing's
    own clean-up at exit, so its temporary folder (the forkserver's socket) goes here."""
    for sig in (*STOPPING_SIGNALS, signal.SIGINT):  # a second signal must not interrupt the exit
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
    term = _terminated or (signal.SIGTERM if isinstance(e, Terminated) else 0)
    try:  # a closed pipe, or a terminal gone (EIO after a hang-up): the exit below must still happen
        sys.stderr.write("hpipe: hung up\n" if term == signal.SIGHUP else "hpipe: terminated\n" if term
                         else "hpipe: interrupted\n")
    except Exception:
        pass
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass
    mp = sys.modules.get("multiprocessing.process")
    tmp = mp.current_process()._config.get("tempdir") if mp is not None else None
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    os._exit(128 + term if term else 130)
