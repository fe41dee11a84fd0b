"""Several hosts through torchrun, emulated on this machine: two scenario hosts,
one torchrun agent each, node ranks in the opposite order of the plan's stages."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch")

from hpipe.runtime.worker import library_rss_bytes  # noqa: E402
from runtime_helpers import CORE, TINY_LLAMA, run_two_hosts_with_torchrun  # noqa: E402

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _scenario(tmp_path) -> Path:
    core = {**CORE, "count": 1}
    data = {"name": "two-hosts", "model": TINY_LLAMA, "dtype": "float32",
            "workload": {"seq_len": 32, "batch_size": 2},
            "cluster": {"hosts": [{"name": "ha", "address": "127.0.0.1", "devices": [core]},
                                  {"name": "hb", "address": "127.0.0.1", "devices": [core]}],
                        "network": {"bandwidth_gbps": 1, "latency_us": 100}},
            "planner": {"kind": "hpipe", "token_granularity": 8}}
    path = tmp_path / "two-hosts.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_two_hosts_with_torchrun(tmp_path):
    scenario = _scenario(tmp_path)
    plan = {"planner": "hand", "scenario": "two-hosts", "slices": [16, 8, 8], "micro_batches": 1,
            "stages": [{"devices": ["hb/core-0"], "units": [0, 3]}, {"devices": ["ha/core-0"], "units": [3, 6]}]}
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    printed = subprocess.run([sys.executable, "-m", "hpipe.runtime.torchrun", str(scenario), "--plan", str(plan_path),
                              "--commands"], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert printed.returncode == 0, printed.stderr
    assert "--node-rank=0 --nproc-per-node=1 --master-addr=127.0.0.1" in printed.stdout
    assert "--host hb --json result.json" in printed.stdout  # the first stage's host is node 0

    out = tmp_path / "result.json"
    # Node 0 is host ha here, which holds the *second* stage: roles follow hosts, not node ranks.
    (_, err), _ = run_two_hosts_with_torchrun(scenario, plan_path, ["--check"], out, env=env, cwd=ROOT)
    assert "hpipe: --check passed: max |logit error|" in err, err[-2000:]  # said as execute says it
    result = json.loads(out.read_text())
    assert result["mode"] == "measured"
    r = result["results"][0]
    assert r["max_abs_error"] < 1e-4
    assert r["predicted_latency_s"] > 0  # the simulator's figure beside it, as execute's Result has
    assert set(r["peak_memory_mb"]) == {"ha/core-0", "hb/core-0"}
    if library_rss_bytes():  # as execute's workers measure it: torch's own pages (here from the import) do not count
        assert max(r["peak_memory_mb"].values()) < 10, r["peak_memory_mb"]
    assert len(r["next_token_ids"]) == 2

    # a lossy plan: the workers compress what `hpipe execute`'s would (so slow a modelled link
    # that int4 pays on every message), and --check compares with that plan's own replay.  The
    # scenario file stays as it is: --set allows the codec (a lossy plan's codecs are the
    # scenario's to allow), on every host, as the printed commands carry it
    sets = ["--set", "cluster.network.bandwidth_gbps=1e-4", "--set", "compression={allow: [int4], max_lossy_hops: 1}"]
    plan_path.write_text(json.dumps({**plan, "codecs": ["int4"]}))
    printed = subprocess.run([sys.executable, "-m", "hpipe.runtime.torchrun", str(scenario), "--plan", str(plan_path),
                              "--commands", *sets], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.count("--set cluster.network.bandwidth_gbps=1e-4 --set 'compression={allow: [int4], "
                                "max_lossy_hops: 1}' --host") == 2, printed.stdout
    without = subprocess.run([sys.executable, "-m", "hpipe.runtime.torchrun", str(scenario), "--plan", str(plan_path),
                              "--commands"], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert without.returncode == 2 and "int4" in without.stderr  # the file alone does not allow it
    run_two_hosts_with_torchrun(scenario, plan_path, ["--check", *sets], out, env=env, cwd=ROOT)
    r = json.loads(out.read_text())["results"][0]
    assert r["max_abs_error"] < 1e-4, r["max_abs_error"]  # the workers sent int4: the replay's own error


def _two_stages(tmp_path):
    """The two-host scenario, a one-slice plan of a stage on each host (ha first), the workers'
    environment and where rank 0 writes the Result."""
    scenario = _scenario(tmp_path)
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(
        {"planner": "hand", "scenario": "two-hosts", "slices": [32], "micro_batches": 1,
         "stages": [{"devices": ["ha/core-0"], "units": [0, 3]}, {"devices": ["hb/core-0"], "units": [3, 6]}]}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    return scenario, plan_path, env, tmp_path / "result.json"


def test_torchrun_hosts_must_agree(tmp_path):
    """A host started with another --seed would build other random weights and silently
    compute wrong logits: every process refuses (exit 2; torchrun then exits 1), naming what
    differs, before any run."""
    scenario, plan_path, env, out = _two_stages(tmp_path)
    results = run_two_hosts_with_torchrun(scenario, plan_path, [], out, env=env, cwd=ROOT,
                                          hb_extra=("--seed", "1"), returncodes=(1, 1))
    for _, err in results:
        assert "the torchrun processes disagree on --seed (hosts ha, hb)" in err, err[-2000:]
    assert not out.exists()


def test_a_host_that_refuses_before_joining_stops_its_peers_at_once(tmp_path):
    """A process that refuses its input on one host (here a --set that leaves its plan no room)
    never joins the process group: its peers had waited there for the 600 s startup timeout
    and failed naming no host.  Every process now says on torchrun's store whether it is
    ready, so the peer stops within seconds naming the host, the reason and its exit code."""
    import time

    scenario, plan_path, env, out = _two_stages(tmp_path)
    t0 = time.monotonic()
    (_, err_a), (_, err_b) = run_two_hosts_with_torchrun(
        scenario, plan_path, [], out, env=env, cwd=ROOT, returncodes=(1, 1),
        hb_extra=("--set", "cluster.hosts[1].devices[0].memory_gb=0.000001"))
    assert time.monotonic() - t0 < 120  # not the startup timeout
    assert "hpipe: plan does not fit" in err_b, err_b[-2000:]
    assert "host hb (rank 1) refused, so this one stops too: plan does not fit" in err_a, err_a[-2000:]
    assert "exitcode  : 3" in err_a and "[rank0]: Traceback" not in err_a  # hb's exit code, one line
    assert not out.exists()
    # node 0 refusing: its torchrun holds the store, so it waits until hb has read the refusal
    # (a peer slower to look had met the store gone: a traceback after a minute, naming no host)
    (_, err_a), (_, err_b) = run_two_hosts_with_torchrun(
        scenario, plan_path, [], out, env=env, cwd=ROOT, returncodes=(1, 1),
        ha_extra=("--set", "cluster.hosts[0].devices[0].memory_gb=0.000001"))
    assert "host ha (rank 0) refused, so this one stops too: plan does not fit" in err_b, err_b[-2000:]
    assert "[rank1]: Traceback" not in err_b


def test_hosts_agree_whatever_folder_holds_their_weights():
    """The agreement digests the model's shape, not where a host keeps its weights folder (a
    spec read from config.json carries the folder's name and path)."""
    from dataclasses import replace

    import numpy as np

    from hpipe.models import ModelSpec
    from hpipe.runtime.worker import WorkerConfig, _agreement

    spec = ModelSpec(**{**TINY_LLAMA, "name": "w", "source": "/srv/a/w/config.json"})
    cfg = WorkerConfig(role=0, devices=["ha/core-0", "hb/core-0"], stages=[((0,), 0, 3), ((1,), 3, 6)], spec=spec,
                       dtype="float32", weights="/srv/a/w", seed=0, ids=np.zeros((2, 32), np.int64), slices=[32],
                       mb_sizes=[2])
    there = replace(cfg, spec=replace(spec, name="weights", source="/home/b/weights/config.json"),
                    weights="/home/b/weights", role=1)
    assert _agreement(cfg) == _agreement(there)
    assert _agreement(cfg)["the scenario"] != _agreement(replace(cfg, spec=replace(spec, d_ff=256)))["the scenario"]
    assert _agreement(cfg)["the scenario"] != _agreement(replace(cfg, weights=None))["the scenario"]


