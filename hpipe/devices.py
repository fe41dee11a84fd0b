"""The device catalog: datasheet figures of the accelerators people own.

Peak figures are dense (no structured sparsity).  ``fp16_tflops`` is the
tensor-core rate with FP32 accumulation where the vendor gives both (what
PyTorch's fp16/bf16 GEMMs use); cards without tensor cores list their vector
half-precision rate.  ``idle_power_w`` is what nvidia-smi typically reports for
an idle card in its default power state; it is approximate, and per-scenario
custom devices can override it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator

def paced(cpu_quota: float | None, threads: int | None = 1) -> bool:
    """Whether an emulated slower CPU device (``runtime.cpu_quota``) is held to its speed by
    pacing its compute (``hpipe.runtime.emulation.Pace``): one thread, below one core.  The
    runtime paces it and the profiler's unit sweeps do not, so the fitted model prices it by
    CPU time / quota; any other slowed device is held to its quota by CFS bandwidth."""
    return bool(cpu_quota) and float(cpu_quota) < 1.0 and int(threads or 1) == 1


GENERATIONS = ("pascal", "volta", "turing", "ampere", "ada", "hopper", "cpu")
"""Architecture generations the roofline cost model has constants for (one row each in
``hpipe.costmodels.roofline.GENERATIONS``)."""


NO_BF16 = ("pascal", "volta", "turing")
"""GPU generations without bf16 arithmetic (NVIDIA added it with Ampere, compute capability
8.0): PyTorch runs bf16 there through fp32 math, so a bf16 GEMM is priced at the fp32 peak,
not the fp16 one (a P100 had been priced at its 18.7 fp16 TFLOP/s in bf16)."""


class DeviceSpec(BaseModel):
    """One device type: what a cost model needs to know about it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    fp16_tflops: PositiveFloat = Field(description="dense fp16 peak (bf16 too, where the generation has it), TFLOP/s")
    fp32_tflops: PositiveFloat = Field(description="dense fp32 peak, TFLOP/s (no TF32)")
    memory_gb: PositiveFloat = Field(description="device memory, GB (10^9 bytes)")
    memory_bandwidth_gbps: PositiveFloat = Field(description="memory bandwidth, GB/s (bytes)")
    power_w: PositiveFloat = Field(description="board power at full load, W")
    idle_power_w: float = Field(ge=0, description="idle board power, W")
    interconnect_gbps: PositiveFloat = Field(
        description="default link to the other devices of its host, Gbit/s (one direction)")
    interconnect_latency_us: float = Field(default=10.0, ge=0)
    kind: str = Field(default="gpu", description="gpu | cpu")
    generation: str = Field(
        default="ampere",
        description="architecture generation (pascal | volta | turing | ampere | ada | hopper | cpu): "
                    "which row of the roofline's efficiency table (hpipe.costmodels.roofline.GENERATIONS) "
                    "prices this device")
    source: str = ""
    price_per_hour: float | None = Field(
        default=None, ge=0, description="USD per device-hour, on-demand; None: no public list price")
    price_source: str = ""

    @field_validator("generation")
    @classmethod
    def _generation(cls, v: str) -> str:
        if v not in GENERATIONS:
            raise ValueError(f"unknown generation {v!r}; one of {', '.join(GENERATIONS)}")
        return v

    def peak_tflops(self, dtype: str) -> float:
        """The peak a GEMM in ``dtype`` runs at: fp32's, fp16's, and bf16 at fp16's where the
        generation has bf16 units, else at fp32's (``NO_BF16``)."""
        if dtype == "float32" or (dtype == "bfloat16" and self.generation in NO_BF16):
            return self.fp32_tflops
        return self.fp16_tflops

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9


# PCIe one-direction payload rates: 3.0 x16 ≈ 15.75 GB/s, 4.0 x16 ≈ 31.5 GB/s, 5.0 x16 ≈ 63 GB/s.
PCIE3, PCIE4, PCIE5 = 126.0, 252.0, 504.0

