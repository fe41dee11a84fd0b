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
from hpipe.runtime.decode import GenerationConfig, group_sizes
from hpipe.runtime.sampling import Sampler, SamplingConfig


def decode_groups(plan, batch_size: int) -> int:
    """Sequence groups in flight during decode: the plan's ``decode_micro_batches``, else one
    per stage (enough to keep every stage busy), at most one per sequence."""
    return min(plan.decode_micro_batches or len(plan.stages), batch_size)


def eos_ids(weights: str | None) -> tuple[int, ...]:
    """The end-of-sequence ids of a Hugging Face folder (config.json, then
    generation_config.json); none for random weights, which then stop at max tokens."""
    if not weights:
        return ()
    for name in ("config.json", "generation_config.json"):
        path = Path(weights) / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise InputError(f"not valid JSON: {e}", file=str(path)) from None
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise InputError(f"{value!r} is not a token id or a list of them", file=str(path), field="eos_token_id")
        return tuple(values)
    return ()


def check_positions(setup, spec) -> None:
    """A GPT model has learned positions: the prompt and its output must fit them."""
    total = setup.seq_len + setup.output_tokens
    if spec.family == "gpt" and total > spec.max_seq_len:
        raise InputError(f"seq_len {setup.seq_len} + output_tokens {setup.output_tokens} = {total} exceeds the "
                         f"model's {spec.max_seq_len} positions", file=setup.scenario.source_path,
                         field="workload.output_tokens")


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


def encode(tokenizer, text: str, vocab_size: int, where: str) -> list[int]:
    ids = tokenizer.encode(text).ids
    if not ids:
        raise InputError("the prompt has no tokens", field=where)
    bad = [t for t in ids if t >= vocab_size]
    if bad:
        raise InputError(f"the tokenizer gives id {bad[0]}, outside the model's vocabulary of {vocab_size}",
                         field=where)
    return ids


def decode_text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)
