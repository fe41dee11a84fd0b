"""Generation over the pipeline equals transformers' own ``generate``.

Tiny LLaMA and GPT-2 models are built and saved by transformers at test time
(float32); a batch of three different prompts makes 32 new tokens each.  The
pipelined greedy ids must equal ``generate(do_sample=False)`` and a plain
uncached loop (whole model over the whole text every step) for every
planner's plan and for hand-made plans with tensor-parallel stages, prefill
micro-batches and several decode groups.  Seeded sampling repeats run after
run and across plans; an EOS id stops a sequence and, once all its sequences
stopped, its group.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hpipe.errors import InfeasibleError, InputError  # noqa: E402
from hpipe.runtime.generation import reference_generate  # noqa: E402
from hpipe.runtime.launcher import execute, runtime_spec  # noqa: E402
from hpipe.runtime.sampling import SamplingConfig  # noqa: E402
from hpipe.runtime.weights import weight_source  # noqa: E402
from hpipe.scenario import PLANNER_NAMES  # noqa: E402

from runtime_helpers import TINY_GPT, plan, save_hf_gpt2, save_hf_llama, tiny_setup  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]
N = 6  # units: embed, 2 x (attn, mlp), head
SEQ, BATCH, NEW = 16, 3, 32
PROMPTS = np.random.default_rng(11).integers(0, 128, (BATCH, SEQ))  # three different prompts

HAND = {
    # a tensor-parallel middle stage, two decode groups
    "tp-middle": plan([([0], (0, 1)), ([1, 2], (1, 5)), ([3], (5, N))], [8, 8], decode_micro_batches=2),
    # tensor-parallel first and last stages, prefill micro-batches that cut across the decode groups
    "tp-ends": plan([([0, 1], (0, 3)), ([2, 3], (3, N))], [8, 8], micro_batches=2, decode_micro_batches=3),
    # a TP last stage of the head alone: its peer has no unit to run (only the leader's logits are read)
    "tp-head-only": plan([([0], (0, N - 1)), ([1, 2], (N - 1, N))], [8, 8], decode_micro_batches=2),
    # two stages, one decode group (nothing else in flight)
    "one-group": plan([([0], (0, 2)), ([1], (2, N))], [16], micro_batches=3, decode_micro_batches=1),
    # no decode groups given: each prefill micro-batch stays a group (Plan.decode_groups)
    "default-groups": plan([([0], (0, 2)), ([1], (2, N))], [8, 8], micro_batches=3),
}


def _hf_generate(model, ids, new_tokens, eos=None):
    x = torch.from_numpy(ids)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=0, eos_token_id=eos, pad_token_id=0)
    rows = out[:, ids.shape[1]:].tolist()
    if eos is not None:  # transformers pads a stopped sequence to the longest; cut after its EOS
        rows = [r[:r.index(eos) + 1] if eos in r else r for r in rows]
    return rows


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-llama")
    model = save_hf_llama(folder)
    setup = tiny_setup(seq_len=SEQ, batch_size=BATCH, output_tokens=NEW, weights=str(folder))
    expect = _hf_generate(model, PROMPTS, NEW)
    assert all(len(r) == NEW for r in expect) and len({tuple(r) for r in expect}) == BATCH
    assert min(len(set(r)) for r in expect) > 8  # varied output: positions and cache entries matter
    return folder, model, setup, expect


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-gpt2")
    model = save_hf_gpt2(folder)
    setup = tiny_setup(TINY_GPT, seq_len=SEQ, batch_size=BATCH, output_tokens=NEW, weights=str(folder))
    return folder, model, setup, _hf_generate(model, PROMPTS, NEW)


def _run(setup, p, **kw):
    return execute(setup, p.check(setup), inputs=PROMPTS.tolist(), quiet=True, warmup=0, timeout_s=30, **kw)


def _check_decode_timeline(r, p, new_tokens=NEW):
    """The measured result carries the decode figures and a decode timeline of the plan's shape."""
    groups = p.decode_groups(BATCH)
    steps = new_tokens - 1
    dec = [e for e in r.events if e.phase == "decode"]
    for d in p.devices:  # every device takes every group's every step, once
        got = sorted((e.micro_batch, e.slice) for e in dec if e.kind == "compute" and e.device == d)
        assert got == [(g, t) for g in range(groups) for t in range(steps)], d
    if len(p.stages) > 1:  # the feedback hop: the last stage's ids back to stage 0, one per group and step
        first, last = p.stages[0].devices[0], p.stages[-1].devices[0]
        hops = {(e.micro_batch, e.slice) for e in dec if e.kind == "transfer" and e.device == last and e.dst == first}
        assert hops == {(g, t) for g in range(groups) for t in range(new_tokens - 1)}
    assert 0 < r.ttft_s < r.latency_s and 0 < r.tpot_s <= r.tpot_p90_s
    assert r.output_tokens_per_s == pytest.approx(BATCH * new_tokens / r.latency_s)
    assert r.latency_s == pytest.approx(max(e.end_s for e in r.events))  # end to end
    assert r.plan.decode_micro_batches == p.decode_groups(BATCH)  # recorded as the simulator records it