_CATALOG = [
    DeviceSpec(name="P100", generation="pascal",
               fp16_tflops=18.7, fp32_tflops=9.3, memory_gb=16, memory_bandwidth_gbps=732,
               power_w=250, idle_power_w=30, interconnect_gbps=PCIE3,
               source="NVIDIA Tesla P100 PCIe datasheet (2016): 18.7 TF fp16, 9.3 TF fp32, 732 GB/s"),
    DeviceSpec(name="V100", generation="volta",
               fp16_tflops=112, fp32_tflops=14, memory_gb=32, memory_bandwidth_gbps=900,
               power_w=250, idle_power_w=35, interconnect_gbps=PCIE3,
               source="NVIDIA V100 PCIe datasheet: 112 TF tensor, 14 TF fp32, 900 GB/s, 250 W"),
    DeviceSpec(name="T4", generation="turing",
               fp16_tflops=65, fp32_tflops=8.1, memory_gb=16, memory_bandwidth_gbps=320,
               power_w=70, idle_power_w=10, interconnect_gbps=PCIE3,
               source="NVIDIA T4 datasheet: 65 TF mixed precision, 8.1 TF fp32, 320 GB/s, 70 W"),
    DeviceSpec(name="GTX1080Ti", generation="pascal",
               fp16_tflops=0.177, fp32_tflops=11.3, memory_gb=11,
               memory_bandwidth_gbps=484, power_w=250, idle_power_w=15, interconnect_gbps=PCIE3,
               source="NVIDIA GP102 specs: 11.3 TF fp32, fp16 at 1/64 rate, 484 GB/s, 250 W"),
    DeviceSpec(name="RTX2080Ti", generation="turing",
               fp16_tflops=53.8, fp32_tflops=13.4, memory_gb=11,
               memory_bandwidth_gbps=616, power_w=250, idle_power_w=15, interconnect_gbps=PCIE3,
               source="NVIDIA Turing whitepaper: 53.8 TF fp16 tensor w/ fp32 acc (reference), 616 GB/s"),
    DeviceSpec(name="RTX3060", generation="ampere",
               fp16_tflops=25.6, fp32_tflops=12.7, memory_gb=12,
               memory_bandwidth_gbps=360, power_w=170, idle_power_w=12, interconnect_gbps=PCIE4,
               source="NVIDIA Ampere GA10x whitepaper / RTX 3060 spec: 12.7 TF fp32, 360 GB/s, 170 W"),
    DeviceSpec(name="RTX3090", generation="ampere",
               fp16_tflops=71, fp32_tflops=35.6, memory_gb=24, memory_bandwidth_gbps=936,
               power_w=350, idle_power_w=20, interconnect_gbps=PCIE4,
               source="NVIDIA Ampere GA102 whitepaper: 71 TF fp16 tensor w/ fp32 acc, 35.6 TF fp32, 936 GB/s"),
    DeviceSpec(name="RTX4090", generation="ada",
               fp16_tflops=165.2, fp32_tflops=82.6, memory_gb=24,
               memory_bandwidth_gbps=1008, power_w=450, idle_power_w=20, interconnect_gbps=PCIE4,
               source="NVIDIA Ada Lovelace whitepaper: 165.2 TF fp16 tensor w/ fp32 acc, 82.6 TF fp32"),
    DeviceSpec(name="A10", generation="ampere",
               fp16_tflops=125, fp32_tflops=31.2, memory_gb=24, memory_bandwidth_gbps=600,
               power_w=150, idle_power_w=20, interconnect_gbps=PCIE4,
               source="NVIDIA A10 datasheet: 125 TF fp16 tensor, 31.2 TF fp32, 600 GB/s, 150 W"),
    DeviceSpec(name="L4", generation="ada",
               fp16_tflops=121, fp32_tflops=30.3, memory_gb=24, memory_bandwidth_gbps=300,
               power_w=72, idle_power_w=16, interconnect_gbps=PCIE4,
               source="NVIDIA L4 datasheet: 242 TF fp16 with sparsity (121 dense), 30.3 TF fp32, 300 GB/s"),
    DeviceSpec(name="A6000", generation="ampere",
               fp16_tflops=154.8, fp32_tflops=38.7, memory_gb=48, memory_bandwidth_gbps=768,
               power_w=300, idle_power_w=25, interconnect_gbps=PCIE4,
               source="NVIDIA RTX A6000 datasheet: 309.7 TF fp16 with sparsity (154.8 dense), 768 GB/s"),
    DeviceSpec(name="A40", generation="ampere",
               fp16_tflops=149.7, fp32_tflops=37.4, memory_gb=48,
               memory_bandwidth_gbps=696, power_w=300, idle_power_w=30, interconnect_gbps=PCIE4,
               source="NVIDIA A40 datasheet: 149.7 TF fp16 tensor (299.4 with sparsity), 37.4 TF fp32, "
                      "696 GB/s GDDR6, 300 W"),
    DeviceSpec(name="A5000", generation="ampere",
               fp16_tflops=111.1, fp32_tflops=27.8, memory_gb=24, memory_bandwidth_gbps=768,
               power_w=230, idle_power_w=20, interconnect_gbps=PCIE4,
               source="NVIDIA RTX A5000 datasheet: 222.2 TF tensor with sparsity (111.1 dense), 27.8 TF fp32, "
                      "24 GB GDDR6, 768 GB/s, 230 W (idle power estimated)"),
    DeviceSpec(name="A4000", generation="ampere",
               fp16_tflops=76.7, fp32_tflops=19.2, memory_gb=16, memory_bandwidth_gbps=448,
               power_w=140, idle_power_w=12, interconnect_gbps=PCIE4,
               source="NVIDIA RTX A4000 datasheet: 153.4 TF tensor with sparsity (76.7 dense), 19.2 TF fp32, "
                      "16 GB GDDR6, 448 GB/s, 140 W (idle power estimated)"),
    DeviceSpec(name="L40S", generation="ada",
               fp16_tflops=362, fp32_tflops=91.6, memory_gb=48, memory_bandwidth_gbps=864,
               power_w=350, idle_power_w=35, interconnect_gbps=PCIE4,
               source="NVIDIA L40S datasheet: 733 TF fp16 with sparsity (362 dense), 91.6 TF fp32, 864 GB/s"),
    DeviceSpec(name="A100-40GB", generation="ampere",
               fp16_tflops=312, fp32_tflops=19.5, memory_gb=40,
               memory_bandwidth_gbps=1555, power_w=400, idle_power_w=50, interconnect_gbps=2400,
               source="NVIDIA A100 datasheet (SXM4 40GB): 312 TF fp16, 19.5 TF fp32, 1555 GB/s, "
                      "NVLink 600 GB/s total (300 GB/s per direction)"),
    DeviceSpec(name="A100-80GB", generation="ampere",
               fp16_tflops=312, fp32_tflops=19.5, memory_gb=80,
               memory_bandwidth_gbps=2039, power_w=400, idle_power_w=55, interconnect_gbps=2400,
               source="NVIDIA A100 datasheet (SXM4 80GB): 312 TF fp16, 19.5 TF fp32, 2039 GB/s"),
    DeviceSpec(name="H100", generation="hopper",
               fp16_tflops=989, fp32_tflops=67, memory_gb=80, memory_bandwidth_gbps=3350,
               power_w=700, idle_power_w=70, interconnect_gbps=3600,
               source="NVIDIA H100 SXM5 datasheet: 1979 TF fp16 with sparsity (989 dense), 67 TF fp32, "
                      "3.35 TB/s, NVLink 900 GB/s total"),
    DeviceSpec(name="CPU", generation="cpu",
               fp16_tflops=0.2, fp32_tflops=0.4, memory_gb=32, memory_bandwidth_gbps=40,
               power_w=65, idle_power_w=10, interconnect_gbps=80, interconnect_latency_us=20, kind="cpu",
               source="generic 8-core AVX2 desktop CPU: 8 cores x 3 GHz x 16 fp32 FMA-FLOPs; "
                      "dual-channel DDR4; shared memory between processes"),
]

