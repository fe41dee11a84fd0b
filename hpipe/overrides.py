"""`--set KEY=VALUE`: change a scenario's parsed YAML before it is validated.

A key is a dotted path with list indices, as error messages print fields:
``workload.seq_len``, ``cluster.network.bandwidth_gbps``,
``cluster.hosts[0].devices[0].count``.  A value is read as a YAML scalar (``8192``
is an int, ``1e9`` a float, ``true`` a bool, ``null`` None, ``[a, b]`` a list).
Overrides apply in order, before validation, so a bad value is reported at its
key like any other field.  A key that is not in the file is accepted only where the
schema has that field (``planner.micro_batches`` when the file gives no planner);
anything else is an ``InputError`` naming the key.

The schema is passed in (``schema=Scenario``) rather than imported, so this module
sits below ``hpipe.scenario``.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from typing import Any

import yaml

from hpipe.errors import InputError, format_loc, suggest
from hpipe.io import DuplicateKey, load_yaml

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]|(\.)")


def parse_key(key: str) -> list[str | int]:
    """``cluster.hosts[0].count`` -> ['cluster', 'hosts', 0, 'count']."""
    if not key or key.startswith((".", "[")) or key.endswith(".") or ".." in key:
        raise InputError(f"{key!r} is not a dotted path (e.g. workload.seq_len, cluster.hosts[0].name)",
                         field="--set")
    parts: list[str | int] = []
    pos = 0
    for m in _SEGMENT.finditer(key):
        if m.start() != pos:
            break
        pos = m.end()
        if m.group(1) is not None:
            parts.append(m.group(1).strip())
        elif m.group(2) is not None:
            parts.append(int(m.group(2)))
    if pos != len(key) or not parts or not isinstance(parts[0], str):
        raise InputError(f"{key!r} is not a dotted path (e.g. workload.seq_len, cluster.hosts[0].name)",
                         field="--set")
    return parts


def parse_value(text: str) -> Any:
    """A value as YAML reads it (``10`` int, ``0.1`` float, ``abc`` str, ``[1, 2]`` list)."""
    try:
        value = load_yaml(text) if text.strip() else ""
    except DuplicateKey as e:
        raise InputError(f"in {text!r}: {e.problem}", field="--set") from None
    except yaml.YAMLError as e:
        raise InputError(f"{text!r} is not a YAML value: {getattr(e, 'problem', e)}", field="--set") from None
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e9 (no dot) as a string; a sweep of 1e8,1e9 means numbers
    return value


def value_text(value: Any) -> str:
    """A parsed value written back as YAML text, flow style: what a user would type after
    ``KEY=`` (``null``, ``true``, ``{bandwidth_gbps: 1}``), not Python's repr."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def all_numbers(values) -> bool:
    """Whether every value is a number (an int or a float, not a YAML boolean)."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def split_assignment(text: str) -> tuple[str, str]:
    """'KEY=VALUE' -> (key, raw value)."""
    key, eq, raw = text.partition("=")
    if not eq or not key.strip():
        raise InputError(f"{text!r} is not KEY=VALUE (e.g. --set workload.seq_len=4096)", field="--set")
    return key.strip(), raw.strip()


def split_values(raw: str) -> list[str]:
    """'0.1,1,10' -> ['0.1', '1', '10']; commas inside [], {} or quotes do not split."""
    out, depth, quote, cur = [], 0, None, ""
    for ch in raw:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    return out


def format_key(parts: list[str | int]) -> str:
    return format_loc(tuple(parts))


def _model_of(annotation) -> tuple[type | None, bool]:
    """(the pydantic model inside an annotation, whether it is a list of them)."""
    from pydantic import BaseModel

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            m, is_list = _model_of(arg)
            if m is not None:
                return m, is_list
        return None, False
    if origin is list:
        args = typing.get_args(annotation)
        m, _ = _model_of(args[0]) if args else (None, False)
        return m, True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _takes_mapping(annotation) -> bool:
    """Whether a field of this type may be given as a mapping (a dict, or a model)."""
    from pydantic import BaseModel

    if annotation is dict or typing.get_origin(annotation) is dict:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_takes_mapping(a) for a in typing.get_args(annotation))
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _looks_like_index(part: str | int) -> bool:
    """A dotted segment that meant a list index (``hosts.0``; ASCII digits only: '²'.isdigit())."""
    return isinstance(part, str) and part.isascii() and part.isdecimal()


def set_path(data: dict, parts: list[str | int], value: Any, schema=None) -> None:
    """Set ``value`` at ``parts`` inside ``data`` (in place), checked against ``schema``."""
    node: Any = data
    model, in_list = schema, False  # the pydantic model the current node validates against
    annotation = None  # the current node's field type, where the schema knows it
    owner = None  # the model that declares that field
    key = format_key(parts)
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = format_key(parts[: i + 1])
        if isinstance(part, int):
            if not isinstance(node, list):
                raise InputError(f"{format_key(parts[:i]) or 'the scenario'} is not a list; "
                                 f"[{part}] cannot index it", field=key)
            if part >= len(node):
                raise InputError(f"index {part} is past the end: {format_key(parts[:i])} has "
                                 f"{len(node)} entr{'y' if len(node) == 1 else 'ies'}", field=key)
            in_list = False
            if last:
                node[part] = value
            else:
                node = node[part]
            continue
        if isinstance(node, list):  # cluster.hosts.0: list entries are indexed in brackets
            indexed = [int(x) if _looks_like_index(x) else x for x in parts]
            hint = (f"; did you mean {format_key(indexed)}?" if _looks_like_index(part)
                    else f" (e.g. {format_key([*parts[:i], 0])})")
            raise InputError(f"{format_key(parts[:i])} is a list, indexed in brackets{hint}", field=key)
        if not isinstance(node, dict):
            shown = repr(node) if len(repr(node)) <= 40 else type(node).__name__
            # costmodel: auto -> {kind: auto, fitted: {basis: ...}}: where the schema says what a name stands for
            form = getattr(owner, "mapping_form", None)
            mapping = (form(parts[i - 1], node, part) if form and isinstance(node, str) else None) or f"{{{part}: ...}}"
            whole = (f"; to give it as a mapping, set it whole: --set '{format_key(parts[:i])}={mapping}'"
                     if _takes_mapping(annotation) else "")
            raise InputError(f"{format_key(parts[:i]) or 'the scenario'} is {shown}, not a mapping, so it "
                             f"has no key {part!r}{whole}", field=key)
        fields = None
        if model is not None and not in_list:
            fields = {k: f for k, f in model.model_fields.items() if k != "source_path"}
        if part not in node and fields is not None and part not in fields:
            hint = suggest(part, fields) or f"; the keys here: {', '.join(fields)}"
            raise InputError(f"unknown key {part!r} at {here}{hint}", field=key)
        if fields is not None and part in fields:
            owner, annotation = model, fields[part].annotation
            model, in_list = _model_of(annotation)
        else:
            owner, annotation, model, in_list = None, None, None, False
        if last:
            node[part] = value
        else:
            if part not in node or node[part] is None:
                if isinstance(parts[i + 1], int) or (in_list and _looks_like_index(parts[i + 1])):
                    entry = "{...}" if model is not None else "..."  # a list of mappings, or of values
                    raise InputError(f"{here} is not in the file, so it has no entry [{parts[i + 1]}]; to add "
                                     f"entries, give the list whole: --set '{here}=[{entry}, ...]'", field=key)
                node[part] = {}
            node = node[part]


def _unshared(x: Any) -> Any:
    """A copy of parsed YAML in which no two places share one object: a YAML alias (``*core``
    for an entry anchored ``&core``) parses as the same dict at both places, and deepcopy keeps
    that sharing, so a --set of one host's device changed every host's that named the anchor."""
    if isinstance(x, dict):
        return {k: _unshared(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unshared(v) for v in x]
    return copy.deepcopy(x)


def apply_overrides(data: Any, assignments: list[str] | tuple[str, ...], schema=None) -> Any:
    """A copy of ``data`` with every ``KEY=VALUE`` of ``assignments`` applied in order."""
    if not assignments:
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return data  # the scenario's own check reports it
    out = _unshared(data)
    given: dict[str, str] = {}
    earlier: list[tuple[list, str]] = []
    for text in assignments:
        key, raw = split_assignment(text)
        parts = parse_key(key)
        canonical = format_key(parts)
        if canonical in given:  # which one was meant is a guess: say so rather than keep the last
            raise InputError(f"{canonical} is set twice ({given[canonical]!r}, then {raw!r}); give it once "
                             f"(a --set before the command counts too)", field="--set")
        # a mapping set whole replaces what an earlier --set put inside it: that one would be lost
        inside = next((t for p, t in earlier if len(p) > len(parts) and p[:len(parts)] == parts), None)
        if inside is not None:
            raise InputError(f"--set {canonical}={raw} replaces all of {canonical}, so the earlier --set {inside} "
                             f"would be lost; give that value inside it, or set it after "
                             f"(a --set before the command counts too)", field="--set")
        given[canonical] = raw
        earlier.append((parts, text))
        set_path(out, parts, parse_value(raw), schema)
    return out


def overridden_keys(assignments) -> list[str]:
    return [format_key(parse_key(split_assignment(a)[0])) for a in assignments or ()]


def blame_override(error: InputError, assignments, file: str | None) -> InputError | None:
    """``error`` (a scenario field's problem) with the ``--set`` options that gave that field,
    or another field a cross-field problem compares it with (``error.also``), named; None when
    no assignment touched them: a user who typed the value on the command line looks for it
    there, not in the file."""
    fields = [f for f in (error.field, *error.also) if f]  # a cross-field problem's others too

    def parent(key: str) -> str:
        return key.rsplit(".", 1)[0] if "." in key else ""

    # a key missing beside one a --set gave: that --set made the mapping (compression.max_lossy_hops
    # on a scenario without compression: lacks compression.allow)
    missing = "missing required key" in error.problem
    hit = [a for k, a in zip(overridden_keys(assignments), assignments or ())
           if any(f == k or f.startswith((k + ".", k + "[")) or k.startswith((f + ".", f + "["))
                  or (missing and parent(f) and parent(f) == parent(k)) for f in fields)]
    if not hit:
        return None
    several = [a for a in hit if len(split_values(split_assignment(a)[1])) > 1]  # K=V1,V2 is a sweep's
    given = " and ".join(f"--set {a}" for a in hit)
    if several and "valid list" in error.problem:  # the field takes a list: V1,V2 was meant as one
        k, raw = split_assignment(several[0])
        hint = f"; a list is written in brackets: --set '{k}=[{', '.join(split_values(raw))}]'"
    elif several:
        hint = "; one value here: `hpipe sweep SCENARIO --set K=V1,V2` simulates at each of several"
    else:
        hint = ""
    return InputError(f"{error.problem} (from {given}{hint})", file=file or error.file, field=error.field,
                      also=error.also)