def test_uncached_reference_loop_equals_transformers(llama, gpt2):
    for folder, _, setup, expect in (llama, gpt2):
        spec = runtime_spec(setup)
        ids, _ = reference_generate(spec, weight_source(spec, str(folder)), PROMPTS, NEW)
        assert ids == expect


@pytest.mark.parametrize("planner", PLANNER_NAMES)
def test_every_planner_generates_what_transformers_does(llama, planner):
    from hpipe.planners import make_plan

    _, _, setup, expect = llama
    try:
        p = make_plan(setup, planner)
    except InfeasibleError as e:
        pytest.skip(f"{planner}: {e}")
    r = _run(setup, p)
    assert r.generated_ids == expect
    _check_decode_timeline(r, p)


@pytest.mark.parametrize("shape", list(HAND))
def test_tensor_parallel_and_micro_batched_plans_generate_what_transformers_does(llama, shape):
    _, _, setup, expect = llama
    r = _run(setup, HAND[shape])
    assert r.generated_ids == expect
    _check_decode_timeline(r, HAND[shape])


@pytest.mark.parametrize("shape", ["tp-middle", "tp-ends"])
def test_gpt2_generates_what_transformers_does(gpt2, shape):
    _, _, setup, expect = gpt2
    r = _run(setup, HAND[shape])
    assert r.generated_ids == expect


def test_gpt2_fills_its_learned_positions_and_no_more(gpt2):
    """16 prompt + 113 new tokens compute positions 0..127, all of the model's 128 (the last
    new token is never fed back): allowed, and what transformers makes; one more is refused."""
    folder, model, _, _ = gpt2
    new = 128 - SEQ + 1
    setup = tiny_setup(TINY_GPT, seq_len=SEQ, batch_size=BATCH, output_tokens=new, weights=str(folder))
    r = _run(setup, HAND["tp-middle"])
    assert r.generated_ids == _hf_generate(model, PROMPTS, new)
    with pytest.raises(InputError, match="use 129 positions .* more than custom's learned positions"):
        tiny_setup(TINY_GPT, seq_len=SEQ, batch_size=BATCH, output_tokens=new + 1, weights=str(folder))
    # a scenario that claims more positions than the weights have: the weights' config.json decides
    claims = tiny_setup({**TINY_GPT, "max_seq_len": 2048}, seq_len=SEQ, batch_size=BATCH, output_tokens=new + 1,
                        weights=str(folder))
    with pytest.raises(InputError, match="use 129 positions .* more than the model's 128"):
        _run(claims, HAND["tp-middle"])