def test_commands_carry_the_sets_and_advise_one_plan_file(tmp_path, capsys):
    """--commands with --planner: every host would plan for itself, which docs/runtime.md
    advises against; the printer says how to make the one plan file (with the same --sets)."""
    from hpipe.runtime.torchrun import main

    scenario = _scenario(tmp_path)
    assert main([str(scenario), "--commands", "--set", "workload.seq_len=64"]) == 0
    out, err = capsys.readouterr()
    assert "--planner hpipe --set workload.seq_len=64 --host ha --json result.json" in out, out  # one host suffices
    assert (f"hpipe plan {shlex.quote(str(scenario))} --planner hpipe --set workload.seq_len=64 -o plan.json"
            in err and err.rstrip().endswith("--plan plan.json --set workload.seq_len=64")), err
    (tmp_path / "plan.json").write_text(json.dumps(
        {"planner": "hand", "scenario": "two-hosts", "slices": [32], "micro_batches": 1,
         "stages": [{"devices": ["ha/core-0"], "units": [0, 3]}, {"devices": ["hb/core-0"], "units": [3, 6]}]}))
    assert main([str(scenario), "--commands", "--plan", str(tmp_path / "plan.json")]) == 0
    out, err = capsys.readouterr()
    assert out.count(f"--plan {shlex.quote(str(tmp_path / 'plan.json'))} --host") == 2 and err == "", (out, err)


