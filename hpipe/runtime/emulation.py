"""Heterogeneous devices and links on one machine: paced workers in weighted cgroups, shaped network namespaces.

A scenario says how fast its devices and links are; on a single CPU box we
make them so:

* **Slower device.** A device whose placement has ``cpu_quota: q`` runs at q of a
  core.  Its worker paces itself (``Pace``): after each stretch of compute it sleeps until
  the stretch has lasted its CPU time / q, as a q-times-slower device would have taken.
  Devices that share a core (their quotas adding up to at most one) each sit in a cgroup
  weighted by its quota (v1 ``cpu.shares`` = 1024 q, v2 ``cpu.weight`` = 100 q), so that
  while both compute the kernel splits the core between them q : q', and each runs at its
  own speed at every moment, not only on average.  The weights hold where a core carries
  only such devices: a process of weight 1024 beside them (another program, a device
  without ``cpu_quota``) takes its own share first.  A device that pacing cannot hold to its
  speed (``threads`` above one: Pace times one thread; a quota of a core or more) is also
  held to its quota by CFS bandwidth, as before.
* **Why weights, not a CPU quota.** Until 2026-12-03 each worker was held to a CFS
  bandwidth quota (q x 10 ms per 10 ms period).  A quota caps CPU time per period, not
  speed: a worker that sat idle starts the next period with its whole share and runs a
  short burst at full speed (a 3 ms burst at quota 0.4 took 3.0 ms, not 7.5: 2-core AMD
  EPYC VM, 2026-12-02), which is why ``Pace`` exists; and a stretch that used up its
  period's budget leaves the next one to start throttled, time that nothing can give
  back.  A tensor-parallel shard between two all-reduces (10-20 ms) paid that at every
  all-reduce: on local-cpu-4dev a TP pair over the whole model ran 0.77-0.80 s under
  quotas and 0.66-0.67 s with weights, predicted 10-12% and 1-2% too fast (3 interleaved
  rounds each, fresh profiles, 2-core Intel Xeon VM, 2026-12-03;
  ``benchmarks/results/emulation-quota-vs-weights-4dev-2026-12-03-xeon.txt``; the same pair
  under quotas measured 0.72-0.79 s, −2.9…−11%, three hours earlier).
* **Slower link.** When a scenario has several hosts and gives none of them an
  ``address``, each host is emulated by a network namespace on this machine;
  every pair of namespaces is joined by a veth pair whose two ends are shaped
  with ``tc`` to the scenario's link bandwidth (tbf) and, where the kernel has
  the netem qdisc, its latency.  Each namespace carries an *identity* address
  (on a veth pair inside the namespace: the kernel here has no dummy links)
  with a host route to every peer through the direct veth, so one address per
  worker serves gloo whatever the number of hosts.  Workers bind gloo to it
  (``GLOO_SOCKET_IFNAME``).

Everything created is named ``hpipe-<pid>-...`` after the process that owns it
and removed when the ``emulate`` block ends, also on an exception or SIGTERM
(turned into SystemExit while the block runs).  A process killed with SIGKILL
cannot clean up: the next ``emulate`` sweeps resources whose owner is dead.

Workers call ``enter(worker)`` first thing in their process: join the cgroup,
move into the namespace (setns), give themselves a hosts file naming the emulated
hosts (in a mount namespace of their own) and pin to the placement's cores.

This module needs root, ``ip`` and ``tc`` and a cgroup file system; the
``*_unsupported()`` functions say why not when they are missing, and tests skip
with that reason.  Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hpipe.devices import paced
from hpipe.errors import HpipeError
from hpipe.stopping import signals_held

PREFIX = "hpipe-"
SUBNET = "10.213"
"""Private addresses used only inside the emulation's own namespaces (the root namespace's
routing is never touched), so they cannot clash with this machine's networks: the hosts'
identity addresses in 10.213.0.0/24, then one /30 per pair of hosts (``pair_subnet``)."""
MAX_HOSTS = 250
"""Emulated hosts at most: identity addresses 10.213.0.1-250, and 31,125 pairs' /30s, which
run from 10.213.1.0 to 10.214.231.83."""
LOOPBACK_AT_LEAST_GBPS, LOOPBACK_AT_MOST_US = 1.0, 1000.0
"""A link inside a host runs over this machine's loopback, which no machine hpipe runs on
makes slower than 1 Gbit/s or later than 1 ms (gloo's TCP moved 1 MiB messages at about
6 Gbit/s even through a shaped veth on the 2-core AMD EPYC VM, 2026-12-04): an interconnect
described so is not what the run gets, and the run says so."""
TBF_LIMIT_MAX = 2**32 - 1
"""tbf's queue limit is a 32-bit byte count (``tc`` refuses more: "illegal value for limit")."""
CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000  # linux/sched.h
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000  # linux/mount.h
LINK_MTU = 16000
"""MTU of the shaped veth pairs.  Their packets are handled on the *sender's* CPU (tbf,
then the veth hands each packet to the receiving stack in the same softirq), so the
emulated link costs the sending device CPU time per packet that a real NIC would not:
at 1500 bytes, 6-12% of a single-core stage's compute on a 100 Mbit/s link.  Larger
frames cut the packet count ten-fold; the token bucket still paces every byte."""


