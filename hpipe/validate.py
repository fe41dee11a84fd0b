"""`hpipe validate`: does the simulator, fed a fitted profile, predict what the runtime does?

For a scenario that runs on this machine: make sure a profile of it exists
(measure one where it is missing or stale -- another machine, other library
versions, other placements -- into this machine's profile cache, never over
the scenario's own file), plan with several planners and with random valid
plans, keep each distinct plan once (two planners that choose the same plan
are one case), simulate each with the fitted cost model, execute it, and
compare latencies.  The error of a case is (simulated - measured) / measured,
signed (negative: predicted too fast), measured being the fastest of
``--repeats`` runs made in interleaved rounds.  The summary gives the median
and 90th percentile of |error|, the signed bias (mean error), and the same by
plan kind and for the planners' picks apart from the random plans.

Decode cases (``CaseOptions.output_tokens``, ``--output-tokens``; default the
scenario's own ``workload.output_tokens``): the same scenario generating N
tokens per sequence, planned by the planners (whose objective then covers the
decode) and as random plans with random decode micro-batch counts; each is
simulated and executed as a generation and compared end to end (``error``,
the ``decode`` kind) and on TPOT and TTFT (``tpot_error``, ``ttft_error``).
The prefill cases run the scenario without generation, so a plan appears once
as a prefill case and once as a decode case: two runs, two cases.

Nothing here imports torch at module level: the runtime is imported when a
plan is executed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from hpipe.errors import HpipeError, InfeasibleError, InputError, PlannerInputError, WorkerError
from hpipe.memory import raise_if_model_cannot_fit
from hpipe.plan import Plan, Stage
from hpipe.scenario import PLANNER_NAMES, Scenario, parse_scenario

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
    kind: str = "pipeline"
    """decode (generates tokens), tensor-parallel (a stage of several devices), micro-batch (more
    than one), pipeline (several stages) or single-device: the first that applies."""
    n_stages: int = 1
    chosen_by_planner: bool = False
    """A planner's pick (False: a random valid plan)."""
    same_plan_as: list[str] = []
    """Other planners that chose this very plan: it is measured and counted once."""
    measured_runs_s: list[float] = []
    """Every measured run of the case (in ``validate``, the runs of all cases interleaved round
    by round; in ``run_case``, back to back)."""
    compute_error: float | None = None
    """(predicted - measured) / measured of the plan's compute summed over its CPU devices, measured
    in CPU time of the stage threads (divided by a device's cpu_quota, as the fitted model's CPU
    basis does; median over runs): the cost model's own error, which load from other processes
    hardly moves, unlike ``error``."""
    cpu_share: float | None = None
    """Compute CPU time / compute wall time in the fastest run, lowest device: about 1 (or the
    device's cpu_quota) on a quiet machine, lower when other processes took the cores."""
    # ---- decode cases (None in prefill cases) ----
    output_tokens: int = 0
    """New tokens per sequence the case generated (0: a prefill case)."""
    decode_micro_batches: int | None = None
    """Decode groups in flight (``Plan.decode_groups``)."""
    simulated_tpot_s: float | None = None
    measured_tpot_s: float | None = None
    """The fastest measured run's ``tpot_s`` (median time between a sequence's tokens), fastest
    over runs as ``measured_latency_s``."""
    tpot_error: float | None = None
    """(simulated - measured) / measured TPOT."""
    simulated_ttft_s: float | None = None
    measured_ttft_s: float | None = None
    ttft_error: float | None = None
    decode_compute_error: float | None = None
    """As ``compute_error``, for the decode steps alone: the predicted decode compute against the
    CPU time of the stage threads in decode steps (the sampler included): the fitted model's
    decode points, load set aside."""
    run_drifts: list[float] = []
    """Per measured run (the order of ``measured_runs_s``): how much longer (positive) the
    speed probe (``hpipe.runtime.speed``) took just before it, on the plan's cores, than
    while the profile was measured (the mean of the profile's probes before and after);
    empty when there is nothing to compare (``probe_drift``)."""

    other_cpu_cores: list[float] = []
    """Per measured run (the order of ``measured_runs_s``): how many cores other processes on
    this machine kept busy on average during it (``RunResult.other_cpu_cores``); empty where
    a run could not tell."""

    @model_validator(mode="after")
    def _one_drift_per_run(self):
        if self.run_drifts and len(self.run_drifts) != len(self.measured_runs_s):
            raise ValueError(f"run_drifts has {len(self.run_drifts)} values for {len(self.measured_runs_s)} runs")
        return self


class ErrorSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")
    median_abs_error: float | None
    p90_abs_error: float | None
    signed_bias: float | None = None
    """Mean of the signed errors: negative means predicted too fast on average."""
    n: int


class RunSpread(BaseModel):
    """How far one plan's measured runs spread: per case, (slowest - fastest) / fastest of its
    ``runs`` runs; summarized over the cases.  An error much smaller than this cannot be told
    from the machine's noise (the range of N runs grows with N: compare at the same N)."""

    model_config = ConfigDict(extra="forbid")
    median: float
    p90: float
    mean: float
    runs: int
    """Runs per case (the most any case had)."""
    n: int
    """Cases with two runs or more."""

    def line(self) -> str:
        """The summary line the validate command and the benchmark print."""
        return (f"the machine's noise: one plan's {self.runs} runs spread (slowest / fastest - 1) by a median "
                f"{self.median:.1%}, p90 {self.p90:.1%}; an error much smaller cannot be told from it")


class DriftSummary(BaseModel):
    """The runs' ``run_drifts`` summarized: positive values mean the machine did the probe's
    work slower than while it was profiled."""

    model_config = ConfigDict(extra="forbid")
    median: float
    """Median over every run of the cases that have drifts."""
    p90_abs: float
    mean: float
    n: int
    """Runs."""
    cases: int
    """Cases with drifts (the others: no probe to compare, ``probe_drift``)."""
    by_round: list[float]
    """The median of each round's drifts (round r: the r-th run of each case that has one)."""


class Validation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cases: list[Case]
    median_abs_error: float | None
    p90_abs_error: float | None
    signed_bias: float | None = None
    """Mean of the cases' signed ``error``."""
    compute: ErrorSummary | None = None
    """The cases' ``compute_error`` (CPU time): the cost model alone, load set aside."""
    decode_tpot: ErrorSummary | None = None
    """Decode cases: ``tpot_error`` (their end-to-end ``error`` is ``by_kind["decode"]``)."""
    decode_ttft: ErrorSummary | None = None
    decode_compute: ErrorSummary | None = None
    """Decode cases: ``decode_compute_error`` (CPU time of the decode steps)."""
    machine_drift: DriftSummary | None = None
    """Every run's ``run_drifts`` (None: no case had any).  One probe is noisy (on the 2-core
    VM, 2026-12-02: p90 |drift| 9.5% with the probe as it is, and 19% with its first version,
    three of whose 33 probes came out 50-55% slow), so the median over the runs says whether
    the machine moved, not one case's probe."""
    run_spread: RunSpread | None = None
    """The machine's run-to-run noise, beside the errors (None: every case ran once)."""
    by_kind: dict[str, ErrorSummary] = {}
    by_origin: dict[str, ErrorSummary] = {}
    """``planner``: the planners' picks; ``random``: random valid plans.  Apart because a planner
    favours plans whose prediction is optimistic, so its picks are under-predicted most."""
    scenarios: list[str]
    profiles: dict[str, str]
    """Scenario -> the profile its predictions used."""
    profiled: list[str] = []
    """Scenarios whose profile was measured by this run, and why."""
    quick_profiles: list[str] = []
    """Scenarios predicted on a quick profile (a coarse grid: the one a first
    `hpipe execute` measures), whose errors run larger than a full profile's."""
    skipped: list[str] = []
    """Cases that could not run (infeasible plan, a planner without a plan), with the reason."""
    unmeasured_links: dict[str, list[tuple[str, str]]] = {}
    """Per scenario, the device pairs its cases sent over that its profile measured no link
    between (a profile made with --no-links): their transfers were priced on the scenario's figures."""
    failed: list[str] = []
    """Cases whose run failed (a worker died or timed out), with the failure: the other cases
    are still measured and reported, and the command then exits 1."""
    hardware: str = ""
    emulation: dict[str, dict] = {}

    def other_load_line(self) -> str | None:
        """The line on other processes beside the measured runs (None: no run could tell)."""
        xs = [x for c in self.cases for x in c.other_cpu_cores]
        if not xs:
            return None
        return (f"other processes beside the runs: {float(np.median(xs)):.2f} cores busy on average (median over "
                f"{len(xs)} run{'s' if len(xs) != 1 else ''}; p90 {float(np.percentile(xs, 90)):.2f}, most {max(xs):.2f})")

    def drift_line(self) -> str | None:
        """The line the validate command and the benchmark print on the machine's drift since
        the profile: ``machine_drift``'s median, rounds and p90, with how many of the cases had
        a probe to compare; or why there is none."""
        d = self.machine_drift
        if d is None:
            return ("the machine against its profile: not known (no case had a speed probe to compare: a "
                    "profile made before the probe or with another version of it, or devices not on "
                    "this CPU; measuring the profile again gives one)") if self.cases else None
        return (f"the machine against its profile: the speed probe took {abs(d.median):.1%} "
                f"{'longer' if d.median >= 0 else 'less time'} than while profiled (median over {d.n} run{'s' if d.n != 1 else ''} of "
                f"{d.cases} of {len(self.cases)} case{'s' if len(self.cases) != 1 else ''}; by round {', '.join(f'{x:+.1%}' for x in d.by_round)}; "
                f"p90 |drift| {d.p90_abs:.1%})")