def test_commands_carry_every_option_and_refuse_a_plan_that_does_not_fit(tmp_path, capsys):
    """--commands had printed --plan and --set alone: --seed, --inputs, --timeout, --warmup and
    --check were lost and --json became result.json.  What all share goes to every host, what
    global rank 0 does to node 0's line.  And a plan that does not fit is exit 3 here, as the
    run itself would be, not commands printed with exit 0."""
    from hpipe.runtime.torchrun import main

    scenario, plan_path, _, _ = _two_stages(tmp_path)
    plan = str(plan_path)
    assert main([str(scenario), "--commands", "--plan", plan, "--seed", "12345678", "--inputs", "ids.json",
                 "--timeout", "120", "--warmup", "0", "--check", "--json", "my.json"]) == 0
    out, err = capsys.readouterr()
    lines = [ln for ln in out.splitlines() if ln.startswith("torchrun")]
    assert len(lines) == 2, out
    shared = "--inputs ids.json --seed 12345678 --warmup 0 --timeout 120.0 --host"  # as given, not 1.23457e+07
    assert all(shared in ln for ln in lines), out
    assert lines[0].endswith("--host ha --json my.json --check") and lines[1].endswith("--host hb"), out
    assert "copy it to each" in err
    assert main([str(scenario), "--commands", "--plan", plan,
                 "--set", "cluster.hosts[1].devices[0].memory_gb=0.000001"]) == 3
    out, err = capsys.readouterr()
    assert out == "" and "plan does not fit" in err


def test_a_one_value_option_given_twice_is_refused(tmp_path, capsys):
    """argparse keeps the last of `--host ha --host hb`: a host's process would have run as
    the other host's without a word.  Exit 2 naming the option, as `hpipe`'s commands do."""
    from hpipe.runtime.torchrun import main

    scenario = _scenario(tmp_path)
    for twice in (["--host", "ha", "--host", "hb"], ["--planner", "hpipe", "--planner", "gpipe"],
                  ["--master-port", "1", "--master-port", "2"]):
        with pytest.raises(SystemExit) as e:
            main([str(scenario), "--commands", *twice])
        assert e.value.code == 2
        assert f"{twice[0]}: given twice" in capsys.readouterr().err
    assert main([str(scenario), "--commands", "--set", "workload.seq_len=64", "--set", "workload.batch_size=1"]) == 0
