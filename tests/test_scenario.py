"""Scenario language: every malformed input is refused with the file, the field and the problem."""

import copy

import pytest
import yaml

from hpipe.errors import InputError
from hpipe.scenario import load_scenario, parse_scenario

from conftest import SCENARIOS

BASE = {
    "name": "t",
    "model": "tiny-llama",
    "workload": {"seq_len": 64, "batch_size": 2},
    "cluster": {
        "hosts": [
            {"name": "a", "devices": [{"type": "P100", "count": 2}]},
            {"name": "b", "devices": [{"name": "mygpu", "peak_tflops": 10, "memory_gb": 8,
                                       "memory_bandwidth_gbps": 300, "power_w": 150}]},
        ],
        "network": {"bandwidth_gbps": 1, "latency_us": 100},
    },
    "planner": {"token_granularity": 16},
}


def with_change(path, value):
    d = copy.deepcopy(BASE)
    node = d
    for p in path[:-1]:
        node = node[p]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return d


DELETE = object()


def test_base_is_valid_and_ids_are_stable():
    setup = parse_scenario(BASE, "s.yaml").resolve()
    assert setup.cluster.device_ids == ["a/P100-0", "a/P100-1", "b/mygpu-0"]
    assert setup.n_units == 10


@pytest.mark.parametrize("path,value,field,problem", [
    (("cluster", "hosts", 0, "devices", 0, "type"), "P1000", "cluster.hosts[0].devices[0].type", "did you mean P100"),
    # a name held whole in catalog names comes first: difflib alone offered A10, V100, P100
    (("cluster", "hosts", 0, "devices", 0, "type"), "A100", "cluster.hosts[0].devices[0].type",
     "did you mean A100-40GB, A100-80GB"),
    (("cluster", "hosts", 0, "devices", 0, "type"), "3090", "cluster.hosts[0].devices[0].type", "did you mean RTX3090"),
    (("model",), "llama-7", "model", "did you mean llama-7b"),
    (("workload", "seq_len"), 0, "workload.seq_len", "greater than 0"),
    (("workload", "seq_len"), 100, "workload.seq_len", "not a multiple of planner.token_granularity"),
    (("workload", "batch_size"), "six", "workload.batch_size", "integer"),
    (("workload", "sequence"), 5, "workload.sequence", "unknown key"),
    (("workload",), DELETE, "workload", "missing"),
    (("cluster", "hosts", 1, "name"), "a", "cluster.hosts[1].name", "duplicate host name 'a'"),
    (("cluster", "network", "bandwidth_gbps"), -1, "cluster.network.bandwidth_gbps", "greater than 0"),
    (("cluster", "network"), DELETE, "cluster.network", "no link"),
    (("cluster", "links"), [{"between": ["a", "c"], "bandwidth_gbps": 1}], "cluster.links[0].between", "unknown host 'c'"),
    (("cluster", "hosts", 0, "devices"), [], "cluster.hosts[0].devices", "at least 1"),
    # a count of a million once sent the cluster graph into quadratically many edges
    (("cluster", "hosts", 0, "devices", 0, "count"), 10**6, "cluster.hosts[0].devices[0].count", "less than or equal to 256"),
    (("cluster", "hosts"), [{"name": f"h{i}", "devices": [{"type": "P100", "count": 200}]} for i in range(6)],
     "cluster.hosts", "1200 devices in all; hpipe plans for at most 1024"),
    (("cluster", "hosts", 1, "devices", 0, "memory_gb"), DELETE, "cluster.hosts[1].devices[0].memory_gb", "needs memory_gb"),
    (("cluster", "hosts", 0, "devices", 0, "runtime"), {"device": "gpu0"}, "cluster.hosts[0].devices[0].runtime.device", "'cpu', 'cuda'"),
    (("planner", "kind"), "hpip", "planner.kind", "did you mean hpipe"),
    (("planner", "micro_batches"), 3, "planner.micro_batches", "batch of 2"),
    (("costmodel",), "rooflin", "costmodel.kind", "did you mean roofline"),
    (("costmodel",), {"kind": "roofline", "compute_efficency": 0.5}, "costmodel.compute_efficency", "unknown key"),
    (("costmodel",), {"kind": "roofline", "version": 1, "compute_efficiency": 2}, "costmodel.compute_efficiency", "less than or equal to 1"),
    (("model",), {"family": "llama", "n_layers": 2}, "model.d_model", "missing"),
    (("dtype",), "int8", "dtype", "float16"),
    (("compression",), {"allow": ["int8", "fp8", "int8"]}, "compression.allow", "int8 is listed twice"),
    (("cluster", "hosts", 0, "name"), True, "cluster.hosts[0].name", "YAML reads yes, no, on, off"),
    # a boolean where a number belongs (pydantic read true as 1; YAML reads yes/on as true)
    (("workload", "batch_size"), True, "workload.batch_size", "expected a number, got true"),
    (("cluster", "network", "bandwidth_gbps"), True, "cluster.network.bandwidth_gbps", "expected a number"),
    (("cluster", "hosts", 0, "devices", 0, "count"), True, "cluster.hosts[0].devices[0].count", "expected a number"),
    (("cluster", "hosts", 1, "devices", 0, "peak_tflops"), False, "cluster.hosts[1].devices[0].peak_tflops",
     "got false"),
    (("costmodel",), {"kind": "roofline", "link_efficiency": True}, "costmodel.link_efficiency", "expected a number"),
    (("costmodel",), {"kind": "roofline", "version": True}, "costmodel.version", "expected a number"),  # ran v1
    # auto's settings, both checked whichever it chooses, named where they sit
    (("costmodel",), {"kind": "auto", "roofline": {"version": True}}, "costmodel.roofline.version", "a boolean"),
    (("costmodel",), {"kind": "auto", "fitted": {"basis": "walll"}}, "costmodel.fitted.basis", "'wall' or 'cpu'"),
    (("costmodel",), {"kind": "auto", "fitted": {"profile": "x.json"}}, "costmodel.fitted.profile",
     "use kind: fitted"),
    (("costmodel",), {"kind": "roofline", "version": 1, "kernels_per_unit": {"attn": True}},
     "costmodel.kernels_per_unit.attn", "expected a number"),
    (("cluster", "hosts", 0, "devices", 0, "runtime"), {"device": "cpu", "cores": [0, True]},
     "cluster.hosts[0].devices[0].runtime.cores[1]", "expected a number, got true"),
    (("model",), {"family": "llama", "n_layers": True, "d_model": 64, "n_heads": 4, "d_ff": 128, "vocab_size": 100},
     "model.n_layers", "must be an integer, got True"),  # refused already
    # the name heads every table: `--set name=` had headed them ": hpipe plan ..."
    (("name",), "", "name", "not empty, got ''"),
    (("name",), "a\nb", "name", "one line of text"),
    # one custom name, two kinds of device: b/mygpu-1 would have been another device under mygpu's label
    (("cluster", "hosts", 1, "devices"), [{"name": "mygpu", "peak_tflops": 10, "memory_gb": 8, "memory_bandwidth_gbps": 300,
                                           "power_w": 150},
                                          {"name": "mygpu", "peak_tflops": 20, "memory_gb": 8, "memory_bandwidth_gbps": 300,
                                           "power_w": 150}],
     "cluster.hosts[1].devices[1]", "is labelled 'mygpu' as devices[0] is, with another peak_tflops (10.0 there, 20.0 here)"),
    # a catalog type and a custom name that share a label
    (("cluster", "hosts", 0, "devices"), [{"type": "P100"}, {"name": "P100", "peak_tflops": 5, "memory_gb": 8,
                                                             "memory_bandwidth_gbps": 300, "power_w": 150}],
     "cluster.hosts[0].devices[1]", "is labelled 'P100' as devices[0] is"),
])
def test_bad_scenarios_name_field_and_problem(path, value, field, problem):
    data = with_change(path, value)
    with pytest.raises(InputError) as e:
        parse_scenario(data, "bad.yaml").resolve()
    msg = str(e.value)
    assert msg.startswith("bad.yaml: field '" + field), msg
    assert problem in msg, msg


