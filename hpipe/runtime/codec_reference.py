"""What a compressed plan's pipelined generation computes, in one process: the reference that
the accuracy figures (``benchmarks/compression.py accuracy``) and the runtime test use.

A pipelined run with codecs differs from the plain model only where a message crosses a
stage boundary through a codec: the receiving stage sees ``decode(encode(x))``.  Which
messages do is the runtime's rule, not this module's:

* a prefill work item's message uses the plan's codec on that boundary where it pays for
  that message (``hpipe.runtime.launcher.item_codecs``, from ``hpipe.codecs.boundary_costs``);
* decode steps always travel raw (they are latency-bound; ``hpipe.runtime.decode``).

``generate`` runs the model's units here along the plan's own work: the prefill micro-batch
by micro-batch and slice by slice through the KV caches, then greedy (or seeded) decode steps
in the plan's decode groups, applying the codec round trip at each boundary to exactly the
messages the runtime would compress.  ``decode_codecs`` compresses decode steps too: a harsher
setting than hpipe runs, for comparison only.

One process, no pipeline: every stage's units run back to back, so the numbers match a run's
up to the float differences of a different schedule (none: the same slices, rows and calls).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hpipe.runtime.codecs import round_trip
from hpipe.runtime.model import make_caches
from hpipe.runtime.sampling import Sampler, SamplingConfig


@dataclass(frozen=True)
class CompressedRun:
    """Where a run's messages go through a codec."""

    boundaries: tuple[int, ...]
    """Unit index where each stage after the first begins (boundary j sits before it)."""
    slices: tuple[int, ...]
    mb_sizes: tuple[int, ...]
    """Rows of each prefill micro-batch, in batch order."""
    group_sizes: tuple[int, ...]
    """Rows of each decode group, in batch order."""
    item_codecs: tuple[tuple[str, ...], ...] | None = None
    """Per boundary, the codec of each prefill work item's message in ``Plan.items`` order
    (micro-batch major, then slice); None: all raw."""
    decode_codecs: tuple[str, ...] | None = None
    """Per boundary, the codec of every decode step's message; None: raw, as hpipe runs it."""

    @classmethod
    def of(cls, setup, plan, *, decode_codecs=None) -> "CompressedRun":
        """The run ``hpipe execute`` makes of ``plan`` (its per-item codecs by the runtime's rule)."""
        from hpipe.runtime.launcher import item_codecs

        per_item = item_codecs(setup, plan)
        return cls(boundaries=tuple(st.start for st in plan.stages[1:]), slices=tuple(plan.slices),
                   mb_sizes=tuple(plan.micro_batch_sizes(setup.batch_size)),
                   group_sizes=tuple(plan.decode_group_sizes(setup.batch_size)),
                   item_codecs=tuple(map(tuple, per_item)) if per_item else None,
                   decode_codecs=tuple(decode_codecs) if decode_codecs else None)

    def compressed_share(self) -> float:
        """Share of the prefill's boundary messages that go through a codec."""
        if not self.item_codecs:
            return 0.0
        flat = [c for per in self.item_codecs for c in per]
        return sum(c != "none" for c in flat) / len(flat)


def _forward(units, x, pos: int, caches, codec_at: dict[int, str]) -> torch.Tensor:
    """One message's worth of work through every unit; the round trip where a stage begins."""
    for u in units:
        name = codec_at.get(u.unit.index, "none")
        if name != "none":
            x = round_trip(x, name)
        x = u(x, pos, caches.get(u.unit.index))
    return x


@torch.inference_mode()
def generate(units, ids, output_tokens: int, run: CompressedRun, *, eos: tuple[int, ...] = (),
             sampling: SamplingConfig = SamplingConfig(), teacher=None,
             step_logits: np.ndarray | None = None) -> tuple[list[list[int]], np.ndarray]:
    """Each sequence's new ids (cut after its first EOS) and the prefill's last-position logits
    (B, V), as the pipelined run of ``run`` makes them.  ``units``: the whole model.

    ``teacher`` (B, output_tokens) ids: feed these to the decode steps instead of the
    sequence's own (teacher forcing, so that logits compare position by position; EOS is then
    ignored); the ids returned are still each step's own choice.  ``step_logits``, an array
    of (B, output_tokens, V), receives the logits each token was chosen from."""
    x_ids = torch.as_tensor(np.ascontiguousarray(ids))  # (B, T)
    B, T = x_ids.shape
    if sum(run.mb_sizes) != B or sum(run.group_sizes) != B or sum(run.slices) != T:
        raise ValueError(f"run shape {run.mb_sizes} x {run.slices} / groups {run.group_sizes} "
                         f"does not cover ids of shape {(B, T)}")
    caches = make_caches(units, B, T + output_tokens)
    sampler = Sampler(sampling, B)
    out: list[list[int]] = [[] for _ in range(B)]
    first = []  # per micro-batch: the last position's logits (b, V)
    # prefill: work items in Plan.items order
    item, row = 0, 0
    for b in run.mb_sizes:
        rows = range(row, row + b)
        mb_caches = {i: c.rows(rows.start, rows.stop) for i, c in caches.items()}
        pos = 0
        for n in run.slices:
            codec_at = {e: run.item_codecs[j][item] for j, e in enumerate(run.boundaries)} if run.item_codecs else {}
            y = _forward(units, x_ids[rows.start:rows.stop, pos:pos + n], pos, mb_caches, codec_at)  # (b, n, V)
            pos += n
            item += 1
        first.append(y[:, -1].float())
        if step_logits is not None:
            step_logits[rows.start:rows.stop, 0] = y[:, -1].float().numpy()
        for k, tok in zip(rows, sampler(y[:, -1], list(rows))):  # the last slice's sampler call
            out[k].append(int(tok))
        row += b
    # decode: group by group, step by step (each group's steps depend only on its own rows)
    codec_at = dict(zip(run.boundaries, run.decode_codecs)) if run.decode_codecs else {}
    row = 0
    for g in run.group_sizes:
        rows = range(row, row + g)
        g_caches = {i: c.rows(rows.start, rows.stop) for i, c in caches.items()}
        for t in range(output_tokens - 1):
            stop = () if teacher is not None else eos
            active = [k for k in rows if not (out[k][-1] in stop or len(out[k]) >= output_tokens)]
            if not active:
                break
            feed = torch.tensor([[out[k][-1] if teacher is None else int(teacher[k][t])] for k in rows],
                                dtype=torch.long)  # (g, 1)
            y = _forward(units, feed, T + t, g_caches, codec_at)  # (g, 1, V)
            if step_logits is not None:
                step_logits[rows.start:rows.stop, t + 1] = y[:, -1].float().numpy()
            for k, tok in zip(active, sampler(y[[k - rows.start for k in active], -1], active)):
                out[k].append(int(tok))
        row += g
    return out, torch.cat(first).numpy()