def summarize_errors(errors) -> tuple[float | None, float | None]:
    a = np.abs(np.asarray(list(errors), float))
    if not len(a):
        return None, None
    return float(np.median(a)), float(np.percentile(a, 90))


def error_summary(errors) -> ErrorSummary:
    errors = list(errors)
    med, p90 = summarize_errors(errors)
    return ErrorSummary(median_abs_error=med, p90_abs_error=p90,
                        signed_bias=float(np.mean(errors)) if errors else None, n=len(errors))


def run_spread(cases) -> RunSpread | None:
    """``Validation.run_spread`` of the cases measured more than once (None: no such case)."""
    many = [c.measured_runs_s for c in cases if len(c.measured_runs_s) > 1]
    if not many:
        return None
    spreads = [max(r) / min(r) - 1 for r in many]
    return RunSpread(median=float(np.median(spreads)), p90=float(np.percentile(spreads, 90)),
                     mean=float(np.mean(spreads)), runs=max(len(r) for r in many), n=len(many))


def plan_kind(setup, plan: Plan) -> str:
    if setup.output_tokens > 0:
        return "decode"
    if any(len(st.devices) > 1 for st in plan.stages):
        return "tensor-parallel"
    if plan.micro_batches > 1:
        return "micro-batch"
    return "pipeline" if len(plan.stages) > 1 else "single-device"


def plan_key(plan: Plan) -> str:
    """What makes two plans the same run: stages, slices, micro-batches, codecs (not the name)."""
    d = plan.model_dump(exclude={"planner", "predicted"})
    return json.dumps(d, sort_keys=True, default=str)


# ---- the profile a scenario is validated with ----------------------------------------------
def named_profile_path(scenario: Scenario) -> Path | None:
    """The profile the scenario's fitted cost model names, or None (roofline, auto)."""
    spec = scenario.costmodel
    if isinstance(spec, dict) and spec.get("kind") == "fitted" and spec.get("profile"):
        return scenario.resolve_path(spec["profile"])
    return None


def default_profile_path(scenario: Scenario) -> Path:
    """This machine's cached profile of the scenario (``hpipe.costmodels.cache``)."""
    from hpipe.costmodels.cache import cached_profile_path

    return cached_profile_path(scenario.model_copy(update={"costmodel": "roofline"}).resolve())


def with_fitted(scenario: Scenario, profile_path: Path, basis: str | None = None) -> Scenario:
    """The scenario with a fitted cost model on ``profile_path`` (its own fitted settings kept)."""
    spec = scenario.costmodel
    if isinstance(spec, dict) and spec.get("kind") == "fitted":
        cm = dict(spec)
    elif isinstance(spec, dict) and spec.get("kind") == "auto":
        cm = {"kind": "fitted", **spec.get("fitted", {})}
    else:
        cm = {"kind": "fitted"}
    cm["profile"] = str(profile_path.resolve())
    if basis:
        cm["basis"] = basis
    return scenario.model_copy(update={"costmodel": cm})


def profile_staleness(scenario: Scenario, path: Path, *, unreadable_ok: bool = True) -> str | None:
    """Why the profile at ``path`` cannot serve ``scenario`` on this machine, or None.  A file
    that is no profile hpipe reads is a reason (the cache's own file, measured again) where
    ``unreadable_ok``, else bad input (the scenario names it: simulate refuses it too)."""
    from hpipe.costmodels.profile import load_profile
    from hpipe.runtime.profiler import stale_reason

    if not path.exists():
        return f"no profile at {path}"
    setup = scenario.model_copy(update={"costmodel": "roofline"}).resolve()
    if not unreadable_ok:
        return stale_reason(read_named_profile(scenario, path), setup)
    try:
        prof = load_profile(path)
    except InputError as e:
        return f"unreadable profile: {e}"
    return stale_reason(prof, setup)


