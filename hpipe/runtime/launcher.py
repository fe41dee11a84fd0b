"""The launcher behind ``hpipe execute``: start one worker per plan device, watch
them, gather their timelines into a measured ``RunResult``.

Workers are started from a multiprocessing *forkserver* that has imported
torch once, so a run pays torch's import once, not once per worker; each
worker joins a torch.distributed group (gloo over loopback on CPU, NCCL when
every device is a GPU).  The launcher supervises them: a worker that dies,
reports an error, or a pipeline that makes no progress for ``timeout_s``
stops the run -- every worker is terminated, then killed, within a bounded
time -- and ``execute`` raises ``WorkerError`` naming the stage and device
that failed.  Ctrl-C stops the workers the same way and re-raises
``KeyboardInterrupt`` (the CLI's exit code 130).

Measured figures go through ``hpipe.result.summarize``, the function the
simulator uses, so a measurement and a prediction compare field by field.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpipe.errors import InputError, WorkerError
from hpipe.stopping import check_interrupted
from hpipe.procwatch import proc_stat
from hpipe.result import Event, RunResult, summarize
from hpipe.runtime.here import cpu_quota_cores, entry_path, usable_cores
from hpipe.runtime.machine_load import LoadWindow

# Largest |logit difference| against the single-process float32 forward that --check accepts.
# float32: pipelining changes only the order of floating-point sums; 16-bit types round every
# activation, so their bound is that of the format at logits of order one.
CHECK_TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2.5e-1}

_STOP_GRACE_S = 2.0  # SIGTERM, then SIGKILL after this long
_COLLECT_S = 0.5  # after a first failure, wait this long for the other workers' reports


@dataclass
class Run:
    """What the workers of one run sent back."""

    records: dict[int, dict]
    devices: list[str]
    logits: np.ndarray  # (batch, vocab): the last position of each sequence
    all_logits: np.ndarray | None = None  # (batch, seq_len, vocab) when asked for
    ids: np.ndarray | None = None
    wall_s: float = 0.0
    other_cpu_cores: float | None = None
    """Cores other processes on this machine kept busy on average during the run
    (``hpipe.runtime.machine_load``); None where it cannot be read."""
    extra: dict = field(default_factory=dict)
    not_emulated: list[str] = field(default_factory=list)
    """What the scenario describes that this machine's emulation left out (``Emulation.gaps``)."""
    emulated: dict = field(default_factory=dict)
    """What it put in place (``Emulation.describe``): weighted cgroups, shaped links."""


# -- inputs -------------------------------------------------------------------
def load_inputs(path: str | Path, setup) -> list[list[int]]:
    """Token ids from a JSON file: a list of token-id lists, one per sequence."""
    from hpipe.io import read_json

    file = str(path)
    data = read_json(path)
    check_inputs(data, setup, file)
    return data


def check_inputs(data, setup, file: str | None = None) -> None:
    vocab = setup.model.vocab_size
    if not isinstance(data, list) or not all(isinstance(s, list) for s in data):
        raise InputError("expected a JSON list of token-id lists, one per sequence", file=file)
    if len(data) != setup.batch_size:
        raise InputError(f"{len(data)} sequence{'s' if len(data) != 1 else ''}, but the scenario's batch_size is {setup.batch_size}", file=file)
    for i, seq in enumerate(data):
        if len(seq) != setup.seq_len:
            raise InputError(f"{len(seq)} tokens, but the scenario's seq_len is {setup.seq_len}",
                             file=file, field=f"[{i}]")
        for j, t in enumerate(seq):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise InputError(f"{t!r} is not a token id of the model (0 .. {vocab - 1})",
                                 file=file, field=f"[{i}][{j}]")


