"""Heterogeneity on one machine: weighted cgroups for slower devices and tc-shaped links between network
namespaces, and that whatever a run creates is gone when it ends, however it ends.

Needs root, `ip`/`tc` and a cgroup CPU controller; each test skips, saying why, where the
machine does not permit it."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from hpipe.runtime import emulation as em
from hpipe.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]

needs_cgroup = pytest.mark.skipif(bool(em.cgroup_unsupported()), reason=str(em.cgroup_unsupported()))
needs_netns = pytest.mark.skipif(bool(em.netns_unsupported()), reason=str(em.netns_unsupported()))


def two_host_setup(tmp_path, bandwidth_gbps=0.05, quota=0.5):
    data = yaml.safe_load((ROOT / "scenarios" / "local-cpu-hetero.yaml").read_text())
    data["costmodel"] = "roofline"
    data["cluster"]["network"] = {"bandwidth_gbps": bandwidth_gbps, "latency_us": 100}
    data["cluster"]["hosts"][1]["devices"][0]["runtime"]["cpu_quota"] = quota
    for h in data["cluster"]["hosts"]:  # no pinning: the test machine may have one core
        h["devices"][0]["runtime"].pop("cores", None)
    path = tmp_path / "two-hosts.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_scenario(path).resolve()


# ---- children (module level: spawned processes import them) ------------------------------
def _serve(worker, port, q):
    em.enter(worker)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((worker.address, port))
    s.listen(1)
    q.put("listening")
    c, _ = s.accept()
    n = int.from_bytes(c.recv(8, socket.MSG_WAITALL), "little")
    got = 0
    while got < n:
        got += len(c.recv(1 << 20))
    c.sendall(b"k")
    c.close()


def _send(worker, addr, port, nbytes, q):
    em.enter(worker)
    c = socket.create_connection((addr, port), timeout=30)
    t0 = time.perf_counter()
    c.sendall(nbytes.to_bytes(8, "little") + b"x" * nbytes)
    c.recv(1)
    q.put(time.perf_counter() - t0)


def _name_of(worker, addr, q):
    em.enter(worker)
    try:
        # c10d's sockets are IPv6: a peer's address comes IPv4-mapped
        q.put((socket.getnameinfo((addr, 0), socket.NI_NAMEREQD)[0],
               socket.getnameinfo((f"::ffff:{addr}", 0, 0, 0), socket.NI_NAMEREQD)[0]))
    except socket.gaierror as e:
        q.put((f"error {e.errno}",))


# ---- tests ------------------------------------------------------------------------------------
def _spin_in(procs_file, core, start, seconds, q):
    Path(procs_file).write_text(str(os.getpid()))
    os.sched_setaffinity(0, {core})
    start.wait()  # both spin over one window, however long each took to start
    t0, c0 = time.perf_counter(), time.process_time()
    x = 0
    while time.perf_counter() - t0 < seconds:
        x += 1
    q.put((procs_file, time.process_time() - c0))


@needs_cgroup
def test_devices_sharing_a_core_split_it_by_their_quotas(tmp_path):
    """The cgroups weigh two busy devices on one core 0.3 : 0.7 (their cpu_quota), at every
    moment: what each gets of their joint CPU time.  Another process on the core (a loaded
    machine) takes its own share, not theirs in another proportion."""
    setup = two_host_setup(tmp_path, quota=0.3)
    slow = setup.cluster.device_ids[1]
    with em.emulate(setup, [slow]) as e:
        w = e.worker(slow)
        assert w.cgroup_procs and w.netns is None and w.cpu_quota == 0.3  # one host used: no network
        other = em._make_cgroup(f"{e.owner}-c9", 0.7)  # removed with the rest: named after the owner
        ctx = mp.get_context("spawn")
        q, start = ctx.Queue(), ctx.Barrier(2)
        core = min(os.sched_getaffinity(0))
        ps = [ctx.Process(target=_spin_in, args=(f, core, start, 1.5, q)) for f in (w.cgroup_procs, other.procs_file)]
        for p in ps:
            p.start()
        cpu = dict(q.get(timeout=60) for _ in ps)
        for p in ps:
            p.join(10)
    share = cpu[w.cgroup_procs] / (cpu[w.cgroup_procs] + cpu[other.procs_file])
    assert 0.2 < share < 0.4, f"weighted 0.3 : 0.7, the slower device got {share:.0%} of their CPU time"
    assert not em.leftovers(os.getpid())


@needs_netns
def test_shaped_link_between_namespaces(tmp_path):
    setup = two_host_setup(tmp_path, bandwidth_gbps=0.05)
    a, b = setup.cluster.device_ids
    ctx = mp.get_context("spawn")
    nbytes = 2_000_000
    with em.emulate(setup) as e:
        wa, wb = e.worker(a), e.worker(b)
        assert wa.netns != wb.netns and wa.address != wb.address and wa.ifname
        q = ctx.Queue()
        srv = ctx.Process(target=_serve, args=(wa, 29411, q))
        srv.start()
        assert q.get(timeout=60) == "listening"
        cl = ctx.Process(target=_send, args=(wb, wa.address, 29411, nbytes, q))
        cl.start()
        seconds = q.get(timeout=60)
        cl.join(10)
        srv.join(10)
    gbps = nbytes * 8 / seconds / 1e9
    assert 0.035 < gbps < 0.065, f"shaped to 0.05 Gbit/s, measured {gbps:.3f}"
    assert not em.leftovers(os.getpid())


@needs_netns
def test_links_faster_than_17_gbps_are_shaped(tmp_path):
    """tbf's queue limit is 32 bits: two seconds of a 25 Gbit/s link overflowed it, and
    `tc` refused the run ("illegal value for limit")."""
    for gbps in (25, 100):  # (the route takes the slower of the network and a host's uplink, 126)
        with em.emulate(two_host_setup(tmp_path, bandwidth_gbps=gbps)) as e:
            (link,) = e.network.links
            assert link.bandwidth_gbps == gbps
    assert not em.leftovers(os.getpid())


def test_every_pair_of_the_most_hosts_gets_its_own_subnet():
    """One /30 per pair of hosts, apart from the hosts' identity addresses (10.213.0.0/24):
    one octet per pair had run out at 24 hosts (`ip` refused 10.213.256.1)."""
    import ipaddress

    n_pairs = em.MAX_HOSTS * (em.MAX_HOSTS - 1) // 2
    identity = ipaddress.ip_network(f"{em.SUBNET}.0.0/24")
    nets = set()
    for k in range(1, n_pairs + 1):
        a, b = map(ipaddress.IPv4Address, em.pair_subnet(k))
        net = ipaddress.ip_network(f"{a}/30", strict=False)
        assert b in net and a != b and net.network_address not in (a, b) and net.broadcast_address not in (a, b)
        assert net.is_private and not net.overlaps(identity)
        nets.add(net)
    assert len(nets) == n_pairs


@needs_netns
def test_workers_find_each_emulated_host_by_name(tmp_path):
    """Inside a namespace no name server can be reached, so a reverse lookup of a peer's address
    failed (EAI_AGAIN) and c10d printed a warning for every connection to its store.  A worker
    now has its own hosts file naming every emulated host; the machine's /etc/hosts stays as
    it was."""
    setup = two_host_setup(tmp_path)
    a, b = setup.cluster.device_ids
    before = Path("/etc/hosts").read_bytes()
    ctx = mp.get_context("spawn")
    with em.emulate(setup) as e:
        wa, wb = e.worker(a), e.worker(b)
        q = ctx.Queue()
        p = ctx.Process(target=_name_of, args=(wb, wa.address, q))
        p.start()
        names = q.get(timeout=60)
        p.join(10)
    host_a = setup.cluster.device(a).host
    assert names == (em.host_name(host_a),) * 2 and em.host_name(host_a) == host_a + ".hpipe"
    assert Path("/etc/hosts").read_bytes() == before
    assert not list(Path(tempfile.gettempdir()).glob("hpipe-hosts-*"))
    assert not em.leftovers(os.getpid())


def test_host_names_are_valid_labels_that_shadow_nothing():
    assert em.host_name("west") == "west.hpipe"
    assert em.host_name("box 1/gpu_0") == "box-1-gpu-0.hpipe"
    assert em.host_name("localhost") == "localhost.hpipe"
    assert em.host_name("__") == "host.hpipe"


@needs_netns
@needs_cgroup
def test_cleanup_on_exception(tmp_path):
    setup = two_host_setup(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with em.emulate(setup) as e:
            assert len(em.leftovers(os.getpid())) == 3  # two namespaces, one cgroup
            assert e.active
            raise RuntimeError("boom")
    assert not em.leftovers(os.getpid())


@needs_netns
@needs_cgroup
def test_a_second_ctrl_c_during_cleanup_waits_for_it(tmp_path, monkeypatch):
    """Ctrl-C, then another while the hosts are being removed (``timeout -s INT`` sends two):
    every namespace and cgroup still goes, and the second one is acted on after."""
    setup = two_host_setup(tmp_path)
    real = em._remove_namespace
    calls = []

    def interrupted_again(ns):  # the second Ctrl-C lands mid-cleanup, at the first namespace
        calls.append(ns)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        real(ns)

    monkeypatch.setattr(em, "_remove_namespace", interrupted_again)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup or a background job
    with pytest.raises(KeyboardInterrupt):
        with em.emulate(setup):
            raise KeyboardInterrupt  # the first
    assert len(calls) == 2 and not em.leftovers(os.getpid())
    assert signal.getsignal(signal.SIGINT) == before  # the handler is put back


_HOLDER = textwrap.dedent("""
    import sys, time
    from hpipe.runtime import emulation as em
    from hpipe.scenario import load_scenario
    setup = load_scenario(sys.argv[1]).resolve()
    with em.emulate(setup):
        print("ready", flush=True)
        time.sleep(600)
