"""Everyday use of the command line: output paths, tables on an 80-column terminal,
small messages, --set overrides, sweeps, cost and the single-device planner."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from conftest import SCENARIOS

PAPER = str(SCENARIOS / "paper-llama7b.yaml")


# ---- output paths ------------------------------------------------------------
@pytest.mark.parametrize("opt", ["--json", "--trace", "--plot"])
def test_a_folder_as_output_is_exit_2_without_traceback(cli, tmp_path, opt):
    r = cli("simulate", PAPER, opt, str(tmp_path), "-q")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "is a folder" in r.stderr and opt in r.stderr
    example = r.stderr.split("(e.g. '")[1].split("'")[0]  # the suggested name is one the check takes
    assert cli("simulate", PAPER, opt, example, "-q").returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="root only: os.access already refuses others")
def test_a_folder_that_takes_no_files_is_refused_before_the_work_even_as_root(cli):
    r = cli("simulate", PAPER, "--plot", "/proc/x.png", "-q")
    assert r.returncode == 2 and "cannot write '/proc/x.png': its folder takes no new files" in r.stderr, r.stderr


def test_plan_output_folder_and_missing_folder(cli, tmp_path):
    r = cli("plan", PAPER, "-o", str(tmp_path), "-q")
    assert r.returncode == 2 and "is a folder" in r.stderr and "Traceback" not in r.stderr
    missing = tmp_path / "missing" / "dir"
    r = cli("simulate", PAPER, "--plot", str(missing / "x.png"), "-q")
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert not (tmp_path / "missing").exists()  # never created for a typo


def test_plot_format_follows_the_extension(cli, tmp_path):
    for ext, magic in (("svg", b"<?xml"), ("pdf", b"%PDF"), ("png", b"\x89PNG")):
        out = tmp_path / f"g.{ext}"
        r = cli("simulate", PAPER, "--plot", str(out), "-q")
        assert r.returncode == 0, r.stderr
        assert out.read_bytes().startswith(magic), ext
    r = cli("simulate", PAPER, "--plot", str(tmp_path / "g.gif"), "-q")
    assert r.returncode == 2 and ".png" in r.stderr and not (tmp_path / "g.gif").exists()


def test_two_outputs_on_stdout_are_refused(cli):
    r = cli("simulate", PAPER, "--json", "-", "--trace", "-")
    assert r.returncode == 2 and "stdout" in r.stderr and r.stdout == ""


def test_refused_output_leaves_the_other_outputs_unwritten(cli, tmp_path):
    # checked before any work: the good --json is not written when --plot is bad
    r = cli("simulate", PAPER, "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "x.bmp"), "-q")
    assert r.returncode == 2 and not (tmp_path / "r.json").exists()


def test_an_output_never_replaces_an_input_or_another_output(cli, tmp_path):
    """The scenario (or --plan) given as an output, directly, through '..' or a symlink, is
    refused before any work, and so are two outputs on one file; every file stays as it was."""
    scenario = tmp_path / "s.yaml"
    scenario.write_text((SCENARIOS / "paper-llama7b.yaml").read_text())
    (tmp_path / "link.yaml").symlink_to(scenario)
    (tmp_path / "hard.yaml").hardlink_to(scenario)
    before = scenario.read_bytes()
    (tmp_path / "sub").mkdir()
    for args in (["simulate", str(scenario), "--json", str(scenario)],
                 ["simulate", str(scenario), "--trace", str(tmp_path / "sub" / ".." / "s.yaml")],
                 ["simulate", str(scenario), "--plot", str(tmp_path / "link.yaml")],
                 ["simulate", str(scenario), "--json", str(tmp_path / "hard.yaml")],
                 ["validate", str(scenario), "--profile", str(scenario)],  # written when not a current profile
                 ["plan", str(scenario), "-o", str(scenario)],
                 ["sweep", str(scenario), "--set", "workload.seq_len=1024,2048", "--json", str(scenario)]):
        r = cli(*args, "-q")
        assert r.returncode == 2 and "the scenario file" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert scenario.read_bytes() == before
    plan = tmp_path / "p.json"
    assert cli("plan", str(scenario), "-o", str(plan), "-q").returncode == 0
    r = cli("simulate", str(scenario), "--plan", str(plan), "--json", str(plan), "-q")
    assert r.returncode == 2 and "the --plan file" in r.stderr
    out = tmp_path / "x.json"
    r = cli("simulate", str(scenario), "--json", str(out), "--trace", str(out), "-q")
    assert r.returncode == 2 and "also given to --json" in r.stderr and not out.exists()


def test_an_output_never_replaces_the_profile_the_cost_model_reads(cli, tmp_path):
    """A fitted model's profile and a roofline's calibration are inputs too: --json, --trace or
    -o onto one is refused before any work (it was replaced by the Result JSON, and the next
    run failed on it).  Only `profile -o` and `validate --profile` write a profile there."""
    import yaml

    profile = tmp_path / "prof.json"
    profile.write_text((SCENARIOS / "profiles" / "local-cpu.json").read_text())
    before = profile.read_bytes()
    data = yaml.safe_load((SCENARIOS / "local-cpu.yaml").read_text())
    for name, costmodel in (("fit.yaml", {"kind": "fitted", "profile": "prof.json"}),
                            ("cal.yaml", {"kind": "roofline", "calibration": "prof.json"}),
                            ("auto.yaml", {"kind": "auto", "roofline": {"calibration": "prof.json"}})):
        (tmp_path / name).write_text(yaml.safe_dump({**data, "costmodel": costmodel}))
    for args in (["simulate", "fit.yaml", "--json", "prof.json"],
                 ["simulate", "cal.yaml", "--trace", "prof.json"],
                 ["simulate", "auto.yaml", "--plot", "prof.json"],
                 ["plan", "fit.yaml", "-o", "prof.json"],
                 ["sweep", "fit.yaml", "--set", "workload.batch_size=1,2", "--json", "prof.json"],
                 ["sweep", "fit.yaml", "--set", "costmodel.profile=other.json,prof.json", "--json", "prof.json"],
                 ["execute", "fit.yaml", "--json", "prof.json"],
                 ["generate", "fit.yaml", "--prompt", "hi", "--json", "prof.json"],
                 ["validate", "fit.yaml", "--json", "prof.json"]):
        r = cli(*[str(tmp_path / a) if a.endswith((".yaml", ".json")) else a for a in args], "-q")
        assert r.returncode == 2 and "costmodel." in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert profile.read_bytes() == before


def test_an_output_never_replaces_a_file_of_the_weights_folder(cli, tmp_path):
    """The weights folder's config, tokenizer and safetensors are read by execute and
    generate: --json onto config.json replaced it, and the next run failed on it."""
    import yaml

    (tmp_path / "model").mkdir()
    files = {n: f"{{\"{n}\": 1}}" for n in ("config.json", "tokenizer.json")}
    files["model.safetensors"] = "not read here"
    for n, text in files.items():
        (tmp_path / "model" / n).write_text(text)
    data = yaml.safe_load((SCENARIOS / "local-cpu.yaml").read_text())
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**data, "weights": "model", "costmodel": "roofline"}))
    for args in (["simulate", "--json", "model/config.json"], ["execute", "--json", "model/tokenizer.json"],
                 ["execute", "--trace", "model/model.safetensors"],
                 ["generate", "--prompt", "hi", "--json", "model/config.json"]):
        r = cli(args[0], str(tmp_path / "s.yaml"), *[str(tmp_path / a) if "/" in a else a for a in args[1:]], "-q")
        assert r.returncode == 2 and "the weights folder's" in r.stderr, (args, r.stderr)
    assert {n: (tmp_path / "model" / n).read_text() for n in files} == files
    # a new file beside them is fine: nothing is read from it
    r = cli("simulate", str(tmp_path / "s.yaml"), "--json", str(tmp_path / "model" / "result.json"), "-q")
    assert r.returncode == 0, r.stderr


# ---- --set overrides ------------------------------------------------------------
def test_overrides_apply_before_validation_in_process():
    from hpipe.errors import InputError
    from hpipe.scenario import load_scenario

    sc = load_scenario(PAPER, overrides=["cluster.network.bandwidth_gbps=10", "workload.seq_len=4096",
                                         "cluster.hosts[0].devices[0].count=2", "planner.micro_batches=3",
                                         "cluster.hosts[1].devices[0].runtime.device=cuda:1"])
    assert sc.cluster.network.bandwidth_gbps == 10.0 and sc.workload.seq_len == 4096
    assert sc.cluster.hosts[0].devices[0].count == 2 and sc.planner.micro_batches == 3
    assert sc.cluster.hosts[1].devices[0].runtime.device == "cuda:1"
    assert load_scenario(PAPER).cluster.network.bandwidth_gbps == 1.0  # the file is untouched
    cases = [
        ("cluster.netwrk.bandwidth_gbps=1", "--set cluster.netwrk.bandwidth_gbps", "did you mean network"),
        ("cluster.hosts[7].name=x", "--set cluster.hosts[7].name", "past the end"),
        ("workload=3", "workload", "from --set workload=3"),
        ("cluster.network.bandwidth_gbps=-1", "cluster.network.bandwidth_gbps", "from --set"),
        ("workload.seq_len=1000", "workload.seq_len", "992 or 1008"),
        ("noequals", "--set", "KEY=VALUE"),
        ("cluster..hosts=1", "--set", "dotted path"),
    ]
    for assignment, field, words in cases:
        with pytest.raises(InputError) as e:
            load_scenario(PAPER, overrides=[assignment])
        assert e.value.field == field, (assignment, str(e.value))
        assert words in str(e.value), (assignment, str(e.value))


def test_a_set_changes_one_place_of_a_yaml_anchor_not_every_alias(tmp_path):
    """Two hosts whose devices are one YAML anchor (&core, *core) parse as one dict: a --set of
    the first host's device changed the second's too (deepcopy keeps the sharing).  A helper
    met it starving one torchrun host of memory and both refused."""
    import yaml

    from hpipe.scenario import load_scenario

    data = yaml.safe_load((SCENARIOS / "local-cpu-hetero.yaml").read_text())
    core = data["cluster"]["hosts"][0]["devices"][0]
    data["cluster"]["hosts"][1]["devices"] = [core]  # the same object: dumped as an anchor and an alias
    path = tmp_path / "anchored.yaml"
    path.write_text(yaml.safe_dump(data))
    assert "&id001" in path.read_text() and "*id001" in path.read_text()
    setup = load_scenario(path, overrides=["cluster.hosts[0].devices[0].memory_gb=1"]).resolve()
    mem = {d.host: d.spec.memory_gb for d in setup.cluster.devices}
    assert mem == {"fast": 1.0, "slow": core["memory_gb"]}, mem


def test_a_cross_field_problem_names_the_set_of_either_field():
    """A problem found comparing two fields is located at one of them; a --set of the other is
    named too (a --set model.max_seq_len=256 had been refused at workload.seq_len without a
    word of the --set), and both where both were set.  An unrelated --set is not named."""
    from hpipe.errors import InputError
    from hpipe.scenario import load_scenario

    gpt = SCENARIOS / "local-cpu-gpt-3dev.yaml"
    dev = "cluster.hosts[1].devices[0].runtime"
    cases = [
        (PAPER, ["planner.token_granularity=100"], "workload.seq_len", "(from --set planner.token_granularity=100)"),
        (PAPER, ["workload.batch_size=2", "planner.micro_batches=4"], "planner.micro_batches",
         "(from --set workload.batch_size=2 and --set planner.micro_batches=4)"),
        (gpt, ["model.max_seq_len=256"], "workload.seq_len", "(from --set model.max_seq_len=256)"),
        (gpt, ["workload.output_tokens=4", "model.max_seq_len=386", "workload.batch_size=1"], "workload.output_tokens",
         "(from --set workload.output_tokens=4 and --set model.max_seq_len=386)"),
        (gpt, [f"{dev}.cpu_quota=0.9", f"{dev}.threads=2", f"{dev}.cores=[1]"], None, None),  # sound: no error
        (gpt, [f"{dev}.threads=1", f"{dev}.cpu_quota=1.5"], f"{dev}.cpu_quota",
         f"(from --set {dev}.threads=1 and --set {dev}.cpu_quota=1.5)"),
    ]
    for path, sets, field, words in cases:
        if field is None:
            load_scenario(path, overrides=sets)
            continue
        with pytest.raises(InputError) as e:
            load_scenario(path, overrides=sets)
        assert e.value.field == field and words in str(e.value), (sets, str(e.value))
    with pytest.raises(InputError) as e:  # a --set of neither field: not named, another model field neither
        load_scenario(gpt, overrides=["model.max_seq_len=256", "workload.batch_size=1", "model.n_layers=4"])
    assert "--set workload.batch_size" not in str(e.value) and "n_layers" not in str(e.value), str(e.value)


def test_a_key_missing_beside_a_set_one_names_that_set(tmp_path):
    """``--set compression.max_lossy_hops=2`` on a scenario without compression makes a mapping
    that lacks ``compression.allow``: the error names that --set (it had named none), and not
    an unrelated one."""
    from hpipe.errors import InputError
    from hpipe.scenario import load_scenario

    with pytest.raises(InputError) as e:
        load_scenario(PAPER, overrides=["compression.max_lossy_hops=2", "workload.batch_size=2"])
    assert e.value.field == "compression.allow" and "missing required key" in str(e.value)
    assert str(e.value).endswith("(from --set compression.max_lossy_hops=2)"), str(e.value)
    # where the file's own compression lacks it, a --set beside it is not to blame
    data = yaml.safe_load(Path(PAPER).read_text())
    data["compression"] = {"max_lossy_hops": 1}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError) as e:
        load_scenario(bad, overrides=["compression.min_gain=0"])
    assert e.value.field == "compression.allow" and "--set" not in str(e.value), str(e.value)


def test_a_problem_of_a_whole_entry_names_the_set_of_one_of_its_keys():
    """A device entry given both ``type`` and ``name`` is refused at the entry itself
    (cluster.hosts[0].devices[0]), not at either key: when a --set of one of its keys caused
    it, the error still names that --set.  Matching only the field and the keys above it lost
    the blame (audit O3)."""
    from hpipe.errors import InputError
    from hpipe.scenario import load_scenario

    with pytest.raises(InputError) as e:
        load_scenario(PAPER, overrides=["cluster.hosts[0].devices[0].name=x"])
    assert e.value.field == "cluster.hosts[0].devices[0]", str(e.value)
    assert "not both" in str(e.value) and "(from --set cluster.hosts[0].devices[0].name=x)" in str(e.value)
    with pytest.raises(InputError) as e:  # a key of another entry is not blamed
        load_scenario(PAPER, overrides=["cluster.hosts[0].devices[0].name=x", "cluster.hosts[1].name=h"])
    assert "--set cluster.hosts[1].name" not in str(e.value), str(e.value)
    # a key below the field through a list index: a host's devices, refused at cluster.hosts
    # (too many devices in all), had lost its --set too
    many = "[" + ", ".join(["{type: P100, count: 256}"] * 5) + "]"
    with pytest.raises(InputError) as e:
        load_scenario(PAPER, overrides=[f"cluster.hosts[0].devices={many}"])
    assert e.value.field == "cluster.hosts" and f"(from --set cluster.hosts[0].devices={many})" in str(e.value), \
        (e.value.field, str(e.value))


def test_a_cost_model_setting_from_set_is_named_when_resolving_refuses_it(tmp_path):
    """The cost model's settings are checked when the scenario resolves, after parsing: the
    error still names the assignment, and a value from the file is not blamed on a --set."""
    from hpipe.errors import InputError
    from hpipe.scenario import load_scenario

    text = Path(PAPER).read_text().replace("costmodel: roofline", "costmodel: {kind: roofline, link_efficiency: 3}")
    assert "link_efficiency: 3" in text
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        load_scenario(path, overrides=["costmodel.link_efficiency=2"]).resolve()
    assert e.value.field == "costmodel.link_efficiency"
    assert "(from --set costmodel.link_efficiency=2)" in str(e.value) and str(path) in str(e.value)
    with pytest.raises(InputError) as e:  # the file's own 3, with an unrelated --set
        load_scenario(path, overrides=["workload.seq_len=4096"]).resolve()
    assert e.value.field == "costmodel.link_efficiency" and "--set" not in str(e.value)


def test_override_values_are_yaml_scalars():
    from hpipe.overrides import parse_key, parse_value, split_values

    assert parse_key("cluster.hosts[0].devices[12].count") == ["cluster", "hosts", 0, "devices", 12, "count"]
    assert [parse_value(v) for v in ("8192", "0.1", "1e9", "true", "null", "abc", "[1, 2]")] == \
        [8192, 0.1, 1e9, True, None, "abc", [1, 2]]
    assert split_values("0.1,1,10") == ["0.1", "1", "10"]
    assert split_values("[1, 2],{a: 1, b: 2},'x,y'") == ["[1, 2]", "{a: 1, b: 2}", "'x,y'"]


def test_set_on_the_command_line(cli):
    r = cli("simulate", PAPER, "--planner", "gpipe", "--set", "planner.micro_batches=3", "--json", "-")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["results"][0]["plan"]["micro_batches"] == 3
    r = cli("--set", "planner.micro_batches=2", "plan", PAPER, "--planner", "gpipe", "-q", "-o", "-")
    assert r.returncode == 0 and json.loads(r.stdout)["micro_batches"] == 2  # before the command, too
    r = cli("plan", PAPER, "--set", "cluster.hosts[0].devces[0].count=2")
    assert r.returncode == 2 and "devces" in r.stderr and "did you mean devices" in r.stderr


def test_a_planner_that_cannot_slice_so_finely_is_a_row_beside_the_others(cli):
    """32k tokens in units of 4 is past the slicing DP's tables: asked alone, hpipe refuses
    it (exit 2); beside the others it is a ✗ row with the reason, and the others plan.  A
    sweep names the values each reason holds at."""
    fine = ["--set", "workload.seq_len=32768", "--set", "workload.batch_size=1", "--set", "planner.token_granularity=4"]
    for planners in ("hpipe", "hpipe,terapipe"):  # none of them can take it: the input's fault, not infeasible
        r = cli("simulate", PAPER, *fine, "--planner", planners)
        assert r.returncode == 2 and "planner.token_granularity" in r.stderr and "8 or more" in r.stderr, r.stderr
    r = cli("sweep", PAPER, *fine[:4], "--set", "planner.token_granularity=2,4", "--planner", "hpipe,terapipe")
    assert r.returncode == 2 and "planner.token_granularity" in r.stderr, r.stderr
    r = cli("simulate", PAPER, *fine, "--planner", "all", "--json", "-")
    assert r.returncode == 0, r.stderr
    rows = {x["planner"]: x for x in json.loads(r.stdout)["results"]}
    from hpipe.planners import SLICING

    assert {p for p, x in rows.items() if not x["feasible"]} == set(SLICING)
    assert all("give planner.token_granularity 8 or more" in rows[p]["infeasible"] for p in SLICING)
    assert rows["megatron"]["latency_s"] > 0
    r = cli("sweep", PAPER, *fine[:4], "--set", "planner.token_granularity=4,256", "--planner", "hpipe,gpipe")
    assert r.returncode == 0, r.stderr
    assert "hpipe (at 4) infeasible: 32768 tokens in units of 4" in r.stdout, r.stdout


def test_commands_that_replace_the_cost_model_still_check_it(cli):
    """profile measures on no model and validate predicts on a fitted one of its own: both had
    accepted any costmodel, even an unknown one."""
    local = str(SCENARIOS / "local-cpu.yaml")
    for command in (["validate", local, "--random", "0", "--planner", "single"], ["profile", local, "--quick"]):
        r = cli(*command, "--set", "costmodel={kind: roofline, version: 7}")
        assert r.returncode == 2 and "field 'costmodel.version'" in r.stderr, (command, r.stderr)
        assert "(from --set costmodel={kind: roofline, version: 7})" in r.stderr


def test_a_path_given_with_set_is_read_from_the_current_folder(cli, tmp_path):
    """A profile named on the command line is the user's, typed from where they stand; the
    scenario file's own paths keep resolving against the file's folder."""
    import shutil

    shutil.copy(SCENARIOS / "profiles" / "local-cpu.json", tmp_path / "mine.json")
    local = str(SCENARIOS / "local-cpu.yaml")
    r = cli("simulate", local, "--planner", "base", "--set", "costmodel={kind: fitted, profile: mine.json}",
            "--json", "-", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cost_model"]["profile_path"] == str(tmp_path / "mine.json")
    r = cli("simulate", local, "--planner", "base", "--set", "costmodel.profile=mine.json", cwd=tmp_path)
    assert r.returncode == 2 and "not a mapping" in r.stderr  # (local-cpu says costmodel: auto)
    r = cli("simulate", str(SCENARIOS / "local-cpu-hetero-int8.yaml"), "--planner", "base", "--json", "-",
            cwd=tmp_path)  # its profiles/local-cpu-hetero.json: beside the file
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cost_model"]["profile_path"] == str(SCENARIOS / "profiles" / "local-cpu-hetero.json")


def test_a_datasheet_speed_set_under_a_fitted_profile_is_said_to_change_nothing(cli):
    hetero = str(SCENARIOS / "local-cpu-hetero-int8.yaml")  # costmodel: fitted
    speed = "cluster.hosts[1].devices[0].peak_tflops"
    r = cli("simulate", hetero, "--planner", "base", "--set", f"{speed}=0.001")
    assert r.returncode == 0 and f"--set {speed}=0.001: the fitted profile prices the devices" in r.stderr, r.stderr
    r = cli("sweep", hetero, "--planner", "base", "--set", f"{speed}=0.001,1")
    assert r.returncode == 0 and f"--set {speed}=0.001,1: the fitted profile" in " ".join(r.stderr.split())
    r = cli("simulate", hetero, "--planner", "base", "--set", f"{speed}=0.001", "--set", "costmodel=roofline")
    assert r.returncode == 0 and "changes nothing" not in r.stderr, r.stderr


def test_a_plan_made_for_another_scenario_is_said_so(cli, tmp_path):
    """paper-llama7b's plan fits gpt3-2.7b's testbed (same devices, 66 units): taken, and said."""
    plan = tmp_path / "p.json"
    assert cli("plan", PAPER, "-q", "-o", str(plan)).returncode == 0
    r = cli("simulate", str(SCENARIOS / "paper-gpt3-2.7b.yaml"), "--plan", str(plan))
    assert r.returncode == 0 and "was planned for scenario 'paper-llama7b'" in r.stderr, r.stderr
    r = cli("simulate", PAPER, "--plan", str(plan))
    assert r.returncode == 0 and "planned for" not in r.stderr, r.stderr
    data = json.loads(plan.read_text())
    data["predicted"]["latency_s"] = 123.0  # a stale figure in the file does not reach the Result
    plan.write_text(json.dumps(data))
    r = cli("simulate", PAPER, "--plan", str(plan), "--json", "-", "-q")
    res = json.loads(r.stdout)["results"][0]
    assert "latency_s" not in res["plan"]["predicted"] and res["latency_s"] < 10
    gen = str(SCENARIOS / "paper-llama7b-generate.yaml")  # a generating plan's TTFT and TPOT go too
    assert cli("plan", gen, "-q", "-o", str(plan)).returncode == 0
    assert {"ttft_s", "tpot_s"} <= set(json.loads(plan.read_text())["predicted"])
    r = cli("simulate", gen, "--plan", str(plan), "--set", "workload.output_tokens=64", "--json", "-", "-q")
    assert r.returncode == 0, r.stderr
    predicted = json.loads(r.stdout)["results"][0]["plan"]["predicted"]
    assert not any(isinstance(v, float) for v in predicted.values()), predicted


def test_two_plans_of_one_planner_are_told_apart(cli, tmp_path):
    """A --plan list of two hpipe plans printed two 'hpipe' rows and two 'hpipe' trace processes."""
    one = tmp_path / "one.json"
    assert cli("plan", PAPER, "-q", "-o", str(one)).returncode == 0
    data = json.loads(one.read_text())
    both = tmp_path / "both.json"
    both.write_text(json.dumps([data, {**data, "micro_batches": 1}]))
    r = cli("simulate", PAPER, "--plan", str(both), "--json", "-", "-q")
    assert [x["planner"] for x in json.loads(r.stdout)["results"]] == ["hpipe [0]", "hpipe [1]"], r.stderr
    r = cli("simulate", PAPER, "--plan", str(one), "--json", "-", "-q")
    assert [x["planner"] for x in json.loads(r.stdout)["results"]] == ["hpipe"]  # alone: its own name


def test_version_and_help(cli):
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("hpipe ")
    r = cli("validate", "--help", env={"COLUMNS": "80"})
    assert r.returncode == 0
    assert "<bool>" not in r.stdout and "<str>" not in r.stdout
    assert "gpipe-\n" not in r.stdout  # no default list cut mid-word
    assert all(len(line) <= 80 for line in r.stdout.splitlines())


# ---- cost and the single-device planner --------------------------------------------
def test_cost_is_price_times_latency_of_the_plan_devices():
    from hpipe.devices import DEVICES
    from hpipe.planners import make_plan
    from hpipe.scenario import load_scenario
    from hpipe.sim import simulate

    setup = load_scenario(SCENARIOS / "cloud-mix.yaml").resolve()
    r = simulate(setup, make_plan(setup, "hpipe"))
    price = sum(setup.cluster.device(d).spec.price_per_hour for d in r.plan.devices)
    assert r.cost_usd == pytest.approx(price * r.latency_s / 3600, rel=1e-12)
    tokens = setup.batch_size * setup.seq_len
    assert r.usd_per_million_tokens == pytest.approx(r.cost_usd / tokens * 1e6, rel=1e-12)
    assert DEVICES["A100-40GB"].price_source and DEVICES["P100"].price_per_hour is None
    # a device without a price: no cost rather than a wrong one; a scenario price fills the gap
    paper = load_scenario(PAPER).resolve()
    assert simulate(paper, make_plan(paper, "hpipe")).cost_usd is None
    priced = load_scenario(PAPER, overrides=["cluster.hosts[0].devices[0].price_per_hour=0.5",
                                             "cluster.hosts[1].devices[0].price_per_hour=0.25"]).resolve()
    r = simulate(priced, make_plan(priced, "hpipe"))
    n_p100 = sum(d.startswith("host-a/") for d in r.plan.devices)
    n_3090 = sum(d.startswith("host-b/") for d in r.plan.devices)
    assert r.cost_usd == pytest.approx((0.5 * n_p100 + 0.25 * n_3090) * r.latency_s / 3600)


def test_blank_costs_name_the_devices_without_a_price(cli):
    """A price on one host's P100s and none on the RTX 3090s the plan also uses: the cost
    columns are blank, and a note names the unpriced device (a price sweep had printed only
    blanks).  Where nothing is priced, blanks are expected and nothing is said."""
    setp100 = "cluster.hosts[0].devices[0].price_per_hour"
    r = cli("simulate", str(PAPER), "--planner", "hpipe", "--set", f"{setp100}=0.5")
    assert r.returncode == 0, r.stderr
    said = " ".join(r.stderr.split())
    assert "$/run and $/Mtok are blank where a plan uses RTX3090: it has no price_per_hour" in said, r.stderr
    assert "P100" not in said
    r = cli("sweep", str(PAPER), "--planner", "hpipe", "--set", f"{setp100}=0.5,1")
    assert r.returncode == 0 and "blank where a plan uses RTX3090" in " ".join(r.stderr.split()), r.stderr
    r = cli("simulate", str(PAPER), "--planner", "hpipe")
    assert r.returncode == 0 and "price_per_hour" not in r.stderr, r.stderr
    r = cli("simulate", str(PAPER), "--planner", "hpipe", "--set", f"{setp100}=0.5",
            "--set", "cluster.hosts[1].devices[0].price_per_hour=0.25")
    assert r.returncode == 0 and "price_per_hour" not in r.stderr, r.stderr


def test_cost_per_million_tokens_counts_the_generated_tokens():
    """With generation, ``usd_per_million_tokens`` is the run's cost over every token of the
    batch, prompt and new: batch x (seq_len + output_tokens).  A count of the prompt alone
    survived, the test above having no output tokens (audit R3)."""
    from hpipe.planners import make_plan
    from hpipe.scenario import load_scenario
    from hpipe.sim import simulate

    setup = load_scenario(SCENARIOS / "cloud-mix.yaml", overrides=["workload.output_tokens=8"]).resolve()
    assert setup.output_tokens == 8
    r = simulate(setup, make_plan(setup, "hpipe"))
    assert r.cost_usd is not None and r.cost_usd > 0
    tokens = setup.batch_size * (setup.seq_len + 8)
    assert r.usd_per_million_tokens == pytest.approx(r.cost_usd / tokens * 1e6, rel=1e-12)
    prompt_only = r.cost_usd / (setup.batch_size * setup.seq_len) * 1e6
    assert r.usd_per_million_tokens < prompt_only * (1 - 1e-3)


def test_single_puts_the_model_on_the_fastest_device_that_holds_it():
    from hpipe.errors import InfeasibleError
    from hpipe.memory import plan_shortfalls
    from hpipe.planners import make_plan
    from hpipe.planners.common import finish
    from hpipe.scenario import load_scenario

    # one sequence of 1024 tokens: LLaMA-2-7B fits the A100, the L4 and the T4 alone
    setup = load_scenario(SCENARIOS / "cloud-mix.yaml",
                          overrides=["workload.batch_size=1", "workload.seq_len=1024"]).resolve()
    p = make_plan(setup, "single")
    assert len(p.stages) == 1 and p.stages[0].units == (0, setup.n_units) and p.micro_batches == 1
    # brute force: every device alone, whole sequence
    alone = {}
    for d in setup.cluster.device_ids:
        try:
            alone[d] = finish(setup, "single", [((d,), 0, setup.n_units)], [setup.seq_len], 1).predicted["latency_s"]
        except InfeasibleError:
            pass
    assert len({setup.cluster.device(d).spec.name for d in alone}) >= 2, alone  # a real choice
    assert p.stages[0].devices[0] == min(alone, key=alone.get)
    assert p.predicted["latency_s"] <= min(alone.values()) * (1 + 1e-9)
    assert p.predicted["single_device"] == p.stages[0].devices[0]
    # sliced_to_fit: whether the whole sequence would not fit, not whether the plan is sliced
    # (the roofline finds slices faster on one device too: cloud-mix's A100, 9 slices)
    for batch, to_fit in ((8, False), (11, True)):
        s = load_scenario(SCENARIOS / "cloud-mix.yaml", overrides=[f"workload.batch_size={batch}"]).resolve()
        p = make_plan(s, "single")
        assert len(p.slices) > 1 and p.predicted["sliced_to_fit"] is to_fit, (batch, p.slices, p.predicted)
        assert bool(plan_shortfalls(s, p.model_copy(update={"slices": [s.seq_len]}))) is to_fit
    with pytest.raises(InfeasibleError, match=r"no one device holds llama-13b.*GB short"):
        make_plan(load_scenario(SCENARIOS / "home-lab.yaml").resolve(), "single")


# ---- sweep ---------------------------------------------------------------------------
def test_sweep_json_table_and_plot(cli, tmp_path):
    png = tmp_path / "sweep.png"
    r = cli("sweep", PAPER, "--set", "cluster.network.bandwidth_gbps=0.1,1,100", "--planner", "hpipe,base,single",
            "--set", "workload.batch_size=2", "--json", "-", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["sweep"] == "cluster.network.bandwidth_gbps" and out["values"] == [0.1, 1, 100]
    assert len(out["runs"]) == 3 and all(len(run["results"]) == 3 for run in out["runs"])
    base = [run["results"][1] for run in out["runs"]]
    assert base[0]["planner"] == "base" and base[0]["latency_s"] > base[1]["latency_s"] > base[2]["latency_s"]
    single = [run["results"][2]["latency_s"] for run in out["runs"]]
    assert single[0] == single[2]  # one device: the network does not matter
    # the fixed --set applied to every value: batch 2 x 2048 tokens
    assert all(run["results"][0]["throughput_tokens_per_s"] * run["results"][0]["latency_s"] == pytest.approx(4096)
               for run in out["runs"])
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 20_000
    assert "bandwidth" in r.stderr and "hpipe" in r.stderr  # the table went to stderr beside JSON on stdout


def test_sweep_plot_joins_numbers_in_order_on_the_axis_of_feasible_values(cli, tmp_path):
    """Values given out of order drew zig-zags; an infeasible 600 put a log axis over 1-6."""
    from hpipe.sweep import SweepResult, sweep_plot

    r = cli("sweep", PAPER, "--set", "cluster.network.bandwidth_gbps=10,1,100,0.1", "--planner", "hpipe,single",
            "--json", "-", "-q")
    fig = sweep_plot(SweepResult.model_validate_json(r.stdout), tmp_path / "a.png")
    for line in fig.axes[0].get_lines():
        assert list(line.get_xdata()) == [0.1, 1, 10, 100]
    assert fig.axes[0].get_xscale() == "log"
    r = cli("sweep", PAPER, "--set", "workload.batch_size=1,600,6", "--planner", "hpipe", "--json", "-", "-q")
    sweep = SweepResult.model_validate_json(r.stdout)
    assert [run.results[0].feasible for run in sweep.runs] == [True, False, True]
    assert sweep_plot(sweep, tmp_path / "b.png").axes[0].get_xscale() == "linear"


def test_sweep_of_a_generating_scenario_shows_ttft_and_tpot():
    """The figures a decode objective is chosen for: objective=ttft trades end-to-end latency
    for a shorter TTFT, which a latency/energy table did not show."""
    from rich.console import Console

    from hpipe.scenario import load_scenario
    from hpipe.sweep import run_sweep
    from hpipe.tables import sweep_table

    gen = SCENARIOS / "paper-llama7b-generate.yaml"
    sweep = run_sweep(lambda extra: load_scenario(gen, overrides=extra).resolve(), "planner.objective",
                      ["latency", "ttft"], ["hpipe"])
    res = [run.results[0] for run in sweep.runs]
    assert res[1].ttft_s < res[0].ttft_s and res[1].latency_s > res[0].latency_s
    con = Console(width=80, record=True)
    con.print(sweep_table("t", "planner.objective", sweep.values, sweep.runs))
    text = con.export_text()
    assert "TTFT" in text and "TPOT" in text and f"{res[1].ttft_s:.4g}" in text and f"{res[0].tpot_s * 1e3:.4g}" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_sweep_of_mappings_names_them_as_yaml(cli):
    r = cli("sweep", str(SCENARIOS / "cloud-mix.yaml"), "--set",
            "cluster.network={bandwidth_gbps: 1},{bandwidth_gbps: 10}", "--planner", "gpipe")
    assert r.returncode == 0, r.stderr
    assert "{bandwidth_gbps: 1}" in r.stdout and "{bandwidth_gbps: 10}" in r.stdout


def test_sweep_with_nothing_feasible_says_why_at_each_value_even_quiet(cli):
    r = cli("sweep", PAPER, "--set", "model=llama-2-70b,llama-13b", "--planner", "single", "-q")
    assert r.returncode == 3 and "(the reasons are under the table)" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == "hpipe: no plan is feasible at any value:"
    assert lines[1].startswith("  model = llama-2-70b: single infeasible: ") and lines[1].endswith("118.50 GB short")
    assert lines[2].startswith("  model = llama-13b: single infeasible: ") and lines[2].endswith("12.61 GB short")
    r = cli("sweep", PAPER, "--set", "model=llama-2-70b,llama-13b", "--planner", "single")
    assert r.returncode == 3 and "(the reasons are under the table)" in r.stderr
    # the swept key is the model: the title does not name the scenario's own
    assert r.stdout.splitlines()[0] == "paper-llama7b: simulated at each model (roofline cost model)", r.stdout


def test_sweep_takes_its_values_from_a_global_set_and_simulate_points_to_sweep(cli):
    # `hpipe --set K=V1,V2 sweep ...`: the README says --set also goes before the command
    r = cli("--set", "workload.batch_size=1,2", "sweep", PAPER, "--json", "-")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sweep"] == "workload.batch_size" and json.loads(r.stdout)["values"] == [1, 2]
    r = cli("--set", "workload.seq_len=1024", "sweep", PAPER, "--set", "workload.batch_size=1,2", "--json", "-")
    assert r.returncode == 0, r.stderr
    assert [sum(run["results"][0]["plan"]["slices"]) for run in json.loads(r.stdout)["runs"]] == [1024, 1024]
    r = cli("sweep", PAPER, "--set", "workload.seq_len=1024")
    assert r.returncode == 2 and "two or more values" in r.stderr
    r = cli("simulate", PAPER, "--set", "workload.seq_len=1024,2048")
    assert r.returncode == 2 and "`hpipe sweep SCENARIO --set K=V1,V2`" in r.stderr, r.stderr
    r = cli("simulate", PAPER, "--set", "workload={seq_len: 30, batch_size: 2}")  # one value with a comma
    assert r.returncode == 2 and "hpipe sweep" not in r.stderr, r.stderr
    # a field that takes a list: V1,V2 was meant as one list, written in brackets (it had pointed to sweep)
    r = cli("simulate", PAPER, "--set", "compression.allow=int8,fp8")
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and "a list is written in brackets: --set 'compression.allow=[int8, fp8]'" in said, said
    assert "hpipe sweep" not in said


def test_sweep_of_a_scenario_valid_only_at_the_swept_values(cli, tmp_path):
    """The output check read the scenario without the swept value and refused it."""
    import yaml

    data = yaml.safe_load(open(PAPER))
    data["workload"]["seq_len"] = 1000  # not a multiple of the token granularity; 1024 and 2048 are
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    r = cli("sweep", str(path), "--set", "workload.seq_len=1024,2048", "--json", str(tmp_path / "o.json"), "-q")
    assert r.returncode == 0, r.stderr


def test_the_cli_in_one_process_reads_each_commands_scenario_afresh(tmp_path, monkeypatch, capsys):
    """Scenarios are read once per command (the output check and the command share the read),
    not once per process: a second command sees the file as it is now."""
    import sys

    import yaml

    from hpipe.cli import main

    path = tmp_path / "s.yaml"
    data = yaml.safe_load(open(PAPER))
    monkeypatch.chdir(tmp_path)
    for name in ("first", "second"):
        path.write_text(yaml.safe_dump({**data, "name": name}))
        monkeypatch.setattr(sys, "argv", ["hpipe", "simulate", "s.yaml", "--json", "-", "-q"])
        try:
            main()
        except SystemExit as e:
            assert not e.code, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["scenario"] == name


def test_a_scenario_from_a_pipe_is_read_once():
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, "-m", "hpipe", "simulate", "/dev/stdin", "-q", "--json", "-"],
                       input=open(PAPER).read(), capture_output=True, text=True, cwd=ROOT, timeout=120)  # a pipe
    assert r.returncode == 0 and json.loads(r.stdout)["results"][0]["latency_s"] > 0, r.stderr
    # a sweep resolves the scenario once per value: the pipe is still read once
    r = subprocess.run([sys.executable, "-m", "hpipe", "sweep", "/dev/stdin", "-q", "--json", "-",
                        "--set", "workload.seq_len=1024,2048"],
                       input=open(PAPER).read(), capture_output=True, text=True, cwd=ROOT, timeout=120)
    runs = json.loads(r.stdout)["runs"] if r.returncode == 0 else []
    assert [run["results"][0]["latency_s"] > 0 for run in runs] == [True, True], r.stderr


def test_a_set_that_replaces_an_earlier_one_is_refused(cli):
    """A mapping set whole after a --set of a field inside it dropped that field in silence
    (a sweep always applies its value last, so there it was always dropped)."""
    r = cli("simulate", PAPER, "-q", "--set", "cluster.network.bandwidth_gbps=100",
            "--set", "cluster.network={bandwidth_gbps: 1, latency_us: 50}")
    assert r.returncode == 2 and "the earlier --set cluster.network.bandwidth_gbps=100 would be lost" in r.stderr
    r = cli("--set", "workload.seq_len=1024", "plan", PAPER, "-q", "--set", "workload={seq_len: 4096, batch_size: 1}")
    assert r.returncode == 2 and "workload.seq_len=1024 would be lost" in r.stderr, r.stderr
    r = cli("sweep", PAPER, "-q", "--set", "workload.seq_len=1024",
            "--set", "workload={seq_len: 2048, batch_size: 1},{seq_len: 4096, batch_size: 1}")
    assert r.returncode == 2 and "replaces the --set workload.seq_len=1024 at every value" in r.stderr, r.stderr
    # the other order refines the mapping: the field set after it holds
    r = cli("plan", PAPER, "-q", "-o", "-", "--set", "workload={seq_len: 4096, batch_size: 1}",
            "--set", "workload.seq_len=1024")
    assert r.returncode == 0 and sum(json.loads(r.stdout)["slices"]) == 1024, r.stderr


def test_a_key_twice_inside_a_set_value_is_refused(cli):
    """YAML kept the last d_ff of an inline model in silence; a scenario file refuses it."""
    r = cli("plan", PAPER, "-q", "--set", "model={family: gpt, n_layers: 4, d_model: 256, n_heads: 8, d_ff: 1024, "
            "vocab_size: 1000, d_ff: 2048}")
    assert r.returncode == 2 and "'d_ff' is given again" in r.stderr, r.stderr


def test_settings_the_planners_run_do_not_read_are_said(cli):
    """micro_batches under hpipe, compression under the baselines and sampling without new
    tokens changed nothing, without a word."""
    r = cli("simulate", PAPER, "-q", "--planner", "hpipe,gpipe", "--set", "planner.micro_batches=3")
    assert r.returncode == 0 and "planner.micro_batches = 3 is for gpipe, gpipe-balanced, megatron only; " \
        "hpipe chooses its own" in " ".join(r.stderr.split()), r.stderr
    r = cli("simulate", PAPER, "-q", "--planner", "gpipe", "--set", "planner.micro_batches=3")
    assert r.returncode == 0 and "note" not in r.stderr, r.stderr  # read by the one planner run
    r = cli("plan", PAPER, "-q", "--planner", "single", "--set", "compression={allow: [int8]}",
            "--set", "workload.sampling.temperature=0.7")
    err = " ".join(r.stderr.split())
    assert r.returncode == 0 and "single sends activations uncompressed" in err, r.stderr
    assert "workload.sampling is for new tokens, and workload.output_tokens is 0" in err, r.stderr
    r = cli("plan", PAPER, "-q", "--set", "compression={allow: [int8]}")
    assert r.returncode == 0 and "note" not in r.stderr, r.stderr
    # a sweep whose values differ in what is read: the first value's note held for none of the others
    r = cli("sweep", PAPER, "-q", "--set", "workload.sampling.temperature=0.7", "--set", "workload.output_tokens=0,4")
    assert r.returncode == 0 and "workload.sampling is for new tokens" not in r.stderr, r.stderr


def test_planner_given_by_set_and_by_option_is_refused(cli):
    """--planner won and a --set planner.kind was ignored in silence."""
    for args in (["simulate", PAPER, "--set", "planner.kind=gpipe", "--planner", "hpipe"],
                 ["plan", PAPER, "--set", "planner={kind: gpipe}", "--planner", "hpipe"]):
        r = cli(*args, "-q")
        assert r.returncode == 2 and "both choose the planner; give one" in r.stderr, r.stderr
    r = cli("plan", PAPER, "-q", "-o", "-", "--set", "planner.kind=gpipe")
    assert r.returncode == 0 and json.loads(r.stdout)["planner"] == "gpipe"


def test_sweep_values_each_once_and_a_planners_settings_swept_whole(cli):
    r = cli("sweep", PAPER, "-q", "--set", "workload.seq_len=2048,1024,2048")
    assert r.returncode == 2 and "workload.seq_len = 2048 is given twice" in r.stderr, r.stderr
    r = cli("sweep", PAPER, "-q", "--set", "cluster.network.bandwidth_gbps=1,1.0")  # one number, two spellings
    assert r.returncode == 2 and "is given twice ('1' and '1.0')" in r.stderr, r.stderr
    # one planner's settings as mappings: swept; mappings of two planners: --planner compares those
    r = cli("sweep", PAPER, "-q", "--json", "-", "--set",
            "planner={kind: hpipe, token_granularity: 16},{kind: hpipe, token_granularity: 32}")
    assert r.returncode == 0, r.stderr
    assert [run["results"][0]["planner"] for run in json.loads(r.stdout)["runs"]] == ["hpipe", "hpipe"]
    r = cli("sweep", PAPER, "-q", "--set", "planner={kind: hpipe},{kind: gpipe}")
    assert r.returncode == 2 and "--planner hpipe,gpipe" in r.stderr, r.stderr


def test_sweep_of_the_cost_model_names_no_one_model_in_its_title(cli):
    local = SCENARIOS / "local-cpu.yaml"
    r = cli("sweep", local, "--planner", "hpipe", "--set",
            f"costmodel=roofline,{{kind: fitted, profile: {SCENARIOS / 'profiles' / 'local-cpu.json'}}}")
    assert r.returncode == 0 and "each value's cost model" in r.stdout, r.stdout + r.stderr


def test_sweep_refuses_zero_or_two_swept_keys_and_bad_values(cli):
    r = cli("sweep", PAPER, "--set", "workload.seq_len=1024")
    assert r.returncode == 2 and "V1,V2" in r.stderr
    r = cli("sweep", PAPER, "--set", "workload.seq_len=1024,2048", "--set", "workload.batch_size=1,2")
    assert r.returncode == 2 and "one key at a time" in r.stderr
    r = cli("sweep", PAPER, "--set", "workload.seq_len=1024,1000")
    assert r.returncode == 2 and "workload.seq_len" in r.stderr and "992 or 1008" in r.stderr
    # the planner is not a scenario value to sweep (every value ran the same planner): --planner says how
    for key in ("planner.kind", "planner"):
        r = cli("sweep", PAPER, "--set", f"{key}=hpipe,gpipe")
        assert r.returncode == 2 and "--planner hpipe,gpipe" in r.stderr, r.stderr


# ---- tables on an 80-column terminal, a readable plan ------------------------------
def _on_terminal(*args):
    import sys

    sys.path.insert(0, str(SCENARIOS.parent / "tests"))
    from pty_helpers import TerminalRun

    run = TerminalRun(*args, columns=80)
    try:
        code = run.wait(120)
        return code, run.text
    finally:
        run.close()


def test_a_sweep_of_mappings_folds_them_within_80_columns():
    """A cost model mapping with a profile path as the value took 110 columns."""
    profile = SCENARIOS / "profiles" / "local-cpu.json"
    code, text = _on_terminal("sweep", str(SCENARIOS / "local-cpu.yaml"), "--planner", "hpipe", "--set",
                              f"costmodel=roofline,{{kind: fitted, profile: {profile}}}")
    assert code == 0, text
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80, text
    # folded, not cut: the path's pieces, on the lines below the cell's first, join up whole
    # wherever the fold falls (it fell inside "local-cpu" from a checkout at /check/work/main)
    assert "".join(str(profile).split()) + "}" in "".join(text.split())


def test_tables_fit_80_columns_with_whole_names():
    code, text = _on_terminal("simulate", PAPER, "--planner", "all")
    assert code == 0, text
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80, text
    for name in ("gpipe-balanced", "tp-terapipe", "terapipe", "megatron", "single"):
        assert name in text
    assert "…" not in text
    assert "mem" in text and "GB" in text and "MB" not in text  # one unit system, said in the header
    code, text = _on_terminal("simulate", str(SCENARIOS / "home-lab.yaml"), "--planner", "all")
    assert code == 0 and max(len(line.rstrip()) for line in text.splitlines()) <= 80, text
    # each reason once, no doubled prefix, planners with one reason grouped
    flat = " ".join(text.split())
    assert "base: base:" not in flat and "gpipe, megatron infeasible:" in flat
    assert flat.count("0.47 GB short") == 1
    code, text = _on_terminal("simulate", str(SCENARIOS / "paper-llama7b-generate.yaml"), "--planner", "all")
    assert code == 0 and max(len(line.rstrip()) for line in text.splitlines()) <= 80, text
    assert "…" not in text and "TPOT" in text and "gpipe-balanced" in text
    for catalog, whole in (("devices", "A100-80GB"), ("models", "llama-2-70b")):
        code, text = _on_terminal(catalog)
        assert code == 0 and max(len(line.rstrip()) for line in text.splitlines()) <= 80, text
        assert "…" not in text and whole in text


def test_plan_of_a_generating_scenario_says_which_figures_are_the_prefills(cli):
    """The title's latency is end to end, the columns are the prefill's: both said, with TTFT,
    TPOT and the decode groups that were nowhere in the table."""
    r = cli("plan", str(SCENARIOS / "paper-llama7b-generate.yaml"))
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert re.search(r"\(TTFT [\d.]+ s; 256 new tokens, TPOT [\d.]+ ms, decoded as \d+ micro-batch(es)?\)", out), out
    assert "4 prefill slices per sequence" in out and "busy: all prefill items" in out, out
    r = cli("plan", PAPER)
    assert r.returncode == 0 and "TTFT" not in r.stdout and "prefill" not in r.stdout, r.stdout
    # one new token: the prefill makes it, no decode step and no TPOT (the title had crashed on it)
    r = cli("plan", str(SCENARIOS / "paper-llama7b-generate.yaml"), "--set", "workload.output_tokens=1")
    assert r.returncode == 0 and "; 1 new token)" in r.stdout, r.stdout + r.stderr


def test_piped_tables_keep_titles_and_captions_whole_and_lines_unpadded(cli):
    """Into a pipe, rich wrapped a table's title and caption to the table's width and padded
    every line with spaces; grep and diff saw broken sentences and trailing blanks."""
    r = cli("plan", str(SCENARIOS / "local-cpu-hetero.yaml"), "--set", "costmodel=roofline")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines and all(line == line.rstrip() for line in lines), r.stdout
    assert lines[0].startswith("local-cpu-hetero: hpipe plan, predicted latency ")  # the title, first
    (caption,) = [line for line in lines if line.startswith("per item:")]
    assert caption.endswith("GB (10^9 bytes)"), caption  # one line, not wrapped at the table's edge
    r = cli("simulate", PAPER, "--planner", "all")
    assert r.returncode == 0 and all(line == line.rstrip() for line in r.stdout.splitlines()), r.stdout
    (title,) = [line for line in r.stdout.splitlines() if line.startswith("paper-llama7b: simulated")]
    assert title.endswith("cost model)"), title


def test_catalogs_say_where_they_wrote_and_keep_four_digits(cli, tmp_path):
    for catalog, what in (("devices", "device catalog JSON"), ("models", "model catalog JSON")):
        out = tmp_path / f"{catalog}.json"
        r = cli(catalog, "--json", str(out))
        assert r.returncode == 0 and f"wrote the {what} to {out}" in r.stdout and json.loads(out.read_text())
    a100 = [line for line in cli("devices").stdout.splitlines() if line.split()[:1] == ["A100-40GB"]]
    assert a100 and a100[0].split()[-1] == "4.097", a100  # $/h as money() gives it, not 4.09657


def test_numbers_keep_four_significant_digits():
    from hpipe.tables import sig

    assert [sig(x) for x in (4.0, 0.002083, 12.3749, 1234.5, 0.0, 98765.4, None)] == \
        ["4.000", "0.002083", "12.37", "1,234", "0", "98,765", "-"]
    # rounded before the digits are counted: 9.9996 once printed as 10.000 (five digits)
    assert [sig(x) for x in (9.9996, 999.96, 0.099999, -9.9996)] == ["10.00", "1,000", "0.1000", "-10.00"]
    assert sig(99.996, 3) == "100"


def test_describe_units_in_words():
    from hpipe.models import get_model
    from hpipe.tables import describe_units

    units = get_model("llama-7b").units()  # embed, (attn, mlp) x 32, head: 66 units
    assert describe_units(units, 0, 30) == "embed + blocks 0–13 + attn of 14"
    assert describe_units(units, 30, 66) == "mlp of 14 + blocks 15–31 + head"
    assert describe_units(units, 29, 30) == "attn of 14"
    assert describe_units(units, 30, 31) == "mlp of 14"
    assert describe_units(units, 0, 66) == "embed + blocks 0–31 + head"
    assert describe_units(units, 30, 32) == "mlp of 14 + attn of 15"


def test_plan_prints_stages_in_words_and_says_where_it_wrote(tmp_path):
    out = tmp_path / "plan.json"
    code, text = _on_terminal("plan", PAPER, "-o", str(out))
    assert code == 0, text
    assert json.loads(out.read_text())["planner"] == "hpipe"
    assert f"wrote the Plan JSON to {out}" in "".join(text.split("\n"))
    assert "embed + blocks" in text and "+ head" in text and "/ 23.5" in text and "predicted latency" in text
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80, text


def test_simulate_says_which_files_it_wrote(cli, tmp_path):
    res, trace = tmp_path / "r.json", tmp_path / "t.json"
    r = cli("simulate", PAPER, "--json", str(res), "--trace", str(trace))
    assert r.returncode == 0, r.stderr
    assert f"wrote the Result JSON to {res}" in r.stdout and f"wrote the Chrome trace to {trace}" in r.stdout
    r = cli("simulate", PAPER, "--json", "-", "--trace", str(trace))  # the JSON on stdout goes unsaid
    assert r.returncode == 0 and json.loads(r.stdout)["mode"] == "simulated"
    assert "wrote the Result" not in r.stderr and f"wrote the Chrome trace to {trace}" in r.stderr
    sweep, chart = tmp_path / "s.json", tmp_path / "s.svg"
    r = cli("sweep", PAPER, "--set", "workload.seq_len=1024,2048", "--json", str(sweep), "--plot", str(chart))
    assert r.returncode == 0, r.stderr
    assert f"wrote the sweep JSON to {sweep}" in r.stdout and f"wrote the sweep chart to {chart}" in r.stdout


# ---- small things ---------------------------------------------------------------------
def test_empty_scenario_file_says_so(cli, tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing yet\n")
    r = cli("simulate", str(p))
    assert r.returncode == 2 and "the file is empty" in r.stderr and "NoneType" not in r.stderr


def test_ctrl_c_during_simulate_exits_130():
    import time

    import sys

    sys.path.insert(0, str(SCENARIOS.parent / "tests"))
    from pty_helpers import TerminalRun

    # the 70B scenario plans for seconds per planner
    run = TerminalRun("simulate", str(SCENARIOS / "llama70b-4hosts-32k.yaml"), "--planner", "all")
    try:
        deadline = time.monotonic() + 60
        while "planning" not in run.text and time.monotonic() < deadline and run.proc.poll() is None:
            time.sleep(0.1)
        assert run.proc.poll() is None, run.text
        run.ctrl_c()
        assert run.wait(10) == 130, run.text
        assert "hpipe: interrupted" in run.text and "Traceback" not in run.text
    finally:
        run.close()


def test_install_script_prefers_the_cpu_index_and_falls_back_to_the_default():
    text = (SCENARIOS.parent / "scripts" / "install.sh").read_text()
    cpu = text.index('"torch==$TORCH_VERSION+cpu" --extra-index-url "$CPU_INDEX"')
    default = text.index('pip install -q "torch==$TORCH_VERSION"\n')
    assert text.index('reachable "$CPU_INDEX"') < cpu < default  # probe, CPU build first, default after
    readme = (SCENARIOS.parent / "README.md").read_text()
    assert "download.pytorch.org/whl/cpu" in readme and "not reachable" in readme


# ---- what a new user mistypes --------------------------------------------------------
def test_a_title_names_the_cost_model_auto_chose(cli, tmp_path, monkeypatch):
    """With --quiet nothing else says which model costmodel auto used."""
    monkeypatch.setenv("HPIPE_CACHE_DIR", str(tmp_path / "empty"))
    r = cli("simulate", str(SCENARIOS / "local-cpu.yaml"))
    assert r.returncode == 0 and r.stdout.splitlines()[0].endswith(", auto (roofline) cost model)"), r.stdout


def test_user_names_in_titles_are_text_not_markup(cli):
    r = cli("simulate", PAPER, "--set", "name=tiny[/]x")  # host and device names allow no brackets
    assert r.returncode == 0 and r.stdout.startswith("tiny[/]x: simulated"), r.stderr  # rich's MarkupError before


def test_a_piped_note_is_one_line_however_long():
    import io

    from hpipe.tables import PipedConsole

    buf = io.StringIO()
    PipedConsole(file=buf, width=160).print("[yellow]note:[/] " + "a long note " * 40)
    assert buf.getvalue() == "note: " + "a long note " * 40 + "\n"


def test_a_weights_folder_that_is_not_there_is_named_against_the_scenario(cli):
    local = str(SCENARIOS / "local-cpu.yaml")
    for args in (["execute", local], ["generate", local, "--prompt", "hi"]):
        r = cli(*args, "--set", "weights=nowhere/", "-q")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"{local}: field 'weights': " in r.stderr and "nowhere does not exist" in r.stderr, r.stderr


def test_a_misspelled_planner_is_the_first_thing_said(cli):
    """Before the fix, costmodel auto's note (or a profile's minute) came first."""
    local = str(SCENARIOS / "local-cpu.yaml")
    for args in (["simulate", local], ["plan", local], ["sweep", local, "--set", "workload.batch_size=1,2"],
                 ["generate", local, "--prompt", "hi"]):
        r = cli(*args, "--planner", "hpip")
        assert r.returncode == 2 and r.stderr.startswith("hpipe: field '--planner': unknown planner 'hpip'"), \
            (args, r.stderr)


def test_planner_lists(cli):
    r = cli("simulate", PAPER, "--planner", "hpipe,base,hpipe", "--json", "-")
    assert r.returncode == 0, r.stderr
    assert [x["planner"] for x in json.loads(r.stdout)["results"]] == ["hpipe", "base"]  # each once, in order
    r = cli("simulate", PAPER, "--planner", ",", "-q")
    assert r.returncode == 2 and "no planner named" in r.stderr
    r = cli("simulate", PAPER, "--planner", "all,hpipe", "-q")
    assert r.returncode == 2 and "give it alone" in r.stderr
    r = cli("simulate", PAPER, "--planner", "gp-b", "-q")  # the README's tables abbreviate so
    assert r.returncode == 2 and "did you mean gpipe-balanced" in r.stderr
    for bad in ("hpipe,,gpipe", "hpipe,"):  # a name lost between commas is not dropped silently
        r = cli("simulate", PAPER, "--planner", bad, "-q")
        assert r.returncode == 2 and "empty name" in r.stderr, r.stderr
    r = cli("validate", PAPER, "--planners", "foo", "-q")  # named by its own option
    assert r.returncode == 2 and "field '--planners'" in r.stderr and "unknown planner 'foo'" in r.stderr


def test_set_says_how_to_index_and_which_keys_exist(cli):
    r = cli("simulate", PAPER, "--set", "cluster.hosts.0.devices.0.count=2", "-q")
    assert r.returncode == 2 and "did you mean cluster.hosts[0].devices[0].count" in r.stderr
    assert "host-a" not in r.stderr  # not the list's contents
    r = cli("simulate", PAPER, "--set", "foo=3", "-q")
    assert r.returncode == 2 and "workload" in r.stderr and "cluster" in r.stderr
    r = cli("--set", "workload.seq_len=4096", "devices")
    assert r.returncode == 2 and "nothing to apply --set to" in r.stderr
    # one key twice (here once spelled with a space): which was meant is a guess, so refused
    r = cli("simulate", PAPER, "--set", "workload.seq_len=1024", "--set", "workload. seq_len=4096", "-q")
    assert r.returncode == 2 and "workload.seq_len is set twice ('1024', then '4096')" in r.stderr
    r = cli("sweep", PAPER, "--set", "workload.seq_len=1024,2048", "--set", "workload.seq_len=4096", "-q")
    assert r.returncode == 2 and "workload.seq_len is given twice in --set" in r.stderr
    # a key under a field that is a name here but may be a mapping: say how to give it whole
    r = cli("simulate", PAPER, "--set", "costmodel.kind=fitted", "-q")
    assert r.returncode == 2 and "set it whole: --set 'costmodel={kind: ...}'" in r.stderr, r.stderr
    r = cli("simulate", PAPER, "--set", "costmodel.link_efficiency=0.8", "-q")  # its name is the mapping's kind
    assert r.returncode == 2 and "--set 'costmodel={kind: roofline, link_efficiency: ...}'" in r.stderr, r.stderr
    r = cli("simulate", PAPER, "--set", "costmodel={kind: roofline, link_efficiency: 0.8}", "-q")
    assert r.returncode == 0, r.stderr  # the hint, followed
    # auto's settings sit under the model auto picks: the hint puts them there, the follow-up checks it
    r = cli("simulate", PAPER, "--set", "costmodel=auto", "--set", "costmodel.basis=wall", "-q")
    assert r.returncode == 2 and "--set 'costmodel={kind: auto, fitted: {basis: ...}}'" in r.stderr, r.stderr
    r = cli("simulate", PAPER, "--set", "costmodel={kind: auto, link_efficiency: 0.8}", "-q")
    assert r.returncode == 2 and "give it under roofline: {kind: auto, roofline: {link_efficiency: ...}}" in r.stderr
    r = cli("simulate", PAPER, "--set", "costmodel={kind: auto, fitted: {basis: wall}}", "-q")
    assert r.returncode == 0, r.stderr  # the hint, followed
    r = cli("simulate", PAPER, "--set", "costmodel=auto", "--set", "costmodel.profile=x.json", "-q")
    assert r.returncode == 2 and "--set 'costmodel={kind: fitted, profile: ...}'" in r.stderr, r.stderr  # auto names none
    r = cli("simulate", PAPER, "--set", "compression.allow.0=int8", "-q")  # a list of values, not of mappings
    assert r.returncode == 2 and "--set 'compression.allow=[..., ...]'" in r.stderr, r.stderr
    r = cli("simulate", PAPER, "--set", "model.n_layers=2", "-q")  # a catalog name is not a kind
    assert r.returncode == 2 and "--set 'model={n_layers: ...}'" in r.stderr, r.stderr
    for key in ("cluster.links[0].bandwidth_gbps", "cluster.links.0.bandwidth_gbps"):  # a list the file lacks
        r = cli("simulate", PAPER, "--set", f"{key}=0.1", "-q")
        assert r.returncode == 2 and "cluster.links is not in the file, so it has no entry [0]; to add entries, " \
            "give the list whole: --set 'cluster.links=[{...}, ...]'" in r.stderr, r.stderr
    r = cli("simulate", PAPER, "--set", "workload.seq_len.x=1", "-q")  # a number is never a mapping
    assert r.returncode == 2 and "not a mapping" in r.stderr and "whole" not in r.stderr, r.stderr


def test_one_infeasible_planner_writes_its_json_and_exits_3(cli, tmp_path):
    out = tmp_path / "r.json"
    r = cli("simulate", str(SCENARIOS / "home-lab.yaml"), "--set", "model=llama-2-70b", "--planner", "hpipe",
            "--json", str(out))
    assert r.returncode == 3, r.stderr
    assert "GB short" in r.stderr and "KV cache 2.68 GB" in r.stderr  # how much of the need is the cache
    (res,) = json.loads(out.read_text())["results"]  # written as with several planners
    assert not res["feasible"] and "GB short" in res["infeasible"]
    assert f"wrote the Result JSON to {out}" in r.stderr


def test_hpipe_documents_in_the_wrong_place_are_named(cli, tmp_path):
    plan, result = tmp_path / "plan.json", tmp_path / "result.json"
    assert cli("plan", PAPER, "-o", str(plan), "-q").returncode == 0
    assert cli("simulate", PAPER, "--json", str(result), "-q").returncode == 0
    r = cli("simulate", str(plan))
    assert r.returncode == 2 and "is a Plan JSON, not a scenario" in r.stderr and "--plan" in r.stderr
    r = cli("simulate", str(result))
    assert r.returncode == 2 and "is a Result JSON" in r.stderr
    r = cli("simulate", PAPER, "--plan", str(result))
    assert r.returncode == 2 and "is a Result JSON" in r.stderr and "not a Plan" in r.stderr


def test_execute_checks_its_inputs_before_measuring_a_profile(cli, tmp_path):
    pytest.importorskip("torch")
    plan = tmp_path / "paper-plan.json"
    assert cli("plan", PAPER, "-o", str(plan), "-q").returncode == 0
    cache = tmp_path / "cache"
    local = str(SCENARIOS / "local-cpu.yaml")  # costmodel: auto, and no profile in this empty cache
    r = cli("execute", local, "--plan", str(plan), "-q", env={"HPIPE_CACHE_DIR": str(cache)})
    assert r.returncode == 2 and "is not in the scenario" in r.stderr
    assert "measuring" not in r.stderr and not cache.exists()  # refused before a profile's minute
    bad = tmp_path / "ids.json"
    bad.write_text("[[1, 2, 3]]")
    r = cli("execute", local, "--inputs", str(bad), "-q", env={"HPIPE_CACHE_DIR": str(cache)})
    assert r.returncode == 2 and "batch_size" in r.stderr and "measuring" not in r.stderr and not cache.exists()
    r = cli("execute", local, "--timeout", "0", "-q", env={"HPIPE_CACHE_DIR": str(cache)})
    assert r.returncode == 2 and "--timeout" in r.stderr and not cache.exists()
    r = cli("execute", local, "--set", f"weights={tmp_path / 'nope'}", "-q", env={"HPIPE_CACHE_DIR": str(cache)})
    assert r.returncode == 2 and "config.json" in r.stderr and "measuring" not in r.stderr and not cache.exists()


def test_profile_and_validate_refuse_gpus_with_nowhere_to_run(cli, tmp_path):
    """A GPU scenario with no runtime: placement would become one-thread CPU workers (the paper's
    six, 4 GB each, ran this VM out of memory): refused before any worker starts, naming the entries."""
    pytest.importorskip("torch")
    out = tmp_path / "p.json"
    for args in (["profile", PAPER, "--quick", "-o", str(out)],
                 ["validate", PAPER, "--random", "0", "--json", str(tmp_path / "v.json")]):
        r = cli(*args, "-q", env={"HPIPE_CACHE_DIR": str(tmp_path / "cache")})
        assert r.returncode == 2, (args, r.stderr)
        assert "cluster.hosts[0].devices[0].runtime" in r.stderr and "P100 x4" in r.stderr and "RTX3090 x2" in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written


def test_json_to_dev_stdout_is_stdout(cli):
    r = cli("simulate", PAPER, "--planner", "hpipe", "--json", "/dev/stdout")  # a pipe here, as under | jq
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["results"][0]["planner"] == "hpipe"  # the JSON alone: the table went to stderr
    assert "latency" in r.stderr
    r = cli("simulate", PAPER, "--json", "/dev/stdout", "--trace", "-")
    assert r.returncode == 2 and "stdout" in r.stderr
    r = cli("simulate", PAPER, "--trace", "-")  # the trace alone on stdout: the table goes to stderr
    assert r.returncode == 0 and "traceEvents" in json.loads(r.stdout) and "latency" in r.stderr


def test_names_and_values_in_table_cells_are_text_not_markup(cli, tmp_path):
    """A planner named in a Plan JSON and a swept list value are printed as written: "[/]x"
    had raised rich's MarkupError (a traceback), and "[int8]" and "my[plan]" had vanished."""
    plan = tmp_path / "p.json"
    r = cli("plan", PAPER, "-o", str(plan), "-q")
    assert r.returncode == 0, r.stderr
    data = json.loads(plan.read_text())
    data["planner"] = "[/]x my[plan] v2"
    plan.write_text(json.dumps(data))
    r = cli("simulate", PAPER, "--plan", str(plan))
    assert r.returncode == 0 and "[/]x my[plan] v2" in r.stdout, r.stdout + r.stderr
    r = cli("sweep", str(SCENARIOS / "local-cpu-hetero-int8.yaml"), "--set", "costmodel=roofline",
            "--set", "compression.allow=[int8],[int8,fp8]", "--planner", "hpipe")
    assert r.returncode == 0 and "[int8]" in r.stdout and "[int8, fp8]" in r.stdout, r.stdout + r.stderr


