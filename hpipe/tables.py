"""The tables the command line prints, and how they format numbers.

One place for every table so they agree: times with four significant digits
("4.000" beside "0.002083"), memory in GB (10^9 bytes, as every message says),
money in US dollars; no table wider than an 80-column terminal for the usual
case (two-line headers, stages/slices/micro-batches folded into one column, no
vertical rules).  An infeasible planner is marked ✗ and its reason printed once,
under the table, planners with the same reason grouped.  Piped into a file or
another program, a table's title and caption are whole lines and no line ends in
spaces (``console``).
"""

from __future__ import annotations

import copy
import math
from collections import Counter

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hpipe.overrides import all_numbers, value_text

MB_PER_GB = 1e3  # RunResult.peak_memory_mb is in MB (10^6 bytes)


def sig(x: float | None, n: int = 4) -> str:
    """``x`` with ``n`` significant digits, trailing zeros kept: 4.000, 0.002083, 12.37, 1,235."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    if abs(x) < 10 ** (n - 1):  # whole numbers from there up, every digit kept
        x = float(f"{x:.{n - 1}e}")  # rounded before its digits are counted: 9.9996 is 10.00, not 10.000
    if abs(x) >= 10 ** (n - 1):
        return f"{x:,.0f}"
    decimals = n - 1 - math.floor(math.log10(abs(x)))
    return f"{x:,.{max(decimals, 0)}f}"


def money(x: float | None) -> str:
    """US dollars, four significant digits ($0.002851, $12.37)."""
    return "-" if x is None else "$" + sig(x)


def gb_of_mb(mb: float | None) -> str:
    """A table cell of memory in GB from a Result's MB (3 significant digits; - for none)."""
    return "-" if mb is None else sig(mb / MB_PER_GB, 3)


def shape(plan) -> str:
    """stages/slices/micro-batches, e.g. 4/70/1, and the plan's lossy codecs: 2/6/1 int8."""
    if plan is None:
        return "-"
    lossy = codecs_of(plan)
    return f"{len(plan.stages)}/{len(plan.slices)}/{plan.micro_batches}" + (f" {lossy}" if lossy else "")


def codecs_of(plan) -> str:
    """The plan's lossy codecs, each with its number of boundaries past one: 'int8', 'int8×2,int4'
    ('' when it compresses nothing)."""
    counts = Counter(c for c in plan.codecs or () if c != "none")  # in plan order
    return ",".join(c if k == 1 else f"{c}×{k}" for c, k in counts.items())


def reason_of(r) -> str:
    """Why a result is infeasible (``sim.infeasible_result`` keeps the planner's name out of it:
    it is printed beside)."""
    return r.infeasible or "infeasible"


def infeasible_notes(results, values=None) -> list[str]:
    """One line per distinct reason: 'base, gpipe infeasible: <reason>'.  ``values``: the
    sweep value of each result, named beside its planner: 'gpipe (at 4, 16) infeasible: ...'."""
    groups: dict[str, dict[str, list[str]]] = {}
    for i, r in enumerate(results):
        if not r.feasible:
            at = groups.setdefault(reason_of(r), {}).setdefault(r.planner, [])
            if values is not None:
                at.append(str(values[i]))
    return [", ".join(p + (f" (at {', '.join(at)})" if at else "") for p, at in names.items())
            + f" infeasible: {reason}" for reason, names in groups.items()]


class _PlainTable(Table):
    """A table whose cells are plain text, never markup: they carry the user's names and values
    (a planner named "[/]x" in a Plan JSON raised rich's MarkupError, and "[int8]" vanished)."""

    def add_row(self, *cells, **kwargs) -> None:
        super().add_row(*(Text(c) if isinstance(c, str) else c for c in cells), **kwargs)