class EmulationError(HpipeError):
    """The machine cannot emulate what the scenario asks (not root, no tc, no cgroup fs)."""


# ---- what the machine permits --------------------------------------------------------------
def _cgroup_cpu_root(base: Path = Path("/sys/fs/cgroup")) -> tuple[Path, int] | None:
    """(directory, cgroup version) where CPU weights can be set, or None (``base``: where the
    cgroup file systems are mounted)."""
    v1 = base / "cpu"
    if (v1 / "cpu.shares").exists():
        return v1, 1
    v2 = base
    # a child gets cpu.weight and cpu.max only where its parent's subtree_control enables cpu:
    # in a container with its own cgroup namespace it may be available and not delegated
    if all("cpu" in _words(v2 / f) for f in ("cgroup.controllers", "cgroup.subtree_control")):
        return v2, 2
    return None


def _words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def cgroup_unsupported() -> str | None:
    """Why a slower device (``cpu_quota``) cannot be emulated here, or None when it can."""
    if os.geteuid() != 0:
        return "emulating a slower device (cpu_quota) with a cgroup needs root"
    root = _cgroup_cpu_root()
    if root is None:
        return ("no cgroup CPU controller to use (neither /sys/fs/cgroup/cpu nor cgroup v2 with cpu in "
                "cgroup.subtree_control)")
    if not os.access(root[0], os.W_OK):
        return f"{root[0]} is not writable"
    return None


_NETNS_PROBE: dict[str, str | None] = {}


