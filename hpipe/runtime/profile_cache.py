"""Filling the profile cache: the quick profile ``costmodel: auto`` measures when the cache has
none for a scenario, and a rough figure of how long that takes, said before it starts.

The cache itself (where a profile goes, what its key covers) is ``hpipe.costmodels.cache``
and needs no torch; measuring runs the profiler's worker processes, so it lives here.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from hpipe.costmodels.cache import cache_dir, cached_profile_path, check_cache_writable

QUICK = {"quick": True, "warmup": 1, "repeats": 3}
"""The profile ``costmodel: auto`` makes when the cache has none: the coarse grid, three timed
sweeps (``hpipe profile`` without --quick measures a finer grid, five sweeps)."""
STARTUP_S = 8.0
"""Worker start-up (torch import, weights), the fit and whatever else a profile does beside its
sweeps and its links' round trips (which ``estimate_profile_s`` counts), in a profile's time."""


def estimate_profile_s(setup, *, quick: bool = True, warmup: int = 1, repeats: int = 3) -> float:
    """Rough seconds a profile of ``setup`` takes: its grid's chains timed with ``setup``'s own
    cost model (the roofline, when no profile exists yet), on the slowest device, per sweep; and,
    where two or more CPU devices share this machine, the sweeps of each one's units alone, one
    device at a time (``hpipe.runtime.profiler``); and the links' round trips at the scenario's
    figures.  Leaving the sweeps alone out made the figure half the profile's time (local-cpu,
    2-core AMD EPYC VM, 2026-12-04: said 35 s, took 73 s)."""
    from hpipe.runtime.profile_grid import LINK_REPEATS, default_grid, link_sizes
    from hpipe.runtime.profile_units import alone_repeats, chain_blocks

    grid = default_grid(setup, quick=quick)
    units = setup.units
    n_blocks = chain_blocks(setup.model, setup.dtype, 32 << 20)  # a typical server L3
    chain = [units[0], *units[1:1 + 2 * n_blocks], units[-1]]
    per_device = {}
    for d in setup.cluster.device_ids:
        per_device[d] = sum(float(setup.cost.unit_time_s(u, d, n, c, b)) for n, c, b in grid.points for u in chain)
    tp_share = 1.6 if any(len(h.devices) > 1 for h in setup.scenario.cluster.hosts) else 1.0  # shard chains
    cpus = [d for d in per_device if setup.cluster.device(d).runtime_device == "cpu"]
    alone_s = (min(warmup, 1) + alone_repeats(repeats)) * sum(per_device[d] for d in cpus) if len(cpus) > 1 else 0.0
    together_s = (warmup + repeats) * max(per_device.values()) * tp_share
    # the links' ping-pongs, one pair at a time: on a slow link they are most of the profile
    # (0.0001 Gbit/s: "about 23 s" said, four minutes taken).  Only links between hosts are
    # shaped to the scenario's figures; a host's own run over loopback, and wait, not compute
    # (no load factor)
    ids, sizes = list(per_device), link_sizes(setup)
    host = {d: setup.cluster.device(d).host for d in ids}
    links_s = (2 + LINK_REPEATS) * 2 * sum(setup.cluster.transfer_time_s(a, b, size) for i, a in enumerate(ids)
                                           for b in ids[i + 1:] if host[a] != host[b] for size in sizes)
    return (STARTUP_S + together_s + alone_s) * load_factor(len(per_device)) + links_s


def load_factor(n_workers: int) -> float:
    """How much longer CPU work takes now than on a quiet machine: runnable processes (the
    1-minute load average plus the workers about to start) per CPU, at least 1.  A quick profile
    that takes 40 s on a quiet 2-core VM took 155 s at a load of 5.7 (its workers got a CPU 24%
    of the time)."""
    load = _load_average()
    if load is None:
        return 1.0
    from hpipe.runtime.here import cpu_quota_cores, usable_cores

    # the load average is the whole machine's (a container's too), so it is shared over the
    # machine's cores; a CFS quota caps only this process's own workers
    quota = cpu_quota_cores()
    return max(1.0, (load + n_workers) / len(usable_cores()), n_workers / quota if quota else 0.0)


@functools.cache
def _load_average() -> float | None:
    """The 1-minute load average, read once per process: a sweep says one note for all its
    values where their texts agree, and an estimate read twice a second apart had come out
    "about 3 min" and "about 4 min" (CI, 2026-12-04)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def measure_into_cache(setup, path: Path | None = None, *, quiet: bool = False, **kw):
    """Profile ``setup`` (quick settings unless ``kw`` says otherwise) and write it to the cache
    (or ``path``); the Profile.  Needs torch: it runs the profiler's worker processes."""
    from hpipe.io import write_text
    from hpipe.runtime.profiler import profile

    settings = {**QUICK, **kw}
    path = path or cached_profile_path(setup)
    if path.parent == cache_dir():  # checked before the minutes of measuring, not after
        check_cache_writable()
    prof = profile(setup, quiet=quiet, **settings)
    write_text(path, prof.model_dump_json(indent=1))
    return prof
