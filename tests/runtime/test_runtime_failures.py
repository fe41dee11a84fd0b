"""A failing worker stops the whole run, quickly, with a message naming it, and
leaves no process behind: a worker killed mid-run, one that hangs, one that
raises, and Ctrl-C on the launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

from hpipe.errors import WorkerError  # noqa: E402
from hpipe.runtime.launcher import execute  # noqa: E402

from runtime_helpers import llama_setup, plan  # noqa: E402,F401

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]
N = 6
THREE_STAGES = plan([([0], (0, 2)), ([1], (2, 4)), ([2], (4, N))], [8, 8, 8, 8, 8, 8], micro_batches=2)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _assert_gone(pids, within_s=3.0):
    deadline = time.monotonic() + within_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)], "worker processes left behind"


def _run_failing(setup, fault, timeout_s=3.0):
    pids = []
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as err:
        execute(setup, THREE_STAGES, quiet=True, warmup=0, timeout_s=timeout_s, faults={1: fault},
                on_spawn=pids.extend)
    elapsed = time.monotonic() - t0
    assert len(pids) == 3
    _assert_gone(pids)
    return str(err.value), elapsed


def test_killed_worker_stops_the_run(llama_setup):
    msg, elapsed = _run_failing(llama_setup, ("kill", 3))
    assert msg.startswith("stage 1 (local/core-1) was killed by SIGKILL"), msg
    assert elapsed < 15


def test_hung_worker_is_named_after_the_timeout(llama_setup):
    msg, elapsed = _run_failing(llama_setup, ("hang", 2), timeout_s=2.0)
    assert msg.startswith("stage 1 (local/core-1) stopped responding"), msg
    assert "timed out" in msg
    assert 2.0 <= elapsed < 15


@pytest.mark.parametrize("tp", [2, 3])
def test_a_tensor_parallel_peer_that_hangs_is_named_not_the_shard_waiting_on_it(llama_setup, tp):
    """The all-reduce's own failure (gloo's timeout, a closed connection) was reported as the
    waiting shard's fault ('stage 0 (local/core-0) failed: RuntimeError: ...'), listed first;
    with three shards each waiting one must not blame the other."""
    tp_first = plan([(list(range(tp)), (0, 4)), ([tp], (4, N))], [8, 8, 8, 8, 8, 8], micro_batches=2)
    pids = []
    with pytest.raises(WorkerError) as err:
        execute(llama_setup, tp_first, quiet=True, warmup=0, timeout_s=2.0, faults={tp - 1: ("hang", 1)},
                on_spawn=pids.extend)
    _assert_gone(pids)
    msg = str(err.value)
    assert msg.startswith(f"stage 0 (local/core-{tp - 1}) stopped responding"), msg
    assert "failed: RuntimeError" not in msg and "timed out after 2s" in msg, msg


def test_worker_exception_is_reported(llama_setup):
    msg, elapsed = _run_failing(llama_setup, ("raise", 1))
    assert msg.startswith("stage 1 (local/core-1) failed: RuntimeError: injected fault"), msg
    assert elapsed < 15


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "launcher-killed"])
def test_launcher_signal_stops_every_worker(tmp_path, sig):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {os.getcwd()!r}]
        from runtime_helpers import tiny_setup, plan
        from hpipe.runtime.launcher import execute
        if __name__ == "__main__":
            p = plan([([0], (0, 2)), ([1], (2, 6))], [16, 16, 16])
            def spawned(pids):
                print("PIDS", *pids, flush=True)
            try:
                execute(tiny_setup(), p, quiet=True, warmup=0, timeout_s=60, faults={{1: ("hang", 1)}},
                        on_spawn=spawned)
            except KeyboardInterrupt:
                print("INTERRUPTED", flush=True)
                sys.exit(130)
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # Ctrl-C acts even when the test run was started with `&` (SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PIDS"), (line, proc.stderr.read() if proc.poll() is not None else "")
        pids = [int(x) for x in line.split()[1:]]
        time.sleep(1.0)  # let the workers start and reach the hang
        t0 = time.monotonic()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=20)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "INTERRUPTED" in out
        assert elapsed < 10
        _assert_gone(pids)
    else:  # nobody to stop them: the workers notice their launcher is gone
        assert proc.returncode == -signal.SIGKILL
        _assert_gone(pids, within_s=5.0)


def test_a_timeout_is_named_before_the_closed_connection_it_caused():
    """--timeout 0.05: stage 1 gave up waiting and closed its end, so stage 0's send failed
    too; the message led with the effect (gloo's 'Connection closed by peer')."""
    from types import SimpleNamespace

    from hpipe.runtime.launcher import _failure_message

    cfg = SimpleNamespace(stage_of=lambda r: r, devices=["local/core-0", "local/core-1"])
    gloo = ("Connection closed by peer [127.0.0.1]:30622. This is typically caused by a remote worker crashing. "
            "Check the logs of the remote worker before reporting an error. GLHF! \N{BEACH WITH UMBRELLA}")
    errors = {0: {"comm": True, "peer": 1, "message": f"sending to stage 1 (local/core-1): {gloo}"},
              1: {"comm": True, "peer": 0, "message": "timed out after 0.05s waiting for micro-batch 0 slice 0"}}
    msg = _failure_message([cfg, cfg], errors, {}, {}, False, 0.05, 4)
    assert msg.startswith("stage 1 (local/core-1): timed out after 0.05s"), msg
    assert msg.endswith("; also stage 0 (local/core-0): sending to stage 1 (local/core-1): Connection closed by peer "
                        "[127.0.0.1]:30622."), msg  # gloo's advice to check the remote worker's logs left out
    # gloo's other wording of it (a read error, seen under validate --timeout 0.001)
    errors[0]["message"] = ("sending to stage 1 (local/core-1): Read error [127.0.0.1]:63116: Connection reset by "
                            "peer. This is typically caused by a remote worker hanging or bugs in the application. "
                            "Check the logs of the remote worker before reporting an error. GLHF!")
    msg = _failure_message([cfg, cfg], errors, {}, {}, False, 0.05, 4)
    assert msg.endswith("Connection reset by peer."), msg
