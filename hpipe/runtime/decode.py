"""The decode step loop of generation, run by every stage worker after its prefill items.

Generation makes ``output_tokens`` new tokens per sequence: the first from the
prefill's last-position logits, then ``output_tokens - 1`` decode steps, each
feeding one token per sequence through every stage (n = 1 at context
``seq_len + t``).  The KV caches stay on their stages: every worker holds one
cache per attention unit for the whole batch, ``seq_len + output_tokens``
positions long; a prefill micro-batch and a decode group each use a view of
their rows (both are contiguous runs of the batch), so decode groups need not
match the prefill's micro-batches.

Sequences decode in ``len(group_sizes)`` groups (the plan's
``decode_micro_batches``) so that several are in flight and the pipeline stays
full.  Roles:

* the *driver* (stage 0's first device) takes groups round-robin; for each it
  waits for the group's next ids from the last stage (the *feedback hop*),
  runs the step and sends the hidden states on;
* stage 0's tensor-parallel peers get the ids from the driver; every later
  stage's devices follow the stream of steps they receive, as in the prefill;
* the *sampler* (the last stage's first device) picks the next ids
  (``sampling.py``), stamps each sequence's token time, streams the ids to the
  launcher, and sends the group's ids back to the driver -- with a *done* flag
  once every sequence of the group has made its tokens or an EOS id.  A done
  group takes no more steps; when every group is done the driver sends an end
  marker (header micro-batch -1) down the pipeline.

Wire protocol (after the prefill's, same connections; every receive bounded
by ``timeout_s``, but a stream's first of each decode group, which waits for the rest of the
prefill downstream: see ``Decoder.first_wait_s``): a decode step travels as the prefill's 6-int64 header (group, step,
batch, 1, context, codec id of 'none') and its payload -- the hidden states (batch, 1, d_model)
between stages, the ids (batch,) int64 from the driver to its peers.  The
feedback is the header (group, step, batch, done, 0) and the ids (batch,).
Decode events carry the group as their micro-batch and the step as their
slice; the launcher marks them ``phase="decode"``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from hpipe.runtime.model import run_units
from hpipe.runtime.sampling import Sampler, SamplingConfig

NO_CODEC = 0  # hpipe.runtime.codecs.CODEC_IDS["none"]: decode steps are latency-bound and travel raw
END = (-1, 0, 0, 0, 0, NO_CODEC)  # the end-of-decode marker's header


@dataclass(frozen=True)
class GenerationConfig:
    """What every worker needs to generate (picklable)."""

    output_tokens: int
    """New tokens per sequence (the first from the prefill)."""
    group_sizes: list[int]
    """Sequences of each decode group, in batch order."""
    sampling: SamplingConfig = SamplingConfig()
    eos_ids: tuple[int, ...] = ()
    """A sequence stops at the first of these it makes (none: at output_tokens)."""
    stream: bool = False
    """Report each step's ids to the launcher as they are made (measured run only)."""


def group_sizes(batch_size: int, groups: int) -> list[int]:
    """``groups`` contiguous groups of the batch, the first ``batch % groups`` one larger."""
    q, r = divmod(batch_size, groups)
    return [q + (1 if i < r else 0) for i in range(groups)]


