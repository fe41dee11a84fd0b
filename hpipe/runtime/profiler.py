"""`hpipe profile`: time the runtime's own unit modules and links on the devices a scenario names.

What a stage runs is a chain of units (embedding, attention, MLP, ..., head)
over a slice of n tokens after c context tokens at batch b, with a KV cache.
The profiler runs exactly that code (``hpipe.runtime.model``) in one process
per scenario device, placed as the runtime places it (threads, cores, cgroup
CPU quota, network namespace: ``hpipe.runtime.emulation``), all devices at
once as in a pipeline, and times every unit call of a short chain
(embed, a few blocks, head) with ``perf_counter``.  Several distinct blocks,
not one repeated, and together at least twice the device's last-level cache
(L3 of the CPU, L2 of a GPU), so weights stream from memory as in a real stage
instead of staying in cache: with two blocks of a 31M-parameter model (12 MB,
inside a 32 MB L3) the profile was 20% faster than the stages it predicted.

The grid is swept ``warmup`` times untimed, then ``repeats`` times; a
point's figure is the trimmed mean of its samples (the middle 60%): robust to
the odd preemption by other processes, yet, unlike the median, still an
average over the slow calls every run pays too.

Each call is also timed in CPU time of the calling thread (``thread_time``; a point's
figure is the plain mean, see ``summary``):
the fitted model works on it by default, since other processes competing for
the cores inflate wall time but hardly CPU time.  ``cpu_share`` (CPU time over
wall time) says how busy the machine was.

A device whose ``runtime.device`` is ``cuda:N`` is timed on that GPU, with CUDA
events around each unit of the chain (no synchronisation between units, so
launch overhead is hidden or shown as in a stage); it has no CPU time.

Alone: the devices of one machine share its last-level cache and memory bus, so a unit
runs slower while a neighbour computes (attention at 32 tokens on the 2-core AMD EPYC VM:
1.75 ms alone, 2.1-2.6 ms beside a busy core).  A pipeline leaves devices idle part of the
time (filling, draining, one-stage plans), so after the sweeps above each CPU device in turn
sweeps its units again while the others wait at a barrier (``DeviceProfile.alone``); the
fitted model prices a unit between the two by how many neighbours are busy.  (A device
done with its timed sweeps first keeps computing, untimed, until all are done, so that
the slower devices' last sweeps are not timed beside an idle neighbour.)

Links: after the units, the device processes join one group with the backend
the runtime would use (NCCL when every device is a GPU, else gloo, over the
emulated network when there is one) and each pair ping-pongs messages of
growing size, framed as the stage loop frames them (a 5-int64 header, then
the activation bytes; a GPU endpoint over gloo pays the copies through host
memory, as a GPU stage does); half the round trip is the one-way time (its
lower quartile over the repeats).

Decode step loop: when the scenario generates tokens and every device is a CPU, each pair
then plays a two-stage decode step loop (``hpipe.runtime.step_probe``): a message handed by
the runtime's kind of receiving thread to a loop that sat idle, and a decode chain run after
that wait.  The fitted model adds the hand-over to decode hops and prices the decode steps
of a multi-stage plan by the probe's ratio (on local-cpu: hops of 1.6-1.8 ms between stages'
compute stamps against the ping-pong's 0.28 ms, compute 20-27% over the sweeps).

Codecs: each activation codec this torch has (``hpipe.runtime.codecs``: int8, fp8, int4) is
timed encoding and decoding activations of a few sizes (``codec_sizes``: a decode step of one
sequence and of the batch, a slice of the token granularity, the whole prefill), on the
device and in the device's placement, ``warmup`` + ``repeats`` sweeps as for the units.  The
fitted model prices a boundary's encode and decode from these instead of the memory-pass
model (on this CPU the codecs' unfused ops made the passes model a rough guess).

The profile records the machine, the library versions and the date (see
``hpipe.costmodels.profile``).

This module is the parent: it places and starts one process per device, watches them, and
assembles their samples into the Profile.  What is timed is in ``profile_grid``; one
process's job and entry in ``profile_worker``; what it times on its own device in
``profile_units``, and with the others in ``profile_links``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import platform
import queue as queue_mod
import socket
import sys
import time
from datetime import datetime, timezone

import numpy as np

from hpipe.costmodels.profile import (PROFILE_FORMAT, PROFILER_METHOD, AfterWait, AllReduceProfile, CodecSamples,
                                      DeviceProfile, EmulatedLink, Hardware, LinkProfile, Profile, Settings,
                                      ShardSamples, SpeedProbe, StepHopProfile, UnitSamples, Versions,
                                      coverage_gap)
from hpipe.errors import HpipeError, WorkerError
from hpipe.procwatch import run_watched
from hpipe.stopping import check_interrupted
from hpipe.runtime import emulation
from hpipe.runtime import speed
from hpipe.runtime.profile_grid import (LINK_REPEATS, Grid, codec_sizes, default_grid, has_decode_steps,
                                        link_sizes)
from hpipe.runtime.profile_units import TRIM, alone_repeats
from hpipe.runtime.profile_worker import ProfileJob


def _hardware() -> Hardware:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    gpus = []
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return Hardware(cpu_model=model, cpu_cores=os.cpu_count() or 0, cpus_usable=usable, gpus=gpus,
                    hostname=socket.gethostname(), os=f"{platform.system()} {platform.release()}")


def _versions() -> Versions:
    import torch

    import hpipe

    return Versions(python=platform.python_version(), torch=torch.__version__,
                    hpipe=getattr(hpipe, "__version__", "0"), numpy=np.__version__, profiler=PROFILER_METHOD)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def profile(setup, *, grid: Grid | None = None, warmup: int = 2, repeats: int = 5, link_repeats: int = LINK_REPEATS,
            measure_links: bool = True, quick: bool = False, timeout_s: float = 1800.0, quiet: bool = False,
            on_spawn=None, time_codecs: bool = True, time_alone: bool = True) -> Profile:
    """Measure ``setup``'s devices and links (and codecs, unless ``time_codecs`` is False;
    and, unless ``time_alone`` is False, each CPU device's units alone as well as beside the
    others); the Profile (not yet written anywhere).

    ``on_spawn(pids)`` is told the worker pids (tests use it to kill a run midway)."""
    from hpipe.progress import progress

    from hpipe.runtime.here import check_placements
    from hpipe.runtime.launcher import backend_for, placements

    check_placements(setup, setup.cluster.device_ids, who="a profile measures every device of the scenario; it has")
    why = emulation.emulation_unsupported(setup)
    if why:
        raise HpipeError(f"cannot profile {setup.name} as its scenario describes it: {why}")
    density = None if grid else ("quick" if quick else "full")  # a grid given by the caller: neither
    grid = grid or default_grid(setup, quick=quick)
    devices = setup.cluster.device_ids
    # Each device where it runs for real (a cuda:N this machine lacks is an input error, as in execute).
    torch_devices = [p.device for p in placements(setup, devices)]
    backend = backend_for(torch_devices)
    sizes = link_sizes(setup)
    by_host: dict[str, list[int]] = {}
    for r, d in enumerate(devices):
        by_host.setdefault(setup.cluster.device(d).host, []).append(r)
    tp_groups = [ranks for ranks in by_host.values() if len(ranks) > 1] if measure_links else []
    n_links = (len(devices) * (len(devices) - 1) // 2 + len(tp_groups)) if measure_links else 0
    cpu_ranks = [r for r, t in enumerate(torch_devices) if t == "cpu"]
    alone_ranks = cpu_ranks if time_alone and len(cpu_ranks) > 1 else []
    step_probe = (has_decode_steps(setup) and measure_links and len(devices) > 1 and len(cpu_ranks) == len(devices)
                  and any(n == 1 and c > 0 for n, c, _ in grid.points))
    n_pairs = len(devices) * (len(devices) - 1) // 2
    results: dict[int, dict] = {}
    # the machine's speed, before and after (no worker runs then); CPU devices only
    cores = speed.cpu_device_cores(setup, devices)
    probes = [speed.probe_by_core(cores)] if cores is not None else []
    with emulation.emulate(setup, devices) as em:
        master = em.master_addr(devices[0])
        port = _free_port() if master == "127.0.0.1" else 29500 + os.getpid() % 1000
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        jobs = [ProfileJob(rank=r, devices=devices, spec=setup.model, dtype=setup.dtype,
                           seq_len=setup.seq_len + setup.output_tokens,
                           grid=grid, warmup=warmup, repeats=repeats, placement=em.worker(d),
                           init_method=f"tcp://{master}:{port}", link_sizes=sizes, link_repeats=link_repeats,
                           measure_links=measure_links, tp_groups=tp_groups, timeout_s=timeout_s,
                           torch_device=torch_devices[r], backend=backend,
                           tp=len(by_host[setup.cluster.device(d).host]),
                           env={} if em.worker(d).ifname else {"GLOO_SOCKET_IFNAME": "lo"},
                           codec_sizes=codec_sizes(setup) if time_codecs else [], alone_ranks=alone_ranks,
                           step_probe=step_probe)
                for r, d in enumerate(devices)]
        turns, finished = ctx.Barrier(len(jobs)), ctx.Value("i", 0)
        procs = [ctx.Process(target=run_watched, args=("hpipe.runtime.profile_worker:profile_worker", pickle.dumps(j), q, turns,
                                                       finished),
                             name=f"hpipe-profile-{j.rank}", daemon=True)
                 for j in jobs]
        with progress(quiet) as bar:
            task = bar.add_task(f"profiling {setup.name}", total=(warmup + repeats) * len(devices)
                                                                    + (min(warmup, 1) + alone_repeats(repeats))
                                                                    * len(alone_ranks)
                                                                    + n_links + (n_pairs if step_probe else 0))
            try:
                for p in procs:
                    p.start()
                if on_spawn:
                    on_spawn([p.pid for p in procs])
                t0 = time.monotonic()
                errors = {}
                while len(results) < len(procs):
                    check_interrupted()
                    try:
                        kind, rank, payload = q.get(timeout=0.1)
                    except queue_mod.Empty:
                        kind = None
                    if kind == "done":
                        results[rank] = payload
                    elif kind == "error":
                        errors[rank] = payload
                    elif kind in ("progress", "link"):
                        bar.advance(task)
                    if kind is not None:
                        continue
                    dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in results]
                    if errors or dead:
                        time.sleep(0.3)
                        while True:
                            try:
                                kind, rank, payload = q.get_nowait()
                            except queue_mod.Empty:
                                break
                            if kind == "error":
                                errors[rank] = payload
                        r = sorted(errors)[0] if errors else dead[0]
                        what = errors.get(r, f"exited with code {procs[r].exitcode}").strip().splitlines()
                        raise WorkerError(f"profiling {devices[r]} failed: {what[0]}")
                    if time.monotonic() - t0 > timeout_s:
                        raise WorkerError(f"profiling did not finish within {timeout_s:g}s")
            finally:
                for p in procs:
                    if p.is_alive():
                        p.terminate()
                for p in procs:
                    if p.pid is None:  # never started (an earlier start failed)
                        continue
                    p.join(2.0)
                    if p.is_alive():
                        p.kill()
                        p.join(1.0)
                q.close()
                q.cancel_join_thread()
        emulated = em.describe()
    if cores is not None:
        probes.append(speed.probe_by_core(cores))
    return _assemble(setup, devices, results, grid, warmup, repeats, emulated, probes, density)


def _assemble(setup, devices, results, grid, warmup, repeats, emulated, probes=(), density=None) -> Profile:
    """The Profile of the workers' ``results`` (``probes``: the speed probe before and after;
    ``density``: 'quick' or 'full', the default grid it measured, else None)."""
    from hpipe.costmodels.fitted import fit_link, fit_report, summarize_holdout

    devs = []
    for r, d in enumerate(devices):
        dev = setup.cluster.device(d)
        p = dev.placement
        placement = p.model_dump(exclude_none=True) if p is not None else {"threads": 1}
        devs.append(DeviceProfile(device=d, label=dev.id.split("/", 1)[1].rsplit("-", 1)[0], placement=placement,
                                  units={k: UnitSamples(**v) for k, v in results[r]["units"].items()},
                                  shards=[ShardSamples(tp=sh["tp"], units={k: UnitSamples(**v)
                                                                           for k, v in sh["units"].items()})
                                          for sh in results[r].get("shards", [])],
                                  codecs={k: CodecSamples(**v) for k, v in results[r].get("codecs", {}).items()},
                                  alone={k: UnitSamples(**v) for k, v in results[r].get("alone", {}).items()},
                                  after_wait=(AfterWait(**results[r]["after_wait"])
                                              if results[r].get("after_wait") else None),
                                  cpu_share=results[r]["cpu_share"]))
    shaped = {frozenset(lk["between"]): lk for lk in emulated.get("links", [])}
    links = []
    for r in sorted(results):
        for lk in results[r]["links"]:
            lat, per_byte = fit_link(lk["sizes_bytes"], lk["one_way_s"])
            ha, hb = (setup.cluster.device(x).host for x in lk["between"])
            em = shaped.get(frozenset((ha, hb)))
            links.append(LinkProfile(between=tuple(lk["between"]), sizes_bytes=lk["sizes_bytes"],
                                     one_way_s=lk["one_way_s"], latency_us=lat * 1e6,
                                     bandwidth_gbps=8 / per_byte / 1e9 if per_byte > 0 else 1e6,
                                     emulated=EmulatedLink(bandwidth_gbps=em["bandwidth_gbps"],
                                                           latency_us=em["latency_us"],
                                                           asked_latency_us=em.get("asked_latency_us"))
                                     if em else None))
    all_reduces = []
    for r in sorted(results):
        for ar in results[r].get("all_reduces", []):
            lat, per_byte = fit_link(ar["sizes_bytes"], ar["seconds"])
            all_reduces.append(AllReduceProfile(devices=ar["devices"], sizes_bytes=ar["sizes_bytes"],
                                                seconds=ar["seconds"], seconds_together=ar.get("seconds_together"),
                                                shard_cpu_s=ar.get("shard_cpu_s"),
                                                shard_after_wait_cpu_s=ar.get("shard_after_wait_cpu_s"),
                                                latency_us=lat * 1e6,
                                                bandwidth_gbps=8 / per_byte / 1e9 if per_byte > 0 else 1e6))
    step_hops = [StepHopProfile(**h) for r in sorted(results) for h in results[r].get("step_hops", [])]
    prof = Profile(format=PROFILE_FORMAT, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   hardware=_hardware(), versions=_versions(), scenario=setup.name, model=setup.model.to_dict(),
                   dtype=setup.dtype,
                   settings=Settings(warmup=warmup, repeats=repeats, grid=density,
                                     statistic=f"trimmed-mean (middle {1 - 2 * TRIM:.0%}) of the repeats"),
                   devices=devs, links=links, all_reduces=all_reduces, step_hops=step_hops,
                   speed_probe=SpeedProbe(version=speed.PROBE_VERSION, cores=list(probes[0]),
                                          before_s=list(probes[0].values()), after_s=list(probes[1].values()))
                   if len(probes) == 2 else None)
    from hpipe.costmodels.fitted import FittedConfig

    report = fit_report(prof, FittedConfig.model_fields["basis"].default)  # the basis predictions use
    prof.holdout = {"basis": FittedConfig.model_fields["basis"].default, "per_device": report,
                    **summarize_holdout(report)}
    return prof


def stale_reason(prof: Profile, setup) -> str | None:
    """Why a profile should be measured again for ``setup`` on this machine, or None.

    Profiles must come from the very runtime that executes (versions), be measured by this
    hpipe's profiler method (``PROFILER_METHOD``) on this machine (CPU model), cover the
    scenario's workload (its decode steps, its tokens and batch) and every device of the
    scenario with its placement."""
    from hpipe.costmodels.profile import model_mismatch

    why = model_mismatch(prof, setup.model, setup.dtype)
    if why:
        return why
    here = _hardware()
    if prof.hardware.cpu_model != here.cpu_model or prof.hardware.gpus != here.gpus:
        there = ", ".join([prof.hardware.cpu_model, *prof.hardware.gpus])
        return f"measured on {there}, this machine is {', '.join([here.cpu_model, *here.gpus])}"
    v = _versions()
    if (prof.versions.torch, prof.versions.python) != (v.torch, v.python):
        return (f"measured with torch {prof.versions.torch} / python {prof.versions.python}, "
                f"this runtime has torch {v.torch} / python {v.python}")
    if prof.versions.profiler != PROFILER_METHOD:
        return (f"measured by profiler method {prof.versions.profiler}, this hpipe measures by method "
                f"{PROFILER_METHOD} (hpipe.costmodels.profile.PROFILER_METHOD)")
    return coverage_gap(prof, setup)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `hpipe profile`")
