"""Cost models: how long a unit takes on a device, a transfer on a link, and what power is drawn.

Planners and the simulator call only the ``CostModel`` interface, so a
scenario's ``costmodel:`` picks the implementation by name from ``REGISTRY``:
``roofline`` (analytic, from datasheets), ``fitted`` (least squares on a
profile measured by ``hpipe profile``) or ``auto`` (fitted on this machine's
cached profile where one exists, else roofline: ``hpipe.costmodels.auto``).  Every time function broadcasts over
numpy arrays of (slice tokens n, context tokens c, batch b).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from hpipe.errors import InputError, boolean_for_number, suggest

TOKEN_ID_BYTES = 8
"""Bytes of one sampled token id on the wire (int64, as torch carries ids)."""


class CostModelConfig(BaseModel):
    """Settings of a cost model, given in the scenario's ``costmodel:`` mapping."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # as the scenario's own fields
    kind: str


class CostModel(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[CostModelConfig]] = CostModelConfig

    def __init__(self, config: CostModelConfig, setup):
        self.config = config
        self.setup = setup
        self.cluster = setup.cluster
        self.dtype = setup.dtype
        self.dtype_bytes = setup.dtype_bytes

    # ---- what implementations provide --------------------------------------
    @abstractmethod
    def unit_time_s(self, unit, device_id: str, n, c, b, tp: int = 1):
        """Seconds to run ``unit`` for a slice of n tokens after c context tokens at batch b
        on ``device_id``, holding 1/tp of the unit (tensor parallel; communication excluded)."""

    def transfer_time_s(self, src: str, dst: str, nbytes):
        """Seconds to move nbytes from src to dst (latency included)."""
        nbytes = np.asarray(nbytes, float)
        if src == dst:
            return np.zeros_like(nbytes)
        r = self.cluster.route(src, dst)
        return np.where(nbytes > 0, r.latency_s + nbytes * 8 / (r.bandwidth_gbps * 1e9), 0.0)

    def token_return_s(self, src: str, dst: str, b):
        """Generation: seconds to carry b sampled token ids from the last stage's device ``src``
        back to the first stage's ``dst`` (the decode loop's feedback edge; latency included)."""
        return self.transfer_time_s(src, dst, np.asarray(b, float) * TOKEN_ID_BYTES)

    def allreduce_time_s(self, device_ids, nbytes):
        """Ring all-reduce of nbytes over device_ids: 2(p-1) steps of nbytes/p over the slowest hop."""
        p = len(device_ids)
        nbytes = np.asarray(nbytes, float)
        if p <= 1:
            return np.zeros_like(nbytes)
        hops = [(device_ids[i], device_ids[(i + 1) % p]) for i in range(p)]
        step = max((self.transfer_time_s(a, b, nbytes / p) for a, b in hops), key=lambda t: float(np.max(t, initial=0.0)))
        return 2 * (p - 1) * step

    def allreduce_busy_time_s(self, device_ids, nbytes):
        """``allreduce_time_s`` while devices co-located with the group (``colocated``), outside
        it, compute: their work delays each member's wake-up.  None where the model knows no
        such difference (the simulator then prices every all-reduce at ``allreduce_time_s``)."""
        return None

    def codec_time_s(self, codec, device_id: str, k):
        """(encode_s, decode_s) of an activation of k values under ``codec`` (an
        ``hpipe.codecs.Codec``) on ``device_id``: the bytes its ops move at the device's memory
        bandwidth, plus a fixed cost per op (``roofline_codec_time_s``)."""
        from hpipe.codecs import CPU_OP_OVERHEAD_S, GPU_OP_OVERHEAD_S, roofline_codec_time_s

        dev = self.cluster.device(device_id)
        if getattr(dev.placement, "device", None) == "cpu":  # a CPU worker: torch's eager dispatch
            per_op = CPU_OP_OVERHEAD_S
        else:  # an accelerator: a kernel launch per op
            per_op = getattr(self.config, "kernel_overhead_us", GPU_OP_OVERHEAD_S * 1e6) * 1e-6
        return roofline_codec_time_s(codec, k, self.dtype_bytes, dev.spec.memory_bandwidth_gbps, per_op)

    def unit_time_alone_s(self, unit, device_id: str, n, c, b):
        """``unit_time_s`` (whole unit) while every device co-located with ``device_id`` is idle;
        None where the model knows no co-location interference (the unit takes ``unit_time_s``
        whatever its neighbours do: datasheet models, GPUs)."""
        return None

    def colocated(self) -> list[tuple[frozenset[str], int]]:
        """Groups of devices that share one machine's caches and memory bus, each with the
        number of devices that shared it when ``unit_time_s`` was measured (at least the
        group's size): a unit takes ``unit_time_s`` while that many less one neighbours
        compute, ``unit_time_alone_s`` while none does (the simulator interpolates by how
        many are busy).  None by default."""
        return []

    # ---- the decode step loop (generation) -------------------------------------
    def step_overhead_s(self, src: str, dst: str) -> float:
        """Seconds a decode step's message from ``src`` to ``dst`` takes beyond
        ``transfer_time_s``: the hand-over from the receiving thread to a stage loop that sat
        idle waiting for it (negative where the step loop was measured faster than the link's
        ping-pong, never below minus the fitted link's latency, so that transfer plus overhead
        stays at least zero; apply it with ``with_step_overhead``).  None known by default."""
        return 0.0

    def tp_step_overhead_s(self, device_ids) -> float:
        """A tensor-parallel stage's decode step: its leader's hand-over of the step's input to
        the slowest peer's waiting loop (``step_overhead_s``), which the shards wait for; at
        least zero (it lengthens the stage's compute; the scatter keeps its own price)."""
        return max([0.0, *(self.step_overhead_s(device_ids[0], d) for d in device_ids[1:])])

    def after_wait_factor(self, device_id: str) -> float:
        """How much longer a decode step computes on ``device_id`` as a stage of a multi-stage
        decode (in a step loop, after waits for its input, beside receiving threads) than back
        to back.  1 by default."""
        return 1.0

    def stage_after_wait_factor(self, device_ids) -> float:
        """A stage's ``after_wait_factor``: its devices compute each step together, so the
        slowest to resume sets it."""
        return max(self.after_wait_factor(d) for d in device_ids)

    def busy_power_w(self, device_id: str) -> float:
        return self.cluster.device(device_id).spec.power_w

    def idle_power_w(self, device_id: str) -> float:
        return self.cluster.device(device_id).spec.idle_power_w

    # ---- shared helpers ----------------------------------------------------
    SPLIT_KINDS: ClassVar[tuple[str, ...]] = ("attn", "mlp")
    """Unit kinds a tensor-parallel stage splits (by heads, by d_ff); the runtime keeps the
    embedding whole on every rank, and the head on the first (``LEADER_KINDS``)."""
    LEADER_KINDS: ClassVar[tuple[str, ...]] = ("head",)
    """Unit kinds a tensor-parallel stage runs on its first device only: the head, whose logits
    only the leader reads (it samples and relays).  Run on every member, the head's large output
    cost a slow member of local-cpu-4dev 71-157 ms against 38-44 ms on its fast partner (2-core
    Intel Xeon VM, 2026-12-02), all of it on the stage's critical path."""

    def stage_overhead_s(self, device_ids) -> float:
        """Fixed time a stage adds to each work item beyond its units (none in the base model)."""
        return 0.0

    def tp_unit_time_s(self, unit, device_ids, n, c, b):
        """One unit of a stage on ``device_ids`` (one device, or a tensor-parallel group).

        Split units (attention, MLP) run a 1/tp shard on every device and end with an
        all-reduce that starts when the slowest shard is done; the embedding runs whole on
        every rank (each needs its output), with no all-reduce; the head runs on the first
        device alone (the leader, whose logits are the only ones read)."""
        tp = len(device_ids)
        if tp == 1 or unit.kind in self.LEADER_KINDS:
            return np.asarray(self.unit_time_s(unit, device_ids[0], n, c, b), float)
        if unit.kind not in self.SPLIT_KINDS:
            return np.maximum.reduce([np.asarray(self.unit_time_s(unit, d, n, c, b), float) for d in device_ids])
        shard = np.maximum.reduce([np.asarray(self.unit_time_s(unit, d, n, c, b, tp), float) for d in device_ids])
        return shard + self.allreduce_time_s(device_ids, unit.tp_allreduce_bytes(n, b, self.dtype_bytes))

    def tp_scatter_s(self, start: int, device_ids, n, b):
        """A tensor-parallel stage's first device forwarding the stage's input to each peer,
        one after another (nothing for the first stage, which reads the token ids)."""
        if len(device_ids) == 1 or start == 0:
            return np.zeros(np.shape(np.asarray(n) * np.asarray(b)))
        in_bytes = self.setup.units[start - 1].out_bytes(n, b, self.dtype_bytes)
        return sum(np.asarray(self.transfer_time_s(device_ids[0], d, in_bytes), float) for d in device_ids[1:])

    def stage_compute_s(self, start: int, end: int, device_ids, n, c, b):
        """Time a stage spends on one work item, transfers between stages excluded.

        One device: the sum of its units' times.  Tensor parallel (several devices):
        the first device forwards the stage's input to each peer, one after another;
        then each unit runs (``tp_unit_time_s``: split units as shards whose all-reduce
        waits for the slowest, the embedding whole on every rank, the head on the first)."""
        units = self.setup.units[start:end]
        t = sum(self.tp_unit_time_s(u, device_ids, n, c, b) for u in units)
        if len(device_ids) > 1:
            t = t + self.tp_scatter_s(start, device_ids, n, b)
        overhead = self.stage_overhead_s(device_ids)
        return np.asarray(t + overhead if overhead else t, float)

    def stage_compute_alone_s(self, start: int, end: int, device_ids, n, c, b):
        """``stage_compute_s`` of a one-device stage while its co-located devices are idle; None
        for tensor-parallel stages (their devices are each other's neighbours, busy together)
        and where the model knows no interference."""
        if len(device_ids) != 1:
            return None
        parts = [self.unit_time_alone_s(u, device_ids[0], n, c, b) for u in self.setup.units[start:end]]
        if not parts or any(p is None for p in parts):
            return None
        overhead = self.stage_overhead_s(device_ids)
        return np.asarray(sum(parts) + overhead if overhead else sum(parts), float)

    auto: Any = None
    """Set when the scenario said ``costmodel: auto``: the AutoChoice that picked this model."""

    def describe(self) -> dict[str, Any]:
        d = self.config.model_dump()
        if self.auto is not None:
            d["auto"] = self.auto.as_dict()
        return d