def netns_unsupported() -> str | None:
    """Why shaped links between network namespaces cannot be emulated here, or None."""
    if "r" in _NETNS_PROBE:
        return _NETNS_PROBE["r"]
    why = None
    if os.geteuid() != 0:
        why = "emulating links with network namespaces and tc needs root"
    elif not shutil.which("ip") or not shutil.which("tc"):
        why = "emulating links needs the `ip` and `tc` commands (iproute2)"
    else:
        name = f"{PREFIX}{os.getpid()}-probe"
        try:
            _ip("netns", "add", name)
            _ip("-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
            _run(["tc", "-n", name, "qdisc", "add", "dev", "p0", "root", "tbf", "rate", "100mbit",
                  "burst", "32kb", "limit", "1mb"])
        except EmulationError as e:
            why = f"cannot create shaped network namespaces here: {e}"
        finally:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    _NETNS_PROBE["r"] = why
    return why


_NETEM: dict[str, bool] = {}


def netem_available() -> bool:
    """Whether the kernel has the netem qdisc (link latency); tbf alone shapes bandwidth only."""
    if "r" not in _NETEM:
        name = f"{PREFIX}{os.getpid()}-probe2"
        try:
            _ip("netns", "add", name)
            _ip("-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
            _run(["tc", "-n", name, "qdisc", "add", "dev", "p0", "root", "netem", "delay", "100us"])
            _NETEM["r"] = True
        except EmulationError:
            _NETEM["r"] = False
        finally:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    return _NETEM["r"]


def _run(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise EmulationError(f"`{' '.join(cmd)}` failed: {(p.stderr or p.stdout).strip()}")
    return p.stdout


def _ip(*args: str) -> str:
    return _run(["ip", *args])


# ---- CPU weight -----------------------------------------------------------------------------
@dataclass
class CpuLimit:
    """A cgroup weighting one worker by ``quota_cpus`` against the others on its core (the
    worker's ``Pace`` holds it to that speed when it computes alone)."""

    path: Path
    version: int
    quota_cpus: float
    capped: bool = False
    """Also held to ``quota_cpus`` CPUs per period by a CFS quota: only for a device that
    ``Pace`` cannot hold to its speed (several threads, or a quota of a core or more)."""

    @property
    def procs_file(self) -> str:
        return str(self.path / "cgroup.procs")

    @property
    def weight(self) -> int:
        """cpu.shares (v1, default 1024) or cpu.weight (v2, 1-10000, default 100) in proportion to the quota."""
        if self.version == 1:
            return max(2, round(1024 * self.quota_cpus))
        return min(10000, max(1, round(100 * self.quota_cpus)))


CFS_PERIOD_US = 10_000
"""The CFS period of a capped device's quota (a capped device is rare: see ``CpuLimit.capped``)."""


def cfs_limit(quota_cpus: float) -> tuple[int, int]:
    """(quota_us, period_us) for a cap of ``quota_cpus`` cores: the kernel's smallest quota is
    1 ms, so below 0.1 core the period grows past ``CFS_PERIOD_US`` (to its 1 s limit) rather
    than the quota rounding up (0.05 core had run at 0.1)."""
    period_us = min(1_000_000, max(CFS_PERIOD_US, math.ceil(1000 / quota_cpus)))
    return max(1000, round(quota_cpus * period_us)), period_us


def _make_cgroup(name: str, quota_cpus: float, threads: int = 1) -> CpuLimit:
    why = cgroup_unsupported()
    if why:
        raise EmulationError(why)
    root, version = _cgroup_cpu_root()
    path = root / name
    path.mkdir()
    limit = CpuLimit(path, version, quota_cpus, capped=not paced(quota_cpus, threads))
    try:
        (path / ("cpu.shares" if version == 1 else "cpu.weight")).write_text(str(limit.weight))
        if limit.capped:  # Pace times one thread, and never slows a device of a core or more
            quota_us, period_us = cfs_limit(quota_cpus)
            if version == 1:
                (path / "cpu.cfs_period_us").write_text(str(period_us))
                (path / "cpu.cfs_quota_us").write_text(str(quota_us))
            else:
                (path / "cpu.max").write_text(f"{quota_us} {period_us}")
    except OSError as e:  # a cgroup whose share cannot be set emulates nothing: removed, and said
        _remove_cgroup(path)
        raise EmulationError(f"cannot set the CPU share of cgroup {path}: {e.strerror or e}") from None
    return limit


def _remove_cgroup(path: Path) -> None:
    """Move any task left back to the parent, then remove the directory."""
    if not path.exists():
        return
    parent = path.parent / "cgroup.procs"
    for _ in range(50):
        try:
            pids = (path / "cgroup.procs").read_text().split()
        except FileNotFoundError:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                parent.write_text(pid)
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            threading.Event().wait(0.02)
    path.rmdir()


# ---- network ---------------------------------------------------------------------------------
@dataclass
class ShapedLink:
    hosts: tuple[str, str]
    bandwidth_gbps: float
    latency_us: float
    latency_emulated: bool


@dataclass
class Network:
    """Namespaces (one per host), their identity addresses and the shaped links."""

    namespaces: dict[str, str] = field(default_factory=dict)
    """host -> netns name"""
    addresses: dict[str, str] = field(default_factory=dict)
    """host -> identity address every worker of that host binds to"""
    names: dict[str, str] = field(default_factory=dict)
    """host -> the name its identity address has in the workers' hosts file (``host_name``)"""
    links: list[ShapedLink] = field(default_factory=list)

    IDENTITY_IF = "hpid"


def _tc_shape(ns: str, dev: str, bandwidth_gbps: float, latency_us: float, netem: bool) -> None:
    rate_bps = bandwidth_gbps * 1e9
    # A small burst (200 us at the line rate, but at least two frames, which tbf needs to pass
    # a whole one: 32 KB, itself 2.6 ms at 100 Mbit/s, so a message under that leaves at once
    # on a slow link; tbf cuts larger GSO segments itself) so a message's time grows linearly
    # from the first byte, as the latency + bytes / bandwidth model says; the queue holds
    # two seconds' worth so nothing is dropped (drops would add TCP retransmission stalls the
    # model does not describe), up to tbf's 32-bit limit (4 GB: past 17 Gbit/s).
    burst = max(2 * LINK_MTU, int(rate_bps / 8 * 200e-6))
    limit = min(max(16 << 20, int(rate_bps / 8 * 2)), TBF_LIMIT_MAX)
    if netem and latency_us > 0:
        _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem",
              "delay", f"{latency_us:.0f}us", "limit", "100000"])
        parent = ["parent", "1:1"]
    else:
        parent = ["root"]
    _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, *parent, "tbf", "rate", f"{int(rate_bps)}bit",
          "burst", str(burst), "limit", str(limit)])


