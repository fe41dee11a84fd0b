"""Pipelined execution over CPU processes (gloo on loopback) equals one process.

Every plan shape the planners produce runs here with a tiny model: uneven
slices, several micro-batches, tensor-parallel stages (first, middle, last),
a single stage and a base-style plan.  The logits of every position must
equal a single-process float32 forward of the same inputs within 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from hpipe.runtime.launcher import execute, launch, make_ids, reference_logits, runtime_spec  # noqa: E402
from hpipe.scenario import PLANNER_NAMES  # noqa: E402

from runtime_helpers import TINY_GPT, llama_setup, plan, tiny_setup  # noqa: E402,F401

pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]
TOL = 1e-4
N = 6  # units of the tiny models: embed, 2 x (attn, mlp), head

SHAPES = {
    "uneven-slices": plan([([0], (0, 2)), ([1], (2, N))], [24, 16, 8]),
    "micro-batches": plan([([0], (0, 3)), ([1], (3, 4)), ([2], (4, N))], [32, 16], micro_batches=2),
    "tp-middle": plan([([0], (0, 1)), ([1, 2], (1, 5)), ([3], (5, N))], [16, 16, 16]),
    "tp-ends": plan([([0, 1], (0, 3)), ([2, 3], (3, N))], [40, 8], micro_batches=3),
    # the peer of a TP stage skips the head, so here it has no unit at all (leader-only work)
    "tp-head-only": plan([([0], (0, N - 1)), ([1, 2], (N - 1, N))], [24, 24], micro_batches=2),
    "single-stage": plan([([0], (0, N))], [8, 24, 16]),
    "base": plan([([0], (0, 4)), ([1], (4, N))], [48]),
}


def _check_all_positions(setup, p, ids=None):
    ids = make_ids(setup) if ids is None else ids
    run = launch(setup, p, ids=ids, warmup=0, all_logits=True, timeout_s=20)
    ref = reference_logits(setup, ids, all_positions=True)
    assert run.all_logits.shape == ref.shape == (setup.batch_size, setup.seq_len, setup.model.vocab_size)
    assert np.abs(run.all_logits - ref).max() < TOL
    assert np.array_equal(run.logits, run.all_logits[:, -1])
    return run


@pytest.mark.parametrize("shape", list(SHAPES))
def test_plan_shape_matches_single_process(llama_setup, shape):
    p = SHAPES[shape].check(llama_setup)
    run = _check_all_positions(llama_setup, p)
    assert set(run.records) == set(range(len(p.devices)))
    # every worker says how much CPU it used, so the launcher can tell other processes' apart
    assert all(r["process_cpu_s"] > 0 for r in run.records.values())


def test_gpt_tensor_parallel_and_slices():
    setup = tiny_setup(TINY_GPT, batch_size=2)
    _check_all_positions(setup, plan([([0], (0, 2)), ([1, 2], (2, N))], [16, 24, 8], micro_batches=2).check(setup))


def test_execute_result_fields(llama_setup, monkeypatch, capsys):
    from hpipe.notes import not_emulated
    from hpipe.runtime import emulation, launcher, worker

    p = SHAPES["tp-middle"]
    # what the emulation left out reaches the Result and the note (here, on one host, nothing
    # did), and the workers' shared cores after it (4 workers: shared on a 2-core machine)
    monkeypatch.setattr(emulation.Emulation, "gaps", lambda self, setup: ["a gap, for the test"])
    monkeypatch.setattr(launcher, "shared_cores", lambda ids, places, usable, quota_cores=None: [f"{len(ids)} workers, for the test"])
    r = execute(llama_setup, p, check=True, quiet=True, warmup=1, timeout_s=20)
    assert r.not_emulated == ["a gap, for the test", f"{len(p.devices)} workers, for the test"]
    not_emulated(r)
    assert "not as the scenario describes: a gap, for the test" in capsys.readouterr().err
    assert r.max_abs_error is not None and r.max_abs_error < TOL
    ids = make_ids(llama_setup)
    assert r.next_token_ids == [int(t) for t in reference_logits(llama_setup, ids).argmax(-1)]
    assert r.latency_s > 0 and r.throughput_tokens_per_s == pytest.approx(3 * 48 / r.latency_s)
    assert set(r.peak_memory_mb) == set(p.devices) and all(v >= 0 for v in r.peak_memory_mb.values())
    if worker.library_rss_bytes():  # Linux: the weights here are under 1 MB; torch's own pages do not count (a
        # worker forked from the forkserver faults them in during the run: 60-80 MB of RssFile counted before)
        assert max(r.peak_memory_mb.values()) < 10, r.peak_memory_mb
    assert r.other_cpu_cores is not None and r.other_cpu_cores >= 0.0  # Linux: /proc/stat
    kinds = {(e.kind, e.device, e.dst) for e in r.events}
    # stage 0 -> the TP leader, the leader -> its peer, the leader -> stage 2
    assert ("transfer", "local/core-0", "local/core-1") in kinds
    assert ("transfer", "local/core-1", "local/core-2") in kinds
    assert ("transfer", "local/core-1", "local/core-3") in kinds
    assert any(k == "allreduce" for k, _, _ in kinds)
    computes = [e for e in r.events if e.kind == "compute"]
    assert len(computes) == len(p.devices) * len(p.slices)
    assert min(e.start_s for e in r.events) == 0.0
    # the pipeline order holds on the measured timeline: stage 1 starts an item after stage 0 ends it
    first = {(e.stage, e.slice): e for e in computes if e.device in ("local/core-0", "local/core-1")}
    for s in range(len(p.slices)):
        assert first[(1, s)].start_s >= first[(0, s)].end_s


def test_library_pages_are_set_apart_and_mapped_weights_are_not(tmp_path):
    """Peak memory sets apart the pages of shared libraries (torch's: a forked worker faults
    them in during its run), not every file page: safetensors weights are mapped from their
    file, and subtracting all of RssFile had dropped them from a device's memory."""
    import mmap

    from hpipe.runtime.here import proc_kib_bytes
    from hpipe.runtime.worker import library_rss_bytes

    if proc_kib_bytes("/proc/self/status", "RssFile") is None or not library_rss_bytes():
        pytest.skip("no RssFile or smaps here")
    assert library_rss_bytes() > 50e6  # libtorch_cpu alone is larger (torch is imported)
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\1" * (64 << 20))
    lib0, file0 = library_rss_bytes(), proc_kib_bytes("/proc/self/status", "RssFile")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert sum(m[i] for i in range(0, len(m), 4096)) == len(m) // 4096  # every page touched
        grown = proc_kib_bytes("/proc/self/status", "RssFile") - file0
        assert grown > 60e6 and abs(library_rss_bytes() - lib0) < 8e6, (grown, lib0)