def test_run_commands_refuse_what_cannot_run_here_before_any_profile(cli, tmp_path):
    """A model whose weights alone outgrow this machine's memory, where every device is one of
    its CPU workers, is refused (exit 3) before a first run measures its profile, by execute
    and by generate alike; and generate refuses a GPU with no placement, as execute does (it
    had run it as a one-thread CPU worker beside a prediction priced on the GPU's datasheet)."""
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([list(range(1, 17))]))
    big = ["--set", "model=llama-2-70b", "--set", "cluster.hosts[0].devices[0].memory_gb=4000"]
    for cmd in (["execute"], ["generate", "--inputs", str(ids)]):
        r = cli(*cmd[:1], str(SCENARIOS / "local-cpu.yaml"), *cmd[1:], *big)
        assert r.returncode == 3 and "whatever the plan" in r.stderr and "GB short" in r.stderr, r.stderr
        assert "measuring" not in r.stderr
    r = cli("generate", PAPER, "--inputs", str(ids), "--set", "model=tiny-llama", "--set", "workload.seq_len=16",
            "--max-new-tokens", "2")
    assert r.returncode == 2 and "no `runtime:` placement" in r.stderr, r.stderr


def test_a_hand_written_plans_codecs_keep_to_the_scenarios_compression(cli, tmp_path):
    """A Plan JSON's lossy codecs are the scenario's to allow: none without compression (off,
    since it is lossy), only those in allow, on at most max_lossy_hops boundaries.  They had
    been taken as given, fp8 and int4 on a scenario without compression."""
    r = cli("plan", PAPER, "-o", str(tmp_path / "p.json"), "-q")
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "p.json").read_text())
    n = len(data["stages"]) - 1
    assert n >= 2
    cases = [(["int8", "fp8"], None, "codecs[0]", "allows no compression (it has no compression: key); to allow the "
              "plan's: --set 'compression={allow: [int8, fp8], max_lossy_hops: 2}'"),
             (["int8", "fp8"], "{allow: [int8], max_lossy_hops: 2}", "codecs[1]", "not in the scenario's compression.allow"),
             (["int8", "fp8"], "{allow: [int8, fp8], max_lossy_hops: 1}", "codecs", "more than the scenario's"),
             (["int8", "fp8"], "{allow: [int8, fp8], max_lossy_hops: 2}", None, None)]
    for lossy, comp, field, words in cases:
        (tmp_path / "c.json").write_text(json.dumps({**data, "codecs": lossy + ["none"] * (n - len(lossy))}))
        r = cli("simulate", PAPER, "--plan", str(tmp_path / "c.json"), "-q",
                *(["--set", f"compression={comp}"] if comp else []))
        if field is None:
            assert r.returncode == 0, r.stderr
        else:
            assert r.returncode == 2 and f"field '{field}'" in r.stderr and words in r.stderr, r.stderr


