"""Which codec each stage boundary of a plan uses: a pass after the partition and slicing.

Given a plan (its stages, slices and micro-batches fixed), try every assignment of
``none`` or an allowed codec to the boundaries with at most
``compression.max_lossy_hops`` lossy ones, scored by the exact makespan
(``evaluate.makespan_s``, which charges the wire bytes to the hop and encode /
decode to the stages), and keep the fastest; ties go to fewer lossy hops, so a
codec that saves nothing is not used.  For a fixed partition and slicing this is
exact.  Where the assignments are too many to try (``MAX_ASSIGNMENTS``), a greedy
pass adds one (boundary, codec) at a time, the one that shortens the makespan most.

Not searched jointly: the partition and slicing are chosen as if uncompressed;
a codec that makes a slow link cheap might favour another cut or finer slices.

Only the ``hpipe`` planner uses this.  The baselines stay uncompressed: they stand
for the published systems (GPipe, TeraPipe, Megatron-LM), which send activations
as they are, so the comparison shows what compression adds.
"""

from __future__ import annotations

import itertools
import math

from hpipe.planners.evaluate import makespan_s

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


def _score(setup, plan, codecs) -> float:
    return makespan_s(setup, plan.model_copy(update={"codecs": list(codecs)}))


def choose_codecs(setup, plan):
    """The plan with the codecs that make it fastest (at most max_lossy_hops lossy), its
    ``predicted`` updated; unchanged when the scenario allows no compression."""
    comp = setup.compression
    nb = len(plan.stages) - 1
    if comp is None or nb == 0 or comp.max_lossy_hops == 0:
        return plan
    allow = list(dict.fromkeys(comp.allow))
    plain = ["none"] * nb
    base = _score(setup, plan, plain)
    best, best_t = plain, base
    if n_assignments(nb, len(allow), comp.max_lossy_hops) <= MAX_ASSIGNMENTS:
        for cand in assignments(nb, allow, comp.max_lossy_hops):
            t = _score(setup, plan, cand)
            if t < best_t:  # strict: fewer lossy hops win ties (they come first)
                best, best_t = cand, t
    else:
        while sum(c != "none" for c in best) < comp.max_lossy_hops:
            step = min(((_score(setup, plan, best[:h] + [c] + best[h + 1:]), h, c)
                        for h in range(nb) if best[h] == "none" for c in allow), default=None)
            if step is None or step[0] >= best_t:
                break
            best_t, h, c = step
            best = best[:h] + [c] + best[h + 1:]
    if best == plain:
        return plan
    predicted = {**plan.predicted, "latency_s": best_t, "uncompressed_latency_s": base}
    return plan.model_copy(update={"codecs": best, "predicted": predicted})
