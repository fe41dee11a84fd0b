"""Timelines out of a Result: Chrome trace event JSON (Perfetto) and a Gantt PNG.

Both work on any ``Result`` (simulated or measured), so the same picture can be
drawn for a prediction and a measurement.

Chrome trace (https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU):
one *process* per RunResult (named after its planner), one *thread* per device
(its compute and all-reduces), one per link (the transfers between stages) and,
for a tensor-parallel stage's leader, one for the input it forwards to its
peers (a measured forward is sent while the leader computes: on the device's
own thread the bars would cross, which trace viewers cannot draw), named and
ordered with metadata events; work is drawn as complete ("X") events with times
in microseconds.

Gantt: one panel per result on a shared time axis, one row per device (then
one per link), each work item a bar coloured by its slice (by micro-batch when
the plan has a single slice), like the HPipe paper's timeline figure; generation's
decode steps are drawn in shades of red (one shade per decode group) and labelled
``decode gG tT`` in the trace.
"""

from __future__ import annotations

from hpipe.io import write_bytes
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
    if e.phase == "decode":
        return f"decode g{e.micro_batch} t{e.slice}"
    return f"mb{e.micro_batch} s{e.slice}"


def chrome_trace(result: Result) -> dict:
    """The Chrome trace event format (JSON object form) of every result's timeline."""
    out: list[dict] = []
    for pid, r in enumerate(result.results, start=1):
        name = r.planner if r.feasible else f"{r.planner} (infeasible)"
        out.append({"ph": "M", "pid": pid, "tid": 0, "name": "process_name", "args": {"name": name}})
        out.append({"ph": "M", "pid": pid, "tid": 0, "name": "process_sort_index", "args": {"sort_index": pid}})
        devices, links = _tracks(r)
        forwards = list(dict.fromkeys(("forwards", e.device) for e in r.events if e.kind == "transfer" and not e.link))
        tid_of = {}
        for k, track in enumerate(devices + links + forwards, start=1):
            tid_of[track] = k
            label = (track if track in devices else f"link {track}" if track in links
                     else f"{track[1]} forwards to its peers")
            out.append({"ph": "M", "pid": pid, "tid": k, "name": "thread_name", "args": {"name": label}})
            out.append({"ph": "M", "pid": pid, "tid": k, "name": "thread_sort_index", "args": {"sort_index": k}})
        for e in r.events:
            on_link = e.kind == "transfer" and e.link is not None
            track = e.link if on_link else ("forwards", e.device) if e.kind == "transfer" else e.device
            args = {"stage": e.stage, "micro_batch": e.micro_batch, "slice": e.slice, "phase": e.phase}
            if e.kind == "transfer":
                args.update(src=e.device, dst=e.dst, nbytes=e.nbytes)
                name = f"{_label(e)} -> {e.dst}"
            else:
                name = _label(e) if e.kind == "compute" else f"{_label(e)} all-reduce"
            out.append({"ph": "X", "pid": pid, "tid": tid_of[track],
                        "name": name, "cat": e.kind, "ts": e.start_s * _US,
                        "dur": max(e.end_s - e.start_s, 0.0) * _US, "args": args})
    return {"traceEvents": out, "displayTimeUnit": "ms",
            "otherData": {"scenario": result.scenario, "mode": result.mode}}


def _is_network(link: str) -> bool:
    """A link between two hosts' interfaces (device ids are HOST/NAME-i; host names hold no '/')."""
    return all("/" not in end for end in link.split("->"))


