"""The `hpipe` command line (typer).  Files are written here, never in the engines.

Exit codes: 0 done; 2 bad input (file, field and problem, no traceback);
3 infeasible (says by how much); 1 anything else; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from hpipe import notes
from hpipe.errors import HpipeError, InfeasibleError, InputError
from hpipe.io import is_stdout
from hpipe.scenario import PLANNER_NAMES
from hpipe.tables import console

class _OnceCommand(typer.core.TyperCommand):
    """A command whose one-value options are given at most once.  click keeps the last of
    ``--planner gpipe --planner hpipe`` and drops the first without a word; here that is
    a usage error (exit 2).  Repeatable options (``--set``) and flags are not counted."""

    def make_parser(self, ctx):
        parser = super().make_parser(ctx)
        parse = parser.parse_args

        def parse_args(args):
            opts, largs, order = parse(args)
            counts: dict = {}
            for p in order:
                if p.param_type_name == "option" and not (p.multiple or p.count or p.is_flag):
                    counts[p] = counts.get(p, 0) + 1
            for p, n in counts.items():
                if n > 1:
                    name = " / ".join(p.opts)  # as declared: which alias was typed is not kept
                    raise typer.BadParameter(f"given {n} times; it takes one value"
                                             + (" (a comma list for several)" if "," in (p.metavar or "") else ""),
                                             ctx=ctx, param_hint=f"'{name}'")
            return opts, largs, order

        parser.parse_args = parse_args
        return parser


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Plan, predict and run long-context LLM inference (prefill, then generation) over mismatched devices.")
err_console = console(stderr=True)
"""Notes and errors: on a terminal, wrapped to it; into a pipe or a file, each one line (``PipedConsole``)."""

JsonOpt = Annotated[Optional[str], typer.Option("--json", help="write the JSON to PATH, or '-' for stdout alone", metavar="PATH|-")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no table or progress bar")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", help="change a scenario field before it is checked (dotted path, e.g. "
    "workload.seq_len=4096, cluster.hosts[0].devices[0].count=2); repeatable")]

_GLOBAL_SETS: list[str] = []
"""`hpipe --set K=V COMMAND ...`: overrides for whatever scenario the command reads."""


def _version(value: bool) -> None:
    if value:
        from hpipe import __version__

        print(f"hpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                        help="print the version and exit")] = False,
                  sets: SetOpt = None):
    """Plan, predict and run long-context LLM inference (prefill, then generation) over mismatched devices."""
    _GLOBAL_SETS[:] = sets or []
    _TEXTS.clear()
    _LOADED.clear()  # one command's reads: a second main() in this process reads its files afresh


def _out_console(json_path: str | None, quiet: bool, *more_outputs: str | None) -> Console | None:
    """Where tables go: stdout, unless stdout carries the JSON or another output (a trace)
    (then stderr), or nowhere when quiet."""
    if quiet:
        return None
    return console(stderr=any(is_stdout(p) for p in (json_path, *more_outputs)))


@contextlib.contextmanager
def _needs_torch(command: str):
    """Around the runtime's imports: a missing torch is the user's to install, said plainly."""
    try:
        yield
    except ImportError as e:
        if getattr(e, "name", None) == "torch":
            raise HpipeError(f"`hpipe {command}` needs torch: pip install 'hpipe[runtime]'") from None
        raise


def _costmodel_name(setup) -> str:
    """The cost model a table's title names: the scenario's kind, and for auto the one it chose
    (with --quiet the choice is said nowhere else)."""
    kind = setup.scenario.costmodel_kind
    choice = getattr(setup.cost, "auto", None)  # (a sweep may have put auto's roofline in its place)
    return f"auto ({choice.used})" if choice is not None else kind


def _check_outputs(outputs: dict[str, str | None], inputs: dict[str, Path | None] | None = None,
                   profiles: tuple[str, ...] = ()) -> None:
    """Output paths checked before any work: a typo fails now, not after a long run, and no
    output replaces a file the command reads (``inputs``: what it is -> its path).  Only the
    options in ``profiles``, which write a profile, may write into the profile cache: a JSON
    or a chart there would take the place of a profile that costmodel auto reads."""
    from hpipe.costmodels.cache import cache_dir
    from hpipe.io import check_outputs, is_special, is_stdout

    check_outputs(outputs, plots=("--plot",), inputs=inputs)
    for opt, p in outputs.items():
        if opt in profiles or not p or is_stdout(p) or is_special(Path(p).expanduser()):
            continue
        if Path(p).expanduser().resolve().parent == cache_dir():
            raise InputError(f"{p!r} is in hpipe's profile cache ({cache_dir()}), whose files costmodel auto "
                             f"reads as this machine's profiles; give a path elsewhere", field=opt)


def _reads(scenario: Path, sets: list[str] | None = None, **more: Path | None) -> dict[str, Path | None]:
    """What a command reads, for ``_check_outputs``: the scenario file, the files its cost
    model names (a profile, a calibration), and ``more`` (its other inputs, by name)."""
    return {"the scenario file": scenario, **_load_scenario(scenario, sets).files_read(), **more}


_TEXTS: dict[str, str] = {}
"""Scenario files' texts read so far, by path: a scenario given as a pipe (/dev/stdin) can be
read only once."""
_LOADED: dict[tuple[str, tuple[str, ...]], object] = {}
"""Scenarios read so far, by (path, overrides): the output check reads the scenario before the
command does, and a sweep reads it once per value."""


def _load_scenario(scenario: Path, sets: list[str] | None = None):
    """The one place the CLI reads a scenario: the file, then the --set overrides
    (`hpipe --set ...` before the command, then the command's own) before validation."""
    from hpipe.scenario import load_scenario, read_scenario_text

    overrides = [*_GLOBAL_SETS, *(sets or [])]
    path = str(Path(scenario).resolve())
    if path not in _TEXTS:
        _TEXTS[path] = read_scenario_text(scenario)
    key = (path, tuple(overrides))
    if key not in _LOADED:
        _LOADED[key] = load_scenario(scenario, overrides=overrides, text=_TEXTS[path])
    return _LOADED[key]


def _load_setup(scenario: Path, sets: list[str] | None = None, *, quiet: bool = False,
                make_profile: bool = False, check=None, say: bool = True, loaded=None):
    """The resolved scenario.  ``costmodel: auto``: says on stderr which model it chose; with no
    profile of this machine yet, measures a quick one first when ``make_profile`` (execute
    always; plan and simulate on a terminal, not --quiet), else says how to make one.
    ``check(setup)``: the command's own input checks against the scenario, run before that
    profile, so that a typo costs seconds, not a profile's minute.  ``say=False``: nothing
    printed (the caller gathers ``notes.auto_note`` itself).  ``loaded``: the Scenario, already
    read (and adjusted) by the caller, in place of reading ``scenario`` with ``sets``."""
    sc = loaded if loaded is not None else _load_scenario(scenario, sets)
    setup = sc.resolve()
    if check is not None:
        check(setup)
    if say:
        notes.unpriced_sets(setup)
    choice = getattr(setup.cost, "auto", None)
    if choice is None or not say:
        return setup
    if choice.used == "roofline" and choice.runs_here and make_profile:
        with _needs_torch("profile"):
            from hpipe.runtime.emulation import emulation_unsupported
            from hpipe.runtime.profile_cache import estimate_profile_s, measure_into_cache
        why = emulation_unsupported(setup)
        if why:  # a profile must measure the devices as the scenario describes them
            err_console.print(f"{choice.note()}\n  no profile can be made here ({why}): planning on datasheet "
                              f"figures", markup=False, highlight=False, soft_wrap=True)
            return setup
        why = (f"no profile of this machine for {setup.name} yet" if not Path(choice.profile_path).exists()
               else choice.reason)  # a cached one that falls short (no decode steps): measured again
        from hpipe.runtime.here import format_duration

        err_console.print(f"cost model auto: {why}; measuring a quick one (about "
                          f"{format_duration(estimate_profile_s(setup))}, "
                          f"once) into {choice.profile_path}",
                          markup=False, highlight=False, soft_wrap=True)
        with _needs_torch("profile"):
            measure_into_cache(setup, Path(choice.profile_path), quiet=quiet)
        setup = sc.resolve()
        note, warning = setup.cost.auto.note(), setup.cost.auto.used == "roofline"  # no advice to measure again
    else:
        note, warning = notes.auto_note(setup, scenario)
    if warning or not quiet:  # which model, from which profile: the Result's cost_model keeps it too
        err_console.print(note, markup=False, highlight=False, soft_wrap=True)  # names and paths: no markup
    return setup


PLANNER_ABBREVIATIONS = {"gp-b": "gpipe-balanced", "tp-t": "tp-terapipe"}
"""The short names the README's tables use (and the paper's GP-B, TP-T): suggested, not accepted."""


def _planner_names(planner: str, field: str = "--planner", allow_none: bool = False) -> list[str]:
    """``all``, one planner or a comma list, each once, in the order given (``allow_none``:
    an empty string names none; ``field``: the option, for messages)."""
    if planner.strip() == "all":
        return list(PLANNER_NAMES)
    if allow_none and not planner.strip():
        return []
    parts = [p.strip() for p in planner.split(",")]
    names = [p for p in parts if p]
    if not names:
        raise InputError(f"no planner named; one of {', '.join(PLANNER_NAMES)} or all", field=field)
    if len(names) < len(parts):
        raise InputError(f"{planner!r} has an empty name (two commas together, or one at an end); give A,B,...", field=field)
    for n in names:
        if n == "all":
            raise InputError("'all' already names every planner; give it alone", field=field)
        if n not in PLANNER_NAMES:
            from hpipe.errors import suggest

            hint = (f" (did you mean {PLANNER_ABBREVIATIONS[n.lower()]}?)" if n.lower() in PLANNER_ABBREVIATIONS
                    else suggest(n, PLANNER_NAMES))
            raise InputError(f"unknown planner {n!r}{hint}; one of {', '.join(PLANNER_NAMES)} or all",
                             field=field)
    return list(dict.fromkeys(names))  # a planner named twice runs once


def _chosen_planners(planner: str | None, sc) -> list[str]:
    """The planners to run: ``--planner``, else the scenario's ``planner.kind``.  A --set that
    names the planner beside --planner is refused: --planner won, and the --set went unheard."""
    if planner is not None:
        from hpipe.overrides import overridden_keys, parse_value, split_assignment

        for key, text in zip(overridden_keys(sc.overrides), sc.overrides):
            value = parse_value(split_assignment(text)[1])
            if key == "planner.kind" or (key == "planner" and (isinstance(value, str) or
                                                               (isinstance(value, dict) and "kind" in value))):
                raise InputError(f"--planner {planner} and --set {text} both choose the planner; give one",
                                 field="--planner")
    return _planner_names(planner or sc.planner.kind)


def _check_timeout(timeout_s: float) -> None:
    import math

    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise InputError(f"must be a number of seconds above 0, not {timeout_s:g}", field="--timeout")


def _no_global_sets(command: str) -> None:
    if _GLOBAL_SETS:  # `hpipe --set k=v devices`: nothing to apply it to, and silence would mislead
        raise InputError(f"{command} reads no scenario, so there is nothing to apply --set to", field="--set")


# ---- catalogs --------------------------------------------------------------
@app.command(cls=_OnceCommand)
def devices(json_path: JsonOpt = None, quiet: QuietOpt = False):
    """The device catalog (datasheet figures)."""
    from hpipe.devices import DEVICES
    from hpipe.io import write_text

    _no_global_sets("devices")
    _check_outputs({"--json": json_path})
    rows = [d.model_dump() for d in DEVICES.values()]
    if json_path:
        write_text(json_path, json.dumps(rows, indent=2), make_parents=False)
    con = _out_console(json_path, quiet)
    if con:
        from hpipe.tables import devices_table

        con.print(devices_table(DEVICES.values()))
        _say_written(con, {"device catalog JSON": json_path})


@app.command(cls=_OnceCommand)
def models(json_path: JsonOpt = None, quiet: QuietOpt = False):
    """The model catalog."""
    from hpipe.io import write_text
    from hpipe.models import MODELS

    _no_global_sets("models")
    _check_outputs({"--json": json_path})
    rows = [{**m.to_dict(), "params": m.param_count(), "n_units": m.n_units} for m in MODELS.values()]
    if json_path:
        write_text(json_path, json.dumps(rows, indent=2), make_parents=False)
    con = _out_console(json_path, quiet)
    if con:
        from hpipe.tables import models_table

        con.print(models_table(MODELS.values()))
        _say_written(con, {"model catalog JSON": json_path})


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
    if output:
        write_text(output, p.model_dump_json(indent=2), make_parents=False)
    con = _out_console(output, quiet)
    if con:
        from hpipe.tables import plan_table

        con.print(plan_table(setup, p))
        _say_written(con, {"Plan JSON": output})


# ---- simulate --------------------------------------------------------------
def _say_written(con, outputs: dict[str, str | None]) -> None:
    """Under the table: which files this command wrote (what stdout carried goes unsaid)."""
    for what, path in outputs.items():
        if con and path and not is_stdout(path):
            con.print(f"wrote the {what} to {escape(path)}", highlight=False)


def _write_outputs(result, json_path, trace, plot):
    from hpipe.io import write_text

    if trace:
        from hpipe.sim.trace import chrome_trace

        write_text(trace, json.dumps(chrome_trace(result)), make_parents=False)
    if plot:
        from hpipe.sim.trace import gantt_png

        gantt_png(result, plot)
    if json_path:
        write_text(json_path, result.model_dump_json(indent=2), make_parents=False)


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
    if plan is not None and planner is not None:
        raise InputError("give --planner or --plan, not both", field="--plan")
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
    from hpipe.io import write_text
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


# ---- execute ---------------------------------------------------------------
@app.command(cls=_OnceCommand)
def execute(scenario: Annotated[Path, typer.Argument(help="scenario YAML", metavar="SCENARIO")],
            planner: Annotated[Optional[str], typer.Option(help="planner (default: the scenario's)", metavar="NAME")] = None,
            plan: Annotated[Optional[Path], typer.Option("--plan", help="run the Plan in this JSON file", metavar="PLAN.json")] = None,
            json_path: JsonOpt = None,
            trace: Annotated[Optional[str], typer.Option(help="Chrome trace of the measured timeline (-: stdout)", metavar="PATH")] = None,
            plot: Annotated[Optional[str], typer.Option(help="Gantt chart of the measured timeline (.png, .svg or .pdf)", metavar="PATH")] = None,
            inputs: Annotated[Optional[Path], typer.Option(help="JSON list of token-id lists, one per sequence", metavar="FILE")] = None,
            check: Annotated[bool, typer.Option(help="compare with a single-process forward; exit 1 past tolerance")] = False,
            timeout: Annotated[float, typer.Option(help="seconds a worker may wait on a peer before the run is stopped", metavar="S")] = 60.0,
            quiet: QuietOpt = False,
            sets: SetOpt = None):
    """Run the plan for real with torch and report measured figures beside the simulated ones."""
    from hpipe.plan import load_plans
    from hpipe.planners import make_plan
    from hpipe.result import Result
    from hpipe.sim import simulate as run_sim

    _check_outputs({"--json": json_path, "--trace": trace, "--plot": plot},
                   _reads(scenario, sets, **{"the --plan file": plan, "the --inputs file": inputs}))
    _check_timeout(timeout)
    with _needs_torch("execute"):
        from hpipe.runtime import execute as run_exec, load_inputs
        from hpipe.runtime.launcher import runtime_spec
    from hpipe.memory import raise_if_model_cannot_fit
    from hpipe.runtime.here import check_cpu_memory, check_cpu_weights, check_placements

    if plan is not None and planner is not None:
        raise InputError("give --planner or --plan, not both", field="--plan")
    plans = load_plans(plan) if plan is not None else None
    if plans is not None and len(plans) != 1:
        raise InputError(f"execute runs one plan, the file holds {len(plans)}", file=str(plan))
    if planner is not None and len(_planner_names(planner)) != 1:
        raise InputError("execute runs one planner", field="--planner")
    token_ids, p, spec = None, None, None

    def inputs_fit(setup):  # before a first run measures this machine's profile
        nonlocal token_ids, p, spec
        raise_if_model_cannot_fit(setup)
        check_cpu_weights(setup)  # whatever the plan: a profile's minutes not spent on a model too big
        if plans is not None:
            p = _checked_plan(plans[0], setup, str(plan))
            check_placements(setup, p.devices)  # a GPU of the scenario with no placement here: exit 2
            check_cpu_memory(setup, p)
        token_ids = load_inputs(inputs, setup) if inputs else None
        spec = runtime_spec(setup)  # the weights folder: there, readable and the scenario's model

    setup = _load_setup(scenario, sets, quiet=quiet, make_profile=True, check=inputs_fit)
    if p is None:
        p = make_plan(setup, _chosen_planners(planner, setup.scenario)[0])
        check_placements(setup, p.devices)
    predicted = run_sim(setup, p)
    if not predicted.feasible:
        raise InfeasibleError(f"plan does not fit: {predicted.infeasible}")
    check_cpu_memory(setup, p)
    notes.past_context(setup, spec)  # warnings: said with --quiet too
    notes.foreign_profile(setup)
    notes.unused_sampling(setup)
    if not quiet:
        notes.long_cpu_run(setup, p, timeout, warmup=1)
    measured = run_exec(setup, p, inputs=token_ids, check=check, timeout_s=timeout, quiet=quiet, spec=spec)
    measured.take_prediction(predicted)
    notes.not_emulated(measured)
    if measured.text is not None:  # generated through the weights folder's tokenizer.json
        from hpipe.runtime.generation import load_tokenizer

        notes.untokenized(load_tokenizer(setup.weights), measured)
    result = Result(scenario=setup.name, mode="measured", results=[measured], cost_model=setup.cost.describe())
    _write_outputs(result, json_path, trace, plot)
    con = _out_console(json_path, quiet, trace)
    if con:
        from hpipe.tables import measured_table

        con.print(measured_table(f"{setup.name}: {p.planner} measured on this machine, predicted by the "
                                 f"{_costmodel_name(setup)} cost model", measured, predicted))
        if setup.output_tokens:
            from hpipe.tables import generation_table

            con.print(generation_table(f"{setup.name}: generation ({setup.output_tokens} new tokens per sequence)",
                                       measured, predicted))
        _say_written(con, {"Result JSON": json_path, "Chrome trace": trace, "Gantt chart": plot})
        notes.other_load(con, measured)
    if check and measured.max_abs_error is not None:
        from hpipe.runtime.launcher import check_verdict

        passed, figures = check_verdict(setup, measured)
        if not passed:
            raise HpipeError(f"--check failed: {figures}")
        if con:
            con.print(f"--check passed: {figures}, against the whole model in one process (float32{_with_codecs(p)})"
                      + ("; the prefill's logits only: `hpipe generate --check` compares the generated ids"
                         if setup.output_tokens else ""), highlight=False)


def _with_codecs(plan) -> str:
    """What a --check compares a lossy plan against, beyond the model itself."""
    return ", with the plan's codec round trips on the messages it compresses" if plan.lossy else ""


def _checked_plan(p, setup, file: str):
    """``p`` checked against the scenario, without what its planner predicted or noted (the
    run gives its own figures); a plan made for another scenario (by its name) that still fits this one is
    taken, and said: its stages were cut for that one's model and devices."""
    p = p.check(setup, file=file).check_codecs(setup, file=file).as_read()
    if p.scenario and p.scenario != setup.name:
        err_console.print(f"[yellow]note:[/] {escape(file)} was planned for scenario {escape(repr(p.scenario))}; "
                          f"it is used as given for {escape(repr(setup.name))}", highlight=False, soft_wrap=True)
    return p


# ---- generate ----------------------------------------------------------------------
class _Streamer:
    """Prints each sequence's new tokens to stdout as the last stage makes them: the text
    decoded so far less what was already printed (one sequence), else one line per token.
    Text that ends inside a character (byte-level tokens split one: the decoder gives U+FFFD)
    is held back until the character is whole, as transformers' TextStreamer does; printed, it
    was a stray U+FFFD and the character itself never came."""

    def __init__(self, tokenizer, batch: int):
        self.tok, self.batch = tokenizer, batch
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.printed = [""] * batch

    def __call__(self, tokens) -> None:
        for k, tok in tokens:
            self.ids[k].append(tok)
            if self.tok is None:
                piece = ("" if len(self.ids[k]) == 1 or self.batch > 1 else " ") + str(tok)
            else:
                piece = self._new_text(k, final=False)
                if not piece:
                    continue
            self._write(k, piece)
        sys.stdout.flush()

    def _write(self, k: int, piece: str) -> None:
        sys.stdout.write(piece if self.batch == 1 else f"[{k}] {piece.strip()}\n")

    def _new_text(self, k: int, final: bool) -> str:
        from hpipe.runtime.generation import decode_text

        text = decode_text(self.tok, self.ids[k])
        if not final and text.endswith("\ufffd"):
            return ""
        piece, self.printed[k] = text[len(self.printed[k]):], text
        return piece

    def close(self) -> None:
        """The text held back at the end (a character the tokens never completed), then the
        line's end."""
        if self.tok is not None:
            for k in range(self.batch):
                piece = self._new_text(k, final=True) if self.ids[k] else ""
                if piece:
                    self._write(k, piece)
        if self.batch == 1:
            sys.stdout.write("\n")
        sys.stdout.flush()


@app.command(cls=_OnceCommand)
def generate(scenario: Annotated[Path, typer.Argument(help="scenario YAML", metavar="SCENARIO")],
             planner: Annotated[Optional[str], typer.Option(help="planner (default: the scenario's)", metavar="NAME")] = None,
             plan: Annotated[Optional[Path], typer.Option("--plan", help="run the Plan in this JSON file", metavar="PLAN.json")] = None,
             prompt: Annotated[Optional[str], typer.Option(help="prompt text (needs tokenizer.json in the weights folder)", metavar="TEXT")] = None,
             prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", help="read the prompt text from FILE (- for standard input)", metavar="FILE")] = None,
             inputs: Annotated[Optional[Path], typer.Option(help="JSON list of token-id lists, one per sequence, all of one length", metavar="IDS.json")] = None,
             max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", min=1, help="new tokens per sequence (default: the scenario's output_tokens, else 32)", metavar="N")] = None,
             stream: Annotated[bool, typer.Option(help="print the text (or ids) to stdout as tokens arrive")] = False,
             check: Annotated[bool, typer.Option(help="compare with one process; exit 1 if the prompt's logits or the greedy ids differ (a pick at a near-tie within the dtype's tolerance)")] = False,
             json_path: JsonOpt = None,
             timeout: Annotated[float, typer.Option(help="seconds a worker may wait on a peer before the run is stopped", metavar="S")] = 60.0,
             quiet: QuietOpt = False,
             sets: SetOpt = None):
    """Run the plan for real and generate: prompt in, text (or token ids) out."""
    from hpipe.planners import make_plan
    from hpipe.plan import load_plans
    from hpipe.result import Result
    from hpipe.sim import simulate as run_sim

    if prompt_file is not None and str(prompt_file) == "-":  # the usual spelling of standard input
        prompt_file = Path("/dev/stdin")
    _check_outputs({"--json": json_path}, _reads(scenario, sets, **{"the --plan file": plan,
                                                                    "the --prompt-file": prompt_file,
                                                                    "the --inputs file": inputs}))
    _check_timeout(timeout)
    with _needs_torch("generate"):
        from hpipe.runtime import generation as gen
        from hpipe.runtime.launcher import execute as run_exec, runtime_spec
    if plan is not None and planner is not None:
        raise InputError("give --planner or --plan, not both", field="--plan")
    if planner is not None:  # a typo says so before the tokenizer and the cost model
        _planner_names(planner)
    if stream and is_stdout(json_path):
        raise InputError("--stream and --json - would both write to standard output; give --json a file",
                         field="--stream")
    if prompt_file is not None and (not prompt_file.exists() or prompt_file.is_dir()):  # a pipe reads fine
        raise InputError("no such file" if not prompt_file.exists() else "a folder, not a file",
                         file=str(prompt_file), field="--prompt-file")
    sc = _load_scenario(scenario, sets)
    weights = str(sc.resolve_path(sc.weights)) if sc.weights else None
    if weights:
        from hpipe.runtime.weights import check_folder

        check_folder(weights, sc.source_path)
    tok = gen.load_tokenizer(weights)
    ids = gen.prompt_ids(tok, sc.model_spec().vocab_size, prompt=prompt, inputs=str(inputs) if inputs else None,
                         prompt_file=str(prompt_file) if prompt_file else None, weights=weights)
    new_tokens = max_new_tokens or sc.workload.output_tokens or gen.DEFAULT_NEW_TOKENS
    from hpipe.memory import raise_if_model_cannot_fit
    from hpipe.runtime.here import check_cpu_memory, check_cpu_weights, check_placements

    # costmodel: auto: the choice for the scenario as written (the cache key holds its workload's
    # shape, not the prompt's: each prompt length would be a profile of its own), said, and kept
    # for the prompt: both Setups below are priced alike.  No profile is measured here: one of
    # the scenario's own workload could take far longer than generating from a short prompt;
    # `hpipe execute SCENARIO` measures it (with workload.output_tokens, its decode steps too)
    if plan is None:  # before the cost model's note: `--planner all` is refused first
        names = _chosen_planners(planner, sc)
        if len(names) != 1:
            raise InputError("generate runs one planner", field="--planner")
    base = _load_setup(scenario, sets, quiet=quiet, make_profile=False, loaded=sc)
    choice = getattr(base.cost, "auto", None)
    try:
        setup, plan_setup = gen.setups_for(sc, ids, new_tokens, costmodel=choice.spec if choice else None)
    except InputError as e:
        if max_new_tokens and e.field == "workload.output_tokens":  # the number came from the flag
            raise InputError(e.problem, field="--max-new-tokens") from None
        raise
    raise_if_model_cannot_fit(setup)  # the prompts' batch and length, as they run
    check_cpu_weights(setup)
    for s_ in {id(setup): setup, id(plan_setup): plan_setup}.values():
        if choice is not None:
            s_.cost.auto = choice  # the JSON's cost_model.auto, as for the scenario
    if check and not setup.sampling.temperature == 0:
        raise InputError(f"--check compares greedy ids, but the scenario samples (temperature "
                         f"{setup.sampling.temperature:g})", file=str(scenario), field="workload.sampling.temperature")
    if plan is not None:
        plans = load_plans(plan)
        if len(plans) != 1:
            raise InputError(f"generate runs one plan, the file holds {len(plans)}", file=str(plan))
        if sum(plans[0].slices) != setup.seq_len:
            raise InputError(f"the slices sum to {sum(plans[0].slices)} tokens but the prompt has {setup.seq_len}",
                             file=str(plan), field="slices")
        p = _checked_plan(plans[0], setup, str(plan))
    else:
        try:
            p = make_plan(plan_setup, names[0])
        except InfeasibleError as rounded:
            if plan_setup is setup:
                raise
            # the rounded-up prompt does not fit where the prompt itself may: plan on its own
            # length (a finer slice grid, slower to search, so only here); where that cannot be
            # planned either, the rounded plan's reason stands (not advice about a granularity
            # the user did not set)
            try:
                p = make_plan(setup, names[0])
            except HpipeError:
                raise rounded from None
        # its slices cut to the prompt: the planner's figures were for the rounded-up one
        p = p.model_copy(update={"slices": gen.fit_slices(p.slices, setup.seq_len)}).check(setup).without_figures()
    check_placements(setup, p.devices)  # a GPU of the scenario with no placement here: exit 2
    spec = runtime_spec(setup)  # the weights' own (max positions, norm epsilon)
    predicted = run_sim(setup, p)
    if not predicted.feasible:
        raise InfeasibleError(f"plan does not fit: {predicted.infeasible}")
    check_cpu_memory(setup, p)
    notes.past_context(setup, spec)  # warnings: said with --quiet too
    notes.foreign_profile(setup)
    notes.unused_sampling(setup)
    notes.replaced_by_prompts(sc, ids, given_new_tokens=max_new_tokens)
    if not quiet:
        notes.long_cpu_run(setup, p, timeout, warmup=0)
    streamer = _Streamer(tok, len(ids)) if stream else None
    measured = run_exec(setup, p, inputs=ids, check=check, timeout_s=timeout, quiet=quiet or stream, warmup=0,
                        on_tokens=streamer, spec=spec)
    if streamer:
        streamer.close()
    measured.take_prediction(predicted)
    notes.not_emulated(measured)
    notes.untokenized(tok, measured)
    result = Result(scenario=setup.name, mode="measured", results=[measured], cost_model=setup.cost.describe())
    if json_path:
        from hpipe.io import write_text

        write_text(json_path, result.model_dump_json(indent=2))
    if not stream and not is_stdout(json_path):  # the answer, on stdout (--quiet drops only the table)
        for k, g in enumerate(measured.generated_ids):
            out = measured.text[k] if measured.text else " ".join(map(str, g))
            print(out if len(ids) == 1 else f"[{k}] {out}")
    if not quiet:
        from hpipe.tables import generation_table

        err = console(stderr=True)
        err.print(generation_table(
            f"{setup.name}: {len(ids)} x {setup.seq_len} prompt tokens, {new_tokens} new token{'s' if new_tokens > 1 else ''}, plan {p.planner} "
            f"({len(p.stages)} stage{'s' if len(p.stages) != 1 else ''}), predicted by the {_costmodel_name(base)} "
            f"cost model", measured, predicted))
        _say_written(err, {"Result JSON": json_path})
        made = max(map(len, measured.generated_ids))
        if made < new_tokens:  # every sequence met its EOS: the run did less than was simulated
            err.print(f"[yellow]note:[/] every sequence ended at its end-of-sequence token, after at most {made} of "
                      f"{new_tokens} new tokens; the simulated row is for {new_tokens}", highlight=False)
        notes.other_load(err, measured)
    if check:
        import numpy as np

        from hpipe.runtime.launcher import CHECK_TOLERANCE, check_verdict, plan_reference
        from hpipe.runtime.weights import weight_source

        ref, _ = plan_reference(setup, p, np.asarray(ids), new_tokens, spec, eos=gen.eos_ids(setup.weights))
        bad = [k for k in range(len(ids)) if ref[k] != measured.generated_ids[k]]
        if measured.max_abs_error is not None:
            passed, figures = check_verdict(setup, measured)
            if not passed:
                raise HpipeError(f"--check failed at the prompt's last position: {figures}")
        tol = CHECK_TOLERANCE[setup.dtype]
        ats = {k: next((i for i, (a, b) in enumerate(zip(ref[k], measured.generated_ids[k])) if a != b),
                       min(len(ref[k]), len(measured.generated_ids[k]))) for k in bad}
        # parted: both went on past ``at`` (else one stopped where the other did not)
        parted = [k for k in bad if ats[k] < min(len(ref[k]), len(measured.generated_ids[k]))]
        offs = dict(zip(parted, gen.first_picks_off_the_best(
            spec, weight_source(spec, setup.weights, 0), [ids[k] for k in parted],
            [measured.generated_ids[k] for k in parted], tol))) if parted and not p.lossy else {}
        for k in bad:
            at, off = ats[k], offs.get(k)
            if p.lossy or k not in parted or off is not None:  # a wrong pick, not a near-tie
                where = (f"; teacher-forced, its new token {off[0]} is {off[1]:.3g} logits short of the best "
                         f"(more than {tol:g}, the tolerance for {setup.dtype})" if off else "")
                raise HpipeError(f"--check failed: sequence {k} differs from the one-process loop at new token {at} "
                                 f"(pipelined {measured.generated_ids[k][at:at + 3]}, one process "
                                 f"{ref[k][at:at + 3]}){where}")
        if not quiet:
            n = len(ids)
            said = (f"--check: the greedy ids equal the one-process loop's ({n} sequence{'s' if n > 1 else ''}"
                    f"{_with_codecs(p)})" if not bad else
                    f"--check passed: {n - len(bad)} of {n} sequences' greedy ids equal the one-process loop's; "
                    f"{len(bad)} part{'s' if len(bad) == 1 else ''} from it at a near-tie, every pipelined pick "
                    f"within {tol:g} logits of the best, teacher-forced (the tolerance for {setup.dtype})")
            console(stderr=True).print(said, highlight=False)


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
             seed: Annotated[int, typer.Option(help="seed of the random plans", metavar="N")] = 0,
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
    opts = CaseOptions(planners=tuple(names), n_random=random_plans, seed=seed, timeout_s=timeout, repeats=repeats,
                       output_tokens=output_tokens, decode_random=decode_random, prefill=prefill)
    if not prefill and not any((output_tokens if output_tokens is not None else sc.workload.output_tokens)
                               for sc in scs):
        raise InputError("--no-prefill leaves no case: no decode cases either (give --output-tokens N)",
                         field="--no-prefill")
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


def main() -> None:
    from hpipe.stopping import install_sigterm

    before = install_sigterm()  # stopped as Ctrl-C stops it: workers first, exit 143
    try:
        # Under standalone_mode=False typer turns Ctrl-C (and --help, typer.Exit) into a
        # *returned* exit code instead of raising it: honour it, or Ctrl-C would exit 0.
        rc = app(standalone_mode=False)
        if rc == 130:
            raise KeyboardInterrupt
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except HpipeError as e:
        msg = str(e)
        if isinstance(e, InfeasibleError):  # the hpipe planner names itself: not "hpipe: hpipe: ..."
            msg = msg.removeprefix("hpipe: ")
        err_console.print(f"[bold red]hpipe:[/] {escape(msg)}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        from hpipe.stopping import exit_interrupted

        exit_interrupted(e)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort as e:
        # click raises Abort for an EOFError (a Ctrl-C comes back as rc 130 above): no
        # interrupt, so say where the input ended and exit 1 (a forkserver killed mid-start
        # once ended so; the launcher now names that itself, launcher._start_workers)
        cause = e.__cause__ or e.__context__
        if isinstance(cause, EOFError):
            import traceback

            where = traceback.extract_tb(cause.__traceback__)[-1] if cause.__traceback__ else None
            err_console.print("hpipe: aborted: an input ended unexpectedly (EOFError"
                              + (f" at {where.filename}:{where.lineno} in {where.name}" if where else "") + ")",
                              markup=False, highlight=False, soft_wrap=True)
            sys.exit(1)
        err_console.print("hpipe: aborted")
        sys.exit(130)
    except Exception as e:
        # click's usage errors (typer vendors its own click) carry their exit code (2) and a message
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        raise
    finally:
        from hpipe.stopping import restore

        restore(before)  # an in-process caller (tests) gets its own handlers back


if __name__ == "__main__":
    main()