REGISTRY: dict[str, type[CostModel]] = {}


def register(cls: type[CostModel]) -> type[CostModel]:
    REGISTRY[cls.name] = cls
    return cls


def costmodel_config(spec: str | dict) -> CostModelConfig:
    """The validated settings of the cost model a scenario names (a string, or a mapping with
    ``kind``), without building it: no profile is read.  Commands that replace the model (profile,
    validate) still check what the user wrote."""
    data = {"kind": spec} if isinstance(spec, str) else dict(spec)
    kind = data.get("kind")
    _load_builtin(kind)
    if kind == "auto":
        from hpipe.costmodels.auto import AutoConfig

        for key in data:  # a setting of one of its models, given beside kind: say where it goes
            section = auto_section(key) if key not in AutoConfig.model_fields else None
            if section:
                raise InputError(f"a setting of the {section} model auto picks; give it under {section}: "
                                 f"{{kind: auto, {section}: {{{key}: ...}}}}", field=key)
        config = _validated(AutoConfig, data)
        # both settings checked now, not only the one chosen today: a typo in the other would
        # surface only on the day the cache changes
        _validated(REGISTRY["roofline"].Config, {**config.roofline, "kind": "roofline"}, "roofline.")
        if "profile" in config.fitted:
            raise InputError("auto reads this machine's cached profile; to name one, use kind: fitted",
                             field="fitted.profile")
        _validated(REGISTRY["fitted"].Config, {**config.fitted, "kind": "fitted", "profile": ""}, "fitted.")
        return config
    if kind not in REGISTRY:
        names = [*REGISTRY, "auto"]
        raise InputError(f"unknown cost model {kind!r}{suggest(str(kind), names)}; "
                         f"one of {', '.join(names)}", field="kind")
    return _validated(REGISTRY[kind].Config, data)