def read_named_profile(scenario: Scenario, path: Path):
    """The profile ``scenario``'s cost model names; one hpipe cannot read is bad input, blamed
    on the scenario's field (simulate refuses it too)."""
    from hpipe.costmodels.profile import load_profile

    try:
        return load_profile(path)
    except InputError as e:
        raise InputError(str(e), file=scenario.source_path, field="costmodel.profile") from None


def _profile_format(path: Path) -> str:
    """The ``format`` a JSON file names, or "" (not JSON, not an object, no format)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return ""
    return str(data.get("format", "")) if isinstance(data, dict) else ""


def check_profile_target(scenario: Scenario, path: str) -> None:
    """Refuse a ``--profile`` path validate may not write a profile to (before any work): stdout
    (it is read back), or an existing file that is not a profile of this scenario's model
    (a scenario, a text, another model's or another scenario's profile: validate writes over a
    missing file or a stale profile of this scenario only)."""
    from hpipe.costmodels.profile import load_profile, model_mismatch
    from hpipe.io import is_stdout

    if is_stdout(path):
        raise InputError("validate reads the profile back: give a file, not -", field="--profile")
    p = Path(path)
    if not p.exists() or (p.is_file() and p.stat().st_size == 0):  # an empty placeholder (mktemp) is free too
        return
    try:
        prof = load_profile(p)
    except InputError as e:
        if _profile_format(p).startswith("hpipe-profile"):
            return  # a profile of another format (an older hpipe's): stale, measured again
        raise InputError(f"{p} exists and is not a profile hpipe reads ({e.problem}); validate writes a profile "
                         f"only where none is or over a stale one: give another path", field="--profile") from None
    setup = scenario.model_copy(update={"costmodel": "roofline"}).resolve()
    other = model_mismatch(prof, setup.model, prof.dtype)  # another dtype of the same model is only stale
    if other:
        raise InputError(f"{p} is a profile of another model ({other}); validate would write over it: give "
                         f"another path", field="--profile")
    stale = profile_staleness(scenario, p) if prof.scenario != scenario.name else None
    if stale:  # another scenario's, which would be measured over: not this one's to refresh (read, it may serve)
        raise InputError(f"{p} is a profile of scenario {prof.scenario!r}, not {scenario.name!r}, and stale "
                         f"for it ({stale}); validate would write over it: give another path", field="--profile")


def ensure_profile(scenario: Scenario, profile_path: Path | None = None, *, reprofile: bool = False,
                   quiet: bool = False, log=None, **profile_kw) -> tuple[Path, str | None]:
    """The profile to validate ``scenario`` with, measured where missing or stale: (path, why it
    was measured or None).

    ``profile_path`` (``--profile``) is the user's: measured there when needed.  Without it,
    the profile the scenario names serves while it is current; a stale or missing one is
    measured into this machine's profile cache instead, never written over the named file
    (which may be a tracked file from another machine)."""
    if profile_path is not None:
        path = Path(profile_path)
        why = "asked to (--reprofile)" if reprofile else profile_staleness(scenario, path)
    else:
        named = named_profile_path(scenario)
        why_named = profile_staleness(scenario, named, unreadable_ok=False) if named is not None else None
        if named is not None and why_named is None and not reprofile:
            return named, None
        path = default_profile_path(scenario)
        why = "asked to (--reprofile)" if reprofile else profile_staleness(scenario, path)
        if why is not None and named is not None and not reprofile:
            why = f"{named}: {why_named}; measuring into the profile cache"
    if why is None:
        return path, None
    if profile_path is None:  # into the cache: a folder that takes no file fails now, not after the profile
        from hpipe.costmodels.cache import check_cache_writable

        check_cache_writable()
    if log:
        log(f"profiling {scenario.name} ({why}) -> {path}")
    from hpipe.io import write_text
    from hpipe.runtime.profiler import profile

    setup = scenario.model_copy(update={"costmodel": "roofline"}).resolve()
    prof = profile(setup, quiet=quiet, **profile_kw)
    write_text(path, prof.model_dump_json(indent=1))
    return path, why


# ---- plans ----------------------------------------------------------------------------------
def random_plan(setup, rng: np.random.Generator, name: str, decode_rng: np.random.Generator | None = None) -> Plan:
    """A random valid plan: 1 to min(devices, 4) pipeline stages on distinct devices, in a random
    order, cut at random unit boundaries; slices a random composition of the sequence in
    multiples of the granularity (1 to 16 slices); 1 to batch micro-batches."""
    devices = list(setup.cluster.device_ids)
    n_units = setup.n_units
    k = int(rng.integers(1, min(len(devices), 4, n_units) + 1))
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
    # generation: 1 to batch decode groups, from their own generator (``decode_rng``) where given,
    # so that the K-th random plan's prefill part is the same with and without generation
    dmb = int((decode_rng or rng).integers(1, setup.batch_size + 1)) if setup.output_tokens else None
    return Plan(planner=name, scenario=setup.name, stages=stages, slices=slices, micro_batches=mb,
                decode_micro_batches=dmb).check(setup)


def with_output_tokens(scenario: Scenario, n: int) -> Scenario:
    """The scenario generating ``n`` tokens per sequence, validated again (a GPT model's learned
    positions must hold the prompt and the output)."""
    if scenario.workload.output_tokens == n:
        return scenario
    data = scenario.model_dump(exclude_unset=True)
    data.setdefault("workload", {})["output_tokens"] = n
    try:
        return parse_scenario(data, file=scenario.source_path)
    except InputError as e:
        raise InputError(f"{e} (with --output-tokens {n})", field="--output-tokens") from None


def usable_cpus() -> float:
    """Cores' worth of CPU this process can use at once (its affinity, capped by a CFS quota)."""
    from hpipe.runtime.here import usable_capacity_cores

    return usable_capacity_cores()


