"""Measured GPU kernel times from ``../shared/reference/gpu-kernels/``, summed into hpipe's units.

The reference holds per-operator prefill times of one transformer block (Vidur's
profiles: A100, H100, A40; Llama-2-7B and 70B; fp16; MIT licence).  This module
reads those rows -- without pandas or torch -- and adds operators up the way the
reference README's table says:

* attention (n, c): ``input_layernorm + attn_pre_proj + attn_rope + attn_post_proj + add``
  from the MLP rows at n tokens, plus ``attn_input_reshape + attn_prefill +
  attn_output_reshape`` from the attention rows at (n, c) (A100 and A40, 7B, TP 1 only);
* mlp (n): ``post_attention_layernorm + mlp_up_proj + mlp_act + mlp_down_proj + add``;
* embed (n): ``emb``.

Every time is the operators' median, in seconds.  Where the source holds two
rows for one key (it repeats some sizes), their medians are averaged.  With
tensor parallelism a row is one rank's shard (all-reduce excluded).

Only benchmarks, tests and fitting scripts use this module; the cost models do
not read the reference at run time (constants derived from it live in
``roofline.py`` with a comment naming the source).  It predicts the cases through a
scenario of one GPU of each type, so it sits above ``hpipe.scenario``, not among the
cost models that a scenario builds.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpipe.scenario import parse_scenario

ENV_VAR = "HPIPE_GPU_REFERENCE"
MLP_FILE = "vidur_mlp_rows.csv"
ATTN_FILE = "vidur_attention_rows.csv"

# Vidur's device folders -> hpipe catalog types.  Vidur profiled the 80 GB SXM A100 and
# the SXM H100 (its device SKU configs: 80 GB each); the A40 is the 48 GB PCIe card.
GPU_TYPES = {"a100": "A100-80GB", "h100": "H100", "a40": "A40"}
# Vidur's model ids -> hpipe catalog models (same shapes; Vidur pads the vocabulary to 32768).
MODELS = {"meta-llama/Llama-2-7b-hf": "llama-2-7b", "meta-llama/Llama-2-70b-hf": "llama-2-70b"}

_ATTN_FROM_MLP_ROWS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "add")
_ATTN_FROM_ATTN_ROWS = ("attn_input_reshape", "attn_prefill", "attn_output_reshape")
_MLP_OPS = ("post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")


@dataclass(frozen=True)
class Case:
    """One measured unit time: ``kind`` of ``model`` on ``gpu`` at tensor-parallel degree ``tp``
    for a slice of n tokens after c context tokens (batch 1)."""

    gpu: str
    """Vidur device folder: a100, h100, a40."""
    model: str
    """hpipe catalog model name (llama-2-7b, llama-2-70b)."""
    tp: int
    kind: str
    """embed | attn | mlp"""
    n: int
    c: int
    seconds: float
    ops: tuple[tuple[str, float], ...] = ()
    """The operators summed, (name, seconds) each."""

    @property
    def device_type(self) -> str:
        return GPU_TYPES[self.gpu]


class ReferenceMissing(Exception):
    """The reference folder (or one of its files) is absent."""


def reference_dir() -> Path:
    """``$HPIPE_GPU_REFERENCE``, else ``../shared/reference/gpu-kernels`` beside the repository
    (the first folder above the repository that holds ``shared/reference/gpu-kernels``, so a git
    worktree nested deeper finds it too)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1]  # hpipe/reference.py -> the repository
    for up in repo.parents:
        cand = up / "shared" / "reference" / "gpu-kernels"
        if cand.is_dir():
            return cand
    return repo.parent / "shared" / "reference" / "gpu-kernels"


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise ReferenceMissing(f"{path} not found (set {ENV_VAR} to the folder holding {MLP_FILE} and {ATTN_FILE})")
    with path.open(newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def _median(row: dict[str, str], op: str) -> float:
    return float(row[f"time_stats.{op}.median"]) * 1e-3  # ms -> s


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def load_cases(folder: str | Path | None = None) -> list[Case]:
    """Every unit time the reference gives, one ``Case`` per (gpu, model, tp, kind, n, c)."""
    folder = Path(folder) if folder is not None else reference_dir()
    mlp_rows = _rows(folder / MLP_FILE)
    attn_rows = _rows(folder / ATTN_FILE)

    # (gpu, model, tp, n) -> op -> [seconds of each duplicate row]
    per_tokens: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in mlp_rows:
        key = (r["gpu"], MODELS[r["model"]], int(r["num_tensor_parallel_workers"]), int(r["num_tokens"]))
        for op in ("emb", *_ATTN_FROM_MLP_ROWS, *_MLP_OPS):
            per_tokens[key][op].append(_median(r, op))
    cases: list[Case] = []
    for (gpu, model, tp, n), ops in sorted(per_tokens.items()):
        emb = _mean(ops["emb"])
        cases.append(Case(gpu, model, tp, "embed", n, 0, emb, (("emb", emb),)))
        parts = tuple((op, _mean(ops[op])) for op in _MLP_OPS)
        cases.append(Case(gpu, model, tp, "mlp", n, 0, sum(t for _, t in parts), parts))

    # attention: (gpu, n, c) -> op -> [seconds]; Llama-2-7B, TP 1, batch 1 only
    per_slice: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in attn_rows:
        if int(r["num_tensor_parallel_workers"]) != 1 or int(r["batch_size"]) != 1:
            continue
        key = (r["gpu"], int(r["prefill_chunk_size"]), int(r["kv_cache_size"]))
        for op in _ATTN_FROM_ATTN_ROWS:
            per_slice[key][op].append(_median(r, op))
    for (gpu, n, c), ops in sorted(per_slice.items()):
        proj = per_tokens.get((gpu, "llama-2-7b", 1, n))
        if proj is None:
            continue  # no projection timings at this slice length
        parts = tuple((op, _mean(proj[op])) for op in _ATTN_FROM_MLP_ROWS) + \
            tuple((op, _mean(ops[op])) for op in _ATTN_FROM_ATTN_ROWS)
        cases.append(Case(gpu, "llama-2-7b", 1, "attn", n, c, sum(t for _, t in parts), parts))
    return cases


def is_fit_case(case: Case) -> bool:
    """The rows the roofline's GPU constants may be fitted on: A100 and A40, Llama-2-7B, TP 1.
    Everything else (H100, Llama-2-70B, TP 2/4/8 shards) is held out."""
    return case.gpu in ("a100", "a40") and case.model == "llama-2-7b" and case.tp == 1


# ---- predicting the cases with hpipe's own cost models ---------------------------------------
def reference_setup(model: str, costmodel, *, dtype: str = "float16"):
    """A Setup holding one device of each reference GPU type (ids ``ref/<type>-0``) and ``model``,
    priced by ``costmodel`` (a scenario ``costmodel:`` value)."""
    data = {"name": f"gpu-reference-{model}", "model": model, "dtype": dtype,
            "workload": {"seq_len": 4096, "batch_size": 1},
            "cluster": {"hosts": [{"name": "ref", "devices": [{"type": t} for t in sorted(set(GPU_TYPES.values()))]}]},
            "costmodel": costmodel, "planner": {"token_granularity": 1}}
    return parse_scenario(data).resolve()


def predict(cases: list[Case], costmodel) -> list[float]:
    """Predicted seconds for every case, by the cost model a scenario's ``costmodel:`` names."""
    setups: dict[str, object] = {}
    out = []
    for cs in cases:
        setup = setups.get(cs.model)
        if setup is None:
            setup = setups[cs.model] = reference_setup(cs.model, costmodel)
        unit = next(u for u in setup.units if u.kind == cs.kind)
        t = setup.cost.unit_time_s(unit, f"ref/{cs.device_type}-0", cs.n, cs.c, 1, cs.tp)
        out.append(float(t))
    return out


# ---- the figures issue 12 asks about -----------------------------------------------------------
SLICINGS = (2, 4, 8)


def stats(ratios) -> dict:
    r = np.asarray(ratios, float)
    e = np.abs(r - 1)
    return {"n": len(r), "median": float(np.median(e)), "p90": float(np.percentile(e, 90)),
            "ratio": float(np.median(r))}


GROUPS = {
    # label: predicate on a Case.  "fit" rows are A100 + A40, Llama-2-7B, TP 1 (is_fit_case).
    "7B TP1 attn+MLP, empty cache, n>=128 (fit GPUs)":
        lambda cs: is_fit_case(cs) and cs.kind in ("attn", "mlp") and cs.c == 0 and cs.n >= 128,
    "issue's 35: 7B TP1 attn+MLP, empty cache (MLP incl. H100)":
        lambda cs: cs.model == "llama-2-7b" and cs.tp == 1 and cs.kind in ("attn", "mlp") and cs.c == 0
        and cs.n >= 128,
    "attention, empty cache": lambda cs: is_fit_case(cs) and cs.kind == "attn" and cs.c == 0,
    "attention, context c>0": lambda cs: is_fit_case(cs) and cs.kind == "attn" and cs.c > 0,
    "attention, all": lambda cs: is_fit_case(cs) and cs.kind == "attn",
    "MLP, n>=128": lambda cs: is_fit_case(cs) and cs.kind == "mlp" and cs.n >= 128,
    "MLP, 1-64 tokens (decode-sized)": lambda cs: is_fit_case(cs) and cs.kind == "mlp" and cs.n < 128,
    "embedding": lambda cs: is_fit_case(cs) and cs.kind == "embed",
    "HOLD-OUT: H100, 70B, TP 2/4/8 MLP, n>=128":
        lambda cs: not is_fit_case(cs) and cs.kind == "mlp" and cs.n >= 128,
    "HOLD-OUT: all MLP (n 1-4096)": lambda cs: not is_fit_case(cs) and cs.kind == "mlp",
    "hold-out: H100 MLP": lambda cs: cs.gpu == "h100" and cs.kind == "mlp",
    "hold-out: Llama-2-70B MLP": lambda cs: cs.model == "llama-2-70b" and cs.kind == "mlp",
    "hold-out: TP 2/4/8 MLP shards": lambda cs: cs.tp > 1 and cs.kind == "mlp",
    "hold-out: embedding": lambda cs: not is_fit_case(cs) and cs.kind == "embed",
}
"""The groups of cases issue 12's targets speak of, in print order."""


def groups(cases) -> dict[str, list[int]]:
    """{group label: indices of its cases} for the labels of GROUPS."""
    return {label: [i for i, cs in enumerate(cases) if pred(cs)] for label, pred in GROUPS.items()}


def context_growth(cases, pred):
    """Per (gpu, n): (t(n, c_max) - t(n, 0)) predicted over measured."""
    by = {(cs.gpu, cs.n, cs.c): (cs.seconds, p) for cs, p in zip(cases, pred) if cs.kind == "attn"}
    out = {}
    for (gpu, n, c) in by:
        if c != 0:
            continue
        cmax = max(cc for (g2, n2, cc) in by if g2 == gpu and n2 == n)
        if cmax == 0:
            continue
        m0, p0 = by[(gpu, n, 0)]
        m1, p1 = by[(gpu, n, cmax)]
        out[(gpu, n, cmax)] = (p1 - p0) / (m1 - m0)
    return out


def slicing(cases, pred, total=4096):
    """Per (gpu, slices k): sum over k equal slices of attention time / one-shot time, measured and
    predicted, where every slice was measured."""
    by = {(cs.gpu, cs.n, cs.c): (cs.seconds, p) for cs, p in zip(cases, pred) if cs.kind == "attn"}
    out = {}
    for gpu in sorted({g for g, _, _ in by}):
        if (gpu, total, 0) not in by:
            continue
        one_m, one_p = by[(gpu, total, 0)]
        for k in SLICINGS:
            n = total // k
            keys = [(gpu, n, i * n) for i in range(k)]
            if all(key in by for key in keys):
                out[(gpu, k)] = (sum(by[key][0] for key in keys) / one_m, sum(by[key][1] for key in keys) / one_p)
    return out
