"""Activation codecs: the round-trip error bound per value, the bytes on the wire against
``hpipe.codecs``'s prediction, and outliers confined to their own block."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from hpipe.codecs import CODECS, get_codec  # noqa: E402
from hpipe.runtime.codecs import HAS_FP8, decode, encode, round_trip  # noqa: E402

LOSSY = [c for c in CODECS if c != "none" and (c != "fp8" or HAS_FP8)]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _wire_order(shape, channel_major: bool) -> torch.Tensor:
    """For each value of a tensor of ``shape`` (flattened as torch stores it), its place on
    the wire: as stored, or channel-major (the last dimension outermost, each channel over
    every token in turn)."""
    k = math.prod(int(d) for d in shape)
    if not channel_major or len(shape) < 2:
        return torch.arange(k)
    d = int(shape[-1])
    rows, ch = torch.arange(k) // d, torch.arange(k) % d
    return ch * (k // d) + rows


def _block_of(shape, name: str) -> torch.Tensor:
    """Each value's block on the wire."""
    codec = get_codec(name)
    return _wire_order(shape, codec.channel_major) // codec.block


def _block_scales(x: torch.Tensor, name: str) -> torch.Tensor:
    """Each value's block scale, as the wire carries it (fp16, after the quantized values)."""
    codec = get_codec(name)
    buf = encode(x, name)
    nb = -(-x.numel() // codec.block)
    s = buf[buf.numel() - 2 * nb:].clone().view(torch.float16).float()
    return s[_block_of(x.shape, name)]


def _bound(x: torch.Tensor, name: str) -> torch.Tensor:
    s = _block_scales(x, name)
    v = x.reshape(-1).float()
    if name == "fp8":  # e4m3: 3 mantissa bits; subnormal spacing 2^-9 of the scale
        return torch.maximum(v.abs() * 2.0 ** -4, s * 2.0 ** -10)
    return s / 2


values = st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=700)


