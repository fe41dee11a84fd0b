"""The Plan: which devices run which units, and how each sequence is sliced.

One Plan drives both the simulator and the runtime.  Semantics:

* ``stages`` run in order; each holds a half-open range of unit indices, and
  together they cover every unit once, in order.  A stage with several devices
  is tensor parallel across them (Megatron-style).
* The batch is split into ``micro_batches`` micro-batches (the first
  ``batch % micro_batches`` get one extra sequence); each micro-batch's
  sequence is cut into ``slices`` (token counts summing to ``seq_len``).
* Work items run in the order ``for micro_batch: for slice:`` on every stage;
  item i on stage j waits for item i from stage j-1 and item i-1 on stage j.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from hpipe.errors import InputError, boolean_for_number, format_loc, suggest
from hpipe.models import check_tensor_parallel


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    devices: list[str] = Field(min_length=1)
    units: tuple[int, int]
    """Half-open range [start, end) of unit indices."""

    @property
    def start(self) -> int:
        return self.units[0]

    @property
    def end(self) -> int:
        return self.units[1]

    @property
    def tp(self) -> int:
        return len(self.devices)


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    planner: str = "hand"
    """Who made it; left out (a plan written by hand, as DESIGN.md's TP-and-codecs example is): "hand"."""
    scenario: str = ""
    """The scenario it was planned for ("": not said, so not compared with the one it runs on)."""
    stages: list[Stage] = Field(min_length=1)
    slices: list[PositiveInt] = Field(min_length=1)
    micro_batches: PositiveInt = 1
    codecs: list[Literal["none", "int8", "fp8", "int4"]] | None = None
    """One activation codec per stage boundary (len(stages) - 1); absent: all 'none'."""
    decode_micro_batches: PositiveInt | None = None
    """Generation only: groups of sequences in flight during decode; absent: the planner's default."""
    predicted: dict[str, Any] = {}
    """What the planner expects, e.g. {"latency_s": 1.9}."""

    def without_figures(self) -> "Plan":
        """A plan its planner has just made, as given to a run or a simulation: without its
        predicted figures (latency, TTFT, ...: numbers for the scenario it planned, which the
        Result replaces with its own); what the planner noted otherwise (``single_device``,
        ``sliced_to_fit``) stays.  A plan read from a file: ``as_read``."""
        kept = {k: v for k, v in self.predicted.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
        return self if kept == self.predicted else self.model_copy(update={"predicted": kept})

    def as_read(self) -> "Plan":
        """A plan read from a file, as given to a run or a simulation: without anything its
        planner predicted or noted.  The figures were for the scenario it was planned on, and
        the notes (``single_device``, ``sliced_to_fit``) for the plan as planned: a plan edited
        to one slice on another device had carried "sliced_to_fit: true" and the old device
        into its Result."""
        return self if not self.predicted else self.model_copy(update={"predicted": {}})

    def micro_batch_sizes(self, batch_size: int) -> list[int]:
        q, r = divmod(batch_size, self.micro_batches)
        return [q + (1 if i < r else 0) for i in range(self.micro_batches)]

    def items(self, batch_size: int) -> list[tuple[int, int, int, int, int]]:
        """Work items in execution order: (micro_batch, slice, batch, tokens, context)."""
        out = []
        for mb, b in enumerate(self.micro_batch_sizes(batch_size)):
            ctx = 0
            for s, n in enumerate(self.slices):
                out.append((mb, s, b, n, ctx))
                ctx += n
        return out

    @property
    def devices(self) -> list[str]:
        return [d for st in self.stages for d in st.devices]

    def check(self, setup, file: str | None = None) -> "Plan":
        """Raise InputError (file, field, problem) if this plan does not fit the scenario."""

        def bad(field: str, problem: str):
            raise InputError(problem, file=file, field=field)

        n_units = setup.n_units
        expect = 0
        seen: dict[str, int] = {}
        for i, st in enumerate(self.stages):
            a, b = st.units
            if a != expect:
                what = ("the first stage starts at unit 0" if i == 0 else
                        "it overlaps the previous stage" if a < expect else "it leaves a gap after the previous stage")
                bad(f"stages[{i}].units", f"starts at unit {a} but must start at {expect}: {what}")
            if b <= a:
                bad(f"stages[{i}].units", f"[{a}, {b}) is empty or reversed")
            if b > n_units:
                bad(f"stages[{i}].units", f"ends at {b}, past the model's {n_units} units")
            expect = b
            for k, d in enumerate(st.devices):
                if d not in setup.cluster:
                    other = (f"; the plan was made for scenario {self.scenario!r}, this is {setup.name!r}"
                             if self.scenario and self.scenario != setup.name else "")
                    bad(f"stages[{i}].devices[{k}]",
                        f"device {d!r} is not in the scenario{suggest(d, setup.cluster.device_ids)}{other}")
                if d in seen:
                    bad(f"stages[{i}].devices[{k}]", f"device {d!r} is listed twice in this stage" if seen[d] == i
                        else f"device {d!r} is already used by stage {seen[d]}")
                seen[d] = i
            why = check_tensor_parallel(setup.model, st.tp)
            if why:  # the runtime refuses it; a prediction of it would be of a plan that never runs
                bad(f"stages[{i}].devices", f"tensor parallel over {st.tp} devices, but {why}")
        if expect != n_units:
            bad("stages", f"the stages cover units [0, {expect}) but the model has {n_units} units")
        if sum(self.slices) != setup.seq_len:
            bad("slices", f"sum to {sum(self.slices)}, not the sequence length {setup.seq_len}")
        if self.micro_batches > setup.batch_size:
            bad("micro_batches", f"{self.micro_batches} micro-batches for a batch of {setup.batch_size}")
        if self.codecs is not None and len(self.codecs) != len(self.stages) - 1:
            bad("codecs", f"{len(self.codecs)} codecs for {len(self.stages) - 1} stage boundaries "
                          f"(one per boundary)")
        if self.decode_micro_batches is not None and not setup.output_tokens:
            bad("decode_micro_batches", "is for generation, but the scenario generates nothing "
                                        "(workload.output_tokens is 0): remove it")
        if self.decode_micro_batches is not None and self.decode_micro_batches > setup.batch_size:
            bad("decode_micro_batches", f"{self.decode_micro_batches} decode micro-batches for a batch of "
                                        f"{setup.batch_size}")
        return self

    def check_codecs(self, setup, file: str | None = None) -> "Plan":
        """Refuse lossy codecs the scenario's ``compression`` does not allow: a codec not in
        ``allow``, more lossy boundaries than ``max_lossy_hops``, or any where the scenario has
        no ``compression`` (off, since it is lossy).  The planners keep to it by construction;
        a hand-written plan (``--plan``) is checked here."""
        lossy = [(i, c) for i, c in enumerate(self.codecs or ()) if c != "none"]
        if not lossy:
            return self
        comp = setup.compression
        i, c = lossy[0]
        if comp is None:
            codecs = ", ".join(dict.fromkeys(c for _, c in lossy))
            raise InputError(f"{c} on boundary {i} is lossy, and the scenario allows no compression (it has no "
                             f"compression: key); to allow the plan's: --set 'compression={{allow: [{codecs}], "
                             f"max_lossy_hops: {len(lossy)}}}'",
                             file=file, field=f"codecs[{i}]")
        for i, c in lossy:
            if c not in comp.allow:
                raise InputError(f"{c} is not in the scenario's compression.allow ({', '.join(comp.allow)})",
                                 file=file, field=f"codecs[{i}]")
        if len(lossy) > comp.max_lossy_hops:
            raise InputError(f"{len(lossy)} lossy boundaries, more than the scenario's compression.max_lossy_hops "
                             f"({comp.max_lossy_hops})", file=file, field="codecs")
        return self

    def decode_groups(self, batch_size: int) -> int:
        """Sequence groups in flight during decode: ``decode_micro_batches``, else the prefill's
        micro-batches (each stays a group), at most one per sequence.  The simulator and the
        runtime both take the count from here, so a plan decodes alike in both."""
        return min(self.decode_micro_batches or self.micro_batches, batch_size)

    def decode_group_sizes(self, batch_size: int) -> list[int]:
        """Contiguous groups of the batch, the first ``batch % groups`` one sequence larger."""
        q, r = divmod(batch_size, self.decode_groups(batch_size))
        return [q + (1 if i < r else 0) for i in range(self.decode_groups(batch_size))]

    def codec_of(self, boundary: int) -> str:
        """The codec on the boundary after stage ``boundary`` ('none' when the plan has none)."""
        return self.codecs[boundary] if self.codecs else "none"

    @property
    def lossy(self) -> bool:
        """Whether some boundary sends its activations through a lossy codec."""
        return any(c != "none" for c in self.codecs or ())


def _plan_error(e: ValidationError, file: str | None, prefix: str = "") -> InputError:
    errors = e.errors()
    # an unknown key first: a misspelled 'stages' is also a missing one, and the spelling is the news
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    field = prefix + format_loc(tuple(err["loc"]))
    if err["type"] == "extra_forbidden":
        msg = f"unknown key{suggest(str(err['loc'][-1]), Plan.model_fields)}"
    elif err["type"] == "missing":
        msg = "missing required key"
    else:
        msg = err["msg"].removeprefix("Value error, ")
    return InputError(msg, file=file, field=field or None)


def _no_boolean_for_a_number(item: dict, file: str, prefix: str) -> None:
    """pydantic reads true as 1: ``"micro_batches": true`` ran one micro-batch.  Refused as the
    scenario refuses it (``errors.boolean_for_number``), here and in each stage."""
    found = boolean_for_number(Plan, item)
    stages = item.get("stages")
    for i, st in enumerate(stages if isinstance(stages, list) else []):
        where = boolean_for_number(Stage, st) if found is None else None
        if where is not None:
            found = (f"stages[{i}].{where[0]}", where[1])
    if found is not None:
        raise InputError(f"expected a number, got {str(found[1]).lower()} (a boolean)", file=file,
                         field=prefix + found[0])


def load_plans(path: str | Path) -> list[Plan]:
    """One Plan or a JSON list of Plans."""
    from hpipe.io import document_kind, json_type, read_json

    file = str(path)
    try:
        data = read_json(path)
    except InputError as e:
        if e.problem.startswith("JSON syntax error") and Path(path).suffix.lower() in (".yaml", ".yml"):
            raise InputError(f"{e.problem}: a plan is JSON, as `hpipe plan SCENARIO -o plan.json` writes it "
                             f"(the scenario YAML is the command's first argument)", file=file) from None
        raise
    kind = document_kind(data)
    if kind and "Plan" not in kind:
        raise InputError(f"this is {kind}, not a Plan; each result's plan is its 'plan' field, or "
                         f"`hpipe plan SCENARIO -o plan.json` writes one", file=file)
    items = data if isinstance(data, list) else [data]
    if not items:
        raise InputError("an empty list: no plan to use", file=file)
    plans = []
    for i, item in enumerate(items):
        prefix = f"[{i}]." if isinstance(data, list) else ""
        if not isinstance(item, dict):
            raise InputError(f"a plan is a JSON object, got {json_type(item)}", file=file, field=prefix.rstrip(".") or None)
        _no_boolean_for_a_number(item, file, prefix)
        try:
            plans.append(Plan.model_validate(item))
        except ValidationError as e:
            raise _plan_error(e, file, prefix) from None
    return plans
