"""Before `hpipe execute` starts workers: can this plan run on this machine, and for how long?

* A plan device that stands for a GPU (a catalog GPU, a custom device) but has no
  ``runtime:`` placement would silently become a one-thread CPU worker: refused
  (``InputError``), naming the scenario entries and what to add.
* CPU workers together must fit this machine's available memory (``InfeasibleError``).
* ``cpu_estimate_s``: a rough wall time for a plan whose stages run on this CPU -- the
  roofline with every CPU-placed device taken as ``threads`` cores of the catalog's
  CPU -- so a run of minutes or hours is announced before it starts.

The checks themselves need no torch (the package's __init__ imports it, as for all of
``hpipe.runtime``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hpipe.errors import InfeasibleError, InputError

CPU_ESTIMATE_WARN_S = 60.0
"""Announce the estimate when a run is predicted to take longer than this."""


def _entries(setup) -> dict[str, tuple[str, object]]:
    """device id -> (field path of its scenario entry, the entry).  From the cluster's own
    record: ids count per name across a host's entries, so two entries of one name give
    c-0 and c-1, not two c-0."""
    hosts = setup.scenario.cluster.hosts
    return {d.id: (entry_path(setup, d.id), hosts[d.entry[0]].devices[d.entry[1]]) for d in setup.cluster.devices}


def entry_path(setup, device_id: str) -> str:
    """The field path of the scenario entry ``device_id`` comes from (``cluster.hosts[0].devices[1]``)."""
    h, e = setup.cluster.device(device_id).entry
    return f"cluster.hosts[{h}].devices[{e}]"


def check_placements(setup, device_ids, who: str = "the plan uses") -> None:
    """Refuse a device (of a plan, or the scenario's own for a profile) that is a GPU in the
    scenario but has no runtime placement; ``who`` starts the message."""
    entries = _entries(setup)
    missing: dict[str, list[str]] = {}  # entry path -> its devices, in scenario order
    for d in device_ids:
        dev = setup.cluster.device(d)
        if dev.placement is None and dev.spec.kind != "cpu":
            path, _ = entries[d]
            missing.setdefault(path, []).append(d)
    if not missing:
        return
    missing = dict(sorted(missing.items(), key=lambda kv: [int(x) for x in re.findall(r"\d+", kv[0])]))  # hosts[2] < hosts[10]
    first = next(iter(missing))
    what = "; ".join(f"{p} ({entries[ids[0]][1].label} x{len(ids)}: {', '.join(ids)})" for p, ids in missing.items())
    raise InputError(
        f"{who} devices with no `runtime:` placement, so this machine has nothing to run them on "
        f"(they would become one-thread CPU workers): {what}. Add `runtime: {{device: cuda}}` (or cuda:N) to each "
        f"entry where this machine has such GPUs, or `runtime: {{device: cpu, threads: N}}` to run it on this "
        f"CPU knowingly (slow), e.g. --set {first}.runtime.device=cpu",
        file=setup.scenario.source_path, field=f"{first}.runtime")


def usable_cores() -> set[int]:
    """The CPUs this process may run on: its affinity (taskset, a cpuset), or every CPU the
    machine has where the platform keeps none.  A CFS quota (``docker --cpus``) does not show
    here: see ``cpu_quota_cores``."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def cpu_quota_cores(proc: str = "/proc/self") -> float | None:
    """The CPU time this process may use, in cores, where a CFS quota caps it (``docker --cpus
    1.5``, a systemd ``CPUQuota=``): the tightest quota over its cgroup and that cgroup's
    ancestors, cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``).
    None where no quota is set or none can be read.  The affinity (``usable_cores``) does not
    show it: a container given 1.5 CPUs still sees every core of the machine."""
    try:
        groups = Path(proc, "cgroup").read_text().splitlines()
        mounts = Path(proc, "mountinfo").read_text().splitlines()
    except OSError:
        return None
    where: dict[str, str] = {}  # hierarchy ("" for v2, else its controllers) -> this process's cgroup in it
    for line in groups:
        _, controllers, path = line.split(":", 2)
        where[controllers] = path
    best = None
    for line in mounts:
        # 36 35 0:31 /docker/abc /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu
        fields, _, tail = line.partition(" - ")
        fields, tail = fields.split(), tail.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, mountpoint, fstype = fields[3], fields[4], tail[0]
        if fstype == "cgroup2":
            key, files = "", ("cpu.max",)
        elif fstype == "cgroup" and "cpu" in tail[2].split(","):
            key = next((k for k in where if "cpu" in k.split(",")), None)
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        if key is None or key not in where:
            continue
        rel = os.path.relpath(where[key], root) if where[key].startswith(root) else None
        if rel is None or rel.startswith(".."):
            continue  # this process's cgroup is not inside what is mounted here
        d = Path(mountpoint) / rel
        while True:
            q = _quota_in(d, files)
            if q is not None:
                best = q if best is None else min(best, q)
            if d == Path(mountpoint) or d.parent == d:
                break
            d = d.parent
    return best


def _quota_in(d: Path, files: tuple[str, ...]) -> float | None:
    """The quota one cgroup directory sets, in cores, or None (none set, or unreadable)."""
    try:
        if len(files) == 1:  # v2: "max 100000" or "150000 100000"
            quota, period = Path(d, files[0]).read_text().split()[:2]
        else:
            quota, period = (Path(d, f).read_text().strip() for f in files)
        if quota == "max" or int(quota) <= 0:  # v1 says -1 for none
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


def usable_capacity_cores() -> float:
    """How many cores' worth of CPU time this process can have at once: its usable cores,
    or its CFS quota where that is less."""
    n = float(len(usable_cores()))
    q = cpu_quota_cores()
    return min(n, q) if q is not None else n


def proc_kib_bytes(path: str, field: str) -> float | None:
    """A "Field:  N kB" line of a /proc file (meminfo, self/status) in bytes, or None where
    the file or the field is missing (another OS; gVisor's status lacks some)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory_bytes() -> float | None:
    """MemAvailable of /proc/meminfo, or None where there is none."""
    return proc_kib_bytes("/proc/meminfo", "MemAvailable")


def check_cpu_memory(setup, plan) -> None:
    """CPU workers hold their stage's weights, KV cache and workspace (in the scenario's dtype)
    in this machine's memory: refuse a plan whose CPU workers together would not fit."""
    from hpipe.memory import gb, plan_memory_bytes

    have = available_memory_bytes()
    if have is None:
        return
    need_by_dev = plan_memory_bytes(setup, plan)
    cpu = {d: b for d, b in need_by_dev.items() if setup.cluster.device(d).runtime_device == "cpu"}
    need = sum(cpu.values())
    if need > have:
        raise InfeasibleError(
            f"the plan's {len(cpu)} CPU worker(s) would hold {gb(need)} GB ({setup.model.name}'s stages, "
            f"KV cache and workspace) but this machine has {gb(have)} GB available: "
            f"{gb(need - have)} GB short")