@dataclass
class CaseOptions:
    planners: tuple[str, ...] = DEFAULT_PLANNERS
    n_random: int = 8
    seed: int = 0
    timeout_s: float = 120.0
    output_tokens: int | None = None
    """Decode cases at this many new tokens per sequence (None: the scenario's own
    ``workload.output_tokens``; 0: none)."""
    decode_random: int | None = None
    """Random valid plans among the decode cases (None: ``n_random``)."""
    prefill: bool = True
    """Run the prefill cases (the scenario with no generation)."""
    repeats: int = 1
    """Measured runs per case (after the runtime's warm-up run); the fastest is reported: the
    profile predicts an undisturbed machine (CPU time, trimmed means), and other work on a
    shared machine only ever slows a run down (by 30-40% in bursts on a shared 2-core VM)."""
    extra: dict = field(default_factory=dict)


def case_variants(sc: Scenario, opts: CaseOptions) -> list[tuple[Scenario, int]]:
    """(scenario, random plans) of each kind of case validate runs for ``sc``: the prefill cases
    without generation, the decode cases with it."""
    n_out = sc.workload.output_tokens if opts.output_tokens is None else opts.output_tokens
    return ([(with_output_tokens(sc, 0), opts.n_random)] if opts.prefill else []) + \
        ([(with_output_tokens(sc, n_out), opts.n_random if opts.decode_random is None else opts.decode_random)]
         if n_out else [])


def variant_label(setup) -> str:
    """How skip and failure lines name a scenario's prefill or decode cases."""
    return f"{setup.name}{' (decode)' if setup.output_tokens else ''}"


def plans_for(setup, opts: CaseOptions, skipped: list[str], n_random: int | None = None) -> list[Plan]:
    """The planners' plans and ``n_random`` random ones (default ``opts.n_random``); in a
    generating setup every plan names its decode groups (a default spelled out), so two plans
    that decode alike deduplicate."""
    from hpipe.planners import make_plan

    n_random = opts.n_random if n_random is None else n_random
    plans = []
    what = variant_label(setup)
    for name in opts.planners:
        if name not in PLANNER_NAMES:
            raise InputError(f"unknown planner {name!r}; one of {', '.join(PLANNER_NAMES)}", field="--planners")
        try:
            plans.append(make_plan(setup, name))
        except (InfeasibleError, PlannerInputError) as e:  # the latter: a sequence too finely cut for the DP
            why = str(e)  # the planners' own messages mostly start with their name
            skipped.append(f"{what}: {why}" if why.startswith(f"{name}: ") else f"{what}: {name}: {why}")
    rng, decode_rng = np.random.default_rng(opts.seed), np.random.default_rng([opts.seed, 1])
    for i in range(n_random):
        plans.append(random_plan(setup, rng, f"random-{i}", decode_rng))
    if setup.output_tokens:
        plans = [p.model_copy(update={"decode_micro_batches": p.decode_groups(setup.batch_size)}) for p in plans]
    return plans


