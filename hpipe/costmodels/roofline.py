"""The analytic roofline cost model: datasheet peaks times efficiencies per architecture generation.

``costmodel: roofline`` (version 2, the default) prices each unit as the kernels
it launches, from the device's datasheet figures and one row of constants per
architecture generation (``GENERATIONS``; a device's ``generation`` picks it):

* a dense GEMM of m = b·n tokens by a (K, N) weight takes
  ``max(2·m·K·N / (peak · eff(m·N)), (K·N + m·K + m·N)·bytes / (bandwidth · memory_efficiency))``
  with ``eff(s) = gemm_efficiency · s / (s + gemm_half_outputs)``: a GEMM with few output
  tiles under-fills the GPU's SMs (or a CPU's vector units), a large one approaches a
  ceiling; at 1-64 tokens the weights are read once and the memory term decides;
* the attention kernel (FlashAttention-style, causal n × (c + n)) splits its FLOPs into the
  causal triangle of the slice (n·(n+1)/2 query-key pairs) and the rectangle against the
  c cached tokens (n·c), each with its own efficiency saturating in the query rows
  b·heads·n it can spread over the SMs; the measured kernel runs the rectangle about 3× more
  efficiently than the triangle, which is why slicing a long prefill makes its
  attention cheaper;
* norms, rotary, activation and residual add stream their bytes at
  ``elementwise_efficiency`` of the bandwidth; the embedding gathers rows at ``embed_efficiency``;
* every kernel costs at least ``kernel_floor_us`` of device time (GPUs) or ``kernel_floor_mflop``
  at the device's peak (CPUs: dispatch runs on the same core), and the unit takes no less
  than the host needs to launch its kernels (``kernel_overhead_us`` each; launches overlap with
  device work, so this is a max, not a sum).

``{kind: roofline, version: 1}`` keeps the round-1 model exactly: max(FLOPs /
(peak · compute_efficiency), bytes / (bandwidth · memory_efficiency)) + kernels ·
kernel_overhead_us.

``{kind: roofline, calibration: PROFILE.json}`` refits the constants of the generation
of each device the profile measured (``hpipe profile`` output), so one card's profile
prices every card of its generation.

Transfers take latency + bytes / (link bandwidth · link_efficiency) in both versions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from hpipe.costmodels import CostModel, CostModelConfig, register
from hpipe.devices import GENERATIONS as GENERATION_NAMES
from hpipe.errors import InputError


# ---- constants per architecture generation ------------------------------------------------
@dataclass(frozen=True)
class GenerationConstants:
    """Efficiencies of one architecture generation, shares of the datasheet peaks."""

    gemm_efficiency: float
    """Ceiling share of peak FLOP/s that large dense GEMMs reach."""
    gemm_half_outputs: float
    """Output elements m·N of a GEMM at which it reaches half that ceiling (about one wave of
    output tiles over the device's SMs)."""
    memory_efficiency: float
    """Share of memory bandwidth that streaming a GEMM's weights reaches (decode-sized work)."""
    attn_causal_efficiency: float
    """Ceiling share of peak FLOP/s of the attention kernel on the slice's causal triangle."""
    attn_causal_half_rows: float
    """Query rows b·heads·n at which the causal part reaches half its ceiling."""
    attn_context_efficiency: float
    """Ceiling share of peak FLOP/s of the attention kernel against the c cached tokens."""
    attn_context_half_rows: float
    """Query rows b·heads·n at which the context part reaches half its ceiling."""
    elementwise_efficiency: float
    """Share of memory bandwidth of norms, rotary, activation, residual add."""
    embed_efficiency: float
    """Share of memory bandwidth of the embedding's row gather (reads and writes b·n·d)."""
    kernel_floor_us: float
    """Device time every kernel takes at least (ramp-up, tail, tiny ops)."""
    kernel_floor_mflop: float = 0.0
    """Per-kernel overhead that scales with the device's speed, as MFLOP at its peak: on a CPU the
    framework's dispatch runs on the same core, so a core held to half its time (and declared at
    half the peak) pays twice the overhead."""

    def as_vector(self) -> np.ndarray:
        return np.array([getattr(self, f.name) for f in fields(self)], float)

    @classmethod
    def from_vector(cls, x) -> "GenerationConstants":
        return cls(*(float(v) for v in x))


# Fitted by `PYTHONPATH=. python benchmarks/gpu_reference.py --fit` on the A100-80GB and A40 rows
# of Llama-2-7B at TP 1 (Vidur's measured kernel times, ../shared/reference/gpu-kernels/, 2026-12-01).
# H100, Llama-2-70B and TP 2/4/8 shards were not used: they are the hold-out.
_AMPERE = GenerationConstants(
    gemm_efficiency=0.787, gemm_half_outputs=4.47e+05, memory_efficiency=0.79,
    attn_causal_efficiency=0.163, attn_causal_half_rows=6.86e+03,
    attn_context_efficiency=0.518, attn_context_half_rows=5.29e+03,
    elementwise_efficiency=0.364, embed_efficiency=0.308, kernel_floor_us=4.26, kernel_floor_mflop=0)

GENERATIONS: dict[str, GenerationConstants] = {
    # Pascal (P100, GTX 1080 Ti): no tensor cores, no FlashAttention-2.  No measurements here:
    # Ampere's fitted values, an assumption.
    "pascal": _AMPERE,
    # Volta (V100): no measurements here; Ampere's fitted values, an assumption.
    "volta": _AMPERE,
    # Turing (T4, RTX 2080 Ti): no measurements here; Ampere's fitted values, an assumption.
    "turing": _AMPERE,
    # Ampere (A100, A40, A10, RTX 30xx, A6000): fitted, see _AMPERE above.
    "ampere": _AMPERE,
    # Ada (RTX 4090, L4, L40S): no measurements here; Ampere's fitted values, an assumption.
    "ada": _AMPERE,
    # Hopper (H100): Ampere's fitted values on purpose -- the H100 rows are the hold-out that says
    # how far one generation's constants carry to the next (benchmarks/gpu_reference.py).
    "hopper": _AMPERE,
    # CPU (one PyTorch thread, fp32): fitted by `python benchmarks/gpu_reference.py --fit-cpu` on
    # scenarios/profiles/local-cpu.json (AMD EPYC VM, 2 cores, 2026-11-23; device local/core-0,
    # CPU-time basis), relative to the scenario's declared peak of 0.06 TF/s and 10 GB/s.  GEMMs sit
    # at the bound (1.0): the core does a little better than the declared 0.06 TF/s.  The per-kernel
    # floor is framework dispatch on the same core: 6.07 MFLOP at the peak, 101 us at 0.06 TF/s.
    "cpu": GenerationConstants(
        gemm_efficiency=0.997, gemm_half_outputs=3.62e+03, memory_efficiency=0.248,
        attn_causal_efficiency=0.499, attn_causal_half_rows=385,
        attn_context_efficiency=0.697, attn_context_half_rows=49.6,
        elementwise_efficiency=1, embed_efficiency=0.525, kernel_floor_us=0, kernel_floor_mflop=6.07),
}
assert set(GENERATIONS) == set(GENERATION_NAMES), "one row per generation of hpipe.devices.GENERATIONS"

KERNELS = {"embed": 1, "attn": 7, "mlp": 5, "head": 2}
"""Kernels a unit launches (fused QKV and gate/up GEMMs): attention = norm, QKV, rotary,
attention, output reshape, O projection, residual add; MLP = norm, up, activation, down, add;
head = norm, output projection."""


# ---- a unit as kernels ---------------------------------------------------------------------
def gemm_size(m, K, N):
    """What a GEMM's efficiency saturates in: its output elements m·N (output tiles to spread
    over the SMs)."""
    return m * N


def unit_time_v2(unit, n, c, b, tp: int, peak_flops: float, bandwidth_bps: float, dtype_bytes: int,
                 k: GenerationConstants):
    """Seconds of device time of 1/tp of ``unit`` for a slice of n tokens after c, batch b."""
    m = unit.model
    n, c, b = np.broadcast_arrays(np.asarray(n, float), np.asarray(c, float), np.asarray(b, float))
    rows = b * n  # tokens through the GEMMs
    d, kv, ff, V = m.d_model, m.kv_dim, m.d_ff, m.vocab_size
    mem = bandwidth_bps * k.memory_efficiency
    elem = bandwidth_bps * k.elementwise_efficiency

    def gemm(K, N):
        flops = 2.0 * rows * K * N
        size = gemm_size(rows, K, N)
        eff = k.gemm_efficiency * size / (size + k.gemm_half_outputs)
        compute = flops / (peak_flops * eff)
        memory = (K * N + rows * K + rows * N) * dtype_bytes / mem
        return np.maximum(compute, memory)

    def stream(elements):  # elementwise kernels: bytes read + written
        return elements * dtype_bytes / elem

    if unit.kind == "embed":
        t = 2.0 * rows * d * dtype_bytes / (bandwidth_bps * k.embed_efficiency)
    elif unit.kind == "attn":
        heads, kv_s = m.n_heads / tp, kv / tp
        t = stream(2 * rows * d)  # norm
        t = t + gemm(d, (d + 2 * kv) / tp)  # fused QKV
        if m.family == "llama":
            t = t + stream(2 * rows * (d + kv) / tp)  # rotary on q and k
        # attention kernel: causal triangle of the slice + rectangle against the context
        qrows = b * heads * n
        per_pair = 4.0 * b * heads * m.head_dim  # QK^T and PV, per query-key pair
        causal = per_pair * n * (n + 1.0) / 2.0 / (
            peak_flops * k.attn_causal_efficiency * qrows / (qrows + k.attn_causal_half_rows))
        context = per_pair * n * c / (
            peak_flops * k.attn_context_efficiency * qrows / (qrows + k.attn_context_half_rows))
        kv_read = (b * (c + n) * 2 * kv_s + 2 * rows * d / tp) * dtype_bytes / mem
        t = t + np.maximum(causal + context, kv_read)
        t = t + stream(2 * rows * d / tp)  # output reshape
        t = t + gemm(d / tp, d)  # O projection (row-parallel)
        t = t + stream(3 * rows * d)  # residual add
    elif unit.kind == "mlp":
        t = stream(2 * rows * d)  # norm
        if m.family == "llama":
            t = t + gemm(d, 2 * ff / tp)  # gate and up, fused
            t = t + stream(3 * rows * ff / tp)  # silu(gate) * up
        else:
            t = t + gemm(d, ff / tp)
            t = t + stream(2 * rows * ff / tp)  # gelu
        t = t + gemm(ff / tp, d)  # down (row-parallel)
        t = t + stream(3 * rows * d)  # residual add
    else:  # head: final norm and the (vocab-parallel) output projection
        t = stream(2 * rows * d) + gemm(d, V / tp)
    return t + KERNELS[unit.kind] * (k.kernel_floor_us * 1e-6 + k.kernel_floor_mflop * 1e6 / peak_flops)


# ---- fitting ----------------------------------------------------------------------------
@dataclass
class FitPoint:
    """One measured unit time to fit constants on."""

    unit: object
    n: float
    c: float
    b: float
    tp: int
    peak_flops: float
    bandwidth_bps: float
    dtype_bytes: int
    seconds: float


_LOWER = GenerationConstants(0.02, 1.0, 0.05, 0.005, 1.0, 0.005, 1.0, 0.02, 0.01, 0.0, 0.0)
_UPPER = GenerationConstants(1.0, 1e9, 1.0, 1.0, 1e8, 1.0, 1e8, 1.0, 1.0, 1e4, 1e4)
_NEUTRAL = GenerationConstants(0.5, 1e4, 0.5, 0.3, 1e3, 0.5, 1e3, 0.5, 0.5, 10.0, 0.0)
"""A second starting point for fits, far from any GPU's values (the fit is not convex)."""


def _grouped(points: list[FitPoint]):
    """Points grouped by everything but (n, c, b), so the model is evaluated on arrays."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(points):
        groups.setdefault((id(p.unit), p.tp, p.peak_flops, p.bandwidth_bps, p.dtype_bytes), []).append(i)
    out = []
    for idx in groups.values():
        p0 = points[idx[0]]
        n, c, b = (np.array([getattr(points[i], a) for i in idx], float) for a in "ncb")
        out.append((np.array(idx), p0, n, c, b))
    return out


def predict_points(points: list[FitPoint], k: GenerationConstants) -> np.ndarray:
    """Predicted seconds of every point under constants ``k``."""
    out = np.empty(len(points))
    for idx, p0, n, c, b in _grouped(points):
        out[idx] = unit_time_v2(p0.unit, n, c, b, p0.tp, p0.peak_flops, p0.bandwidth_bps, p0.dtype_bytes, k)
    return out


def floor_kept_at_zero(generation: str) -> str:
    """The per-kernel floor term a generation does not use: GPUs pay a fixed time per kernel
    (``kernel_floor_us``), a CPU a share of its own speed (``kernel_floor_mflop``: the framework's
    dispatch runs on the same core).  From one device's profile the two cannot be told apart."""
    return "kernel_floor_us" if generation == "cpu" else "kernel_floor_mflop"


def fit_constants(points: list[FitPoint], start: GenerationConstants,
                  fixed: dict[str, float] | None = None) -> GenerationConstants:
    """Least squares on log(predicted / measured) -- relative error, so small slices count as much
    as large ones -- within physical bounds (efficiencies in (0, 1]), from ``start`` and from a
    neutral point; the better of the two fits wins.  ``fixed``: constants held at given values."""
    from scipy.optimize import least_squares

    names = [f.name for f in fields(GenerationConstants)]
    linear = ("kernel_floor_us", "kernel_floor_mflop")  # may be 0: fitted linearly, the rest in log space
    lo, hi = _LOWER.as_vector(), _UPPER.as_vector()
    logs = np.array([nm not in linear for nm in names])
    zlo, zhi = np.where(logs, np.log(lo, where=logs, out=lo.copy()), lo), np.where(logs, np.log(hi), hi)
    groups = _grouped(points)
    y = np.array([p.seconds for p in points])

    fixed = fixed or {}
    hold = np.array([nm in fixed for nm in names])
    held = np.array([fixed.get(nm, 0.0) for nm in names])

    def to_k(z):
        return GenerationConstants.from_vector(np.where(hold, held, np.where(logs, np.exp(z), z)))

    def residuals(z):
        k = to_k(z)
        pred = np.empty(len(points))
        for idx, p0, n, c, b in groups:
            pred[idx] = unit_time_v2(p0.unit, n, c, b, p0.tp, p0.peak_flops, p0.bandwidth_bps, p0.dtype_bytes, k)
        return np.log(pred / y)

    best = None
    for s in (start, _NEUTRAL):
        x = np.clip(s.as_vector(), lo * 1.0001 + 1e-12, hi)
        z0 = np.clip(np.where(logs, np.log(x), x), zlo, zhi)
        # held constants keep a tiny box (least_squares needs lower < upper); to_k overrides them
        zl, zh = np.where(hold, z0 - 1e-9, zlo), np.where(hold, z0 + 1e-9, zhi)
        res = least_squares(residuals, np.clip(z0, zl, zh), bounds=(zl, zh))
        if best is None or res.cost < best.cost:
            best = res
    return to_k(best.x)


# ---- the cost model ----------------------------------------------------------------------
class RooflineConfig(CostModelConfig):
    kind: str = "roofline"
    version: Literal[1, 2] = 2
    """2 (default): GEMM, attention and elementwise kernels with per-generation efficiencies.
    1: the round-1 model, one compute and one memory efficiency for everything."""
    calibration: str | None = None
    """Version 2: a profile JSON written by `hpipe profile` (relative paths: from the scenario
    file's folder); the constants of each profiled device's generation are refitted on it."""
    compute_efficiency: float | None = Field(None, gt=0, le=1)
    """Version 1 only (default 0.6): share of datasheet peak FLOP/s every unit reaches."""
    memory_efficiency: float | None = Field(None, gt=0, le=1)
    """Version 1 only (default 0.8): share of datasheet memory bandwidth streaming kernels reach."""
    link_efficiency: float = Field(0.9, gt=0, le=1)
    """Share of link bandwidth a large point-to-point transfer gets (TCP/PCIe protocol overhead)."""
    kernel_overhead_us: float = Field(5.0, ge=0)
    """Host launch and framework overhead per kernel (PyTorch eager on a GPU: about 5-10 us).
    Version 1 adds it to every unit; version 2 takes the longer of device time and launch time."""
    kernels_per_unit: dict[str, int] | None = None
    """Version 1 only (default embed 2, attn 8, mlp 6, head 2): kernels each unit kind launches."""

    @model_validator(mode="after")
    def _version_fields(self):
        if self.version == 2:
            for name in ("compute_efficiency", "memory_efficiency", "kernels_per_unit"):
                if getattr(self, name) is not None:
                    raise ValueError(f"'{name}' is a version-1 constant (add 'version: 1'); version 2 "
                                     f"takes its efficiencies per device generation or from 'calibration'")
        elif self.calibration is not None:
            raise ValueError("'calibration' needs version 2")
        return self


_V1_KERNELS = {"embed": 2, "attn": 8, "mlp": 6, "head": 2}


@register
class Roofline(CostModel):
    name = "roofline"
    Config = RooflineConfig

    def __init__(self, config: RooflineConfig, setup):
        super().__init__(config, setup)
        self.constants: dict[str, GenerationConstants] = dict(GENERATIONS)
        self.calibrated: dict[str, str] = {}  # generation -> profiled device it was fitted on
        if config.version == 1:
            kernels = config.kernels_per_unit or _V1_KERNELS
            self._compute_eff = config.compute_efficiency or 0.6
            self._memory_eff = config.memory_efficiency or 0.8
            self._overhead_s = {k: v * config.kernel_overhead_us * 1e-6 for k, v in kernels.items()}
        elif config.calibration is not None:
            from hpipe.costmodels.calibration import calibrate

            path = setup.scenario.resolve_path(config.calibration)
            try:
                fitted = calibrate(path, setup, self.constants)
            except InputError as e:
                raise InputError(str(e), field="calibration") from None
            for gen, (consts, device) in fitted.items():
                self.constants[gen] = consts
                self.calibrated[gen] = device

    def unit_time_s(self, unit, device_id, n, c, b, tp=1):
        spec = self.cluster.device(device_id).spec
        if self.config.version == 1:
            return self._unit_time_v1(unit, spec, n, c, b, tp)
        t = unit_time_v2(unit, n, c, b, tp, spec.peak_tflops(self.dtype) * 1e12, spec.memory_bandwidth_gbps * 1e9,
                         self.dtype_bytes, self.constants[spec.generation])
        return np.maximum(t, KERNELS[unit.kind] * self.config.kernel_overhead_us * 1e-6)

    def _unit_time_v1(self, unit, spec, n, c, b, tp):
        flops = unit.flops(n, c, b) / tp
        nbytes = unit.bytes_moved(n, c, b, self.dtype_bytes) / tp
        compute_s = flops / (spec.peak_tflops(self.dtype) * 1e12 * self._compute_eff)
        memory_s = nbytes / (spec.memory_bandwidth_gbps * 1e9 * self._memory_eff)
        return np.maximum(compute_s, memory_s) + self._overhead_s.get(unit.kind, 0.0)

    def transfer_time_s(self, src, dst, nbytes):
        nbytes = np.asarray(nbytes, float)
        if src == dst:
            return np.zeros_like(nbytes)
        r = self.cluster.route(src, dst)
        bw = r.bandwidth_gbps * 1e9 / 8 * self.config.link_efficiency
        return np.where(nbytes > 0, r.latency_s + nbytes / bw, 0.0)

    def describe(self):
        d = {k: v for k, v in super().describe().items() if v is not None}
        if self.config.version == 1:  # the values in effect, defaults included
            d.update(compute_efficiency=self._compute_eff, memory_efficiency=self._memory_eff,
                     kernels_per_unit=self.config.kernels_per_unit or dict(_V1_KERNELS))
        else:
            gens = sorted({dev.spec.generation for dev in self.cluster.devices})
            d["generations"] = {g: asdict(self.constants[g]) for g in gens}
            if self.calibrated:
                d["calibrated_on"] = dict(self.calibrated)
        return d


def constants_literal(k: GenerationConstants) -> str:
    """The constants as a Python literal, to paste into GENERATIONS."""
    parts = []
    for f in fields(k):
        v = getattr(k, f.name)
        parts.append(f"{f.name}={v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{f.name}={v:.3e}")
    return "GenerationConstants(" + ", ".join(parts) + ")"