# On-demand list prices per GPU-hour, only where a cloud sells the card alone or in a
# fixed-count instance (price / GPUs); the instance's CPUs, memory and disk are included,
# so these are what renting the device costs, not the card alone.  AWS us-east-1 Linux
# on-demand rates as published on aws.amazon.com/ec2/pricing/on-demand (2024); prices
# change: set `price_per_hour` on a device entry for your own.  Cards no cloud lists
# (P100, GeForce, ...) have none, and a plan using one reports no cost.
_PRICES = {
    "T4": (0.526, "AWS g4dn.xlarge (1 x T4) on-demand, us-east-1, 2024: $0.526/h"),
    "L4": (0.8048, "AWS g6.xlarge (1 x L4) on-demand, us-east-1, 2024: $0.8048/h"),
    "A100-40GB": (32.7726 / 8, "AWS p4d.24xlarge (8 x A100-40GB) on-demand, us-east-1, 2024: $32.7726/h / 8"),
    "A100-80GB": (40.9657 / 8, "AWS p4de.24xlarge (8 x A100-80GB) on-demand, us-east-1, 2024: $40.9657/h / 8"),
    "H100": (98.32 / 8, "AWS p5.48xlarge (8 x H100) on-demand, us-east-1, 2024 (before the mid-2025 cut): "
                        "$98.32/h / 8"),
}
_CATALOG = [d.model_copy(update={"price_per_hour": _PRICES[d.name][0], "price_source": _PRICES[d.name][1]})
            if d.name in _PRICES else d for d in _CATALOG]

DEVICES: dict[str, DeviceSpec] = {d.name: d for d in _CATALOG}