def test_a_workload_past_the_models_trained_context_is_said_when_planning(cli):
    """plan, simulate and sweep say when a LLaMA runs past the context it was trained on (its
    rotary positions compute there, so the figures hold, but the text degrades): 8k tokens on
    llama-7b had planned in silence, and `hpipe models` did not show the context."""
    r = cli("simulate", PAPER, "--set", "workload.seq_len=4096", "--set", "workload.batch_size=1", "-q",
            "--planner", "gpipe")
    assert r.returncode == 0 and "4096 tokens run the model at 4096 positions, past the 2048 it was trained on " \
        "(the catalog's llama-7b)" in " ".join(r.stderr.split()), r.stderr
    r = cli("plan", PAPER, "-q")  # 2048 of 2048: within
    assert r.returncode == 0 and "past the" not in r.stderr, r.stderr
    r = cli("sweep", PAPER, "--set", "workload.seq_len=1024,4096", "--set", "workload.batch_size=1", "-q",
            "--planner", "gpipe")
    assert r.returncode == 0 and "workload.seq_len = 4096: the workload runs llama-7b past the 2048 positions" \
        in " ".join(r.stderr.split()), r.stderr
    r = cli("models")
    assert r.returncode == 0 and "context" in r.stdout and "2,048" in r.stdout


