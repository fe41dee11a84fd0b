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
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # stdout holds the JSON alone
    res = out["results"][0]
    assert out["mode"] == "measured" and res["max_abs_error"] < 1e-4 and len(res["next_token_ids"]) == 2
    assert res["predicted_latency_s"] > 0 and (tmp_path / "t.json").is_file()
    assert "--check passed" in r.stderr and "0.001" in r.stderr and "float32" in r.stderr  # says so, and to what

    (tmp_path / "bad.json").write_text(json.dumps([ids[0], ids[1][:5]]))
    r = _hpipe("execute", "tiny.yaml", "--inputs", "bad.json", cwd=tmp_path)
    assert r.returncode == 2 and "bad.json" in r.stderr and "[1]" in r.stderr and "Traceback" not in r.stderr
