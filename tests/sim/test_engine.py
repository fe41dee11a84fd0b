"""The simpy engine against the exact flow-shop recurrence, the closed form, and a
hand-checked event log.

These drive ``hpipe.sim.engine.run`` with durations given directly, so every
expected figure is computed here from first principles, not from the engine.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpipe.sim.engine import HopSpec, PipelineSpec, StageSpec, run

pytestmark = pytest.mark.timeout(120)

durations = st.floats(min_value=0.0, max_value=10.0, allow_nan=False, allow_infinity=False)


def _spec(t, hold=None, lat=None, links=None):
    """t[i][j]: item i on stage j.  hold/lat[i][j]: the hop into stage j (j >= 1)."""
    n_items, n_stages = len(t), len(t[0])
    t = np.asarray(t, float)
    stages = [StageSpec(devices=(f"d{j}",), compute_s=t[:, j]) for j in range(n_stages)]
    hops = [None]
    for j in range(1, n_stages):
        if hold is None:
            h = np.zeros(n_items)
            la = np.zeros(n_items)
        else:
            h = np.asarray(hold, float)[:, j]
            la = np.asarray(lat, float)[:, j]
        names = links[j] if links else (f"d{j - 1}->d{j}",)
        hops.append(HopSpec(src=f"d{j - 1}", dst=f"d{j}", links=names, bottleneck=names[0],
                            hold_s=h, latency_s=la, nbytes=np.ones(n_items)))
    return PipelineSpec(items=[(0, i) for i in range(n_items)], stages=stages, hops=hops)


def _completions(events, n_items, n_stages):
    C = np.full((n_items, n_stages), np.nan)
    for e in events:
        if e.kind == "compute":
            C[e.slice, e.stage] = e.end_s
    return C


def _recurrence(t, hold=None, lat=None):
    """C[i][j] = max(C[i-1][j], A[i][j]) + t[i][j]; with hops, the hop is a stage of its own
    that holds its link (H) and delivers after the latency: A = H + lat."""
    t = np.asarray(t, float)
    n, m = t.shape
    C = np.zeros((n, m))
    H = np.zeros((n, m))
    for i in range(n):
        for j in range(m):
            if j == 0:
                ready = 0.0
            elif hold is None:
                ready = C[i, j - 1]
            else:
                H[i, j] = max(H[i - 1, j] if i else 0.0, C[i, j - 1]) + hold[i][j]
                ready = H[i, j] + lat[i][j]
            C[i, j] = max(C[i - 1, j] if i else 0.0, ready) + t[i, j]
    return C


@st.composite
def grids(draw, max_items=7, max_stages=5):
    n = draw(st.integers(1, max_items))
    m = draw(st.integers(1, max_stages))
    return [[draw(durations) for _ in range(m)] for _ in range(n)]


@settings(max_examples=80, deadline=None)
@given(grids())
def test_engine_equals_exact_recurrence_without_transfers(t):
    events = run(_spec(t))
    C = _completions(events, len(t), len(t[0]))
    assert np.allclose(C, _recurrence(t), rtol=1e-12, atol=1e-12)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_engine_equals_recurrence_with_transfers_as_their_own_stage(data):
    t = data.draw(grids())
    n, m = len(t), len(t[0])
    hold = [[data.draw(durations) for _ in range(m)] for _ in range(n)]
    lat = [[data.draw(st.floats(0.0, 1.0)) for _ in range(m)] for _ in range(n)]
    events = run(_spec(t, hold, lat))
    assert np.allclose(_completions(events, n, m), _recurrence(t, hold, lat), rtol=1e-12, atol=1e-12)
    # the link is held for exactly the bytes' time, and only once the sender is done
    C = _completions(events, n, m)
    for e in events:
        if e.kind == "transfer":
            assert e.end_s - e.start_s == pytest.approx(hold[e.slice][e.stage])
            assert e.start_s >= C[e.slice, e.stage - 1] - 1e-12


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.lists(st.floats(0.01, 5.0), min_size=1, max_size=6))
def test_identical_items_follow_the_closed_form(n_items, stage_s):
    # Identical items: makespan = sum of the stage times + (N - 1) x the slowest stage.
    t = [list(stage_s) for _ in range(n_items)]
    events = run(_spec(t))
    makespan = max(e.end_s for e in events)
    assert makespan == pytest.approx(sum(stage_s) + (n_items - 1) * max(stage_s), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(grids(), st.data())
def test_shared_link_serialises_transfers_and_devices_never_overlap(t, data):
    # Every hop crosses the same wire: transfers of different hops must queue for it.
    n, m = len(t), len(t[0])
    hold = [[data.draw(st.floats(0.0, 2.0)) for _ in range(m)] for _ in range(n)]
    lat = [[0.5] * m for _ in range(n)]
    links = {j: ("wire", f"own-{j}") for j in range(1, m)}
    events = run(_spec(t, hold, lat, links))
    for key in {(e.kind == "transfer", e.link if e.kind == "transfer" else e.device) for e in events}:
        spans = sorted((e.start_s, e.end_s) for e in events
                       if (e.kind == "transfer", e.link if e.kind == "transfer" else e.device) == key)
        for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
            assert b0 >= a1 - 1e-12, f"{key}: [{a0}, {a1}] overlaps [{b0}, {b1}]"
    # and an item never starts on stage j before its bytes have crossed and propagated
    arrive = {(e.stage, e.slice): e.end_s + 0.5 for e in events if e.kind == "transfer"}
    for e in events:
        if e.kind == "compute" and e.stage > 0 and (e.stage, e.slice) in arrive:
            assert e.start_s >= arrive[(e.stage, e.slice)] - 1e-12


def test_golden_event_log_two_stages_two_slices():
    # Worked by hand:
    #   stage 0: item 0 [0, 1], item 1 [1, 3]
    #   hop 1:   item 0 holds the link [1, 1.5], arrives 1.75; item 1 holds [3, 3.5], arrives 3.75
    #   stage 1: item 0 [1.75, 4.75]; item 1 waits for item 0 (KV cache order): [4.75, 5.75]
    spec = _spec([[1.0, 3.0], [2.0, 1.0]], hold=[[0, 0.5], [0, 0.5]], lat=[[0, 0.25], [0, 0.25]])
    got = sorted((e.kind, e.device, e.dst, e.link, e.stage, e.slice, e.start_s, e.end_s) for e in run(spec))
    want = sorted([
        ("compute", "d0", None, None, 0, 0, 0.0, 1.0),
        ("compute", "d0", None, None, 0, 1, 1.0, 3.0),
        ("transfer", "d0", "d1", "d0->d1", 1, 0, 1.0, 1.5),
        ("transfer", "d0", "d1", "d0->d1", 1, 1, 3.0, 3.5),
        ("compute", "d1", None, None, 1, 0, 1.75, 4.75),
        ("compute", "d1", None, None, 1, 1, 4.75, 5.75),
    ])
    assert got == want


def test_tensor_parallel_stage_holds_its_devices_for_the_stage_time():
    # One TP stage of two devices: forward the input (0.1), shards of 0.4 and 0.5, the
    # all-reduce takes the rest of the 1.0 the stage costs.
    stage = StageSpec(devices=("a", "b"), compute_s=np.array([1.0, 1.0]),
                      device_compute_s=np.array([[0.4, 0.4], [0.5, 0.5]]),
                      scatter_s=np.array([[0.1, 0.1]]), scatter_bytes=np.array([8.0, 8.0]))
    events = run(PipelineSpec(items=[(0, 0), (0, 1)], stages=[stage]))
    kinds = {(e.kind, e.device): (e.start_s, e.end_s) for e in events if e.slice == 1}
    assert kinds[("transfer", "a")] == pytest.approx((1.0, 1.1))
    assert kinds[("compute", "a")] == pytest.approx((1.1, 1.5))
    assert kinds[("compute", "b")] == pytest.approx((1.1, 1.6))
    assert kinds[("allreduce", "a")] == pytest.approx((1.6, 2.0))
    assert kinds[("allreduce", "b")] == pytest.approx((1.6, 2.0))
    assert max(e.end_s for e in events) == pytest.approx(2.0)


def test_stage_zero_takes_no_hop():
    with pytest.raises(ValueError):
        PipelineSpec(items=[(0, 0)], stages=[StageSpec(devices=("a",), compute_s=np.ones(1))],
                     hops=[HopSpec("x", "a", (), None, np.zeros(1), np.zeros(1), np.zeros(1))])


def test_tensor_parallel_all_reduce_queues_behind_a_hop_on_the_same_link():
    # Stage 0 is a TP pair (a, b): shards of 0.6, then an all-reduce of 0.4 on link L; the hop
    # out of it to c also needs L for 0.9.  Item 1's all-reduce (ready at 1.6) waits for
    # item 0's hop (1.0-1.9), so the pair is held 1.0-2.3 instead of 1.0-2.0.
    tp = StageSpec(devices=("a", "b"), compute_s=np.array([1.0, 1.0]),
                   device_compute_s=np.array([[0.6, 0.6], [0.6, 0.6]]),
                   allreduce_s=np.array([0.4, 0.4]), allreduce_links=("L",))
    last = StageSpec(devices=("c",), compute_s=np.array([0.5, 0.5]))
    hop = HopSpec(src="a", dst="c", links=("L",), bottleneck="L", hold_s=np.array([0.9, 0.9]),
                  latency_s=np.zeros(2), nbytes=np.ones(2))
    events = run(PipelineSpec(items=[(0, 0), (0, 1)], stages=[tp, last], hops=[None, hop]))
    got = sorted((e.kind, e.device, e.dst, e.link, e.stage, e.slice, round(e.start_s, 9), round(e.end_s, 9))
                 for e in events)
    want = sorted([
        ("compute", "a", None, None, 0, 0, 0.0, 0.6), ("compute", "b", None, None, 0, 0, 0.0, 0.6),
        ("allreduce", "a", None, None, 0, 0, 0.6, 1.0), ("allreduce", "b", None, None, 0, 0, 0.6, 1.0),
        ("transfer", "a", "c", "L", 1, 0, 1.0, 1.9),
        ("compute", "a", None, None, 0, 1, 1.0, 1.6), ("compute", "b", None, None, 0, 1, 1.0, 1.6),
        ("allreduce", "a", None, None, 0, 1, 1.9, 2.3), ("allreduce", "b", None, None, 0, 1, 1.9, 2.3),
        ("compute", "c", None, None, 1, 0, 1.9, 2.4),
        ("transfer", "a", "c", "L", 1, 1, 2.3, 3.2),
        ("compute", "c", None, None, 1, 1, 3.2, 3.7),
    ])
    assert got == want


# ---- co-located devices ------------------------------------------------------------------
def _coloc_spec(alone, together, colocated=True):
    """Two stages on d0, d1 with no transfers; alone/together[i][j]: item i on stage j."""
    alone, together = np.asarray(alone, float), np.asarray(together, float)
    stages = [StageSpec(devices=(f"d{j}",), compute_s=together[:, j], alone_compute_s=alone[:, j])
              for j in range(2)]
    hops = [None, HopSpec(src="d0", dst="d1", links=(), bottleneck=None, hold_s=np.zeros(len(alone)),
                          latency_s=np.zeros(len(alone)), nbytes=np.zeros(len(alone)))]
    return PipelineSpec(items=[(0, i) for i in range(len(alone))], stages=stages, hops=hops,
                        colocated=[(frozenset({"d0", "d1"}), 2)] if colocated else [])


def _log(events):
    return sorted((e.device, e.slice, round(e.start_s, 9), round(e.end_s, 9)) for e in events)


def test_colocated_items_run_at_the_rate_their_neighbours_allow():
    """Hand-checked.  Item 0 on stage 0 runs alone (d1 has nothing yet): 1 s.  At t = 1 stage 0
    starts item 1 (alone 3, together 6) and stage 1 item 0 (alone 2, together 4): both busy,
    so stage 1 ends at 1 + 4 = 5, when stage 0 has done 4/6 of its item; the last third runs
    alone, 3/3 = 1 s more: t = 6.  Stage 1's item 1 then runs alone: 1 s, t = 7."""
    alone = [[1, 2], [3, 1]]
    together = [[2, 4], [6, 2]]
    assert _log(run(_coloc_spec(alone, together))) == [
        ("d0", 0, 0.0, 1.0), ("d0", 1, 1.0, 6.0), ("d1", 0, 1.0, 5.0), ("d1", 1, 6.0, 7.0)]
    # Without the group each item takes its `compute_s` (the together time), as before.
    assert _log(run(_coloc_spec(alone, together, colocated=False))) == [
        ("d0", 0, 0.0, 2.0), ("d0", 1, 2.0, 8.0), ("d1", 0, 2.0, 6.0), ("d1", 1, 8.0, 10.0)]


