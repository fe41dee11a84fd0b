"""What the commands say on stderr beside their results: which cost model ``costmodel: auto``
chose, what a --set changed nothing of, a profile that does not describe the run, what the run
did not emulate, other load on the machine, a long run ahead.  Said, so that nothing the user
asked for is ignored in silence; printed here, never in the engines."""

from __future__ import annotations

import os
from pathlib import Path

from rich.markup import escape

from hpipe.tables import console

err_console = console(stderr=True)


def auto_note(setup, scenario: Path, swept: str | None = None) -> tuple[str | None, bool]:
    """What ``costmodel: auto`` chose for ``setup`` and why, for stderr, and whether it is a
    warning (datasheet figures where a profile could be measured: said even with --quiet).
    ``swept``: a sweep's key, whose value the advice leaves out where the profile it would
    measure is the one the value needs (``profile_needs``; the sweep names the values each
    note holds for, and says a note once for all of them)."""
    choice = getattr(setup.cost, "auto", None)
    if choice is None:
        return None, False
    if choice.used == "roofline" and choice.runs_here:
        import shlex

        from hpipe.overrides import format_key, overridden_keys, parse_key
        from hpipe.runtime.here import format_duration
        from hpipe.runtime.profile_cache import estimate_profile_s

        # the same --set options: they are part of what the profile is measured for (its cache key)
        skip = format_key(parse_key(swept)) if swept else None
        given = "".join(f" --set {shlex.quote(a)}" for k, a in zip(overridden_keys(setup.scenario.overrides),
                                                                   setup.scenario.overrides) if k != skip)
        # `hpipe profile` measures the finer grid with more sweeps: several times the quick one
        return (f"{choice.note()}\n  planning on datasheet figures; `hpipe execute {scenario}{given}` measures "
                f"this machine once (a quick profile, about {format_duration(estimate_profile_s(setup))}; "
                f"`hpipe profile {scenario}{given}` a finer one, about "
                f"{format_duration(estimate_profile_s(setup, quick=False, warmup=2, repeats=5))}) and later runs "
                f"plan on it"), True
    return choice.note(), False


def profile_needs(setup) -> tuple:
    """What a profile must have measured to be taken for ``setup`` (``profiler.stale_reason``):
    its cache key (machine, model, workload shape, devices, links), whether it timed decode
    steps, the codecs the scenario allows.  A sweep's advice leaves its value out only where the scenario
    as given needs the same profile."""
    from hpipe.costmodels.cache import profile_key
    from hpipe.models import decode_steps

    comp = setup.compression
    return (profile_key(setup), decode_steps(setup.output_tokens) > 0,
            tuple(sorted(comp.allow)) if comp is not None else ())


def long_cpu_run(setup, p, timeout: float, warmup: int) -> None:
    """Before a run on this machine's CPU that the roofline puts past a minute: say so, and
    how long one work item may take where that nears ``--timeout``."""
    from hpipe.runtime.here import CPU_ESTIMATE_WARN_S, cpu_estimate_s, format_duration

    estimate = cpu_estimate_s(setup, p, warmup=warmup)
    if estimate is None or estimate[0] <= CPU_ESTIMATE_WARN_S:
        return
    total_s, item_s = estimate
    runs = "the warm-up and measured runs" if warmup else "the run"
    err_console.print(f"[yellow]note:[/] this plan runs on this machine's CPU; a rough estimate "
                      f"(roofline, a catalog CPU core per worker thread) is {format_duration(total_s)} "
                      f"for {runs}. Ctrl-C stops it."
                      + (f" One work item may take ~{format_duration(item_s)}: give --timeout above that."
                         if item_s > timeout / 2 else ""), highlight=False)