class _Stream:
    """One peer's decode messages, in order: a header, then (unless it is the end marker) a
    payload whose size the header gives.  A thread receives ahead on gloo (exact arrival
    times, overlap with compute); NCCL receives inline.  Ends at the end marker, or after
    ``done_limit`` done flags (the feedback stream)."""

    def __init__(self, w, src_role: int, kind: str, check, first_wait_s: float, n_first: int,
                 done_limit: int | None = None):
        self.w, self.src_role, self.kind, self.check = w, src_role, kind, check
        self.src = w.rank_of[src_role]
        self.first_wait_s, self.n_first = first_wait_s, n_first
        """The bound on each of the first ``n_first`` messages' wait (every later one: ``timeout_s``)."""
        self.n_got = 0
        self.done_limit = done_limit
        self.n_done = 0
        self.finished = False
        self.records: list[tuple] = []  # (group, step, src_role, t_post, t_done, nbytes)
        self.threaded = w.cfg.backend == "gloo"
        if self.threaded:
            from hpipe.runtime.worker import _Inbox

            self.inbox = _Inbox(w, src_role, depth=4)
            self.thread = threading.Thread(target=self._loop, name=f"decode-from-{src_role}", daemon=True)
            self.thread.start()

    def _payload(self, hdr):
        w = self.w
        g, t, b, n, c = hdr
        if self.kind == "act":
            return w.new_activation_buffer(b, 1)
        if w.cfg.backend == "gloo":
            return torch.empty(b * 8, dtype=torch.uint8)
        return torch.empty(b, dtype=torch.int64, device=w.comm_device)

    def _recv_one(self):
        from hpipe.runtime.worker import CommError, clock, receive_failure

        w = self.w
        timeout = timedelta(seconds=w.cfg.timeout_s)
        wait_s = self._wait_s()
        hdr_t = torch.empty(len(END), dtype=torch.int64, device=w.comm_device)  # the prefill's header size
        t_post = clock()
        try:
            dist.irecv(hdr_t, self.src).wait(timedelta(seconds=wait_s))
            self.n_got += 1
            hdr = tuple(int(v) for v in hdr_t.tolist())
            if hdr == END:
                self.finished = True
                return hdr, None, None
            hdr, codec = hdr[:5], hdr[5]
            why = self.check(hdr) or (f"codec id {codec} on a decode step (they travel raw)" if codec != NO_CODEC
                                      else None)
            if why:
                raise CommError(self.src_role, f"protocol error in decode: {why} (header {hdr} from "
                                               f"{w.describe(self.src_role)})")
            buf = self._payload(hdr)
            dist.irecv(buf, self.src).wait(timeout)
            if self.kind == "act":
                x = w.as_activation(buf, hdr[2], 1)  # (b, 1, D)
            else:
                x = buf.view(torch.int64).to(w.device).view(hdr[2], 1)  # (b, 1) token ids
            w.sync()
        except CommError:
            raise
        except Exception as e:
            raise receive_failure(w, self.src_role, "a decode step", e, wait_s) from e
        t_done = clock()
        done = self.kind == "feedback" and hdr[3] == 1
        if done:
            self.n_done += 1
            self.finished = self.n_done == self.done_limit
        else:  # a done flag is control, not a transfer of the timeline
            self.records.append((hdr[0], hdr[1], self.src_role, t_post, t_done, buf.numel() * buf.element_size()))
        return hdr, buf, x

    def _loop(self):
        while not self.finished and not self.inbox.stop.is_set():
            try:
                out = self._recv_one()
            except BaseException as e:  # handed to the compute loop, which raises it
                out = e
            self.inbox.put(out)
            if isinstance(out, BaseException):
                return

    def _wait_s(self) -> float:
        return self.first_wait_s if self.n_got < self.n_first else self.w.cfg.timeout_s

    def get(self):
        """(header, payload as received, payload as the step's input)."""
        return self.inbox.take(self._wait_s()) if self.threaded else self._recv_one()

    def close(self):
        if self.threaded:
            self.inbox.close()


