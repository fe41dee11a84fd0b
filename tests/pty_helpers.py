"""Run hpipe as a user at a terminal does: in its own session on a pseudo-terminal, so a
Ctrl-C goes to the whole process group (os.killpg) and every process it starts can be
found afterwards by its session id in /proc."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import subprocess
import struct
import sys
import termios
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_stat(int(d))
            if st is not None and int(st[4]) == sid and st[0] not in ("Z", "X"):
                out.append(int(d))
    return out


def children_of(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_stat(int(d))
            if st is not None and int(st[1]) == pid and st[0] not in ("Z", "X"):
                out.append(int(d))
    return out


def default_sigint() -> None:
    """In the child before exec: Ctrl-C acts as on a terminal.  A test run started in the
    background by a non-interactive shell (``cmd &``) inherits SIGINT ignored, and so would
    every hpipe it starts: CPython leaves an inherited SIG_IGN alone (five Ctrl-C tests
    failed so when CI was launched with ``&``)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class TerminalRun:
    """``hpipe ARGS`` on a pty of 80 columns, in a session of its own."""

    def __init__(self, *args: str, columns: int = 80, env: dict | None = None):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": str(columns), "LINES": "40",
                    "TERM": "xterm", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "hpipe", *args], stdin=slave, stdout=slave,
                                     stderr=slave, env=full_env, cwd=ROOT, start_new_session=True,
                                     preexec_fn=default_sigint)
        os.close(slave)
        self._master = master
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.t_start = time.monotonic()

    def _read(self):
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: the other end closed
                break
            if not data:
                break
            self._chunks.append(data)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)  # what the terminal does on ^C

    def hang_up(self) -> None:
        """What a terminal closing does: its end goes (writes to it fail with EIO), and the
        session gets SIGHUP."""
        os.close(self._master)
        os.killpg(self.proc.pid, signal.SIGHUP)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    @property
    def output(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    @property
    def text(self) -> str:
        """The output as the terminal shows it: escape sequences and carriage returns removed."""
        plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.output)
        return "\n".join(line.split("\r")[-1] for line in plain.replace("\r\n", "\n").split("\n"))

    def leftovers(self, within_s: float) -> list[int]:
        """Processes of the session still alive after ``within_s`` seconds."""
        deadline = time.monotonic() + within_s
        while True:
            left = session_pids(self.proc.pid)
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)

    def close(self) -> None:
        for pid in session_pids(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(2)
        try:
            os.close(self._master)
        except OSError:
            pass
