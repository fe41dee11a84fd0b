"""The `hpipe` command line (typer).  Files are written here, never in the engines.

Exit codes: 0 done; 2 bad input (file, field and problem, no traceback);
3 infeasible (says by how much); 1 anything else; 130 interrupted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hpipe.errors import HpipeError, InfeasibleError, InputError
from hpipe.scenario import PLANNER_NAMES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Plan, predict and run long-context LLM prefill over mismatched devices.")
err_console = Console(stderr=True)

JsonOpt = Annotated[Optional[str], typer.Option("--json", help="write the JSON to PATH, or '-' for stdout alone")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no table or progress bar")]


def _out_console(json_path: str | None, quiet: bool) -> Console | None:
    """Where tables go: stdout, unless stdout carries the JSON (then stderr), or nowhere when quiet."""
    if quiet:
        return None
    return _console(stderr=json_path == "-")


def _console(stderr: bool = False) -> Console:
    """A console for tables; when piped, wide enough that the table is not squeezed to 80 columns."""
    con = Console(stderr=stderr)
    return con if con.is_terminal else Console(stderr=stderr, width=160)


def _load_setup(scenario: Path):
    from hpipe.scenario import load_scenario

    return load_scenario(scenario).resolve()


def _planner_names(planner: str) -> list[str]:
    if planner == "all":
        return list(PLANNER_NAMES)
    names = [p.strip() for p in planner.split(",") if p.strip()]
    for n in names:
        if n not in PLANNER_NAMES:
            from hpipe.errors import suggest

            raise InputError(f"unknown planner {n!r}{suggest(n, PLANNER_NAMES)}; one of "
                             f"{', '.join(PLANNER_NAMES)} or all", field="--planner")
    return names


# ---- catalogs --------------------------------------------------------------
@app.command()
def devices(json_path: JsonOpt = None):
    """The device catalog (datasheet figures)."""
    from hpipe.devices import DEVICES
    from hpipe.io import write_text

    rows = [d.model_dump() for d in DEVICES.values()]
    if json_path:
        write_text(json_path, json.dumps(rows, indent=2))
        if json_path == "-":
            return
    t = Table(title="devices")
    for col in ("name", "fp16 TFLOPS", "fp32 TFLOPS", "memory GB", "mem GB/s", "power W", "idle W", "link Gbit/s"):
        t.add_column(col, justify="left" if col == "name" else "right")
    for d in DEVICES.values():
        t.add_row(d.name, f"{d.fp16_tflops:g}", f"{d.fp32_tflops:g}", f"{d.memory_gb:g}",
                  f"{d.memory_bandwidth_gbps:g}", f"{d.power_w:g}", f"{d.idle_power_w:g}", f"{d.interconnect_gbps:g}")
    _console().print(t)


@app.command()
def models(json_path: JsonOpt = None):
    """The model catalog."""
    from hpipe.io import write_text
    from hpipe.models import MODELS

    rows = [{**m.to_dict(), "params": m.param_count(), "n_units": m.n_units} for m in MODELS.values()]
    if json_path:
        write_text(json_path, json.dumps(rows, indent=2))
        if json_path == "-":
            return
    t = Table(title="models")
    for col in ("name", "family", "params", "layers", "d_model", "heads", "kv heads", "d_ff", "vocab"):
        t.add_column(col, justify="left" if col in ("name", "family") else "right")
    for m in MODELS.values():
        t.add_row(m.name, m.family, f"{m.param_count() / 1e9:.3f} B", str(m.n_layers), str(m.d_model),
                  str(m.n_heads), str(m.n_kv_heads), str(m.d_ff), str(m.vocab_size))
    _console().print(t)


# ---- plan ------------------------------------------------------------------
@app.command()
def plan(scenario: Annotated[Path, typer.Argument(help="scenario YAML")],
         planner: Annotated[Optional[str], typer.Option(help="planner (default: the scenario's)")] = None,
         output: Annotated[Optional[str], typer.Option("-o", "--output", help="write the Plan JSON here ('-': stdout)")] = None):
    """Plan alone: print the plan, or write it as Plan JSON."""
    from hpipe.io import write_text
    from hpipe.planners import make_plan

    setup = _load_setup(scenario)
    name = _planner_names(planner or setup.scenario.planner.kind)
    if len(name) != 1:
        raise InputError("plan takes one planner", field="--planner")
    p = make_plan(setup, name[0])
    text = p.model_dump_json(indent=2)
    write_text(output or "-", text)


# ---- simulate --------------------------------------------------------------
def _results_table(title: str, results, measured: bool = False) -> Table:
    """One row per result; infeasible ones say so, with their reasons as the table's caption."""
    notes = [f"{r.planner}: {r.infeasible.removeprefix(r.planner + ': ')}" for r in results if not r.feasible]
    t = Table(title=title, caption="\n".join(notes) or None, caption_justify="left")
    cols = ["planner", "latency s", "tokens/s", "energy J", "bubble", "max mem MB", "stages", "slices", "µbatches"]
    if measured:
        cols[1:1] = ["predicted s"]
        cols += ["max |err|"]
    for c in cols:
        t.add_column(c, justify="left" if c == "planner" else "right")
    for r in results:
        if not r.feasible:
            t.add_row(r.planner, *(["infeasible"] if not measured else ["-", "infeasible"]),
                      *(["-"] * (len(cols) - (2 if not measured else 3))))
            continue
        row = [r.planner]
        if measured:
            row.append(f"{r.predicted_latency_s:.4g}" if r.predicted_latency_s is not None else "-")
        row += [f"{r.latency_s:.4g}", f"{r.throughput_tokens_per_s:,.0f}", f"{r.energy_j:,.1f}",
                f"{r.bubble_fraction:.1%}", f"{max(r.peak_memory_mb.values(), default=0):,.0f}",
                str(len(r.plan.stages)), str(len(r.plan.slices)), str(r.plan.micro_batches)]
        if measured:
            row.append(f"{r.max_abs_error:.2e}" if r.max_abs_error is not None else "-")
        t.add_row(*row)
    return t


