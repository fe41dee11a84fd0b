"""The scenario language: YAML in, a validated ``Scenario`` and a resolved ``Setup`` out.

Every model here forbids unknown keys.  Errors become ``InputError`` naming the
file, the field path (``cluster.hosts[1].devices[0].type``) and the problem.
``Setup`` is what planners, the simulator and the runtime take: the scenario
with its model expanded into units, its cluster graph and its cost model.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                      PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator)

from hpipe.devices import DEVICES, GENERATIONS, DeviceSpec
from hpipe.errors import InputError, boolean_for_number, format_loc, suggest
from hpipe.io import DuplicateKey, load_yaml
from hpipe.models import DTYPE_BYTES, MODELS, ModelSpec, Unit, get_model, model_from_mapping, positions_used

PLANNER_NAMES = ("hpipe", "base", "gpipe", "gpipe-balanced", "terapipe", "megatron", "tp-terapipe", "single")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # .inf TFLOP/s simulated as 0 s

    @model_validator(mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, data):
        found = boolean_for_number(cls, data)
        if found is not None:
            raise _FieldError(found[0], f"expected a number, got {str(found[1]).lower()} (a boolean; "
                                        f"YAML reads yes/no/on/off as booleans too)")
        return data


class Sampling(_Strict):
    """How the last stage picks each generated token (generation only)."""

    temperature: NonNegativeFloat = 0.0
    """0 = greedy (argmax); otherwise logits are divided by it before sampling."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: NonNegativeInt = 0
    """Keep only the k most likely tokens; 0 = no limit."""
    seed: int = 0
    """Seed of the sampler: the same seed gives the same ids run after run."""


class Workload(_Strict):
    seq_len: PositiveInt
    """Prompt tokens per sequence."""
    batch_size: PositiveInt = 1
    """Sequences processed together."""
    output_tokens: NonNegativeInt = 0
    """New tokens generated per sequence after the prefill; 0 = prefill only."""
    sampling: Sampling = Sampling()
    """Generation only: greedy by default."""


CODECS = ("none", "int8", "fp8", "int4")
"""Activation codecs on a stage boundary (see hpipe.codecs); 'none' sends the dtype as is."""
LOSSY_CODECS = CODECS[1:]


class Compression(_Strict):
    """Lossy compression of the activations that cross stage boundaries (off when absent)."""

    allow: list[Literal["int8", "fp8", "int4"]] = Field(min_length=1)
    """Codecs the planner may put on a hop."""
    max_lossy_hops: NonNegativeInt = 1
    """At most this many stage boundaries may use a lossy codec (0: none, e.g. in a sweep)."""
    min_gain: float = Field(0.01, ge=0.0, lt=1.0)
    """A tolerance on the planner's objective (the latency; where the scenario generates,
    ``planner.objective``): of the codec choices within this share of the fastest, the least
    lossy is taken.  So activations stay raw unless a codec saves this share, and int4 is
    taken over int8 only where it saves this much more.  A smaller gain is not worth the
    accuracy (the fastest alone had put int4 on hexgen-70b to save 0.03% over int8; int4
    keeps 73% of greedy tokens, int8 98%).  0: the fastest, however small its gain."""

    @field_validator("allow")
    @classmethod
    def _each_once(cls, v: list[str]) -> list[str]:
        twice = next((c for i, c in enumerate(v) if c in v[:i]), None)
        if twice:
            raise ValueError(f"{twice} is listed twice; list each codec once")
        return v


class LinkSpec(_Strict):
    bandwidth_gbps: PositiveFloat
    """One-direction bandwidth, Gbit/s."""
    latency_us: NonNegativeFloat = 0.0
    """One-way latency of a message, microseconds."""