class Decoder:
    """One worker's part of generation; ``w`` is its ``StageWorker``."""

    def __init__(self, w):
        self.w = w
        cfg = w.cfg
        self.gen: GenerationConfig = cfg.generation
        self.seq_len = sum(cfg.slices)
        self.batch = sum(cfg.mb_sizes)
        starts = [0]
        for n in self.gen.group_sizes:
            starts.append(starts[-1] + n)
        if starts[-1] != self.batch:
            raise ValueError(f"decode groups hold {starts[-1]} sequences, the batch {self.batch}")
        self.rows = [range(starts[i], starts[i + 1]) for i in range(len(self.gen.group_sizes))]
        self.driver = w.stage == 0 and w.tp_rank == 0
        self.sampler_role = w.last_stage and w.tp_rank == 0
        self.first_leader = cfg.stages[0][0][0]
        self.next_leader = None if w.last_stage or w.tp_rank else cfg.stages[w.stage + 1][0][0]
        self.caches = None
        self.n_prefill = len(cfg.items())  # decode steps count on from the prefill's work items
        # Every stream's first G messages are the G decode groups' step 0 (the last stage
        # takes no decode step before its prefill ends), and each may wait for the rest of the
        # prefill downstream (the driver's first feedback, for all of it): bounded as the
        # prefill's receives bound it, timeout_s per work item per stage, not timeout_s in all.
        # A prefill longer than the timeout whose every message meets it had failed here.
        # hpipe's launcher still stops a run that makes no progress for timeout_s (under
        # torchrun, a host that dies closes its connections, and torchrun stops the others).
        self.first_wait_s = cfg.timeout_s * (1 + self.n_prefill * len(cfg.stages))

    @property
    def max_len(self) -> int:
        """KV positions per sequence: the prompt and every generated token."""
        return self.seq_len + self.gen.output_tokens

    def group_caches(self, batch_caches) -> None:
        self.caches = [{i: c.rows(r.start, r.stop) for i, c in batch_caches.items()} for r in self.rows]

    # -- one run ----------------------------------------------------------------
    def begin(self, final: bool) -> None:
        """Before a run's prefill: fresh state, and the receives that prefill does not use."""
        w = self.w
        self.final = final
        self.events: list[tuple] = []
        self.sends: list[tuple] = []
        self.streams: list[_Stream] = []
        self.local_feedback: deque = deque()
        self.feedback_sent = [False] * len(self.rows)
        self.n_progress = 0
        self.compute_cpu_s = 0.0  # the decode steps' share of the stage thread's compute CPU time
        if self.sampler_role:
            self.sampler = Sampler(self.gen.sampling, self.batch)  # fresh: a warm-up draws nothing of the run's
            self.out: list[list[int]] = [[] for _ in range(self.batch)]
            self.times: list[list[float]] = [[] for _ in range(self.batch)]
            self.finished = [False] * self.batch
        self.feedback = None
        if self.driver and not self.sampler_role:
            # stage 0 receives nothing else from the last stage: this may start before the prefill
            self.feedback = self._stream(w.cfg.stages[-1][0][0], "feedback", done_limit=len(self.rows))
        self.inputs = None
        if w.stage == 0 and w.tp_rank > 0:
            self.inputs = self._stream(w.leader, "ids")

    def _stream(self, src_role, kind, done_limit=None) -> _Stream:
        sizes = self.gen.group_sizes

        def check(hdr):
            g, t, b, n, c = hdr
            if not 0 <= g < len(sizes):
                return f"no decode group {g}"
            if b != sizes[g]:
                return f"group {g} has {sizes[g]} sequences, not {b}"
            if not 0 <= t < self.gen.output_tokens:
                return f"step {t} outside 0..{self.gen.output_tokens - 1}"
            if kind != "feedback" and (n, c) != (1, self.seq_len + t):
                return f"a step feeds 1 token at context {self.seq_len + t}"
            return None

        s = _Stream(self.w, src_role, kind, check, self.first_wait_s, len(self.rows), done_limit)
        self.streams.append(s)
        return s

    def prefill_tokens(self, rows: range, logits) -> list[int]:
        """Sampler, inside the last prefill slice's compute: the first token of ``rows``
        from the last position's logits (b, V)."""
        return self.sampler(logits, list(rows))

    def after_prefill(self, rows: range, ids: list[int], t: float) -> None:
        """Sampler, after a prefill micro-batch: record its first tokens, and send each group
        whose sequences all have theirs its ids (step 0's input)."""
        self._record(list(rows), ids, t)
        for g, r in enumerate(self.rows):
            if not self.feedback_sent[g] and all(self.out[k] for k in r):
                self.feedback_sent[g] = True
                self._feedback(g, 0)

    def run(self) -> None:
        """After the prefill loop: the decode steps of this worker."""
        w = self.w
        prefill_events, w.events = w.events, self.events  # all-reduces land in the decode list
        # CPU time of the whole decode loop, this thread's and the process's (receiving threads,
        # sends): what a step costs beyond its compute stamps, hardly moved by other processes
        cpu0, proc0 = time.thread_time(), time.process_time()
        try:
            if self.driver:
                self._drive()
            else:
                if self.inputs is None:  # stage > 0: the prefill's items all arrived, so this is next
                    self.inputs = self._stream(w.leader if w.tp_rank else w.cfg.stages[w.stage - 1][0][0], "act")
                self._follow()
        finally:
            self.loop_cpu_s, self.process_cpu_s = time.thread_time() - cpu0, time.process_time() - proc0
            w.events = prefill_events
            for s in self.streams:
                s.close()

    def record(self) -> dict:
        out = {"events": self.events, "sends": self.sends,
               "recvs": [r for s in self.streams for r in s.records], "compute_cpu_s": self.compute_cpu_s,
               "loop_cpu_s": getattr(self, "loop_cpu_s", None), "process_cpu_s": getattr(self, "process_cpu_s", None)}
        if self.sampler_role:
            out["generated"] = self.out
            out["token_times"] = self.times
        return out

    # -- roles --------------------------------------------------------------------
    def _drive(self) -> None:
        w = self.w
        order = deque(range(len(self.rows)))
        step = [0] * len(self.rows)
        while order:
            g = order.popleft()
            hdr, ids = self._next_feedback()
            if (hdr[0], hdr[1]) != (g, step[g]):
                from hpipe.runtime.worker import CommError

                raise CommError(w.cfg.stages[-1][0][0], f"protocol error in decode: expected group {g} step "
                                                        f"{step[g]} back from the last stage, got {hdr[:2]}")
            if hdr[3]:  # done
                continue
            t = step[g]
            item = (g, t, len(self.rows[g]), 1, self.seq_len + t)
            for peer in w.roles[1:]:  # tensor-parallel peers embed the same ids
                w._send(peer, item, ids, log=self.sends)
            self._step(g, t, ids.to(w.device).view(-1, 1))
            step[g] += 1
            order.append(g)
        self._end()

    def _next_feedback(self):
        if self.feedback is None:
            return self.local_feedback.popleft()
        hdr, buf, x = self.feedback.get()
        return hdr, x.view(-1)  # (b,) ids

    def _follow(self) -> None:
        w = self.w
        while True:
            hdr, buf, x = self.inputs.get()
            if hdr == END:
                self._end()
                return
            if w.stage > 0 and w.tp_rank == 0:
                for peer in w.roles[1:]:  # the leader forwards the step's input to its peers
                    w._send(peer, hdr, buf, log=self.sends)
            self._step(hdr[0], hdr[1], x)

    def _end(self) -> None:
        """Pass the end marker on: to this stage's peers (leader) and the next stage."""
        w = self.w
        if w.tp_rank:
            return
        for dst in [*w.roles[1:], *([self.next_leader] if self.next_leader is not None else [])]:
            hdr = torch.tensor(END, dtype=torch.int64, device=w.comm_device)
            w._pending.append(((dist.isend(hdr, w.rank_of[dst]),), hdr, None, dst))

    def _step(self, g: int, t: int, x) -> None:
        """Decode step ``t`` of group ``g``: x is (b, 1) ids on stage 0, else (b, 1, D)."""
        from hpipe.runtime.worker import clock

        w = self.w
        rows = self.rows[g]
        w._fault(self.n_prefill + self.n_progress)
        w._item = (g, t)
        w.pace.mark()
        t0, cpu0 = clock(), time.thread_time()
        with torch.inference_mode():
            y = run_units(w.units, x, self.seq_len + t, self.caches[g])  # (b, 1, D) or logits (b, 1, V)
            if self.sampler_role:
                active = [k for k in rows if not self.finished[k]]
                ids = self.sampler(y[[k - rows.start for k in active], -1], active)
        w.sync()
        w.pace.wait()
        t1 = clock()
        cpu_s = time.thread_time() - cpu0
        self.compute_cpu_s += cpu_s
        w.compute_cpu_s += cpu_s  # the run's compute CPU time covers its decode steps too
        self.events.append(("compute", g, t, t0, t1, 0))
        if self.sampler_role:
            self._record(active, ids, t1)
            self._feedback(g, t + 1)
        elif self.next_leader is not None:
            w._send(self.next_leader, (g, t, len(rows), 1, self.seq_len + t), y, log=self.sends)
        self.n_progress += 1
        w.report("progress", self.n_prefill + self.n_progress - 1)

    # -- the sampler's bookkeeping ------------------------------------------------------
    def _record(self, rows: list[int], ids: list[int], t: float) -> None:
        for k, tok in zip(rows, ids):
            self.out[k].append(int(tok))
            self.times[k].append(t)
            self.finished[k] = len(self.out[k]) >= self.gen.output_tokens or int(tok) in self.gen.eos_ids
        if self.gen.stream and self.final and rows:
            self.w.report("tokens", [(k, int(tok)) for k, tok in zip(rows, ids)])

    def _feedback(self, g: int, t: int) -> None:
        """Group ``g``'s latest ids back to the driver, as step ``t``'s input (done: none)."""
        w = self.w
        rows = self.rows[g]
        done = all(self.finished[k] for k in rows)
        # a finished sequence of a running group feeds its last id again; its outputs are dropped
        ids = torch.tensor([self.out[k][-1] for k in rows], dtype=torch.int64)
        if self.driver:  # one stage: the sampler is the driver
            self.local_feedback.append(((g, t, len(rows), int(done), 0), ids))
            return
        w._send(self.first_leader, (g, t, len(rows), int(done), 0), ids.to(w.comm_device),
                log=False if done else self.sends)