def pair_subnet(k: int) -> tuple[str, str]:
    """The two ends' addresses of the ``k``-th pair of hosts' /30 (k from 1), counted on from
    10.213.1.0: one octet per pair (10.213.k.0) ran out at 24 hosts (276 pairs)."""
    import ipaddress

    base = ipaddress.IPv4Address(f"{SUBNET}.1.0") + 4 * (k - 1)
    return str(base + 1), str(base + 2)


def _make_network(owner: str, hosts: list[str], link_of) -> Network:
    """Namespaces for ``hosts`` joined pairwise; ``link_of(a, b)`` -> (bandwidth_gbps, latency_us)."""
    why = netns_unsupported()
    if why:
        raise EmulationError(why)
    if len(hosts) > MAX_HOSTS:
        raise EmulationError(f"{len(hosts)} emulated hosts: at most {MAX_HOSTS}")
    netem = netem_available()
    net = Network()
    for i, h in enumerate(hosts):
        ns = f"{owner}-n{i}"
        _ip("netns", "add", ns)
        net.namespaces[h] = ns
        addr = f"{SUBNET}.0.{i + 1}"
        net.addresses[h] = addr
        net.names[h] = host_name(h)
        _ip("-n", ns, "link", "set", "lo", "up")
        # identity address: on one end of a veth pair kept inside the namespace (no dummy links here)
        _ip("-n", ns, "link", "add", Network.IDENTITY_IF, "type", "veth", "peer", "name", "hpidp")
        _ip("-n", ns, "addr", "add", f"{addr}/32", "dev", Network.IDENTITY_IF)
        _ip("-n", ns, "link", "set", Network.IDENTITY_IF, "up")
        _ip("-n", ns, "link", "set", "hpidp", "up")
    k = 0
    for i, a in enumerate(hosts):
        for j in range(i + 1, len(hosts)):
            b = hosts[j]
            k += 1
            bw, lat = link_of(a, b)
            na, nb = net.namespaces[a], net.namespaces[b]
            da, db = f"v{i}x{j}", f"v{j}x{i}"
            # created in the first namespace with its peer in the second: no end ever sits in
            # the root namespace, so deleting the namespaces deletes the pair
            _ip("-n", na, "link", "add", da, "type", "veth", "peer", "name", db, "netns", nb)
            end_a, end_b = pair_subnet(k)
            _ip("-n", na, "addr", "add", f"{end_a}/30", "dev", da)
            _ip("-n", nb, "addr", "add", f"{end_b}/30", "dev", db)
            for ns_, dev_ in ((na, da), (nb, db)):
                _ip("-n", ns_, "link", "set", dev_, "mtu", str(LINK_MTU))
                _ip("-n", ns_, "link", "set", dev_, "up")
            _ip("-n", na, "route", "add", f"{net.addresses[b]}/32", "via", end_b, "src", net.addresses[a])
            _ip("-n", nb, "route", "add", f"{net.addresses[a]}/32", "via", end_a, "src", net.addresses[b])
            _tc_shape(na, da, bw, lat, netem)
            _tc_shape(nb, db, bw, lat, netem)
            net.links.append(ShapedLink((a, b), bw, lat, netem and lat > 0))
    return net


def host_name(host: str) -> str:
    """The emulated host's name in the workers' hosts file: the scenario's name made a valid
    hostname label, under ``.hpipe`` so it can never shadow a real name such as localhost."""
    return (re.sub(r"[^A-Za-z0-9-]+", "-", host).strip("-") or "host") + ".hpipe"


