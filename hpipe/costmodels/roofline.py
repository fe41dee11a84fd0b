"""The analytic roofline cost model: datasheet peaks times documented efficiencies.

A unit's time on a device is

    max(FLOPs / (peak_tflops * compute_efficiency),
        bytes moved / (memory_bandwidth * memory_efficiency))
    + kernels(unit) * kernel_overhead_us

and a transfer takes latency + bytes / (link bandwidth * link_efficiency).
Every constant is a field of ``RooflineConfig`` and can be set in a scenario:

    costmodel: {kind: roofline, compute_efficiency: 0.5, kernel_overhead_us: 6}
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from hpipe.costmodels import CostModel, CostModelConfig, register


class RooflineConfig(CostModelConfig):
    kind: str = "roofline"
    compute_efficiency: float = Field(0.6, gt=0, le=1)
    """Share of datasheet peak FLOP/s that large prefill GEMMs reach (cuBLAS on fp16 GEMMs
    of the sizes in 7B-70B models typically reaches 60-75% of dense tensor peak)."""
    memory_efficiency: float = Field(0.8, gt=0, le=1)
    """Share of datasheet memory bandwidth that streaming kernels reach (STREAM-like: 75-90%)."""
    link_efficiency: float = Field(0.9, gt=0, le=1)
    """Share of link bandwidth a large point-to-point transfer gets (TCP/PCIe protocol overhead)."""
    kernel_overhead_us: float = Field(5.0, ge=0)
    """Launch and framework overhead per kernel (PyTorch eager on a GPU: about 5-10 us)."""
    kernels_per_unit: dict[str, int] = {"embed": 2, "attn": 8, "mlp": 6, "head": 2}
    """Kernels each unit kind launches in eager PyTorch: attention = norm, q/k/v projections,
    2 rotary, fused attention, output projection (+ residual add fused)."""


@register
class Roofline(CostModel):
    name = "roofline"
    Config = RooflineConfig

    def __init__(self, config: RooflineConfig, setup):
        super().__init__(config, setup)
        self._overhead_s = {k: v * config.kernel_overhead_us * 1e-6 for k, v in config.kernels_per_unit.items()}

    def unit_time_s(self, unit, device_id, n, c, b, tp=1):
        spec = self.cluster.device(device_id).spec
        cfg = self.config
        flops = unit.flops(n, c, b) / tp
        nbytes = unit.bytes_moved(n, c, b, self.dtype_bytes) / tp
        compute_s = flops / (spec.peak_tflops(self.dtype) * 1e12 * cfg.compute_efficiency)
        memory_s = nbytes / (spec.memory_bandwidth_gbps * 1e9 * cfg.memory_efficiency)
        return np.maximum(compute_s, memory_s) + self._overhead_s.get(unit.kind, 0.0)

    def transfer_time_s(self, src, dst, nbytes):
        nbytes = np.asarray(nbytes, float)
        if src == dst:
            return np.zeros_like(nbytes)
        r = self.cluster.route(src, dst)
        bw = r.bandwidth_gbps * 1e9 / 8 * self.config.link_efficiency
        return np.where(nbytes > 0, r.latency_s + nbytes / bw, 0.0)