class Interconnect(_Strict):
    """A host's link between its devices.  A figure left out is the devices' own: the slowest
    of their catalog interconnects (a custom device's: 126 Gbit/s, 10 us), as for a host
    with no ``interconnect:`` at all.  (It had been 0 us for a left-out latency, so
    ``--set ...interconnect.bandwidth_gbps=X`` on such a host also took its latency away.)"""
    bandwidth_gbps: PositiveFloat | None = None
    """One-direction bandwidth, Gbit/s."""
    latency_us: NonNegativeFloat | None = None
    """One-way latency of a message, microseconds."""


class PairLink(LinkSpec):
    between: tuple[str, str]
    """Two host names."""


_RUNTIME_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


class Placement(_Strict):
    """Where a scenario device runs for `hpipe execute` on this machine."""

    device: str = "cpu"
    """cpu, cuda (cuda:i for the i-th of the entry's count) or cuda:N."""
    threads: PositiveInt = 1
    """torch intra-op threads of the worker (CPU)."""
    cores: list[NonNegativeInt] | None = Field(None, min_length=1)
    """CPU cores the worker is pinned to (sched_setaffinity); none: not pinned."""
    cpu_quota: PositiveFloat | None = None
    """Emulate a slower device, this many cores' worth: a one-thread worker below one core paces its
    compute and is weighted on its core by it (cgroup cpu.shares); other workers are held to it
    by a CFS quota (cgroup cpu.max).  See hpipe.runtime.emulation."""

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _RUNTIME_DEVICE.match(v):
            raise ValueError(f"must be 'cpu', 'cuda' or 'cuda:N', got {v!r}")
        return v

    @model_validator(mode="after")
    def _quota_within_threads(self):
        if self.cpu_quota is not None and self.cpu_quota > self.threads:
            raise _FieldError("cpu_quota", f"{self.cpu_quota:g} cores' worth is more than the worker's "
                                           f"{self.threads} thread{'s' if self.threads > 1 else ''} can use; "
                                           f"a quota emulates a slower device (at most threads)",
                              also=("threads",))
        return self


MAX_DEVICES_PER_ENTRY = 256
MAX_DEVICES = 1024
"""Devices in a whole cluster: far more than a pipeline of layer units can use."""


