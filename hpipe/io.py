"""Reading inputs strictly and writing outputs whole or not at all.

A key given twice in one mapping of a YAML or JSON input is refused (both formats would
keep the last in silence): ``load_yaml``, ``read_json``.

Every file hpipe writes goes to a temporary file in the same folder and is
renamed over the target, so an interrupted run leaves the old file or none,
never a torn one.  ``-`` means standard output.  A symlink is followed (the file it
points to is replaced, the link stays); a target that exists and is not a regular file
(``/dev/stdout``, a pipe such as bash's ``>(...)``) is written in place, since nothing can
be renamed over it.  A write that fails is an InputError naming the file.

A command with several outputs (a Result JSON, a trace, a chart) writes them inside
``written_together``: each goes to its temporary file as above, and the renames (and what
goes to standard output) wait until every one is written, so a full disk or a Ctrl-C while
the last is drawn leaves none of them replaced, not the first alone beside a stale rest.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml


_PENDING: list | None = None
"""Inside ``written_together``: the (commit, discard) steps of what was written so far."""


@contextlib.contextmanager
def written_together() -> Iterator[None]:
    """Every file ``atomic_path`` and ``write_text`` write inside the block replaces its target,
    and what they send to standard output is printed, only once the whole block has run; an
    exception (a full disk, a Ctrl-C) leaves every target as it was.  A block inside another
    joins it.  (The renames themselves run one after another: one that fails, rare once every
    file is written, leaves those before it done.)"""
    global _PENDING
    if _PENDING is not None:  # nested: the outer block renames these with its own
        yield
        return
    pending = _PENDING = []
    try:
        yield
    except BaseException:
        for _, discard in pending:
            discard()
        raise
    finally:
        _PENDING = None
    for i, (commit, _) in enumerate(pending):
        try:
            commit()
        except BaseException:
            for _, discard in pending[i + 1:]:
                discard()
            raise


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "", make_parents: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` if the block succeeds.

    ``make_parents=False`` for paths a user typed: a missing folder is their typo, not ours
    to create (``check_output`` says so before any work is done)."""
    target = Path(os.path.realpath(path))  # a symlink: replace the file it points to, keep the link
    if make_parents:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _cannot_write(path, e) from None
    elif not target.parent.is_dir():
        from hpipe.errors import InputError

        raise InputError(f"the folder {str(target.parent)!r} does not exist", file=str(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or target.suffix, dir=target.parent)
    except OSError as e:
        raise _cannot_write(path, e) from None
    os.close(fd)
    # mkstemp makes the file 0600; give it the mode a plain open() would (0666 less the umask)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)

    def discard() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)

    def commit() -> None:
        try:
            os.replace(tmp, target)
        except OSError as e:
            discard()
            raise _cannot_write(path, e) from None

    pending, kept = _PENDING, False
    try:
        yield Path(tmp)
        if pending is not None:  # written_together renames it with the others
            pending.append((commit, discard))
            kept = True
        else:
            commit()
    finally:
        if not kept:
            discard()


def write_text(path: str | Path, text: str, make_parents: bool = True) -> None:
    if not is_stdout(path):
        write_bytes(path, text.encode(), make_parents)
        return

    def commit() -> None:  # '-', or /dev/stdout and the like: through sys.stdout, in order with the rest
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()

    _now_or_with_the_others(commit)


def _now_or_with_the_others(commit) -> None:
    """A write that cannot be undone (standard output, a pipe): done now, or inside
    ``written_together`` once every output of the block is made."""
    if _PENDING is not None:
        _PENDING.append((commit, lambda: None))
    else:
        commit()


def write_bytes(path: str | Path, data: bytes, make_parents: bool = True) -> None:
    """``data`` to ``path`` as ``write_text`` writes (not to standard output: a chart goes to a file)."""
    if is_special(path):
        def commit() -> None:
            try:  # a pipe or a device: written in place
                with open(path, "wb") as f:
                    f.write(data)
            except OSError as e:
                raise _cannot_write(path, e) from None

        _now_or_with_the_others(commit)
        return
    with atomic_path(path, make_parents=make_parents) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise _cannot_write(path, e) from None