def test_an_infeasible_plan_file_says_its_reason_once(cli, tmp_path):
    """A --plan that does not fit: the row and its reason under the table, and the error line
    points there (it had repeated the reason); with -q the error line carries it."""
    r = cli("plan", PAPER, "-o", str(tmp_path / "p.json"), "-q")
    data = json.loads((tmp_path / "p.json").read_text())
    n_units = data["stages"][-1]["units"][1]
    data.update(stages=[{"devices": ["host-a/P100-0"], "units": [0, n_units]}], codecs=None)
    (tmp_path / "one.json").write_text(json.dumps(data))
    r = cli("simulate", PAPER, "--plan", str(tmp_path / "one.json"))
    both = r.stdout + r.stderr
    assert r.returncode == 3 and both.count("GB short") == 1 and "(the reason is under the table)" in r.stderr, both
    r = cli("simulate", PAPER, "--plan", str(tmp_path / "one.json"), "-q")
    assert r.returncode == 3 and r.stderr.count("GB short") == 1 and "host-a/P100-0 needs" in r.stderr, r.stderr


def test_every_table_gives_tpot_in_ms():
    """simulate, sweep and validate print TPOT in ms; generate's and execute's table had it in s
    (8.798 beside 0.008798 for one plan)."""
    from rich.console import Console

    from hpipe.scenario import load_scenario
    from hpipe.sim import simulate
    from hpipe.planners import make_plan
    from hpipe.tables import generation_table

    setup = load_scenario(SCENARIOS / "paper-llama7b-generate.yaml", overrides=["workload.seq_len=256"]).resolve()
    r = simulate(setup, make_plan(setup, "gpipe"))
    con = Console(width=120, record=True)
    con.print(generation_table("t", r, r))
    text = con.export_text()
    assert "TPOT ms" in text and "TPOT p90 ms" in text and f"{r.tpot_s * 1e3:.4g}" in text, text


