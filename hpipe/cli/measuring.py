"""`hpipe profile` and `hpipe validate`: this machine measured, and the simulator checked
against real runs of the same plans."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from hpipe.cli.common import (
    app, _check_outputs, _check_timeout, err_console, JsonOpt, _load_scenario, _needs_torch,
    _OnceCommand, _out_console, _planner_names, QuietOpt, _say_written, SetOpt)
from hpipe.errors import HpipeError, InfeasibleError, InputError
from hpipe.io import is_stdout


# ---- profile and validate -------------------------------------------------------
def _scenario_for_profiling(scenario: Path, sets: list[str] | None = None):
    """The scenario, with a cost model that needs no profile (the one being measured may not exist)."""
    sc = _load_scenario(scenario, sets)
    sc.check_costmodel()  # not used while measuring, but a typo in it is still the user's to hear
    return sc, sc.model_copy(update={"costmodel": "roofline"}).resolve()


@app.command(cls=_OnceCommand)
def profile(scenario: Annotated[Path, typer.Argument(help="scenario YAML whose devices and links to measure", metavar="SCENARIO")],
            output: Annotated[Optional[str], typer.Option("-o", "--output", help="profile JSON to write, - for stdout (default: this machine's profile cache, $HPIPE_CACHE_DIR or ~/.cache/hpipe/profiles, where costmodel: auto finds it)", metavar="PATH")] = None,
            repeats: Annotated[int, typer.Option(min=1, help="timed sweeps of the grid", metavar="N")] = 5,
            warmup: Annotated[int, typer.Option(min=0, help="untimed sweeps first", metavar="N")] = 2,
            quick: Annotated[bool, typer.Option(help="a coarse grid (for tests and a first look)")] = False,
            links: Annotated[bool, typer.Option(help="also measure the links between the device processes")] = True,
            alone: Annotated[bool, typer.Option(help="also time each CPU device's units while the others idle (co-location interference; one sweep per device, in turn)")] = True,
            quiet: QuietOpt = False,
            sets: SetOpt = None):
    """Measure each unit kind's time over a grid of (slice, context, batch) and the links between
    stage processes, on the devices the scenario names; write the profile the fitted cost model reads."""
    from hpipe.costmodels.fitted import FittedConfig, alone_ratios, fit_report, summarize_holdout
    from hpipe.io import write_text
    from hpipe.tables import holdout_table, links_table
    from hpipe.validate import default_profile_path

    _check_outputs({"--output": output}, {"the scenario file": scenario}, profiles=("--output",))
    with _needs_torch("profile"):
        from hpipe.runtime.profiler import profile as run_profile
    sc, setup = _scenario_for_profiling(scenario, sets)
    if output is None:  # the cache: a folder that takes no file fails now, not after the measurement
        from hpipe.costmodels.cache import check_cache_writable

        check_cache_writable()
    out = output or str(default_profile_path(sc))
    prof = run_profile(setup, repeats=repeats, warmup=warmup, quick=quick, measure_links=links, quiet=quiet,
                       time_alone=alone)
    write_text(out, prof.model_dump_json(indent=1), make_parents=output is None)
    con = _out_console(output, quiet)  # -o -: the JSON alone on stdout, the tables on stderr
    if con:
        basis = FittedConfig.model_fields["basis"].default  # what predictions are made on
        report = fit_report(prof, basis)
        # a unit with too few points to hold any out (a quick grid) reports its in-sample error
        rows = [e for kinds in report.values() for e in kinds.values()]
        held = ("in-sample: too few points to hold any out" if all(e["n_holdout"] == 0 for e in rows) else
                "on held-out grid points (in-sample where none is held out)" if any(e["n_holdout"] == 0 for e in rows)
                else "on held-out grid points")
        con.print(holdout_table(report, f"{setup.name}: fitted model ({basis} time), error {held}"))
        if prof.links:
            con.print(links_table(prof))
        h = prof.holdout
        wall = summarize_holdout(fit_report(prof, "wall"))
        con.print(f"{'hold-out' if any(e['n_holdout'] for e in rows) else 'in-sample'} error on {basis} time "
                  f"(worst device and unit): median {h['worst_median_rel_error']:.1%}, "
                  f"p90 {h['worst_p90_rel_error']:.1%} (on wall time: median {wall['worst_median_rel_error']:.1%}, "
                  f"p90 {wall['worst_p90_rel_error']:.1%}); cpu share per device: "
                  + ", ".join(f"{d.device} {d.cpu_share:.0%}" for d in prof.devices if d.cpu_share is not None))
        alone = alone_ratios(prof, basis)
        if alone:
            con.print("co-location: units timed alone take " + ", ".join(f"{r:.0%} on {d}" for d, r in alone.items())
                      + " of their time beside busy neighbours (median over the grid); the simulator prices "
                      "each item by how many of its device's neighbours compute meanwhile")
        if prof.step_hops:
            waits = ", ".join(f"{d.after_wait.ratio:.0%} on {d.device}" for d in prof.devices if d.after_wait)
            hops = ", ".join(f"{' <-> '.join(sh.between)} {sh.two_hops_s / 2 * 1e3:.2f} ms" for sh in prof.step_hops)
            con.print(f"decode step loop (probe): a message to a waiting stage takes {hops} one way (median); "
                      f"a decode step after a wait takes {waits} of its back-to-back CPU time")
        for d in prof.devices:
            quota = d.placement.get("cpu_quota")
            expect = min(1.0, float(quota)) if quota else 1.0
            if d.cpu_share is not None and d.cpu_share < 0.8 * expect:
                con.print(f"[yellow]note:[/] {escape(d.device)} had a CPU for {d.cpu_share:.0%} of its wall time "
                          f"(expected about {expect:.0%}): other processes competed for the cores; the fitted "
                          f"model uses CPU time, but measured runs will be slower until the machine is quiet")
    if not is_stdout(out):  # said even with --quiet: where the profile went
        err_console.print(f"wrote {escape(out)}", highlight=False, soft_wrap=True)


@app.command(cls=_OnceCommand)
def validate(scenarios: Annotated[list[Path], typer.Argument(help="scenario YAML(s) that run on this machine", metavar="SCENARIO")],
             json_path: JsonOpt = None,
             planners: Annotated[str, typer.Option("--planners", "--planner", help="comma list of planners to validate (--planner is the same)", metavar="A,B,...", show_default="the seven of the paper")] = ",".join(
                 ("hpipe", "base", "gpipe", "gpipe-balanced", "terapipe", "megatron", "tp-terapipe")),
             random_plans: Annotated[int, typer.Option("--random", min=0, help="random valid plans per scenario", metavar="N")] = 8,
             seed: Annotated[Optional[int], typer.Option(help="seed of the random plans", metavar="N", show_default="0")] = None,
             profile_path: Annotated[Optional[str], typer.Option("--profile", help="profile to use or write (one scenario); default: the scenario's fitted profile while it is current, else this machine's profile cache (measured there when missing)", metavar="PATH")] = None,
             reprofile: Annotated[bool, typer.Option(help="measure the profile again even if it is current")] = False,
             repeats: Annotated[int, typer.Option(min=1, help="measured runs per case, in interleaved rounds over all cases (the fastest is compared)", metavar="N")] = 1,
             output_tokens: Annotated[Optional[int], typer.Option("--output-tokens", min=0, help="decode cases: generate N tokens per sequence and compare TPOT, TTFT and end-to-end latency (0: none)", metavar="N", show_default="the scenario's workload.output_tokens")] = None,
             decode_random: Annotated[Optional[int], typer.Option("--decode-random", min=0, help="random valid plans among the decode cases", metavar="N", show_default="--random")] = None,
             prefill: Annotated[bool, typer.Option(help="run the prefill cases (the scenario without generation)")] = True,
             timeout: Annotated[float, typer.Option(help="seconds a worker may wait on a peer", metavar="S")] = 120.0,
             basis: Annotated[Optional[str], typer.Option(help="fit on 'cpu' time (the calling thread's CPU time, scaled by the device's cpu_quota) or 'wall' time (default: the scenario's fitted basis, else cpu)", metavar="cpu|wall")] = None,
             quiet: QuietOpt = False,
             sets: SetOpt = None):
    """Profile where needed, then simulate (fitted cost model) and execute the same plans; the error of each."""
    from hpipe.io import write_text
    from hpipe.progress import progress
    from hpipe.validate import CaseOptions, validate as run_validate

    # --profile is read when current and written when not: an output as much as an input
    _check_outputs({"--json": json_path, "--profile": profile_path},
                   {f"the scenario file {s}": s for s in scenarios}, profiles=("--profile",))
    for s in scenarios:  # the profile a scenario's cost model reads is --profile's to refresh, not --json's
        _check_outputs({"--json": json_path}, _load_scenario(s, sets).files_read())
    with _needs_torch("validate"):
        import hpipe.runtime  # noqa: F401
    if basis not in (None, "wall", "cpu"):
        raise InputError(f"must be wall or cpu, got {basis!r}", field="--basis")
    names = _planner_names(planners, field="--planners", allow_none=True)
    scs = [_load_scenario(p, sets) for p in scenarios]
    for path, sc in zip(scenarios, scs):  # validate predicts on a fitted model of its own; the scenario's
        sc.check_costmodel()                # must still be valid, and one it does not check is said
        kind = sc.costmodel_kind
        if kind not in ("fitted", "auto"):
            err_console.print(f"note: {path} prices on the {kind} cost model; validate checks the fitted model "
                              f"on a profile of this machine instead (the scenario's {kind} is not what it "
                              f"validates)", markup=False, highlight=False, soft_wrap=True)
    if profile_path and len(scs) > 1:
        raise InputError("--profile names one profile; give one scenario with it", field="--profile")
    _check_timeout(timeout)
    seen: dict[str, Path] = {}
    for path, sc in zip(scenarios, scs):  # the Validation's profiles and notes are keyed by name
        if sc.name in seen:
            raise InputError(f"{seen[sc.name]} has the same name {sc.name!r}: give each scenario its own name",
                             file=str(path), field="name")
        seen[sc.name] = path
    if profile_path:
        from hpipe.validate import check_profile_target

        check_profile_target(scs[0], profile_path)
    opts = CaseOptions(planners=tuple(names), n_random=random_plans, seed=seed or 0, timeout_s=timeout,
                       repeats=repeats, output_tokens=output_tokens, decode_random=decode_random, prefill=prefill)
    decode = any((output_tokens if output_tokens is not None else sc.workload.output_tokens) for sc in scs)
    if not prefill and not decode:
        raise InputError("--no-prefill leaves no case: no decode cases either (give --output-tokens N)",
                         field="--no-prefill")
    # options that would change nothing are refused, not ignored
    if decode_random is not None and not decode:
        raise InputError(f"--decode-random {decode_random}: there are no decode cases (the scenario generates "
                         f"no tokens; give --output-tokens N)", field="--decode-random")
    drawn = (random_plans if prefill else 0) + ((random_plans if decode_random is None else decode_random)
                                                if decode else 0)
    if seed is not None and not drawn:
        raise InputError(f"--seed {seed}: no random plan is drawn (--random {random_plans}"
                         + (f", --decode-random {decode_random}" if decode else "") + ")", field="--seed")
    con = _out_console(json_path, quiet)
    log = (lambda msg: err_console.print(msg, markup=False, highlight=False)) if not quiet else None
    with progress(quiet) as bar:
        task = bar.add_task("validating", total=None)
        result = run_validate(scs, opts=opts, profile_paths={scs[0].name: profile_path} if profile_path else None,
                              reprofile=reprofile, quiet=quiet, log=log, on_case=lambda c: bar.advance(task),
                              basis=basis)
    if quiet:  # said even then, as `hpipe profile` says it: a file was written
        for line in result.profiled:
            err_console.print(f"profiled {line}", markup=False, highlight=False, soft_wrap=True)
    if json_path:
        write_text(json_path, result.model_dump_json(indent=2), make_parents=False)
    if con:
        from hpipe.tables import validation_table

        con.print(validation_table(result))
        if result.median_abs_error is not None:
            con.print(f"{len(result.cases)} distinct case{'s' if len(result.cases) != 1 else ''}: median |error| {result.median_abs_error:.1%}, "
                      f"p90 |error| {result.p90_abs_error:.1%}, signed bias {result.signed_bias:+.1%}")
            if result.compute is not None and result.compute.n:
                shares = [c.cpu_share for c in result.cases if c.cpu_share is not None]
                con.print(f"  compute alone, in CPU time (load set aside): median |error| "
                          f"{result.compute.median_abs_error:.1%}, bias {result.compute.signed_bias:+.1%}"
                          + (f"; CPU share of the stage threads in the fastest runs {min(shares):.0%}-{max(shares):.0%}"
                             if shares else ""))
            for label, groups in (("kind", result.by_kind), ("origin", result.by_origin)):
                for k, e in groups.items():
                    if e.n:
                        con.print(f"  {label} {k}: n {e.n}, median |error| {e.median_abs_error:.1%}, "
                                  f"p90 {e.p90_abs_error:.1%}, bias {e.signed_bias:+.1%}")
            for label, e in (("decode TPOT", result.decode_tpot), ("decode TTFT", result.decode_ttft),
                             ("decode compute alone, in CPU time", result.decode_compute)):
                if e is not None and e.n:
                    con.print(f"  {label}: n {e.n}, median |error| {e.median_abs_error:.1%}, "
                              f"p90 {e.p90_abs_error:.1%}, bias {e.signed_bias:+.1%}")
            if result.run_spread is not None:
                con.print(f"  {result.run_spread.line()}")
            for line in (result.drift_line(), result.other_load_line()):
                if line:
                    con.print(f"  {line}")
        if any(c.oversubscribed for c in result.cases):
            con.print("* more worker processes than CPUs: those timings share cores")
        for name in result.quick_profiles:
            con.print(f"[yellow]note:[/] {escape(name)} was predicted on a quick profile ({escape(result.profiles[name])}: "
                      f"a coarse grid), so its errors run larger than a full one's; --reprofile "
                      f"measures a full one", highlight=False, soft_wrap=True)
        for name, pairs in result.unmeasured_links.items():
            con.print(f"[yellow]note:[/] {escape(name)}'s profile ({escape(result.profiles[name])}) measured no link "
                      f"between {escape(', '.join(f'{a} -> {b}' for a, b in pairs))}: those transfers were predicted "
                      f"on the scenario's link figures (a profile made without --no-links measures them)",
                      highlight=False, soft_wrap=True)
        for s in result.skipped:
            con.print(f"skipped {escape(s)}", highlight=False)
        for s in result.failed:
            con.print(f"[red]failed[/] {escape(s)}", highlight=False)
        _say_written(con, {"Validation JSON": json_path})  # as simulate and sweep say it
    if result.failed:
        raise HpipeError(f"{len(result.failed)} case{'s' if len(result.failed) > 1 else ''} failed to run"
                         + (" (the others are reported above)" if result.cases and con else "")
                         + f": {result.failed[0]}")
    if not result.cases:  # every plan infeasible (or no planner had one): what would not fit, exit 3
        raise InfeasibleError("no case could run: " + "; ".join(result.skipped[:3]))