""")


def _start_holder(tmp_path):
    setup_path = tmp_path / "two-hosts.yaml"
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(setup_path)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "ready"
    assert len(em.leftovers(p.pid)) == 3
    return p


@needs_netns
@needs_cgroup
def test_cleanup_on_sigterm(tmp_path):
    two_host_setup(tmp_path)
    p = _start_holder(tmp_path)
    p.send_signal(signal.SIGTERM)
    p.wait(30)
    assert not em.leftovers(p.pid)


@needs_netns
@needs_cgroup
def test_sigkill_leftovers_are_swept(tmp_path):
    two_host_setup(tmp_path)
    p = _start_holder(tmp_path)
    p.kill()  # no cleanup can run in the process itself
    p.wait(30)
    assert len(em.leftovers(p.pid)) == 3
    removed = em.sweep_stale()
    assert len([r for r in removed if f"-{p.pid}-" in r]) == 3
    assert not em.leftovers(p.pid)


def test_unsupported_says_why(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(em, "_NETNS_PROBE", {})
    assert "root" in em.cgroup_unsupported()
    assert "root" in em.netns_unsupported()


# ---- pacing: a quota device is uniformly slower, also in short bursts ------------------------
def _spin_cpu(seconds):
    c0 = time.thread_time()
    while time.thread_time() - c0 < seconds:
        pass


def test_pace_stretches_compute_to_cpu_time_over_quota():
    pace = em.Pace(0.5)
    # the test's clocks bracket Pace's own: a preemption between them (a loaded machine) would
    # otherwise count wall time Pace did not see (0.035 s against 0.040 once, under load)
    t0 = time.perf_counter()
    pace.mark()
    c0 = time.thread_time()
    _spin_cpu(0.02)
    pace.wait()
    cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
    assert wall >= cpu / 0.5 * 0.99, (wall, cpu)  # at least CPU time / quota, however loaded the machine


def test_pace_leaves_waiting_and_full_speed_devices_alone():
    idle = em.Pace(0.5)
    time.sleep(0.03)  # waiting for a message is not compute
    idle.wait()
    assert idle.slept_s < 0.01
    for quota in (None, 1.0, 2.0):
        fast = em.Pace(quota)
        _spin_cpu(0.01)
        fast.wait()
        assert fast.slept_s == 0.0


@needs_cgroup
def test_short_decode_steps_on_a_quota_device_run_at_its_quota():
    """Without pacing, a tiny model's decode steps (well under a millisecond) would run at full
    speed on a device of 0.4 of a core: nothing but Pace slows a device that computes alone."""
    from hpipe.runtime.generation import generation_config
    from hpipe.runtime.launcher import launch, make_ids, runtime_spec
    from tests.runtime.runtime_helpers import CORE, TINY_LLAMA, plan, tiny_setup

    quota = 0.4
    slow = {**CORE, "name": "slow", "count": 1, "runtime": {"device": "cpu", "threads": 1, "cpu_quota": quota}}
    setup = tiny_setup(TINY_LLAMA, seq_len=16, batch_size=2, output_tokens=24, devices=[slow])
    p = plan([(["slow-0"], (0, 6))], [16]).check(setup)
    spec = runtime_spec(setup)
    run = launch(setup, p, ids=make_ids(setup), spec=spec, warmup=0, timeout_s=60,
                 generation=generation_config(setup, p, spec))
    rec = run.records[0]
    steps = [e for e in rec["decode"]["events"] if e[0] == "compute"]
    assert len(steps) >= 20
    busy_s = sum(t1 - t0 for _, _, _, t0, t1, _ in steps)
    cpu_s = float(rec["decode"]["compute_cpu_s"])
    assert busy_s >= cpu_s / quota * 0.95, f"decode steps took {busy_s:.4f} s for {cpu_s:.4f} s CPU at quota {quota}"


def test_what_a_run_did_not_emulate_is_said(monkeypatch):
    """Each fallback of the emulation, in words for the Result (not_emulated) and stderr: a
    quota run by the duty cycle, unshaped links, a latency netem could not add.  Nothing when
    everything was emulated."""
    setup = load_scenario(ROOT / "scenarios" / "local-cpu-hetero.yaml",
                          overrides=["costmodel=roofline"]).resolve()
    workers = {d: None for d in setup.cluster.device_ids}
    slow = next(d for d in workers if getattr(setup.cluster.device(d).placement, "cpu_quota", None))
    shaped = em.Network(links=[em.ShapedLink(("fast", "slow"), 0.1, 210.0, latency_emulated=True)])
    assert em.Emulation("t", workers, shaped, {slow: object()}).gaps(setup) == []
    unlagged = em.Network(links=[em.ShapedLink(("fast", "slow"), 0.1, 210.0, latency_emulated=False)])
    (gap,) = em.Emulation("t", workers, unlagged, {slow: object()}).gaps(setup)
    assert "latency not added" in gap and "fast<->slow 210 us" in gap
    monkeypatch.setattr(em, "cgroup_unsupported", lambda: "no cgroups here")
    monkeypatch.setattr(em, "netns_unsupported", lambda: "no namespaces here")
    gaps = em.Emulation("t", workers, None, {}).gaps(setup)
    assert gaps == [f"CPU quotas by a SIGSTOP/SIGCONT duty cycle, not cgroups (no cgroups here): {slow}",
                    "the links between hosts on plain loopback, not shaped (no namespaces here)"]
    addressed = load_scenario(ROOT / "scenarios" / "local-cpu-hetero.yaml", overrides=[
        "costmodel=roofline", "cluster.hosts[0].address=10.0.0.1", "cluster.hosts[1].address=10.0.0.2"]).resolve()
    (gap,) = em.Emulation("t", workers, None, {slow: object()}).gaps(addressed)
    assert "the hosts have addresses" in gap and "torchrun" in gap


def test_an_interconnect_loopback_cannot_be_is_said():
    """Links inside a host are never shaped: 4dev's east with a 1 Mbit/s, 20 ms interconnect
    ran its big->little transfer over loopback (1.07 s measured, 1.81 s predicted) and said
    nothing.  The ready scenarios' 20 Gbit/s, 50 us is loopback's own: no note."""
    setup = load_scenario(ROOT / "scenarios" / "local-cpu-4dev.yaml", overrides=["costmodel=roofline"]).resolve()
    workers = {d: None for d in setup.cluster.device_ids}
    assert not [g for g in em.Emulation("t", workers, None, {}).gaps(setup) if "inside host" in g]
    for slow in (["cluster.hosts[0].interconnect.bandwidth_gbps=0.001"], ["cluster.hosts[0].interconnect.latency_us=20000"]):
        setup = load_scenario(ROOT / "scenarios" / "local-cpu-4dev.yaml", overrides=["costmodel=roofline", *slow]).resolve()
        (gap,) = [g for g in em.Emulation("t", workers, None, {}).gaps(setup) if "inside host" in g]
        assert gap.startswith("the links inside host east on this machine's loopback"), gap
        # GPUs of a host talk over NCCL, not loopback
        gpus = load_scenario(ROOT / "scenarios" / "local-cpu-4dev.yaml", overrides=[
            "costmodel=roofline", *slow, "cluster.hosts[0].devices[0].runtime.device=cuda:0",
            "cluster.hosts[0].devices[1].runtime.device=cuda:1"]).resolve()
        assert not [g for g in em.Emulation("t", workers, None, {}).gaps(gpus) if "inside host" in g]
        # a run with one device of the host has no link inside it
        one = {d: None for d in workers if d != "east/little-0"}
        assert not [g for g in em.Emulation("t", one, None, {}).gaps(setup) if "inside host" in g]


def test_workers_that_ask_for_more_cores_than_there_are_are_said():
    """The prediction gives every device its own compute; three one-core devices pinned to
    core 0 measured twice the predicted time, and execute said nothing."""
    from hpipe.runtime.launcher import _Placement, shared_cores

    def cpu(threads=1, cores=None, quota=None):
        return _Placement("cpu", threads, cores, quota)

    ids = ["a", "b", "c"]
    assert shared_cores(ids[:2], [cpu(), cpu()], {0, 1}) == []
    assert shared_cores(ids[:2], [cpu(cores=[0]), cpu(cores=[1])], {0, 1}) == []
    assert shared_cores(ids, [cpu(cores=[0], quota=0.5), cpu(cores=[0], quota=0.5), cpu(cores=[1])], {0, 1}) == []
    (gap,) = shared_cores(ids, [cpu(), cpu(), cpu()], {0, 1})
    assert "ask for 3 cores of 2 (a, b, c)" in gap
    assert shared_cores(ids, [cpu(threads=2), cpu(quota=0.5), cpu(quota=0.5)], {0, 1, 2, 3}) == []  # 3 of 4
    (gap,) = shared_cores(ids, [cpu(cores=[0], quota=0.7), cpu(cores=[0], quota=0.7), cpu(cores=[1])], {0, 1, 2})
    assert gap.startswith("core 0 is asked for 1.4 cores' worth (a, b)"), gap
    (gap,) = shared_cores(ids[:2], [cpu(threads=2, cores=[0, 1]), cpu(cores=[1])], {0, 1, 2})
    assert gap.startswith("core 1 is asked for 2 cores' worth (a, b)"), gap
    assert shared_cores(ids[:2], [_Placement("cuda:0", 1, None, None)] * 2, {0}) == []  # GPUs take no core
    # a worker uses no more cores than it is pinned to, whatever its threads or quota
    assert shared_cores(ids[:2], [cpu(threads=4, cores=[0]), cpu(threads=4, cores=[1])], {0, 1}) == []
    assert shared_cores(ids[:2], [cpu(threads=4, cores=[0, 1], quota=3), cpu(cores=[2])], {0, 1, 2}) == []
    # one worker with more threads than cores takes turns with no other device
    assert shared_cores(ids[:1], [cpu(threads=4)], {0, 1}) == []
    assert shared_cores(ids[:2], [cpu(threads=2, cores=[0]), cpu(cores=[1])], {0, 1}) == []
    # both said where both hold
    gaps = shared_cores(ids, [cpu(cores=[0]), cpu(cores=[0]), cpu(threads=2)], {0, 1})
    assert len(gaps) == 2 and "ask for 4 cores of 2" in gaps[0] and gaps[1].startswith("core 0 is asked for 2"), gaps

    # a CFS quota caps them all together where it is less than the usable cores
    (gap,) = shared_cores(ids[:2], [cpu(), cpu()], {0, 1}, quota_cores=1.5)
    assert "ask for 2 cores of the 1.5 a CPU quota leaves this process (a, b)" in gap, gap
    assert shared_cores(ids[:2], [cpu(), cpu()], {0, 1}, quota_cores=4.0) == []
    assert shared_cores(ids[:2], [cpu(quota=0.5), cpu(quota=0.5)], {0, 1}, quota_cores=1.0) == []


def _fake_proc(proc, cgroup: str, mountinfo: str, root) -> str:
    """A /proc/self stand-in: its cgroup file, and mountinfo with ROOT standing for ``root``."""
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text(mountinfo.replace("ROOT", str(root)))
    return str(proc)


def test_a_cfs_quota_is_read_from_the_process_cgroup_and_its_ancestors(tmp_path):
    """``docker --cpus 1.5`` leaves the affinity at every core; only the cgroup's quota says
    the process gets 1.5 cores' worth.  The tightest of the cgroup and its ancestors counts."""
    from hpipe.runtime.here import cpu_quota_cores

    # cgroup v1: the cpu hierarchy mounted at its root; quota 3 cores above, 0.5 below
    v1 = tmp_path / "v1"
    (v1 / "outer" / "inner").mkdir(parents=True)
    for d, quota in ((v1, "-1"), (v1 / "outer", "300000"), (v1 / "outer" / "inner", "50000")):
        (d / "cpu.cfs_quota_us").write_text(quota + "\n")
        (d / "cpu.cfs_period_us").write_text("100000\n")
    mounts = ("30 25 0:27 / ROOT/v1 rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct\n"
              "31 25 0:28 / ROOT/mem rw,relatime shared:10 - cgroup cgroup rw,memory\n")
    proc = _fake_proc(tmp_path / "a", "4:memory:/x\n2:cpu,cpuacct:/outer/inner\n0::/\n", mounts, tmp_path)
    assert cpu_quota_cores(proc) == 0.5
    (v1 / "outer" / "inner" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota_cores(proc) == 3.0  # the parent's
    (v1 / "outer" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota_cores(proc) is None

    # cgroup v2 in a container: the mount's root is the container's own cgroup
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    proc = _fake_proc(tmp_path / "b", "0::/docker/abc\n",
                      "40 30 0:33 /docker/abc ROOT/v2 rw,nosuid - cgroup2 cgroup2 rw\n", tmp_path)
    assert cpu_quota_cores(proc) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_quota_cores(proc) is None
    # nothing readable: no quota known
    assert cpu_quota_cores(str(tmp_path / "nowhere")) is None


@needs_cgroup
def test_a_real_cfs_quota_is_seen_by_a_process_inside_it():
    root, version = em._cgroup_cpu_root()
    d = Path(tempfile.mkdtemp(prefix="hpipe-test-quota-", dir=root))
    try:
        if version == 1:
            (d / "cpu.cfs_quota_us").write_text("150000")
            period = int((d / "cpu.cfs_period_us").read_text())
            want = 150000 / period
        else:
            (d / "cpu.max").write_text("150000 100000")
            want = 1.5
        code = "from hpipe.runtime.here import cpu_quota_cores as q, usable_capacity_cores as c; print(q(), c())"
        out = subprocess.run(["sh", "-c", f'echo $$ > {d}/cgroup.procs && exec "$0" -c "$1"', sys.executable, code],
                             capture_output=True, text=True, timeout=60, check=True).stdout.split()
        assert float(out[0]) == pytest.approx(want)
        assert float(out[1]) == pytest.approx(min(want, len(os.sched_getaffinity(0))))
    finally:
        d.rmdir()


def test_a_quota_slows_a_worker_only_below_its_threads():
    """The duty cycle's share (and the runs' "not emulated" list) read one rule: quota over
    threads, where the quota leaves a thread less than a whole core."""
    from types import SimpleNamespace as P

    assert em.quota_share(P(cpu_quota=0.5, threads=1)) == 0.5
    assert em.quota_share(P(cpu_quota=1.5, threads=2)) == 0.75
    assert em.quota_share(P(cpu_quota=2.0, threads=2)) is None  # every thread a whole core
    assert em.quota_share(P(cpu_quota=None, threads=1)) is None
    assert [em.slowed_by_quota(P(cpu_quota=q, threads=2)) for q in (1.0, 2.0, 3.0)] == [True, False, False]


@needs_netns
@needs_cgroup
@pytest.mark.timeout(300)
def test_a_runs_result_says_what_was_emulated(tmp_path):
    """`not_emulated` said what was left out, and null meant both "all of it" and "nothing
    asked for": the Result now keeps what was put in place, the shaped link and the weighted
    cgroup, and null only where nothing was."""
    pytest.importorskip("torch")
    import json

    from tests.conftest import run_cli

    small = ["--set", "model=tiny-llama", "--set", "workload.seq_len=64", "--set", "costmodel=roofline", "-q"]
    out = tmp_path / "r.json"
    r = run_cli("execute", str(ROOT / "scenarios" / "local-cpu-hetero.yaml"), "--planner", "gpipe", *small,
                "--json", str(out), timeout=240)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())["results"][0]
    setup = load_scenario(ROOT / "scenarios" / "local-cpu-hetero.yaml", overrides=["costmodel=roofline"]).resolve()
    assert len({d.split("/")[0] for st in res["plan"]["stages"] for d in st["devices"]}) == 2  # both hosts
    (link,) = res["emulated"]["links"]
    route = setup.cluster.route("fast/core-0", "slow/halfcore-0")
    assert sorted(link["between"]) == ["fast", "slow"] and link["bandwidth_gbps"] == route.bandwidth_gbps
    assert link["asked_latency_us"] == pytest.approx(route.latency_s * 1e6)
    assert res["emulated"]["cpu_quota"] == {"slow/halfcore-0": 0.5}
    r = run_cli("execute", str(ROOT / "scenarios" / "local-cpu.yaml"), *small, "--json", str(out), timeout=240)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["results"][0]["emulated"] is None  # one host, no quotas


def test_a_cpu_cap_below_a_tenth_of_a_core_is_kept():
    """The kernel's smallest CFS quota is 1 ms: over a fixed 10 ms period any cap under 0.1
    core had run at 0.1 (twice the 0.05 asked for); the period grows instead."""
    from hpipe.runtime.emulation import cfs_limit

    for q in (0.5, 0.1, 0.09, 0.05, 0.01, 0.001):
        quota_us, period_us = cfs_limit(q)
        assert quota_us >= 1000 and 10_000 <= period_us <= 1_000_000
        assert quota_us / period_us == pytest.approx(q, rel=1e-3), q
    assert cfs_limit(0.5) == (5000, 10_000)  # a tenth of a core or more: the period as before


def test_cgroup_v2_without_cpu_delegated_is_not_taken_for_a_cpu_controller(tmp_path):
    """In a container with its own cgroup namespace the root may list cpu among its
    controllers without enabling it for children (subtree_control): a child then has no
    cpu.weight, and writing it was a PermissionError traceback.  Such a root is refused, so
    the run falls back to the duty cycle."""
    from hpipe.runtime.emulation import _cgroup_cpu_root

    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("memory pids\n")
    assert _cgroup_cpu_root(tmp_path) is None
    (tmp_path / "cgroup.subtree_control").write_text("cpu memory pids\n")
    assert _cgroup_cpu_root(tmp_path) == (tmp_path, 2)
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.shares").write_text("1024\n")
    assert _cgroup_cpu_root(tmp_path) == (tmp_path / "cpu", 1)
