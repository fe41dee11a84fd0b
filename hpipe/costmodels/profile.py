"""The profile file: what `hpipe profile` measured, the contract between profiler and fitted model.

A profile holds raw measurements, not fitted coefficients: the fitted cost
model (``hpipe.costmodels.fitted``) fits them when a scenario is loaded, so a
better feature set never needs a new measurement.  It records where and with
what it was measured (CPU/GPU, library versions, date) because a profile is
only valid for the runtime that produced it (Vidur's accuracy collapsed when
the serving engine changed version).

Layout (JSON)::

    {"format": "hpipe-profile/1", "created": "2025-..Z",
     "hardware": {...}, "versions": {"python": .., "torch": .., "hpipe": .., "numpy": .., "profiler": 2},
     "scenario": "local-cpu", "model": {ModelSpec fields}, "dtype": "float32",
     "settings": {"warmup": 2, "repeats": 7, "statistic": "trimmed-mean"},
     "devices": [{"device": "local/core-0", "label": "core", "placement": {...},
                  "units": {"attn": {"n": [..], "c": [..], "b": [..], "seconds": [..]}, ...},
                  "alone": {"attn": {same layout as units, timed with the other devices idle}, ...},
                  "codecs": {"int8": {"values": [..], "encode_s": [..], "decode_s": [..]}, ...},
                  "item_overhead_s": 0.0001}],
     "links": [{"between": ["a/core-0", "b/core-0"], "sizes_bytes": [..], "one_way_s": [..],
                "bandwidth_gbps": 0.19, "latency_us": 640.0, "emulated": {...}}],
     "holdout": {...}}

Nothing here imports torch: planning with a profile works without it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                      ValidationError, model_validator)

from hpipe.errors import InputError, format_loc

PROFILE_FORMAT = "hpipe-profile/1"
PROFILER_METHOD = 5
"""How ``hpipe.runtime.profiler`` measures.  Bump it whenever a change makes the numbers of a
profile mean something else (what a unit, hop or all-reduce is timed after, how a quota device
is paced), so that a profile measured the old way is measured again rather than mixed with the
new cost model: it is in the profile cache's key and ``stale_reason`` checks it.  1: every
profile from before it was recorded (2026-12-02, 23:35 UTC), whatever it measured; 2: all-reduces
timed after a paced MLP shard of the model (the method of stop 20, first recorded then); 3: a
slower device emulated by a cgroup weight and pacing instead of a CFS quota (2026-12-03), which
makes its tensor-parallel shards and short stretches faster (``hpipe.runtime.emulation``); 4: the
all-reduce chain also timed with every group at once, and its shards' CPU time after each
all-reduce against back to back (2026-12-03); 5: int8 and int4 lay a message out
channel-major (2026-12-03), a transposing copy more to time, and the codecs are timed on
message-shaped tensors."""
UNIT_KINDS = ("embed", "attn", "mlp", "head")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hardware(_Strict):
    cpu_model: str
    cpu_cores: int
    """Logical CPUs the machine has (os.cpu_count)."""
    cpus_usable: int | None = None
    """CPUs this process may run on (sched_getaffinity)."""
    gpus: list[str] = []
    hostname: str = ""
    os: str = ""


class Versions(_Strict):
    python: str
    torch: str | None = None
    hpipe: str
    numpy: str | None = None
    profiler: int = 1
    """The PROFILER_METHOD that measured it (profiles before it was recorded have none: 1)."""


class Settings(_Strict):
    warmup: int = Field(ge=0)
    repeats: int = Field(ge=1)
    statistic: str
    """How repeats become one figure (e.g. trimmed-mean: mean of the middle repeats)."""
    cfs_period_us: int | None = None
    """cgroup CPU period of devices with cpu_quota, in profiles of method 2 and before (which
    emulated them by a CFS quota); None since."""
    grid: Literal["quick", "full"] | None = None
    """The (slice, context, batch) grid's density: quick (`hpipe profile --quick`, and the one
    `costmodel: auto` measures on a first run) or full; None in profiles before 2026-12-03."""


class UnitSamples(_Strict):
    """Seconds of one unit kind over a grid of (slice tokens n, context tokens c, batch b)."""

    n: list[PositiveInt]
    c: list[NonNegativeInt]
    b: list[PositiveInt]
    seconds: list[float]
    spread: list[float] = []
    """Per point: (p75 - p25) / median of the repeats -- how noisy the point was."""
    cpu_seconds: list[float] = []
    """Per point: CPU time of the calling thread (mean of the repeats; trimmed in profiles made
    before 2026-12).  Other processes competing
    for the core inflate wall time but hardly CPU time; a CPU quota does not inflate it."""

    @model_validator(mode="after")
    def _same_length(self):
        k = len(self.seconds)
        if k == 0:
            raise ValueError("no samples")
        for name in ("n", "c", "b"):
            if len(getattr(self, name)) != k:
                raise ValueError(f"'{name}' has {len(getattr(self, name))} entries, 'seconds' has {k}")
        for name in ("spread", "cpu_seconds"):
            if getattr(self, name) and len(getattr(self, name)) != k:
                raise ValueError(f"'{name}' has {len(getattr(self, name))} entries, 'seconds' has {k}")
        if any(s <= 0 for s in self.cpu_seconds):
            raise ValueError("every CPU time must be positive")
        if any(s <= 0 for s in self.seconds):
            raise ValueError("every time must be positive")
        return self


class ShardSamples(_Strict):
    """A tensor-parallel shard's units: rank 0's 1/tp of each attention and MLP unit, timed as a
    stage of tp devices runs it (its all-reduce is timed apart, in ``Profile.all_reduces``)."""

    tp: int = Field(ge=2)
    units: dict[Literal["attn", "mlp"], UnitSamples]


class CodecSamples(_Strict):
    """Seconds one activation codec takes on the device to encode and to decode k values
    (``hpipe.runtime.codecs``, the code the stage workers run), over a few sizes k."""

    values: list[int]
    encode_s: list[float]
    """Per size: trimmed mean wall time of the repeats."""
    decode_s: list[float]
    encode_cpu_s: list[float] = []
    """Per size: mean CPU time of the calling thread (CPU devices)."""
    decode_cpu_s: list[float] = []

    @model_validator(mode="after")
    def _same_length(self):
        k = len(self.values)
        if k == 0:
            raise ValueError("no samples")
        for name in ("encode_s", "decode_s", "encode_cpu_s", "decode_cpu_s"):
            xs = getattr(self, name)
            if (xs or name in ("encode_s", "decode_s")) and len(xs) != k:
                raise ValueError(f"'{name}' has {len(xs)} entries, 'values' has {k}")
            if any(x <= 0 for x in xs):
                raise ValueError(f"every time in '{name}' must be positive")
        return self


class AfterWait(_Strict):
    """A device's decode chain timed in the step-loop probe (``hpipe.runtime.step_probe``):
    each run came after the device sat idle waiting for its peer, as a stage of a
    multi-stage decode does."""

    point: tuple[int, int, int]
    """(n = 1, c, b): the decode point the chain ran at."""
    cpu_seconds: list[PositiveFloat] = Field(min_length=1)
    """The chain's CPU time after each wait."""
    back_to_back_cpu_seconds: PositiveFloat
    """The same chain's CPU time run back to back in the probe, its peer idle (mean)."""

    @property
    def ratio(self) -> float:
        """After a wait over back to back (the mean of the runs: CPU time has no preemption
        spikes to drop)."""
        return float(sum(self.cpu_seconds) / len(self.cpu_seconds)) / self.back_to_back_cpu_seconds


