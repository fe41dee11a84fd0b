"""The decode step loop's own costs, timed by `hpipe profile` between each pair of devices.

A decode step of a multi-stage plan pays two things that neither the unit sweeps nor the
ping-pong see.  On local-cpu (2-core AMD EPYC VM, quiet, 2026-12-02,
``benchmarks/decode_gaps.py``) a hop between two stages' compute stamps took 1.6-1.8 ms
against the ping-pong's 0.28 ms one way, and a stage's decode compute took 20-27% more CPU
time than the profile's back-to-back chain:

* the message goes through the runtime's receiving thread (gloo: header, then payload, then
  a queue) to a compute loop that sat idle waiting for it (``hpipe.runtime.decode._Stream``);
* the compute runs after that wait, on a core that idled (the profile's sweeps run the
  units back to back).

The probe plays a two-stage step loop between devices i and j, as the runtime runs one:
i runs the decode chain (the profile's own chain of units, at one decode point), sends the
activation (a 6-int64 header and (b, 1, D) values) and waits; j's receiving thread takes
the message and queues it; j's loop takes it, runs the chain, and sends back b token ids
with the wall time of its chain in the header; i's receiving thread hands them to i's loop.
Per round, i's round trip from its send to its take, less j's chain, is the two hops; each
side's chain CPU time after its waits, over the same chain's run back to back just before
(its peer idle then too), is its after-wait ratio.

gloo only: with NCCL the runtime receives inline, without a thread, and the probe is not run.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

HEADER_INTS = 6  # the runtime's message header (hpipe.runtime.worker)


@dataclass
class DecodeChain:
    """The profile's chain of units at one decode point, ready to run again."""

    point: tuple[int, int, int]
    """(n = 1, c, b) of the decode point."""
    run: object
    """(paced=True) -> (wall seconds, CPU seconds of this thread) of one pass over the chain;
    paced: an emulated slow device stretches it to its quota (``emulation.Pace``)."""
    d_model: int
    dtype_bytes: int


class _Inbox:
    """A receiving thread: ``rounds`` messages from ``peer`` (header, then as many payload
    bytes as the header's third field says), each queued with its header, as the runtime's
    receiving thread does; an exception stops it and is queued in place of the message."""

    def __init__(self, peer: int, rounds: int, timeout: timedelta):
        self.q: queue.Queue = queue.Queue()
        self.peer, self.rounds, self.timeout = peer, rounds, timeout
        self.thread = threading.Thread(target=self._loop, name=f"probe-from-{peer}", daemon=True)
        self.thread.start()

    def _loop(self):
        import torch
        import torch.distributed as dist

        try:
            for _ in range(self.rounds):
                hdr = torch.empty(HEADER_INTS, dtype=torch.int64)
                dist.irecv(hdr, self.peer).wait(self.timeout)
                h = hdr.tolist()
                buf = torch.empty(int(h[2]), dtype=torch.uint8)
                dist.irecv(buf, self.peer).wait(self.timeout)
                self.q.put((h, buf))
        except BaseException as e:  # handed to the loop, which raises it
            self.q.put(e)

    def take(self, timeout_s: float):
        out = self.q.get(timeout=timeout_s)
        if isinstance(out, BaseException):
            raise out
        return out


def _send(peer: int, header: list[int], payload) -> tuple:
    import torch
    import torch.distributed as dist

    hdr = torch.tensor(header, dtype=torch.int64)
    return (dist.isend(hdr, peer), dist.isend(payload, peer)), hdr, payload


BACK_TO_BACK_RUNS = 3
"""Chains each side runs back to back, its peer idle, before the rounds: the ratio's
denominator, under the rounds' own conditions (the sweeps ran every device at once)."""


def probe_pair(rank: int, i: int, j: int, chain: DecodeChain, rounds: int, warmup: int,
               timeout_s: float) -> tuple[list[float], list[float], list[float]]:
    """Play the two-stage step loop between ranks i and j (this process is one of them).

    Returns (the two hops of each timed round, seconds: only on i, else empty; this side's
    chain CPU seconds after each timed wait; this side's chain CPU seconds back to back)."""
    import torch

    timeout = timedelta(seconds=timeout_s)
    peer = j if rank == i else i
    b = chain.point[2]
    act = torch.zeros(b * chain.d_model * chain.dtype_bytes, dtype=torch.uint8)  # (b, 1, D) as bytes
    ids = torch.zeros(b * 8, dtype=torch.uint8)  # (b,) int64 token ids as bytes
    inbox = _Inbox(peer, 1 + warmup + rounds, timeout)
    hops, cpu, b2b = [], [], []
    pending = []

    def back_to_back():
        chain.run(paced=False)  # warm
        b2b.extend(chain.run(paced=False)[1] for _ in range(BACK_TO_BACK_RUNS))

    # in turn, each side's chain back to back while the other waits for a go
    if rank == i:
        back_to_back()
        pending.append(_send(peer, [-1, 0, ids.numel(), 0, 0, 0], ids))
        inbox.take(timeout_s + 5.0)
    else:
        inbox.take(timeout_s + 5.0)
        back_to_back()
        pending.append(_send(peer, [-1, 0, ids.numel(), 0, 0, 0], ids))
    for r in range(warmup + rounds):
        if rank == i:
            _, c = chain.run()
            if r >= max(warmup, 1):  # i's chain after waiting for the previous round's ids
                cpu.append(c)
            t_send = time.perf_counter()
            pending.append(_send(peer, [r, 0, act.numel(), 1, chain.point[1], 0], act))
            h, _ = inbox.take(timeout_s + 5.0)
            t_back = time.perf_counter()
            if r >= warmup:
                hops.append(t_back - t_send - h[1] * 1e-9)
        else:
            h, _ = inbox.take(timeout_s + 5.0)
            wall, c = chain.run()
            if r >= warmup:
                cpu.append(c)
            pending.append(_send(peer, [r, int(wall * 1e9), ids.numel(), 0, 0, 0], ids))
        while len(pending) > 2:
            for w in pending.pop(0)[0]:
                w.wait(timeout)
    for works, _, _ in pending:
        for w in works:
            w.wait(timeout)
    # reached only once every message arrived; on an error the receiving thread (a daemon,
    # maybe blocked on a peer that failed) is left behind rather than joined
    inbox.thread.join(timeout_s)
    return hops, cpu, b2b