def _table(title: str | None, caption: str | None = None) -> Table:
    # plain text, never markup: titles carry the user's names (a scenario named "a[/]b" raised
    # rich's MarkupError) and captions the planners' reasons
    return _PlainTable(title=Text(title, style="table.title") if title else None,
                 caption=Text(caption, style="table.caption") if caption else None,
                 caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                 collapse_padding=True,
                 title_justify="left")


class PipedConsole(Console):
    """A console writing to a pipe or a file, where rich would wrap a table's title and caption
    to the table's width and pad every line with spaces to it: both get in the way of grep,
    diff and a reader's own terminal width.  Tables print as their title, the table and their
    caption, each line as it is; text is never wrapped (``soft_wrap``)."""

    def print(self, *objects, **kw):
        if len(objects) != 1 or not isinstance(objects[0], Table):
            kw.setdefault("soft_wrap", True)  # a note is one line however long: the reader's terminal wraps it
            return super().print(*objects, **kw)
        table = copy.copy(objects[0])
        title, caption = table.title, table.caption
        table.title = table.caption = None
        with self.capture() as cap:
            super().print(table, **kw)
        body = "\n".join(line.rstrip() for line in cap.get().rstrip("\n").split("\n"))
        if title:
            super().print(title, highlight=False, soft_wrap=True)
        super().print(body, markup=False, highlight=False, soft_wrap=True)
        if caption:
            super().print(caption, highlight=False, soft_wrap=True)


def console(stderr: bool = False) -> Console:
    """The console tables go to: the terminal's, or a ``PipedConsole`` 160 columns wide (so a
    table is not squeezed to 80) when stdout (``stderr``: stderr) is not a terminal."""
    con = Console(stderr=stderr)
    return con if con.is_terminal else PipedConsole(stderr=stderr, width=160)


def _max_mem_mb(r) -> float | None:
    return max(r.peak_memory_mb.values(), default=None) if r.peak_memory_mb else None


RESULT_COLUMNS = ("planner", "latency\ns", "tokens\n/s", "energy\nJ", "cost\n$/Mtok", "bubble", "mem\nGB",
                  "stages/\nslices/µb")


GENERATION_RESULT_COLUMNS = ("planner", "latency\ns", "TTFT\ns", "TPOT\nms", "out\ntok/s", "energy\nJ",
                             "mem\nGB", "stages/\nslices/µb", "decode\nµb")
"""simulate with generation: end-to-end latency and the decode figures; prompt tokens/s, the
bubble and the cost stay in the JSON, so that the table fits 80 columns."""


def results_table(title: str, results) -> Table:
    """simulate: one row per planner; with generation, the decode figures instead of the
    prefill's tokens/s and bubble (latency is then end to end)."""
    t = _table(title, "\n".join(infeasible_notes(results)) or None)
    gen = any(r.ttft_s is not None for r in results)
    cols = GENERATION_RESULT_COLUMNS if gen else RESULT_COLUMNS
    for c in cols:
        t.add_column(c, justify="left" if c == "planner" else "right", no_wrap=True)
    for r in results:
        if r.latency_s is None:
            t.add_row(r.planner + " ✗", *(["-"] * (len(cols) - 1)))
            continue
        name = r.planner + ("" if r.feasible else " (infeasible)")
        if gen:
            t.add_row(name, sig(r.latency_s), sig(r.ttft_s), sig(r.tpot_s * 1e3 if r.tpot_s is not None else None),
                      sig(r.output_tokens_per_s), sig(r.energy_j), gb_of_mb(_max_mem_mb(r)), shape(r.plan),
                      str(r.plan.decode_micro_batches or "-") if r.plan else "-")
        else:
            t.add_row(name, sig(r.latency_s), sig(r.throughput_tokens_per_s), sig(r.energy_j),
                      sig(r.usd_per_million_tokens), f"{r.bubble_fraction:.1%}", gb_of_mb(_max_mem_mb(r)),
                      shape(r.plan))
    return t


