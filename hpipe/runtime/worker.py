"""A stage worker: one process per device of a plan, running its stage's units.

Every worker walks the plan's work items in order (``for micro_batch: for
slice:``).  For each item it gets its input -- token ids for the first stage,
the previous stage's hidden states otherwise -- runs its run of units with the
micro-batch's KV cache, and sends the result on to the next stage without
waiting (``isend``), so the transfer overlaps the next item's compute.

Why a loop of our own over send/recv rather than torch.distributed.pipelining:
that library needs static shapes and has no KV cache, while token slices have
uneven lengths and attend to a growing cache.

Wire protocol between two stages, per item: a 6-int64 header (micro_batch,
slice, batch, tokens, context, codec) then the activation (batch, tokens,
d_model), or, where the plan puts a lossy codec on the boundary and it pays for
this message (``hpipe.codecs.boundary_costs``), the codec's wire bytes
(``hpipe.runtime.codecs``).  The sender encodes right after its compute and the
receiver decodes right before its own, both inside the stage's compute stamp (the
simulator charges codec time to the stages too); the transfer moves the wire bytes.
Both sides know the plan, so the receiver posts both receives ahead of time
(a receive thread keeps up to ``RECV_DEPTH`` items in flight) and checks the
header: a desynchronised pipeline fails loudly instead of computing garbage.
Every receive is bounded by ``timeout_s`` (gloo point-to-point has hung in
the wild).  Over gloo the activation travels as raw bytes (any dtype, CPU
staging for GPU stages); between GPUs over NCCL as the typed CUDA tensor.

A tensor-parallel stage (several devices): its first device (the leader)
receives the stage input and forwards it to each peer, every device runs its
shard of the units with an all-reduce over the stage's process group, and
the leader alone sends the result on -- the same shape the cost model
assumes.

Every compute, all-reduce, send and receive is stamped with
``time.perf_counter`` (CLOCK_MONOTONIC: one clock for all processes of a
host); ``t_sync``, taken right after a barrier, aligns hosts.
"""

from __future__ import annotations

import hashlib
import os
import queue
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from hpipe.codecs import get_codec
from hpipe.models import ModelSpec
from hpipe.procwatch import start_watching
from hpipe.runtime import emulation
from hpipe.runtime.codecs import CODEC_IDS, CODEC_NAMES, decode, encode
from hpipe.runtime.here import proc_kib_bytes
from hpipe.runtime.model import TORCH_DTYPES, build_units, make_caches, run_units
from hpipe.runtime.weights import weight_source

FORKSERVER_SAVED_ENV = "HPIPE_FORKSERVER_SAVED_ENV"
"""The launcher's PYTHONPATH and PYTHONSAFEPATH, as JSON, while the forkserver starts with its
sys.path in their place (``launcher._launchers_sys_path``)."""


def restore_forkserver_env() -> None:
    """In the forkserver, as its preload imports this module: PYTHONPATH and PYTHONSAFEPATH back
    as the launcher had them, so that no worker (nor what it starts) inherits the launcher's
    whole sys.path as PYTHONPATH, and the current folder off it."""
    import json

    saved = os.environ.pop(FORKSERVER_SAVED_ENV, None)
    set_environ(json.loads(saved) if saved else {})


def set_environ(values: dict[str, str | None]) -> None:
    """Each variable set to its value, or removed where the value is None."""
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


restore_forkserver_env()

RECV_DEPTH = 2  # items a receive thread may hold ahead of the compute loop
MAX_PENDING_SENDS = 4  # isends in flight before the sender waits for the oldest
clock = time.perf_counter