def _write_outputs(result, json_path, trace, plot):
    from hpipe.io import write_text

    if trace:
        from hpipe.sim.trace import chrome_trace

        write_text(trace, json.dumps(chrome_trace(result)))
    if plot:
        from hpipe.sim.trace import gantt_png

        gantt_png(result, plot)
    if json_path:
        write_text(json_path, result.model_dump_json(indent=2))


@app.command()
def simulate(scenario: Annotated[Path, typer.Argument(help="scenario YAML")],
             planner: Annotated[Optional[str], typer.Option(help="a planner, a comma list, or all (default: the scenario's)")] = None,
             plan: Annotated[Optional[Path], typer.Option("--plan", help="simulate the Plan(s) in this JSON file instead")] = None,
             json_path: JsonOpt = None,
             trace: Annotated[Optional[str], typer.Option(help="Chrome trace (Perfetto) of the timelines")] = None,
             plot: Annotated[Optional[str], typer.Option(help="Gantt chart PNG of the timelines")] = None,
             quiet: QuietOpt = False):
    """Plan and simulate; a table of every planner asked for, side by side."""
    from hpipe.plan import load_plans
    from hpipe.result import Result
    from hpipe.sim import infeasible_result, simulate as run_sim

    setup = _load_setup(scenario)
    if plan is not None and planner is not None:
        raise InputError("give --planner or --plan, not both", field="--plan")
    results = []
    if plan is not None:
        for i, p in enumerate(load_plans(plan)):
            p.check(setup, file=f"{plan}[{i}]" if i else str(plan))
            results.append(run_sim(setup, p))
    else:
        names = _planner_names(planner or setup.scenario.planner.kind)
        from hpipe.planners import make_plan  # only here: --plan must work without the planners

        for name in names:
            try:
                results.append(run_sim(setup, make_plan(setup, name)))
            except InfeasibleError as e:
                if len(names) == 1:
                    raise
                results.append(infeasible_result(setup, name, str(e)))
    result = Result(scenario=setup.name, mode="simulated", results=results)
    _write_outputs(result, json_path, trace, plot)
    con = _out_console(json_path, quiet)
    if con:
        con.print(_results_table(f"{setup.name}: simulated ({setup.model.name}, batch {setup.batch_size} x "
                                 f"{setup.seq_len} tokens, {setup.scenario.costmodel if isinstance(setup.scenario.costmodel, str) else setup.scenario.costmodel['kind']} cost model)", results))
    if results and all(not r.feasible for r in results):
        raise InfeasibleError("no plan is feasible: " + "; ".join(f"{r.planner}: {r.infeasible}" for r in results))