@settings(max_examples=150, deadline=None)
@given(vals=values, name=st.sampled_from(LOSSY), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       width=st.sampled_from([0, 1, 3, 64, 100]))
def test_round_trip_error_within_half_the_block_scale(vals, name, scale, width):
    x = torch.tensor(vals, dtype=torch.float32) * scale
    if width and x.numel() >= width:  # as a message: (tokens, channels); int8, int4: channel-major
        x = x[:x.numel() // width * width].view(-1, width)
    y = round_trip(x, name)
    assert y.shape == x.shape and y.dtype == x.dtype
    err = (y - x).abs().reshape(-1)
    # float32 division and multiplication add a rounding of the value itself
    slack = x.abs().reshape(-1) * 2e-6 + 1e-30
    assert bool((err <= _bound(x, name) + slack).all()), float((err - _bound(x, name)).max())


@settings(max_examples=100, deadline=None)
@given(k=st.integers(1, 5000), name=st.sampled_from(list(CODECS)), dtype=st.sampled_from(list(DTYPES)))
def test_wire_bytes_equal_the_prediction(k, name, dtype):
    if name == "fp8" and not HAS_FP8:
        pytest.skip("no float8 in this torch")
    t = DTYPES[dtype]
    x = torch.randn(k).to(t)
    buf = encode(x, name)
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    assert buf.numel() == get_codec(name).wire_bytes(k, t.itemsize)
    assert decode(buf, name, x.shape, t).shape == x.shape


@pytest.mark.parametrize("name", LOSSY)
def test_an_outlier_only_hurts_its_own_block(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, generator=g)  # 16 blocks of 64 (32 of 32 for int4)
    clean = (round_trip(x, name) - x).abs()
    x2 = x.clone()
    x2[1, 70] = 1000.0  # one outlier value
    hurt = (round_trip(x2, name) - x2).abs()
    flat_c, flat_h = clean.reshape(-1), hurt.reshape(-1)
    blocks = _block_of(x.shape, name)
    own = blocks == blocks[256 + 70]
    assert int(own.sum()) == get_codec(name).block
    assert torch.equal(flat_h[~own], flat_c[~own])  # every other block bit for bit unchanged
    if name == "fp8":  # relative precision: only the block's smallest values (now subnormal) suffer
        assert float(flat_h[own].mean()) > float(flat_c[own].mean())
    else:  # a uniform grid: the whole block's step grows with the outlier
        assert float(flat_h[own].max()) > 10 * float(flat_c[own].max())


@pytest.mark.parametrize("name", [c for c in LOSSY if get_codec(c).channel_major])
def test_an_outlier_channel_leaves_the_other_channels_alone(name):
    """An LLM's outlier features are channels, large in every token.  Blocks run along a
    channel's tokens, so every other channel's values round exactly as without it; blocks
    along a token would have coarsened 63 neighbours in each of the 128 tokens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 256, generator=g)  # (batch, tokens, channels)
    clean = (round_trip(x, name) - x).abs()
    x2 = x.clone()
    x2[..., 70] += 100.0  # every token
    hurt = (round_trip(x2, name) - x2).abs()
    others = torch.ones(256, dtype=torch.bool)
    others[70] = False
    assert torch.equal(hurt[..., others], clean[..., others])
    assert float(hurt[..., 70].mean()) > 2 * float(clean[..., 70].mean())


@pytest.mark.parametrize("name", list(CODECS))
def test_zeros_and_bfloat16_round_trip(name):
    if name == "fp8" and not HAS_FP8:
        pytest.skip("no float8 in this torch")
    z = torch.zeros(3, 5, 64, dtype=torch.bfloat16)
    assert torch.equal(round_trip(z, name), z)
    for odd in (torch.tensor(1.5), torch.zeros(2, 0), torch.zeros(0, 7)):  # a scalar, no values
        assert round_trip(odd, name).shape == odd.shape
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    y = round_trip(x, name)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    tol = 0.0 if name == "none" else {"int8": 0.02, "fp8": 0.2, "int4": 0.5}[name] * float(x.abs().max())
    assert float((y.float() - x.float()).abs().max()) <= tol


def test_decode_refuses_a_short_buffer():
    buf = encode(torch.randn(128), "int8")
    with pytest.raises(ValueError, match="bytes on the wire"):
        decode(buf[:-1], "int8", (128,), torch.float32)


def test_the_profiler_times_codecs_on_message_shaped_tensors(monkeypatch):
    """A message is (batch, tokens, d_model) and int8 and int4 lay it out channel-major; a 1-D
    tensor would skip that copy, and the profile would price them below what they cost."""
    from types import SimpleNamespace

    import hpipe.runtime.codecs as codecs_mod
    from hpipe.models import get_model
    from hpipe.runtime.profile_units import time_codecs

    spec = get_model("tiny-llama")
    shapes = []
    real = codecs_mod.encode
    monkeypatch.setattr(codecs_mod, "encode", lambda x, name: shapes.append(tuple(x.shape)) or real(x, name))
    job = SimpleNamespace(codec_sizes=[spec.d_model, 8 * spec.d_model], torch_device="cpu", dtype="float32",
                          warmup=0, repeats=1, spec=spec)
    out = time_codecs(job)
    assert set(out) == set(LOSSY) and shapes
    assert set(shapes) == {(1, spec.d_model), (8, spec.d_model)}


# ---- the roofline's count of the codecs' memory traffic and ops --------------------------------
_VIEWS = {"view", "_unsafe_view", "t", "transpose", "slice", "select", "alias", "detach", "as_strided",
          "unsqueeze", "expand", "lift_fresh"}


def _dispatched(fn) -> tuple[int, int]:
    """(ops that touch memory, bytes they read and write) of ``fn()``, counted at torch's
    dispatch: every non-view aten op's tensor arguments and results."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    def nbytes(tree):
        return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))

    class Count(TorchDispatchMode):
        ops = moved = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ not in _VIEWS:
                Count.ops += 1
                Count.moved += nbytes(args) + nbytes(kwargs or {}) + nbytes(out)
            return out

    with Count():
        fn()
    return Count.ops, Count.moved


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_roofline_counts_the_codecs_own_traffic_and_ops(name, dtype):
    """``Codec.traffic`` is what the torch codec does: a change to hpipe.runtime.codecs that
    adds a pass or an op fails here until the roofline's count follows it."""
    codec, dt = get_codec(name), DTYPES[dtype]
    (enc_b, enc_ops), (dec_b, dec_ops) = codec.traffic(torch.tensor([], dtype=dt).element_size())
    for shape in ((2, 256, 128), (1, 1, 512)):  # a prefill message; a decode step's one row
        x = torch.randn(*shape).to(dt)
        k = x.numel()
        buf = encode(x, name)
        e_ops, e_moved = _dispatched(lambda: encode(x, name))
        d_ops, d_moved = _dispatched(lambda: decode(buf, name, x.shape, dt))
        if shape[0] > 1:  # bytes: per value, within the scales' share (1/block of them)
            assert e_moved / k == pytest.approx(enc_b, rel=0.02), (shape, e_moved / k)
            assert d_moved / k == pytest.approx(dec_b, rel=0.02), (shape, d_moved / k)
        else:  # ops: one row is already in channel order (no transposing copy)
            assert (e_ops, d_ops) == (enc_ops, dec_ops)
