"""Shared pieces of the runtime tests: a tiny scenario with four CPU devices, hand-made plans."""

from __future__ import annotations

import pytest

from hpipe.plan import Plan, Stage
from hpipe.scenario import parse_scenario

CORE = {"name": "core", "count": 4, "peak_tflops": 0.05, "memory_gb": 2, "memory_bandwidth_gbps": 10,
        "power_w": 10, "runtime": {"device": "cpu", "threads": 1}}

TINY_LLAMA = {"family": "llama", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
              "vocab_size": 128}
TINY_GPT = {"family": "gpt", "n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 256, "vocab_size": 128,
            "max_seq_len": 128}


def tiny_setup(model=None, seq_len=48, batch_size=3, dtype="float32", devices=None, output_tokens=0, sampling=None,
               **extra):
    workload = {"seq_len": seq_len, "batch_size": batch_size}
    if output_tokens:
        workload["output_tokens"] = output_tokens
    if sampling:
        workload["sampling"] = sampling
    data = {"name": "tiny", "model": model or TINY_LLAMA, "dtype": dtype, "workload": workload,
            "cluster": {"hosts": [{"name": "local", "devices": devices or [CORE],
                                   "interconnect": {"bandwidth_gbps": 20, "latency_us": 50}}]},
            "planner": {"kind": "hpipe", "token_granularity": 8}, **extra}
    return parse_scenario(data, "tiny.yaml").resolve()


def plan(stages, slices, micro_batches=1, planner="hand", decode_micro_batches=None):
    """stages: [(device numbers or names, (start, end))]; a number d is local/core-d."""
    return Plan(planner=planner, scenario="tiny",
                stages=[Stage(devices=[f"local/core-{d}" if isinstance(d, int) else f"local/{d}" for d in devs],
                              units=units) for devs, units in stages],
                slices=slices, micro_batches=micro_batches, decode_micro_batches=decode_micro_batches)


@pytest.fixture(scope="session")
def llama_setup():
    """The tiny LLaMA scenario (import this fixture into a test module to use it)."""
    return tiny_setup()


# Tiny Hugging Face models that transformers builds and saves at test time (float32). Weights drawn
# wider than the usual 0.02 so that greedy decoding wanders over the vocabulary instead of
# repeating one token: an off-by-one position or a stale cache entry then changes the ids.
HF_INIT_STD = 0.3


def save_hf_llama(folder, seed=0, **cfg):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, initializer_range=HF_INIT_STD,
               bos_token_id=None, eos_token_id=None, pad_token_id=0) | cfg
    config = transformers.LlamaConfig(**cfg)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def save_hf_gpt2(folder, seed=0, **cfg):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128, n_inner=256,
                                     initializer_range=HF_INIT_STD, bos_token_id=None, eos_token_id=None,
                                     pad_token_id=0, **cfg)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def run_two_hosts_with_torchrun(scenario, plan, extra: list[str], json_out, *, env: dict, cwd,
                                hb_extra: tuple[str, ...] = (), returncodes=(0, 0),
                                ha_extra: tuple[str, ...] = ()) -> list[tuple]:
    """Run ``hpipe.runtime.torchrun`` as two torchrun nodes on this machine, hosts "ha" (node
    0, which writes ``json_out``; given ``ha_extra`` too) and "hb" (``hb_extra``); asserts their exit codes
    are ``returncodes`` and returns their (stdout, stderr).  Each node runs in its own
    session, killed whole if it outlives the timeout."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for node_rank, host in enumerate(["ha", "hb"]):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node_rank}",
               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
               "-m", "hpipe.runtime.torchrun", str(scenario), "--plan", str(plan), "--host", host,
               "--warmup", "0", "--timeout", "30", *extra, *(hb_extra if host == "hb" else ha_extra)] \
            + (["--json", str(json_out)] if node_rank == 0 else [])
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=cwd, start_new_session=True))
    try:
        results = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    for p, code, (_, e) in zip(procs, returncodes, results):
        assert p.returncode == code, e[-3000:]
    return results