def dedup(plans: list[Plan]) -> list[tuple[Plan, list[str]]]:
    """Each distinct plan once, with the names of the other planners that chose it."""
    seen: dict[str, tuple[Plan, list[str]]] = {}
    for p in plans:
        k = plan_key(p)
        if k in seen:
            seen[k][1].append(p.planner)
        else:
            seen[k] = (p, [])
    return list(seen.values())


def make_case(setup, plan: Plan, same_as: list[str], sim, runs: list, drifts=None) -> Case:
    """The case of ``plan`` from its simulated RunResult and its measured RunResults
    (``drifts``: each run's ``run_drifts``, if known)."""
    runs_s = [r.latency_s for r in runs]
    meas = float(min(runs_s))
    simulated_s = sim.latency_s
    compute_error = cpu_share = None
    cpu_runs = [r.compute_cpu_s for r in runs if r.compute_cpu_s]
    fastest = min(runs, key=lambda r: r.latency_s)
    if (cpu_runs and all(set(c) == set(plan.devices) for c in cpu_runs)
            and fastest.compute_cpu_s and set(fastest.compute_cpu_s) == set(plan.devices)):
        predicted = sum(e.end_s - e.start_s for e in sim.events if e.kind == "compute")
        # as the fitted model's CPU basis does: a device held to a quota q runs 1/q as long as it computes
        slow = {d: 1.0 / min(float(getattr(setup.cluster.device(d).placement, "cpu_quota", None) or 1.0), 1.0)
                for d in plan.devices}
        measured_cpu = float(np.median([sum(t * slow[d] for d, t in c.items()) for c in cpu_runs]))
        compute_error = (predicted - measured_cpu) / measured_cpu
        wall: dict[str, float] = {}
        for e in fastest.events:
            if e.kind == "compute":
                wall[e.device] = wall.get(e.device, 0.0) + e.end_s - e.start_s
        shares = [fastest.compute_cpu_s[d] / wall[d] for d in wall if wall[d] > 0 and d in fastest.compute_cpu_s]
        cpu_share = min(shares) if shares else None
    case = Case(compute_error=compute_error, cpu_share=cpu_share, planner=plan.planner, simulated_latency_s=simulated_s, measured_latency_s=meas,
                error=(simulated_s - meas) / meas, scenario=setup.name,
                stages=[[st.devices, list(st.units)] for st in plan.stages], slices=list(plan.slices),
                micro_batches=plan.micro_batches, oversubscribed=len(plan.devices) > usable_cpus(),
                kind=plan_kind(setup, plan), n_stages=len(plan.stages),
                chosen_by_planner=not plan.planner.startswith("random-"), same_plan_as=same_as,
                measured_runs_s=list(runs_s),
                # one per run (checked by Case), or none where a run had nothing to compare
                run_drifts=list(drifts) if drifts is not None and None not in drifts else [],
                other_cpu_cores=[r.other_cpu_cores for r in runs] if all(r.other_cpu_cores is not None for r in runs)
                else [])
    if setup.output_tokens:
        case = case.model_copy(update=decode_fields(setup, plan, sim, runs))
    return case


def _rel(simulated, measured) -> float | None:
    if simulated is None or not measured:
        return None
    return (simulated - measured) / measured


def decode_fields(setup, plan: Plan, sim, runs: list) -> dict:
    """A decode case's TPOT, TTFT and decode-compute figures: simulated against the fastest
    measured (load only ever slows a run down; each figure's fastest run, as for latency)."""
    tpots = [r.tpot_s for r in runs if r.tpot_s is not None]
    ttfts = [r.ttft_s for r in runs if r.ttft_s is not None]
    out = {"output_tokens": setup.output_tokens, "decode_micro_batches": plan.decode_groups(setup.batch_size),
           "simulated_tpot_s": sim.tpot_s, "measured_tpot_s": min(tpots) if tpots else None,
           "simulated_ttft_s": sim.ttft_s, "measured_ttft_s": min(ttfts) if ttfts else None}
    out["tpot_error"] = _rel(out["simulated_tpot_s"], out["measured_tpot_s"])
    out["ttft_error"] = _rel(out["simulated_ttft_s"], out["measured_ttft_s"])
    cpu_runs = [r.decode_compute_cpu_s for r in runs if r.decode_compute_cpu_s]
    if cpu_runs and set(cpu_runs[0]) == set(plan.devices):
        predicted = sum(e.end_s - e.start_s for e in sim.events if e.kind == "compute" and e.phase == "decode")
        slow = {d: 1.0 / min(float(getattr(setup.cluster.device(d).placement, "cpu_quota", None) or 1.0), 1.0)
                for d in plan.devices}
        measured = float(np.median([sum(t * slow[d] for d, t in c.items()) for c in cpu_runs]))
        out["decode_compute_error"] = _rel(predicted, measured)
    return out