def test_a_swallowed_ctrl_c_is_raised_at_the_next_check():
    """A KeyboardInterrupt that lands where something swallows it (here a broad except, as in a
    finalizer) must not let the command go on: long work polls ``check_interrupted``, which
    raises it again.  A CI run beside a busy loop once profiled on after a Ctrl-C at 1 s."""
    import signal

    from hpipe import stopping

    # pytest started in the background (`&` from a script) inherits SIGINT ignored, which
    # install_sigterm rightly leaves alone: give this test the handler a terminal would
    found = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = stopping.install_sigterm()
        try:
            stopping.check_interrupted()  # nothing came: nothing raised
            try:
                signal.raise_signal(signal.SIGINT)
            except BaseException:  # swallowed
                pass
            with pytest.raises(KeyboardInterrupt):
                stopping.check_interrupted()
        finally:
            stopping.restore(before)
        stopping.check_interrupted()  # a clean slate for an in-process caller
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, found)


def test_a_planner_that_finds_no_plan_is_named_by_every_command(cli):
    """plan and execute said "base: the plan does not fit ...", simulate the same line without
    the planner's name."""
    for cmd in ("plan", "simulate", "execute"):
        r = cli(cmd, str(SCENARIOS / "home-lab.yaml"), "--planner", "base")
        assert r.returncode == 3 and r.stderr.startswith("hpipe: base: the plan does not fit in memory"), (cmd, r.stderr)
    # the hpipe planner's own name is the tool's: said once, not "hpipe: hpipe: llama-2-7b ..."
    for cmd in ("plan", "simulate"):
        r = cli(cmd, str(SCENARIOS / "cloud-mix.yaml"), "--planner", "hpipe", "--set", "workload.batch_size=500")
        assert r.returncode == 3 and r.stderr.startswith("hpipe: llama-2-7b at batch 500 "), (cmd, r.stderr)