class DeviceProfile(_Strict):
    device: str
    """Scenario device id (HOST/NAME-i) the measurements were taken on."""
    label: str
    """Device type or custom name (NAME), for reuse by another device of the same kind."""
    placement: dict[str, Any] = {}
    """The runtime placement measured under (threads, cores, cpu_quota)."""
    units: dict[Literal["embed", "attn", "mlp", "head"], UnitSamples]
    shards: list[ShardSamples] = []
    """Tensor-parallel shards, for the degree of the device's host (absent: a shard is
    estimated as the unit's fixed cost plus 1/tp of the rest)."""
    item_overhead_s: NonNegativeFloat = 0.0
    """Per work item and stage, beyond its units: the stage loop's own bookkeeping."""
    codecs: dict[Literal["int8", "fp8", "int4"], CodecSamples] = {}
    """Activation codecs timed on the device (profiles made before they were timed have none:
    the fitted model then models codec time as memory passes, as the roofline does)."""
    alone: dict[Literal["embed", "attn", "mlp", "head"], UnitSamples] = {}
    """The same units timed again (half the repeats) while every other device of the profile waited idle (CPU
    devices that share this machine's caches and memory bus; empty for GPUs, for a lone CPU
    device, with ``hpipe profile --no-alone`` and in profiles made before 2026-12).  ``units`` are timed with all devices busy at once, as in a full
    pipeline; the two together give the fitted model its co-location interference (on the
    2-core AMD EPYC VM, attention at 32 tokens took 1.75 ms alone and 2.1-2.6 ms beside a busy
    neighbour)."""
    after_wait: AfterWait | None = None
    """Its decode chain after waits in the step-loop probe (absent: not probed -- prefill only,
    a GPU, one device, or a profile made before 2026-12-02)."""
    cpu_share: float | None = None
    """CPU time / wall time over the timed unit calls: about 1 on a quiet machine, about the
    cpu_quota on a throttled device, lower when other processes competed for the CPU."""

    def all_samples(self):
        """(kind, tp, samples) of every timed unit: whole units (tp 1), then the shards."""
        for kind, samples in self.units.items():
            yield kind, 1, samples
        for sh in self.shards:
            for kind, samples in sh.units.items():
                yield kind, sh.tp, samples