def _name_hosts(entries: tuple[tuple[str, str], ...]) -> bool:
    """Give this process (a worker inside a namespace) a hosts file that names every emulated
    host's identity address, in a mount namespace of its own; the machine's /etc/hosts is
    not touched.  Best effort: whether it took.

    Why: c10d looks up the name behind every socket that connects to its store.  Inside
    the namespaces the address is in no hosts file and no name server can be reached, so
    glibc answers EAI_AGAIN and c10d prints "The hostname of the client socket cannot be
    retrieved" once per connection (92 lines in one compression latency benchmark).  Its
    sockets are IPv6, the addresses IPv4-mapped, which glibc looks up as written: each
    address is named in both forms.  ``ip netns exec`` gives a namespace its own hosts file
    the same way (/etc/netns/NAME/hosts).  Like setns, unshare acts on the calling thread;
    the threads torch.distributed starts later inherit it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        return False
    # private first: the bind mount must not propagate back to the machine's namespace
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    try:
        base = Path("/etc/hosts").read_text()
    except OSError:
        base = "127.0.0.1 localhost\n"
    ours = "".join(f"{a} {n}\n::ffff:{a} {n}\n" for a, n in entries)
    text = base.rstrip("\n") + "\n# hpipe's emulated hosts\n" + ours
    try:
        fd, tmp = tempfile.mkstemp(prefix="hpipe-hosts-")
    except OSError:  # no writable temporary folder: the worker runs on, only c10d's warnings return
        return False
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        # the mount holds the file open; its name can go at once
        return libc.mount(tmp.encode(), b"/etc/hosts", None, MS_BIND, None) == 0
    except OSError:
        return False
    finally:
        os.unlink(tmp)


def _remove_namespace(ns: str) -> None:
    # its own session: a terminal's Ctrl-C goes to the whole foreground process group, and
    # must not kill `ip` half-way through the clean-up that Ctrl-C started
    subprocess.run(["ip", "netns", "delete", ns], capture_output=True, start_new_session=True)


# ---- what a worker needs ------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerPlacement:
    """Everything a worker process does to itself before it starts (picklable)."""

    device: str
    threads: int = 1
    cores: tuple[int, ...] | None = None
    cgroup_procs: str | None = None
    """cgroup.procs file to join (emulated slower device)."""
    netns: str | None = None
    """Network namespace to enter (emulated host)."""
    address: str | None = None
    """Address this worker binds gloo to; the master address when it is rank 0's."""
    ifname: str | None = None
    """Interface holding ``address`` (GLOO_SOCKET_IFNAME)."""
    host_names: tuple[tuple[str, str], ...] = ()
    """(address, name) of every emulated host, for the worker's own hosts file (``_name_hosts``)."""
    cpu_quota: float | None = None
    """The device's speed as a share of a core: its compute paces itself to it (``Pace``), and
    its cgroup weighs it by it against the other devices on its core."""

    def env(self) -> dict[str, str]:
        """Environment a worker sets before torch.distributed starts (gloo's interface)."""
        return {"GLOO_SOCKET_IFNAME": self.ifname} if self.ifname else {}


