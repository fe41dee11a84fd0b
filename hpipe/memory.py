"""Per-device memory of a plan: weights, KV cache and activation workspace.

The same figures serve the planners (a stage that does not fit is never
returned), the simulator (peak memory per device, infeasible plans marked)
and the CLI (exit code 3 with the shortfall).
"""

from __future__ import annotations

from dataclasses import dataclass

from hpipe.errors import InfeasibleError
from hpipe.models import tp_degree_ok, tp_largest_shares

SPLIT_KINDS = ("attn", "mlp")
"""Unit kinds a tensor-parallel stage splits (``CostModel.SPLIT_KINDS`` alike)."""


def kv_tokens(setup) -> int:
    """Positions each sequence's KV cache holds: the prompt plus the generated tokens
    (the last generated token is never fed back, but a cache sized to the whole sequence
    is what a runtime allocates)."""
    return setup.seq_len + setup.output_tokens


def stage_memory_bytes(setup, start: int, end: int, tp: int, max_slice: int, micro_batch: int) -> float:
    """Bytes one device of a stage needs: its share of the units' weights (1/tp of the
    split units, attention and MLP; the embedding and head whole, as the leader holds
    them: a TP peer holds no head and needs less), the KV cache of its attention units for the whole batch and
    sequence, prompt plus output (1/tp: key/value heads are split), and the workspace of the largest slice
    of a micro-batch."""
    units = setup.units[start:end]
    db = setup.dtype_bytes
    whole = sum(u.weight_bytes(db) for u in units if u.kind not in SPLIT_KINDS)
    kv = sum(u.kv_bytes_per_token(db) for u in units) * kv_tokens(setup) * setup.batch_size
    if tp_degree_ok(setup.model, tp):  # an even split (all the planners propose): 1/tp of each
        weights = whole + sum(u.weight_bytes(db) for u in units if u.kind in SPLIT_KINDS) / tp
        kv /= tp
    else:  # a hand-written uneven split: the fullest rank, as the runtime splits (attention: at most)
        q, kv_share, ff = tp_largest_shares(setup.model, tp)
        weights = whole + sum(u.weight_bytes(db) * (max(q, kv_share) if u.kind == "attn" else ff)
                              for u in units if u.kind in SPLIT_KINDS)
        kv *= kv_share
    work = max(float(u.workspace_bytes(max_slice, micro_batch, db)) for u in units)
    return weights + kv + work


def gb(nbytes: float) -> str:
    """Bytes as GB with two decimals, or two significant digits below 10 MB (a tiny model's
    shortfall read "0.00 GB short")."""
    x = nbytes / 1e9
    return f"{x:.2f}" if abs(x) >= 0.01 else f"{x:.2g}"


@dataclass(frozen=True)
class Shortfall:
    device: str
    need_bytes: float
    have_bytes: float

    @property
    def short_bytes(self) -> float:
        return self.need_bytes - self.have_bytes

    def __str__(self) -> str:
        return (f"{self.device} needs {gb(self.need_bytes)} GB but has {gb(self.have_bytes)} GB "
                f"usable: {gb(self.short_bytes)} GB short")


def plan_memory_bytes(setup, plan) -> dict[str, float]:
    """Predicted peak bytes of every device the plan uses."""
    mb = max(plan.micro_batch_sizes(setup.batch_size))
    out = {}
    for st in plan.stages:
        need = stage_memory_bytes(setup, st.start, st.end, st.tp, max(plan.slices), mb)
        for d in st.devices:
            out[d] = need
    return out


def plan_shortfalls(setup, plan) -> list[Shortfall]:
    return [Shortfall(d, need, setup.cluster.device(d).usable_memory_bytes)
            for d, need in plan_memory_bytes(setup, plan).items()
            if need > setup.cluster.device(d).usable_memory_bytes]


def model_need_bytes(setup) -> tuple[float, float]:
    """(weights, KV cache) bytes of the whole model at the workload's batch and context."""
    db = setup.dtype_bytes
    weights = sum(u.weight_bytes(db) for u in setup.units)
    if setup.model.tie_embeddings:  # counted twice by the units; one copy is enough on one device
        weights -= setup.model.vocab_size * setup.model.d_model * db
    kv = sum(u.kv_bytes_per_token(db) for u in setup.units) * kv_tokens(setup) * setup.batch_size
    return weights, kv


def model_shortfall_bytes(setup) -> float:
    """How far the whole cluster falls short of holding the model's weights and KV cache
    (0 when it has room, by this lower bound)."""
    have = sum(d.usable_memory_bytes for d in setup.cluster.devices)
    return max(sum(model_need_bytes(setup)) - have, 0.0)


def raise_if_model_cannot_fit(setup) -> None:
    short = model_shortfall_bytes(setup)
    if short > 0:
        weights, kv = model_need_bytes(setup)
        raise InfeasibleError(
            f"{setup.model.name} at batch {setup.batch_size} x {setup.seq_len} tokens"
            + (f" + {setup.output_tokens} new" if getattr(setup, "output_tokens", 0) else "") + f" ({setup.dtype}) "
            f"does not fit in the cluster's memory: {gb(short)} GB short "
            f"(weights {gb(weights)} GB + KV cache {gb(kv)} GB, "
            f"{gb(sum(d.usable_memory_bytes for d in setup.cluster.devices))} GB usable)")
