"""`hpipe validate`: does the simulator, fed a fitted profile, predict what the runtime does?

For a scenario that runs on this machine: make sure a profile of it exists
(measure one where it is missing or stale: another machine, other library
versions, other placements), plan with several planners and with random
valid plans, simulate each plan with the fitted cost model, execute the same
plan, and compare latencies.  The relative error of a case is
(simulated - measured) / measured, measured being the fastest of ``--repeats``
runs; the summary gives the median and the 90th percentile of its absolute
value.

Nothing here imports torch at module level: the runtime is imported when a
plan is executed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from hpipe.errors import HpipeError, InfeasibleError, InputError
from hpipe.plan import Plan, Stage
from hpipe.scenario import PLANNER_NAMES, Scenario

DEFAULT_PLANNERS = ("hpipe", "base", "gpipe", "gpipe-balanced", "terapipe", "megatron", "tp-terapipe")


class Case(BaseModel):
    model_config = ConfigDict(extra="forbid")
    planner: str
    """Planner name, or random-K for the K-th random plan."""
    simulated_latency_s: float
    measured_latency_s: float
    error: float
    """(simulated - measured) / measured."""
    scenario: str
    stages: list[list]
    """Per stage: [devices, [start, end)]."""
    slices: list[int]
    micro_batches: int
    oversubscribed: bool = False
    """More worker processes than CPUs this process may use: timings share cores."""


class Validation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cases: list[Case]
    median_abs_error: float | None
    p90_abs_error: float | None
    scenarios: list[str]
    profiles: dict[str, str]
    """Scenario -> the profile its predictions used."""
    profiled: list[str] = []
    """Scenarios whose profile was measured by this run, and why."""
    skipped: list[str] = []
    """Cases that could not run (infeasible plan, a planner without a plan), with the reason."""
    hardware: str = ""
    emulation: dict[str, dict] = {}


def summarize_errors(errors) -> tuple[float | None, float | None]:
    a = np.abs(np.asarray(list(errors), float))
    if not len(a):
        return None, None
    return float(np.median(a)), float(np.percentile(a, 90))


# ---- the profile a scenario is validated with ----------------------------------------------
def default_profile_path(scenario: Scenario) -> Path:
    """The scenario's fitted profile, else ``profiles/<name>.json`` beside the scenario file."""
    spec = scenario.costmodel
    if isinstance(spec, dict) and spec.get("kind") == "fitted" and spec.get("profile"):
        return scenario.resolve_path(spec["profile"])
    base = Path(scenario.source_path).parent if scenario.source_path else Path.cwd()
    return base / "profiles" / f"{scenario.name}.json"


def with_fitted(scenario: Scenario, profile_path: Path, basis: str | None = None) -> Scenario:
    """The scenario with a fitted cost model on ``profile_path`` (its own fitted settings kept)."""
    spec = scenario.costmodel
    cm = dict(spec) if isinstance(spec, dict) and spec.get("kind") == "fitted" else {"kind": "fitted"}
    cm["profile"] = str(profile_path.resolve())
    if basis:
        cm["basis"] = basis
    return scenario.model_copy(update={"costmodel": cm})


def ensure_profile(scenario: Scenario, profile_path: Path, *, reprofile: bool = False, quiet: bool = False,
                   log=None, **profile_kw) -> str | None:
    """Measure a profile where it is missing or stale; why it was measured, or None."""
    from hpipe.costmodels.profile import load_profile
    from hpipe.runtime.profiler import profile, stale_reason

    setup = scenario.model_copy(update={"costmodel": "roofline"}).resolve()
    why = None
    if reprofile:
        why = "asked to (--reprofile)"
    elif not profile_path.exists():
        why = f"no profile at {profile_path}"
    else:
        try:
            why = stale_reason(load_profile(profile_path), setup)
        except InputError as e:
            why = f"unreadable profile: {e}"
    if why is None:
        return None
    if log:
        log(f"profiling {scenario.name} ({why}) ...")
    prof = profile(setup, quiet=quiet, **profile_kw)
    from hpipe.io import write_text

    write_text(profile_path, prof.model_dump_json(indent=1))
    return why


# ---- plans ----------------------------------------------------------------------------------
def random_plan(setup, rng: np.random.Generator, name: str) -> Plan:
    """A random valid plan: 1 to min(devices, 3) pipeline stages on distinct devices, in a random
    order, cut at random unit boundaries; slices a random composition of the sequence in
    multiples of the granularity (1 to 16 slices); 1 to batch micro-batches."""
    devices = list(setup.cluster.device_ids)
    n_units = setup.n_units
    k = int(rng.integers(1, min(len(devices), 3, n_units) + 1))
    order = list(rng.permutation(devices))[:k]
    cuts = sorted(rng.choice(np.arange(1, n_units), size=k - 1, replace=False).tolist()) if k > 1 else []
    bounds = [0, *cuts, n_units]
    stages = [Stage(devices=[str(order[i])], units=(bounds[i], bounds[i + 1])) for i in range(k)]
    g = setup.granularity
    blocks = setup.seq_len // g
    n_slices = int(rng.integers(1, min(16, blocks) + 1))
    cut = sorted(rng.choice(np.arange(1, blocks), size=n_slices - 1, replace=False).tolist()) if n_slices > 1 else []
    edges = [0, *cut, blocks]
    slices = [(b - a) * g for a, b in zip(edges, edges[1:])]
    mb = int(rng.integers(1, setup.batch_size + 1))
    return Plan(planner=name, scenario=setup.name, stages=stages, slices=slices, micro_batches=mb).check(setup)


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class _Job:
    setup: object
    plan: Plan


