"""Generation on the launcher's side: what the workers are told, the tokenizer, and the
one-process reference that ``--check`` and the tests compare the pipelined ids with.

The decode step loop itself runs in the workers (``decode.py``); ``launcher.execute``
asks for it whenever the scenario's ``workload.output_tokens`` is above 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hpipe.errors import InputError
from hpipe import models
from hpipe.models import positions_used
from hpipe.runtime.decode import GenerationConfig, group_sizes
from hpipe.runtime.sampling import Sampler, SamplingConfig


def decode_groups(plan, batch_size: int) -> int:
    """Sequence groups in flight during decode (``Plan.decode_groups``, the simulator's rule)."""
    return plan.decode_groups(batch_size)


def eos_ids(weights: str | None) -> tuple[int, ...]:
    """The end-of-sequence ids of a Hugging Face folder, as transformers' ``generate`` takes
    them: ``generation_config.json``'s ``eos_token_id`` where that file exists (no EOS where
    it names none, whatever config.json says), else config.json's (checked with transformers
    5.25's from_pretrained + generate).  Llama-3-style folders list more ids there
    ([128001, 128009]) than config.json's one, and hpipe had read config.json's first.  None
    for random weights, which then stop at max tokens."""
    if not weights:
        return ()
    gen = Path(weights) / "generation_config.json"
    path = gen if gen.is_file() else Path(weights) / "config.json"
    if not path.is_file():
        return ()
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON: {e}", file=str(path)) from None
    except AttributeError:  # valid JSON, but not an object
        raise InputError("is not a JSON object", file=str(path)) from None
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise InputError(f"{value!r} is not a token id or a list of them", file=str(path), field="eos_token_id")
    return tuple(values)


def check_positions(setup, spec) -> None:
    """A GPT model has learned positions: the prompt and its output must fit them (``spec`` is
    the weights' own, which may have fewer positions than the catalog's)."""
    used = positions_used(setup.seq_len, setup.output_tokens)
    if spec.family == "gpt" and used > spec.max_seq_len:
        raise InputError(f"seq_len {setup.seq_len} + output_tokens {setup.output_tokens} use {used} positions "
                         f"(the last new token is not fed back), more than the model's {spec.max_seq_len}",
                         file=setup.scenario.source_path, field="workload.output_tokens")


def past_trained_context(setup, spec) -> str | None:
    """``models.past_trained_context`` of a run of ``setup`` on the weights' ``spec``."""
    source = ("max_position_embeddings in the weights' config.json, 2048 where it has none" if setup.weights
              else f"the catalog's {spec.name}")
    return models.past_trained_context(spec, setup.seq_len, setup.output_tokens, source)


def generation_config(setup, plan, spec, stream: bool = False) -> GenerationConfig:
    check_positions(setup, spec)
    return GenerationConfig(output_tokens=setup.output_tokens,
                            group_sizes=group_sizes(setup.batch_size, decode_groups(plan, setup.batch_size)),
                            sampling=SamplingConfig.of(setup.sampling), eos_ids=eos_ids(setup.weights),
                            stream=stream)


def reference_generate(spec, source, ids: np.ndarray, output_tokens: int, *, eos: tuple[int, ...] = (),
                       sampling: SamplingConfig = SamplingConfig()) -> tuple[list[list[int]], np.ndarray]:
    """The plain loop, in this process, without a KV cache: every step runs the whole model
    over the prompt and the tokens so far (float32, CPU) and picks from the last position.

    Returns each sequence's new ids (cut after its first EOS) and the prompt's last-position
    logits (B, V).  Deliberately nothing like the pipelined code path: no cache, no slices."""
    import torch

    from hpipe.runtime.model import build_units, run_units

    units = build_units(spec, 0, spec.n_units, source, dtype="float32")
    x = torch.from_numpy(np.ascontiguousarray(ids))  # (B, T)
    B = x.shape[0]
    sampler = Sampler(sampling, B)
    out: list[list[int]] = [[] for _ in range(B)]
    first = None
    with torch.inference_mode():
        for _ in range(output_tokens):
            logits = run_units(units, x, 0)[:, -1]  # (B, V)
            if first is None:
                first = logits.numpy().copy()
            active = [k for k in range(B) if not (out[k] and (out[k][-1] in eos or len(out[k]) >= output_tokens))]
            if not active:
                break
            new = sampler(logits[active], active)
            nxt = x[:, -1].clone()
            for k, tok in zip(active, new):
                out[k].append(int(tok))
                nxt[k] = int(tok)
            x = torch.cat([x, nxt[:, None]], dim=1)
    return out, first


def first_picks_off_the_best(spec, source, prompts: list[list[int]], picks: list[list[int]], tol: float):
    """Teacher-forced, the pipeline's own ids fed back (one forward per sequence over its prompt
    and ``picks``, float32, CPU): per sequence, the first new token whose logit falls more than
    ``tol`` short of the best one at its position, as (its index, the shortfall), or None where
    every pick is within ``tol`` of the best.  A pipelined run in half precision parts from the
    float32 loop at a near-tie and is still correct; this tells it from a wrong pick."""
    import torch

    from hpipe.runtime.model import build_units, run_units

    units = build_units(spec, 0, spec.n_units, source, dtype="float32")  # once for every sequence
    out = []
    for prompt, seq in zip(prompts, picks):
        x = torch.tensor([list(prompt) + list(seq[:-1])])  # (1, T + N - 1)
        with torch.inference_mode():
            logits = run_units(units, x, 0)[0, len(prompt) - 1:]  # (N, V): position i predicts seq[i]
        short = (logits.max(-1).values - logits[torch.arange(len(seq)), torch.tensor(seq)]).tolist()
        out.append(next(((i, d) for i, d in enumerate(short) if d > tol), None))
    return out


def load_tokenizer(weights: str | None):
    """The weights folder's ``tokenizer.json`` (``tokenizers`` library), or None."""
    if not weights:
        return None
    path = Path(weights) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputError("reading tokenizer.json needs the tokenizers library: pip install tokenizers",
                         file=str(path)) from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises its own exception types for a bad file
        raise InputError(f"not a tokenizers file: {str(e).splitlines()[0][:200]}", file=str(path)) from None


def encode(tokenizer, text: str, vocab_size: int, where: str, file: str | None = None) -> list[int]:
    ids = tokenizer.encode(text).ids
    if not ids:
        raise InputError("the prompt has no tokens" + (" (the file is empty)" if file and not text else ""),
                         file=file, field=where)
    bad = [t for t in ids if t >= vocab_size]
    if bad:
        raise InputError(f"the tokenizer gives id {bad[0]}, outside the model's vocabulary of {vocab_size}",
                         file=file, field=where)
    return ids


def decode_text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def ids_without_tokens(tokenizer, ids: list[list[int]]) -> list[int]:
    """The distinct generated ids the tokenizer has no token for, in order of first use: a
    model whose vocabulary is larger than its tokenizer's (padded embeddings, a mismatched
    tokenizer.json) can pick them, and their text is empty."""
    return list(dict.fromkeys(i for seq in ids for i in seq if tokenizer.id_to_token(i) is None))


# -- `hpipe generate`: prompts in, the scenario and plan for them ----------------------------
DEFAULT_NEW_TOKENS = 32
"""`hpipe generate` without --max-new-tokens, on a scenario without workload.output_tokens."""


def prompt_ids(tokenizer, vocab_size: int, *, prompt: str | None = None, prompt_file: str | None = None,
               inputs: str | None = None, weights: str | None = None) -> list[list[int]]:
    """The token ids of each sequence to generate from: a text prompt (one sequence, through
    the tokenizer) or a JSON list of token-id lists, all of one length (no padding here)."""
    given = [n for n, v in (("--prompt", prompt), ("--prompt-file", prompt_file), ("--inputs", inputs))
             if v is not None]
    if len(given) != 1:
        raise InputError("give exactly one of --prompt TEXT, --prompt-file FILE or --inputs IDS.json"
                         + (f" (got {', '.join(given)})" if given else ""), field="--prompt")
    if inputs is not None:
        from hpipe.io import read_json

        data = read_json(inputs)
        if not isinstance(data, list) or not data or not all(isinstance(s, list) and s for s in data):
            raise InputError("expected a JSON list of non-empty token-id lists, one per sequence", file=inputs)
        for i, seq in enumerate(data):
            if len(seq) != len(data[0]):
                raise InputError(f"{len(seq)} tokens, but sequence 0 has {len(data[0])}: sequences are not "
                                 f"padded, give prompts of one length", file=inputs, field=f"[{i}]")
            for j, t in enumerate(seq):
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                    raise InputError(f"{t!r} is not a token id of the model (0 .. {vocab_size - 1})",
                                     file=inputs, field=f"[{i}][{j}]")
        return data
    where = "--prompt" if prompt is not None else "--prompt-file"
    if tokenizer is None:
        why = (f"the weights folder {weights} has no tokenizer.json" if weights else
               "the scenario has no weights folder (random weights have no tokenizer)")
        raise InputError(f"a text prompt needs a tokenizer, but {why}; give token ids with --inputs IDS.json",
                         field=where)
    if prompt_file is not None:
        try:
            prompt = Path(prompt_file).read_text(encoding="utf-8-sig")  # a BOM is not text
        except FileNotFoundError:
            raise InputError("no such file", file=prompt_file) from None
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read the file: {e}", file=prompt_file) from None
    return [encode(tokenizer, prompt, vocab_size, where, file=prompt_file)]


def setups_for(scenario, ids: list[list[int]], new_tokens: int, costmodel: dict | None = None):
    """(the Setup to run, the Setup to plan on): the scenario with its workload replaced by
    the prompts' shape (batch = prompts, seq_len = their tokens) and ``new_tokens``, and its
    cost model by ``costmodel`` where given (what ``costmodel: auto`` chose for the scenario as
    written: both Setups priced alike, on the profile `hpipe execute` measures, whatever the
    prompt's shape).

    Plans slice the sequence in multiples of planner.token_granularity; a prompt of another
    length is planned rounded up to one and the plan's last slices cut back
    (``fit_slices``).  The Setup that runs keeps the prompt's exact length."""
    import math

    from hpipe.scenario import parse_scenario

    data = scenario.model_dump(exclude_unset=True, exclude={"source_path"})
    batch, seq_len = len(ids), len(ids[0])
    g = scenario.planner.token_granularity
    data["workload"] = {**data["workload"], "seq_len": seq_len, "batch_size": batch, "output_tokens": new_tokens}
    planner = dict(data.get("planner") or {})
    if planner.get("micro_batches"):
        planner["micro_batches"] = min(planner["micro_batches"], batch)
    data["planner"] = {**planner, "token_granularity": math.gcd(seq_len, g)}
    if costmodel is not None:
        data["costmodel"] = costmodel
    file = scenario.source_path
    run = parse_scenario(data, file).resolve()
    if seq_len % g == 0:
        return run, run
    data["workload"]["seq_len"] = -(-seq_len // g) * g
    data["planner"]["token_granularity"] = g
    return run, parse_scenario(data, file, planning_only=True).resolve()


def fit_slices(slices: list[int], seq_len: int) -> list[int]:
    """A plan's slices cut back from the end to ``seq_len`` tokens (or the last one grown)."""
    out = list(slices)
    extra = sum(out) - seq_len
    while extra > 0:
        cut = min(extra, out[-1] - 1) if len(out) == 1 else min(extra, out[-1])
        out[-1] -= cut
        extra -= cut
        if out[-1] == 0:
            out.pop()
    if extra < 0:
        out[-1] -= extra
    return out
