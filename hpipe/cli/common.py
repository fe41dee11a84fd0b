"""What every `hpipe` command shares: the typer app, its options, reading a scenario once
(with ``--set``), checking outputs before any work, and ``main``, which turns hpipe's errors,
Ctrl-C and click's usage errors into exit codes (see the package docstring)."""

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
        notes.unused_network(setup)
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


PLANNING_ONLY = ("planner.kind", "planner.micro_batches", "planner.objective")
"""What only a planner reads (``planner.token_granularity`` and ``memory_reserve_gb`` check a
given plan too)."""


def _plan_given(plan: Path | None, planner: str | None, sc) -> None:
    """With ``--plan`` no planner runs: ``--planner`` beside it, or a --set of what only
    planning reads, would change nothing, so either is refused (the --set had been dropped
    without a word)."""
    if plan is None:
        return
    if planner is not None:
        raise InputError("give --planner or --plan, not both", field="--plan")
    from hpipe.overrides import overridden_keys, parse_value, split_assignment

    for key, text in zip(overridden_keys(sc.overrides), sc.overrides):
        value = parse_value(split_assignment(text)[1])
        if key == "planner":
            keys = {f"planner.{k}" for k in value} if isinstance(value, dict) else {"planner.kind"}
        else:
            keys = {key}
        if keys & set(PLANNING_ONLY):
            raise InputError(f"--plan gives the plan and no planner runs, so --set {text} changes nothing; "
                             f"drop one", field="--set")


def _check_timeout(timeout_s: float) -> None:
    import math

    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise InputError(f"must be a number of seconds above 0, not {timeout_s:g}", field="--timeout")


def _no_global_sets(command: str) -> None:
    if _GLOBAL_SETS:  # `hpipe --set k=v devices`: nothing to apply it to, and silence would mislead
        raise InputError(f"{command} reads no scenario, so there is nothing to apply --set to", field="--set")




def _say_written(con, outputs: dict[str, str | None]) -> None:
    """Under the table: which files this command wrote (what stdout carried goes unsaid)."""
    for what, path in outputs.items():
        if con and path and not is_stdout(path):
            con.print(f"wrote the {what} to {escape(path)}", highlight=False)


def _write_outputs(result, json_path, trace, plot):
    """The Result's outputs, all or none (``hpipe.io.written_together``)."""
    from hpipe.io import write_text, written_together

    with written_together():
        if trace:
            from hpipe.sim.trace import chrome_trace

            write_text(trace, json.dumps(chrome_trace(result)), make_parents=False)
        if plot:
            from hpipe.sim.trace import gantt_png

            gantt_png(result, plot)
        if json_path:
            write_text(json_path, result.model_dump_json(indent=2), make_parents=False)


def _checked_plan(p, setup, file: str):
    """``p`` checked against the scenario, without what its planner predicted or noted (the
    run gives its own figures); a plan made for another scenario (by its name) that still fits this one is
    taken, and said: its stages were cut for that one's model and devices."""
    p = p.check(setup, file=file).check_codecs(setup, file=file).as_read()
    notes.unlike_groups(setup, p, file)
    if p.scenario and p.scenario != setup.name:
        err_console.print(f"[yellow]note:[/] {escape(file)} was planned for scenario {escape(repr(p.scenario))}; "
                          f"it is used as given for {escape(repr(setup.name))}", highlight=False, soft_wrap=True)
    return p


def main() -> None:
    from hpipe.stopping import install_sigterm

    before = install_sigterm()  # stopped as Ctrl-C stops it: workers first, exit 143 (SIGHUP: 129)
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