def test_a_scenario_named_without_its_folder_or_yaml_and_a_scenario_as_plan_say_what_was_meant(cli, tmp_path):
    r = cli("simulate", "paper-llama7b")  # from the repository's root, where scenarios/ is
    assert r.returncode == 2 and "paper-llama7b: no such file (did you mean scenarios/paper-llama7b.yaml?)" in r.stderr, r.stderr
    r = cli("simulate", "scenarios/paper-llama7b")
    assert r.returncode == 2 and "(did you mean scenarios/paper-llama7b.yaml?)" in r.stderr, r.stderr
    r = cli("simulate", "paper-gpt3-2.7b")  # a name's own dot is not a suffix
    assert r.returncode == 2 and "(did you mean scenarios/paper-gpt3-2.7b.yaml?)" in r.stderr, r.stderr
    r = cli("simulate", "scenarios/paper-llama7b.yml")
    assert r.returncode == 2 and "(did you mean scenarios/paper-llama7b.yaml?)" in r.stderr, r.stderr
    r = cli("simulate", str(tmp_path / "paper-llama7b.yaml"))  # elsewhere, nothing near: no guess
    assert r.returncode == 2 and r.stderr.strip().endswith("no such file"), r.stderr
    r = cli("simulate", PAPER, "--plan", PAPER)
    assert r.returncode == 2 and "JSON syntax error" in r.stderr and "a plan is JSON" in r.stderr, r.stderr


