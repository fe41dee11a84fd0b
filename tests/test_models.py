"""Model catalog: parameter counts against the published ones, and unit costs."""

import numpy as np
import pytest

from hpipe.errors import InputError
from hpipe.models import MODELS, get_model, model_from_mapping

# Published parameter counts.  GPT-3 1.3B is the paper's rounded label; the same
# architecture (GPT-Neo 1.3B: 24 x 2048, vocab 50257, 2048 positions, tied) counts
# 1,315,575,808 on the Hugging Face hub, which is what this shape must reproduce.
PUBLISHED = {
    "llama-7b": 6.74e9,
    "llama-13b": 13.0e9,
    "llama-2-70b": 69.0e9,
    "gpt3-2.7b": 2.65e9,
    "gpt3-1.3b": 1.3156e9,
}


@pytest.mark.parametrize("name,count", PUBLISHED.items())
def test_param_counts_match_published(name, count):
    assert abs(MODELS[name].param_count() - count) / count < 0.01


def test_gpt3_1_3b_is_the_rounded_1_3b():
    assert abs(MODELS["gpt3-1.3b"].param_count() - 1.3e9) / 1.3e9 < 0.015


@pytest.mark.parametrize("name", list(MODELS))
def test_units_layout(name):
    m = MODELS[name]
    units = m.units()
    assert len(units) == 2 * m.n_layers + 2 == m.n_units
    assert [u.kind for u in units[:3]] == ["embed", "attn", "mlp"]
    assert units[-1].kind == "head"
    assert [u.index for u in units] == list(range(len(units)))


def test_llama7b_unit_costs_by_hand():
    m = MODELS["llama-7b"]
    attn, mlp, head = m.units()[1], m.units()[2], m.units()[-1]
    # one token, no context: projections 2*(4 d^2) + attention 4*h*1*hd + small terms
    assert attn.flops(1, 0, 1) == pytest.approx(2 * 4 * 4096**2 + 4 * 4096 + 10 * 4096)
    assert mlp.flops(1, 0, 1) == pytest.approx(2 * 3 * 4096 * 11008 + 10 * 11008)
    assert head.flops(1, 0, 1) == pytest.approx(2 * 4096 * 32000 + 5 * 4096)
    # KV cache: 2 (k and v) x 4096 x 2 bytes per token per layer
    assert attn.kv_bytes_per_token(2) == 2 * 4096 * 2
    assert mlp.kv_bytes_per_token(2) == 0
    assert attn.out_bytes(16, 3, 2) == 16 * 3 * 4096 * 2


def test_attention_cost_grows_with_context_and_broadcasts():
    attn = MODELS["llama-2-70b"].units()[1]
    c = np.array([0, 1024, 8192])
    f = attn.flops(256, c, 2)
    assert f.shape == (3,) and np.all(np.diff(f) > 0)
    # grouped-query attention: 8 KV heads of 128
    assert attn.kv_bytes_per_token(2) == 2 * 8 * 128 * 2


def test_causal_flops_sum_over_slices_equals_whole():
    attn = MODELS["llama-7b"].units()[1]
    whole = attn.flops(2048, 0, 1)
    parts = sum(attn.flops(n, c, 1) for n, c in [(512, 0), (1024, 512), (512, 1536)])
    assert parts == pytest.approx(whole)


def test_unknown_model_suggests():
    with pytest.raises(InputError, match="llama-7b"):
        get_model("llama7b")


def test_inline_model_validation():
    spec = model_from_mapping({"family": "llama", "n_layers": 2, "d_model": 64, "n_heads": 4,
                               "d_ff": 128, "vocab_size": 100})
    assert spec.n_kv_heads == 4
    with pytest.raises(InputError, match="d_modle"):
        model_from_mapping({"family": "llama", "d_modle": 3})
    with pytest.raises(InputError, match="multiple of n_heads"):
        model_from_mapping({"family": "llama", "n_layers": 2, "d_model": 65, "n_heads": 4,
                            "d_ff": 128, "vocab_size": 100})


@pytest.mark.parametrize("field,value,problem", [
    ("n_layers", 0, "must be positive"), ("n_kv_heads", 3, "must divide n_heads"),
    ("d_model", 66, "multiple of n_heads"), ("rope_theta", -1.0, "positive number"),
    ("norm_eps", 0.0, "positive number"), ("norm_eps", float("nan"), "positive number"),
    ("rope_theta", float("inf"), "positive number"), ("norm_eps", True, "positive number"),
    ("tie_embeddings", "false", "true or false"), ("tie_embeddings", 7, "true or false"),
    ("name", 123, "must be text")])
def test_an_impossible_shape_names_its_field(field, value, problem):
    """A zero norm epsilon or a negative rotary base computes NaN or garbage logits (which a
    --check once passed); every such error names the field, not just `model`."""
    base = {"family": "llama", "n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 128, "vocab_size": 100}
    with pytest.raises(InputError, match=problem) as e:
        model_from_mapping({**base, field: value})
    assert e.value.field == field
    if value is True:  # the spelling YAML gives 1e-5 (text) is a number, as pydantic's fields take it
        assert model_from_mapping({**base, "norm_eps": "1e-5", "rope_theta": "5e5"}).norm_eps == 1e-5
