"""Which codec each stage boundary of a plan uses: a pass after the partition and slicing.

Given a plan (its stages, slices and micro-batches fixed), try every assignment of
``none`` or an allowed codec to the boundaries with at most
``compression.max_lossy_hops`` lossy ones, scored by the exact makespan
(``evaluate.makespan_s``, which charges the wire bytes to the hop and encode /
decode to the stages; for a generating scenario, its figures end to end ranked by
the planner's objective), and keep the best by the rule below; a codec that saves
nothing is never used.  For a fixed partition and slicing this is exact.  Where the
assignments are too many to try (``MAX_ASSIGNMENTS``), a greedy pass adds one
(boundary, codec) at a time, each step chosen by the same rule among the next ones.

Loss is weighed by a tolerance, ``compression.min_gain`` (``pick``): of the plans within
that share of the fastest (by the objective, then by latency), the least lossy
(``codecs.assignment_loss``) wins.  So a plan
stays raw unless a codec saves that share, and int4 is taken over int8 only where it saves
that much more.  The fastest alone had put int4 on hexgen-70b to save 0.03% over int8.

The partition and slicing are not searched jointly with the codecs, but
``plan_compressed`` gives the codec pass more than the uncompressed plan to work on:
it also plans as if every link carried each allowed codec's wire bytes (a cost model
whose transfers shrink by the codec's ratio; encode and decode left out), because on a
slow link the uncompressed search may rightly avoid the link altogether, which no
codec choice afterwards can undo.  Every candidate's codec assignments then go into one
``pick`` (by exact makespan; generating, by the objective end to end).

Only the ``hpipe`` planner uses this.  The baselines stay uncompressed: they stand
for the published systems (GPipe, TeraPipe, Megatron-LM), which send activations
as they are, so the comparison shows what compression adds.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from hpipe.codecs import assignment_loss, get_codec
from hpipe.errors import InfeasibleError
from hpipe.planners.common import predicted_figures

MAX_ASSIGNMENTS = 4096


def assignments(n_boundaries: int, allow, max_lossy: int):
    """Every codec assignment with at most ``max_lossy`` lossy boundaries, fewest lossy first."""
    for k in range(min(max_lossy, n_boundaries) + 1):
        for hops in itertools.combinations(range(n_boundaries), k):
            for names in itertools.product(allow, repeat=k):
                out = ["none"] * n_boundaries
                for h, c in zip(hops, names):
                    out[h] = c
                yield out


def n_assignments(n_boundaries: int, n_allow: int, max_lossy: int) -> int:
    return sum(math.comb(n_boundaries, k) * n_allow ** k for k in range(min(max_lossy, n_boundaries) + 1))


def _key(setup, fig: dict) -> tuple[float, ...]:
    """What plans are ranked by, smaller better: the scenario's objective (``planner.objective``)
    where it generates, else the latency.  Ranking by the prefill alone had picked, with int8
    allowed and 8 new tokens, a plan 5% slower end to end than the uncompressed one."""
    if setup.output_tokens:
        from hpipe.planners.decode import objective_key

        return objective_key(fig, setup.objective)
    return (fig["latency_s"],)


def _score(setup, plan, codecs) -> tuple[dict, tuple[float, ...]]:
    """The plan with these codecs: its predicted figures (generating: end to end, the prefill
    the codecs shorten and the decode steps, which travel raw but run on the partition the
    codecs came with) and its rank."""
    fig = predicted_figures(setup, plan.model_copy(update={"codecs": list(codecs)}))
    return fig, _key(setup, fig)


def pick(cands, min_gain: float):
    """The least lossy of ``cands`` within ``min_gain`` of the fastest, then the faster.  Each
    is (key, loss, item): ``_key``'s key, and ``assignment_loss``'s loss.  The tolerance
    applies figure by figure: within ``min_gain`` of the best objective (the key's first
    figure), then of the best latency among those (its tie-break: codecs leave a plan's TPOT
    as it is, so on the objective alone raw always tied and won).  So a lossless candidate is
    kept unless the fastest saves ``min_gain``, and int4 is taken over int8 only where it saves
    that much more."""
    near = list(cands)
    for i in range(len(near[0][0])):
        best = min(c[0][i] for c in near)
        near = [c for c in near if c[0][i] * (1.0 - min_gain) <= best]
    return min(near, key=lambda c: (c[1], c[0]))


class _CompressedLinks:
    """A cost model as it is, but every transfer carries ``ratio`` of its bytes (the planners'
    view of links under a codec; the model's own all-reduces and scatters are unchanged)."""

    def __init__(self, cost, ratio: float):
        self._cost, self._ratio = cost, ratio

    def __getattr__(self, name):
        return getattr(self._cost, name)

    def transfer_time_s(self, src, dst, nbytes):
        return self._cost.transfer_time_s(src, dst, np.asarray(nbytes, float) * self._ratio)


def plan_compressed(setup, plan_fn):
    """``plan_fn(setup)``'s plan and the plans it makes on links shrunk by each allowed codec,
    each with every codec assignment (``codec_options``); the one ``pick`` takes of them all.
    Without compression in the scenario: ``plan_fn(setup)`` as it is."""
    plan = plan_fn(setup)
    comp = setup.compression
    if comp is None or comp.max_lossy_hops == 0:
        return plan
    plans = [plan]
    k = 1 << 20
    for name in dict.fromkeys(comp.allow):
        ratio = get_codec(name).wire_bytes(k, setup.dtype_bytes) / (k * setup.dtype_bytes)
        try:
            cand = plan_fn(dataclasses.replace(setup, cost=_CompressedLinks(setup.cost, ratio)))
        except InfeasibleError:  # cannot happen where the plain search found a plan; be safe
            continue
        # its figures were the shrunk links' view: priced again as it runs, raw
        plans.append(cand.model_copy(update={"predicted": {**cand.predicted, **predicted_figures(setup, cand)}}))
    # one pick over every plan's options: picking per plan first had dropped int4 from the
    # plain plan's (int8 was within 1% of it), and int8 alone then lost to raw, although raw
    # was not within 1% of int4 (paper-llama7b with int8 and int4 allowed)
    options = [o for p in plans for o in codec_options(setup, p)]
    chosen = pick(options, comp.min_gain)[2]()
    if not chosen.codecs:
        return chosen
    # what compressing buys against the best plan without codecs (not only this plan raw: a
    # plan made on shrunk links may be slow raw; hpipe plan prints the share saved)
    raw = min((o for o in options if o[1] == 0), key=lambda o: o[0])[2]()
    return chosen.model_copy(update={"predicted": {**chosen.predicted,
                                                   "uncompressed_plan_latency_s": raw.predicted["latency_s"]}})


def choose_codecs(setup, plan):
    """The plan with the codecs ``pick`` takes of ``codec_options``; unchanged when the
    scenario allows no compression."""
    comp = setup.compression
    if comp is None or len(plan.stages) < 2 or comp.max_lossy_hops == 0:
        return plan
    return pick(codec_options(setup, plan), comp.min_gain)[2]()


def codec_options(setup, plan) -> list[tuple]:
    """(key, loss, make, codecs) of the plan's codec assignments (at most max_lossy_hops lossy):
    raw first, then every assignment, or past ``MAX_ASSIGNMENTS`` the greedy pass's steps.
    ``_key``: the makespan, or for a generating scenario the objective end to end;
    ``make()``: the plan with those codecs and its ``predicted`` updated
    (``uncompressed_latency_s``: the same plan without codecs, end to end where it
    generates), or the plan itself for raw."""
    comp = setup.compression
    nb = len(plan.stages) - 1
    allow = list(dict.fromkeys(comp.allow))
    plain = ["none"] * nb
    base_fig, base_key = _score(setup, plan, plain)

    def option(cand):
        fig, key = _score(setup, plan, cand)
        predicted = {**plan.predicted, **fig, "uncompressed_latency_s": base_fig["latency_s"]}
        return (key, assignment_loss(cand), lambda: plan.model_copy(update={"codecs": cand, "predicted": predicted}),
                cand)

    out = [(base_key, 0.0, lambda: plan, plain)]
    if nb == 0:
        return out
    if n_assignments(nb, len(allow), comp.max_lossy_hops) <= MAX_ASSIGNMENTS:
        return out + [option(c) for c in assignments(nb, allow, comp.max_lossy_hops) if c != plain]
    chosen = out[0]  # greedy: one more lossy boundary at a time, each step worth min_gain
    while sum(c != "none" for c in chosen[3]) < comp.max_lossy_hops:
        codecs = chosen[3]
        nexts = [codecs[:h] + [c] + codecs[h + 1:] for h in range(nb) if codecs[h] == "none" for c in allow]
        step = pick([chosen, *map(option, nexts)], comp.min_gain)
        if step is chosen:
            break
        chosen = step
        out.append(chosen)
    return out