@pytest.mark.timeout(300)
def test_peak_memory_counts_weights_mapped_from_safetensors(tmp_path):
    """A 54 MB LLaMA's safetensors weights, two stages: each device's measured peak holds its
    weights, as the memory model predicts (31.1 / 31.8 MB measured against 28.5 / 28.5
    predicted, AMD EPYC).  Subtracting every file page had read 4.3 / 3.6 MB: the weights
    stay mapped from their file."""
    transformers = pytest.importorskip("transformers")
    import torch

    from hpipe.runtime.worker import library_rss_bytes
    from hpipe.sim import simulate

    if not library_rss_bytes():
        pytest.skip("no smaps here: the peak is measured another way")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    model = {"family": "llama", "n_layers": 4, "d_model": 512, "n_heads": 8, "n_kv_heads": 8, "d_ff": 1376,
             "vocab_size": 1000, "max_seq_len": 128}
    setup = tiny_setup(model=model, weights=str(tmp_path), seq_len=32, batch_size=2)
    n = setup.n_units
    p = plan([([0], (0, n // 2)), ([1], (n // 2, n))], [16, 16]).check(setup)
    r = execute(setup, p, quiet=True, warmup=0, timeout_s=60)
    predicted = simulate(setup, p).peak_memory_mb
    for d, mb in r.peak_memory_mb.items():
        assert mb > 0.8 * predicted[d], (r.peak_memory_mb, predicted)


@pytest.mark.timeout(180)  # 18 s at a load of 4.5 on 2 cores; CI's loads have reached 11-14
def test_given_inputs_and_hf_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    setup = tiny_setup(weights=str(tmp_path), seq_len=32, batch_size=2)
    assert runtime_spec(setup).norm_eps == cfg.rms_norm_eps
    ids = np.random.default_rng(5).integers(0, 128, (2, 32))
    r = execute(setup, plan([([0], (0, 3)), ([1], (3, N))], [16, 8, 8]).check(setup), inputs=ids.tolist(),
                check=True, quiet=True, warmup=0, timeout_s=20)
    with torch.no_grad():
        hf = model(input_ids=torch.from_numpy(ids)).logits[:, -1]
    assert r.next_token_ids == hf.argmax(-1).tolist()
    assert r.max_abs_error < TOL


@pytest.mark.parametrize("planner", PLANNER_NAMES)
def test_every_planner_plan_runs(llama_setup, planner):
    planners = pytest.importorskip("hpipe.planners")
    from hpipe.errors import InfeasibleError

    try:
        p = planners.make_plan(llama_setup, planner)
    except InfeasibleError as e:
        pytest.skip(f"{planner}: {e}")
    _check_all_positions(llama_setup, p.check(llama_setup))


def test_cpu_quota_and_core_pinning():
    """A throttled, pinned worker still computes the right logits, and is left running
    (not SIGSTOPped) when the run ends."""
    import os

    core = next(iter(os.sched_getaffinity(0)))
    setup = tiny_setup(batch_size=2, seq_len=32)
    for d in setup.cluster.devices[:1]:  # the first device: half a CPU, pinned
        object.__setattr__(d, "placement", d.placement.model_copy(update={"cpu_quota": 0.5, "cores": [core]}))
    p = plan([([0], (0, 3)), ([1], (3, N))], [16, 16]).check(setup)
    run = launch(setup, p, ids=make_ids(setup), warmup=0, all_logits=True, timeout_s=20)
    assert np.abs(run.all_logits - reference_logits(setup, make_ids(setup), all_positions=True)).max() < TOL


def test_placement_errors_are_input_errors():
    import torch

    from hpipe.errors import InputError
    from hpipe.runtime.launcher import placements

    setup = tiny_setup()
    d = setup.cluster.devices[1]
    object.__setattr__(d, "placement", d.placement.model_copy(update={"device": "cuda:7"}))
    p = plan([([0], (0, 3)), ([1], (3, N))], [48]).check(setup)
    if torch.cuda.device_count() < 8:
        with pytest.raises(InputError, match=r"field 'cluster\.hosts\[0\]\.devices\[\d\]\.runtime\.device': "
                                             r"local/core-1 runs on cuda:7, but this machine has"):
            placements(setup, p.devices)
    object.__setattr__(d, "placement", d.placement.model_copy(update={"device": "cpu", "cores": [4096]}))
    with pytest.raises(InputError, match=r"runtime\.cores': local/core-1: cores \[4096\] are not available here"):
        placements(setup, p.devices)


def test_placement_errors_name_the_entry_when_two_entries_share_a_name():
    """Two entries named c on one host make a/c-0 and a/c-1; the second's error names
    cluster.hosts[0].devices[1] (it raised KeyError: 'a/c-1')."""
    from hpipe.errors import InputError
    from hpipe.runtime.here import entry_path
    from hpipe.runtime.launcher import placements
    from hpipe.scenario import parse_scenario

    dev = {"name": "c", "peak_tflops": 0.06, "memory_gb": 4, "memory_bandwidth_gbps": 10, "power_w": 15}
    data = {"name": "dup", "model": "tiny-llama", "workload": {"seq_len": 32, "batch_size": 2},
            "cluster": {"hosts": [{"name": "a", "devices": [{**dev, "runtime": {"device": "cpu"}},
                                                            {**dev, "runtime": {"device": "cpu", "cores": [4096]}}]}]},
            "planner": {"token_granularity": 16}}
    setup = parse_scenario(data, "dup.yaml").resolve()
    assert [entry_path(setup, d) for d in ("a/c-0", "a/c-1")] == ["cluster.hosts[0].devices[0]",
                                                                 "cluster.hosts[0].devices[1]"]
    with pytest.raises(InputError, match=r"dup.yaml: field 'cluster\.hosts\[0\]\.devices\[1\]\.runtime\.cores': "
                                         r"a/c-1: cores \[4096\]"):
        placements(setup, ["a/c-0", "a/c-1"])


def test_weights_that_do_not_match_the_scenario(tmp_path):
    transformers = pytest.importorskip("transformers")
    from hpipe.errors import InputError

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(InputError, match="config.json has d_ff = 96 but the scenario's model"):
        runtime_spec(tiny_setup(weights=str(tmp_path)))