def measured_table(title: str, measured, predicted) -> Table:
    """execute: one row per figure, measured beside predicted (one run is read down, not across)."""
    t = _table(title)
    for c in ("", "measured", "predicted"):
        t.add_column(c, justify="left" if not c else "right")
    rows = [
        ("latency s", sig(measured.latency_s), sig(predicted.latency_s if predicted else None)),
        ("tokens/s", sig(measured.throughput_tokens_per_s),
         sig(predicted.throughput_tokens_per_s if predicted else None)),
        ("energy J", sig(measured.energy_j), sig(predicted.energy_j if predicted else None)),
        ("cost $/Mtok", sig(measured.usd_per_million_tokens),
         sig(predicted.usd_per_million_tokens if predicted else None)),
        ("bubble", f"{measured.bubble_fraction:.1%}",
         f"{predicted.bubble_fraction:.1%}" if predicted and predicted.bubble_fraction is not None else "-"),
        ("max memory GB", gb_of_mb(_max_mem_mb(measured)), gb_of_mb(_max_mem_mb(predicted) if predicted else None)),
        ("stages/slices/µbatches", shape(measured.plan), shape(measured.plan)),
    ]
    if measured.max_abs_error is not None:
        rows.append(("max |logit error|", f"{measured.max_abs_error:.2e}", "-"))
    for row in rows:
        t.add_row(*row)
    return t


def generation_table(title: str, measured, predicted=None) -> Table:
    """Generation figures, measured beside the simulator's where it predicts them."""
    t = _table(title)
    for c in ("", "latency s", "TTFT s", "TPOT ms", "TPOT p90 ms", "output tokens/s"):  # TPOT in ms as everywhere
        t.add_column(c, justify="left" if not c else "right")

    def ms(v):
        return v * 1e3 if v is not None else None

    def row(name, r):
        t.add_row(name, *(sig(v) for v in (r.latency_s, r.ttft_s, ms(r.tpot_s), ms(r.tpot_p90_s),
                                           r.output_tokens_per_s)))

    if predicted is not None and predicted.feasible:
        row("simulated", predicted)
    row("measured", measured)
    return t


def sweep_table(title: str, key: str, values, runs) -> Table:
    """sweep: one row per (value, planner); tokens/s is in the JSON (batch tokens / latency).
    With generation, TTFT and TPOT beside the end-to-end latency (the figures a decode
    objective is chosen for), and the cost per run only."""
    notes = infeasible_notes([r for run in runs for r in run.results],
                             [value_text(v) for v, run in zip(values, runs) for _ in run.results])
    t = _table(title, "\n".join(notes) or None)
    gen = any(r.ttft_s is not None for run in runs for r in run.results)
    short_key = key.rsplit(".", 1)[-1]
    if len(short_key) > 8 and "_" in short_key:  # bandwidth_gbps -> two header lines
        short_key = short_key.replace("_", "_\n", 1)
    cols = (short_key, "planner", "latency\ns", *(("TTFT\ns", "TPOT\nms") if gen else ()), "energy\nJ",
            "cost\n$/run", *(() if gen else ("cost\n$/Mtok",)), "stages/\nslices/µb")
    for c in cols:
        t.add_column(c, justify="left" if c == "planner" else "right", no_wrap=True)
    # a mapping or a path as the value (costmodel={kind: fitted, profile: ...}) folds within its
    # column rather than pushing the figures past 80 columns
    t.columns[0].no_wrap, t.columns[0].overflow, t.columns[0].max_width = False, "fold", 24
    if not all_numbers(values):
        t.columns[0].justify = "left"  # names and mappings read from the left; numbers line up right
    for i, (v, run) in enumerate(zip(values, runs)):
        for k, r in enumerate(run.results):
            label = value_text(v) if k == 0 else ""
            if r.latency_s is None:
                t.add_row(label, r.planner + " ✗", *(["-"] * (len(cols) - 2)))
                continue
            decode = (sig(r.ttft_s), sig(r.tpot_s * 1e3 if r.tpot_s is not None else None)) if gen else ()
            per_mtok = () if gen else (sig(r.usd_per_million_tokens),)
            t.add_row(label, r.planner + ("" if r.feasible else " ✗"), sig(r.latency_s), *decode,
                      sig(r.energy_j), money(r.cost_usd), *per_mtok, shape(r.plan))
        if len(run.results) > 1 and i < len(values) - 1:  # by position: equal small ints are one object
            t.add_section()
    return t


