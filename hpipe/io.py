"""Writing outputs whole or not at all.

Every file hpipe writes goes to a temporary file in the same folder and is
renamed over the target, so an interrupted run leaves the old file or none,
never a torn one.  ``-`` means standard output.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or target.suffix, dir=target.parent)
    os.close(fd)
    # mkstemp makes the file 0600; give it the mode a plain open() would (0666 less the umask)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    if str(path) == "-":
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
        return
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def read_json(path: str | Path):
    """A JSON file's contents; a missing, unreadable or malformed file is an InputError
    naming the file (and the line and column of a syntax error)."""
    import json

    from hpipe.errors import InputError

    file = str(path)
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError("no such file", file=file) from None
    except json.JSONDecodeError as e:
        raise InputError(f"JSON syntax error at line {e.lineno}, column {e.colno}: {e.msg}", file=file) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the file: {e}", file=file) from None
