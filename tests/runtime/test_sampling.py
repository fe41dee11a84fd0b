"""The last stage's sampler: greedy, temperature, top-k, top-p, and seeded reproducibility."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hpipe.runtime.sampling import Sampler, SamplingConfig, sequence_seed, warp  # noqa: E402


def _logits(b=3, v=50, seed=0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    x = _logits()
    assert Sampler(SamplingConfig(), 3)(x, [0, 1, 2]) == x.argmax(-1).tolist()


@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=1.0, top_k=1), SamplingConfig(temperature=2.0, top_p=1e-6),
                                 # logits / 1e-45 overflow float32: the workers' draw raised on inf - inf
                                 SamplingConfig(temperature=1e-45), SamplingConfig(temperature=1e-30, top_p=0.5),
                                 SamplingConfig(temperature=1e-300)])  # 0 in float32: 0 / 0 = nan
def test_a_single_candidate_is_greedy(cfg):
    x = _logits()
    assert Sampler(cfg, 3)(x, [0, 1, 2]) == x.argmax(-1).tolist()


def test_warp_matches_transformers_warpers():
    lp = pytest.importorskip("transformers.generation.logits_process")
    x = _logits(4, 64, seed=3)
    for k, p, t in [(0, 0.9, 0.7), (10, 1.0, 1.3), (5, 0.5, 1.0), (0, 0.3, 2.0)]:
        ref = lp.TemperatureLogitsWarper(t)(None, x.clone())
        if k:
            ref = lp.TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = lp.TopPLogitsWarper(p)(None, ref)
        ours = warp(x, SamplingConfig(temperature=t, top_k=k, top_p=p))
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (k, p, t)
        fin = ~torch.isinf(ref)
        assert torch.allclose(ours[fin], ref[fin], atol=1e-6)


def test_seeded_draws_repeat_and_depend_on_the_seed_and_sequence_only():
    cfg = SamplingConfig(temperature=1.0, top_p=0.95, seed=7)
    steps = [_logits(4, 40, seed=s) for s in range(20)]

    def draw(cfg, rows_of_step):
        s = Sampler(cfg, 4)
        return [s(x[rows], rows) for x, rows in zip(steps, rows_of_step)]

    all_rows = [[0, 1, 2, 3]] * 20
    a, b = draw(cfg, all_rows), draw(cfg, all_rows)
    assert a == b
    # the same sequences drawn in two groups: each sequence gets the same ids
    s = Sampler(cfg, 4)
    split = [s(x[[0, 1]], [0, 1]) + s(x[[2, 3]], [2, 3]) for x in steps]
    assert split == a
    c = draw(SamplingConfig(temperature=1.0, top_p=0.95, seed=8), all_rows)
    assert c != a
    assert len({sequence_seed(0, k) for k in range(100)} | {sequence_seed(1, k) for k in range(100)}) == 200