# ---- the catalogs -----------------------------------------------------------------
def devices_table(devices) -> Table:
    """hpipe devices: datasheet figures, one row per catalog type (the sources are in the JSON)."""
    t = _table("devices (datasheet figures; $/h: on-demand USD per device-hour, where a cloud lists one)")
    for c in ("name", "gener-\nation", "fp16\nTFLOPS", "fp32\nTFLOPS", "mem\nGB", "mem\nGB/s", "power\nW",
              "idle\nW", "link\nGbit/s", "price\n$/h"):
        t.add_column(c, justify="left" if c == "name" else "right", no_wrap=True)
    for d in devices:
        t.add_row(d.name, d.generation, f"{d.fp16_tflops:g}", f"{d.fp32_tflops:g}", f"{d.memory_gb:g}",
                  f"{d.memory_bandwidth_gbps:g}", f"{d.power_w:g}", f"{d.idle_power_w:g}", f"{d.interconnect_gbps:g}",
                  "-" if d.price_per_hour is None else sig(d.price_per_hour))  # four digits, as money()
    return t


def params(n: float) -> str:
    """A parameter count, three significant digits: 6.74B, 69.0B, 3.41M."""
    return f"{sig(n / 1e9, 3)}B" if n >= 1e9 else f"{sig(n / 1e6, 3)}M"


def models_table(models) -> Table:
    """hpipe models: the catalog's shapes."""
    t = _table("models")
    for c in ("name", "family", "params", "layers", "d_model", "heads/\nkv", "d_ff", "vocab", "context"):
        t.add_column(c, justify="left" if c in ("name", "family") else "right", no_wrap=True)
    for m in models:  # context: the positions it was trained on (a GPT's learned ones end there)
        t.add_row(m.name, m.family, params(m.param_count()), str(m.n_layers), str(m.d_model),
                  f"{m.n_heads}/{m.n_kv_heads}", str(m.d_ff), str(m.vocab_size), f"{m.max_seq_len:,}")
    return t


# ---- a readable plan -------------------------------------------------------------
def describe_units(units, start: int, end: int) -> str:
    """Unit range [start, end) in words: 'embed + blocks 0–13 + attn of 14'.

    A contiguous range holds at most a leading lone mlp, whole blocks, a trailing lone attn."""
    sel = units[start:end]
    blocks = [u for u in sel if u.kind in ("attn", "mlp")]
    parts = ["embed"] if sel and sel[0].kind == "embed" else []
    if blocks:
        lead = blocks[0] if blocks[0].kind == "mlp" else None
        trail = blocks[-1] if blocks[-1].kind == "attn" and (len(blocks) > 1 or lead is None) else None
        whole = blocks[(1 if lead else 0):(len(blocks) - 1 if trail else len(blocks))]
        if lead:
            parts.append(f"mlp of {lead.layer}")
        if whole:
            parts.append(_blocks(whole[0].layer, whole[-1].layer))
        if trail:
            parts.append(f"attn of {trail.layer}")
    if sel and sel[-1].kind == "head":
        parts.append("head")
    return " + ".join(parts)


def _blocks(a: int, b: int) -> str:
    return f"block {a}" if a == b else f"blocks {a}–{b}"


def _devices(devs: list[str]) -> str:
    if len(devs) == 1:
        return devs[0]
    return f"{len(devs)}×TP " + ", ".join(devs)