def enter(worker: WorkerPlacement | None) -> None:
    """In the worker process, before any work: join the cgroup, enter the namespace, pin to cores.

    The cgroup first, so everything the worker does is weighted; the namespace before
    torch.distributed opens any socket (setns moves the calling thread, and threads
    started afterwards inherit it)."""
    if worker is None:
        return
    if worker.cgroup_procs:
        Path(worker.cgroup_procs).write_text(str(os.getpid()))
    if worker.cpu_quota:
        # Pace's sleeps overshoot by the timer slack (50 us by default; measured 80-105 us
        # late, 40-80 us with 1 us of slack here), once per stretch, and a TP decode step
        # has 16 stretches (one before each all-reduce)
        _prctl(PR_SET_TIMERSLACK, 1000)
    if worker.netns:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/var/run/netns/{worker.netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise EmulationError(f"setns into {worker.netns}: {os.strerror(err)}")
        finally:
            os.close(fd)
        if worker.host_names:
            # where the sandbox forbids it, c10d's name-lookup warnings are all that changes
            _name_hosts(worker.host_names)
    if worker.cores:
        os.sched_setaffinity(0, worker.cores)
    for k, v in worker.env().items():
        os.environ[k] = v


PR_SET_TIMERSLACK = 29  # linux/prctl.h


def _prctl(option: int, value: int) -> bool:
    """Best effort (a sandbox may forbid prctl): whether it took."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(option, value, 0, 0, 0) == 0


class Pace:
    """A q-times-slower device out of a full-speed core: every stretch of compute lasts at
    least its CPU time (this thread's) / q.

    ``mark()`` where a stretch starts; ``wait()`` where its result leaves the device (a send,
    an all-reduce, the end of a work item): sleeps the rest of CPU time / q, then marks again.
    Waiting for messages between stretches is not compute and is not stretched.  A device
    with no quota (or quota >= 1) never sleeps.  The compute thread's CPU time stands for
    the device's work, as in the fitted model's CPU basis: right for ``threads: 1``, the
    placement of every emulated slow device here.  Each sleep ends 40-80 us late (``enter``
    sets 1 us of timer slack).  Not used on a GPU, nor where cgroups are not permitted (the
    launcher's SIGSTOP duty cycle then slows every stretch alike)."""

    def __init__(self, quota: float | None):
        self.slowdown = 1.0 / quota if quota and quota < 1.0 else 1.0
        self.slept_s = 0.0
        """Seconds slept so far (how much faster the bursts ran than the device they emulate)."""
        self.mark()

    def mark(self) -> None:
        self.t0, self.cpu0 = time.perf_counter(), time.thread_time()

    def wait(self) -> None:
        if self.slowdown > 1.0:
            due = self.t0 + (time.thread_time() - self.cpu0) * self.slowdown
            rest = due - time.perf_counter()
            if rest > 0:
                time.sleep(rest)
                self.slept_s += time.perf_counter() - due + rest  # as slept, overshoot included
        self.mark()

    @classmethod
    def of(cls, worker: "WorkerPlacement | None") -> "Pace":
        return cls(worker.cpu_quota if worker is not None else None)


@dataclass
class Emulation:
    """What ``emulate`` set up: one WorkerPlacement per device, and what was shaped."""

    owner: str
    workers: dict[str, WorkerPlacement]
    network: Network | None
    cgroups: dict[str, CpuLimit]

    def worker(self, device_id: str) -> WorkerPlacement:
        return self.workers[device_id]

    def master_addr(self, device_id: str) -> str:
        """Address of the rendezvous store when ``device_id`` hosts it (rank 0)."""
        return self.workers[device_id].address or "127.0.0.1"

    @property
    def active(self) -> bool:
        return bool(self.network or self.cgroups)

    def gaps(self, setup) -> list[str]:
        """What the scenario describes that this emulation left out, in words (empty: nothing):
        ``what_to_emulate``'s fallbacks, and link latency where the kernel has no netem."""
        out = []
        throttled = [d for d in self.workers
                     if d not in self.cgroups and slowed_by_quota(setup.cluster.device(d).placement)]
        if throttled:
            out.append(f"CPU quotas by a SIGSTOP/SIGCONT duty cycle, not cgroups ({cgroup_unsupported()}): "
                       + ", ".join(throttled))
        hosts = {setup.cluster.device(d).host for d in self.workers}
        if len(hosts) > 1 and self.network is None:
            why = (netns_unsupported() if needs_network(setup) else
                   "the hosts have addresses: real hosts, which `python -m hpipe.runtime.torchrun` runs one per host")
            out.append(f"the links between hosts on plain loopback, not shaped ({why})")
        # links inside a host are this machine's loopback, never shaped: the ready scenarios
        # describe loopback there (20 Gbit/s, 50 us); a figure loopback cannot be is said
        by_host: dict[str, list[str]] = {}
        for d in self.workers:  # CPU workers: GPUs of a host talk over NCCL (NVLink, PCIe), not loopback
            if setup.cluster.device(d).runtime_device == "cpu":
                by_host.setdefault(setup.cluster.device(d).host, []).append(d)
        for h, devs in by_host.items():
            slow = sorted({(r.bandwidth_gbps, r.latency_s) for a in devs for b in devs if a != b
                           for r in [setup.cluster.route(a, b)]
                           if r.bandwidth_gbps < LOOPBACK_AT_LEAST_GBPS or r.latency_s * 1e6 > LOOPBACK_AT_MOST_US})
            if slow:
                bw, lat = slow[0]
                out.append(f"the links inside host {h} on this machine's loopback, not shaped to its interconnect "
                           f"({bw:g} Gbit/s, {lat * 1e6:g} us): only links between hosts are emulated")
        unlagged = [lk for lk in (self.network.links if self.network else ()) if lk.latency_us > 0
                    and not lk.latency_emulated]
        if unlagged:
            out.append("link latency not added (this kernel has no netem qdisc; tbf shapes bandwidth only): "
                       + ", ".join(f"{a}<->{b} {lk.latency_us:g} us (the route's)" for lk in unlagged
                                   for a, b in [lk.hosts]))
        return out

    def describe(self) -> dict:
        out: dict = {}
        if self.cgroups:
            out["cpu_quota"] = {d: c.quota_cpus for d, c in self.cgroups.items()}
            out["cpu_weight"] = {d: c.weight for d, c in self.cgroups.items()}
        if self.network:
            out["links"] = [{"between": list(lk.hosts), "bandwidth_gbps": lk.bandwidth_gbps,
                             "latency_us": lk.latency_us if lk.latency_emulated else None,
                             "asked_latency_us": lk.latency_us}
                            for lk in self.network.links]
        return out


def quota_share(placement) -> float | None:
    """The share of its time a placement's worker may run, ``cpu_quota / threads``, where its
    quota slows it (below its threads); None where it has no quota or one that leaves every
    thread a whole core.  What the launcher's duty cycle runs when no cgroup enforces it."""
    quota = getattr(placement, "cpu_quota", None)
    threads = getattr(placement, "threads", 1)
    return quota / threads if quota and quota < threads else None


def slowed_by_quota(placement) -> bool:
    """Whether a placement's quota slows its worker (``quota_share``)."""
    return quota_share(placement) is not None


def needs_network(setup) -> bool:
    """Several hosts, none with an address: each host is a network namespace here."""
    hosts = setup.scenario.cluster.hosts
    return len(hosts) > 1 and all(h.address is None for h in hosts)


def emulation_unsupported(setup, device_ids=None) -> str | None:
    """Why this machine cannot run ``setup``'s devices as the scenario describes, or None."""
    devs = [setup.cluster.device(d) for d in (device_ids or setup.cluster.device_ids)]
    if any(getattr(d.placement, "cpu_quota", None) for d in devs):
        why = cgroup_unsupported()
        if why:
            return why
    if needs_network(setup) and len({d.host for d in devs}) > 1:
        return netns_unsupported()
    return None


def what_to_emulate(setup, device_ids=None) -> dict[str, bool]:
    """What a run of ``device_ids`` emulates on this machine, each where the scenario asks
    for it and the machine permits it: ``quotas`` (cgroups) and ``network`` (namespaces).

    The launcher falls back to its own duty-cycle throttle where cgroups are not
    permitted, and to loopback where namespaces are not; `hpipe profile` and
    `hpipe validate` instead refuse (``emulation_unsupported``), since their figures
    would not describe the scenario."""
    devs = [setup.cluster.device(d) for d in (device_ids or setup.cluster.device_ids)]
    quotas = any(getattr(d.placement, "cpu_quota", None) for d in devs) and cgroup_unsupported() is None
    network = (needs_network(setup) and len({d.host for d in devs}) > 1) and netns_unsupported() is None
    return {"quotas": quotas, "network": network}


@contextlib.contextmanager
def emulate(setup, device_ids: list[str] | None = None, *, quotas: bool = True,
            network: bool = True) -> Iterator[Emulation]:
    """Set up cgroups (``quotas``) and namespaces (``network``) for ``device_ids`` (default: all
    of the scenario's) and remove them when the block ends, however it ends.  Where the
    scenario asks for neither, nothing is touched and every worker gets its plain placement."""
    devices = [setup.cluster.device(d) for d in (device_ids or setup.cluster.device_ids)]
    hosts = list(dict.fromkeys(d.host for d in devices))
    want_net = network and needs_network(setup) and len(hosts) > 1
    want_quota = quotas and any(getattr(d.placement, "cpu_quota", None) for d in devices)
    owner = f"{PREFIX}{os.getpid()}-{_next_run()}"
    if not (want_net or want_quota):
        yield Emulation(owner, {d.id: _placement(d, None, None) for d in devices}, None, {})
        return
    sweep_stale()
    cgroups: dict[str, CpuLimit] = {}
    net: Network | None = None
    restore = _sigterm_to_exit()
    try:
        if want_net:
            def link_of(a, b):
                r = setup.cluster.route(setup.cluster.hosts[a][0], setup.cluster.hosts[b][0])
                return r.bandwidth_gbps, r.latency_s * 1e6

            net = _make_network(owner, hosts, link_of)
        workers = {}
        for i, d in enumerate(devices):
            quota = getattr(d.placement, "cpu_quota", None)
            if quota and want_quota:
                cgroups[d.id] = _make_cgroup(f"{owner}-c{i}", quota, getattr(d.placement, "threads", 1) or 1)
            workers[d.id] = _placement(d, cgroups.get(d.id), net)
        yield Emulation(owner, workers, net, cgroups)
    finally:
        try:
            with signals_held():  # a second Ctrl-C must not leave hosts half removed
                _cleanup(owner)
        finally:
            restore()


def _placement(d, cgroup: CpuLimit | None, net: Network | None) -> WorkerPlacement:
    p = d.placement
    return WorkerPlacement(
        device=d.id, threads=getattr(p, "threads", 1) or 1,
        cores=tuple(p.cores) if getattr(p, "cores", None) else None,
        cgroup_procs=cgroup.procs_file if cgroup else None,
        cpu_quota=cgroup.quota_cpus if cgroup else None,
        netns=net.namespaces[d.host] if net else None,
        address=net.addresses[d.host] if net else None,
        ifname=Network.IDENTITY_IF if net else None,
        host_names=tuple((net.addresses[h], net.names[h]) for h in net.addresses) if net else ())


_RUNS = iter(range(1, 1 << 30))


def _next_run() -> int:
    return next(_RUNS)


def _cleanup(owner: str) -> None:
    """Remove every namespace and cgroup whose name starts with ``owner``."""
    for ns in _list_namespaces():
        if ns == owner or ns.startswith(owner + "-"):
            _remove_namespace(ns)
    root = _cgroup_cpu_root()
    if root:
        for p in root[0].glob(owner + "-*"):
            _remove_cgroup(p)


def _list_namespaces() -> list[str]:
    d = Path("/var/run/netns")
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def leftovers(pid: int | None = None) -> list[str]:
    """Namespaces and cgroups hpipe created (by ``pid``, or by anyone) that still exist."""
    pre = f"{PREFIX}{pid}-" if pid is not None else PREFIX
    out = [f"netns {n}" for n in _list_namespaces() if n.startswith(pre)]
    root = _cgroup_cpu_root()
    if root:
        out += [f"cgroup {p}" for p in root[0].glob(pre + "*")]
    return out


def _owner_pid(name: str) -> int | None:
    rest = name[len(PREFIX):]
    head = rest.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Remove namespaces and cgroups left by hpipe processes that no longer run (killed with
    SIGKILL, where no cleanup could run).  Returns what was removed."""
    removed = []
    for ns in _list_namespaces():
        if ns.startswith(PREFIX):
            pid = _owner_pid(ns)
            if pid is not None and pid != os.getpid() and not _alive(pid):
                _remove_namespace(ns)
                removed.append(f"netns {ns}")
    root = _cgroup_cpu_root()
    if root and os.access(root[0], os.W_OK):
        for p in root[0].glob(PREFIX + "*"):
            pid = _owner_pid(p.name)
            if pid is not None and pid != os.getpid() and not _alive(pid):
                with contextlib.suppress(OSError):
                    _remove_cgroup(p)
                    removed.append(f"cgroup {p}")
    return removed


def _sigterm_to_exit():
    """While emulation resources exist, SIGTERM and SIGHUP raise SystemExit so ``finally``
    blocks run; returns a function restoring the previous handlers.  Only the main thread may
    set handlers; a signal someone already handles (or ignores) is left to them."""
    from hpipe.stopping import STOPPING_SIGNALS

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = {sig: signal.getsignal(sig) for sig in STOPPING_SIGNALS}
    ours = [sig for sig, h in previous.items() if h in (signal.SIG_DFL, None)]
    for sig in ours:
        signal.signal(sig, handler)

    def restore():
        for sig in ours:
            signal.signal(sig, previous[sig] if previous[sig] is not None else signal.SIG_DFL)
    return restore