def test_one_label_twice_with_the_same_figures_written_or_left_out_is_one_kind_of_device():
    """Two entries of one label that agree once defaults are filled in (idle power left out is
    10% of power_w) are one kind: the label check compares resolved figures, not what is written."""
    a = {"name": "g", "peak_tflops": 10, "memory_gb": 8, "memory_bandwidth_gbps": 300, "power_w": 150}
    data = with_change(("cluster", "hosts", 1, "devices"), [a, {**a, "idle_power_w": 15}])
    ids = parse_scenario(data).resolve().cluster.device_ids
    assert "b/g-0" in ids and "b/g-1" in ids

def test_gpt_seq_len_past_positions():
    data = with_change(("model",), "tiny-gpt")
    data["workload"]["seq_len"] = 4096
    with pytest.raises(InputError, match="learned positions"):
        parse_scenario(data, "x.yaml")


def test_gpt_generation_may_use_every_learned_position_and_no_more():
    """A GPT run uses seq_len + output_tokens - 1 positions (the last new token is not fed
    back): tiny-gpt's 2048 hold a 2000-token prompt and 49 new tokens exactly, and one more
    is refused at workload.output_tokens.  A check of ``used >= max_seq_len`` refused the
    exact fit and survived (audit S3)."""
    data = with_change(("model",), "tiny-gpt")
    data["workload"].update(seq_len=2000, output_tokens=49)
    assert parse_scenario(data, "x.yaml").resolve().scenario.workload.output_tokens == 49
    data["workload"]["output_tokens"] = 50
    with pytest.raises(InputError) as e:
        parse_scenario(data, "x.yaml")
    msg = str(e.value)
    assert msg.startswith("x.yaml: field 'workload.output_tokens'"), msg
    assert "use 2049 positions" in msg and "learned positions (2048)" in msg, msg