def run_lengths(xs) -> str:
    """[512, 512, 256] -> '512×2, 256'."""
    out, k = [], 0
    while k < len(xs):
        j = k
        while j + 1 < len(xs) and xs[j + 1] == xs[k]:
            j += 1
        out.append(f"{xs[k]}×{j - k + 1}" if j > k else str(xs[k]))
        k = j + 1
    return ", ".join(out)


def plan_table(setup, plan, result=None) -> Table:
    """Per stage: its devices, its layers in words, the predicted compute time of one work
    item (range over slices and micro-batches), its busy time, and memory against what
    the device has; the plan's slices, micro-batches and predicted latency above."""
    import numpy as np

    from hpipe.memory import stage_memory_bytes
    from hpipe.planners.evaluate import item_arrays

    b, n, c = item_arrays(plan, setup.batch_size)  # (items,) each
    mb = max(plan.micro_batch_sizes(setup.batch_size))
    lat = result.latency_s if result is not None else plan.predicted.get("latency_s")
    ttft = result.ttft_s if result is not None else plan.predicted.get("ttft_s")
    tpot = result.tpot_s if result is not None else plan.predicted.get("tpot_s")
    gen = ttft is not None  # a generating plan: the columns below are its prefill's
    decode = ""
    if gen:
        n_new = setup.output_tokens
        decode = f" (TTFT {sig(ttft)} s; {n_new} new token{'s' if n_new != 1 else ''}"
        if tpot is not None:  # one new token: the prefill makes it, no decode step
            groups = plan.decode_groups(setup.batch_size)
            decode += f", TPOT {sig(tpot * 1e3)} ms, decoded as {groups} micro-batch{'es' if groups > 1 else ''}"
        decode += ")"
    title = (f"{setup.name}: {plan.planner} plan, predicted latency {sig(lat)} s{decode}\n"
             f"{len(plan.slices)} {'prefill ' if gen else ''}slice{'s' if len(plan.slices) > 1 else ''} per sequence "
             f"(tokens: {run_lengths(plan.slices)}); "
             + (f"the batch of {setup.batch_size} at once" if plan.micro_batches == 1 else
                f"{plan.micro_batches} micro-batches (sequences each: "
                f"{run_lengths(plan.micro_batch_sizes(setup.batch_size))})"))
    hops = [f"{c} from stage {j} to {j + 1}" for j, c in enumerate(plan.codecs or ()) if c != "none"]
    if hops:  # per message, where encode + compressed transfer + decode beats sending it raw
        title += "\nactivations compressed: " + ", ".join(hops) + " (each message where that pays)"
        # what the loss buys: against the best plan without codecs where the planner says it
        raw_s = plan.predicted.get("uncompressed_plan_latency_s") or plan.predicted.get("uncompressed_latency_s")
        if raw_s and lat:
            title += f"; {sig(raw_s)} s uncompressed, {(raw_s - lat) / raw_s:.1%} less latency"
    t = _table(title, f"per item: compute of one {'prefill ' if gen else ''}(micro-batch, slice), transfers "
                      f"excluded; busy: all {'prefill ' if gen else ''}items; memory: weights + KV cache + "
                      f"workspace, GB (10^9 bytes)")
    for col in ("stage", "devices", "layers", "per item\nms", "busy\ns", "memory GB\nneeds / usable"):
        t.add_column(col, justify="right" if col not in ("devices", "layers") else "left",
                     overflow="fold")
    for k, st in enumerate(plan.stages):
        times = np.asarray(setup.cost.stage_compute_s(st.start, st.end, st.devices, n, c, b), float) * np.ones_like(n)
        per = (sig(times.min() * 1e3) if np.isclose(times.min(), times.max(), rtol=1e-3)
               else f"{sig(times.min() * 1e3, 3)}–{sig(times.max() * 1e3, 3)}")
        need = stage_memory_bytes(setup, st.start, st.end, st.tp, max(plan.slices), mb)
        have = min(setup.cluster.device(d).usable_memory_bytes for d in st.devices)
        t.add_row(str(k), _devices(st.devices), describe_units(setup.units, st.start, st.end), per,
                  sig(float(times.sum())), f"{sig(need / 1e9, 3)} / {sig(have / 1e9, 3)}")
    return t