def is_special(path: str | Path) -> bool:
    """An existing target that is neither a regular file nor a folder (a device, a pipe):
    written in place."""
    p = Path(path)
    return p.exists() and not p.is_file() and not p.is_dir()


def is_stdout(path: str | Path | None) -> bool:
    """``-``, or a path naming the file this process's standard output is (``/dev/stdout``, or
    the file stdout is redirected to): one document goes there, through ``sys.stdout`` so that
    nothing else written there overwrites it, and the tables move to stderr.  None: no."""
    if path is None:
        return False
    if str(path) == "-":
        return True
    try:
        a, b = os.stat(path), os.fstat(1)
    except (OSError, ValueError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _cannot_write(path, e: OSError):
    from hpipe.errors import InputError

    return InputError(f"cannot write the file: {e.strerror or e}", file=str(path))


PLOT_FORMATS = ("png", "svg", "pdf")
"""Image formats --plot writes, named by the file's extension."""


def _same_file(p: str):
    """What identifies the file a path argument names: its device and inode where it exists
    (a symlink, ``..`` or a hard link name the same), else its real path; None for stdout."""
    if p is None or p == "" or is_stdout(p):
        return None
    real = os.path.realpath(Path(p).expanduser())
    try:
        st = os.stat(real)
    except OSError:
        return real
    return (st.st_dev, st.st_ino)


def check_outputs(outputs: dict[str, str | None], *, plots: tuple[str, ...] = (),
                  inputs: dict[str, str | Path | None] | None = None) -> None:
    """Refuse, before any work is done, output paths that cannot be written as asked.

    ``outputs`` maps an option (``--json``) to the path given (None: not asked for);
    options in ``plots`` take an image whose format the extension names; ``inputs`` maps
    what the command reads (``the scenario``, ``--plan``) to its path.  Problems: an output
    that is one of the inputs (written over, the input is lost), two outputs on one file,
    a folder given as the file, a folder that does not exist (never created for a typo), a
    file that cannot be written, two outputs on stdout, an image on stdout, an image
    format that is not one of PLOT_FORMATS."""
    from hpipe.errors import InputError

    on_stdout = [opt for opt, p in outputs.items() if is_stdout(p)]
    if len(on_stdout) > 1:
        raise InputError(f"{' and '.join(on_stdout)} both ask for stdout ('-'), which holds one document; "
                         f"give one of them a file path", field=on_stdout[1])
    # an input that does not exist is its own command's error ("no such file"), not this one's
    read = {_same_file(str(p)): name for name, p in (inputs or {}).items() if p is not None and Path(p).exists()}
    written: dict = {}
    for opt, p in outputs.items():
        real = _same_file(p)
        if real is None or is_special(Path(p).expanduser()):
            continue
        if real in read:
            raise InputError(f"{p!r} is {read[real]} this command reads; writing there would replace it. "
                             f"Give another path", field=opt)
        if real in written:
            raise InputError(f"{p!r} is also given to {written[real]}; one would write over the other. "
                             f"Give each output its own path", field=opt)
        written[real] = opt
    for opt, p in outputs.items():
        if p is None or p == "-" and opt not in plots:
            continue
        if p == "" or p == "-":
            raise InputError("needs a file path" + (" (an image is not written to stdout)" if p == "-" else ""),
                             field=opt)
        path = Path(p).expanduser()
        if path.is_dir():
            example = path / ("out.png" if opt in plots else "out.json")  # a name the check then takes
            raise InputError(f"{p!r} is a folder; give a file path inside it (e.g. {str(example)!r})", field=opt)
        if is_special(path):  # /dev/stdout, a pipe: written in place, so only the file itself matters
            if opt in plots and is_stdout(p):
                raise InputError("needs a file path (an image is not written to stdout)", field=opt)
            if not os.access(path, os.W_OK):
                raise InputError(f"cannot write {p!r}: permission denied", field=opt)
            continue
        path = Path(os.path.realpath(path))  # a symlink: the file it points to is what gets replaced
        parent = path.parent
        if not parent.exists():
            raise InputError(f"the folder {str(parent)!r} does not exist (hpipe does not create it)", field=opt)
        if not parent.is_dir():
            raise InputError(f"{str(parent)!r} is not a folder", field=opt)
        if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise InputError(f"cannot write {p!r}: permission denied", field=opt)
        if getattr(os, "geteuid", lambda: -1)() == 0 and not can_create_in(parent):  # root passes os.access
            raise InputError(f"cannot write {p!r}: its folder takes no new files", field=opt)
        if opt in plots:
            ext = path.suffix.lower().lstrip(".")
            if ext not in PLOT_FORMATS:
                raise InputError(f"{p!r}: the extension names the image format; one of "
                                 f"{', '.join('.' + f for f in PLOT_FORMATS)}", field=opt)


def can_create_in(folder: Path) -> bool:
    """Whether a file can be made in ``folder``, by making (and removing) an empty one: the
    test os.access cannot give root (/proc, a read-only mount)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hpipe-check-"):
            return True
    except OSError:
        return False


def json_type(value) -> str:
    """What a parsed JSON or YAML value is, in the file's words ("null", not "NoneType")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


def document_kind(data) -> str | None:
    """Which of hpipe's own documents ``data`` looks like (a Plan, a Result, a sweep), so that
    a file passed in the wrong place is named for what it is; None for anything else."""
    items = data if isinstance(data, list) and data else [data]
    if not all(isinstance(d, dict) for d in items):
        return None
    keys = set(items[0])
    if {"mode", "results"} <= keys:
        return "a Result JSON (the output of simulate or execute)"
    if {"sweep", "runs"} <= keys:
        return "a sweep's JSON (the output of hpipe sweep)"
    if {"stages", "slices"} <= keys:
        return "a Plan JSON" if len(items) == 1 else "a list of Plans"
    return None


class DuplicateKey(yaml.constructor.ConstructorError):
    """A key given twice in one mapping (a YAMLError, with the line of the second)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """Safe loading that refuses a key given twice in one mapping: YAML lets the last one win,
    so a second ``workload:`` block would silently replace the first.  Checked on the
    document as written, before construction: PyYAML expands merge keys (``<<: *base``) in
    place, after which a merged key and its override would look like two."""

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        self._check_unique(node, set())
        return self.construct_document(node)

    def _check_unique(self, node, done: set) -> None:
        if id(node) in done:  # an alias: its anchor was checked
            return
        done.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = (key_node.tag, key_node.value)
                    if key in first:
                        raise DuplicateKey(
                            None, None, f"{key_node.value!r} is given again (first at line "
                            f"{first[key].line + 1}); YAML would silently keep this one: give it once",
                            key_node.start_mark)
                    first[key] = key_node.start_mark
                self._check_unique(key_node, done)
                self._check_unique(value_node, done)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self._check_unique(item, done)


def load_yaml(text: str):
    """``text`` as safe YAML, a key given twice in one mapping refused (``DuplicateKey``)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader


class _DuplicateJsonKey(ValueError):
    pass


def _unique_pairs(pairs: list) -> dict:
    """json's object hook: a key given twice is refused (json.loads keeps the last in silence)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateJsonKey(f"{key!r} is given twice in one object; JSON would silently keep the second: "
                             f"give it once")
        out[key] = value
    return out


def read_json(path: str | Path):
    """A JSON file's contents; a missing, unreadable or malformed file is an InputError
    naming the file (and the line and column of a syntax error)."""
    import json

    from hpipe.errors import InputError

    file = str(path)
    try:
        return json.loads(Path(path).read_text(), object_pairs_hook=_unique_pairs)
    except FileNotFoundError:
        raise InputError("no such file", file=file) from None
    except json.JSONDecodeError as e:
        raise InputError(f"JSON syntax error at line {e.lineno}, column {e.colno}: {e.msg}", file=file) from None
    except _DuplicateJsonKey as e:
        raise InputError(str(e), file=file) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the file: {e}", file=file) from None