def gantt_png(result: Result, path, dpi: int = 110, min_link_share: float = 0.02) -> None:
    """Write a Gantt chart of every result's timeline to ``path`` (atomically).

    Rows: every device, then the links between hosts and any other link busy for at
    least ``min_link_share`` of the makespan (a 32-device cluster has dozens of
    PCIe links that carry a few milliseconds each; they would bury the picture)."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    shown = [r for r in result.results if r.events]
    panels = []
    for r in shown:
        devices, links = _tracks(r)
        span = max(e.end_s for e in r.events) - min(e.start_s for e in r.events)
        busy: dict[str, float] = {}
        for e in r.events:
            if e.kind == "transfer" and e.link:
                busy[e.link] = busy.get(e.link, 0.0) + e.end_s - e.start_s
        kept = [l for l in links if _is_network(l) or busy[l] >= min_link_share * span]
        panels.append((r, devices, kept, len(links) - len(kept)))
    heights = [len(d) * 0.3 + len(l) * 0.22 + 0.9 for _, d, l, _ in panels] or [1.5]
    # A plain Figure on an Agg canvas: no pyplot, so no global state and no display needed.
    fig = Figure(figsize=(12, sum(heights) + 0.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(heights), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": heights})[:, 0]
    if not panels:
        axes[0].text(0.5, 0.5, "no timeline (no plan was simulated)", ha="center", va="center")
        axes[0].set_axis_off()
    t_end = 0.0
    for ax, (r, devices, links, hidden) in zip(axes, panels):
        rows = devices + links
        row_of = {t: k for k, t in enumerate(rows)}
        n_slices = len(r.plan.slices) if r.plan is not None else 1 + max(e.slice for e in r.events)
        n_mb = r.plan.micro_batches if r.plan is not None else 1 + max(e.micro_batch for e in r.events)
        # Colour by slice as the paper does; by micro-batch when there is one slice; by
        # (micro-batch, slice) when there are several of both, so no two items share a colour.
        if n_slices > 1 and n_mb > 1:
            n_colours, what = n_slices * n_mb, None
        elif n_slices > 1:
            n_colours, what = n_slices, "slice"
        else:
            n_colours, what = n_mb, "micro-batch"
        cmap = colormaps["tab20" if n_colours <= 20 else "viridis"]

        row, x0, x1, key, comm, on_link, dec = [], [], [], [], [], [], []
        for e in r.events:
            link = e.link if (e.kind == "transfer" and e.link) else None
            k = row_of.get(link if link else e.device)
            if k is None:  # a quiet link left out
                continue
            row.append(k)
            x0.append(e.start_s)
            x1.append(e.end_s)
            key.append(e.micro_batch * n_slices + e.slice if what is None else
                       (e.slice if what == "slice" else e.micro_batch))
            # all-reduce and tensor-parallel input forwarding: communication on a device
            comm.append(e.kind != "compute" and link is None)
            on_link.append(link is not None)
            dec.append(e.micro_batch if e.phase == "decode" else -1)
        row, x0, x1, key, dec = map(np.asarray, (row, x0, x1, key, dec))
        comm, on_link = np.asarray(comm, bool), np.asarray(on_link, bool)
        colours = (cmap(key % 20) if n_colours <= 20 else cmap(key / max(n_colours - 1, 1))) if len(key) else []
        is_dec = dec >= 0 if len(key) else np.zeros(0, bool)
        if len(key):
            if is_dec.any():  # decode steps: one hue, a shade per group
                n_groups = int(dec.max()) + 1
                colours[is_dec] = colormaps["Reds"](0.45 + 0.45 * dec[is_dec] / max(n_groups - 1, 1))
            colours[comm] = (0.55, 0.55, 0.55, 1.0)
            colours[on_link, 3] = 0.65
            h = np.where(on_link, 0.3, 0.4)
            verts = np.stack([np.stack([x0, row - h], 1), np.stack([x0, row + h], 1),
                              np.stack([x1, row + h], 1), np.stack([x1, row - h], 1)], 1)
            ax.add_collection(PolyCollection(verts, facecolors=colours, edgecolors="none"))
            t_end = max(t_end, float(x1.max()))
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(devices + [f"link {l}" for l in links], fontsize=7)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        if links:
            ax.axhline(len(devices) - 0.5, color="0.7", lw=0.6)
        lat = f"{r.latency_s:.3g} s" if r.latency_s is not None else "-"
        bub = f", bubbles {r.bubble_fraction:.0%}" if r.bubble_fraction is not None else ""
        title = f"{result.scenario} ({result.mode}) - {r.planner}: latency {lat}{bub}"
        if r.ttft_s is not None:
            title += f", TTFT {r.ttft_s:.3g} s" + (f", TPOT {r.tpot_s * 1e3:.3g} ms" if r.tpot_s is not None else "")
        if not r.feasible:
            title += "  [INFEASIBLE]"
        if hidden:
            title += f"  ({hidden} quiet link{'s' if hidden > 1 else ''} not shown)"
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(axis="x", color="0.9", lw=0.5)
        ax.set_axisbelow(True)
        if n_colours <= 20:
            names = ([f"{what} {k}" for k in range(n_colours)] if what else
                     [f"mb{m} s{q}" for m in range(n_mb) for q in range(n_slices)])
            handles = [Patch(color=cmap(k % 20), label=names[k]) for k in range(n_colours)]
            if comm.any():
                handles.append(Patch(color="0.55", label="TP comm"))
            if is_dec.any():
                handles.append(Patch(color=colormaps["Reds"](0.7), label="decode steps (shade: group)"))
            ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.005, 1.0),
                      frameon=False)
        else:  # too many to list: a colour scale of the slice (or micro-batch x slice) index
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import Normalize

            bar = fig.colorbar(ScalarMappable(norm=Normalize(0, n_colours - 1), cmap=cmap), ax=ax, pad=0.01,
                               fraction=0.03)
            bar.set_label(f"{what} (0-{n_colours - 1})" if what else
                          f"micro-batch x {n_slices} + slice (0-{n_colours - 1})", fontsize=7)
            bar.ax.tick_params(labelsize=6)
            if comm.any():
                ax.legend(handles=[Patch(color="0.55", label="TP comm")], fontsize=6, loc="upper right")
    axes[-1].set_xlabel("time (s)")
    axes[-1].set_xlim(0, t_end * 1.01 or 1.0)  # shared: every panel on one time scale
    fig.tight_layout()
    save_figure(fig, path, dpi)


def save_figure(fig, path, dpi: int = 110) -> None:
    """Save ``fig`` in the format its extension names (png, svg, pdf): drawn into memory,
    then written as every output is (``hpipe.io.write_bytes``: whole or not at all, a failed
    write named).

    Like every library writer it makes missing folders; the CLI refuses a missing folder
    the user typed before any work (``hpipe.io.check_outputs``)."""
    import io
    from pathlib import Path

    fmt = Path(path).suffix.lower().lstrip(".") or "png"
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format=fmt)
    write_bytes(path, buf.getvalue())
