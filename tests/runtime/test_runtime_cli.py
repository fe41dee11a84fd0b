"""`hpipe execute` end to end, as a user runs it (subprocess, tiny scenario)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch")

from runtime_helpers import CORE, TINY_LLAMA  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _hpipe(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "hpipe", *args], capture_output=True, text=True, env=env,
                          timeout=100, cwd=cwd)


def test_execute_check_json_and_bad_inputs(tmp_path):
    data = {"name": "tiny", "model": TINY_LLAMA, "dtype": "float32", "workload": {"seq_len": 32, "batch_size": 2},
            "cluster": {"hosts": [{"name": "local", "devices": [{**CORE, "count": 2}]}]},
            "planner": {"kind": "hpipe", "token_granularity": 8}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(data))
    ids = [[i % 128 for i in range(32)], [(7 * i) % 128 for i in range(32)]]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    r = _hpipe("execute", "tiny.yaml", "--check", "--inputs", "ids.json", "--json", "-", "--trace", "t.json",
               "--plot", "g.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # stdout holds the JSON alone
    res = out["results"][0]
    assert out["mode"] == "measured" and res["max_abs_error"] < 1e-4 and len(res["next_token_ids"]) == 2
    assert res["predicted_latency_s"] > 0 and (tmp_path / "t.json").is_file()
    assert (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")  # the measured timeline's Gantt chart
    assert "--check passed" in r.stderr and "0.001" in r.stderr and "float32" in r.stderr  # says so, and to what

    (tmp_path / "bad.json").write_text(json.dumps([ids[0], ids[1][:5]]))
    r = _hpipe("execute", "tiny.yaml", "--inputs", "bad.json", cwd=tmp_path)
    assert r.returncode == 2 and "bad.json" in r.stderr and "[1]" in r.stderr and "Traceback" not in r.stderr


def test_a_profile_from_another_machine_is_named_before_the_run(tmp_path):
    """A fitted profile made on another CPU prices another machine: execute still runs it
    (asked for by name), but says so, with how to measure this one."""
    prof = json.loads((ROOT / "scenarios" / "profiles" / "local-cpu.json").read_text())
    prof["hardware"]["cpu_model"] = "Imaginary CPU 9000"
    (tmp_path / "p.json").write_text(json.dumps(prof))
    data = yaml.safe_load((ROOT / "scenarios" / "local-cpu.yaml").read_text())
    data["costmodel"] = {"kind": "fitted", "profile": "p.json"}
    data["workload"] = {**data["workload"], "seq_len": 64, "batch_size": 1}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    r = _hpipe("execute", "s.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    err = " ".join(r.stderr.split())
    assert "measured on Imaginary CPU 9000, this machine is" in err and "hpipe profile SCENARIO" in err, r.stderr


def test_workers_run_the_launchers_hpipe_not_one_in_the_current_folder(tmp_path):
    """The forkserver (``python -c``) had the current folder first on its path and imported
    hpipe from there: run from inside another checkout, the workers ran that checkout's code
    under this one's launcher.  Here the current folder holds a copy of hpipe that leaves a
    mark when its worker module is imported; the run must never import it."""
    import shutil

    shutil.copytree(ROOT / "hpipe", tmp_path / "hpipe", ignore=shutil.ignore_patterns("__pycache__"))
    mark = tmp_path / "imported-the-copy"
    with open(tmp_path / "hpipe" / "runtime" / "worker.py", "a") as f:
        f.write(f"\nopen({str(mark)!r}, 'w').close()\n")
    data = {"name": "tiny", "model": TINY_LLAMA, "dtype": "float32", "workload": {"seq_len": 16, "batch_size": 1},
            "cluster": {"hosts": [{"name": "local", "devices": [{**CORE, "count": 2}]}]},
            "planner": {"kind": "hpipe", "token_granularity": 8}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(data))
    hpipe = shutil.which("hpipe", path=str(Path(sys.executable).parent))
    assert hpipe, "the hpipe script beside this Python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    if Path(__import__("hpipe").__file__).resolve().parents[1] != ROOT:  # not the installed one: name it
        env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([hpipe, "execute", "tiny.yaml", "-q"], capture_output=True, text=True, env=env,
                       timeout=100, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not mark.exists(), "a worker imported the copy of hpipe in the current folder"


def test_the_forkserver_puts_the_launchers_environment_back_for_its_workers(monkeypatch):
    """The forkserver starts with the launcher's sys.path as PYTHONPATH and PYTHONSAFEPATH set;
    its preload (hpipe.runtime.worker) puts both back, or every worker and what it starts had
    inherited them (the review: a script started from a worker could not import its sibling)."""
    from hpipe.runtime.launcher import _launchers_sys_path

    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)
    with _launchers_sys_path():
        env = dict(os.environ)
    assert os.environ["PYTHONPATH"] == "/somewhere/else" and "PYTHONSAFEPATH" not in os.environ
    assert env["PYTHONSAFEPATH"] == "1" and env["PYTHONPATH"] != "/somewhere/else"
    r = subprocess.run([sys.executable, "-c", "import os, hpipe.runtime.worker; "
                        "print(os.environ.get('PYTHONPATH'), os.environ.get('PYTHONSAFEPATH'))"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=100)
    assert r.returncode == 0 and r.stdout.split() == ["/somewhere/else", "None"], r.stderr