class EmulatedLink(_Strict):
    bandwidth_gbps: float
    latency_us: float | None = None
    """The latency netem added; None where it added none (the kernel has no netem qdisc, or
    the scenario asked for none)."""
    asked_latency_us: float | None = None
    """The latency the scenario asked for, applied or not (None in profiles before 2026-12-03):
    what a later scenario's latency is compared with."""


class LinkProfile(_Strict):
    between: tuple[str, str]
    """Two device ids; a link is taken as symmetric."""
    sizes_bytes: list[int]
    one_way_s: list[float]
    """Half the round trip of a message of each size, there and back (lower quartile of the repeats)."""
    bandwidth_gbps: float = Field(gt=0)
    """Fitted: 8 * bytes / (one_way - latency)."""
    latency_us: NonNegativeFloat
    """Fitted intercept: one-way time of an empty message (send/recv overhead included)."""
    emulated: EmulatedLink | None = None
    """What tc was asked to shape the link to, when it was emulated."""

    @model_validator(mode="after")
    def _same_length(self):
        if len(self.sizes_bytes) != len(self.one_way_s):
            raise ValueError(f"'sizes_bytes' has {len(self.sizes_bytes)} entries, "
                             f"'one_way_s' has {len(self.one_way_s)}")
        return self


class AllReduceProfile(_Strict):
    devices: list[str] = Field(min_length=2)
    """The group (a host's devices, as a tensor-parallel stage uses them)."""
    sizes_bytes: list[int]
    seconds: list[float]
    """Median time of an all-reduce of each size, as seen by the group's first device."""
    bandwidth_gbps: float = Field(gt=0)
    """Fitted: 8 * bytes / (seconds - latency)."""
    latency_us: NonNegativeFloat
    """Fitted intercept: an all-reduce of an empty message."""
    seconds_together: list[PositiveFloat] | None = None
    """The same chain timed while every other group ran its own at once (``seconds`` is timed
    with the other devices idle): what an all-reduce costs while co-located neighbours compute.
    None: the scenario has no other group (or a profile made before method 4)."""
    shard_cpu_s: list[list[PositiveFloat]] | None = None
    """Per member (in ``devices`` order), per size: CPU seconds of the chain's MLP shard run
    back to back, the whole group at once, at the size's rows (``sizes_bytes`` / d_model's bytes)."""
    shard_after_wait_cpu_s: list[list[PositiveFloat]] | None = None
    """The same shard's CPU seconds inside the chain, each run after an all-reduce (and paced),
    as a tensor-parallel stage runs every split unit: the shards' price is scaled by the ratio
    of the two (``Fitted.tp_shard_factor``)."""

    @model_validator(mode="after")
    def _same_length(self):
        k = len(self.sizes_bytes)
        if len(self.seconds) != k:
            raise ValueError(f"'sizes_bytes' has {k} entries, 'seconds' has {len(self.seconds)}")
        if self.seconds_together is not None and len(self.seconds_together) != k:
            raise ValueError(f"'sizes_bytes' has {k} entries, 'seconds_together' has {len(self.seconds_together)}")
        for name in ("shard_cpu_s", "shard_after_wait_cpu_s"):
            rows = getattr(self, name)
            if rows is not None and (len(rows) != len(self.devices) or any(len(r) != k for r in rows)):
                raise ValueError(f"'{name}' must hold one list of {k} entries per device ({len(self.devices)})")
        return self