def test_as_many_micro_batches_as_sequences_is_allowed():
    """``planner.micro_batches`` may equal the batch (one sequence per micro-batch); only more
    is refused.  A ``>=`` that refused the equal count survived, the table above checking 3
    for a batch of 2 only (audit S2)."""
    data = copy.deepcopy(BASE)
    data["workload"]["batch_size"] = 4
    data["planner"]["micro_batches"] = 4
    assert parse_scenario(data, "s.yaml").resolve().scenario.planner.micro_batches == 4
    data["planner"]["micro_batches"] = 5
    with pytest.raises(InputError) as e:
        parse_scenario(data, "s.yaml")
    assert str(e.value).startswith("s.yaml: field 'planner.micro_batches'") and "batch of 4" in str(e.value)


def test_a_link_given_twice_in_either_order_is_refused():
    """``links`` names each pair of hosts once: [a, b] then [b, a] is the same link twice, and
    which of the two would apply is not said, so the second is refused at its field.  With
    the check removed, such a scenario loaded with two figures for one link (audit S5)."""
    data = with_change(("cluster", "links"), [{"between": ["a", "b"], "bandwidth_gbps": 1},
                                              {"between": ["b", "a"], "bandwidth_gbps": 10}])
    with pytest.raises(InputError) as e:
        parse_scenario(data, "s.yaml")
    msg = str(e.value)
    assert msg.startswith("s.yaml: field 'cluster.links[1].between'"), msg
    assert "the link between 'b' and 'a' is given twice" in msg, msg


def test_yaml_syntax_error_names_line(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: x\nmodel: [tiny-llama\nworkload: {}\n")
    with pytest.raises(InputError, match=r"s\.yaml: YAML syntax error at line \d+"):
        load_scenario(p)


def test_a_key_given_twice_is_refused_at_any_depth(tmp_path):
    """YAML keeps the last of two equal keys silently; hpipe names both places instead.  A
    merge key's values may still be overridden (not a duplicate)."""
    base = (SCENARIOS / "local-cpu.yaml").read_text()
    p = tmp_path / "s.yaml"
    p.write_text(base + "workload:\n  seq_len: 1024\n")
    first = 1 + next(i for i, ln in enumerate(base.splitlines()) if ln.startswith("workload:"))
    last = len(base.splitlines()) + 1
    with pytest.raises(InputError, match=rf"s\.yaml: line {last}, column 1: 'workload' is given again "
                                         rf"\(first at line {first}\)"):
        load_scenario(p)
    p.write_text(base.replace("workload:", "workload:\n  batch_size: 1\n  batch_size: 2", 1))
    with pytest.raises(InputError, match="'batch_size' is given again"):
        load_scenario(p)
    from hpipe.io import UniqueKeyLoader

    merged = yaml.load("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n", Loader=UniqueKeyLoader)
    assert merged["other"] == {"x": 1, "y": 3}
    # an anchored mapping that overrides a merged key, itself merged further up: PyYAML expands
    # the merge in place before the anchor's own mapping is built; still not a duplicate
    nested = ("base: &base {dtype: float32, threads: 1}\nhosts:\n  - devices:\n      - &dev\n"
              "        <<: *base\n        threads: 2\nreuse:\n  <<: *dev\n")
    assert yaml.load(nested, Loader=UniqueKeyLoader) == yaml.safe_load(nested)


def test_not_a_mapping_and_missing_file(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="a scenario is a mapping"):
        load_scenario(p)
    with pytest.raises(InputError, match="no such file"):
        load_scenario(tmp_path / "nope.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(InputError, match="YAML"):
        load_scenario(p)


def test_roundtrip_of_ready_scenarios():
    from conftest import SCENARIOS

    files = sorted(SCENARIOS.glob("*.yaml"))
    assert files
    for f in files:
        s = load_scenario(f)
        assert yaml.safe_load(f.read_text())["name"] == s.name
        s.resolve()


@pytest.mark.parametrize("key,value,problem", [
    ("cluster.hosts[0].devices[0].peak_tflops", ".inf", "finite"),  # was simulated at 0 s
    ("cluster.network.bandwidth_gbps", ".nan", "finite"),
    ("cluster.hosts[0].devices[0].idle_power_w", "100", "more than power_w"),
    ("cluster.hosts[0].devices[0].runtime.cores", "[]", "at least 1"),
    ("cluster.hosts[0].devices[0].runtime.cores", "[-1]", "greater than or equal to 0"),
    ("cluster.hosts[0].devices[0].runtime.cpu_quota", "2", "more than the worker's 1 thread")])
def test_values_a_device_cannot_have_are_refused_at_their_field(key, value, problem):
    with pytest.raises(InputError, match=problem) as e:
        load_scenario(SCENARIOS / "local-cpu.yaml", overrides=[f"{key}={value}"])
    assert e.value.field.startswith(key), e.value.field
    # the same entry within bounds is fine
    load_scenario(SCENARIOS / "local-cpu.yaml", overrides=["cluster.hosts[0].devices[0].idle_power_w=15",
                                                           "cluster.hosts[0].devices[0].runtime.cpu_quota=1"])
