"""The runtime on GPUs: CUDA stages, a plan mixing a CPU and a GPU stage, NCCL between GPUs.

Skipped where torch sees no CUDA device (the CI machine); run it where one is:
``pytest tests/runtime/test_runtime_cuda.py``.  The same checks as on CPU processes:
every position's logits equal a single-process float32 forward on the CPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from hpipe.runtime.launcher import backend_for, execute, launch, make_ids, reference_logits  # noqa: E402

from runtime_helpers import CORE, plan, tiny_setup  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]
# float32 matmuls in full precision, as the CPU reference (torch's default); an NGC-style
# environment that forces TF32 on cuBLAS only meets a looser bound
TF32_FORCED = os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE") == "1" or \
    os.environ.get("NVIDIA_TF32_OVERRIDE", "0") != "0"
TOL = 1e-2 if TF32_FORCED else 1e-4
N = 6  # units of the tiny models: embed, 2 x (attn, mlp), head
N_GPUS = torch.cuda.device_count()
GPU = {"name": "gpu", "count": min(N_GPUS, 2), "peak_tflops": 20, "memory_gb": 8, "memory_bandwidth_gbps": 500,
       "power_w": 250, "runtime": {"device": "cuda"}}  # gpu-i runs on cuda:i


@pytest.fixture(scope="module")
def mixed_setup():
    return tiny_setup(devices=[dict(CORE, count=2), GPU])


def _check(setup, p):
    ids = make_ids(setup)
    run = launch(setup, p.check(setup), ids=ids, warmup=0, all_logits=True, timeout_s=60)
    ref = reference_logits(setup, ids, all_positions=True)
    assert np.abs(run.all_logits - ref).max() < TOL
    return run


def test_cpu_stage_then_gpu_stage(mixed_setup):
    p = plan([([0], (0, 2)), (["gpu-0"], (2, N))], [24, 16, 8])
    assert backend_for(["cpu", "cuda:0"]) == "gloo"  # activations staged through host memory
    run = _check(mixed_setup, p)
    assert run.records[1]["peak_how"] == "cuda max_memory_allocated" and run.records[1]["peak_bytes"] > 0


def test_gpu_stage_then_cpu_stage_micro_batches(mixed_setup):
    _check(mixed_setup, plan([(["gpu-0"], (0, 3)), ([1], (3, N))], [32, 16], micro_batches=3))


def test_execute_mixed_result(mixed_setup):
    p = plan([([0], (0, 1)), (["gpu-0"], (1, 5)), ([1], (5, N))], [16, 16, 16]).check(mixed_setup)
    r = execute(mixed_setup, p, check=True, quiet=True, warmup=1, timeout_s=60)
    assert r.max_abs_error is not None and r.max_abs_error < TOL
    assert r.peak_memory_mb["local/gpu-0"] > 0
    computes = [e for e in r.events if e.kind == "compute" and e.device == "local/gpu-0"]
    assert len(computes) == len(p.slices) and all(e.end_s > e.start_s for e in computes)


def test_two_stages_on_one_gpu_is_an_input_error():
    from hpipe.errors import InputError
    from hpipe.runtime.launcher import placements

    setup = tiny_setup(devices=[dict(GPU, count=1), dict(GPU, name="other", count=1)])  # both cuda:0
    with pytest.raises(InputError, match=r"local/other-0 and local/gpu-0 would both run on cuda:0"):
        placements(setup, setup.cluster.device_ids)


@pytest.mark.skipif(N_GPUS < 2, reason="NCCL between GPUs needs two")
def test_two_gpus_over_nccl(mixed_setup):
    setup = tiny_setup(devices=[GPU])
    assert backend_for(["cuda:0", "cuda:1"]) == "nccl"
    _check(setup, plan([(["gpu-0"], (0, 3)), (["gpu-1"], (3, N))], [24, 16, 8], micro_batches=3))
    _check(setup, plan([(["gpu-0", "gpu-1"], (0, N))], [32, 16]))  # tensor parallel: NCCL all-reduce
