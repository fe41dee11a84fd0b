"""Generation in the simulator: the decode work items, their feedback edge, and the token times.

Semantics (shared with the runtime's step loop and the planners):

* ``output_tokens = N`` new tokens per sequence.  The first comes from the prefill: the
  last stage samples it from the last slice's logits.  Then N - 1 decode steps follow.
* The batch is regrouped for decode into ``G = plan.decode_micro_batches`` groups
  (contiguous sequences, the first groups one larger, as ``Plan.micro_batch_sizes``
  splits; absent, each prefill micro-batch stays a group).  A decode step of a group is
  one work item: n = 1 token per sequence after c = seq_len + t context tokens, batch b =
  the group's size.
* Every stage runs its items in one order: the prefill items (``Plan.items``), then the
  decode items step-major, ``for t: for g:`` -- so while group g's token travels back,
  the others keep the pipeline busy.
* The feedback edge: decode step t of group g may start on stage 0 only once the last
  stage has finished what made the group's previous tokens (step t - 1 of the group; for
  t = 0 the last prefill slice of every micro-batch holding one of the group's sequences)
  and the sampled ids (``CostModel.token_return_s``) have crossed back from the last
  stage's first device to the first stage's.
* A sequence's k-th token exists when the last stage finishes the item that made it;
  those times go through ``hpipe.result.decode_figures``.

Items are numbered globally: prefill items 0 .. P-1 in ``Plan.items`` order, then decode
item (t, g) at P + t * G + g.  Its Event carries ``phase="decode"``, ``micro_batch=g``
and ``slice=t``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpipe.costmodels import TOKEN_ID_BYTES, split_transfer, with_step_overhead
from hpipe.models import decode_steps
from hpipe.sim.engine import Feedback


def decode_groups(plan) -> int:
    """Decode groups in flight (``Plan.decode_groups``, the runtime's rule too)."""
    return plan.decode_micro_batches or plan.micro_batches  # <= batch: Plan.check bounds both


def split_sizes(batch_size: int, parts: int) -> list[int]:
    q, r = divmod(batch_size, parts)
    return [q + (1 if i < r else 0) for i in range(parts)]


@dataclass(frozen=True)
class DecodeWork:
    """The decode items of a plan on a scenario and what each waits for."""

    seq_len: int
    output_tokens: int
    prefill_sizes: tuple[int, ...]
    """Sequences per prefill micro-batch."""
    n_slices: int
    group_sizes: tuple[int, ...]
    """Sequences per decode group."""

    @classmethod
    def of(cls, setup, plan, groups: int | None = None) -> "DecodeWork":
        return cls(seq_len=setup.seq_len, output_tokens=setup.output_tokens,
                   prefill_sizes=tuple(plan.micro_batch_sizes(setup.batch_size)), n_slices=len(plan.slices),
                   group_sizes=tuple(split_sizes(setup.batch_size, groups or decode_groups(plan))))

    @property
    def steps(self) -> int:
        return decode_steps(self.output_tokens)

    @property
    def n_groups(self) -> int:
        return len(self.group_sizes)

    @property
    def n_prefill(self) -> int:
        return len(self.prefill_sizes) * self.n_slices

    @property
    def n_decode(self) -> int:
        return self.steps * self.n_groups

    def index(self, t: int, g: int) -> int:
        """Global index of decode item (step t, group g)."""
        return self.n_prefill + t * self.n_groups + g

    def items(self) -> list[tuple[int, int, int, int, int]]:
        """Decode items in execution order, as ``Plan.items`` gives prefill ones:
        (group, step, batch, tokens = 1, context)."""
        return [(g, t, b, 1, self.seq_len + t) for t in range(self.steps) for g, b in enumerate(self.group_sizes)]

    def arrays(self):
        """(b, n, c) float arrays of the decode items."""
        it = self.items()
        if not it:
            z = np.zeros(0)
            return z, z, z
        _, _, b, n, c = (np.array(col, float) for col in zip(*it))
        return b, n, c

    def _bounds(self, sizes):
        return np.concatenate(([0], np.cumsum(sizes)))

    def first_token_item(self, seq: int) -> int:
        """The prefill item (its micro-batch's last slice) that makes sequence ``seq``'s first token."""
        mb = int(np.searchsorted(self._bounds(self.prefill_sizes), seq, side="right")) - 1
        return mb * self.n_slices + self.n_slices - 1

    def group_of(self, seq: int) -> int:
        return int(np.searchsorted(self._bounds(self.group_sizes), seq, side="right")) - 1

    def deps(self, t: int, g: int) -> tuple[int, ...]:
        """Items the last stage must finish before decode item (t, g) may start on stage 0."""
        if t > 0:
            return (self.index(t - 1, g),)
        lo, hi = self._bounds(self.group_sizes)[g:g + 2]
        return tuple(sorted({self.first_token_item(k) for k in range(int(lo), int(hi))}))

    def token_items(self, seq: int) -> list[int]:
        """Items whose end on the last stage gives sequence ``seq`` its tokens, in order."""
        g = self.group_of(seq)
        return [self.first_token_item(seq)] + [self.index(t, g) for t in range(self.steps)]


def feedback(setup, plan, work: DecodeWork) -> Feedback | None:
    """The return hop of every decode item (last stage's first device -> first stage's)."""
    from hpipe.sim import bottleneck_link, directed_links, _link_name

    if not work.n_decode:
        return None
    src, dst = plan.stages[-1].devices[0], plan.stages[0].devices[0]
    n_items = work.n_prefill + work.n_decode
    b = np.zeros(n_items)
    b[work.n_prefill:] = work.arrays()[0]
    total = np.asarray(np.broadcast_to(setup.cost.token_return_s(src, dst, b), (n_items,)), float)
    if src == dst:
        links, bottleneck = (), None
    else:
        route = setup.cluster.route(src, dst)
        edges = directed_links(route, src)
        links, bottleneck = tuple(_link_name(e) for e in edges), bottleneck_link(route, edges)
    hold, latency = split_transfer(setup.cluster, src, dst, total)
    if src != dst:  # the ids wake the driver's loop, idle since its last step (CostModel.step_overhead_s)
        hold, latency = with_step_overhead(hold, latency, np.where(np.arange(n_items) >= work.n_prefill,
                                                                   setup.cost.step_overhead_s(src, dst), 0.0))
    chains = [[(work.index(t, g), work.deps(t, g)) for t in range(work.steps)] for g in range(work.n_groups)]
    return Feedback(src=src, dst=dst, links=links, bottleneck=bottleneck, hold_s=hold,
                    latency_s=latency, nbytes=b * TOKEN_ID_BYTES, chains=chains)


def stage_end_times(events, stage: int) -> dict[tuple[str, int, int], float]:
    """When ``stage`` finished each item: {(phase, micro_batch, slice): end}."""
    out: dict = {}
    for e in events:
        if e.stage == stage and e.kind != "transfer":
            key = (e.phase, e.micro_batch, e.slice)
            out[key] = max(out.get(key, e.end_s), e.end_s)
    return out


def token_times(work: DecodeWork, events, n_stages: int, batch_size: int) -> list[list[float]]:
    """Per sequence, when it got each of its generated tokens (the last stage's item ends)."""
    ends = stage_end_times(events, n_stages - 1)
    n_pre = work.n_prefill

    def key(i):
        if i < n_pre:
            return ("prefill", i // work.n_slices, i % work.n_slices)
        t, g = divmod(i - n_pre, work.n_groups)
        return ("decode", g, t)

    return [[ends[key(i)] for i in work.token_items(k)] for k in range(batch_size)]
