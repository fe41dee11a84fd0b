"""The profiler prices an all-reduce from its last member in to its last member out: a member
that arrives late (a slower shard) is charged by the cost model as that shard's compute, not
again here."""

import multiprocessing as mp
import socket
import types

import pytest

torch = pytest.importorskip("torch")

LATE_S = 0.1  # how long member 1 computes before each all-reduce (the bound, half of it, leaves a
# loaded machine's gloo call, 3-5 ms on a 2-core AMD EPYC VM beside busy loops, ten times over)


def _member(rank: int, port: int, out) -> None:
    import time

    import torch.distributed as dist

    from hpipe.runtime.profile_links import Wire, all_reduce_chain_s

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        from datetime import timedelta

        wire = Wire(types.SimpleNamespace(torch_device="cpu", backend="gloo"), timedelta(seconds=60))
        x = torch.zeros(1024)

        def produce():  # member 1 is the slower shard: it computes LATE_S before every call
            if rank == 1:
                time.sleep(LATE_S)
            return x

        out.put((rank, all_reduce_chain_s(produce, dist.group.WORLD, wire)))
    finally:
        dist.destroy_process_group()


def test_an_all_reduce_is_timed_from_the_last_member_in_to_the_last_out():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # both members report the same figure; member 0 waits LATE_S for member 1 before every
    # call, and timed on member 0 alone a call took at least that (the chain's old price)
    assert got[0] == got[1]
    assert got[0] < LATE_S / 2