class DeviceEntry(_Strict):
    """A catalog device (`type`) or a custom one (`name` plus its figures)."""

    type: str | None = None
    name: str | None = None
    count: int = Field(1, ge=1, le=MAX_DEVICES_PER_ENTRY)
    """Devices of this kind on the host (a host holds a handful; the cluster graph joins
    every pair of a host's devices, so the count is bounded)."""
    peak_tflops: PositiveFloat | None = None
    """Custom device: peak TFLOP/s at the scenario's dtype."""
    memory_gb: PositiveFloat | None = None
    memory_bandwidth_gbps: PositiveFloat | None = None
    """GB/s of device memory (bytes, not bits)."""
    power_w: PositiveFloat | None = None
    idle_power_w: NonNegativeFloat | None = None
    """Default: 10% of power_w."""
    generation: str | None = None
    """Custom device: architecture generation whose roofline efficiencies price it (pascal, volta,
    turing, ampere, ada, hopper, cpu).  Default: cpu when its runtime placement is a CPU, else ampere."""
    runtime: Placement | None = None
    price_per_hour: NonNegativeFloat | None = None
    """USD per device-hour for the cost figures; default: the catalog's on-demand price, if any."""

    @model_validator(mode="after")
    def _type_or_custom(self):
        custom = ("peak_tflops", "memory_gb", "memory_bandwidth_gbps", "power_w", "idle_power_w", "generation")
        if self.type is not None:
            if self.name is not None:
                raise ValueError("give either 'type' (a catalog device) or 'name' (a custom device), not both")
            if self.type not in DEVICES:
                raise _FieldError("type", f"unknown device type {self.type!r}{suggest(self.type, DEVICES)}; "
                                 f"`hpipe devices` lists the catalog")
            given = [k for k in custom if getattr(self, k) is not None]
            if given:
                raise _FieldError(given[0], "is for custom devices; a catalog type takes its datasheet figures")
        else:
            if self.name is None:
                raise ValueError("a device needs 'type' (a catalog device) or 'name' (a custom device)")
            if self.generation is not None and self.generation not in GENERATIONS:
                raise _FieldError("generation", f"unknown generation {self.generation!r}"
                                                 f"{suggest(self.generation, GENERATIONS)}; one of "
                                                 f"{', '.join(GENERATIONS)}")
            if not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.name):
                raise ValueError(f"device name {self.name!r} may hold only letters, digits and _ . + -")
            missing = [k for k in ("peak_tflops", "memory_gb", "memory_bandwidth_gbps", "power_w")
                       if getattr(self, k) is None]
            if missing:
                raise _FieldError(missing[0], f"missing: custom device {self.name!r} needs "
                                              f"{', '.join(missing)}")
            if self.idle_power_w is not None and self.idle_power_w > self.power_w:
                raise _FieldError("idle_power_w", f"{self.idle_power_w:g} W idle is more than power_w "
                                                  f"({self.power_w:g} W, the device busy)",
                              also=("power_w",))
        return self

    def spec(self, interconnect: Interconnect | None) -> DeviceSpec:
        if self.type is not None:
            if self.price_per_hour is not None:
                return DEVICES[self.type].model_copy(update={"price_per_hour": self.price_per_hour,
                                                             "price_source": "the scenario"})
            return DEVICES[self.type]
        idle = self.idle_power_w if self.idle_power_w is not None else 0.1 * self.power_w
        generation = self.generation or (
            "cpu" if self.runtime is not None and self.runtime.device == "cpu" else "ampere")
        # a device placed on a CPU, or priced as one, is a CPU: no framework reserve (memory_reserve_gb)
        on_cpu = generation == "cpu" or (self.runtime is not None and self.runtime.device == "cpu")
        return DeviceSpec(name=self.name, generation=generation, kind="cpu" if on_cpu else "gpu",
                          fp16_tflops=self.peak_tflops, fp32_tflops=self.peak_tflops,
                          memory_gb=self.memory_gb, memory_bandwidth_gbps=self.memory_bandwidth_gbps,
                          power_w=self.power_w, idle_power_w=idle,
                          interconnect_gbps=(interconnect.bandwidth_gbps if interconnect and interconnect.bandwidth_gbps
                                             else 126.0),
                          source="custom device from the scenario", price_per_hour=self.price_per_hour,
                          price_source="the scenario" if self.price_per_hour is not None else "")

    @property
    def label(self) -> str:
        return self.type if self.type is not None else self.name