def test_seeded_sampling_repeats_across_runs_and_plans(llama):
    folder, _, _, greedy = llama
    sampling = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 5}
    setup = tiny_setup(seq_len=SEQ, batch_size=BATCH, output_tokens=NEW, weights=str(folder), sampling=sampling)
    a = _run(setup, HAND["tp-middle"]).generated_ids
    b = _run(setup, HAND["one-group"]).generated_ids
    assert a == b and a != greedy
    # each sequence draws from its own generator: the one-process loop with the same sampler agrees
    spec = runtime_spec(setup)
    ref, _ = reference_generate(spec, weight_source(spec, str(folder)), PROMPTS, NEW,
                                sampling=SamplingConfig.of(setup.sampling))
    assert ref == a
    other = SamplingConfig(**{**sampling, "seed": 6})
    assert reference_generate(spec, weight_source(spec, str(folder)), PROMPTS, NEW, sampling=other)[0] != a


def test_eos_stops_a_sequence_and_then_its_group(llama, tmp_path):
    import shutil

    folder, model, _, expect = llama
    eos = expect[0][5]  # sequence 0 makes this id at its 6th token
    assert eos not in expect[0][:5]
    shutil.copytree(folder, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "generation_config.json").read_text())  # what generate reads
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({**cfg, "eos_token_id": eos}))
    setup = tiny_setup(seq_len=SEQ, batch_size=BATCH, output_tokens=NEW, weights=str(tmp_path / "m"))
    p = plan([([0], (0, 3)), ([1], (3, N))], [16], decode_micro_batches=3)  # one sequence per group
    r = _run(setup, p)
    want = _hf_generate(model, PROMPTS, NEW, eos=eos)
    assert r.generated_ids == want and r.generated_ids[0] == expect[0][:6]
    # group 0 (sequence 0) took 5 decode steps and stopped; the others ran their own course
    steps = [len([e for e in r.events if e.phase == "decode" and e.kind == "compute" and e.micro_batch == g
                  and e.device == "local/core-0"]) for g in range(3)]
    assert steps == [len(w) - 1 for w in want]
    # one group of all three: sequence 0 stops making tokens, the group runs on for the others
    r = _run(setup, p.model_copy(update={"decode_micro_batches": 1}))
    assert r.generated_ids == want
    assert len([e for e in r.events if e.phase == "decode" and e.kind == "compute"
                and e.device == "local/core-0"]) == max(len(w) for w in want) - 1



@pytest.mark.parametrize("config_eos,generation_config,expect", [
    (7, None, (7,)),  # no generation_config.json: config.json's
    (7, {"eos_token_id": [9, 11]}, (9, 11)),  # Llama-3's layout: generation_config.json lists more, and wins
    (7, {"pad_token_id": 0}, ()),  # generation_config.json without one: no EOS, whatever config.json says
    (7, {"_from_model_config": True, "pad_token_id": 0}, ()),  # as save_pretrained writes it
    (None, {"eos_token_id": 9}, (9,)),
])
def test_eos_ids_are_the_ones_transformers_generate_reads(llama, tmp_path, config_eos, generation_config, expect):
    """hpipe had read config.json first: a folder whose generation_config.json lists [9, 11]
    stopped only at 7, where transformers stopped at 9 or 11."""
    import shutil

    import transformers

    from hpipe.runtime.generation import eos_ids

    folder = tmp_path / "m"
    shutil.copytree(llama[0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "eos_token_id": config_eos}))
    (folder / "generation_config.json").unlink()
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    theirs = transformers.LlamaForCausalLM.from_pretrained(folder).generation_config.eos_token_id
    assert (() if theirs is None else tuple(theirs) if isinstance(theirs, list) else (theirs,)) == expect
    assert eos_ids(str(folder)) == expect