def auto_section(key: str) -> str | None:
    """Which of auto's two models (``roofline``, ``fitted``) takes the setting ``key``, given
    under that name in auto's settings; None where neither does."""
    _load_builtin("roofline")
    _load_builtin("fitted")
    for section in ("roofline", "fitted"):
        if key in REGISTRY[section].Config.model_fields and key not in ("kind", "profile"):
            return section
    return None


def make_costmodel(spec: str | dict, setup) -> CostModel:
    """Build the cost model a scenario names (a string, or a mapping with ``kind``)."""
    config = costmodel_config(spec)
    if config.kind == "auto":
        from hpipe.costmodels.auto import choose

        chosen, why = choose(config, setup)
        model = make_costmodel(chosen, setup)  # its settings were checked above, named where they sit
        model.auto = why
        return model
    return REGISTRY[config.kind](config, setup)


def _validated(cls, data: dict, under: str = ""):
    found = boolean_for_number(cls, data)
    if found is not None:
        raise InputError(f"expected a number, got {str(found[1]).lower()} (a boolean)", field=under + found[0])
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise InputError(msg, field=under + field) from None


_BUILTIN = {"roofline": "hpipe.costmodels.roofline", "fitted": "hpipe.costmodels.fitted"}
"""The built-in models' modules (each registers itself on import)."""


def _load_builtin(kind=None) -> None:
    """Import the named built-in model's module, or all of them for any other name (to list
    the choices): only what the scenario uses, as importing fitted's profile machinery
    costs a plan that runs on the roofline start-up time for nothing."""
    import importlib

    for name in ([_BUILTIN[kind]] if kind in _BUILTIN else _BUILTIN.values()):
        importlib.import_module(name)


def split_transfer(cluster, src: str, dst: str, total):
    """(hold, delay): the part of a transfer time that holds the links and the propagation
    latency after them (the route's latency, at most the whole time).  The cost model gives
    latency + bytes / bandwidth; the route says how much of it is latency.  The simulator and
    the planners split every transfer this way."""
    total = np.asarray(total, float)
    lat = 0.0 if src == dst else cluster.route(src, dst).latency_s
    delay = np.minimum(lat, total)
    return total - delay, delay


def with_step_overhead(hold_s, delay_s, overhead_s):
    """A decode message's (hold, delay) with ``CostModel.step_overhead_s`` applied: a positive
    overhead lengthens the delay; a negative one (the step loop measured faster than the
    ping-pong) shortens the delay to zero, then the hold.  The simulator and the planner's
    decode timeline both price a decode hop this way."""
    delay = np.asarray(delay_s, float) + overhead_s
    return np.maximum(np.asarray(hold_s, float) + np.minimum(delay, 0.0), 0.0), np.maximum(delay, 0.0)