def past_context(setup, spec=None) -> None:
    """A warning (said with --quiet too) where the workload runs a rotary model past the
    context it was trained on: ``spec`` the weights' own (a run), else the scenario's model."""
    if spec is not None:
        from hpipe.runtime.generation import past_trained_context

        note = past_trained_context(setup, spec)
    else:
        from hpipe.models import past_trained_context

        m = setup.model
        note = past_trained_context(m, setup.seq_len, setup.output_tokens,
                                    "its model.max_seq_len" if isinstance(setup.scenario.model, dict)
                                    else f"the catalog's {m.name}")
    if note:
        err_console.print(f"[yellow]note:[/] {escape(note)}.", highlight=False)


def past_context_in_sweep(key: str, values_text: list[str], setups) -> None:
    """``past_context`` for a sweep: one warning naming the values whose workload runs the model
    past its trained context (each value's model may differ: grouped by model)."""
    from hpipe.models import past_trained_context

    past: dict[tuple[str, int], list[str]] = {}
    for v, setup in zip(values_text, setups):
        m = setup.model
        if past_trained_context(m, setup.seq_len, setup.output_tokens, source="") is not None:
            past.setdefault((m.name, m.max_seq_len), []).append(v)
    for (name, ctx), at in past.items():
        err_console.print(f"[yellow]note:[/] {escape(key)} = {escape(', '.join(at))}: the workload runs {escape(name)} "
                          f"past the {ctx} positions it was trained on; rotary positions compute there, so the "
                          f"plans and their figures hold, but the model's outputs there usually degrade.",
                          highlight=False)


DATASHEET_SPEED = ("peak_tflops", "memory_bandwidth_gbps", "generation")
"""A device's datasheet figures that only the roofline reads."""


def _sets_of(setup, swept: str | None, keep) -> list[str]:
    """The --set assignments whose key ``keep`` takes, as given; a sweep's (``swept``,
    KEY=V1,V2,...) in place of the one value ``setup`` holds."""
    from hpipe.overrides import overridden_keys

    given = setup.scenario.overrides
    return [swept if swept and swept.startswith(k + "=") else a for k, a in zip(overridden_keys(given), given)
            if keep(k)]


def unpriced_sets(setup, swept: str | None = None) -> None:
    """A --set of a device's datasheet speed changes nothing under a fitted model (its profile's
    measurements price the device): said, not ignored in silence.  ``swept``: a sweep's
    KEY=V1,V2,... as given, said in place of the one value this setup holds."""
    if getattr(setup.cost, "name", None) != "fitted":
        return
    # codecs the profile did not time are priced as memory passes at the datasheet bandwidth
    speed = DATASHEET_SPEED if setup.compression is None else tuple(f for f in DATASHEET_SPEED
                                                                     if f != "memory_bandwidth_gbps")
    moot = _sets_of(setup, swept, lambda k: k.startswith("cluster.") and k.rsplit(".", 1)[-1] in speed)
    if moot:
        err_console.print(f"[yellow]note:[/] {escape(', '.join('--set ' + a for a in moot))}: the fitted profile "
                          f"prices the devices from its measurements, so a datasheet figure changes nothing "
                          f"here; --set costmodel=roofline prices it", highlight=False, soft_wrap=True)


def unused_network(setup, swept: str | None = None) -> None:
    """A --set of ``cluster.network`` where no pair of hosts crosses it (one host, or a
    ``cluster.links`` entry for every pair) changes nothing: said, not ignored in silence (a
    sweep over its bandwidth read the same latency at every value; the profile cache key leaves
    such a network out too).  ``swept``: as for ``unpriced_sets``."""
    cluster = setup.scenario.cluster
    moot = _sets_of(setup, swept, lambda k: k == "cluster.network" or k.startswith("cluster.network."))
    if not moot or cluster.network_crossed():
        return
    why = ("the scenario has one host" if len(cluster.hosts) == 1
           else "every pair of hosts has its own entry in cluster.links")
    err_console.print(f"[yellow]note:[/] {escape(', '.join('--set ' + a for a in moot))}: {why}, so no transfer "
                      f"crosses cluster.network and it changes nothing here", highlight=False, soft_wrap=True)


