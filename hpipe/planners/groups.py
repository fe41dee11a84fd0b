"""Tensor-parallel groups for hpipe's own search: which degrees a model splits into,
and which devices may form a group.

A stage may run on a group of identical devices of one host (same datasheet, same
usable memory), split Megatron-style: attention by heads, the MLP by its hidden
width.  The planner only proposes degrees that split the model *evenly* (query
heads, key/value heads and d_ff all divisible), so every rank holds 1/tp of each
split unit and the cost model's 1/tp shard is what runs.  (The runtime can also
split unevenly, up to one head per rank; the planner does not propose that.)

Devices of one *kind* are interchangeable, so a group is named by its kind and
degree; the DP in ``partition`` forms groups as runs of consecutive positions of
one kind in a device order (``kind_of``).
"""

from __future__ import annotations

from hpipe.models import tp_degree_ok


def tp_degrees(model, max_tp: int) -> list[int]:
    """Degrees above 1, up to ``max_tp``, that split ``model`` evenly."""
    return [t for t in range(2, max_tp + 1) if tp_degree_ok(model, t)]


def device_kind(cluster, device_id: str) -> tuple:
    """Devices with equal kinds may form a tensor-parallel group: same host, same
    datasheet figures (the name aside), same usable memory."""
    d = cluster.device(device_id)
    return (d.host, d.spec.model_dump_json(exclude={"name", "source"}), d.usable_memory_bytes)