@settings(max_examples=60, deadline=None)
@given(grids(max_stages=2).filter(lambda t: len(t[0]) == 2), st.floats(0.3, 1.0))
def test_colocated_latency_lies_between_all_alone_and_all_together(t, ratio):
    """Whatever the overlap, every item takes between its alone and its together time, so the
    pipeline's latency lies between the two plain pipelines'."""
    together = np.asarray(t, float)
    alone = together * ratio
    lat = max(e.end_s for e in run(_coloc_spec(alone, together))) if together.any() else 0.0
    lo = _recurrence(alone)[-1, -1]
    hi = _recurrence(together)[-1, -1]
    assert lo - 1e-9 <= lat <= hi + 1e-9


def test_together_means_every_neighbour_the_profile_had_busy():
    """The group's together time was measured with two neighbours busy (a profile of three
    devices) and the plan uses two of them: one busy neighbour is half way.  Hand-checked:
    at t = 1 both compute, so stage 0's item 1 would take 3 + (6 - 3)/2 = 4.5 and stage 1's
    item 0 2 + (4 - 2)/2 = 3, ending at t = 4 with 2/3 of stage 0's item done; its last
    third runs alone (3 s for a whole item): t = 5; stage 1's item 1 alone: t = 6."""
    spec = _coloc_spec([[1, 2], [3, 1]], [[2, 4], [6, 2]])
    spec.colocated = [(frozenset({"d0", "d1"}), 3)]
    assert _log(run(spec)) == [("d0", 0, 0.0, 1.0), ("d0", 1, 1.0, 5.0), ("d1", 0, 1.0, 4.0), ("d1", 1, 5.0, 6.0)]


