"""The torch side of the activation codecs: a tensor to bytes on the wire and back.

``encode(x, name)`` flattens x, channel-major for int8 and int4 (the last
dimension outermost: each channel's values over the tokens in a row; see
``_channel_major``) and as stored for fp8 (``Codec.channel_major``), cuts
it into blocks of ``Codec.block`` values
(the last one padded with zeros, which are not sent), gives each block one
fp16 scale (its absmax over the grid's largest value, rounded *up* to fp16 so
that no value leaves the grid), and returns one uint8 tensor: the quantized
values, then the scales.  Its length is exactly ``hpipe.codecs.Codec.wire_bytes``.
``decode(buf, name, shape, dtype)`` is the inverse.

Round-trip error per value (the tests check): int8 and int4 at most half the
block's scale; fp8 (e4m3, 3 mantissa bits) at most 2^-4 of the value's
magnitude, or 2^-10 of the scale near zero (its subnormal spacing is 2^-9).
``none`` sends the tensor's own bytes.
"""

from __future__ import annotations

import torch

from hpipe.codecs import SCALE_BYTES, get_codec

CODEC_IDS = {"none": 0, "int8": 1, "fp8": 2, "int4": 3}
"""How the message header names a codec."""
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
HAS_FP8 = hasattr(torch, "float8_e4m3fn")


def _channel_major(x: torch.Tensor) -> torch.Tensor:
    """x's values (1-D) with its last dimension, the model's channels, outermost: channel 0
    over every row (batch x tokens), then channel 1, ...  Where the rows are a multiple of
    the block, a block holds one channel's values over consecutive rows; otherwise blocks
    straddle neighbouring channels (g rows of one token each, a decode group's step: block / g
    channels a block; one row keeps the order).  An LLM's outlier features are whole
    channels, large in every token (LLM.int8(), SmoothQuant); blocks along a token would put
    each one in a block with 63 ordinary channels and coarsen their grid, token after token.
    (Matmul kernels quantize activations per token because of how GEMMs consume them; a
    message on the wire has no such constraint.)"""
    if x.dim() < 2 or x.shape[-1] == 0:
        return x.reshape(-1)
    return x.reshape(-1, x.shape[-1]).t().reshape(-1)


def _from_channel_major(v: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of ``_channel_major``: k values back to ``shape``."""
    if len(shape) < 2 or int(shape[-1]) == 0:
        return v.view(tuple(shape))
    d = int(shape[-1])
    return v.view(d, -1).t().reshape(*shape)


def _blocks(x: torch.Tensor, block: int, channel_major: bool) -> tuple[torch.Tensor, int]:
    """x as float32 (channel-major, or as stored), zero-padded to (n_blocks, block); and the
    value count."""
    v = (_channel_major(x.detach()) if channel_major else x.detach().reshape(-1)).float()
    k = v.numel()
    pad = -k % block
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    return v.view(-1, block), k


def _scales(v: torch.Tensor, qmax: float) -> torch.Tensor:
    """(n_blocks,) fp16 scales >= absmax / qmax (rounded up, so |v / scale| <= qmax)."""
    want = v.abs().amax(dim=1) / qmax  # (nb,)
    s = want.clamp(max=65504.0).half()
    low = s.float() < want
    if bool(low.any()):
        s = torch.where(low, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    return s


def encode(x: torch.Tensor, name: str) -> torch.Tensor:
    """The wire bytes (1-D uint8 tensor, on x's device) of x under the codec ``name``."""
    codec = get_codec(name)
    if not codec.lossy:
        return x.detach().contiguous().reshape(-1).view(torch.uint8)
    v, k = _blocks(x, codec.block, codec.channel_major)  # (nb, block)
    s = _scales(v, codec.qmax)  # (nb,) fp16
    safe = torch.where(s == 0, torch.ones_like(s), s).float()[:, None]  # all-zero blocks
    y = v / safe
    if name == "int8":
        q = y.round_().clamp_(-127, 127).to(torch.int8).view(torch.uint8).reshape(-1)[:k]
    elif name == "fp8":
        if not HAS_FP8:
            raise RuntimeError("this torch has no float8_e4m3fn: the fp8 codec is unavailable")
        q = y.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8).reshape(-1)[:k]
    elif name == "int4":
        n = y.round_().clamp_(-7, 7).to(torch.int16).reshape(-1)[:k] + 8  # 1..15
        if k % 2:
            n = torch.cat([n, n.new_full((1,), 8)])  # a zero pads the last byte
        pairs = n.view(-1, 2)
        q = (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)  # first value in the low nibble
    else:  # pragma: no cover - get_codec knows only these
        raise ValueError(name)
    return torch.cat([q.contiguous(), s.contiguous().view(torch.uint8)])


def decode(buf: torch.Tensor, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """The tensor of ``shape`` and ``dtype`` that ``encode`` turned into ``buf``."""
    codec = get_codec(name)
    k = 1
    for d in shape:
        k *= int(d)
    if not codec.lossy:
        return buf.view(dtype).view(tuple(shape))
    expect = codec.wire_bytes(k, torch.tensor([], dtype=dtype).element_size())
    if buf.numel() != expect:
        raise ValueError(f"{name}: {buf.numel()} bytes on the wire, expected {expect} for {k} values")
    nb = -(-k // codec.block)
    nq = buf.numel() - SCALE_BYTES * nb
    s = buf[nq:].clone().view(torch.float16).float()  # (nb,)
    q = buf[:nq]
    if name == "int8":
        y = q.view(torch.int8).float()
    elif name == "fp8":
        y = q.view(torch.float8_e4m3fn).float()
    else:  # int4
        b = q.to(torch.int16)
        y = (torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)[:k] - 8).float()
    pad = nb * codec.block - k
    if pad:
        y = torch.cat([y, y.new_zeros(pad)])
    v = (y.view(nb, codec.block) * s[:, None]).reshape(-1)[:k]
    return (_from_channel_major(v, shape) if codec.channel_major else v.view(tuple(shape))).to(dtype)


def round_trip(x: torch.Tensor, name: str) -> torch.Tensor:
    """decode(encode(x)): what the receiving stage sees."""
    return decode(encode(x, name), name, x.shape, x.dtype)


def staged_forward(units, x: torch.Tensor, pos: int, caches, boundaries: dict[int, str]) -> torch.Tensor:
    """One slice through ``units`` in one process, with the codec round trip a pipeline applies
    where a stage ends: ``boundaries`` maps a unit index e (a stage ends before unit e) to the
    codec of that boundary.  The single-process reference of a compressed plan."""
    for u in units:
        name = boundaries.get(u.unit.index, "none")
        if name != "none":
            x = round_trip(x, name)
        x = u(x, pos, caches.get(u.unit.index) if caches is not None else None)
    return x