def run_case(setup, plan: Plan, opts: CaseOptions, quiet: bool = True) -> Case:
    """One case on its own: simulate, then ``opts.repeats`` measured runs back to back."""
    from hpipe.runtime import execute
    from hpipe.sim import simulate

    sim = simulate(setup, plan)
    if not sim.feasible:
        raise InfeasibleError(sim.infeasible)
    runs, drifts = [], []
    for _ in range(opts.repeats):
        drifts.append(probe_drift(setup, plan))
        runs.append(execute(setup, plan, timeout_s=opts.timeout_s, quiet=quiet))
    return make_case(setup, plan, [], sim, runs, drifts)


def validate(scenarios: list[Scenario], *, opts: CaseOptions | None = None, profile_paths=None,
             reprofile: bool = False, quiet: bool = False, log=None, on_case=None, profile_kw=None,
             basis: str | None = None) -> Validation:
    """Profile where needed, then simulate and execute every distinct case of every scenario.

    With ``opts.repeats`` > 1 the cases run in rounds -- every case once, then every case
    again -- so a burst of load from other processes spreads over many cases instead of
    spoiling all runs of one; each case keeps its fastest run (the profile's CPU-time basis
    predicts an undisturbed machine, and load only ever slows a run down)."""
    from hpipe.runtime import execute
    from hpipe.runtime.emulation import emulation_unsupported
    from hpipe.sim import simulate

    opts = opts or CaseOptions()
    profile_paths = profile_paths or {}
    skipped: list[str] = []
    profiled: list[str] = []
    quick: list[str] = []
    used: dict[str, str] = {}
    emulated: dict[str, dict] = {}
    hardware = ""
    jobs = []  # (setup, plan, same_as, simulated_s)
    unmeasured: dict[str, list] = {}
    from hpipe.runtime.here import check_placements

    bases = [sc.model_copy(update={"costmodel": "roofline"}).resolve() for sc in scenarios]
    all_variants = [case_variants(sc, opts) for sc in scenarios]
    if not any(opts.planners or n for vs in all_variants for _, n in vs):
        raise InputError("no case to validate: no planner, and no random plan where there are cases "
                         "(give --random N, --decode-random N or a planner)", field="--planners")
    for sc, base, variants in zip(scenarios, bases, all_variants):  # before any is profiled or run: every
        # scenario's devices, its memory for the workloads it will run (--output-tokens, --no-prefill),
        # and a named profile that cannot be read
        check_placements(base, base.cluster.device_ids, who="validation profiles and runs every device; the scenario has")
        from hpipe.runtime.launcher import placements

        placements(base, base.cluster.device_ids)  # each one there is here (a CUDA index, its cores)
        for variant, _ in variants:
            raise_if_model_cannot_fit(variant.model_copy(update={"costmodel": "roofline"}).resolve())
        named = named_profile_path(sc)
        if named is not None and named.exists() and profile_paths.get(sc.name) is None:
            read_named_profile(sc, named)
    for sc, base, variants in zip(scenarios, bases, all_variants):
        why = emulation_unsupported(base)
        if why:
            raise HpipeError(f"cannot validate {sc.name} on this machine: {why}")
        asked = profile_paths.get(sc.name)
        sent: set[tuple[str, str]] = set()  # this scenario's cases' transfers (another may share device names)
        # one profile serves both: measured with the decode points where there are decode cases
        path, reason = ensure_profile(variants[-1][0] if variants else sc, Path(asked) if asked else None,
                                      reprofile=reprofile, quiet=quiet, log=log, **(profile_kw or {}))
        if reason:
            profiled.append(f"{sc.name}: {reason} (wrote {path})")
        used[sc.name] = str(path)
        for variant, n_random in variants:
            setup = with_fitted(variant, path, basis).resolve()
            hardware = setup.cost.profile.hardware.cpu_model
            if setup.cost.profile.settings.grid == "quick" and sc.name not in quick:
                quick.append(sc.name)
            emulated[sc.name] = _emulation_summary(setup)
            for plan, same_as in dedup(plans_for(setup, opts, skipped, n_random)):
                sim = simulate(setup, plan)
                if not sim.feasible:
                    skipped.append(f"{variant_label(setup)}: {plan.planner}: {sim.infeasible}")
                    continue
                jobs.append((setup, plan, same_as, sim))
                sent.update((e.device, e.dst) for e in sim.events if e.kind == "transfer")
            # the pairs the cases sent over, of those the cost model priced without a measured link
            # (the planners ask about many more pairs than their plans use)
            for pair in setup.cost.unmeasured_links:
                if pair in sent and pair not in unmeasured.setdefault(sc.name, []):
                    unmeasured[sc.name].append(pair)
    runs: list[list] = [[] for _ in jobs]
    drifts: list[list] = [[] for _ in jobs]
    failed: dict[int, str] = {}
    for rnd in range(opts.repeats):
        for k, (setup, plan, same_as, _) in enumerate(jobs):
            if k in failed:
                continue
            drifts[k].append(probe_drift(setup, plan))  # just before the run (no worker is running)
            try:
                runs[k].append(execute(setup, plan, timeout_s=opts.timeout_s, quiet=True))
            except WorkerError as e:  # one hung or dead run: the others are still worth their minutes
                failed[k] = f"{variant_label(setup)}: {plan.planner}" + \
                    "".join(f" = {o}" for o in same_as) + (f" (round {rnd + 1})" if opts.repeats > 1 else "") + f": {e}"
            if on_case and rnd == opts.repeats - 1:
                on_case(k)
    cases = [make_case(setup, plan, same_as, sim, rs, ds)
             for k, ((setup, plan, same_as, sim), rs, ds) in enumerate(zip(jobs, runs, drifts)) if k not in failed]
    med, p90 = summarize_errors(c.error for c in cases)
    kinds = sorted({c.kind for c in cases})
    by_kind = {k: error_summary(c.error for c in cases if c.kind == k) for k in kinds}
    by_origin = {"planner": error_summary(c.error for c in cases if c.chosen_by_planner),
                 "random": error_summary(c.error for c in cases if not c.chosen_by_planner)}
    decode = [c for c in cases if c.output_tokens]
    return Validation(cases=cases, median_abs_error=med, p90_abs_error=p90,
                      signed_bias=float(np.mean([c.error for c in cases])) if cases else None,
                      by_kind=by_kind, by_origin=by_origin,
                      compute=error_summary(c.compute_error for c in cases if c.compute_error is not None),
                      decode_tpot=error_summary(c.tpot_error for c in decode if c.tpot_error is not None)
                      if decode else None,
                      decode_ttft=error_summary(c.ttft_error for c in decode if c.ttft_error is not None)
                      if decode else None,
                      decode_compute=error_summary(c.decode_compute_error for c in decode
                                                   if c.decode_compute_error is not None) if decode else None,
                      run_spread=run_spread(cases),
                      machine_drift=drift_summary(cases),
                      scenarios=[s.name for s in scenarios],
                      profiles=used, profiled=profiled, quick_profiles=quick, skipped=skipped,
                      failed=list(failed.values()), unmeasured_links=unmeasured, hardware=hardware,
                      emulation=emulated)


