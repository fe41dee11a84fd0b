"""The one-process reference of a compressed plan (``hpipe.runtime.codec_reference``), which the
accuracy benchmark measures with, generates exactly what the real pipelined runtime generates:
same ids, same prefill logits, for int8 and int4 plans on a tiny saved LLaMA (codec on every
prefill message, decode steps raw)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hpipe.runtime.codec_reference import CompressedRun, generate  # noqa: E402
from hpipe.runtime.codecs import HAS_FP8  # noqa: E402
from hpipe.runtime.generation import eos_ids, generation_config, reference_generate  # noqa: E402
from hpipe.runtime.launcher import launch, runtime_spec  # noqa: E402
from hpipe.runtime.model import build_units  # noqa: E402
from hpipe.runtime.weights import weight_source  # noqa: E402
from hpipe.scenario import parse_scenario  # noqa: E402

from runtime_helpers import plan, save_hf_llama, tiny_setup  # noqa: E402

pytestmark = [pytest.mark.timeout(150), pytest.mark.slow]
N = 6  # units: embed, 2 x (attn, mlp), head
SEQ, BATCH, NEW = 16, 3, 24
PROMPTS = np.random.default_rng(5).integers(0, 128, (BATCH, SEQ))

CASES = {
    # both boundaries int8, prefill micro-batches that cut across two decode groups
    "int8-both": (plan([([0], (0, 3)), ([1], (3, 4)), ([2], (4, N))], [8, 8], micro_batches=2,
                       decode_micro_batches=2), ["int8", "int8"]),
    # one lossy hop: int4 (coarse enough to change the ids) on the first boundary only
    "int4-one": (plan([([0], (0, 2)), ([1], (2, 4)), ([2], (4, N))], [4, 12], decode_micro_batches=3),
                 ["int4", "none"]),
}
if HAS_FP8:
    CASES["fp8-one"] = (plan([([0], (0, 3)), ([1], (3, N))], [16], micro_batches=3), ["fp8"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-llama")
    save_hf_llama(folder)
    s = tiny_setup(seq_len=SEQ, batch_size=BATCH, output_tokens=NEW, weights=str(folder))
    data = s.scenario.model_dump(exclude={"source_path"})
    # so slow a link that every prefill message's codec pays (the runtime's per-message rule);
    # the run itself is on loopback: only what the receivers see is under test
    data["cluster"]["hosts"][0]["interconnect"] = {"bandwidth_gbps": 0.001, "latency_us": 50}
    setup = parse_scenario(data, "tiny.yaml").resolve()
    spec = runtime_spec(setup)
    units = build_units(spec, 0, spec.n_units, weight_source(spec, setup.weights, 0))
    return setup, spec, units


@pytest.mark.parametrize("case", list(CASES))
def test_the_reference_generates_what_the_compressed_pipeline_generates(saved, case):
    setup, spec, units = saved
    p, codecs = CASES[case]
    p = p.model_copy(update={"codecs": codecs}).check(setup)
    cr = CompressedRun.of(setup, p)
    assert cr.compressed_share() == pytest.approx(sum(c != "none" for c in codecs) / len(codecs))
    eos = eos_ids(setup.weights)
    ids, first = generate(units, PROMPTS, NEW, cr, eos=eos)
    run = launch(setup, p, ids=PROMPTS, spec=spec, warmup=0, timeout_s=30,
                 generation=generation_config(setup, p, spec))
    assert run.extra["generated"] == ids
    assert np.abs(run.logits - first).max() < 1e-4
    # the codecs are really applied: the same run without them computes other logits
    plain = CompressedRun.of(setup, p.model_copy(update={"codecs": None}))
    plain_ids, plain_first = generate(units, PROMPTS, NEW, plain, eos=eos)
    assert np.abs(plain_first - first).max() > 1e-4
    # and uncompressed, the reference is the plain uncached loop (transformers' generate, per
    # tests/runtime/test_generation.py)
    assert plain_ids == reference_generate(spec, weight_source(spec, setup.weights, 0), PROMPTS, NEW, eos=eos)[0]
    if case == "int4-one":  # so the id comparison above could tell a compressed run from a plain one
        assert ids != plain_ids


def test_compressing_decode_steps_too_changes_what_is_generated(saved):
    """The harsher setting the benchmark also reports (every message through the codec) is not
    what the runtime does; on this model int4 on decode steps changes the ids."""
    setup, _, units = saved
    p = CASES["int4-one"][0].model_copy(update={"codecs": ["int4", "none"]}).check(setup)
    as_run, _ = generate(units, PROMPTS, NEW, CompressedRun.of(setup, p))
    harsh, _ = generate(units, PROMPTS, NEW, CompressedRun.of(setup, p, decode_codecs=["int4", "none"]))
    assert harsh != as_run


def test_check_compares_a_lossy_plan_with_its_own_codecs(saved):
    """``execute --check`` and ``generate --check`` replay the plan's codecs: against the
    plain model a lossy plan's logits are off by its codec's error (int4: far past float32's
    tolerance), against the replay by float noise, and the replay generates its ids."""
    from hpipe.runtime import CHECK_TOLERANCE
    from hpipe.runtime.launcher import execute, plan_reference, reference_logits, within_tolerance

    setup, spec, _ = saved
    p = CASES["int4-one"][0].model_copy(update={"codecs": ["int4", "none"]}).check(setup)
    got = execute(setup, p, inputs=PROMPTS.tolist(), check=True, warmup=0, timeout_s=30, quiet=True, spec=spec)
    assert got.max_abs_error < 1e-4 and within_tolerance(got.max_abs_error, got.check_tolerance)
    # the tolerance: a quarter of the codec's own effect, past float32's where that is larger
    own = np.abs(plan_reference(setup, p, PROMPTS, 1, spec)[1] - reference_logits(setup, PROMPTS, spec)).max()
    assert got.check_tolerance == pytest.approx(max(CHECK_TOLERANCE["float32"], 0.25 * own))
    ids, _ = plan_reference(setup, p, PROMPTS, NEW, spec, eos=eos_ids(setup.weights))
    assert ids == got.generated_ids
    plain_ids, plain_first = plan_reference(setup, p.model_copy(update={"codecs": None}), PROMPTS, NEW, spec,
                                            eos=eos_ids(setup.weights))
    _, lossy_first = plan_reference(setup, p, PROMPTS, 1, spec)
    assert np.abs(plain_first - lossy_first).max() > CHECK_TOLERANCE["float32"]  # what --check used to compare
    assert plain_ids != ids
    # uncompressed, the one-pass forward and the replay agree
    assert np.abs(reference_logits(setup, PROMPTS, spec) - plain_first).max() < 1e-4


def test_a_nan_error_is_not_within_tolerance():
    from hpipe.runtime.launcher import within_tolerance

    assert within_tolerance(0.0, 1e-3) and not within_tolerance(2e-3, 1e-3)
    assert not within_tolerance(float("nan"), 1e-3) and not within_tolerance(float("inf"), 0.25)


def test_check_of_a_tensor_parallel_stage_before_a_lossy_hop_passes(saved):
    """A TP stage's all-reduce sums in another order than the one-process replay, so a value
    within float noise of an int4 midpoint can round one level over: megatron on
    local-cpu-4dev was 0.012 off its replay once.  The check allows a quarter of the codec's
    own effect; a pipeline that skipped the codec would be off by all of it."""
    from hpipe.runtime.launcher import execute, within_tolerance

    setup, spec, _ = saved
    p = plan([([0, 1], (0, 3)), ([2], (3, N))], [8, 8]).model_copy(update={"codecs": ["int4"]}).check(setup)
    got = execute(setup, p, inputs=PROMPTS.tolist(), check=True, warmup=0, timeout_s=30, quiet=True, spec=spec)
    assert within_tolerance(got.max_abs_error, got.check_tolerance), (got.max_abs_error, got.check_tolerance)
    skipped = np.abs(plan_reference_logits(setup, p, spec) - plan_reference_logits(setup, p.model_copy(
        update={"codecs": None}), spec)).max()
    assert skipped > got.check_tolerance  # a run that sent raw would fail the check


def plan_reference_logits(setup, p, spec):
    from hpipe.runtime.launcher import plan_reference

    return plan_reference(setup, p, PROMPTS, 1, spec)[1]
