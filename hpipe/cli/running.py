"""`hpipe execute` and `hpipe generate`: a plan run for real, one process per device
(prefill alone, or prefill then decode with text in and out)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hpipe.cli.common import (
    app, _check_outputs, _check_timeout, _checked_plan, _chosen_planners, _costmodel_name, JsonOpt,
    _load_scenario, _load_setup, _needs_torch, _OnceCommand, _out_console, _plan_given, _planner_names,
    QuietOpt, _reads, _say_written, SetOpt, _write_outputs)
from hpipe import notes
from hpipe.errors import HpipeError, InfeasibleError, InputError
from hpipe.io import is_stdout
from hpipe.tables import console


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

    _check_outputs({"--json": json_path, "--trace": trace, "--plot": plot},
                   _reads(scenario, sets, **{"the --plan file": plan, "the --inputs file": inputs}))
    _check_timeout(timeout)
    with _needs_torch("execute"):
        from hpipe.runtime import execute as run_exec, load_inputs
        from hpipe.runtime.launcher import runtime_spec
    from hpipe.memory import raise_if_model_cannot_fit
    from hpipe.runtime.here import check_cpu_memory, check_cpu_weights, check_placements

    _plan_given(plan, planner, _load_scenario(scenario, sets))
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
    predicted = _fits_here(setup, p, spec)
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


def _fits_here(setup, p, spec):
    """The plan's simulated figures, after the checks every run makes: it fits its devices
    (exit 3) and this machine's memory; then the warnings said even with --quiet."""
    from hpipe.runtime.here import check_cpu_memory
    from hpipe.sim import simulate as run_sim

    predicted = run_sim(setup, p)
    if not predicted.feasible:
        raise InfeasibleError(f"plan does not fit: {predicted.infeasible}")
    check_cpu_memory(setup, p)
    notes.past_context(setup, spec)
    notes.foreign_profile(setup)
    notes.unused_sampling(setup)
    return predicted


def _with_codecs(plan) -> str:
    """What a --check compares a lossy plan against, beyond the model itself."""
    return ", with the plan's codec round trips on the messages it compresses" if plan.lossy else ""


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

    if prompt_file is not None and str(prompt_file) == "-":  # the usual spelling of standard input
        prompt_file = Path("/dev/stdin")
    _check_outputs({"--json": json_path}, _reads(scenario, sets, **{"the --plan file": plan,
                                                                    "the --prompt-file": prompt_file,
                                                                    "the --inputs file": inputs}))
    _check_timeout(timeout)
    with _needs_torch("generate"):
        from hpipe.runtime import generation as gen
        from hpipe.runtime.launcher import execute as run_exec, runtime_spec
    _plan_given(plan, planner, _load_scenario(scenario, sets))
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
    from hpipe.runtime.here import check_cpu_weights, check_placements

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
    predicted = _fits_here(setup, p, spec)
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