# ---- profile and validate ---------------------------------------------------------------
def holdout_table(report: dict, title: str) -> Table:
    """hpipe profile: the fitted model's error on the grid points it was not fitted on."""
    t = _table(title)
    for c in ("device", "unit", "points\nfit", "held\nout", "median\nerror", "p90\nerror", "max\nerror"):
        t.add_column(c, justify="left" if c in ("device", "unit") else "right", no_wrap=True)
    for dev, kinds in report.items():
        for kind, e in kinds.items():
            t.add_row(dev, kind, str(e["n_fit"]), str(e["n_holdout"]), f"{e['median_rel_error']:.1%}",
                      f"{e['p90_rel_error']:.1%}", f"{e['max_rel_error']:.1%}")
    return t


def links_table(prof) -> Table:
    """hpipe profile: each link and all-reduce group as fitted (latency + bytes / bandwidth)."""
    t = _table("links (fitted on ping-pong between the device processes)")
    for c in ("between", "latency\nus", "bandwidth\nGbit/s", "emulated as"):
        t.add_column(c, justify="left" if c in ("between", "emulated as") else "right")
    for lk in prof.links:
        em = "-"
        if lk.emulated:
            lat = (f", {lk.emulated.latency_us:g} us" if lk.emulated.latency_us is not None
                   else ", latency not emulated")
            em = f"{lk.emulated.bandwidth_gbps:g} Gbit/s{lat}"
        t.add_row(" <-> ".join(lk.between), f"{lk.latency_us:,.0f}", f"{lk.bandwidth_gbps:.3g}", em)
    for ar in prof.all_reduces:
        t.add_row("all-reduce " + ", ".join(ar.devices), f"{ar.latency_us:,.0f}", f"{ar.bandwidth_gbps:.3g}", "-")
    return t


def validation_table(result) -> Table:
    """hpipe validate: each distinct case, simulated against measured (and decode's figures)."""
    t = _table(f"validation: simulated (fitted profile) vs measured latency on {result.hardware or 'this machine'}")
    decoding = any(c.output_tokens for c in result.cases)
    for c in ("scenario", "planner", "stages", "slices", "µbatches", "simulated\ns", "measured\ns", "error",
              *(("tokens", "TPOT sim\nms", "TPOT meas\nms", "TPOT\nerror", "TTFT\nerror") if decoding else ())):
        t.add_column(c, justify="left" if c in ("scenario", "planner", "stages") else "right")

    def ms(v):
        return f"{v * 1e3:.2f}" if v is not None else "-"

    def pct(v):
        return f"{v:+.1%}" if v is not None else "-"

    # devices by name within their host, unless the cases span hosts (a/core-0 and b/core-0)
    hosts = {dev.split("/", 1)[0] for c in result.cases for d, _ in c.stages for dev in d}

    def name(dev: str) -> str:
        return dev.split("/", 1)[1] if len(hosts) == 1 else dev

    for c in result.cases:
        stages = " | ".join(f"{name(d[0])}:{u[0]}-{u[1]}" if len(d) == 1 else f"{len(d)}xTP:{u[0]}-{u[1]}"
                            for d, u in c.stages)
        dec = ()
        if decoding:
            dec = ((f"{c.output_tokens} x {c.decode_micro_batches}g", ms(c.simulated_tpot_s), ms(c.measured_tpot_s),
                    pct(c.tpot_error), pct(c.ttft_error)) if c.output_tokens else ("prefill", "", "", "", ""))
        t.add_row(c.scenario, c.planner + "".join(f" = {o}" for o in c.same_plan_as), stages, str(len(c.slices)),
                  str(c.micro_batches), sig(c.simulated_latency_s), sig(c.measured_latency_s),
                  f"{c.error:+.1%}" + (" *" if c.oversubscribed else ""), *dec)
    return t