def probe_drift(setup, plan: Plan) -> float | None:
    """How much longer (positive) the speed probe takes now on the plan's cores than while the
    profile ``setup`` is priced from was measured (``hpipe.runtime.speed``); None, and no probe
    run, when there is nothing to compare: the setup is not priced from a profile with a probe
    of this version, or a device of the plan is not a CPU."""
    from hpipe.runtime import speed

    profile = getattr(getattr(setup, "cost", None), "profile", None)
    ref = getattr(profile, "speed_probe", None)
    cores = speed.cpu_device_cores(setup, plan.devices)
    if ref is None or ref.version != speed.PROBE_VERSION or cores is None:
        return None
    return speed.drift(speed.probe_by_core(cores), ref.by_core())


def drift_summary(cases) -> DriftSummary | None:
    """``Validation.machine_drift`` of the cases (None: no case has drifts)."""
    with_drift = [c.run_drifts for c in cases if c.run_drifts]
    if not with_drift:
        return None
    xs = np.array([x for d in with_drift for x in d])
    rounds = max(len(d) for d in with_drift)
    return DriftSummary(median=float(np.median(xs)), p90_abs=float(np.percentile(np.abs(xs), 90)),
                        mean=float(np.mean(xs)), n=len(xs), cases=len(with_drift),
                        by_round=[float(np.median([d[r] for d in with_drift if len(d) > r])) for r in range(rounds)])


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