class Host(_Strict):
    name: str
    devices: list[DeviceEntry] = Field(min_length=1)
    interconnect: Interconnect | None = None
    """Link between devices of this host; default (and for a figure left out): the slowest of
    its devices' catalog interconnects."""
    address: str | None = None
    """Host address for multi-host `hpipe execute` (torchrun); default: this machine."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError(f"host name {v!r} may hold only letters, digits and _ . -")
        return v

    @model_validator(mode="after")
    def _one_label_one_device(self):
        # device ids count per label (a catalog type or a custom name) across a host's entries
        # (core-0, core-1 from two entries pinned apart); a label given other figures would make
        # g-1 another device under g's label in every table.  The figures compared are the
        # resolved ones: a default left out and the same value written agree.
        first: dict[str, tuple[int, dict]] = {}
        for j, e in enumerate(self.devices):
            spec = e.spec(self.interconnect).model_dump(exclude={"name", "source", "price_source"})
            i, seen = first.setdefault(e.label, (j, spec))
            differ = [k for k in seen if seen[k] != spec[k]]
            if differ:
                what = {"fp16_tflops": "peak_tflops", "fp32_tflops": "peak_tflops"}.get(differ[0], differ[0])
                raise _FieldError(f"devices[{j}]", f"is labelled {e.label!r} as devices[{i}] is, with another "
                                                   f"{what} ({seen[differ[0]]!r} there, {spec[differ[0]]!r} "
                                                   f"here): ids count per label across a host's entries, so one "
                                                   f"label is one kind of device; give this one its own name",
                                  also=(f"devices[{i}]",))
        return self


class ClusterSpec(_Strict):
    hosts: list[Host] = Field(min_length=1)
    network: LinkSpec | None = None
    """Link between any two hosts, unless `links` overrides the pair."""
    links: list[PairLink] = []

    def network_crossed(self) -> bool:
        """Whether some pair of hosts has no entry in ``links``, so that its transfers cross
        ``network`` (one host, or a link for every pair: nothing does)."""
        names = [h.name for h in self.hosts]
        linked = {frozenset(link.between) for link in self.links}
        return any(frozenset((a, b)) not in linked for i, a in enumerate(names) for b in names[i + 1:])

    @model_validator(mode="after")
    def _cross(self):
        total = sum(d.count for h in self.hosts for d in h.devices)
        if total > MAX_DEVICES:
            raise _FieldError("hosts", f"{total} devices in all; hpipe plans for at most {MAX_DEVICES}")
        names = [h.name for h in self.hosts]
        seen = set()
        for i, n in enumerate(names):
            if n in seen:
                raise _FieldError(f"hosts[{i}].name", f"duplicate host name {n!r}")
            seen.add(n)
        pairs = set()
        for i, link in enumerate(self.links):
            for h in link.between:
                if h not in seen:
                    raise _FieldError(f"links[{i}].between", f"unknown host {h!r}{suggest(h, names)}")
            a, b = link.between
            if a == b:
                raise _FieldError(f"links[{i}].between", f"a link joins two different hosts, got {a!r} twice")
            key = frozenset(link.between)
            if key in pairs:
                raise _FieldError(f"links[{i}].between", f"the link between {a!r} and {b!r} is given twice")
            pairs.add(key)
        if len(self.hosts) > 1 and self.network is None:
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    if frozenset((a, b)) not in pairs:
                        raise _FieldError("network", f"missing: hosts {a!r} and {b!r} have no link "
                                                     f"(give 'network' or a 'links' entry)")
        return self


class PlannerSpec(_Strict):
    kind: str = "hpipe"
    """hpipe | base | gpipe | gpipe-balanced | terapipe | megatron | tp-terapipe | single"""
    token_granularity: PositiveInt = 16
    """The planners cut slices in multiples of this (and seq_len must be one); a given plan
    (``--plan``) may cut anywhere, its slices summing to seq_len."""
    micro_batches: PositiveInt | None = None
    """Micro-batches for gpipe, gpipe-balanced and megatron; default: one sequence each."""
    memory_reserve_gb: NonNegativeFloat = 0.5
    """Memory kept free on each GPU for the framework (CUDA context, allocator); CPUs keep none."""
    objective: Literal["latency", "ttft", "tpot", "throughput"] = "latency"
    """What the planner minimises: end-to-end latency (default), time to first token, time per
    output token, or the inverse of throughput. Prefill only: every objective is the latency."""

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in PLANNER_NAMES:
            raise ValueError(f"unknown planner {v!r}{suggest(v, PLANNER_NAMES)}; "
                             f"one of {', '.join(PLANNER_NAMES)}")
        return v


class Scenario(_Strict):
    name: str
    """Names the scenario in tables, plans and results, and its profiles in the cache."""
    model: str | dict[str, Any]
    """A catalog name (`hpipe models`) or a mapping of ModelSpec fields."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    workload: Workload
    cluster: ClusterSpec
    costmodel: str | dict[str, Any] = "roofline"
    """A cost model name, or a mapping with `kind` and that model's settings."""
    planner: PlannerSpec = PlannerSpec()
    compression: Compression | None = None
    """Lossy activation codecs the planner may use on stage boundaries; off when absent."""
    weights: str | None = None
    """Runtime only: a Hugging Face folder (config.json + *.safetensors)."""

    # Where the YAML came from; relative paths inside it resolve against its folder.
    source_path: str | None = Field(default=None, exclude=True)
    # The --set assignments applied before validation, so that a problem found later (the cost
    # model's settings, when resolved) can name the assignment that caused it.
    _overrides: tuple[str, ...] = PrivateAttr(default=())

    @classmethod
    def mapping_form(cls, field: str, name: str, key: str) -> str | None:
        """For --set's hints: the mapping that ``field``, given by the name ``name``, stands for,
        with ``key`` where it belongs (``costmodel: auto`` and basis: ``{kind: auto, fitted:
        {basis: ...}}``); None where a name is no mapping's shorthand."""
        if field != "costmodel" or key == "kind":
            return None
        from hpipe.costmodels import auto_section

        if name == "auto" and key == "profile":  # auto reads this machine's cache; a named profile is fitted's
            return "{kind: fitted, profile: ...}"
        section = auto_section(key) if name == "auto" else None
        return f"{{kind: {name}, " + (f"{section}: {{{key}: ...}}}}" if section else f"{key}: ...}}")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # it heads every table and names the cache's profile files: `--set name=` had given
        # tables headed ": hpipe plan ..."
        if not v.strip() or any(not c.isprintable() for c in v):
            raise ValueError(f"a scenario's name is one line of text, not empty, got {v!r}")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v):
        if isinstance(v, str):
            get_model_or_raise(v)
        else:
            try:
                model_from_mapping(v)
            except InputError as e:
                raise _FieldError(e.field, e.problem) from None
        return v

    @model_validator(mode="after")
    def _cross(self):
        g = self.planner.token_granularity
        if self.workload.seq_len % g:
            n = self.workload.seq_len
            near = sorted({v for v in (n // g * g, (n // g + 1) * g) if v > 0})
            raise _FieldError("workload.seq_len", f"{n} is not a multiple of planner.token_granularity "
                                                  f"({g}); the nearest that are: {' or '.join(map(str, near))}",
                              also=("planner.token_granularity",))
        if self.planner.micro_batches and self.planner.micro_batches > self.workload.batch_size:
            raise _FieldError("planner.micro_batches", f"{self.planner.micro_batches} micro-batches "
                                                       f"for a batch of {self.workload.batch_size}",
                              also=("workload.batch_size",))
        if isinstance(self.costmodel, dict) and "kind" not in self.costmodel:
            raise _FieldError("costmodel.kind", "missing (e.g. roofline or fitted)")
        return self

    @model_validator(mode="after")
    def _gpt_positions(self, info: ValidationInfo):
        # A GPT model's learned positions bound the prompt plus the generated tokens; not those
        # of a prompt rounded up to the token granularity only to plan on (hpipe generate).
        spec = self.model_spec()
        if spec.family != "gpt" or (info.context or {}).get("planning_only"):
            return self
        w = self.workload
        if w.seq_len > spec.max_seq_len:
            raise _FieldError("workload.seq_len", f"{w.seq_len} exceeds {spec.name}'s learned positions "
                                                  f"({spec.max_seq_len})", also=("model.max_seq_len",))
        used = positions_used(w.seq_len, w.output_tokens)
        if w.output_tokens and used > spec.max_seq_len:
            raise _FieldError("workload.output_tokens", f"{w.seq_len} prompt + {w.output_tokens} output tokens "
                              f"use {used} positions (the last new token is not fed back), more than "
                              f"{spec.name}'s learned positions ({spec.max_seq_len})",
                              also=("workload.seq_len", "model.max_seq_len"))
        return self

    def model_spec(self) -> ModelSpec:
        if isinstance(self.model, str):
            return get_model(self.model)
        return model_from_mapping(self.model)

    def files_read(self) -> dict[str, Path]:
        """The files the scenario names that a command may read, by what they are (an output
        must not replace them): a fitted model's profile, a roofline's calibration profile,
        and the weights folder's files (its config, tokenizer and safetensors)."""
        out = {}
        if self.weights:
            folder = self.resolve_path(self.weights)
            if folder.is_dir():
                for f in sorted(folder.iterdir()):
                    if f.suffix == ".safetensors" or f.name in WEIGHTS_FOLDER_FILES:
                        out[f"the weights folder's {f.name}"] = f
        cm = self.costmodel
        if not isinstance(cm, dict):
            return out
        named = {"costmodel.profile": cm.get("profile"), "costmodel.calibration": cm.get("calibration")}
        if isinstance(cm.get("roofline"), dict):  # auto: the roofline it falls back to
            named["costmodel.roofline.calibration"] = cm["roofline"].get("calibration")
        return {**out, **{f"the scenario's {k} file": self.resolve_path(v) for k, v in named.items()
                          if isinstance(v, str)}}

    def resolve_path(self, p: str) -> Path:
        path = Path(p).expanduser()
        if not path.is_absolute() and self.source_path:
            path = Path(self.source_path).parent / path
        return path

    def resolve(self) -> "Setup":
        from hpipe.cluster import Cluster
        from hpipe.costmodels import make_costmodel

        model = self.model_spec()
        cluster = Cluster.from_spec(self.cluster, self.planner.memory_reserve_gb)
        setup = Setup(scenario=self, model=model, units=model.units(), dtype=self.dtype,
                      dtype_bytes=DTYPE_BYTES[self.dtype], seq_len=self.workload.seq_len,
                      batch_size=self.workload.batch_size, granularity=self.planner.token_granularity,
                      cluster=cluster, cost=None,
                      weights=str(self.resolve_path(self.weights)) if self.weights else None)
        with self._costmodel_errors():
            setup.cost = make_costmodel(self.costmodel, setup)
        return setup

    @property
    def overrides(self) -> tuple[str, ...]:
        """The --set assignments applied before validation (``load_scenario``)."""
        return self._overrides

    @property
    def costmodel_kind(self) -> str:
        """The cost model's kind, whether written as a name or as a mapping with ``kind``."""
        cm = self.costmodel
        return cm if isinstance(cm, str) else cm["kind"]

    def check_costmodel(self) -> None:
        """Check the cost model's settings without building it (no profile read): for commands
        that put another model in its place (profile, validate), so that a typo is still said."""
        from hpipe.costmodels import costmodel_config

        with self._costmodel_errors():
            costmodel_config(self.costmodel)

    @contextlib.contextmanager
    def _costmodel_errors(self):
        """A cost model's InputError located under ``costmodel`` in this file, and blamed on the
        --set that gave the value, if one did."""
        try:
            yield
        except InputError as e:
            from hpipe.overrides import blame_override

            e = e.located(self.source_path, "costmodel")
            raise (blame_override(e, self._overrides, self.source_path) or e) from None


class _FieldError(ValueError):
    """A problem located at a path below the model that raised it; ``also``: the other fields
    (paths from the same model) a cross-field problem compares it with."""

    def __init__(self, field: str | None, problem: str, also: tuple[str, ...] = ()):
        self.field, self.problem, self.also = field, problem, also
        super().__init__(problem)


def get_model_or_raise(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}{suggest(name, MODELS)}; `hpipe models` lists the catalog")
    return MODELS[name]


@dataclass
class Setup:
    """A resolved scenario: everything planners, the simulator and the runtime need."""

    scenario: Scenario
    model: ModelSpec
    units: list[Unit]
    dtype: str
    dtype_bytes: int
    seq_len: int
    batch_size: int
    granularity: int
    cluster: "Cluster"  # noqa: F821
    cost: Any
    weights: str | None

    @property
    def name(self) -> str:
        return self.scenario.name

    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def output_tokens(self) -> int:
        """New tokens per sequence (0: prefill only)."""
        return self.scenario.workload.output_tokens

    @property
    def sampling(self) -> Sampling:
        return self.scenario.workload.sampling

    @property
    def objective(self) -> str:
        return self.scenario.planner.objective

    @property
    def compression(self) -> Compression | None:
        return self.scenario.compression


def _pydantic_error(err: ValidationError, file: str | None) -> InputError:
    problems = []
    for e in err.errors():
        # union members (str | dict) repeat the same error once per member; keep the path only
        loc = tuple(p for p in e["loc"] if p not in ("str", "dict[str,any]", "function-after[_type_or_custom(), DeviceEntry]"))
        ctx_err = (e.get("ctx") or {}).get("error")
        also = ()
        if isinstance(ctx_err, _FieldError):
            field = ".".join(x for x in (format_loc(loc), ctx_err.field) if x)
            msg = ctx_err.problem
            also = tuple(".".join(x for x in (format_loc(loc), f) if x) for f in ctx_err.also)
        else:
            field = format_loc(loc)
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = f"unknown key{_suggest_key(err, loc)}"
            elif e["type"] == "missing":
                msg = "missing required key"
            elif "input" in e and e["type"].endswith("_type"):
                msg += f", got {e['input']!r}"
                if e["type"] == "string_type" and isinstance(e["input"], bool):  # a host named on, a name: yes
                    msg += " (YAML reads yes, no, on, off, true and false as booleans; quote it: 'yes')"
        problems.append((field, msg, also))
    field, msg, also = problems[0]
    # The same location may fail once per union member; mention the others only if distinct.
    others = [f"{f}: {m}" for f, m, _ in problems[1:] if f != field]
    if others:
        msg += "; also " + "; ".join(others[:3]) + (f" (and {len(others) - 3} more)" if len(others) > 3 else "")
    return InputError(msg, file=file, field=field or None, also=also)


_KEYS_BY_PATH_TAIL = {
    "": Scenario, "workload": Workload, "cluster": ClusterSpec, "hosts": Host, "devices": DeviceEntry,
    "interconnect": Interconnect, "network": LinkSpec, "links": PairLink, "planner": PlannerSpec,
    "runtime": Placement, "sampling": Sampling, "compression": Compression,
}


def _suggest_key(err: ValidationError, loc: tuple) -> str:
    parents = [p for p in loc[:-1] if isinstance(p, str)]
    model = _KEYS_BY_PATH_TAIL.get(parents[-1] if parents else "")
    if model is None:
        return ""
    return suggest(str(loc[-1]), [k for k in model.model_fields if k != "source_path"])


def parse_scenario(data: Any, file: str | None = None, *, planning_only: bool = False) -> Scenario:
    """Validate already-parsed YAML/JSON data as a scenario.  ``planning_only``: a workload
    that is planned on but never run (a prompt rounded up to the token granularity), whose
    positions a GPT model's table need not hold."""
    if data is None:
        raise InputError("the file is empty; a scenario is a mapping of keys (name, model, workload, "
                         "cluster, ...): see the README's scenario format or scenarios/", file=file)
    if not isinstance(data, dict):
        from hpipe.io import json_type

        raise InputError(f"a scenario is a mapping of keys (name, model, workload, cluster, ...), "
                         f"got {json_type(data)}", file=file)
    try:
        return Scenario.model_validate({**data, "source_path": file}, context={"planning_only": planning_only})
    except ValidationError as e:
        raise _pydantic_error(e, file) from None
    except InputError as e:
        raise e.located(file) from None


WEIGHTS_FOLDER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json")
"""What hpipe.runtime reads from a weights folder besides its *.safetensors files."""


def read_scenario_text(path: str | Path) -> str:
    """A scenario file's text, or an InputError naming the file."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        near = _scenario_file_near(Path(path))
        raise InputError("no such file" + (f" (did you mean {near}?)" if near else ""), file=str(path)) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the file: {e}", file=str(path)) from None


def _scenario_file_near(path: Path) -> str | None:
    """A scenario file the user may have meant by a missing ``path``: the name with .yaml, or
    in ./scenarios/ (`hpipe simulate paper-llama7b` for scenarios/paper-llama7b.yaml)."""
    # a name's own dots are not a suffix (paper-gpt3-2.7b); .yml for .yaml and back
    stem = path.stem if path.suffix.lower() in (".yaml", ".yml") else path.name
    names = [path.name] + [n for n in (f"{stem}.yaml", f"{stem}.yml") if n != path.name]
    bare = path.parent == Path(".")  # a name alone; a path with folders is looked up only there
    for cand in [path.with_name(n) for n in names[1:]] + ([Path("scenarios") / n for n in names] if bare else []):
        if cand != path and cand.is_file():
            return str(cand)
    return None


PATH_FIELDS = frozenset({"weights", "profile", "calibration"})
"""The scenario's fields that name a file or folder (``weights``, ``costmodel.profile``,
``costmodel.calibration``, ``costmodel.roofline.calibration``)."""


def _paths_from_here(data: dict, parts: list) -> None:
    """A relative path given with --set is the user's, typed from the current folder, not from
    the scenario file's (where the file's own paths resolve): made absolute here."""
    *above, last = parts
    for p in above:
        data = data[p]

    def absolute(container, k) -> None:
        v = container[k]
        if k in PATH_FIELDS and isinstance(v, str) and v and not Path(v).expanduser().is_absolute():
            container[k] = str(Path.cwd() / v)
        for kk in (v if isinstance(v, dict) else ()):
            absolute(v, kk)

    absolute(data, last)


def _same_refusal(data, file, error: InputError) -> bool:
    """Whether the scenario as the file gives it is refused at the same field."""
    try:
        parse_scenario(data, file)
    except InputError as e:
        return e.field == error.field
    return False


def load_scenario(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                  text: str | None = None) -> Scenario:
    """Read and validate a scenario YAML file (safe loading only); ``overrides`` are
    ``KEY=VALUE`` assignments (``hpipe.overrides``) applied before validation.  ``text``:
    the file's text, already read (a pipe such as /dev/stdin can be read only once)."""
    file = str(path)
    if text is None:
        text = read_scenario_text(path)
    try:
        data = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        kind = "" if isinstance(e, DuplicateKey) else "YAML syntax error at "
        raise InputError(f"{kind}{where}{problem}", file=file) from None
    from hpipe.io import document_kind

    kind = document_kind(data)  # JSON is YAML too: hpipe's own outputs parse, then miss every field
    if kind:
        raise InputError(f"this is {kind}, not a scenario: a scenario is a YAML file such as "
                         f"scenarios/paper-llama7b.yaml" + ("; a plan is given with --plan" if "Plan" in kind else ""),
                         file=file)
    if not overrides:
        return parse_scenario(data, file)
    from hpipe.overrides import apply_overrides, blame_override, overridden_keys, parse_key

    given = data
    try:
        data = apply_overrides(data, overrides, schema=Scenario)
    except InputError as e:
        raise InputError(e.problem, file=file, field=e.field if (e.field or "").startswith("--set") else f"--set {e.field}") from None
    for key in overridden_keys(overrides):
        _paths_from_here(data, parse_key(key))
    try:
        sc = parse_scenario(data, file)
    except InputError as e:
        if "missing required key" in e.problem and _same_refusal(given, file, e):
            raise e from None  # the file lacks it already: a --set beside it is not to blame
        raise (blame_override(e, overrides, file) or e) from None
    sc._overrides = tuple(overrides)
    return sc
