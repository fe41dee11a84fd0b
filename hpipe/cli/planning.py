"""`hpipe devices`, `models`, `plan`, `simulate` and `sweep`: the catalogs, planning and
prediction.  They need no torch (only costmodel auto's first profile, measured by
``common._load_setup``, does)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from hpipe.cli.common import (
    app, _check_outputs, _checked_plan, _chosen_planners, _costmodel_name, err_console, _GLOBAL_SETS,
    JsonOpt, _load_scenario, _load_setup, _no_global_sets, _OnceCommand, _out_console, _plan_given,
    _planner_names, QuietOpt, _reads, _say_written, SetOpt, _write_outputs)
from hpipe import notes
from hpipe.errors import HpipeError, InfeasibleError, InputError
from hpipe.tables import console


# ---- catalogs --------------------------------------------------------------
def _catalog(command: str, what: str, rows: list[dict], table, json_path: str | None, quiet: bool) -> None:
    """``rows`` as JSON to ``json_path``; ``table`` (made only when shown) to the console."""
    from hpipe.io import write_text

    _no_global_sets(command)
    _check_outputs({"--json": json_path})
    if json_path:
        write_text(json_path, json.dumps(rows, indent=2), make_parents=False)
    con = _out_console(json_path, quiet)
    if con:
        con.print(table())
        _say_written(con, {f"{what} JSON": json_path})


@app.command(cls=_OnceCommand)
def devices(json_path: JsonOpt = None, quiet: QuietOpt = False):
    """The device catalog (datasheet figures)."""
    from hpipe.devices import DEVICES
    from hpipe.tables import devices_table

    _catalog("devices", "device catalog", [d.model_dump() for d in DEVICES.values()],
             lambda: devices_table(DEVICES.values()), json_path, quiet)


@app.command(cls=_OnceCommand)
def models(json_path: JsonOpt = None, quiet: QuietOpt = False):
    """The model catalog."""
    from hpipe.models import MODELS
    from hpipe.tables import models_table

    _catalog("models", "model catalog",
             [{**m.to_dict(), "params": m.param_count(), "n_units": m.n_units} for m in MODELS.values()],
             lambda: models_table(MODELS.values()), json_path, quiet)


# ---- plan ------------------------------------------------------------------
@app.command(cls=_OnceCommand)
def plan(scenario: Annotated[Path, typer.Argument(help="scenario YAML", metavar="SCENARIO")],
         planner: Annotated[Optional[str], typer.Option(help="planner (default: the scenario's)", metavar="NAME")] = None,
         output: Annotated[Optional[str], typer.Option("-o", "--output", help="write the Plan JSON here ('-': stdout, the table then on stderr)", metavar="PATH|-")] = None,
         quiet: QuietOpt = False,
         sets: SetOpt = None):
    """Plan alone: per stage its devices, layers, time per work item and memory; -o writes the Plan JSON."""
    from hpipe.io import write_text
    from hpipe.planners import make_plan
    from hpipe.progress import progress

    from hpipe.progress import enabled

    _check_outputs({"--output": output}, _reads(scenario, sets))
    if planner is not None:  # a typo says so before the cost model's note (or its profile)
        _planner_names(planner)
    setup = _load_setup(scenario, sets, quiet=quiet, make_profile=enabled(quiet))
    notes.say(notes.uncovered(setup))
    notes.past_context(setup)  # a warning: said with --quiet too
    name = _chosen_planners(planner, setup.scenario)
    if len(name) != 1:
        raise InputError("plan takes one planner", field="--planner")
    notes.unused_planner_settings(setup, name)
    with progress(quiet) as bar:
        bar.add_task(f"planning {name[0]}", total=None)
        p = make_plan(setup, name[0])
    if output:  # the file says which cost model its figures are from (auto's choice can change between runs)
        on = p.model_copy(update={"predicted": {**p.predicted, "cost_model": setup.cost.describe()}})
        write_text(output, on.model_dump_json(indent=2), make_parents=False)
    con = _out_console(output, quiet)
    if con:
        from hpipe.tables import plan_table

        con.print(plan_table(setup, p))
        _say_written(con, {"Plan JSON": output})


# ---- simulate --------------------------------------------------------------
@app.command(cls=_OnceCommand)
def simulate(scenario: Annotated[Path, typer.Argument(help="scenario YAML", metavar="SCENARIO")],
             planner: Annotated[Optional[str], typer.Option(help="a planner, a comma list, or all (default: the scenario's)", metavar="NAME|A,B|all")] = None,
             plan: Annotated[Optional[Path], typer.Option("--plan", help="simulate the Plan(s) in this JSON file instead", metavar="PLANS.json")] = None,
             json_path: JsonOpt = None,
             trace: Annotated[Optional[str], typer.Option(help="Chrome trace (Perfetto) of the timelines (-: stdout)", metavar="PATH")] = None,
             plot: Annotated[Optional[str], typer.Option(help="Gantt chart of the timelines (.png, .svg or .pdf)", metavar="PATH")] = None,
             quiet: QuietOpt = False,
             sets: SetOpt = None):
    """Plan and simulate; a table of every planner asked for, side by side."""
    from hpipe.plan import load_plans
    from hpipe.result import Result
    from hpipe.progress import enabled
    from hpipe.sim import simulate as run_sim

    _check_outputs({"--json": json_path, "--trace": trace, "--plot": plot},
                   _reads(scenario, sets, **{"the --plan file": plan}))
    _plan_given(plan, planner, _load_scenario(scenario, sets))
    if planner is not None:  # a typo says so before the cost model's note (or its profile)
        _planner_names(planner)
    setup = _load_setup(scenario, sets, quiet=quiet, make_profile=enabled(quiet))
    notes.say(notes.uncovered(setup))
    notes.past_context(setup)  # a warning: said with --quiet too
    results = []
    if plan is not None:
        plans = load_plans(plan)
        for i, p in enumerate(plans):
            results.append(run_sim(setup, _checked_plan(p, setup, f"{plan}[{i}]" if len(plans) > 1 else str(plan))))
        named = [r.planner for r in results]
        for i, r in enumerate(results):  # two plans of one planner: rows, trace and JSON tell them apart by index
            if named.count(r.planner) > 1:
                r.planner = f"{r.planner} [{i}]"
    else:
        names = _chosen_planners(planner, setup.scenario)
        notes.unused_planner_settings(setup, names)
        from hpipe.compare import compare_planners  # only here: --plan must work without the planners
        from hpipe.progress import progress

        # a large scenario (70B over 32 devices at 32k tokens) plans for seconds per planner
        with progress(quiet) as bar:
            task = bar.add_task("planning", total=len(names))
            started = iter(range(len(names)))

            def step(name):  # the bar counts those done, not the one now planning
                bar.update(task, description=f"planning and simulating {name}", completed=next(started))

            results, limits = compare_planners(setup, names, step)
        if len(limits) == len(names):  # no planner could take it: the input's fault, exit 2
            raise limits[0]
    result = Result(scenario=setup.name, mode="simulated", results=results, cost_model=setup.cost.describe())
    notes.say(notes.floored_latency(setup),  # (the links priced on: known once planned and simulated)
              notes.unpriced(setup, results))
    _write_outputs(result, json_path, trace, plot)
    con = _out_console(json_path, quiet, trace, plot)
    written = {"Result JSON": json_path, "Chrome trace": trace, "Gantt chart": plot}
    if len(results) == 1 and results[0].latency_s is None:  # one planner found no plan: its reason says it all
        from hpipe.tables import reason_of

        _say_written(console(stderr=True) if con else None, written)
        raise InfeasibleError(f"{results[0].planner}: {reason_of(results[0])}")  # named, as `hpipe plan` does
    if con:
        from hpipe.tables import results_table

        out = f" + {setup.output_tokens} out" if setup.output_tokens else ""
        con.print(results_table(f"{setup.name}: simulated ({setup.model.name}, batch {setup.batch_size} x "
                                f"{setup.seq_len} tokens{out}, {_costmodel_name(setup)} cost model)", results))
        _say_written(con, written)
    if results and all(not r.feasible for r in results):
        from hpipe.tables import infeasible_notes

        under = " (the reasons are under the table)" if len(results) > 1 else " (the reason is under the table)"
        raise InfeasibleError("no plan is feasible" + (under if con else ": " + "; ".join(infeasible_notes(results))))


# ---- sweep -----------------------------------------------------------------
@app.command(cls=_OnceCommand)
def sweep(scenario: Annotated[Path, typer.Argument(help="scenario YAML", metavar="SCENARIO")],
          sets: Annotated[Optional[list[str]], typer.Option(
              "--set", metavar="KEY=V1,V2,...", help="the field to sweep and its values (one --set with "
              "several values); other --set KEY=VALUE options change the scenario for every value")] = None,
          planner: Annotated[Optional[str], typer.Option(help="a planner, a comma list, or all (default: the scenario's)", metavar="NAME|A,B|all")] = None,
          json_path: JsonOpt = None,
          plot: Annotated[Optional[str], typer.Option(help="latency, energy and cost against the value (.png, .svg or .pdf)", metavar="PATH")] = None,
          quiet: QuietOpt = False):
    """What if: simulate the scenario at several values of one field, every planner asked for."""
    from hpipe.io import write_text, written_together
    from hpipe.overrides import value_text
    from hpipe.progress import progress
    from hpipe.sweep import assignment, parse_sweep, run_sweep, sweep_plot
    from hpipe.tables import sweep_table

    # `hpipe --set K=V1,V2 sweep ...` sweeps too: the global --set options are this command's
    key, values, fixed = parse_sweep([*_GLOBAL_SETS, *(sets or [])])
    _GLOBAL_SETS.clear()
    reads: dict[str, Path | None] = {}  # at every value: the swept key may be the cost model's file
    for v in values:
        at = assignment(key, v)
        reads.update({what if what == "the scenario file" else f"{what} (at {at})": path
                      for what, path in _reads(scenario, fixed + [at]).items()})
    _check_outputs({"--json": json_path, "--plot": plot}, reads)
    if planner is not None:  # before the first value is resolved (a profile, maybe)
        _planner_names(planner)
    loaded: dict[tuple, object] = {}  # each value's setup, resolved once
    unified = None  # auto's roofline settings and why, for every value, where auto chose differently between them

    def load(extra):
        if tuple(extra) not in loaded:
            if unified is None:
                loaded[tuple(extra)] = _load_setup(scenario, fixed + extra, say=False)
            else:  # the scenario as given, its cost model replaced (its paths still resolve from its folder)
                from hpipe.costmodels.auto import AutoChoice

                sc = _load_scenario(scenario, fixed + extra)
                setup = loaded[tuple(extra)] = sc.model_copy(update={"costmodel": unified[0]}).resolve()
                setup.cost.auto = AutoChoice("roofline", unified[1])  # auto's choice, kept in the JSON
        return loaded[tuple(extra)]

    first = load([assignment(key, values[0])])
    autos = [load([assignment(key, v)]).cost.auto for v in values]
    # the model and the profile auto took for each value
    chosen = [(a.used, a.profile_path if a.used == "fitted" else None) if a is not None else None for a in autos]
    if len(set(chosen)) > 1 and not (key == "costmodel" or key.startswith("costmodel.")):
        # costmodel auto found this machine's profile for some values only (its cache key holds
        # the workload, links and devices), or a profile of its own for each, measured apart
        # (another load, another grid): rows on two models would not compare, so all take
        # auto's roofline
        cm = first.scenario.costmodel
        fitted = [(value_text(v), c[1]) for v, c in zip(values, chosen) if c and c[0] == "fitted"]
        profiles = list(dict.fromkeys(p for _, p in fitted))
        if len(fitted) < len(values):
            why = f"this machine's profile fits {key} = {', '.join(v for v, _ in fitted)} only"
        else:
            why = f"the values of {key} have profiles of their own, measured apart ({len(profiles)} files)"
        unified = ({**(cm.get("roofline", {}) if isinstance(cm, dict) else {}), "kind": "roofline"},
                   f"{why}: every value of the sweep is priced on the roofline, so that the rows compare")
        loaded.clear()
        err_console.print(f"cost model auto: {unified[1]} (to price them all on one profile: --set "
                          f"'costmodel={{kind: fitted, profile: {profiles[0]}}}')", markup=False, highlight=False,
                          soft_wrap=True)
        first = load([assignment(key, values[0])])
    names = _chosen_planners(planner, first.scenario)
    notes.unused_planner_settings(first, names, (key, ','.join(value_text(v) for v in values)))
    notes.unpriced_sets(first, f"{key}={','.join(value_text(v) for v in values)}")
    notes.unused_network(first, f"{key}={','.join(value_text(v) for v in values)}")
    notes.past_context_in_sweep(key, [value_text(v) for v in values], [load([assignment(key, v)]) for v in values])
    with progress(quiet) as bar:
        task = bar.add_task("sweeping", total=len(values) * len(names))
        started = iter(range(len(values) * len(names)))

        def step(what):  # the bar counts those done, not the one now planning
            bar.update(task, description=f"planning and simulating {what}", completed=next(started))

        result = run_sweep(load, key, values, names, on_step=step)
    auto_notes: dict[str, list[str]] = {}  # costmodel auto's note -> the values it holds for, said once
    try:  # the profile `hpipe execute SCENARIO` (the swept key as the file has it) would measure
        as_given = notes.profile_needs(_load_scenario(scenario, fixed).resolve())
    except HpipeError:
        as_given = None
    for v in values if unified is None else ():  # (the sweep's own roofline for all is said above)
        at = load([assignment(key, v)])
        # the advice names the value where the scenario as given needs another profile (a
        # seq_len, a generating value): `hpipe execute SCENARIO` had measured the file's own
        note, warning = notes.auto_note(at, scenario, swept=key if notes.profile_needs(at) == as_given else None)
        if note and (warning or not quiet):
            auto_notes.setdefault(note, []).append(assignment(key, v).split("=", 1)[1])
    # a fitted profile short of what a value asks (its tokens, its decode steps, a link's floor);
    # costs left blank for want of a price
    for v, run in zip(values, result.runs):
        at = load([assignment(key, v)])
        for line in (notes.uncovered(at), notes.floored_latency(at), notes.unpriced(at, run.results)):
            if line:
                auto_notes.setdefault(line, []).append(assignment(key, v).split("=", 1)[1])
    for note, at in auto_notes.items():
        first_line, _, rest = note.partition("\n")
        where = "" if len(at) == len(values) else f" [{key} = {', '.join(at)}]"
        err_console.print(first_line + where + (f"\n{rest}" if rest else ""), markup=False, highlight=False,
                          soft_wrap=True)
    with written_together():  # the JSON and the chart, both or neither
        if json_path:
            write_text(json_path, result.model_dump_json(indent=2), make_parents=False)
        if plot:
            sweep_plot(result, plot)
    con = _out_console(json_path, quiet)
    if con:
        model = "" if key == "model" or key.startswith("model.") else f"{first.model.name}, "  # else it varies
        costmodels = {_costmodel_name(load([assignment(key, v)])) for v in values}  # the swept key may be it
        costmodel = f"{costmodels.pop()} cost model" if len(costmodels) == 1 else "each value's cost model"
        con.print(sweep_table(f"{first.name}: simulated at each {key} ({model}{costmodel})", key, values, result.runs))
        _say_written(con, {"sweep JSON": json_path, "sweep chart": plot})
    if all(not r.feasible for run in result.runs for r in run.results):
        from hpipe.tables import infeasible_notes

        why = "".join(f"\n  {key} = {value_text(v)}: " + "; ".join(infeasible_notes(run.results))
                      for v, run in zip(values, result.runs))
        raise InfeasibleError("no plan is feasible at any value" + (" (the reasons are under the table)" if con
                                                                    else ":" + why))


