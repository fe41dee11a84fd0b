"""The errors hpipe reports to users, each with its exit code.

User mistakes (a malformed scenario, an inconsistent plan) end with exit code 2,
requests that cannot be met (a model that does not fit) with exit code 3.  The
CLI prints the message alone, never a traceback, so every message has to say
where the problem is (file and field) and what it is.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable


class HpipeError(Exception):
    """Base class: anything that ends a command with a clear message."""

    exit_code = 1


class InputError(HpipeError, ValueError):
    """Bad input: the file, the field path and what is wrong (exit code 2)."""

    exit_code = 2

    def __init__(self, problem: str, *, file: str | None = None, field: str | None = None,
                 also: tuple[str, ...] = ()):
        self.problem = problem
        self.file = file
        self.field = field
        self.also = tuple(also)
        """The other fields a cross-field problem involves (paths as ``field``'s): a ``--set`` of
        one of them is named too (``overrides.blame_override``)."""
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.field:
            where.append(f"field '{self.field}'")
        return (": ".join(where) + ": " if where else "") + self.problem

    def located(self, file: str | None = None, prefix: str | None = None) -> "InputError":
        """The same error with the file set and the field path prefixed."""
        def under(path):
            return f"{prefix}.{path}" if prefix and path else prefix or path

        return InputError(self.problem, file=file or self.file, field=under(self.field),
                          also=tuple(under(f) for f in self.also))


class PlannerInputError(InputError):
    """A valid scenario that one planner cannot take (say, a sequence too finely cut for the
    slicing DP's tables).  Exit code 2 where that planner was the one asked; beside others
    (``--planner all``, a sweep) it is that planner's ✗ row, so the rest still plan."""


class InfeasibleError(HpipeError):
    """A request that cannot be met as asked, e.g. a model that does not fit (exit code 3)."""

    exit_code = 3


class WorkerError(HpipeError):
    """A runtime worker failed, hung or was interrupted (exit code 1)."""

    exit_code = 1


def format_loc(loc: tuple) -> str:
    """A field path as messages print it: ('hosts', 0, 'name') -> 'hosts[0].name'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean X, Y?)' for the closest names, or '' when none is close: first the names
    that hold ``name`` whole, ignoring case (A100 -> A100-40GB, A100-80GB; 3090 -> RTX3090),
    which a spelling distance ranks below A10 and V100; then the closest spellings."""
    choices = list(choices)
    key = name.lower()
    holding = sorted((c for c in choices if len(key) >= 3 and key in c.lower() and c != name),
                     key=lambda c: (not c.lower().startswith(key), len(c), c))
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = [lowered[c] for c in difflib.get_close_matches(key, list(lowered), n=n, cutoff=0.5)]
    picked = list(dict.fromkeys([*holding, *close]))[:n]
    return f" (did you mean {', '.join(picked)}?)" if picked else ""


def boolean_for_number(model_cls, data) -> tuple[str, bool] | None:
    """(field path below the model, the value) of the first boolean in ``data`` (a mapping about
    to become a ``model_cls``) where the field takes only numbers: a number field, an item of
    a list of numbers, a value of a mapping to numbers; None when there is none.  pydantic
    reads true as 1 there, and YAML reads yes, no, on and off as booleans: ``batch_size: yes``
    ran a batch of 1, ``version: true`` the version-1 roofline."""
    if not isinstance(data, dict):
        return None
    for key, value in data.items():
        field = model_cls.model_fields.get(key) if isinstance(key, str) else None
        where = _boolean_in(value, field.annotation) if field is not None else None
        if where is not None:
            return key + where[0], where[1]
    return None


def _boolean_in(value, annotation) -> tuple[str, bool] | None:
    leaves = _leaves(annotation)
    if isinstance(value, bool):
        return ("", value) if leaves and all(_number_type(t) for t in leaves) else None
    for t in leaves:
        origin, args = typing.get_origin(t), typing.get_args(t)
        if isinstance(value, list) and origin in (list, tuple, set, frozenset) and args:
            for i, item in enumerate(value):
                where = _boolean_in(item, args[0] if origin is not tuple or args[-1] is ... else
                                    (args[i] if i < len(args) else None))
                if where is not None:
                    return f"[{i}]{where[0]}", where[1]
        if isinstance(value, dict) and origin is dict and len(args) == 2:
            for k, item in value.items():
                where = _boolean_in(item, args[1])
                if where is not None:
                    return f".{k}{where[0]}", where[1]
    return None


def _leaves(annotation) -> list:
    """The types a field's annotation allows, through Annotated (constraints) and unions; None dropped."""
    out, todo = [], [annotation]
    while todo:
        t = todo.pop()
        origin, args = typing.get_origin(t), typing.get_args(t)
        if origin is typing.Annotated:
            todo.append(args[0])
        elif origin in (typing.Union, types.UnionType):
            todo.extend(args)
        elif t is not type(None) and t is not None:
            out.append(t)
    return out


def _number_type(t) -> bool:
    """int, float, or a Literal of ints (``version: Literal[1, 2]``)."""
    if t in (int, float):
        return True
    return typing.get_origin(t) is typing.Literal and all(
        isinstance(a, int) and not isinstance(a, bool) for a in typing.get_args(t))
