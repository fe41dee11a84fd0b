"""One profiling process: what it is given (``ProfileJob``, picklable) and what it does
(``profile_worker``: place itself as the runtime would, time its units and codecs, then the
links with the others).  ``hpipe.runtime.profiler`` starts them and assembles the Profile."""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from datetime import timedelta

from hpipe.runtime import emulation
from hpipe.runtime.profile_grid import Grid
from hpipe.runtime.profile_links import all_reduces, ping_pong, step_probes
from hpipe.runtime.profile_units import time_codecs, time_units


@dataclass
class ProfileJob:
    """Everything one profiling process needs (picklable)."""

    rank: int
    devices: list[str]
    spec: object
    dtype: str
    seq_len: int
    """Positions the KV caches hold: the prompt plus the generated tokens."""
    grid: Grid
    warmup: int
    repeats: int
    placement: emulation.WorkerPlacement
    init_method: str
    link_sizes: list[int]
    link_repeats: int
    measure_links: bool
    tp_groups: list[list[int]] = field(default_factory=list)
    """Ranks of each host's devices (two or more): the tensor-parallel groups whose
    all-reduce is timed."""
    torch_device: str = "cpu"
    """Where this device's units run: cpu or cuda:N (the scenario's runtime.device)."""
    tp: int = 1
    """Devices of this device's host: the tensor-parallel degree of the stage the planners
    give a host, whose shards are timed too (1: none)."""
    backend: str = "gloo"
    """The torch.distributed backend the runtime would join these devices with."""
    timeout_s: float = 120.0
    """torch.distributed timeout: a device done with its units early (a GPU beside CPUs)
    waits this long for the slowest at the rendezvous; a dead worker stops the run sooner
    (the parent watches them)."""
    env: dict[str, str] = field(default_factory=dict)
    codec_sizes: list[int] = field(default_factory=list)
    """Activation sizes (values) each codec is timed at (none: codecs not timed)."""
    step_probe: bool = False
    """Play a two-stage decode step loop between every pair (``step_probe``): the scenario
    generates tokens, every device is a CPU (gloo), and the links are measured."""
    alone_ranks: list[int] = field(default_factory=list)
    """Ranks that, in this order, time their units again while all others wait idle (the CPU
    devices, when there are two or more: they share the machine's caches and memory bus)."""


def profile_worker(job: ProfileJob, q, turns=None, finished=None) -> None:
    """Entry of one profiling process: place itself, time the units, then the links."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # started through procwatch.run_watched: it watches the parent (a parent killed with
    # SIGKILL cannot stop us) from before this module, and torch, were imported
    code = 0
    try:
        emulation.enter(job.placement)
        os.environ.update(job.env)
        import torch

        torch.set_num_threads(job.placement.threads)

        def report(kind, k):
            q.put((kind, job.rank, k))

        units, shards, cpu_share, alone, chain = time_units(job, report, turns, finished)
        codecs = time_codecs(job)
        links, reduces, step_hops, after_wait = [], [], [], None
        if job.measure_links and len(job.devices) > 1:
            import torch.distributed as dist

            dist.init_process_group(job.backend, init_method=job.init_method, rank=job.rank,
                                    world_size=len(job.devices), timeout=timedelta(seconds=job.timeout_s))
            links = ping_pong(job, report)
            if job.step_probe:
                step_hops, after_wait = step_probes(job, report, chain)
            reduces = all_reduces(job, report)
        q.put(("done", job.rank, {"units": units, "shards": shards, "links": links, "all_reduces": reduces,
                                  "cpu_share": cpu_share, "codecs": codecs,
                                  "alone": alone, "step_hops": step_hops, "after_wait": after_wait}))
    except BaseException as e:
        q.put(("error", job.rank, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))
        code = 1
    finally:
        q.close()
        q.join_thread()
        os._exit(code)