def check_cpu_weights(setup) -> None:
    """Before any plan (and the profile a first run measures): where every device of the
    scenario runs on this machine's CPU, any plan holds all the model's weights and KV cache in
    its memory; refuse when they alone do not fit (``check_cpu_memory`` checks the plan's all)."""
    from hpipe.memory import gb, model_need_bytes

    have = available_memory_bytes()
    devs = setup.cluster.devices
    # a GPU with no placement is check_placements' to refuse, not a CPU worker to count
    if have is None or any(d.runtime_device != "cpu" or (d.placement is None and d.spec.kind != "cpu") for d in devs):
        return
    weights, kv = model_need_bytes(setup)
    if weights + kv > have:
        raise InfeasibleError(
            f"every device runs on this machine's CPU, so whatever the plan its workers would hold all of "
            f"{setup.model.name}'s weights and KV cache ({gb(weights)} + {gb(kv)} GB in {setup.dtype}), "
            f"but it has {gb(have)} GB available: {gb(weights + kv - have)} GB short")


def cpu_estimate_s(setup, plan, warmup: int = 1) -> tuple[float, float] | None:
    """Rough (wall time of ``execute``, longest single work item) in seconds when some stages
    run on this CPU (None when none do): warm-up and measured runs of the plan, simulated
    with each CPU-placed device taken as ``threads`` cores of the catalog's 8-core desktop
    CPU (roofline)."""
    from hpipe.devices import DEVICES
    from hpipe.scenario import parse_scenario
    from hpipe.sim import simulate

    entries = _entries(setup)
    on_cpu = {d for d in plan.devices if setup.cluster.device(d).runtime_device == "cpu"}
    if not on_cpu:
        return None
    cpu = DEVICES["CPU"]
    data = setup.scenario.model_dump(exclude_none=True)
    data["costmodel"] = "roofline"  # a measured profile is of other devices; the estimate is rough anyway
    for path in {entries[d][0] for d in on_cpu}:
        hi, ei = (int(x.split("]")[0]) for x in path.split("[")[1:])
        e = data["cluster"]["hosts"][hi]["devices"][ei]
        entry = entries[next(d for d in on_cpu if entries[d][0] == path)][1]
        threads = entry.runtime.threads if entry.runtime is not None else 1
        share = min(threads, 8) / 8  # the catalog CPU has 8 cores
        spec = setup.cluster.device(next(d for d in on_cpu if entries[d][0] == path)).spec
        for k in ("type", "peak_tflops", "memory_gb", "memory_bandwidth_gbps", "power_w", "idle_power_w"):
            e.pop(k, None)
        e.update(name=entry.label, peak_tflops=cpu.peak_tflops(setup.dtype) * share,
                 memory_gb=max(spec.memory_gb, cpu.memory_gb), memory_bandwidth_gbps=cpu.memory_bandwidth_gbps,
                 power_w=cpu.power_w * share, idle_power_w=cpu.idle_power_w * share)
    data.pop("source_path", None)
    est = parse_scenario(data).resolve()
    r = simulate(est, plan)
    longest = max((e.end_s - e.start_s for e in r.events if e.kind == "compute"), default=0.0)
    return r.latency_s * (1 + warmup), longest


def format_duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
