"""Timelines out of a Result: Chrome trace event JSON (Perfetto) and a Gantt PNG.

Both work on any ``Result`` (simulated or measured), so the same picture can be
drawn for a prediction and a measurement.

Chrome trace (https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU):
one *process* per RunResult (named after its planner), one *thread* per device
(its compute, all-reduces and, for a tensor-parallel stage, the input it
forwards to its peers) and one per link (the transfers between stages), named
and ordered with metadata events; work is drawn as complete ("X") events with
times in microseconds.

Gantt: one panel per result on a shared time axis, one row per device (then
one per link), each work item a bar coloured by its slice (by micro-batch when
the plan has a single slice), like the HPipe paper's timeline figure.
"""

from __future__ import annotations

from hpipe.io import atomic_path
from hpipe.result import Result, RunResult

_US = 1e6


def _tracks(r: RunResult) -> tuple[list[str], list[str]]:
    """Device rows (in plan order) and link rows (in order of first use)."""
    devices = list(r.plan.devices) if r.plan is not None else []
    links: list[str] = []
    seen_dev, seen_link = set(devices), set()
    for e in r.events:
        if e.kind == "transfer" and e.link:
            if e.link not in seen_link:
                seen_link.add(e.link)
                links.append(e.link)
        elif e.device not in seen_dev:
            seen_dev.add(e.device)
            devices.append(e.device)
    return devices, links


def _label(e) -> str:
    return f"mb{e.micro_batch} s{e.slice}"


def chrome_trace(result: Result) -> dict:
    """The Chrome trace event format (JSON object form) of every result's timeline."""
    out: list[dict] = []
    for pid, r in enumerate(result.results, start=1):
        name = r.planner if r.feasible else f"{r.planner} (infeasible)"
        out.append({"ph": "M", "pid": pid, "tid": 0, "name": "process_name", "args": {"name": name}})
        out.append({"ph": "M", "pid": pid, "tid": 0, "name": "process_sort_index", "args": {"sort_index": pid}})
        devices, links = _tracks(r)
        tid_of = {}
        for k, track in enumerate(devices + links, start=1):
            tid_of[track] = k
            label = track if track in devices else f"link {track}"
            out.append({"ph": "M", "pid": pid, "tid": k, "name": "thread_name", "args": {"name": label}})
            out.append({"ph": "M", "pid": pid, "tid": k, "name": "thread_sort_index", "args": {"sort_index": k}})
        for e in r.events:
            on_link = e.kind == "transfer" and e.link is not None
            args = {"stage": e.stage, "micro_batch": e.micro_batch, "slice": e.slice}
            if e.kind == "transfer":
                args.update(src=e.device, dst=e.dst, nbytes=e.nbytes)
                name = f"{_label(e)} -> {e.dst}"
            else:
                name = _label(e) if e.kind == "compute" else f"{_label(e)} all-reduce"
            out.append({"ph": "X", "pid": pid, "tid": tid_of[e.link if on_link else e.device],
                        "name": name, "cat": e.kind, "ts": e.start_s * _US,
                        "dur": max(e.end_s - e.start_s, 0.0) * _US, "args": args})
    return {"traceEvents": out, "displayTimeUnit": "ms",
            "otherData": {"scenario": result.scenario, "mode": result.mode}}


def gantt_png(result: Result, path, dpi: int = 110) -> None:
    """Write a Gantt chart of every result's timeline to ``path`` (atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; a no-op if a backend is set
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    shown = [r for r in result.results if r.events]
    n_rows = [sum(map(len, _tracks(r))) for r in shown]
    heights = [max(rows, 1) * 0.32 + 0.9 for rows in n_rows] or [1.5]
    fig, axes = plt.subplots(len(heights), 1, figsize=(12, sum(heights) + 0.6), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    axes = axes[:, 0]
    if not shown:
        axes[0].text(0.5, 0.5, "no timeline (no feasible plan)", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, r in zip(axes, shown):
        devices, links = _tracks(r)
        rows = devices + links
        row_of = {t: k for k, t in enumerate(rows)}
        n_slices = len(r.plan.slices) if r.plan is not None else 1 + max(e.slice for e in r.events)
        n_mb = r.plan.micro_batches if r.plan is not None else 1 + max(e.micro_batch for e in r.events)
        # Colour by slice as the paper does; by micro-batch when there is one slice; by
        # (micro-batch, slice) when there are several of both, so no two items share a colour.
        if n_slices > 1 and n_mb > 1:
            n_colours, key, what = n_slices * n_mb, (lambda e: e.micro_batch * n_slices + e.slice), None
        elif n_slices > 1:
            n_colours, key, what = n_slices, (lambda e: e.slice), "slice"
        else:
            n_colours, key, what = n_mb, (lambda e: e.micro_batch), "micro-batch"
        cmap = colormaps["tab20" if n_colours <= 20 else "viridis"]

        def colour(e):
            k = key(e)
            return cmap(k % 20) if n_colours <= 20 else cmap(k / max(n_colours - 1, 1))

        bars: dict[int, tuple[list, list, list]] = {}
        for e in r.events:
            on_link = e.kind == "transfer" and e.link is not None
            k = row_of[e.link if on_link else e.device]
            spans, colours, hatches = bars.setdefault(k, ([], [], []))
            spans.append((e.start_s, max(e.end_s - e.start_s, 0.0)))
            if e.kind == "compute" or on_link:
                colours.append(colour(e))
            else:  # all-reduce and tensor-parallel input forwarding: communication on a device
                colours.append("0.55")
            hatches.append(e.kind)
        for k, (spans, colours, _) in bars.items():
            is_link = rows[k] in links
            ax.broken_barh(spans, (k - 0.4, 0.8), facecolors=colours, edgecolor="none",
                           alpha=0.6 if is_link else 1.0)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([d for d in devices] + [f"link {l}" for l in links], fontsize=7)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        if links:
            ax.axhline(len(devices) - 0.5, color="0.7", lw=0.6)
        status = "" if r.feasible else "  [INFEASIBLE]"
        lat = f"{r.latency_s:.3g} s" if r.latency_s is not None else "-"
        ax.set_title(f"{r.planner}: latency {lat}, bubbles "
                     f"{r.bubble_fraction:.0%}{status}" if r.bubble_fraction is not None else r.planner,
                     fontsize=9, loc="left")
        ax.grid(axis="x", color="0.9", lw=0.5)
        ax.set_axisbelow(True)
        if n_colours <= 20:
            names = ([f"{what} {k}" for k in range(n_colours)] if what else
                     [f"mb{m} s{q}" for m in range(n_mb) for q in range(n_slices)])
            handles = [Patch(color=cmap(k % 20), label=names[k]) for k in range(n_colours)]
            if any(e.kind != "compute" and not (e.kind == "transfer" and e.link) for e in r.events):
                handles.append(Patch(color="0.55", label="TP comm"))
            ax.legend(handles=handles, fontsize=6, ncol=min(len(handles), 10), loc="lower right",
                      framealpha=0.8)
    axes[-1].set_xlabel("time (s)")
    fig.suptitle(f"{result.scenario} ({result.mode})", fontsize=10)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