def make_ids(setup, inputs=None, seed: int = 0) -> np.ndarray:
    """(batch, seq_len) int64 token ids: the given ones, or seeded random ones."""
    if inputs is not None:
        check_inputs(inputs, setup, "inputs")
        return np.asarray(inputs, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return rng.integers(0, setup.model.vocab_size, size=(setup.batch_size, setup.seq_len), dtype=np.int64)


# -- model and placement --------------------------------------------------------
def runtime_spec(setup):
    """The model the runtime builds: the scenario's, or the weights folder's when given
    (whose norm epsilon and rotary base must be used for its logits to be right)."""
    if not setup.weights:
        return setup.model
    from hpipe.runtime.weights import check_folder, spec_from_hf_config

    check_folder(setup.weights, setup.scenario.source_path)
    hf = spec_from_hf_config(setup.weights)
    for f in ("family", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size"):
        if getattr(hf, f) != getattr(setup.model, f):
            raise InputError(f"the weights folder's config.json has {f} = {getattr(hf, f)} but the scenario's "
                             f"model {setup.model.name} has {getattr(setup.model, f)}",
                             file=setup.scenario.source_path, field="weights")
    from hpipe.runtime.weights import HFWeights

    HFWeights(setup.weights, hf).verify()
    if hf.family == "gpt" and setup.seq_len > hf.max_seq_len:
        raise InputError(f"seq_len {setup.seq_len} exceeds the weights' {hf.max_seq_len} positions",
                         file=setup.scenario.source_path, field="workload.seq_len")
    return hf


@dataclass
class _Placement:
    device: str
    threads: int
    cores: list[int] | None
    cpu_quota: float | None


def placement_of(setup, dev_id: str, usable=None) -> _Placement:
    """Where ``dev_id`` runs on this machine, checked against what this machine has."""
    d = setup.cluster.device(dev_id)
    p = d.placement
    device = d.runtime_device
    where = f"{entry_path(setup, dev_id)}.runtime"
    if device.startswith("cuda"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= n:
            raise InputError(f"{dev_id} runs on {device}, but this machine has {n} CUDA device(s)",
                             file=setup.scenario.source_path, field=f"{where}.device")
    cores = list(p.cores) if p is not None and p.cores else None
    usable = usable_cores() if usable is None else usable
    if cores and not set(cores) <= set(usable):
        raise InputError(f"{dev_id}: cores {sorted(set(cores) - set(usable))} are not available here "
                         f"(usable: {sorted(usable)})", file=setup.scenario.source_path, field=f"{where}.cores")
    return _Placement(device=device, threads=p.threads if p is not None else 1, cores=cores,
                      cpu_quota=getattr(p, "cpu_quota", None) if p is not None else None)


def placements(setup, device_ids) -> list[_Placement]:
    """Where each of ``device_ids`` runs here; two of them on one GPU is an input error
    (NCCL refuses two ranks on one device, and they would share its memory and time)."""
    out = [placement_of(setup, d) for d in device_ids]
    seen: dict[str, str] = {}
    for d, p in zip(device_ids, out):
        if p.device.startswith("cuda"):
            if p.device in seen:
                raise InputError(f"{d} and {seen[p.device]} would both run on {p.device}; give each "
                                 f"its own GPU (device: cuda:N)", file=setup.scenario.source_path,
                                 field=f"{entry_path(setup, d)}.runtime.device")
            seen[p.device] = d
    return out


def shared_cores(device_ids, places: list[_Placement], usable, quota_cores: float | None = None) -> list[str]:
    """Where two or more CPU workers of a run ask this machine for more than it has, in words
    (empty: they fit): in all, more cores than are usable here; or on one core, pinned workers
    whose shares add up past it.  A worker's share is its quota, else its threads, and no more
    than the cores it is pinned to (spread evenly over them).  The prediction gives every
    device its own compute; these take turns, so the run measures slower (three one-core
    devices pinned to one core: twice the predicted time).  ``quota_cores``: this process's CFS
    quota (``here.cpu_quota_cores``), which caps all of them together where it is less than the
    usable cores.  One worker with more threads than cores takes turns with no other device:
    not said here."""
    cpu = [(d, p) for d, p in zip(device_ids, places) if p.device == "cpu"]
    if len(cpu) < 2:
        return []

    def share(p: _Placement) -> float:
        asked = min(p.cpu_quota, p.threads) if p.cpu_quota else float(p.threads)
        return min(asked, len(p.cores)) if p.cores else asked

    out = []
    total = sum(share(p) for _, p in cpu)
    have = len(usable) if quota_cores is None else min(len(usable), quota_cores)
    if total > have + 1e-9:
        of = f"{have:g}" if have == len(usable) else f"the {have:g} a CPU quota leaves this process"
        out.append(f"the CPU workers share this machine's cores: they ask for {total:g} cores of "
                   f"{of} ({', '.join(d for d, _ in cpu)}), so they take turns where the "
                   f"prediction gives each device its own")
    on_core: dict[int, list[tuple[str, float]]] = {}
    for d, p in cpu:
        for c in p.cores or ():
            on_core.setdefault(c, []).append((d, share(p) / len(p.cores)))
    for c, users in sorted(on_core.items()):
        load = sum(x for _, x in users)
        if len(users) > 1 and load > 1 + 1e-9:
            out.append(f"core {c} is asked for {load:g} cores' worth ({', '.join(d for d, _ in users)}): they "
                       f"take turns there, where the prediction gives each device its own")
    return out


def stage_roles(spec, plan) -> list[tuple[tuple[int, ...], int, int]]:
    """Per stage: (roles of its devices in plan order, first unit, end unit); TP checked."""
    from hpipe.models import check_tensor_parallel

    roles, stages = 0, []
    for i, st in enumerate(plan.stages):
        why = check_tensor_parallel(spec, st.tp)
        if why:
            raise InputError(f"stage {i} is tensor parallel over {st.tp} devices but {why}", field=f"stages[{i}]")
        stages.append((tuple(range(roles, roles + st.tp)), st.start, st.end))
        roles += st.tp
    return stages


def backend_for(torch_devices: list[str]) -> str:
    # NCCL only joins GPUs; as soon as one stage is on a CPU, everything goes over gloo
    # (GPU stages stage their activations through host memory).
    return "nccl" if all(d.startswith("cuda") for d in torch_devices) else "gloo"


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _context():
    # Forkserver: one process imports torch and forks each worker from there (fast, and
    # no CUDA state is inherited, as long as the server never touches CUDA).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["hpipe.runtime.worker"])
    _start_forkserver()
    return ctx


def _start_forkserver() -> None:
    """Start the forkserver with Ctrl-C blocked.

    The forkserver ignores SIGINT only once its preload (torch, seconds) is imported; a
    Ctrl-C to the terminal's process group during that import printed its traceback.  The
    blocked mask is inherited across its fork and exec; here it is restored at once, so a
    Ctrl-C that came meanwhile reaches the launcher when the mask is lifted, not lost."""
    from multiprocessing import forkserver, resource_tracker

    resource_tracker.ensure_running()  # it lifts SIGINT's block itself: start it first
    with _launchers_sys_path():
        if threading.current_thread() is not threading.main_thread():
            forkserver.ensure_running()
            return
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            forkserver.ensure_running()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _launchers_sys_path():
    """The forkserver imports hpipe (its preload) from the launcher's own ``sys.path``.

    It is started as ``python -c``, which puts the current folder first on its path, and
    Python 3.11's forkserver drops the path it is handed; a worker sets the launcher's path
    only after the preload has imported hpipe.  Run from inside another checkout, the workers
    ran that checkout's hpipe under this one's launcher.  So the forkserver starts with the
    launcher's path as PYTHONPATH, and PYTHONSAFEPATH keeps the current folder off it; the
    preload (``worker.restore_forkserver_env``) puts both back as they were, so that the
    workers and what they start see the environment the launcher had."""
    from hpipe.runtime.worker import FORKSERVER_SAVED_ENV, set_environ

    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PYTHONSAFEPATH")}
    try:
        os.environ[FORKSERVER_SAVED_ENV] = json.dumps(saved)
        os.environ["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) if p else os.getcwd() for p in sys.path)
        os.environ["PYTHONSAFEPATH"] = "1"
        yield
    finally:
        set_environ({**saved, FORKSERVER_SAVED_ENV: None})


def _forkserver_pid() -> int | None:
    from multiprocessing import forkserver

    return getattr(forkserver._forkserver, "_forkserver_pid", None)


def _stop_forkserver() -> None:
    pid = _forkserver_pid()
    if pid is not None and _running(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def _start_workers(procs, fs_pid: int | None) -> None:
    """Start ``procs`` from the forkserver.  One that dies while starting a worker, after its
    fork and before it sends the new pid back, ends ``Process.start`` in multiprocessing's
    EOFError('unexpected EOF') (or a broken pipe, before the fork): named as the forkserver's
    death, as when it dies later.  The worker it forked but never announced watches this
    process (``worker.start_watching``) and ends with it.

    Ctrl-C and SIGTERM are held over each start: one that landed inside ``Process.start``
    left a worker forked but unrecorded (no pid), which the clean-up could not stop; it went
    on to unpickle the run's queue after the queue was gone and printed a traceback under
    "hpipe: terminated" (CI beside a busy loop, a SIGTERM 2 s in, before any work)."""
    from hpipe.stopping import signals_held

    for p in procs:
        try:
            with signals_held():
                p.start()
        except (EOFError, OSError):
            # its socket closes as it dies, a moment before /proc shows it dead: wait that moment
            deadline = time.monotonic() + 0.5
            while fs_pid is not None and _running(fs_pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            if fs_pid is not None and not _running(fs_pid):
                raise _forkserver_died(fs_pid) from None
            raise


def _forkserver_died(fs_pid: int) -> WorkerError:
    return WorkerError(f"the forkserver process that starts the workers (pid {fs_pid}) "
                       f"{_death_of(fs_pid)} (out of memory?); its workers were stopped")


def _running(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _death_of(pid: int) -> str:
    """'was killed by SIGKILL' / 'exited with code N' of a dead child not yet reaped, from
    /proc (its exit_code field), without reaping it: multiprocessing reaps its forkserver."""
    st = proc_stat(pid)
    if st is not None and len(st) >= 50:
        status = int(st[49])
        if status & 0x7F:
            sig = status & 0x7F
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
            return f"was killed by {name}"
        return f"exited with code {status >> 8}"
    return "is gone"


# -- CPU quota ------------------------------------------------------------------
class _Throttle(threading.Thread):
    """Emulates a slower device by duty-cycling a worker with SIGSTOP/SIGCONT (as cpulimit):
    it runs ``quota / threads`` of every period.  cgroups would be exact but need privileges."""

    PERIOD_S = 0.02

    def __init__(self, shares: dict[int, float]):
        super().__init__(daemon=True, name="cpu-quota")
        self.shares = {pid: max(f, 0.01) for pid, f in shares.items()}  # each below 1 (quota_share)
        self.done = threading.Event()

    def run(self):
        order = sorted(self.shares.items(), key=lambda kv: kv[1])
        while not self.done.is_set():
            t0 = time.perf_counter()
            self._signal(self.shares, signal.SIGCONT)
            for pid, frac in order:
                delay = t0 + frac * self.PERIOD_S - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                self._signal({pid: 0}, signal.SIGSTOP)
            rest = t0 + self.PERIOD_S - time.perf_counter()
            if rest > 0:
                time.sleep(rest)
        self._signal(self.shares, signal.SIGCONT)

    def stop(self):
        self.done.set()
        self.join(1.0)
        self._signal(self.shares, signal.SIGCONT)  # a stopped process ignores SIGTERM until continued

    @staticmethod
    def _signal(pids, sig):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


# -- supervision -----------------------------------------------------------------
def _stop(procs) -> None:
    """Terminate, then kill, every worker still alive; reap them all.

    Workers are signalled by pid as well: when the forkserver (their parent) has died,
    multiprocessing counts them as exited (code 255) though they still run, orphaned."""
    procs = [p for p in procs if p.pid is not None]  # started ones
    for p in procs:
        if p.is_alive():
            with contextlib.suppress(Exception):
                p.terminate()
        elif _running(p.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    while time.monotonic() < deadline and any(_running(p.pid) for p in procs):
        time.sleep(0.02)
    for p in procs:
        if p.is_alive():
            with contextlib.suppress(Exception):
                p.kill()
            p.join(1.0)
        elif _running(p.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)


def _describe(cfgs, role: int) -> str:
    c = cfgs[role]
    return f"stage {c.stage_of(role)} ({c.devices[role]})"


# gloo appends advice to a closed connection's error (" This is typically caused by a remote
# worker crashing." or "... hanging or bugs in the application. Check the logs of the remote
# worker before reporting an error. GLHF!"): the message here already names the remote worker's failure
_GLOO_ADVICE = " This is typically caused by a remote worker"


def _without_advice(message: str) -> str:
    """A communication error's message without gloo's closing advice, where it has it."""
    return message.split(_GLOO_ADVICE, 1)[0]


def _failure_message(cfgs, errors: dict[int, dict], dead: dict[int, int], progress: dict[int, int],
                     hung: bool, timeout_s: float, n_items: int) -> str:
    """One message naming the stage and device at the root of a failure."""
    lines = []
    for role, code in sorted(dead.items()):
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.Signals._value2member_map_
               else f"exited with code {code}")
        lines.append(f"{_describe(cfgs, role)} {how} without reporting an error")
    local = {r: e for r, e in errors.items() if not e["comm"]}
    comm = {r: e for r, e in errors.items() if e["comm"]}
    for role, e in sorted(local.items()):
        lines.append(f"{_describe(cfgs, role)} failed: {e['message']}")
    # A communication error points at the peer; the peer is the suspect unless it reported itself.
    # A worker that timed out first: its peers then see the connection close (the effect).
    for role, e in sorted(comm.items(), key=lambda kv: ("timed out after" not in kv[1]["message"], kv[0])):
        lines.append(f"{_describe(cfgs, role)}: {_without_advice(e['message'])}")
    if not lines and hung:
        waiting = [r for r in range(len(cfgs)) if progress.get(r, -1) < n_items - 1]
        if waiting:
            role = min(waiting, key=lambda r: (progress.get(r, -1), -cfgs[r].stage_of(r)))
            lines.append(f"no worker made progress for {timeout_s:g}s: {_describe(cfgs, role)} is stuck after "
                         f"{progress.get(role, -1) + 1} of {n_items} work items")
    if not lines:
        lines.append("the workers stopped without reporting why")
    primary = lines[0]
    if not dead and not local and comm:
        peers = [e["peer"] for e in comm.values() if e.get("peer") is not None]  # a role, or an all-reduce's
        suspects = {r for p in peers for r in (p if isinstance(p, (tuple, list)) else (p,))} - set(errors)
        if suspects:
            primary = (f"{_describe(cfgs, sorted(suspects)[0])} stopped responding "
                       f"({lines[0]})")
    rest = [ln for ln in lines[1:]]
    return primary + (("; also " + "; ".join(rest[:3])) if rest else "")


def launch(setup, plan, *, ids: np.ndarray, spec=None, timeout_s: float = 60.0, startup_timeout_s: float = 600.0,
           warmup: int = 1, seed: int = 0, all_logits: bool = False, faults: dict[int, tuple[str, int]] | None = None,
           on_spawn=None, progress=None, generation=None, on_tokens=None) -> Run:
    """Run ``plan`` with one worker process per device; the workers' records.

    Where the scenario asks for slower devices (``cpu_quota``) or several hosts without
    addresses, the run is emulated (``hpipe.runtime.emulation``: cgroups, shaped network
    namespaces) as far as this machine permits, and the emulation is removed afterwards.

    With ``generation`` (a ``decode.GenerationConfig``) the workers decode after the prefill;
    ``on_tokens([(sequence, id), ...])`` then sees each step's ids as the last stage makes
    them (when the config streams)."""
    from hpipe.runtime import emulation

    want = emulation.what_to_emulate(setup, plan.devices)
    with emulation.emulate(setup, plan.devices, **want) as em:
        try:
            return _launch(setup, plan, em, ids=ids, spec=spec, timeout_s=timeout_s,
                           startup_timeout_s=startup_timeout_s, warmup=warmup, seed=seed, all_logits=all_logits,
                           faults=faults, on_spawn=on_spawn, progress=progress, generation=generation,
                           on_tokens=on_tokens)
        except KeyboardInterrupt:
            # The forkserver may still be importing torch with Ctrl-C blocked; it would notice
            # that we are gone only after that import, seconds later.  Stop it now.
            _stop_forkserver()
            raise


def item_codecs(setup, plan) -> list[list[str]] | None:
    """Per stage boundary, the codec each work item's message uses: the plan's codec where it
    pays for that message, as the simulator decides it (``hpipe.codecs.boundary_costs``)."""
    if not plan.lossy:
        return None
    from hpipe.codecs import plan_boundary_costs

    items = plan.items(setup.batch_size)
    b = np.array([it[2] for it in items], float)
    n = np.array([it[3] for it in items], float)
    return [bc.codec for bc in plan_boundary_costs(setup, plan, n, b)]


def _launch(setup, plan, em, *, ids, spec, timeout_s, startup_timeout_s, warmup, seed, all_logits, faults,
            on_spawn, progress, generation=None, on_tokens=None) -> Run:
    from hpipe.runtime.emulation import quota_share
    from hpipe.runtime.worker import WorkerConfig, spawned_main

    spec = spec or setup.model
    devices = plan.devices
    places = placements(setup, plan.devices)
    stages = stage_roles(spec, plan)
    backend = backend_for([p.device for p in places])
    port = _free_port()
    env = {}
    if em.network is None and "GLOO_SOCKET_IFNAME" not in os.environ and \
            "lo" in {n for _, n in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback: the run stays on this machine
    mb_sizes = plan.micro_batch_sizes(setup.batch_size)
    codecs = item_codecs(setup, plan)
    cfgs = []
    for role, (dev, pl) in enumerate(zip(devices, places)):
        c = WorkerConfig(role=role, devices=devices, stages=stages, spec=spec, dtype=setup.dtype,
                         weights=setup.weights, seed=seed, ids=None, slices=list(plan.slices), mb_sizes=mb_sizes,
                         device=pl.device, threads=pl.threads, cores=pl.cores, backend=backend,
                         init_method=f"tcp://{em.master_addr(devices[0])}:{port}", world_size=len(devices),
                         rank=role, emulation=em.worker(dev),
                         timeout_s=timeout_s, startup_timeout_s=startup_timeout_s, warmup=warmup,
                         all_logits=all_logits, env=env, launcher_pid=os.getpid(), fault=(faults or {}).get(role),
                         generation=generation, codecs=codecs)
        if c.stage_of(role) == 0:
            c.ids = ids
        cfgs.append(c)
    n_items = len(cfgs[0].items())
    if generation is not None:  # at most: every group takes every decode step
        n_items += len(generation.group_sizes) * (generation.output_tokens - 1)

    ctx = _context()
    fs_pid = _forkserver_pid()
    q = ctx.Queue()
    procs = [ctx.Process(target=spawned_main, args=(c, q), name=f"hpipe-worker-{r}", daemon=True)
             for r, c in enumerate(cfgs)]
    records: dict[int, dict] = {}
    errors: dict[int, dict] = {}
    dead: dict[int, int] = {}
    prog: dict[int, int] = {}
    ready: set[int] = set()
    throttle = None
    t_start = time.monotonic()
    helpers = [fs_pid] if fs_pid else []  # the forkserver: the run's own CPU, beside the workers'
    load = LoadWindow.start(helpers)  # the forkserver has imported torch by now
    try:
        _start_workers(procs, fs_pid)
        if on_spawn:
            on_spawn([p.pid for p in procs])
        # quotas that no cgroup enforces (not permitted here): the duty-cycle throttle instead
        quotas = {p.pid: share for p, pl, d in zip(procs, places, devices)
                  if d not in em.cgroups and (share := quota_share(pl)) is not None}
        if quotas:
            throttle = _Throttle(quotas)
            throttle.start()
        last = time.monotonic()
        failed_at = None
        hung = False
        while len(records) < len(procs):
            check_interrupted()
            try:
                kind, role, payload = q.get(timeout=0.05)
            except queue_mod.Empty:
                kind = None
            now = time.monotonic()
            if kind == "done":
                records[role] = payload
                last = now
            elif kind == "error":
                errors[role] = payload
            elif kind == "ready":
                ready.add(role)
                last = now
            elif kind == "tokens":
                last = now
                if on_tokens:
                    on_tokens(payload)
            elif kind == "progress":
                prog[role] = payload
                last = now
                if progress:
                    progress(role, payload)
            if kind is not None:
                continue  # drain the queue before judging who is dead
            for r, p in enumerate(procs):
                if r not in records and r not in errors and r not in dead and p.exitcode is not None:
                    dead[r] = p.exitcode
            if errors or dead:
                failed_at = failed_at or now
                if now - failed_at >= _COLLECT_S:
                    break
                continue
            if len(ready) < len(procs):
                if now - t_start > startup_timeout_s:
                    hung = True
                    break
            elif now - last > timeout_s + 5.0:
                hung = True
                break
        if dead and fs_pid is not None and not _running(fs_pid):
            raise _forkserver_died(fs_pid)
        if errors or dead or hung:
            if hung and len(ready) < len(procs):
                missing = sorted(set(range(len(procs))) - ready)
                raise WorkerError(f"{_describe(cfgs, missing[0])} was not ready after {startup_timeout_s:g}s "
                                  f"(loading its weights or joining the process group)")
            raise WorkerError(_failure_message(cfgs, errors, dead, prog, hung, timeout_s, n_items))
    finally:
        if throttle is not None:
            throttle.stop()
        _stop(procs)
        q.close()
        q.cancel_join_thread()
    run = run_from_records(records, devices, stages, ids)
    run.wall_s = time.monotonic() - t_start
    if load is not None:  # every worker of this run is on this machine
        run.other_cpu_cores = load.other_cpu_cores(sum(r.get("process_cpu_s", 0.0) for r in records.values()), helpers)
    run.not_emulated = em.gaps(setup) + shared_cores(devices, places, usable_cores(), cpu_quota_cores())
    run.emulated = em.describe()
    return run


def run_from_records(records: dict[int, dict], devices, stages, ids) -> Run:
    rec = records[stages[-1][0][0]]  # the last stage's leader holds the logits
    extra = {}
    if "decode" in rec:  # and the generated ids, with the time each was made
        extra = {"generated": rec["decode"]["generated"], "token_times": rec["decode"]["token_times"],
                 "sampler_role": stages[-1][0][0]}
    return Run(records=records, devices=list(devices), logits=rec["logits"], all_logits=rec.get("all_logits"),
               ids=ids, extra=extra)


# -- records -> Result ------------------------------------------------------------
def run_events(run: Run, cluster=None) -> list[Event]:
    """The workers' stamps as Events on one timeline (seconds since the measured run's start).

    As in the simulator, a transfer belongs to the stage it feeds and, given the
    ``cluster``, is drawn on the narrowest link of its route."""
    from hpipe.sim import transfer_link

    recs = run.records
    one_host = len({r.get("boot_id") for r in recs.values()}) == 1
    # One host: perf_counter is one clock for every process.  Several: align at the barrier.
    offset = {role: (0.0 if one_host else -r["t_sync"]) for role, r in recs.items()}
    stage = {role: r["stage"] for role, r in recs.items()}
    dev = run.devices
    events = []
    # the prefill's stamps, then (generation) the decode steps', under the same keys
    phases = [("prefill", recs)] + ([("decode", {role: r["decode"] for role, r in recs.items()})]
                                    if all("decode" in r for r in recs.values()) else [])
    for phase, rs in phases:
        for role, r in rs.items():
            o = offset[role]
            for kind, mb, s, t0, t1, nbytes in r["events"]:
                events.append(Event(device=dev[role], kind=kind, stage=stage[role], micro_batch=mb, slice=s,
                                    start_s=t0 + o, end_s=t1 + o, nbytes=float(nbytes), phase=phase))
        issued = {}
        for role, r in rs.items():
            for mb, s, dst, t, nbytes in r["sends"]:
                issued[(role, dst, mb, s)] = t + offset[role]
        for role, r in rs.items():
            o = offset[role]
            for mb, s, src, t_post, t_done, nbytes in r["recvs"]:
                t_send = issued.get((src, role, mb, s), t_post + o)
                start = max(t_send, t_post + o)
                # a tensor-parallel leader forwarding its input to a peer is not a transfer between
                # stages: no link, as in the simulator (and not counted in bytes_per_link)
                between = stage.get(src, -1) != stage[role]
                link = transfer_link(cluster, dev[src], dev[role]) if cluster is not None and between else None
                events.append(Event(device=dev[src], kind="transfer", stage=stage[role], micro_batch=mb, slice=s,
                                    start_s=start, end_s=max(start, t_done + o), dst=dev[role],
                                    nbytes=float(nbytes), link=link, phase=phase))
    events.sort(key=lambda e: (e.start_s, e.end_s))
    return events


def reference_logits(setup, ids: np.ndarray, spec=None, seed: int = 0, all_positions: bool = False) -> np.ndarray:
    """The whole model in this process, float32 on CPU: logits of the last position (B, V)."""
    import torch

    from hpipe.runtime.model import full_forward
    from hpipe.runtime.weights import weight_source

    spec = spec or setup.model
    torch_ids = torch.from_numpy(np.ascontiguousarray(ids))
    logits = full_forward(spec, weight_source(spec, setup.weights, seed), torch_ids, dtype="float32")
    return (logits if all_positions else logits[:, -1]).numpy()


LOSSY_CHECK_SHARE = 0.25
"""A lossy plan's --check passes up to this share of its codecs' own effect on the logits:
the pipeline and its one-process replay round a value that lies within float noise of a
grid midpoint to neighbouring levels where their sums run in another order (a TP stage's
all-reduce).  megatron on local-cpu-4dev with int4 on its hop: 0.012 off its replay
(2-core Intel Xeon VM, 2026-12-03), past float32's 1e-3; a codec not applied at all is
off by its whole effect."""


def within_tolerance(max_abs_error: float, tolerance: float) -> bool:
    """Whether a --check's largest logit error passes (NaN does not)."""
    return bool(max_abs_error <= tolerance)


def check_verdict(setup, measured) -> tuple[bool, str]:
    """A measured prefill's --check: whether it passed, and its figures against the tolerance
    (what `hpipe execute --check` and the torchrun entry's say)."""
    err, tol = measured.max_abs_error, measured.check_tolerance
    what = f"for {setup.dtype}" if tol == CHECK_TOLERANCE[setup.dtype] else "for these codecs"
    if within_tolerance(err, tol):
        return True, f"max |logit error| {err:.3g} <= {tol:.3g}, the tolerance {what}"
    return False, f"max |logit error| {err:.3g} exceeds {tol:.3g} {what}"


def plan_reference(setup, plan, ids: np.ndarray, output_tokens: int = 1, spec=None, seed: int = 0, eos=()):
    """What ``plan`` computes, in this process (float32, CPU): each sequence's new ids and the
    prompt's last-position logits (B, V).  A plan with lossy codecs is replayed with their
    round trips on exactly the messages the runtime compresses
    (``hpipe.runtime.codec_reference``); any other plan computes the model itself, which the
    plain loop without a KV cache gives (``generation.reference_generate``)."""
    from hpipe.runtime.weights import weight_source

    spec = spec or setup.model
    source = weight_source(spec, setup.weights, seed)
    if not plan.lossy:
        from hpipe.runtime.generation import reference_generate

        return reference_generate(spec, source, ids, output_tokens, eos=eos)
    from hpipe.runtime.codec_reference import CompressedRun, generate
    from hpipe.runtime.model import build_units

    units = build_units(spec, 0, spec.n_units, source, dtype="float32")
    return generate(units, ids, output_tokens, CompressedRun.of(setup, plan), eos=eos)


def execute(setup, plan, *, inputs=None, check: bool = False, timeout_s: float = 60.0, quiet: bool = False,
            warmup: int = 1, seed: int = 0, startup_timeout_s: float = 600.0, on_tokens=None, spec=None,
            **launch_kw) -> RunResult:
    """Run ``plan`` for real; its measured RunResult (``next_token_ids``, and ``max_abs_error``
    against a single-process float32 forward when ``check``: the plan's codecs applied where
    it has lossy ones).

    When the scenario generates (``workload.output_tokens`` > 0) the workers decode after
    the prefill: the result adds ``generated_ids`` and the decode figures, and
    ``on_tokens([(sequence, id), ...])`` streams each step's ids as they are made.  ``spec``:
    ``runtime_spec(setup)`` where the caller has it already."""
    spec = spec or runtime_spec(setup)
    ids = make_ids(setup, inputs, seed)
    from hpipe.progress import progress

    generation = None
    if setup.output_tokens > 0:
        from hpipe.runtime.generation import generation_config

        generation = generation_config(setup, plan, spec, stream=on_tokens is not None)
    last_role = len(plan.devices) - len(plan.stages[-1].devices)
    n_items = plan.micro_batches * len(plan.slices)
    if generation is not None:
        n_items += len(generation.group_sizes) * (generation.output_tokens - 1)
    with progress(quiet) as bar:
        task = bar.add_task(f"executing {plan.planner}", total=(warmup + 1) * n_items)

        def advance(role, item):  # the last stage's items, warm-up runs included
            if role == last_role:
                bar.advance(task)

        from hpipe.runtime.energy import Meter, counter_for

        counter = counter_for([setup.cluster.device(d) for d in plan.devices])
        meter = Meter(counter) if counter is not None else None
        with meter or contextlib.nullcontext():
            run = launch(setup, plan, ids=ids, spec=spec, timeout_s=timeout_s, startup_timeout_s=startup_timeout_s,
                         warmup=warmup, seed=seed, progress=advance, generation=generation, on_tokens=on_tokens,
                         **launch_kw)
    result = measured_result(setup, plan, run, check=check, spec=spec, seed=seed, meter=meter)
    if generation is not None:
        from hpipe.runtime.generation import decode_text, load_tokenizer

        tok = load_tokenizer(setup.weights)
        if tok is not None:  # the weights folder's tokenizer.json
            result.text = [decode_text(tok, g) for g in result.generated_ids]
    return result


def measured_result(setup, plan, run: Run, *, check: bool = False, spec=None, seed: int = 0,
                    meter=None) -> RunResult:
    """The run's RunResult through the simulator's ``summarize``; with ``check``, the
    largest logit error against one process.  Energy is modelled (``energy_source``) unless
    ``meter`` (``hpipe.runtime.energy``) read counters over the whole measured run."""
    extra = {"next_token_ids": [int(t) for t in run.logits.argmax(-1)], "energy_source": "modelled",
             "other_cpu_cores": run.other_cpu_cores, "not_emulated": run.not_emulated or None,
             "emulated": run.emulated or None}
    cpu = {run.devices[role]: float(r["compute_cpu_s"]) for role, r in run.records.items()
           if "compute_cpu_s" in r and setup.cluster.device(run.devices[role]).runtime_device == "cpu"}
    if cpu:
        extra["compute_cpu_s"] = cpu
        dec_cpu = {d: float(run.records[role]["decode"]["compute_cpu_s"]) for role, d in enumerate(run.devices)
                   if d in cpu and "compute_cpu_s" in run.records.get(role, {}).get("decode", {})}
        if dec_cpu:
            extra["decode_compute_cpu_s"] = dec_cpu
    if check:  # against what the plan computes: its codecs' round trips included
        ref = reference_logits(setup, run.ids, spec, seed)
        tol = CHECK_TOLERANCE[setup.dtype]
        if plan.lossy:
            replay = plan_reference(setup, plan, run.ids, 1, spec, seed)[1]
            tol = max(tol, LOSSY_CHECK_SHARE * float(np.abs(replay - ref).max()))
            ref = replay
        extra["max_abs_error"] = float(np.abs(run.logits.astype(np.float64) - ref).max())
        extra["check_tolerance"] = tol
    peaks = {run.devices[role]: float(r["peak_bytes"]) for role, r in run.records.items()}
    events = run_events(run, setup.cluster)
    one_host = len({r.get("boot_id") for r in run.records.values()}) == 1  # events on this host's clock
    if "generated" in run.extra:  # the decode figures as the simulator defines them
        from hpipe.result import decode_figures

        o = 0.0 if one_host else -run.records[run.extra["sampler_role"]]["t_sync"]
        t0 = min(e.start_s for e in events)
        latency = max(e.end_s for e in events) - t0
        times = [[t + o for t in ts] for ts in run.extra["token_times"]]
        extra.update(decode_figures(times, t0, latency), generated_ids=run.extra["generated"])
    joules = (meter.joules_between(min(e.start_s for e in events), max(e.end_s for e in events))
              if meter is not None and events and one_host else None)
    if joules is not None:
        extra.update(energy_source="measured")
    result = summarize(setup, plan, events, peaks, **extra)
    if joules is not None:
        result.energy_j, result.dynamic_energy_j = joules, None
    return result
