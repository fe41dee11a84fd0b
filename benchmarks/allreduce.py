"""How long a small all-reduce takes between two CPU worker processes, timed four ways.

    PYTHONPATH=. python benchmarks/allreduce.py

Two processes (gloo, one thread each, pinned to cores 0 and 1), message sizes of a
decode step's all-reduce (2-4 KiB) up to a prefill slice's (1 MiB):

* a barrier, then one all-reduce: the median of 10 (how ``hpipe profile`` timed them
  before 2026-12-02);
* a chain of 40 back to back: total / 40;
* a chain with a little compute before each, as a tensor-parallel stage runs them: the
  all-reduce part of the total / 40;
* the same chain, each all-reduce timed on its own: mean and median (how ``hpipe
  profile`` times them now: ``hpipe.runtime.profile_links.all_reduces``).

Compare with the all-reduce events of a real tensor-parallel run (``Run.records[role]
["events"]`` and ``["decode"]["events"]``, kind ``allreduce``): a stage pays the sum of
its all-reduces, so their mean is the figure that predicts it.
"""

import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def main(rank: int, world: int, port: int) -> None:
    os.sched_setaffinity(0, {rank % os.cpu_count()})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    w = torch.nn.Linear(512, 512)
    h = torch.randn(1, 512)

    def compute():
        nonlocal h
        with torch.inference_mode():
            for _ in range(4):
                h = torch.tanh(w(h))

    for size in (2048, 4096, 65536, 1 << 20):
        x = torch.zeros(size // 4)
        ts = []
        for _ in range(12):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(x)
            ts.append(time.perf_counter() - t)
        one = statistics.median(ts[2:])
        dist.barrier()
        t = time.perf_counter()
        for _ in range(40):
            dist.all_reduce(x)
        chain = (time.perf_counter() - t) / 40
        dist.barrier()
        t, comp = time.perf_counter(), 0.0
        for _ in range(40):
            c = time.perf_counter()
            compute()
            comp += time.perf_counter() - c
            dist.all_reduce(x)
        with_compute = (time.perf_counter() - t - comp) / 40
        ds = []
        dist.barrier()
        for _ in range(60):
            compute()
            t = time.perf_counter()
            dist.all_reduce(x)
            ds.append(time.perf_counter() - t)
        ds = ds[5:]
        if rank == 0:
            print(f"{size:8d} B: barrier+one median {one * 1e3:.3f} ms | chain {chain * 1e3:.3f} ms | "
                  f"chain w/ compute (AR part) {with_compute * 1e3:.3f} ms, compute {comp / 40 * 1e3:.3f} ms | "
                  f"timed in chain: mean {statistics.mean(ds) * 1e3:.3f} median {statistics.median(ds) * 1e3:.3f}",
                  flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU")
    print(f"CPU: {cpu}, {os.cpu_count()} logical CPUs; load average {open('/proc/loadavg').read().split()[0]}")
    mp.spawn(main, args=(2, 29533), nprocs=2)