@dataclass
class CaseOptions:
    planners: tuple[str, ...] = DEFAULT_PLANNERS
    n_random: int = 8
    seed: int = 0
    timeout_s: float = 120.0
    repeats: int = 1
    """Measured runs per case (after the runtime's warm-up run); the fastest is reported: the
    profile predicts an undisturbed machine (CPU time, trimmed means), and other work on a
    shared machine only ever slows a run down (by 30-40% in bursts on a shared 2-core VM)."""
    extra: dict = field(default_factory=dict)


def plans_for(setup, opts: CaseOptions, skipped: list[str]) -> list[Plan]:
    from hpipe.planners import make_plan

    plans = []
    for name in opts.planners:
        if name not in PLANNER_NAMES:
            raise InputError(f"unknown planner {name!r}; one of {', '.join(PLANNER_NAMES)}", field="--planners")
        try:
            plans.append(make_plan(setup, name))
        except InfeasibleError as e:
            skipped.append(f"{setup.name}: {name}: {e}")
        except InputError as e:  # e.g. tensor parallelism the model cannot be split for
            skipped.append(f"{setup.name}: {name}: {e}")
    rng = np.random.default_rng(opts.seed)
    for i in range(opts.n_random):
        plans.append(random_plan(setup, rng, f"random-{i}"))
    return plans


def run_case(setup, plan: Plan, opts: CaseOptions, quiet: bool = True) -> Case:
    from hpipe.runtime import execute
    from hpipe.sim import simulate

    sim = simulate(setup, plan)
    if not sim.feasible:
        raise InfeasibleError(sim.infeasible)
    measured = []
    for _ in range(opts.repeats):
        measured.append(execute(setup, plan, timeout_s=opts.timeout_s, quiet=quiet).latency_s)
    meas = float(min(measured))
    return Case(planner=plan.planner, simulated_latency_s=sim.latency_s, measured_latency_s=meas,
                error=(sim.latency_s - meas) / meas, scenario=setup.name,
                stages=[[st.devices, list(st.units)] for st in plan.stages], slices=list(plan.slices),
                micro_batches=plan.micro_batches, oversubscribed=len(plan.devices) > usable_cpus())


def validate(scenarios: list[Scenario], *, opts: CaseOptions | None = None, profile_paths=None,
             reprofile: bool = False, quiet: bool = False, log=None, on_case=None, profile_kw=None,
             basis: str | None = None) -> Validation:
    """Profile where needed, then simulate and execute every case of every scenario."""
    from hpipe.runtime.emulation import emulation_unsupported

    opts = opts or CaseOptions()
    profile_paths = profile_paths or {}
    cases: list[Case] = []
    skipped: list[str] = []
    profiled: list[str] = []
    used: dict[str, str] = {}
    emulated: dict[str, dict] = {}
    hardware = ""
    for sc in scenarios:
        base = sc.model_copy(update={"costmodel": "roofline"}).resolve()
        why = emulation_unsupported(base)
        if why:
            raise HpipeError(f"cannot validate {sc.name} on this machine: {why}")
        path = Path(profile_paths.get(sc.name) or default_profile_path(sc))
        reason = ensure_profile(sc, path, reprofile=reprofile, quiet=quiet, log=log, **(profile_kw or {}))
        if reason:
            profiled.append(f"{sc.name}: {reason}")
        setup = with_fitted(sc, path, basis).resolve()
        used[sc.name] = str(path)
        hardware = setup.cost.profile.hardware.cpu_model
        emulated[sc.name] = _emulation_summary(setup)
        for plan in plans_for(setup, opts, skipped):
            try:
                case = run_case(setup, plan, opts)
            except InfeasibleError as e:
                skipped.append(f"{sc.name}: {plan.planner}: {e}")
                continue
            cases.append(case)
            if on_case:
                on_case(case)
    med, p90 = summarize_errors(c.error for c in cases)
    return Validation(cases=cases, median_abs_error=med, p90_abs_error=p90, scenarios=[s.name for s in scenarios],
                      profiles=used, profiled=profiled, skipped=skipped, hardware=hardware, emulation=emulated)


def _emulation_summary(setup) -> dict:
    from hpipe.runtime.emulation import needs_network

    out = {}
    quotas = {d.id: d.placement.cpu_quota for d in setup.cluster.devices
              if d.placement is not None and d.placement.cpu_quota}
    if quotas:
        out["cpu_quota"] = quotas
    if needs_network(setup):
        out["shaped_links"] = True
    return out