class StepHopProfile(_Strict):
    """Two devices' step-loop probe (``hpipe.runtime.step_probe``): per round, an activation
    from the first to the second and token ids back, each through the receiver's thread to
    its compute loop, which had sat idle waiting."""

    between: tuple[str, str]
    point: tuple[int, int, int]
    """(n = 1, c, b): the decode point whose activation went forward."""
    forward_bytes: PositiveInt
    return_bytes: PositiveInt
    hops_s: list[NonNegativeFloat] = Field(min_length=1)
    """The two hops of each round: the first device's round trip less the second's chain."""

    @property
    def two_hops_s(self) -> float:
        """The median round's two hops (unlike the ping-pong's lower quartile: the wake-up of
        a loop that sat idle is the very thing measured, so the middle, not the low end)."""
        return statistics.median(self.hops_s)


class SpeedProbe(_Strict):
    """``hpipe.runtime.speed.probe_by_core`` before and after a profile's measurement."""

    version: int
    """``hpipe.runtime.speed.PROBE_VERSION`` of the work timed."""
    cores: list[int | None]
    """The cores probed (the scenario's devices' pinned cores; None: unpinned)."""
    before_s: list[float]
    """Seconds of one repeat on each core before the measurement (``cores``' order)."""
    after_s: list[float]
    """And after it."""

    @model_validator(mode="after")
    def _same_length(self):
        if not len(self.cores) == len(self.before_s) == len(self.after_s):
            raise ValueError(f"cores, before_s and after_s differ in length "
                             f"({len(self.cores)}, {len(self.before_s)}, {len(self.after_s)})")
        return self

    def by_core(self) -> dict:
        """{core: the mean of its two probes}: the reference later probes are set against."""
        return {c: (a + b) / 2 for c, a, b in zip(self.cores, self.before_s, self.after_s)}


