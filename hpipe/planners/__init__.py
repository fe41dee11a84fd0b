"""Planners: HPipe's two dynamic programs (``partition``, ``slicing``, joined in
``joint``) and the paper's baselines (``baselines``), behind one registry.

``make_plan(setup, name)`` returns a checked ``Plan`` that fits memory and carries
``predicted["latency_s"]``, the exact makespan (``evaluate.makespan_s``); a
request that cannot fit raises ``InfeasibleError`` saying by how much.  Where the
scenario allows compression, hpipe's plan then gets a codec per boundary
(``codecs.plan_compressed``).
"""

from __future__ import annotations

from typing import Callable

from hpipe.errors import InputError, suggest
from hpipe.plan import Plan
from hpipe.planners import baselines
from hpipe.planners.codecs import plan_compressed
from hpipe.planners.joint import plan_hpipe
from hpipe.planners.slicing import check_token_units

REGISTRY: dict[str, Callable] = {
    "hpipe": plan_hpipe,
    "base": baselines.plan_base,
    "gpipe": baselines.plan_gpipe,
    "gpipe-balanced": baselines.plan_gpipe_balanced,
    "terapipe": baselines.plan_terapipe,
    "megatron": baselines.plan_megatron,
    "tp-terapipe": baselines.plan_tp_terapipe,
    "single": baselines.plan_single,
}
SLICING = frozenset({"hpipe", "terapipe", "tp-terapipe", "single"})
"""The planners that cut the sequence with Algorithm 2 (``slicing.SliceGrid``), whose tables
bound the token units (``slicing.check_token_units``)."""


def make_plan(setup, name: str | None = None) -> Plan:
    """Plan ``setup`` with the named planner (default: the scenario's ``planner.kind``)."""
    name = name or setup.scenario.planner.kind
    if name not in REGISTRY:
        raise InputError(f"unknown planner {name!r}{suggest(name, REGISTRY)}; one of {', '.join(REGISTRY)}",
                         field="planner")
    if name in SLICING:
        check_token_units(setup)
    if name == "hpipe":  # the baselines stay uncompressed (hpipe.planners.codecs says why)
        return plan_compressed(setup, REGISTRY[name])
    return REGISTRY[name](setup)


__all__ = ["REGISTRY", "SLICING", "make_plan"]