def test_an_all_reduce_costs_its_busy_price_while_a_colocated_neighbour_computes():
    """Hand-checked.  Stage 0 is device c (2 s an item, no transfers), stage 1 a TP pair (a, b)
    co-located with c: 1 s of shards, then all-reduces of 0.5 s with c idle, 2 s with c
    computing.  Item 0 reaches the pair at 2, while c computes item 1 (2-4): shards 2-3,
    all-reduce 3-5 at the busy price.  Item 1 reaches it at 5 (the pair was held till 5), c idle
    now: shards 5-6, all-reduce 6-6.5.  Outside a co-located group the all-reduce is 0.5 s."""
    def spec(colocated):
        c = StageSpec(devices=("c",), compute_s=np.array([2.0, 2.0]))
        tp = StageSpec(devices=("a", "b"), compute_s=np.array([1.5, 1.5]),
                       allreduce_s=np.array([0.5, 0.5]), allreduce_busy_s=np.array([2.0, 2.0]))
        hop = HopSpec(src="c", dst="a", links=(), bottleneck=None, hold_s=np.zeros(2), latency_s=np.zeros(2),
                      nbytes=np.zeros(2))
        return PipelineSpec(items=[(0, 0), (0, 1)], stages=[c, tp], hops=[None, hop],
                            colocated=[(frozenset({"a", "b", "c"}), 3)] if colocated else [])

    def log(events):
        return sorted((e.kind, e.device, e.slice, round(e.start_s, 9), round(e.end_s, 9)) for e in events)

    assert log(run(spec(True))) == sorted([
        ("compute", "c", 0, 0.0, 2.0), ("compute", "c", 1, 2.0, 4.0),
        ("compute", "a", 0, 2.0, 3.0), ("compute", "b", 0, 2.0, 3.0),
        ("allreduce", "a", 0, 3.0, 5.0), ("allreduce", "b", 0, 3.0, 5.0),
        ("compute", "a", 1, 5.0, 6.0), ("compute", "b", 1, 5.0, 6.0),
        ("allreduce", "a", 1, 6.0, 6.5), ("allreduce", "b", 1, 6.0, 6.5)])
    assert [x for x in log(run(spec(False))) if x[:2] == ("allreduce", "b")] == [
        ("allreduce", "b", 0, 3.0, 3.5), ("allreduce", "b", 1, 5.0, 5.5)]