@dataclass
class WorkerConfig:
    """Everything one worker needs; picklable, sent to the worker process."""

    role: int
    """Index of this worker's device in ``devices`` (plan order)."""
    devices: list[str]
    stages: list[tuple[tuple[int, ...], int, int]]
    """Per stage: (roles of its devices, first unit, end unit)."""
    spec: ModelSpec
    dtype: str
    weights: str | None
    seed: int
    ids: np.ndarray | None
    """Token ids (batch, seq_len): needed by the first stage only."""
    slices: list[int]
    mb_sizes: list[int]
    device: str = "cpu"
    threads: int = 1
    cores: list[int] | None = None
    backend: str = "gloo"
    init_method: str = "env://"
    world_size: int = 1
    rank: int | None = None
    """Global rank; None: from the environment (torchrun), mapped to roles by host."""
    host: str | None = None
    """torchrun: the scenario host this process runs on."""
    timeout_s: float = 60.0
    startup_timeout_s: float = 600.0
    warmup: int = 0
    all_logits: bool = False
    env: dict[str, str] = field(default_factory=dict)
    launcher_pid: int | None = None
    """The launcher's pid: a worker leaves when it is gone."""
    emulation: object | None = None
    """``hpipe.runtime.emulation.WorkerPlacement`` when this worker runs in an emulated slower
    device (cgroup) or host (network namespace); None: as it is."""
    codecs: list[list[str]] | None = None
    """Per stage boundary, the codec of each work item's message (None: all 'none')."""
    fault: tuple[str, int] | None = None
    """Tests only: ("exit" | "kill" | "hang" | "raise", item) to fail at that item; ("slow", item):
    each prefill item from that one on takes 0.6 × ``timeout_s`` longer (a prefill longer than
    the timeout whose every message still meets it)."""
    generation: object | None = None
    """``hpipe.runtime.decode.GenerationConfig`` when the run generates (decode steps follow
    the prefill); None: prefill only."""

    def items(self) -> list[tuple[int, int, int, int, int]]:
        out = []
        for mb, b in enumerate(self.mb_sizes):
            c = 0
            for s, n in enumerate(self.slices):
                out.append((mb, s, b, n, c))
                c += n
        return out

    def codec(self, boundary: int, i: int) -> str:
        """The codec of item i's message across the boundary after stage ``boundary``."""
        return self.codecs[boundary][i] if self.codecs else "none"

    def stage_of(self, role: int) -> int:
        return next(i for i, (roles, _, _) in enumerate(self.stages) if role in roles)


class CommError(RuntimeError):
    """A receive or send with a peer failed or timed out (``peer_role``: that peer's role, or
    the roles of an all-reduce's peers, any of which may be the cause)."""

    def __init__(self, peer_role: int | tuple[int, ...], message: str):
        self.peer_role = peer_role
        super().__init__(message)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def library_rss_bytes() -> int:
    """Resident pages of the code this process maps: shared libraries (torch's, Python's) and
    the interpreter.  A worker forked from the forkserver faults them in anew (fork copies no
    page-table entries of file mappings) where a torchrun process already has them from its
    import, so they are set apart from a device's memory.  Other file pages stay counted:
    safetensors weights are mapped from their file, and a stage's weights are its memory.
    0 where /proc gives no smaps (another OS)."""
    exe = os.path.realpath(sys.executable)
    total, code = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                fields = line.split(maxsplit=5)  # a mapping's header: "start-end perms offset dev inode [path]"
                if line[0] in "0123456789abcdef" and "-" in fields[0]:
                    path = fields[5].strip() if len(fields) > 5 else ""
                    code = ".so" in os.path.basename(path) or path == exe
                elif code and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


def peak_rss_bytes() -> int:
    """The process's RSS high-water mark: VmHWM (resettable), else getrusage's ru_maxrss."""
    hwm = proc_kib_bytes("/proc/self/status", "VmHWM")
    if hwm is not None:
        return int(hwm)
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024  # macOS reports bytes, Linux KiB