HOST_TP_PLANNERS = ("megatron", "tp-terapipe")
"""Baselines whose tensor-parallel groups are a host's devices, alike or not."""


def unlike_groups(setup, plan, file: str) -> None:
    """A given plan's tensor-parallel stage that no planner would form (across hosts, or of
    devices unlike in datasheet or memory, ``planners.groups.device_kind``, outside a
    megatron or tp-terapipe plan) runs and is simulated, but one mistyped device id makes
    such a group: said, not taken in silence."""
    from hpipe.planners.groups import device_kind

    cluster = setup.cluster
    for i, st in enumerate(plan.stages):
        if len({device_kind(cluster, d) for d in st.devices}) < 2:
            continue
        hosts = list(dict.fromkeys(cluster.device(d).host for d in st.devices))
        if len(hosts) == 1 and plan.planner in HOST_TP_PLANNERS:
            continue  # what those baselines make: a host's devices, whatever they are
        what = (f"spans hosts {', '.join(hosts)}" if len(hosts) > 1
                else "mixes devices that differ in datasheet or memory")
        err_console.print(f"[yellow]note:[/] {escape(file)}: stage {i}'s tensor-parallel group {what} "
                          f"({escape(', '.join(st.devices))}); the hpipe planner groups only identical devices "
                          f"of one host, {' and '.join(HOST_TP_PLANNERS)} the devices of one host. It runs, each "
                          f"shard waiting for the slowest, its all-reduces over the slowest link between them",
                          highlight=False, soft_wrap=True)


MICRO_BATCH_PLANNERS = ("gpipe", "gpipe-balanced", "megatron")
"""The planners that read planner.micro_batches (hpipe.planners.baselines); the others choose."""


def unused_planner_settings(setup, names: list[str], swept: tuple[str, str] | None = None) -> None:
    """Scenario settings that some of the planners run here do not read, said rather than
    ignored in silence: ``planner.micro_batches`` (gpipe, gpipe-balanced and megatron only),
    ``compression`` and ``planner.objective`` (hpipe only: the baselines stand for systems that
    send activations as they are and plan their own way; without new tokens every objective is
    the latency), ``workload.sampling`` without new tokens.  ``swept``: a sweep's (key, its values as
    given), said in place of the one value ``setup`` holds."""
    sc = setup.scenario
    said = []
    mb = sc.planner.micro_batches
    if swept and swept[0] == "planner.micro_batches":
        mb = swept[1]
    others = [n for n in names if n not in MICRO_BATCH_PLANNERS]
    if mb is not None and others:
        how = [f"{n} chooses its own" if n == "hpipe" else f"{n} runs the batch at once" for n in others]
        said.append(f"planner.micro_batches = {mb} is for {', '.join(MICRO_BATCH_PLANNERS)} only; {', '.join(how)}")
    # a swept field whose values differ in what is read: ``setup`` (the first value) cannot say
    varies = swept is not None and (swept[0] in ("compression", "workload", "workload.output_tokens")
                                    or swept[0].startswith(("compression.", "workload.sampling")))
    plain = [n for n in names if n != "hpipe"]
    if setup.compression is not None and plain and not varies:
        said.append(f"compression is hpipe's; {', '.join(plain)} send{'s' if len(plain) == 1 else ''} "
                    f"activations uncompressed, as the systems they stand for do")
    objective = swept[1] if swept and swept[0] == "planner.objective" else sc.planner.objective
    if objective != "latency":
        if not setup.output_tokens and not varies:
            said.append(f"planner.objective = {objective}: the scenario generates no tokens "
                        f"(workload.output_tokens is 0), so every objective ranks plans by latency")
        elif plain:
            how = ("plans as the system it stands for does" if len(plain) == 1
                   else "plan as the systems they stand for do")
            said.append(f"planner.objective = {objective} is hpipe's; {', '.join(plain)} {how}, whatever the objective")
    for line in said:
        err_console.print(f"[yellow]note:[/] {escape(line)}", highlight=False, soft_wrap=True)
    if not varies:
        unused_sampling(setup)


