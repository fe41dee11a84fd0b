"""Activation codecs on stage boundaries, described without torch: wire bytes and codec time.

A codec turns the activation a stage sends on -- k values of the scenario's
dtype, flattened (batch, tokens, d_model) -- into bytes on the wire, and back
on the receiving side.  This module is what the planner and the simulator
know about a codec; ``hpipe.runtime.codecs`` is the torch implementation, and
its bytes on the wire are exactly ``wire_bytes`` here (a test checks).

| codec | per value | per block | wire bytes of k values |
|---|---|---|---|
| ``none`` | the dtype | - | k * dtype_bytes |
| ``int8`` | int8 | 64 values, one fp16 scale (absmax / 127) | k + 2 * ceil(k / 64) |
| ``fp8``  | float8 e4m3 | 64 values, one fp16 scale (absmax / 448) | k + 2 * ceil(k / 64) |
| ``int4`` | int4, two per byte | 32 values, one fp16 scale (absmax / 7) | ceil(k / 2) + 2 * ceil(k / 32) |

int8 and int4 blocks run channel-major: the message (batch, tokens, d_model) is laid out
channel by channel, each over all its rows (batch x tokens), so where the rows
are a multiple of the block (64 values, int4 32) a block holds one channel's
values over that many consecutive rows; otherwise blocks straddle neighbouring
channels (a decode step of g sequences: block / g channels a block).  An LLM's outlier features are whole channels,
large in every token; blocks along a token would put each in a block with 63
ordinary channels, token after token.  On the trained small LLaMA of
``benchmarks/compression.py`` this cut the int8 error at the boundaries from
0.85-0.91% of the residual stream's RMS to 0.59-0.62%, and int4's from 12.6-12.8% to
9.5-10.0%.  fp8 keeps blocks along a token: its error is relative to each value (a
float's mantissa), the block only sets the range, and its largest value is the one it
carries exactly, so channel-major gained nothing there (2.48-2.50% against 2.29-2.32%).
fp8 carries a block scale:
e4m3 alone spans 2^-9..448, and unscaled activations leave that range (an
outlier feature of 1000 would saturate; a small residual would flush to zero).

Codec time (the cost model's ``codec_time_s``): encode and decode are unfused
element-wise torch ops over the activation (abs, block max, divide, round, clamp, cast,
...), memory-bound, so the roofline charges ``ops * op overhead + bytes moved / memory
bandwidth``, with the ops and the bytes each op reads and writes counted from the aten
ops the torch codec dispatches (``Codec.traffic``; a test recounts them).  ``hpipe
profile`` times each codec on the device, and the fitted model prices codecs from those
timings (a constant plus a time per value); only on a profile made before codecs were
timed does it fall back to this count (``describe()`` says so).  Who pays: the
sender's stage encodes after its compute and the receiver's stage decodes
before its compute, on the stage's own device, so both are charged to the
*stage* time (simulated and measured alike: the runtime stamps them inside the
stage's compute interval), and the hop moves only the wire bytes.

Per message, a lossy codec is used only where it pays: a message whose encode
+ compressed transfer + decode would take longer than sending it raw (short,
latency-bound messages such as decode steps) goes uncompressed
(``pays``), and the message header names the codec actually used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SCALE_BYTES = 2
"""Every block scale travels as fp16."""


@dataclass(frozen=True)
class Codec:
    name: str
    value_bits: int
    """Bits per value on the wire (0: the dtype as it is)."""
    block: int
    """Values sharing one scale (0: no scale)."""
    qmax: float
    """Largest magnitude of the quantized grid: the block's absmax maps to it."""
    encode_bytes: float = 0.0
    """Bytes the encoder's float32 work reads and writes per value (``traffic`` adds the
    input's own copies)."""
    decode_bytes: float = 0.0
    """Bytes the decoder reads and writes per value, up to its float32 result."""
    encode_ops: int = 0
    """Tensor ops the torch encoder dispatches on a float32 message of one row, whatever its
    size: a fixed time (``op_overhead_s`` each), why short, latency-bound messages (decode
    steps) go raw."""
    decode_ops: int = 0
    channel_major: bool = False
    """Blocks run along each channel's rows rather than along each token (see above)."""
    rel_error: float = 0.0
    """Round-trip RMS error relative to the activation's RMS: what the planner ranks codecs'
    loss by (``assignment_loss``)."""

    @property
    def lossy(self) -> bool:
        return self.name != "none"

    def wire_bytes(self, k, dtype_bytes: int):
        """Bytes on the wire for k values (an int, or a numpy array of counts)."""
        k = np.asarray(k)
        if not self.lossy:
            out = k * dtype_bytes
        else:
            values = -(-k * self.value_bits // 8)  # ceil: int4 packs two per byte
            out = values + SCALE_BYTES * -(-k // self.block)
        return int(out) if out.ndim == 0 else out

    def traffic(self, dtype_bytes: int) -> tuple[tuple[float, int], tuple[float, int]]:
        """((encode bytes per value, encode ops), (decode bytes per value, decode ops)) for
        an activation of this many bytes per value.  A float16 or bfloat16 activation is cast
        to float32 first and back last (one more op each side, reading and writing both
        widths); a channel-major codec copies its input transposed (read and write, in the
        input's width; no op counted, since a one-row message, the short one where ops
        matter, is already in order)."""
        if not self.lossy:
            return (0.0, 0), (0.0, 0)
        cast = 0 if dtype_bytes == 4 else 1
        encode = self.encode_bytes + cast * (dtype_bytes + 4) + (2 * dtype_bytes if self.channel_major else 0)
        decode = self.decode_bytes + cast * (4 + dtype_bytes)
        return (encode, self.encode_ops + cast), (decode, self.decode_ops + cast)


# Bytes and ops: hpipe.runtime.codecs's aten ops, counted on float32 messages (a torch
# dispatch mode; tests/runtime/test_codecs.py recounts them).  Per value, int8's encode
# reads and writes abs 8, block max 4, divide 8, round 8, clamp 8, cast to int8 5, the
# concatenation with the scales 2, and ~2.4 for the ops on one scale per block (scales
# rounded up to fp16: 12 small ops); decode: int8 to float32 5, times the scale 8 (the
# channel-major order comes back as a view).  fp8 has no round; int4 adds the packing into
# nibbles (int16 6, +8 4, shift 2, or 3, to uint8 1.5) and its unpacking.  These replace
# pass counts scaled from one machine's CPU time (an AMD EPYC VM, 2026-12-01), which priced
# the Xeon VM of 2026-12-03 3-3.5x too slow.
# rel_error: the larger round-trip error at the two stage boundaries of the trained small
# LLaMA, % of the residual stream's RMS (benchmarks/results/
# compression-accuracy-2026-12-03-xeon-seed0.txt: int8 0.62%, fp8 2.32%, int4 9.96%).
CODECS: dict[str, Codec] = {
    "none": Codec("none", 0, 0, 0.0),
    "int8": Codec("int8", 8, 64, 127.0, 44.36, 13.22, 21, 4, channel_major=True, rel_error=0.0062),
    "fp8": Codec("fp8", 8, 64, 448.0, 36.36, 13.22, 20, 4, rel_error=0.0232),
    "int4": Codec("int4", 4, 32, 7.0, 56.22, 27.94, 25, 9, channel_major=True, rel_error=0.0996),
}
# Ops: a one-row int8 message (a decode step of a 512-wide model) took 212 / 111 us of CPU
# time to encode / decode on the AMD EPYC VM (2026-12-01) and 65 / 30 us on the 2-core Intel
# Xeon VM (2026-12-03), with 21 / 4 ops: 13 us per op on the first (the decode's Python
# around its few ops counts too), 3.8 us on the second.  The larger is kept: it errs towards
# sending short messages raw, which loses nothing; a profile times the device's own.
CPU_OP_OVERHEAD_S = 13e-6
GPU_OP_OVERHEAD_S = 5e-6
"""A kernel launch, where the cost model does not say (the roofline's kernel_overhead_us)."""


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; one of {', '.join(CODECS)}") from None


def assignment_loss(codecs) -> float:
    """How lossy a plan's codecs are, to rank them: the sum of their squared relative errors
    (independent noise on each hop adds in power).  0 for none at all.  ``fsum``: the same
    codecs on other hops are the same loss (a plain sum differed in the last bit with the
    order, and a tie on loss must go to the faster plan)."""
    return math.fsum(get_codec(c).rel_error ** 2 for c in codecs or ())


def roofline_codec_time_s(codec: Codec, k, dtype_bytes: int, bandwidth_gbps: float, op_overhead_s: float):
    """(encode_s, decode_s) of k values on a device with this memory bandwidth (GB/s) and
    this fixed cost per dispatched op."""
    k = np.asarray(k, float)
    if not codec.lossy:
        return np.zeros_like(k), np.zeros_like(k)
    bw = bandwidth_gbps * 1e9
    busy = k > 0
    (enc_b, enc_ops), (dec_b, dec_ops) = codec.traffic(dtype_bytes)
    return (np.where(busy, enc_ops * op_overhead_s + enc_b * k / bw, 0.0),
            np.where(busy, dec_ops * op_overhead_s + dec_b * k / bw, 0.0))


@dataclass
class BoundaryCost:
    """One stage boundary's activation, per work item (numpy arrays of one value per item)."""

    codec: list[str]
    """The codec each item's message uses ('none' where the plan's codec does not pay)."""
    wire_bytes: np.ndarray
    encode_s: np.ndarray
    """Charged to the sending stage."""
    decode_s: np.ndarray
    """Charged to the receiving stage."""


def boundary_costs(setup, plan, boundary: int, n, b, n_prefill: int | None = None) -> BoundaryCost:
    """What crossing the boundary after stage ``boundary`` costs, per item of (n tokens, batch b).
    Items from ``n_prefill`` on are decode steps: latency-bound, they travel raw (as the
    runtime sends them).

    The one place the simulator, the planners' exact makespan and the runtime (which
    codec each message uses) take a boundary's bytes and codec time from."""
    cost = setup.cost
    db = setup.dtype_bytes
    prev, nxt = plan.stages[boundary], plan.stages[boundary + 1]
    unit = setup.units[prev.end - 1]
    raw = np.broadcast_to(np.asarray(unit.out_bytes(n, b, db), float), np.shape(n)).astype(float)
    k = raw / db
    codec = get_codec(plan.codec_of(boundary))
    zero = np.zeros_like(raw)
    if not codec.lossy:
        return BoundaryCost(["none"] * raw.size, raw, zero, zero)
    src, dst = prev.devices[0], nxt.devices[0]
    wire = np.asarray(codec.wire_bytes(np.rint(k).astype(np.int64), db), float)
    enc, _ = cost.codec_time_s(codec, src, k)
    _, dec = cost.codec_time_s(codec, dst, k)
    enc = np.broadcast_to(np.asarray(enc, float), raw.shape)
    dec = np.broadcast_to(np.asarray(dec, float), raw.shape)
    use = pays(cost.transfer_time_s(src, dst, raw), cost.transfer_time_s(src, dst, wire), enc, dec) & (raw > 0)
    if n_prefill is not None:
        use = use & (np.arange(use.size) < n_prefill).reshape(use.shape)
    return BoundaryCost([codec.name if u else "none" for u in use.tolist()],
                        np.where(use, wire, raw), np.where(use, enc, 0.0), np.where(use, dec, 0.0))


def pays(raw_transfer_s, wire_transfer_s, encode_s, decode_s) -> np.ndarray:
    """Per message: whether encode + compressed transfer + decode beats the raw transfer."""
    return np.asarray(encode_s + wire_transfer_s + decode_s < raw_transfer_s)


def plan_boundary_costs(setup, plan, n, b, n_prefill: int | None = None) -> list[BoundaryCost]:
    """``boundary_costs`` of every boundary of the plan (one per stage but the last)."""
    return [boundary_costs(setup, plan, j, n, b, n_prefill) for j in range(len(plan.stages) - 1)]


def stage_codec_s(costs: list[BoundaryCost], j: int):
    """Codec time stage j spends per item: decoding its input and encoding its output."""
    t = 0.0
    if j > 0:
        t = t + costs[j - 1].decode_s
    if j < len(costs):
        t = t + costs[j].encode_s
    return t