def test_a_plan_with_one_unpriced_device_has_no_cost():
    """One device of the plan without a price: no cost at all rather than a sum of the priced
    ones (audit 3: `any` for `all` survived; it raised a TypeError summing None)."""
    from hpipe.planners import make_plan
    from hpipe.scenario import load_scenario
    from hpipe.sim import simulate

    half = load_scenario(PAPER, overrides=["cluster.hosts[0].devices[0].price_per_hour=0.5"]).resolve()
    r = simulate(half, make_plan(half, "hpipe"))
    prices = {half.cluster.device(d).spec.price_per_hour for d in r.plan.devices}
    assert 0.5 in prices and None in prices  # the plan uses both kinds
    assert r.cost_usd is None and r.usd_per_million_tokens is None


def test_a_sweep_fails_only_where_no_planner_takes_any_value(monkeypatch):
    """run_sweep: a value where every planner refuses the input is that value's ✗ rows while
    another value plans; the sweep fails, with the first refusal, only where no planner took
    any value (audit 3: failing on one value's refusals, `len(limits) >= len(planners)`, survived)."""
    from types import SimpleNamespace

    import hpipe.compare
    from hpipe.errors import PlannerInputError
    from hpipe.sweep import run_sweep

    def compare(setup, planners, on_step=None):  # "bad" setups: every planner refuses
        return [], [PlannerInputError(f"{p} refuses {setup.name}") for p in planners] if setup.name == "bad" else []

    monkeypatch.setattr(hpipe.compare, "compare_planners", compare)

    def load(assignments):
        return SimpleNamespace(name="bad" if assignments == ["k=1"] else "good",
                               cost=SimpleNamespace(describe=lambda: {"kind": "roofline"}))

    out = run_sweep(load, "k", [1, 2], ["a", "b"])
    assert out.values == [1, 2] and [run.scenario for run in out.runs] == ["bad", "good"]
    with pytest.raises(PlannerInputError, match="a refuses bad"):
        run_sweep(lambda a: load(["k=1"]), "k", [1, 2], ["a", "b"])