def unused_sampling(setup) -> None:
    """``workload.sampling`` settings nothing reads: any without new tokens; top_k, top_p and
    seed where the temperature is 0 (greedy picks the most likely token)."""
    sampling = setup.scenario.workload.sampling
    if "sampling" not in setup.scenario.workload.model_fields_set:
        return
    if not setup.output_tokens:
        line = "workload.sampling is for new tokens, and workload.output_tokens is 0"
    else:
        given = [f for f in ("top_k", "top_p", "seed") if f in sampling.model_fields_set]
        if sampling.temperature != 0 or not given:
            return
        line = (f"workload.sampling.{', '.join(given)} {'is' if len(given) == 1 else 'are'} for sampling; "
                f"at temperature 0 generation is greedy (the most likely token)")
    err_console.print(f"[yellow]note:[/] {escape(line)}", highlight=False, soft_wrap=True)


def replaced_by_prompts(scenario, ids, given_new_tokens: int | None) -> None:
    """generate takes the batch and length from the prompts, and the new tokens from
    --max-new-tokens where given: a --set of those workload fields changes nothing, said."""
    from hpipe.overrides import overridden_keys

    shape = {"workload.seq_len": f"the prompts' length ({len(ids[0])})",
             "workload.batch_size": f"the number of prompts ({len(ids)})"}
    if given_new_tokens:
        shape["workload.output_tokens"] = f"--max-new-tokens ({given_new_tokens})"
    for key, text in zip(overridden_keys(scenario.overrides), scenario.overrides):
        if key in shape:
            err_console.print(f"[yellow]note:[/] {escape('--set ' + text)} changes nothing here: generate takes "
                              f"{escape(shape[key])}", highlight=False, soft_wrap=True)


def uncovered(setup) -> str | None:
    """Where the scenario's fitted profile does not cover what is planned or simulated (decode
    steps, the workload's tokens or batch, a device or its placement, an allowed codec): one
    line to say, or None.  Wherever the profile was made (another machine's is a fair basis
    for a prediction); ``foreign_profile`` adds this machine for a run measured here."""
    from hpipe.costmodels.fitted import Fitted
    from hpipe.costmodels.profile import coverage_gap

    if not isinstance(setup.cost, Fitted):
        return None
    gap = coverage_gap(setup.cost.profile, setup)
    if gap is None:
        return None
    # an untimed codec is priced as memory passes at the device bandwidth (Fitted.modelled_codecs)
    what = ("that codec's time is modelled, not measured" if "codec on" in gap else
            "the prediction there is not grounded in a measurement")
    return f"note: the fitted profile {setup.cost.profile_path} does not cover this scenario ({gap}); {what}"


def floored_latency(setup) -> str | None:
    """A line where the fitted model priced a link at the floor of its measurement: asked for a
    latency below what the link measured (less what netem added there), it cannot go lower, so
    latencies under that floor all read the same; None where none was."""
    links = getattr(setup.cost, "latency_floored_links", None)
    if not links:
        return None
    pairs = sorted({" <-> ".join(sorted(p)) for p in links})
    return (f"note: {', '.join(pairs)} asked for a latency below what the profile measured there "
            f"(less any latency netem added): priced at the measurement, so latencies under it read the same")