@pytest.mark.parametrize("fault", [("kill", 1), ("hang", 2)])
def test_a_worker_failing_mid_decode_stops_the_run(fault):
    """Decode receives are bounded too: a stage killed or hung during decode stops the run,
    naming it, and leaves no worker behind."""
    import time

    from hpipe.errors import WorkerError

    setup = tiny_setup(seq_len=SEQ, batch_size=BATCH, output_tokens=NEW)
    p = plan([([0], (0, 2)), ([1], (2, 4)), ([2], (4, N))], [8, 8], decode_micro_batches=3).check(setup)
    action, role = fault
    n_prefill = len(p.slices)  # one prefill micro-batch
    pids = []
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as err:
        execute(setup, p, quiet=True, warmup=0, timeout_s=3, faults={role: (action, n_prefill + 7)},
                on_spawn=pids.extend)
    assert time.monotonic() - t0 < 30
    assert f"stage {role} (local/core-{role})" in str(err.value), str(err.value)
    deadline = time.monotonic() + 3
    while any(_alive(q) for q in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [q for q in pids if _alive(q)], "worker processes left behind"


@pytest.mark.parametrize("shape", ["tp-ends", "three-stages"])
def test_a_prefill_longer_than_the_timeout_still_generates(llama, shape):
    """Each prefill message meets the timeout, the prefill as a whole does not: the driver's
    first feedback (and a TP peer's first ids, a middle stage's first decode step) waits for
    the rest of the prefill downstream.  Those first receives had the per-message timeout, so
    such a run failed, blaming a healthy stage; execute of the same plan passed."""
    _, _, setup, expect = llama
    p = {"tp-ends": HAND["tp-ends"],
         "three-stages": plan([([0], (0, 2)), ([1], (2, 4)), ([2], (4, N))], [8, 8], micro_batches=2,
                              decode_micro_batches=3)}[shape]
    last = p.stages[-1].devices[0]
    role = [d for s in p.stages for d in s.devices].index(last)
    timeout_s = 2.0  # the last stage's four prefill items take 1.2 s more each: 4.8 s in all
    r = execute(setup, p.check(setup), inputs=PROMPTS.tolist(), quiet=True, warmup=0, timeout_s=timeout_s,
                faults={role: ("slow", 0)})
    assert r.generated_ids == expect
    assert r.ttft_s > 2 * timeout_s  # the prefill did outlast the timeout


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_gpu_stages_generate_as_the_one_process_loop(llama):
    """A CPU stage and a GPU stage (gloo, ids and hidden states staged through host memory).
    Not yet run on a GPU: the machine that built it had none."""
    from runtime_helpers import CORE

    folder, _, _, expect = llama
    gpu = {"name": "gpu", "count": 1, "peak_tflops": 20, "memory_gb": 8, "memory_bandwidth_gbps": 500,
           "power_w": 250, "runtime": {"device": "cuda"}}
    setup = tiny_setup(seq_len=SEQ, batch_size=BATCH, output_tokens=NEW, weights=str(folder),
                       devices=[dict(CORE, count=2), gpu])
    for p in (plan([([0], (0, 2)), (["gpu-0"], (2, N))], [8, 8], decode_micro_batches=2),
              plan([(["gpu-0"], (0, 3)), ([1], (3, N))], [16], micro_batches=3)):
        assert _run(setup, p).generated_ids == expect


def test_a_pick_off_the_best_is_told_from_a_near_tie(llama):
    """generate --check parts a half-precision run from the float32 loop only where each
    pipelined pick, teacher-forced, is within the tolerance of the best logit."""
    from hpipe.runtime.generation import first_picks_off_the_best

    folder, _, setup, expect = llama
    spec = runtime_spec(setup)
    source = weight_source(spec, setup.weights, 0)
    prompt = PROMPTS[0].tolist()

    def first_off(picks, tol):
        return first_picks_off_the_best(spec, source, [prompt], [picks], tol)[0]

    assert first_off(expect[0], 1e-4) is None  # the loop's own picks
    wrong = list(expect[0])
    wrong[5] = (wrong[5] + 1) % 128  # another token at new token 5: the teacher-forced rest still checks
    i, short = first_off(wrong, 1e-4)
    assert i == 5 and short > 1e-4
    assert first_off(wrong, short * 1.01) is None or first_off(wrong, short * 1.01)[0] > 5