def reset_peak_rss() -> bool:
    """Forget the high-water mark so far (Linux >= 4.0), after handing freed heap back to
    the system: building the weights makes full-size float32 temporaries (random draws,
    shards cut from whole tensors) that the run never needs again."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def apply_placement(cfg: WorkerConfig) -> None:
    """Pin the worker where the scenario says, before torch starts its thread pool."""
    if cfg.cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cfg.cores)
    torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(cfg.device))


class _Inbox:
    """What a receiving thread hands the compute loop, in order: each received message, or the
    exception that stopped the thread.  Bounded (the thread receives at most ``depth`` ahead);
    every wait is bounded too, so a dead peer ends in a named timeout, never a hang."""

    def __init__(self, w: "StageWorker", src_role: int, depth: int):
        self.w, self.src_role = w, src_role
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()

    def put(self, out) -> None:
        """From the receiving thread; gives up once the compute loop has closed the inbox."""
        while not self.stop.is_set():
            try:
                self.q.put(out, timeout=0.2)
                return
            except queue.Full:
                continue

    def take(self, wait_s: float | None = None):
        """From the compute loop: the next message, or raise what stopped the thread (``wait_s``:
        the receive's own bound, default ``timeout_s``; this waits 5 s more, for the thread)."""
        wait_s = self.w.cfg.timeout_s if wait_s is None else wait_s
        try:
            out = self.q.get(timeout=wait_s + 5.0)
        except queue.Empty:
            raise CommError(self.src_role, f"timed out after {wait_s:g}s waiting for "
                                           f"{self.w.describe(self.src_role)}") from None
        if isinstance(out, BaseException):
            raise out
        return out

    def close(self) -> None:
        self.stop.set()


class _Receiver:
    """Receives one peer's items in order; in a thread (gloo) so arrival times are exact
    and receives overlap compute, or inline (NCCL, whose calls stay on the main thread)."""

    def __init__(self, w: "StageWorker", src_role: int, items, codecs: list[str] | None = None):
        self.w, self.src_role, self.items = w, src_role, items
        self.codecs = codecs or ["none"] * len(items)
        """The codec of each item's message (the leader's input boundary; peers get raw bytes)."""
        self.src = w.rank_of[src_role]
        self.threaded = w.cfg.backend == "gloo"
        self.records: list[tuple] = []  # (mb, slice, src_role, t_post, t_done, nbytes)
        self._next = 0
        if self.threaded:
            self.inbox = _Inbox(w, src_role, RECV_DEPTH)
            self.thread = threading.Thread(target=self._loop, name=f"recv-from-{src_role}", daemon=True)
            self.thread.start()

    def _recv_one(self, item, codec: str = "none"):
        w = self.w
        mb, s, b, n, c = item
        timeout = timedelta(seconds=w.cfg.timeout_s)
        hdr = torch.empty(6, dtype=torch.int64, device=w.comm_device)
        t_post = clock()
        try:
            dist.irecv(hdr, self.src).wait(timeout)
            got = tuple(int(v) for v in hdr.tolist())
            if got != (*item, CODEC_IDS[codec]):
                raise CommError(self.src_role, f"protocol error: expected item {item} ({codec}) from "
                                               f"{w.describe(self.src_role)}, got header {got[:5]} "
                                               f"({CODEC_NAMES.get(got[5], got[5])})")
            buf = w.new_activation_buffer(b, n, codec)
            dist.irecv(buf, self.src).wait(timeout)
            # on the stage's device before the stamp: a GPU stage's host-to-device copy (gloo)
            # or the NCCL receive itself is part of the transfer, as the profile times it.
            # A lossy message stays encoded: the compute loop decodes it inside its stamp.
            x = w.as_activation(buf, b, n) if codec == "none" else buf.to(w.device)
            w.sync()
        except CommError:
            raise
        except Exception as e:
            raise receive_failure(w, self.src_role, f"micro-batch {mb} slice {s}", e) from e
        t_done = clock()
        self.records.append((mb, s, self.src_role, t_post, t_done, buf.numel() * buf.element_size()))
        return buf, x

    def _loop(self):
        for item, codec in zip(self.items, self.codecs):
            try:
                out = self._recv_one(item, codec)
            except BaseException as e:  # handed to the compute loop, which raises it
                out = e
            self.inbox.put(out)
            if isinstance(out, BaseException) or self.inbox.stop.is_set():
                return

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next item: as it came over the wire (to forward), and as the stage's input."""
        item, codec = self.items[self._next], self.codecs[self._next]
        self._next += 1
        return self.inbox.take() if self.threaded else self._recv_one(item, codec)

    def close(self):
        if self.threaded:
            self.inbox.close()


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # gloo prefixes messages with the C++ source location; keep what follows it.
    if msg.startswith("[") and "] " in msg:
        msg = msg.split("] ", 1)[1]
    return msg[:300]


def receive_failure(w, src_role: str, what: str, e: BaseException, wait_s: float | None = None) -> CommError:
    """The CommError for a failed receive of ``what`` from ``src_role``: a timeout named as
    one (with its bound ``wait_s``, default the worker's timeout), anything else with gloo's
    message shortened."""
    what = f"{what} from {w.describe(src_role)}"
    if "timed out" in str(e).lower():
        return CommError(src_role, f"timed out after {w.cfg.timeout_s if wait_s is None else wait_s:g}s "
                                   f"waiting for {what}")
    return CommError(src_role, f"receiving {what}: {_short(e)}")


class StageWorker:
    def __init__(self, cfg: WorkerConfig, rank_of: list[int], report=None):
        self.cfg = cfg
        self.rank_of = rank_of
        self.report = report or (lambda *a: None)
        self.stage = cfg.stage_of(cfg.role)
        roles, self.start, self.end = cfg.stages[self.stage]
        self.roles = list(roles)
        self.tp_rank, self.tp_size = self.roles.index(cfg.role), len(self.roles)
        self.leader = self.roles[0]
        self.device = torch.device(cfg.device)
        self.comm_device = self.device if cfg.backend == "nccl" else torch.device("cpu")
        self.dtype = TORCH_DTYPES[cfg.dtype]
        self.last_stage = self.stage == len(cfg.stages) - 1
        self.events: list[tuple] = []  # (kind, mb, slice, t0, t1, nbytes)
        self.sends: list[tuple] = []  # (mb, slice, dst_role, t_issue, nbytes)
        self._pending: list[tuple] = []
        self._item = (0, 0)
        # an emulated slower device (cpu_quota) stretches its compute to its speed
        self.pace = emulation.Pace.of(cfg.emulation if self.device.type == "cpu" else None)

        # Every process creates every tensor-parallel group, in the same order (a collective).
        # Over gloo an all-reduce waits --timeout for its peers, as a receive does (the process
        # group's own is the start-up timeout): a hung shard is then named, not the one waiting.
        self.group = None
        ar_timeout = timedelta(seconds=cfg.timeout_s) if cfg.backend == "gloo" else None
        for st_roles, _, _ in cfg.stages:
            if len(st_roles) > 1:
                g = dist.new_group([rank_of[r] for r in st_roles], timeout=ar_timeout)
                if cfg.role in st_roles:
                    self.group = g

        source = weight_source(cfg.spec, cfg.weights, cfg.seed)
        end = self.end
        if self.tp_rank > 0 and cfg.spec.units()[end - 1].kind == "head":
            # Only the leader's logits are read (it samples and relays them): a peer stops at its
            # last all-reduce and never loads the head (``CostModel.LEADER_KINDS``).
            end -= 1
        self.units = build_units(cfg.spec, self.start, end, source, dtype=self.dtype, device=self.device,
                                 tp_rank=self.tp_rank, tp_size=self.tp_size,
                                 all_reduce=self._all_reduce) if end > self.start else []
        if hasattr(source, "close"):
            source.close()
        self.caches: dict[int, dict] = {}
        self.decoder = None
        if cfg.generation is not None:
            from hpipe.runtime.decode import Decoder

            self.decoder = Decoder(self)
            # one cache per unit for the whole batch, prompt and output long; micro-batches
            # and decode groups use views of their rows
            batch_caches = make_caches(self.units, sum(cfg.mb_sizes), self.decoder.max_len)
            mb_start = [sum(cfg.mb_sizes[:m]) for m in range(len(cfg.mb_sizes) + 1)]
            self.caches = {mb: {i: c.rows(mb_start[mb], mb_start[mb + 1]) for i, c in batch_caches.items()}
                           for mb in range(len(cfg.mb_sizes))}
            self.decoder.group_caches(batch_caches)

    # -- helpers --------------------------------------------------------------
    def describe(self, role: int) -> str:
        return f"stage {self.cfg.stage_of(role)} ({self.cfg.devices[role]})"

    def new_activation_buffer(self, b: int, n: int, codec: str = "none") -> torch.Tensor:
        d = self.cfg.spec.d_model
        if codec != "none":  # the codec's wire bytes, whatever the backend
            return torch.empty(get_codec(codec).wire_bytes(b * n * d, self.dtype.itemsize), dtype=torch.uint8,
                               device=self.comm_device)
        if self.cfg.backend == "gloo":  # raw bytes: any dtype goes over gloo
            return torch.empty(b * n * d * self.dtype.itemsize, dtype=torch.uint8)
        return torch.empty(b, n, d, dtype=self.dtype, device=self.comm_device)

    def sync(self):
        # the compute stream only: a device-wide synchronize would also wait for NCCL sends
        # still in flight on their own streams, and lose the send/compute overlap
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.pace.wait()  # this shard's compute, at the device's speed, before its part leaves
        t0 = clock()
        try:
            dist.all_reduce(x, group=self.group)
        except RuntimeError as e:
            text = str(e).lower()
            if not any(w in text for w in ("timed out", "timeout", "connection", "closed", "reset", "read error",
                                           "write error", "peer")):
                raise  # this shard's own error (a shape, a dtype), not the group's
            # a peer's failure, seen here (a closed connection, a timeout): every peer is a suspect,
            # and the launcher names the one that did not report
            peers = tuple(r for r in self.cfg.stages[self.stage][0] if r != self.cfg.role)
            with_whom = (f"the all-reduce with its tensor-parallel peer{'s' if len(peers) > 1 else ''} "
                         f"{', '.join(self.cfg.devices[r] for r in peers)}")
            if "timed out" in text or "timeout" in text:
                raise CommError(peers, f"timed out after {self.cfg.timeout_s:g}s in {with_whom}") from e
            raise CommError(peers, f"{with_whom}: {_short(e)}") from e
        self.sync()
        self.pace.mark()  # the wait for the other shards is not compute
        self.events.append(("allreduce", *self._item, t0, clock(), x.numel() * x.element_size()))
        return x

    def _send(self, dst_role: int, item, y: torch.Tensor, codec: str = "none", log: list | bool | None = None) -> None:
        """isend header and payload (``y`` already encoded when ``codec`` is lossy: wire bytes);
        recorded in ``log`` (default: this run's sends; False: not)."""
        t = clock()  # a GPU stage's device-to-host copy (gloo) is part of the transfer
        hdr = torch.tensor((*item, CODEC_IDS[codec]), dtype=torch.int64, device=self.comm_device)
        if codec != "none":
            payload = y.to(self.comm_device).contiguous()
        elif self.cfg.backend == "gloo":
            payload = y.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        else:
            payload = y.contiguous()
        dst = self.rank_of[dst_role]
        try:
            works = (dist.isend(hdr, dst), dist.isend(payload, dst))
        except Exception as e:
            raise CommError(dst_role, f"sending to {self.describe(dst_role)}: {_short(e)}") from e
        self._pending.append((works, hdr, payload, dst_role))  # tensors stay alive until sent
        if log is not False:
            (self.sends if log is None else log).append(
                (item[0], item[1], dst_role, t, payload.numel() * payload.element_size()))
        while len(self._pending) > MAX_PENDING_SENDS:
            self._wait_oldest_send()

    def _wait_oldest_send(self):
        works, _, _, dst_role = self._pending.pop(0)
        try:
            # A slow receiver legitimately keeps a send waiting for long (it may have many
            # items to go), so sends get the long timeout; a receiver that died makes the
            # send fail at once, and one that hangs stops all progress, which the launcher sees.
            for w in works:
                w.wait(timedelta(seconds=self.cfg.startup_timeout_s))
        except Exception as e:
            raise CommError(dst_role, f"sending to {self.describe(dst_role)}: {_short(e)}") from e

    def as_activation(self, buf: torch.Tensor, b: int, n: int) -> torch.Tensor:
        if self.cfg.backend == "gloo":
            buf = buf.view(self.dtype).view(b, n, self.cfg.spec.d_model)
        return buf.to(self.device, non_blocking=False)

    def _fault(self, i: int) -> None:
        if not self.cfg.fault:
            return
        action, at = self.cfg.fault
        if action == "slow" and at <= i < len(self.cfg.items()):
            time.sleep(0.6 * self.cfg.timeout_s)
        if at != i:
            return
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "exit":
            os._exit(3)
        elif action == "hang":
            time.sleep(1e6)
        elif action == "raise":
            raise RuntimeError("injected fault")

    # -- the stage loop -------------------------------------------------------
    def run_items(self, final: bool = True) -> dict:
        cfg = self.cfg
        items = cfg.items()
        self.events, self.sends = [], []
        self.compute_cpu_s = 0.0  # this thread's CPU time in compute: load-independent, unlike wall time
        dec = self.decoder
        if dec is not None:
            dec.begin(final)
        logits_last: dict[int, np.ndarray] = {}
        logits_all: dict[int, list] = {}
        src_role = None
        if self.tp_rank > 0 and self.stage > 0:
            src_role = self.leader
        elif self.tp_rank == 0 and self.stage > 0:
            src_role = cfg.stages[self.stage - 1][0][0]
        # The leader's input may come encoded (the boundary's codec); peers get it raw from the leader.
        in_codecs = [cfg.codec(self.stage - 1, i) for i in range(len(items))] \
            if self.stage > 0 and self.tp_rank == 0 else None
        recv = _Receiver(self, src_role, items, in_codecs) if src_role is not None else None
        next_leader = None if self.last_stage or self.tp_rank else cfg.stages[self.stage + 1][0][0]
        ids = torch.from_numpy(cfg.ids) if self.stage == 0 else None
        mb_start = [sum(cfg.mb_sizes[:m]) for m in range(len(cfg.mb_sizes) + 1)]  # python ints: fast slicing
        try:
            for i, item in enumerate(items):
                mb, s, b, n, c = item
                self._fault(i)
                in_codec = in_codecs[i] if in_codecs else "none"
                if recv is None:
                    x = ids[mb_start[mb]:mb_start[mb + 1], c:c + n].to(self.device)  # (b, n)
                else:
                    buf, x = recv.get()  # x: (b, n, D) on this stage's device (or wire bytes)
                    if self.stage > 0 and self.tp_rank == 0 and in_codec == "none":
                        for peer in self.roles[1:]:  # the leader forwards the stage input to its peers
                            self._send(peer, item, buf)
                if mb not in self.caches:
                    self.caches[mb] = make_caches(self.units, b, sum(cfg.slices))
                self._item = (mb, s)
                first_tokens = dec is not None and dec.sampler_role and s == len(cfg.slices) - 1
                self.pace.mark()
                t0, cpu0 = clock(), time.thread_time()
                if in_codec != "none":  # decode inside the stage's stamp, as the simulator charges it
                    x = decode(x, in_codec, (b, n, cfg.spec.d_model), self.dtype)
                    if len(self.roles) > 1:  # tensor parallel: peers get the decoded input
                        self.pace.wait()  # the decode, at this device's speed, before it leaves
                        for peer in self.roles[1:]:
                            self._send(peer, item, x)
                        self.pace.mark()
                with torch.inference_mode():
                    y = run_units(self.units, x, c, self.caches[mb])
                    if first_tokens:  # the head's work: each sequence's first generated token
                        rows = range(mb_start[mb], mb_start[mb + 1])
                        new_ids = dec.prefill_tokens(rows, y[:, -1])
                out_codec = cfg.codec(self.stage, i) if next_leader is not None else "none"
                if out_codec != "none":  # encode inside the stamp too
                    y = encode(y, out_codec)
                self.sync()
                self.pace.wait()
                t1 = clock()
                self.events.append(("compute", mb, s, t0, t1, 0))
                self.compute_cpu_s += time.thread_time() - cpu0
                if first_tokens:
                    dec.after_prefill(rows, new_ids, t1)
                if self.last_stage:
                    if self.tp_rank == 0:
                        if cfg.all_logits:
                            logits_all.setdefault(mb, []).append(y.float().cpu().numpy())
                        if s == len(cfg.slices) - 1:
                            # a copy: a view would keep the whole (b, n, V) logits alive, and the
                            # next micro-batch's head would fault in fresh pages for its own
                            logits_last[mb] = y[:, -1].float().cpu().numpy().copy()  # (b, V)
                elif next_leader is not None:
                    self._send(next_leader, item, y, out_codec)
                # let go of this item's output (on the last stage, its whole (b, n, V) logits) before
                # the next item's units allocate theirs; a send in flight keeps its own reference
                y = None
                self.report("progress", i)
            if dec is not None:
                dec.run()
            while self._pending:
                self._wait_oldest_send()
        finally:
            if recv is not None:
                recv.close()
        out = {"events": self.events, "sends": self.sends, "recvs": recv.records if recv else [],
               "compute_cpu_s": self.compute_cpu_s}
        if dec is not None:
            out["decode"] = dec.record()
        if self.last_stage and self.tp_rank == 0:
            out["logits"] = np.concatenate([logits_last[m] for m in range(len(cfg.mb_sizes))])
            if cfg.all_logits:
                out["all_logits"] = np.concatenate(
                    [np.concatenate(logits_all[m], axis=1) for m in range(len(cfg.mb_sizes))])
        return out

    def run(self) -> dict:
        """Warm-up runs (discarded), then the measured run; each starts at a barrier."""
        out = None
        for r in range(self.cfg.warmup + 1):
            self._barrier()
            t_sync = clock()
            out = self.run_items(final=r == self.cfg.warmup)
        self._barrier()
        out["t_sync"] = t_sync
        return out

    def _barrier(self):
        try:
            if self.cfg.backend == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()
        except Exception as e:  # a peer gone between runs: a CommError as in a receive, not gloo's traceback
            others = tuple(r for r in range(len(self.cfg.devices)) if r != self.cfg.role)
            raise CommError(others, f"at the barrier between runs, a peer is gone: {_short(e)}") from e


def worker_main(cfg: WorkerConfig, report=None) -> dict:
    """Join the process group, build the stage, run it; the record the launcher needs."""
    os.environ.update(cfg.env)
    # before torch.distributed opens a socket and before any compute: the namespace and the
    # cgroup hold for everything the worker does (and its placement's interface wins over "lo")
    emulation.enter(cfg.emulation)
    apply_placement(cfg)
    baseline = rss_bytes() - library_rss_bytes()  # libraries' pages are no device's memory
    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    dist.init_process_group(cfg.backend, init_method=cfg.init_method, rank=cfg.rank if cfg.rank is not None else -1,
                            world_size=cfg.world_size, timeout=timedelta(seconds=cfg.startup_timeout_s))
    rank_of = list(range(cfg.world_size)) if cfg.rank is not None else _map_roles(cfg)
    worker = StageWorker(cfg, rank_of, report)
    hwm_reset = reset_peak_rss()
    (report or (lambda *a: None))("ready", 0)
    rec = worker.run()
    if cfg.device.startswith("cuda"):
        peak, how = torch.cuda.max_memory_allocated(torch.device(cfg.device)), "cuda max_memory_allocated"
    else:
        peak = max(peak_rss_bytes() - library_rss_bytes() - baseline, 0)
        how = ("RSS high-water during the run" if hwm_reset else "RSS high-water") + \
            " above the RSS before the weights were loaded, both less the pages of shared libraries"
    rec.update(role=cfg.role, stage=worker.stage, device_id=cfg.devices[cfg.role], host=socket.gethostname(),
               peak_bytes=peak, peak_how=how, boot_id=_boot_id(),
               process_cpu_s=time.process_time())  # all of this worker's CPU: the launcher sets it apart from others'
    return rec


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() + "@" + socket.gethostname()
    except OSError:
        return socket.gethostname()


def _map_roles(cfg: WorkerConfig) -> list[int]:
    """torchrun numbers processes by node and local rank; find which rank holds each role.

    The devices of host H, in plan order, go to H's local ranks 0, 1, ...; every
    process says which (host, local rank) it is, and all agree on the table."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    table: list = [None] * dist.get_world_size()
    dist.all_gather_object(table, (cfg.host, local_rank, _agreement(cfg)))
    for what in table[0][2]:  # every process's stage of one run: the same weights, inputs and plan
        seen = {t[2][what] for t in table}
        if len(seen) > 1:
            from hpipe.errors import InputError

            hosts = sorted({t[0] for t in table})
            raise InputError(f"the torchrun processes disagree on {what} (hosts {', '.join(hosts)}): give every "
                             f"host the same command but --host (see --commands)"
                             + (", and one plan to all (--plan plan.json): planned on each host, the plans "
                                "differ" if what == "the plan" else ""), field=what)
    rank_of_slot = {(t[0], t[1]): r for r, t in enumerate(table)}
    per_host: dict[str, int] = {}
    rank_of = []
    for dev in cfg.devices:
        host = dev.split("/", 1)[0]
        k = per_host.get(host, 0)
        per_host[host] = k + 1
        if (host, k) not in rank_of_slot:
            from hpipe.errors import InputError

            raise InputError(f"no process for device {dev}: start {k + 1} or more processes on host {host} "
                             f"(torchrun --nproc-per-node) with --host {host}", field="--host")
        rank_of.append(rank_of_slot[(host, k)])
    if len(set(rank_of)) != len(rank_of) or len(rank_of) != dist.get_world_size():
        from hpipe.errors import InputError

        raise InputError(f"the plan has {len(cfg.devices)} devices but torchrun started "
                         f"{dist.get_world_size()} processes", field="--nproc-per-node")
    return rank_of


def _agreement(cfg: WorkerConfig) -> dict[str, str]:
    """Digests of what every process of a torchrun must share (a host started with another
    --seed builds other random weights, and its stages' logits are then silently wrong)."""
    def digest(*parts) -> str:
        h = hashlib.sha256()
        for p in parts:
            h.update(p.tobytes() if isinstance(p, np.ndarray) else repr(p).encode())
        return h.hexdigest()[:16]

    return {"--seed": digest(cfg.seed), "--warmup": digest(cfg.warmup),
            "--inputs": digest(cfg.ids.shape if cfg.ids is not None else None, cfg.ids),
            "the plan": digest(cfg.devices, cfg.stages, cfg.slices, cfg.mb_sizes, cfg.codecs),
            # the model's shape, and whether weights are loaded, not where from: a host may keep its
            # scenario and weights folder elsewhere (spec.name and spec.source name the folder;
            # two hosts' differing checkpoints are what --check finds)
            "the scenario": digest(replace(cfg.spec, name="", source=""), cfg.dtype, cfg.weights is not None,
                                   cfg.generation)}


# -- process entry (multiprocessing) -------------------------------------------
def spawned_main(cfg: WorkerConfig, q) -> None:
    """Entry of a worker started by the launcher: messages go back on ``q``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    start_watching(cfg.launcher_pid or os.getppid())  # a launcher killed with SIGKILL cannot stop us
    code = 0
    try:
        rec = worker_main(cfg, lambda kind, i: q.put((kind, cfg.role, i)))
        q.put(("done", cfg.role, rec))
    except BaseException as e:
        comm = isinstance(e, CommError) or isinstance(e.__cause__, CommError)
        peer = getattr(e, "peer_role", None)
        q.put(("error", cfg.role, {"comm": comm, "peer": peer, "message": _short(e) if comm else
                                   f"{type(e).__name__}: {_short(e)}",
                                   "traceback": traceback.format_exc(limit=8)}))
        code = 1
    finally:
        # Flush the queue, then leave at once: tearing down a process group whose peers
        # failed can block, and the launcher needs nothing more from us.
        q.close()
        q.join_thread()
        os._exit(code)
