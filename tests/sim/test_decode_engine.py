"""Decode steps in the engine: a hand-computed timeline (whole event log) and the cycle-time
closed form of G groups over S stages with a feedback edge.

Durations are given directly (no cost model), so every expected figure is worked out here."""

from __future__ import annotations

import numpy as np
import pytest

from hpipe.result import decode_figures
from hpipe.sim.decode import DecodeWork, token_times
from hpipe.sim.engine import Feedback, HopSpec, PipelineSpec, StageSpec, run

pytestmark = pytest.mark.timeout(120)


def _decode_spec(work: DecodeWork, stage_s, hop_hold_s, ret_hold_s, ret_lat_s):
    """A chain of single-device stages d0..d{S-1}; stage_s[j][i], hop_hold_s[j][i] (hop into j)
    per item; the return hop d{S-1} -> d0 holds ret_hold_s then waits ret_lat_s per decode item."""
    stage_s = np.asarray(stage_s, float)
    S, n = stage_s.shape
    stages = [StageSpec(devices=(f"d{j}",), compute_s=stage_s[j]) for j in range(S)]
    hops = [None] + [HopSpec(src=f"d{j - 1}", dst=f"d{j}", links=(f"d{j - 1}->d{j}",), bottleneck=f"d{j - 1}->d{j}",
                             hold_s=np.asarray(hop_hold_s[j], float), latency_s=np.zeros(n), nbytes=np.ones(n))
                     for j in range(1, S)]
    items = [(mb, sl) for mb in range(len(work.prefill_sizes)) for sl in range(work.n_slices)]
    items += [(g, t) for g, t, *_ in work.items()]
    chains = [[(work.index(t, g), work.deps(t, g)) for t in range(work.steps)] for g in range(work.n_groups)]
    fb = Feedback(src=f"d{S - 1}", dst="d0", links=(f"d{S - 1}->d0",), bottleneck=f"d{S - 1}->d0",
                  hold_s=np.full(n, ret_hold_s, float), latency_s=np.full(n, ret_lat_s, float),
                  nbytes=np.full(n, 8.0), chains=chains)
    return PipelineSpec(items=items, stages=stages, hops=hops,
                        phases=["prefill"] * work.n_prefill + ["decode"] * work.n_decode, feedback=fb)


def test_hand_computed_decode_timeline():
    # Two sequences prefilled together (one item), then 3 tokens each: 2 decode steps of 2 groups.
    work = DecodeWork(seq_len=16, output_tokens=3, prefill_sizes=(2,), n_slices=1, group_sizes=(1, 1))
    assert [work.deps(t, g) for t in range(2) for g in range(2)] == [(0,), (0,), (1,), (2,)]
    # items: prefill, (t0 g0), (t0 g1), (t1 g0), (t1 g1)
    spec = _decode_spec(work, stage_s=[[4, 1, 1, 1, 1], [4, 2, 2, 2, 2]],
                        hop_hold_s=[None, [1, .5, .5, .5, .5]], ret_hold_s=0.5, ret_lat_s=0.5)
    events = run(spec)
    got = sorted((e.kind, e.device, e.stage, e.phase, e.micro_batch, e.slice, e.start_s, e.end_s) for e in events)
    P, D = "prefill", "decode"
    want = sorted([
        ("compute", "d0", 0, P, 0, 0, 0.0, 4.0), ("transfer", "d0", 1, P, 0, 0, 4.0, 5.0),
        ("compute", "d1", 1, P, 0, 0, 5.0, 9.0),
        # both groups' first tokens exist at 9; their ids go back one after the other on d1->d0
        ("transfer", "d1", 0, D, 0, 0, 9.0, 9.5), ("transfer", "d1", 0, D, 1, 0, 9.5, 10.0),
        ("compute", "d0", 0, D, 0, 0, 10.0, 11.0), ("transfer", "d0", 1, D, 0, 0, 11.0, 11.5),
        ("compute", "d1", 1, D, 0, 0, 11.5, 13.5),
        ("compute", "d0", 0, D, 1, 0, 11.0, 12.0), ("transfer", "d0", 1, D, 1, 0, 12.0, 12.5),
        ("compute", "d1", 1, D, 1, 0, 13.5, 15.5),  # waits for d1 (group 0's step)
        ("transfer", "d1", 0, D, 0, 1, 13.5, 14.0), ("compute", "d0", 0, D, 0, 1, 14.5, 15.5),
        ("transfer", "d0", 1, D, 0, 1, 15.5, 16.0), ("compute", "d1", 1, D, 0, 1, 16.0, 18.0),
        ("transfer", "d1", 0, D, 1, 1, 15.5, 16.0), ("compute", "d0", 0, D, 1, 1, 16.5, 17.5),
        ("transfer", "d0", 1, D, 1, 1, 17.5, 18.0), ("compute", "d1", 1, D, 1, 1, 18.0, 20.0),
    ])
    assert got == want
    times = token_times(work, events, n_stages=2, batch_size=2)
    assert times == [[9.0, 13.5, 18.0], [9.0, 15.5, 20.0]]
    fig = decode_figures(times, 0.0, 20.0)
    assert fig["ttft_s"] == 9.0 and fig["tpot_s"] == 4.5 and fig["output_tokens_per_s"] == 6 / 20.0


def test_first_decode_step_waits_for_its_own_micro_batch_only():
    # 3 sequences prefilled as 3 micro-batches of 2 slices; decode in 2 groups {0,1} and {2}
    work = DecodeWork(seq_len=32, output_tokens=2, prefill_sizes=(1, 1, 1), n_slices=2, group_sizes=(2, 1))
    assert work.deps(0, 0) == (1, 3) and work.deps(0, 1) == (5,)
    assert work.token_items(2) == [5, work.index(0, 1)]


@pytest.mark.parametrize("S,G,s,r", [(4, 2, 1.0, 1.0), (2, 4, 1.0, 0.5), (3, 3, 1.0, 0.0), (5, 1, 0.5, 0.25)])
def test_cycle_time_closed_form(S, G, s, r):
    """Equal stages of step time s, free forward hops, return latency r: every group's token
    period settles to max(G * s, S * s + r) -- the stage busy with all G groups, or one group's
    trip round the loop."""
    steps = 12
    work = DecodeWork(seq_len=16, output_tokens=steps + 1, prefill_sizes=(G,), n_slices=1,
                      group_sizes=(1,) * G)
    n = work.n_prefill + work.n_decode
    spec = _decode_spec(work, stage_s=np.full((S, n), s), hop_hold_s=[None] + [np.zeros(n)] * (S - 1),
                        ret_hold_s=0.0, ret_lat_s=r)
    times = token_times(work, run(spec), S, G)
    period = max(G * s, S * s + r)
    for ts in times:
        gaps = np.diff(ts)
        np.testing.assert_allclose(gaps[-4:], period, rtol=1e-12)
    fig = decode_figures(times, 0.0, max(t[-1] for t in times))
    assert fig["tpot_s"] == pytest.approx(period)
