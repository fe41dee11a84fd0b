"""The Result schema shared by `simulate` and `execute`, and the one function that
turns a timeline of events into its figures.

Simulated and measured runs both produce a list of ``Event`` (a compute on a
device, a transfer on a link) and call ``summarize``; so a prediction and a
measurement of the same plan compare field by field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hpipe.models import decode_steps
from hpipe.plan import Plan


class Event(BaseModel):
    """One interval of work on the timeline."""

    model_config = ConfigDict(extra="forbid")
    device: str
    """The computing device, or the sender of a transfer."""
    kind: Literal["compute", "transfer", "allreduce"]
    stage: int
    micro_batch: int
    slice: int
    start_s: float
    end_s: float
    dst: str | None = None
    """Receiver of a transfer."""
    nbytes: float = 0.0
    link: str | None = None
    """Transfers between stages: the link (``u->v``, the narrowest on the path) the bytes
    crossed, so timelines can draw one track per link.  None: not on a modelled link."""
    phase: Literal["prefill", "decode"] = "prefill"
    """Generation: a decode step's events say ``decode``; then ``micro_batch`` is the decode
    group and ``slice`` the decode step (0 = the pass that makes each sequence's 2nd token)."""


class RunResult(BaseModel):
    """The figures of one plan, simulated or measured.

    The figures are None only in an infeasible result that has no plan at all (the
    planner found none); a plan that does not fit still gets its figures, with
    ``feasible`` false."""

    model_config = ConfigDict(extra="forbid")
    planner: str
    latency_s: float | None
    """Makespan: first work item starts to last one ends."""
    throughput_tokens_per_s: float | None
    """Prompt tokens (batch x seq_len) per second of latency."""
    energy_j: float | None
    """Idle power of every plan device over the makespan, plus busy time above idle."""
    dynamic_energy_j: float | None
    """The busy-above-idle part alone."""
    energy_source: Literal["modelled", "measured"] | None = None
    """Measured results: ``modelled`` (device power x measured busy time, the default) or
    ``measured`` (RAPL or NVML energy counters over the run, where the machine has them;
    ``dynamic_energy_j`` is then None).  None for simulated results (always modelled)."""
    peak_memory_mb: dict[str, float]
    """Peak memory per plan device, MB (10^6 bytes, as GB in messages is 10^9)."""
    utilization: dict[str, float]
    """Busy time / latency, per device the plan uses."""
    bubble_fraction: float | None
    """1 - (busy time summed over plan devices) / (devices x latency)."""
    cost_usd: float | None = None
    """What renting the plan's devices for the latency costs: sum of their price_per_hour x
    latency.  None when a plan device has no price."""
    usd_per_million_tokens: float | None = None
    """cost_usd per million tokens processed (batch x (seq_len + output_tokens))."""
    plan: Plan | None
    feasible: bool = True
    infeasible: str | None = None
    """Why the plan cannot run as given (a device short of memory), when it cannot."""
    predicted_latency_s: float | None = None
    """Measured results: what the simulator predicted for the same plan."""
    predicted_ttft_s: float | None = None
    """Measured generation: the simulator's ``ttft_s`` for the same plan."""
    predicted_tpot_s: float | None = None
    """Measured generation: the simulator's ``tpot_s`` for the same plan."""
    max_abs_error: float | None = None
    """Measured with --check: largest |logit difference| against one process."""
    check_tolerance: float | None = None
    """Measured with --check: the largest ``max_abs_error`` that passes (the dtype's; for a plan
    with lossy codecs at least a quarter of the codecs' own effect on the logits)."""
    compute_cpu_s: dict[str, float] | None = None
    """Measured, CPU devices: CPU seconds each device's stage thread spent in its units (with one
    intra-op thread, the compute itself): unlike wall time, hardly inflated by other processes
    competing for the cores.  Compare with the cost model's ``stage_compute_s``."""
    other_cpu_cores: float | None = None
    """Measured: how many cores other processes on this machine kept busy on average while the
    run went on (its machine's busy CPU time less the run's own processes'; see
    ``hpipe.runtime.machine_load``).  Well above 0, the measured times include their
    interference.  None where the machine does not say (not Linux) and for simulated results."""
    decode_compute_cpu_s: dict[str, float] | None = None
    """Measured generation, CPU devices: the decode steps' part of ``compute_cpu_s`` (the
    sampler's work on the last stage included, as in the steps' compute stamps)."""
    next_token_ids: list[int] | None = None
    """Measured: argmax of the last position's logits, one per sequence."""
    # ---- generation (workload.output_tokens > 0); latency_s is then end to end ----
    ttft_s: float | None = None
    """Time to first token: first work starts to the moment every sequence of the batch has its
    first generated token (made by the prefill's last slice)."""
    tpot_s: float | None = None
    """Median time between consecutive tokens of a sequence."""
    tpot_p90_s: float | None = None
    """90th percentile of the time between consecutive tokens of a sequence."""
    output_tokens_per_s: float | None = None
    """Generated tokens (all sequences) per second of end-to-end latency."""
    generated_ids: list[list[int]] | None = None
    """Measured: the new token ids, one list per sequence (EOS included where it stopped)."""
    text: list[str] | None = None
    """Measured, where the weights folder has a tokenizer: generated_ids decoded."""
    not_emulated: list[str] | None = None
    """Measured runs: what the scenario describes that this machine did not emulate (CPU quotas
    by a duty cycle, unshaped links, link latency without netem, an interconnect loopback cannot
    be, CPU workers asking for more cores than there are), in words; None when simulated or
    when nothing was left out."""
    emulated: dict | None = None
    """Measured runs: what this machine put in place of the scenario's hardware
    (``hpipe.runtime.emulation``): ``cpu_quota`` and ``cpu_weight`` per device run in a
    weighted cgroup, and ``links`` between emulated hosts (``between``, the shaped
    ``bandwidth_gbps``, the ``latency_us`` added, None where netem is missing, and the
    ``asked_latency_us``); None when simulated or when nothing was emulated (one host, no
    quotas).  ``not_emulated`` says what was left out."""
    bytes_per_link: dict[str, float] = Field(default_factory=dict)
    """Bytes the transfers between stages put on each link (``u->v``, the narrowest of the
    route, as ``Event.link``): what a codec on a boundary saves shows here.  The tensors'
    payload of the measured pass, as the simulator counts it: a measured run's headers, TCP
    and warm-up pass put more on the wire (300 KB for 131 KB on one shaped hop)."""
    events: list[Event] = Field(default_factory=list, exclude=True)
    """The timeline (exported as a trace, not in the JSON)."""

    def take_prediction(self, predicted: "RunResult") -> None:
        """A measured result: keep the simulator's figures for the same plan beside its own."""
        self.predicted_latency_s = predicted.latency_s
        self.predicted_ttft_s, self.predicted_tpot_s = predicted.ttft_s, predicted.tpot_s


class Result(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scenario: str
    mode: Literal["simulated", "measured"]
    results: list[RunResult]
    cost_model: dict | None = None
    """The cost model behind the predictions (its ``describe()``: kind and settings; with
    ``costmodel: auto``, an ``auto`` entry saying which model it chose and why)."""


def _union_s(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def decode_figures(token_times_s: list[list[float]], t0_s: float, latency_s: float) -> dict[str, float]:
    """TTFT, TPOT (median, p90) and output tokens/s from when each sequence got each new token.

    ``token_times_s[k]`` are the absolute times sequence k received its generated tokens, in
    order (the first comes from the prefill).  Simulator and runtime both call this, so the
    generation figures mean the same in a prediction and a measurement."""
    import numpy as np

    firsts = [ts[0] for ts in token_times_s if ts]
    gaps = np.concatenate([np.diff(np.asarray(ts, float)) for ts in token_times_s if len(ts) > 1] or [np.zeros(0)])
    n_tokens = sum(len(ts) for ts in token_times_s)
    return {
        "ttft_s": max(firsts) - t0_s if firsts else None,
        "tpot_s": float(np.median(gaps)) if gaps.size else None,
        "tpot_p90_s": float(np.percentile(gaps, 90)) if gaps.size else None,
        "output_tokens_per_s": n_tokens / latency_s if latency_s > 0 else 0.0,
    }


def summarize(setup, plan: Plan, events: list[Event], peak_memory_bytes: dict[str, float],
              **extra) -> RunResult:
    """Latency, throughput, utilization, bubbles and energy of a timeline.

    Compute and all-reduce intervals count as busy time of their device."""
    if not events:
        raise ValueError("summarize needs at least one event")
    if decode_steps(setup.output_tokens) and plan.decode_micro_batches is None:  # the groups it decoded in
        plan = plan.model_copy(update={"decode_micro_batches": plan.decode_groups(setup.batch_size)})
    t0 = min(e.start_s for e in events)
    latency = max(e.end_s for e in events) - t0
    devices = plan.devices
    # One pass over the events (a long-context timeline holds tens of thousands).
    spans: dict[str, list[tuple[float, float]]] = {d: [] for d in devices}
    link_bytes: dict[str, float] = {}
    for e in events:
        if e.kind in ("compute", "allreduce") and e.device in spans:
            spans[e.device].append((e.start_s, e.end_s))
        elif e.kind == "transfer" and e.link is not None:
            link_bytes[e.link] = link_bytes.get(e.link, 0.0) + e.nbytes
    busy = {d: _union_s(spans[d]) for d in devices}
    util = {d: (busy[d] / latency if latency > 0 else 0.0) for d in devices}
    dynamic = sum((setup.cost.busy_power_w(d) - setup.cost.idle_power_w(d)) * busy[d] for d in devices)
    idle = sum(setup.cost.idle_power_w(d) for d in devices) * latency
    bubble = 1.0 - sum(busy.values()) / (len(devices) * latency) if latency > 0 else 0.0
    prices = [setup.cluster.device(d).spec.price_per_hour for d in devices]
    cost = sum(prices) * latency / 3600 if all(p is not None for p in prices) else None
    tokens = setup.batch_size * (setup.seq_len + getattr(setup, "output_tokens", 0))
    extra.setdefault("cost_usd", cost)
    extra.setdefault("usd_per_million_tokens", cost / tokens * 1e6 if cost is not None and tokens else None)
    return RunResult(
        planner=plan.planner, latency_s=latency,
        throughput_tokens_per_s=setup.batch_size * setup.seq_len / latency if latency > 0 else 0.0,
        energy_j=idle + dynamic, dynamic_energy_j=dynamic,
        peak_memory_mb={d: b / 1e6 for d, b in peak_memory_bytes.items()},
        utilization=util, bubble_fraction=bubble, plan=plan, bytes_per_link=link_bytes,
        events=(list(events) if t0 == 0 else
                [e.model_copy(update={"start_s": e.start_s - t0, "end_s": e.end_s - t0}) for e in events]),
        **extra)