# ---- execute ---------------------------------------------------------------
@app.command()
def execute(scenario: Annotated[Path, typer.Argument(help="scenario YAML")],
            planner: Annotated[Optional[str], typer.Option(help="planner (default: the scenario's)")] = None,
            plan: Annotated[Optional[Path], typer.Option("--plan", help="run the Plan in this JSON file")] = None,
            json_path: JsonOpt = None,
            trace: Annotated[Optional[str], typer.Option(help="Chrome trace of the measured timeline")] = None,
            inputs: Annotated[Optional[Path], typer.Option(help="JSON list of token-id lists, one per sequence")] = None,
            check: Annotated[bool, typer.Option(help="compare with a single-process forward; exit 1 past tolerance")] = False,
            timeout: Annotated[float, typer.Option(help="seconds a worker may wait on a peer before the run is stopped")] = 60.0,
            quiet: QuietOpt = False):
    """Run the plan for real with torch and report measured figures beside the simulated ones."""
    from hpipe.plan import load_plans
    from hpipe.planners import make_plan
    from hpipe.result import Result
    from hpipe.sim import simulate as run_sim

    try:
        from hpipe.runtime import execute as run_exec, load_inputs
    except ImportError as e:
        if getattr(e, "name", None) == "torch":
            raise HpipeError("`hpipe execute` needs torch: pip install 'hpipe[runtime]'") from None
        raise
    setup = _load_setup(scenario)
    if plan is not None and planner is not None:
        raise InputError("give --planner or --plan, not both", field="--plan")
    if plan is not None:
        plans = load_plans(plan)
        if len(plans) != 1:
            raise InputError(f"execute runs one plan, the file holds {len(plans)}", file=str(plan))
        p = plans[0].check(setup, file=str(plan))
    else:
        names = _planner_names(planner or setup.scenario.planner.kind)
        if len(names) != 1:
            raise InputError("execute runs one planner", field="--planner")
        p = make_plan(setup, names[0])
    predicted = run_sim(setup, p)
    if not predicted.feasible:
        raise InfeasibleError(f"plan does not fit: {predicted.infeasible}")
    token_ids = load_inputs(inputs, setup) if inputs else None
    measured = run_exec(setup, p, inputs=token_ids, check=check, timeout_s=timeout, quiet=quiet)
    measured.predicted_latency_s = predicted.latency_s
    result = Result(scenario=setup.name, mode="measured", results=[measured])
    _write_outputs(result, json_path, trace, None)
    con = _out_console(json_path, quiet)
    if con:
        con.print(_results_table(f"{setup.name}: measured on this machine", [measured], measured=True))
    if check and measured.max_abs_error is not None:
        from hpipe.runtime import CHECK_TOLERANCE

        if measured.max_abs_error > CHECK_TOLERANCE[setup.dtype]:
            raise HpipeError(f"--check failed: max |logit error| {measured.max_abs_error:.3g} exceeds "
                             f"{CHECK_TOLERANCE[setup.dtype]:g} for {setup.dtype}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except HpipeError as e:
        err_console.print(f"[bold red]hpipe:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("hpipe: interrupted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err_console.print("hpipe: aborted")
        sys.exit(130)
    except Exception as e:
        # click's usage errors (typer vendors its own click) carry their exit code (2) and a message
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        raise

if __name__ == "__main__":
    main()