def test_a_generating_sweeps_table_gives_the_cost_per_run_only():
    """sweep_table's columns: with generation TTFT and TPOT, and the cost per run without the
    cost per million tokens (audit 3: keeping $/Mtok beside them survived, the table still
    fitting 80 columns with a price-less scenario's dashes)."""
    from hpipe.scenario import load_scenario
    from hpipe.sweep import run_sweep
    from hpipe.tables import sweep_table

    local = SCENARIOS / "local-cpu.yaml"
    for out, want in ((0, ("energy\nJ", "cost\n$/run", "cost\n$/Mtok")),
                      (4, ("TTFT\ns", "TPOT\nms", "energy\nJ", "cost\n$/run"))):
        sweep = run_sweep(lambda extra: load_scenario(local, overrides=["costmodel=roofline",
                                                                        f"workload.output_tokens={out}", *extra]).resolve(),
                          "workload.batch_size", [1, 2], ["base"])
        headers = [c.header for c in sweep_table("t", "workload.batch_size", sweep.values, sweep.runs).columns]
        assert headers == ["batch_\nsize", "planner", "latency\ns", *want, "stages/\nslices/µb"], out


# ---- settings that would change nothing are said or refused (the standards audit) ----------
GEN = str(SCENARIOS / "paper-llama7b-generate.yaml")


def test_an_objective_the_planners_do_not_read_is_said(cli):
    """planner.objective is hpipe's, and without new tokens every objective is the latency:
    the baselines' tables were the same at latency, tpot and ttft, with no word."""
    r = cli("simulate", GEN, "--planner", "gpipe,terapipe,hpipe", "--set", "planner.objective=tpot", "-q")
    err = " ".join(r.stderr.split())
    assert r.returncode == 0 and "planner.objective = tpot is hpipe's; gpipe, terapipe plan as" in err, err
    r = cli("sweep", GEN, "--planner", "gpipe", "--set", "planner.objective=latency,tpot", "-q")
    err = " ".join(r.stderr.split())
    assert r.returncode == 0 and "planner.objective = latency,tpot is hpipe's; gpipe plans as" in err, err
    r = cli("plan", PAPER, "--set", "planner.objective=ttft", "-q")
    err = " ".join(r.stderr.split())
    assert r.returncode == 0 and "generates no tokens" in err and "ranks plans by latency" in err, err
    for quiet in (cli("simulate", GEN, "--planner", "hpipe", "--set", "planner.objective=tpot", "-q"),
                  cli("plan", PAPER, "-q")):  # hpipe alone on a generating scenario, or the default: nothing
        assert quiet.returncode == 0 and "planner.objective" not in quiet.stderr, quiet.stderr


def test_a_network_no_transfer_crosses_is_said(cli):
    """A sweep over cluster.network on one host (or where every pair has its own link) read
    the same latency at every value, with no word."""
    local = str(SCENARIOS / "local-cpu.yaml")
    r = cli("sweep", local, "--set", "costmodel=roofline", "--set", "cluster.network.bandwidth_gbps=1,10", "-q")
    err = " ".join(r.stderr.split())
    assert r.returncode == 0 and ("--set cluster.network.bandwidth_gbps=1,10: the scenario has one host, so no "
                                  "transfer crosses cluster.network") in err, err
    hetero = str(SCENARIOS / "local-cpu-hetero.yaml")
    linked = "cluster.links=[{between: [fast, slow], bandwidth_gbps: 0.1, latency_us: 200}]"
    r = cli("simulate", hetero, "--set", "costmodel=roofline", "--set", linked,
            "--set", "cluster.network.bandwidth_gbps=5", "-q")
    err = " ".join(r.stderr.split())
    assert r.returncode == 0 and "every pair of hosts has its own entry in cluster.links" in err, err
    r = cli("simulate", hetero, "--set", "costmodel=roofline", "--set", "cluster.network.bandwidth_gbps=5", "-q")
    assert r.returncode == 0 and "cluster.network" not in r.stderr, r.stderr  # the two hosts cross it


@pytest.mark.parametrize("assignment", ["planner.kind=gpipe", "planner.micro_batches=2", "planner.objective=tpot",
                                        "planner={kind: gpipe}"])
def test_a_planner_setting_beside_a_given_plan_is_refused(cli, tmp_path, assignment):
    """With --plan no planner runs: --planner beside it was exit 2, a --set of the planner was
    dropped without a word."""
    plan = tmp_path / "p.json"
    assert cli("plan", PAPER, "-o", str(plan), "-q").returncode == 0
    r = cli("simulate", PAPER, "--plan", str(plan), "--set", assignment, "-q")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and f"--set {assignment} changes nothing" in err and "--plan gives the plan" in err, err
    r = cli("simulate", PAPER, "--plan", str(plan), "--set", "planner.memory_reserve_gb=1", "-q")
    assert r.returncode == 0, r.stderr  # a plan is still checked against the memory left free


def test_validate_refuses_random_plan_options_that_draw_nothing(cli):
    local = str(SCENARIOS / "local-cpu.yaml")
    r = cli("validate", local, "--planners", "hpipe", "--random", "0", "--decode-random", "3")
    assert r.returncode == 2 and "no decode cases" in r.stderr and "--decode-random" in r.stderr, r.stderr
    r = cli("validate", local, "--planners", "hpipe", "--random", "0", "--seed", "5")
    assert r.returncode == 2 and "no random plan is drawn" in r.stderr, r.stderr


def test_a_given_tensor_parallel_group_the_planners_would_not_form_is_said(cli, tmp_path):
    """A hand-written TP stage across hosts, or of unlike devices, runs (README), but a
    mistyped device id makes one: simulate took an RTX 3090 + P100 group over 1 Gbit/s
    without a word."""
    def plan(devices):
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps({"stages": [{"devices": devices, "units": [0, 66]}], "slices": [2048],
                                    "micro_batches": 1}))
        return str(path)

    r = cli("simulate", PAPER, "--plan", plan(["host-b/RTX3090-0", "host-a/P100-0"]), "-q")
    err = " ".join(r.stderr.split())
    assert r.returncode == 0 and "stage 0's tensor-parallel group spans hosts host-b, host-a" in err, err
    r = cli("simulate", PAPER, "--plan", plan(["host-a/P100-0", "host-a/P100-1"]), "-q")
    assert r.returncode == 0 and "tensor-parallel group" not in r.stderr, r.stderr
    # megatron's groups are a host's devices, alike or not (the review: its plans were noted)
    four = str(SCENARIOS / "local-cpu-4dev.yaml")
    made = tmp_path / "megatron.json"
    assert cli("plan", four, "--planner", "megatron", "-o", str(made), "-q", "--set", "costmodel=roofline").returncode == 0
    r = cli("simulate", four, "--plan", str(made), "-q", "--set", "costmodel=roofline")
    assert r.returncode == 0 and "tensor-parallel group" not in r.stderr, r.stderr
    data = json.loads(made.read_text())
    made.write_text(json.dumps({**data, "planner": "hand"}))  # the same groups written by hand: said
    r = cli("simulate", four, "--plan", str(made), "-q", "--set", "costmodel=roofline")
    err = " ".join(r.stderr.split())
    assert r.returncode == 0 and "stage 0's tensor-parallel group mixes devices" in err, err


def test_a_plan_file_names_the_cost_model_its_figures_are_from(cli, tmp_path):
    """costmodel auto may plan on the roofline today and a profile tomorrow: the Plan file had
    no word of which (the Result JSON has it), and with -q nothing was said at all."""
    out = tmp_path / "p.json"
    r = cli("plan", PAPER, "-o", str(out), "-q", "--set", "costmodel=roofline")
    assert r.returncode == 0, r.stderr
    predicted = json.loads(out.read_text())["predicted"]
    assert predicted["cost_model"]["kind"] == "roofline" and predicted["latency_s"] > 0
    r = cli("simulate", PAPER, "--plan", str(out), "--json", "-", "-q")  # read back: as any plan
    assert r.returncode == 0 and json.loads(r.stdout)["results"][0]["latency_s"] == pytest.approx(
        predicted["latency_s"]), r.stderr
