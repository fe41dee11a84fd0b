"""The command line: catalogs, exit codes, pure JSON on stdout, no torch for planning."""

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, SCENARIOS


def test_devices_and_models_json(cli):
    r = cli("devices", "--json", "-")
    assert r.returncode == 0, r.stderr
    devices = json.loads(r.stdout)
    names = {d["name"] for d in devices}
    assert len(devices) >= 12
    assert {"P100", "V100", "T4", "RTX3090", "RTX4090", "A10", "L4", "A100-40GB", "A100-80GB", "H100", "CPU"} <= names
    assert all(d["source"] for d in devices)
    r = cli("models", "--json", "-")
    assert r.returncode == 0, r.stderr
    models = {m["name"]: m for m in json.loads(r.stdout)}
    assert {"llama-7b", "llama-13b", "llama-2-70b", "gpt3-1.3b", "gpt3-2.7b", "tiny-llama"} <= set(models)
    assert models["llama-2-70b"]["n_kv_heads"] == 8


def test_catalog_tables(cli, tmp_path):
    r = cli("devices")
    assert r.returncode == 0 and "RTX3090" in r.stdout
    # --quiet as on every other command: no table (the README says so of all of them)
    for catalog in ("devices", "models"):
        r = cli(catalog, "--quiet")
        assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr
        out = tmp_path / f"{catalog}.json"
        r = cli(catalog, "-q", "--json", str(out))
        assert r.returncode == 0 and r.stdout == "" and json.loads(out.read_text())
        r = cli(catalog, "--json", "-")  # the JSON alone on stdout, the table beside it on stderr
        assert json.loads(r.stdout) and ("RTX3090" in r.stderr or "llama-2-70b" in r.stderr)


def test_bad_scenario_exit_2_without_traceback(cli, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text((SCENARIOS / "paper-llama7b.yaml").read_text().replace("type: P100", "type: P1000"))
    r = cli("simulate", str(p))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "bad.yaml" in r.stderr and "cluster.hosts[0].devices[0].type" in r.stderr and "P100" in r.stderr


def test_missing_file_and_bad_option(cli):
    r = cli("simulate", "nope.yaml")
    assert r.returncode == 2 and "nope.yaml" in r.stderr and "no such file" in r.stderr
    r = cli("simulate", str(SCENARIOS / "paper-llama7b.yaml"), "--planner", "hpip")
    assert r.returncode == 2 and "hpipe" in r.stderr and "Traceback" not in r.stderr
    r = cli("simulate", "--no-such-flag")
    assert r.returncode == 2


def test_a_one_value_option_given_twice_is_refused_not_dropped(cli, tmp_path):
    """click keeps the last of a repeated option: `--planner gpipe --planner hpipe` simulated
    hpipe alone, exit 0, gpipe dropped without a word.  Now exit 2 naming the option, before
    anything is planned or written; repeatable options and flags still repeat."""
    scen = str(SCENARIOS / "paper-llama7b.yaml")
    r = cli("simulate", scen, "--planner", "gpipe", "--planner", "hpipe")
    assert r.returncode == 2 and "'--planner'" in r.stderr and "given 2 times" in r.stderr, r.stderr
    assert "comma list" in r.stderr and r.stdout == ""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    r = cli("plan", scen, "-o", str(a), "--output", str(b), "-q")
    assert r.returncode == 2 and "'-o / --output'" in r.stderr and "comma list" not in r.stderr, r.stderr
    assert not a.exists() and not b.exists()
    r = cli("simulate", scen, "--planner=gpipe", "-q", "--quiet", "--json", str(a),
            "--set", "workload.seq_len=1024", "--set", "workload.batch_size=2")
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(a.read_text())["results"]
    assert res["planner"] == "gpipe" and sum(res["plan"]["slices"]) == 1024
    assert res["throughput_tokens_per_s"] * res["latency_s"] == pytest.approx(2 * 1024)  # batch 2


def test_core_imports_without_torch():
    code = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
        import hpipe, hpipe.costmodels, hpipe.planners, hpipe.sim, hpipe.cli
        from hpipe.scenario import load_scenario
        setup = load_scenario(sys.argv[1]).resolve()
        assert "torch" not in sys.modules
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code, str(SCENARIOS / "paper-llama7b.yaml")], capture_output=True,
                       text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def _run_with_tty_stderr(args: list[str]) -> tuple[int, str, str]:
    """Run hpipe with stderr on a pseudo-terminal (as a user at a shell) and stdout piped."""
    import os
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    p = subprocess.Popen([sys.executable, "-m", "hpipe", *args], stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    out = p.stdout.read().decode()
    p.wait(120)
    os.close(master)
    return p.returncode, out, b"".join(chunks).decode(errors="replace")


def test_progress_on_a_terminal_only_and_stdout_stays_json():
    # A terminal on stderr: a progress bar for the planning; stdout still holds pure JSON.
    code, out, err = _run_with_tty_stderr(["simulate", str(SCENARIOS / "paper-llama7b.yaml"),
                                           "--planner", "all", "--json", "-"])
    assert code == 0, err
    assert len(json.loads(out)["results"]) == 8  # every planner, single included
    assert "planning" in err
    # --quiet: nothing on the terminal at all
    code, out, err = _run_with_tty_stderr(["simulate", str(SCENARIOS / "paper-llama7b.yaml"),
                                           "--planner", "hpipe", "--json", "-", "--quiet"])
    assert code == 0 and json.loads(out)["results"][0]["planner"] == "hpipe"
    assert err.strip() == ""
    # not a terminal (pytest's pipe): no bar escapes into the captured stderr
    r = subprocess.run([sys.executable, "-m", "hpipe", "simulate", str(SCENARIOS / "paper-llama7b.yaml"),
                        "--planner", "hpipe", "--json", "-"], capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "planning" not in r.stderr and "\x1b[" not in r.stderr


def test_an_input_that_ends_is_exit_1_naming_where_not_an_interrupt(monkeypatch, capsys):
    """click turns an EOFError into Abort; hpipe printed "aborted" and exited 130 as for a
    Ctrl-C (seen once when a run's forkserver was killed).  It is exit 1, naming the place."""
    import hpipe.cli as cli_mod
    import hpipe.cli.common as common

    def ends(*a, **k):
        raise EOFError("ran out")

    monkeypatch.setattr(common, "_load_scenario", ends)
    monkeypatch.setattr(sys, "argv", ["hpipe", "simulate", "scenarios/local-cpu.yaml"])
    with pytest.raises(SystemExit) as e:
        cli_mod.main()
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 1 and "EOFError at" in err and "in ends" in err, err