def unpriced(setup, results) -> str | None:
    """A line where a feasible plan's $/run and $/Mtok are blank because a device it uses has no
    ``price_per_hour``, in a scenario that prices some device or sets a price (a price swept
    over such devices had printed only blanks, with no word why); None otherwise (where
    nothing is priced, blank cost columns are what the README says)."""
    from hpipe.overrides import overridden_keys

    cluster = setup.cluster
    blank = {d for r in results if r.feasible and r.cost_usd is None and r.plan is not None for d in r.plan.devices}
    missing = sorted({cluster.device(d).spec.name for d in blank if cluster.device(d).spec.price_per_hour is None})
    some = (any(cluster.device(d).spec.price_per_hour is not None for d in cluster.device_ids)
            or any(k.endswith("price_per_hour") for k in overridden_keys(setup.scenario.overrides)))
    if not missing or not some:
        return None
    return (f"note: $/run and $/Mtok are blank where a plan uses {', '.join(missing)}: "
            f"{'it has' if len(missing) == 1 else 'they have'} no price_per_hour (set one on the device entry)")


def say(*lines: str | None) -> None:
    """Each of ``lines`` that is a line (``uncovered``, ``floored_latency``, ``unpriced``) on stderr,
    as written."""
    for line in lines:
        if line:
            err_console.print(line, markup=False, highlight=False, soft_wrap=True)


def foreign_profile(setup) -> None:
    """Before a run measured beside its prediction: say so when the scenario's fitted profile
    does not describe this run (made on another CPU, by another torch or profiler, or short
    of what the run needs).  ``costmodel: auto`` picks this machine's own, made for the scenario
    as written: `hpipe generate` of a prefill-only scenario still finds it short of decode steps."""
    from hpipe.costmodels.fitted import Fitted
    from hpipe.costmodels.profile import decode_gap
    from hpipe.runtime.profiler import stale_reason

    if not isinstance(setup.cost, Fitted):
        return
    why = stale_reason(setup.cost.profile, setup)
    if why:
        decode = why == decode_gap(setup.cost.profile, setup)
        fix = ("a profile of the scenario with workload.output_tokens times its decode steps too (under costmodel: "
               f"auto, `hpipe execute SCENARIO --set workload.output_tokens={max(setup.output_tokens, 8)}` "
               f"measures one)" if decode else
               "`hpipe profile SCENARIO -o PROFILE.json` measures this machine")
        err_console.print(f"[yellow]note:[/] the fitted profile {escape(str(setup.cost.profile_path))} does not "
                          f"describe this run ({escape(why)}), so the prediction beside the measurement may not "
                          f"hold; {fix}", highlight=False)


def not_emulated(measured) -> None:
    """What the scenario describes that this run did not emulate: said even with --quiet, since
    it changes what the measured figures mean (not_emulated in the JSON too)."""
    for gap in measured.not_emulated or ():
        err_console.print(f"[yellow]note:[/] not as the scenario describes: {escape(gap)}", highlight=False,
                          soft_wrap=True)


def untokenized(tokenizer, measured) -> None:
    """A warning where the text leaves generated ids out: the tokenizer has no token for them."""
    from hpipe.runtime.generation import ids_without_tokens

    if tokenizer is None or not measured.generated_ids:
        return
    missing = ids_without_tokens(tokenizer, measured.generated_ids)
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        err_console.print(f"[yellow]note:[/] the model generated ids that tokenizer.json has no token for ({shown}: "
                          f"its vocabulary has {tokenizer.get_vocab_size()}); the text leaves them out, the ids "
                          f"(generated_ids in the JSON) keep them", highlight=False)


def other_load(con, measured) -> None:
    """Say so when other processes computed beside the run: its times then include them."""
    from hpipe.runtime.machine_load import OTHER_CPU_NOTE_CORES

    other = measured.other_cpu_cores
    if other is not None and other >= OTHER_CPU_NOTE_CORES:
        con.print(f"[yellow]note:[/] other processes kept {other:.1f} of this machine's {os.cpu_count()} CPUs "
                  f"busy on average during the run; the measured times include their interference "
                  f"(other_cpu_cores in the JSON). For figures to compare with the prediction, run on a "
                  f"quiet machine.", highlight=False)