def test_a_tp_stage_in_its_all_reduces_counts_as_busy_for_another_stages_all_reduce():
    """Hand-checked.  Two co-located TP pairs: (a, b) takes 0.7 s of shards and 0.5 s of
    all-reduce an item whatever its neighbours do; (c, d) takes 1 s of shards and 0.5 s of
    all-reduce alone, 2 s beside busy neighbours.  (a, b): item 0 0-1.2, item 1 1.2-2.4 (its
    all-reduce 1.9-2.4).  (c, d) gets item 0 at 1.2, shards 1.2-2.2; its all-reduce starts at
    2.2, while (a, b) is in its all-reduce (not computing, but in an item, as the profile's
    together chain was): 2.2-4.2.  Item 1 then runs 4.2-5.2 and all-reduces alone, 5.2-5.7."""
    first = StageSpec(devices=("a", "b"), compute_s=np.array([1.2, 1.2]), allreduce_s=np.array([0.5, 0.5]),
                      allreduce_busy_s=np.array([0.5, 0.5]))
    second = StageSpec(devices=("c", "d"), compute_s=np.array([1.5, 1.5]), allreduce_s=np.array([0.5, 0.5]),
                       allreduce_busy_s=np.array([2.0, 2.0]))
    hop = HopSpec(src="a", dst="c", links=(), bottleneck=None, hold_s=np.zeros(2), latency_s=np.zeros(2),
                  nbytes=np.zeros(2))
    events = run(PipelineSpec(items=[(0, 0), (0, 1)], stages=[first, second], hops=[None, hop],
                              colocated=[(frozenset("abcd"), 4)]))
    got = sorted((e.kind, e.slice, round(e.start_s, 9), round(e.end_s, 9)) for e in events if e.device == "c")
    assert got == [("allreduce", 0, 2.2, 4.2), ("allreduce", 1, 5.2, 5.7),
                   ("compute", 0, 1.2, 2.2), ("compute", 1, 4.2, 5.2)]