class Profile(_Strict):
    format: Literal["hpipe-profile/1"] = PROFILE_FORMAT
    created: str
    """UTC ISO-8601 time of measurement."""
    hardware: Hardware
    versions: Versions
    scenario: str
    model: dict[str, Any]
    """ModelSpec fields of the model whose units were timed."""
    dtype: str
    settings: Settings
    devices: list[DeviceProfile] = Field(min_length=1)
    links: list[LinkProfile] = []
    all_reduces: list[AllReduceProfile] = []
    """Tensor-parallel groups' all-reduces (profiles written before they were measured have none)."""
    step_hops: list[StepHopProfile] = []
    """The step-loop probe per pair of devices (profiles of prefill-only scenarios, of GPUs, and
    made before 2026-12-02 have none)."""
    holdout: dict[str, Any] = {}
    """The fitted model's error on held-out points when the profile was written (informational)."""
    speed_probe: SpeedProbe | None = None
    """How fast the machine was while it was profiled, to set later runs against (profiles
    written before 2026-12-02 afternoon have none)."""

    def device(self, device_id: str) -> DeviceProfile | None:
        for d in self.devices:
            if d.device == device_id:
                return d
        return None

    def link(self, a: str, b: str) -> LinkProfile | None:
        for lk in self.links:
            if set(lk.between) == {a, b}:
                return lk
        return None


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile JSON file; InputError names the file and field."""
    file = str(path)
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"no such profile file {file} (make one with `hpipe profile SCENARIO -o {file}`)",
                         file=file) from None
    except json.JSONDecodeError as e:
        raise InputError(f"JSON syntax error at line {e.lineno}, column {e.colno}: {e.msg}", file=file) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the file: {e}", file=file) from None
    from hpipe.io import document_kind, json_type

    kind = document_kind(data)  # hpipe's other outputs, passed in the wrong place
    if kind and "format" not in data:
        raise InputError(f"this is {kind}, not a profile: a profile is what `hpipe profile SCENARIO -o "
                         f"PROFILE.json` writes", file=file)
    if not isinstance(data, dict):
        raise InputError(f"a profile is a JSON object, got {json_type(data)}", file=file)
    if data.get("format") not in (None, PROFILE_FORMAT):
        raise InputError(f"format {data.get('format')!r} is not {PROFILE_FORMAT!r}", file=file, field="format")
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "missing required key"
        raise InputError(msg, file=file, field=format_loc(tuple(err["loc"])) or None) from None


def decode_gap(profile: Profile, setup) -> str | None:
    """Why a profile falls short of a scenario that generates tokens (it timed no decode steps,
    or none as far as the scenario's last step's context, or, over CPU devices alone, no
    decode step-loop probe), or None."""
    from hpipe.models import decode_steps, positions_used

    if decode_steps(setup.output_tokens) == 0:
        return None
    if not all(any(n == 1 and c > 0 for n, c in zip(dp.units["attn"].n, dp.units["attn"].c)) for dp in profile.devices):
        return "the profile timed no decode steps (n = 1) and the scenario generates tokens"
    # the cache key leaves output_tokens out (one profile serves them all), so a profile timed
    # for 4 new tokens had priced 600 by extrapolating its decode contexts 384-386 to 982
    last = positions_used(setup.seq_len, setup.output_tokens) - 1
    for dp in profile.devices:
        a = dp.units["attn"]
        reach = max(c for n, c in zip(a.n, a.c) if n == 1 and c > 0)
        if reach < last:
            return (f"the profile timed {dp.device}'s decode steps up to context {reach}, the scenario's last "
                    f"step is at {last} ({setup.seq_len} prompt + {setup.output_tokens} new tokens)")
    cpus = [d for d in setup.cluster.devices if getattr(d.placement, "device", "cpu") == "cpu"]
    # (a profile made without links, `--no-links`, has no probe either: that was asked for)
    if len(cpus) == len(setup.cluster.devices) > 1 and profile.links and not profile.step_hops:
        return "the profile has no decode step-loop probe and the scenario generates tokens"
    return None


def grid_gap(profile: Profile, setup) -> str | None:
    """Why a profile's grid falls short of a scenario's prefill (its slices and contexts reach
    fewer tokens, or its batches fewer sequences, than the scenario's workload: the fit would
    extrapolate), or None."""
    for dp in profile.devices:
        a = dp.units["attn"]
        # prefill slices, not decode steps (n = 1 past the prompt: at granularity 1 a one-token slice
        # is n = 1 too, but the grid always holds the whole prompt as one slice, n = L)
        pts = [(n, c, b) for n, c, b in zip(a.n, a.c, a.b) if n > 1 or c == 0]
        tokens, batch = max((n + c for n, c, _ in pts), default=0), max((b for *_, b in pts), default=0)
        if tokens < setup.seq_len or batch < setup.batch_size:
            return (f"the profile timed {dp.device} up to {tokens} tokens at batch {batch}, the scenario's workload "
                    f"is {setup.seq_len} tokens at batch {setup.batch_size}")
    return None


def coverage_gap(profile: Profile, setup) -> str | None:
    """Why a profile does not cover what ``setup`` asks of it, wherever it was measured: decode
    steps, the prefill's tokens and batch, or a device (with its placement) or an allowed codec it
    did not time; None where it covers them.  (``runtime.profiler.stale_reason`` adds this
    machine, the versions and the profiler's method.)"""
    gap = decode_gap(profile, setup) or grid_gap(profile, setup)
    if gap:
        return gap
    untimed: dict[str, list[str]] = {}  # codecs -> the devices that did not time them
    for d in setup.cluster.devices:
        dp = profile.device(d.id)
        placement = d.placement.model_dump(exclude_none=True) if d.placement is not None else {"threads": 1}
        if dp is None:
            return f"the profile timed no device {d.id} (it timed {', '.join(x.device for x in profile.devices)})"
        if dp.placement != placement:
            return f"device {d.id} is not measured with its placement {placement}"
        if setup.compression is not None and not set(setup.compression.allow) <= set(dp.codecs):
            untimed.setdefault(", ".join(sorted(set(setup.compression.allow) - set(dp.codecs))), []).append(d.id)
    if untimed:  # every device said (the first alone had been named)
        return "the scenario allows compression and " + "; ".join(
            f"the profile timed no {codecs} codec on {' or '.join(ids)}" for codecs, ids in untimed.items())
    return None


def model_mismatch(profile: Profile, spec, dtype: str) -> str | None:
    """Why a profile of one model cannot stand for another (shape or dtype), or None."""
    shape_fields = ("family", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size")
    want = spec.to_dict()
    for f in shape_fields:
        if f == "n_layers":
            continue  # every block has the same units: a profile serves any depth
        if profile.model.get(f) != want[f]:
            return (f"the profile timed a model with {f}={profile.model.get(f)!r}, the scenario's model "
                    f"({spec.name}) has {f}={want[f]!r}")
    if profile.dtype != dtype:
        return f"the profile was measured in {profile.dtype}, the scenario computes in {dtype}"
    return None
