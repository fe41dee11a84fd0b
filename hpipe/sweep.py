"""`hpipe sweep`: one scenario field over several values, every planner asked for at each.

``run_sweep`` re-reads the scenario with ``KEY=value`` (``hpipe.overrides``) for each
value, plans and simulates; the answer is a ``SweepResult`` (DESIGN, "Overrides and
sweeps": ``{"sweep": KEY, "values": [...], "runs": [Result JSON per value]}``).
``sweep_plot`` draws latency, energy and cost against the value, one line per planner.
A value the scenario refuses (bad input) stops the sweep with that error; a planner
that cannot fit at a value is an infeasible result in that run, a gap in the plot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

from hpipe.errors import InputError
from hpipe.overrides import all_numbers, value_text
from hpipe.result import Result


class SweepResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sweep: str
    """The dotted key that was varied."""
    values: list[Any]
    """Its values, in the order given."""
    runs: list[Result]
    """One simulated Result per value (every planner asked for)."""


def parse_sweep(assignments: list[str]) -> tuple[str, list[Any], list[str]]:
    """(swept key, its values, the other assignments) from the --set options: exactly one
    of them gives several comma-separated values."""
    from hpipe.overrides import format_key, parse_key, parse_value, split_assignment, split_values

    swept, fixed, seen = [], [], set()
    for a in assignments:
        key, raw = split_assignment(a)
        canonical = format_key(parse_key(key))
        if canonical in seen:
            raise InputError(f"{canonical} is given twice in --set; give it once", field="--set")
        seen.add(canonical)
        vals = split_values(raw)
        (swept if len(vals) > 1 else fixed).append((key, vals, a, canonical))
    if len(swept) != 1:
        raise InputError("give one --set KEY=V1,V2,... with two or more values to sweep" if not swept else
                         f"one key at a time: {', '.join(k for k, _, _, _ in swept)} all have several values",
                         field="--set")
    key, raw_values, _, canonical = swept[0]
    parts = parse_key(key)
    for other, _, text, _ in fixed:  # each value replaces the whole mapping, set after the others
        if parse_key(other)[:len(parts)] == parts:
            raise InputError(f"{canonical} is swept whole, which replaces the --set {text} at every value; "
                             f"give that setting inside each value", field="--set")
    values = [parse_value(v) for v in raw_values]
    kinds = [v.get("kind", "hpipe") if isinstance(v, dict) else v for v in values]
    if canonical == "planner.kind" or (canonical == "planner" and len(set(map(str, kinds))) > 1):
        # the planners to compare are not a scenario value: every value would run the same ones
        raise InputError(f"{key} cannot be swept to change the planner: to compare planners give --planner "
                         f"{','.join(dict.fromkeys(map(str, kinds)))}, and sweep a scenario field (each planner "
                         f"runs at every value; planner.token_granularity=16,32 for one of the planner's)",
                         field="--set")
    seen_values: dict[str, str] = {}
    for raw, v in zip(raw_values, values):
        same = value_text(float(v) if all_numbers([v]) else v)  # 1 and 1.0 are one value
        if same in seen_values:  # it would be planned twice, its rows side by side
            raise InputError(f"{canonical} = {value_text(v)} is given twice ({seen_values[same]!r} and {raw!r}); "
                             f"give each value once", field="--set")
        seen_values[same] = raw
    return key, values, [a for _, _, a, _ in fixed]


def run_sweep(load_setup: Callable[[list[str]], Any], key: str, values: list[Any], planners: list[str],
              on_step: Callable[[str], None] | None = None) -> SweepResult:
    """Plan and simulate ``planners`` at every value of ``key``; ``load_setup(assignments)``
    reads the scenario with those overrides applied."""
    from hpipe.compare import compare_planners

    setups = [load_setup([assignment(key, v)]) for v in values]  # every value checked before any planning
    runs, limits = [], []
    for v, setup in zip(values, setups):
        results, refused = compare_planners(setup, planners,
                                            on_step and (lambda p, v=v: on_step(f"{key}={value_text(v)}: {p}")))
        limits += refused  # a planner's limit at this value: the other values still plan
        # after planning: the cost model lists what it priced how (links reshaped, codecs modelled)
        runs.append(Result(scenario=setup.name, mode="simulated", results=results, cost_model=setup.cost.describe()))
    if limits and len(limits) == len(values) * len(planners):  # nothing planned anywhere: the input's fault
        raise limits[0]
    return SweepResult(sweep=key, values=list(values), runs=runs)


def assignment(key: str, value: Any) -> str:
    """'KEY=VALUE' with a parsed value written back as YAML (flow style)."""
    return f"{key}={value_text(value)}"


def sweep_plot(sweep: SweepResult, path, title: str | None = None, dpi: int = 110):
    """Latency (with generation: TTFT and TPOT too), energy and (where the devices have prices)
    cost per million tokens against the swept value, one line per planner; log axes where the
    values with a feasible plan span decades.  Saved to ``path``; the Figure is returned."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from hpipe.sim.trace import save_figure

    planners = list(dict.fromkeys(r.planner for run in sweep.runs for r in run.results))
    gen = any(r.ttft_s is not None for run in sweep.runs for r in run.results)
    metrics = [("latency_s", "latency (s)"), *([("ttft_s", "TTFT (s)"), ("tpot_s", "TPOT (s)")] if gen else []),
               ("energy_j", "energy (J)"), ("usd_per_million_tokens", "cost ($ per million tokens)")]
    have_cost = any(r.usd_per_million_tokens is not None for run in sweep.runs for r in run.results)
    if not have_cost:
        metrics = metrics[:-1]
    numeric = all_numbers(sweep.values)
    xs = np.asarray(sweep.values, float) if numeric else np.arange(len(sweep.values), dtype=float)
    order = np.argsort(xs, kind="stable")  # lines join numbers left to right, whatever order they were given
    drawn = xs[[any(r.feasible for r in run.results) for run in sweep.runs]]  # the axis spans what has points
    drawn = drawn if len(drawn) else xs
    log_x = numeric and (drawn > 0).all() and drawn.max() / drawn.min() >= 100
    fig = Figure(figsize=(4.2 * len(metrics) + 1.8, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False, sharex=True)[0]  # one x range: TTFT has no point at 0 tokens
    cmap = colormaps["tab10"]
    markers = "osD^v<>ph*"
    for ax, (field, label) in zip(axes, metrics):
        ys_all = []
        for k, p in enumerate(planners):
            ys = []
            for run in sweep.runs:
                r = next((r for r in run.results if r.planner == p), None)
                y = getattr(r, field) if r is not None and r.feasible else None
                ys.append(np.nan if y is None else y)
            ys = np.asarray(ys, float)
            if np.isnan(ys).all():
                continue
            ys_all.append(ys[~np.isnan(ys)])
            ax.plot(xs[order], ys[order], marker=markers[k % len(markers)], ms=4, lw=1.3, color=cmap(k % 10),
                    label=p)
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        if log_x:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(plain)
        if not ys_all:  # say why the axes are empty, rather than show a bare 0-1 frame
            ax.text(0.5, 0.5, "no feasible plan\nat any value", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="0.4")
            ax.set_yticks([])
            if xs.min() < xs.max():
                ax.set_xlim(xs.min(), xs.max())
        if ys_all:
            y = np.concatenate(ys_all)
            if (y > 0).all() and y.max() / y.min() >= 5:  # planners an order apart: keep the close ones apart
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
        if not numeric:
            ax.set_xticks(xs)
            ax.set_xticklabels([value_text(v) for v in sweep.values], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel(sweep.sweep, fontsize=9)
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", color="0.9", lw=0.5)
        ax.set_axisbelow(True)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    missing = sorted({r.planner for run in sweep.runs for r in run.results if not r.feasible})
    sup = title or f"{sweep.runs[0].scenario if sweep.runs else ''}: sweep of {sweep.sweep}"
    if missing:
        sup += f"   (gaps: infeasible — {', '.join(missing)})"
    if not have_cost:
        sup += "   (no cost: a device has no price)"
    fig.suptitle(sup, fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    save_figure(fig, path, dpi)
    return fig
