"""What `hpipe profile` times: the grid of unit calls (n slice tokens after c context tokens,
batch b) a plan of the scenario can make, decode steps among them, and the sizes of the
codec calls and link messages (``hpipe.runtime.profiler`` has the whole method)."""

from __future__ import annotations

from dataclasses import dataclass

from hpipe.models import decode_steps, positions_used


@dataclass(frozen=True)
class Grid:
    points: tuple[tuple[int, int, int], ...]
    """(n, c, b): slice tokens, context tokens, batch."""

    def __len__(self):
        return len(self.points)


def default_grid(setup, quick: bool = False) -> Grid:
    """Shapes a plan of this scenario can produce: slice lengths (multiples of the token
    granularity) from the smallest to the whole sequence, contexts from none (the first
    slice) to the longest a slice of that length can have, batches 1 to the batch size.
    ``quick``: fewer points, for tests."""
    L, g, B = setup.seq_len, setup.granularity, setup.batch_size
    ns = {g, L}
    k = g
    while k < L:
        ns.add(k)
        if not quick and k * 3 // 2 % g == 0 and k * 3 // 2 < L:
            ns.add(k * 3 // 2)  # between the powers of two, where the DP's slices often fall
        k *= 2
    bs = sorted({1, B, (B + 1) // 2}) if not quick else sorted({1, B})
    pts = set()
    for n in sorted(ns):
        room = L - n
        cs = {0, room}
        if not quick:
            cs |= {room // 2 // g * g, min(g, room)}
        for c in cs:
            for b in bs:
                pts.add((n, c, b))
    pts |= set(decode_points(setup, quick))
    return Grid(tuple(sorted(pts, key=lambda p: (p[0] * p[2], p[1], p[2]))))


def decode_points(setup, quick: bool = False) -> list[tuple[int, int, int]]:
    """Generation: decode steps (n = 1) over the contexts the scenario's steps see (prompt to
    prompt + output) and batches from one sequence to the batch, so the fitted model's decode
    figures are measured, not extrapolated from prefill slices.  None where no decode step
    runs: prefill only, or one new token (it comes from the prefill's logits)."""
    from hpipe.costmodels.fitted import MIN_DECODE_POINTS

    if not has_decode_steps(setup):
        return []
    L, B, N = setup.seq_len, setup.batch_size, setup.output_tokens
    # the context of the last decode step, which is also the position it feeds: step t feeds
    # position L + t, the last step is t = N - 2 (the last new token is never fed back); a
    # GPT at its last learned position has none beyond it to time
    last = positions_used(L, N) - 1
    cs = {max(L // 4, 1), L, (L + last) // 2, last} if not quick else {L, last}
    bs = sorted({1, B, (B + 1) // 2}) if not quick else sorted({1, B})
    if not quick and len(cs) * len(bs) < MIN_DECODE_POINTS:  # one sequence, one step: a fit of its own still
        cs.add(max(L // 2, 1))
    return [(1, c, b) for c in sorted(cs) for b in bs]


def has_decode_steps(setup) -> bool:
    """Whether a run makes decode steps: two or more new tokens per sequence."""
    return decode_steps(setup.output_tokens) > 0


def codec_sizes(setup) -> list[int]:
    """Activation sizes (values) the codecs are timed at: a decode step of one sequence and of
    the batch, a slice of the token granularity (one sequence, the batch), half and all of the
    batch's prefill."""
    d, L, g, B = setup.model.d_model, setup.seq_len, setup.granularity, setup.batch_size
    return sorted({d, d * B, d * g, d * g * B, d * L * B // 2, d * L * B})


LINK_REPEATS = 8
"""Timed round trips of each message size between each pair of devices (two more go untimed)."""


def link_sizes(setup) -> list[int]:
    """Message sizes for the ping-pong: 1 KiB up to the largest activation a stage sends."""
    biggest = setup.batch_size * setup.seq_len * setup.model.d_model * setup.dtype_bytes
    sizes, s = [], 1024
    while s < biggest:
        sizes.append(s)
        s *= 4
    sizes.append(int(biggest))
    return sizes
