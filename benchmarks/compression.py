"""Activation compression: what it saves in time (simulated and measured) and costs in accuracy.

    PYTHONPATH=. python benchmarks/compression.py latency [--repeats 5] [--profile full|quick]
    PYTHONPATH=. python benchmarks/compression.py testbed
    PYTHONPATH=. python benchmarks/compression.py codec-time
    PYTHONPATH=. python benchmarks/compression.py accuracy [--tokens 128] [--prompts 256] [--seed 0] [--checkpoint DIR] [--what-if]

``latency``: on ``scenarios/local-cpu-hetero-int8.yaml`` (a 100 Mbit/s shaped link
between two emulated hosts; needs root, ip, tc and cgroups), planned with the fitted model
on *this machine's* cached profile (``$HPIPE_CACHE_DIR``, else the XDG cache; measured
first, with the codecs timed, when the cache has none that fits): hpipe's plan with its
codecs against the very same plan uncompressed, and a one-slice two-stage plan (the
transfer on the critical path) with and without int8.  Predicted (simulated) and
measured: every plan once per round, rounds interleaved with the order reversed every
other round; the fastest, the median and the spread of each plan's runs, the gain
fastest-of-N and paired round by round, and the bytes measured per link.

``testbed``: the paper's testbed (``scenarios/paper-llama7b.yaml``) with int8 allowed
on one hop, and on up to all hops: hpipe's simulated latency against uncompressed hpipe.

``codec-time``: see ``codec_time`` below.  ``accuracy``: see ``accuracy`` below.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from hpipe.costmodels.cache import cpu_model  # noqa: E402
from hpipe.scenario import load_scenario, parse_scenario  # noqa: E402


def _load() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


# -- latency ------------------------------------------------------------------------
def _hop_s(result, setup, simulated: bool = False) -> float:
    """Mean seconds per message on the links between stages, until the receiver has it: the
    links' hold plus the route latency (simulated events end when the wire is free)."""
    xs = [e for e in result.events if e.kind == "transfer" and e.link is not None]
    lat = setup.cluster.route(xs[0].device, xs[0].dst).latency_s if simulated else 0.0
    return float(np.mean([e.end_s - e.start_s for e in xs])) + lat


def _profiled_setup(profile: str):
    """local-cpu-hetero-int8 planned on this machine's cached profile ($HPIPE_CACHE_DIR, else the
    XDG cache), measured first where the cache has none that fits (or none that timed the codecs)."""
    import yaml

    from hpipe.costmodels.cache import cached_profile_path
    from hpipe.costmodels.profile import load_profile
    from hpipe.runtime.profile_cache import measure_into_cache
    from hpipe.runtime.profiler import stale_reason

    path = ROOT / "scenarios/local-cpu-hetero-int8.yaml"
    data = yaml.safe_load(path.read_text())
    base = parse_scenario(data, str(path)).resolve()  # the tracked profile: only to find the cache key
    cached = cached_profile_path(base)
    why = "none in the cache" if not cached.exists() else stale_reason(load_profile(cached), base)
    if why:
        print(f"profiling this machine into {cached} ({why}; --profile {profile})", flush=True)
        kw = {} if profile == "quick" else {"quick": False, "warmup": 2, "repeats": 5}
        measure_into_cache(base, cached, **kw)
    data["costmodel"] = {"kind": "fitted", "profile": str(cached)}
    setup = parse_scenario(data, str(path)).resolve()
    plain = parse_scenario({k: v for k, v in data.items() if k != "compression"}, str(path)).resolve()
    print(f"cost model: fitted on {cached} (measured {setup.cost.profile.created}); "
          f"codec time {setup.cost.describe().get('codec_time')}")
    return setup, plain


def _iqr(xs) -> str:
    q1, q2, q3 = np.percentile(xs, [25, 50, 75])
    return f"median {q2:+.1%} (IQR {q1:+.1%} .. {q3:+.1%})"


def latency(repeats: int, profile: str = "full") -> None:
    from hpipe.planners import make_plan
    from hpipe.runtime import emulation
    from hpipe.runtime.launcher import execute
    from hpipe.sim import simulate

    tracked = load_scenario(ROOT / "scenarios/local-cpu-hetero-int8.yaml").resolve()
    why = emulation.emulation_unsupported(tracked)
    if why:
        print(f"skipped: this machine cannot emulate local-cpu-hetero ({why})")
        return
    from hpipe.validate import plan_key

    setup, no_compression = _profiled_setup(profile)
    hp = make_plan(setup, "hpipe")
    own = make_plan(no_compression, "hpipe")  # what hpipe plans when compression is not allowed
    gp = make_plan(setup, "gpipe")  # one slice over two stages: the transfer is on the critical path
    if not hp.codecs:
        print(f"  hpipe chose no codec on this profile (predicted {hp.predicted['latency_s']:.3f} s): "
              f"int8 does not pay here; comparing the one-slice plan only")
    plans, pairs = {}, []  # pairs: (compressed, what it is compared with)
    if hp.codecs:
        comp = f"hpipe {hp.codecs}"
        plans.update({comp: hp, "hpipe same plan, none": hp.model_copy(update={"codecs": None})})
        pairs.append((comp, "hpipe same plan, none"))
        if plan_key(own) != plan_key(hp.model_copy(update={"codecs": None})):
            plans["hpipe, int8 not allowed"] = own
            pairs.append((comp, "hpipe, int8 not allowed"))
    plans.update({"one-slice int8": gp.model_copy(update={"codecs": ["int8"]}), "one-slice none": gp})
    pairs.append(("one-slice int8", "one-slice none"))
    print(f"{setup.name}: {cpu_model()}, load average {_load()} at start ({os.cpu_count()} CPUs; other work on the machine "
          f"shows in it)")
    for name, p in plans.items():
        print(f"  {name:24s} stages {[s.units for s in p.stages]} slices {p.slices} mb {p.micro_batches}")
    sim = {k: simulate(setup, p) for k, p in plans.items()}
    meas: dict[str, list] = {k: [] for k in plans}
    keys = list(plans)
    for r in range(repeats):  # interleaved, the order reversed every other round: drifting load and
        for k in (keys if r % 2 == 0 else keys[::-1]):  # warm caches hit every plan alike
            meas[k].append(execute(setup, plans[k], quiet=True, warmup=1))
        print(f"  round {r + 1}/{repeats}: " + ", ".join(f"{k} {meas[k][-1].latency_s:.3f}" for k in keys)
              + f" (load {_load()})", flush=True)
    best = {k: min(v, key=lambda x: x.latency_s) for k, v in meas.items()}
    med = {k: float(np.median([x.latency_s for x in v])) for k, v in meas.items()}
    print(f"  {'plan':24s} {'simulated s':>11s} {'fastest s':>9s} {'median s':>8s} {'error':>7s} {'spread':>7s} "
          f"{'hop s/item sim':>14s} {'meas (median)':>13s}  bytes per link (measured)")
    for k in plans:
        s, m = sim[k].latency_s, best[k].latency_s
        lat = [x.latency_s for x in meas[k]]
        spread = (max(lat) - min(lat)) / float(np.median(lat))
        hs = _hop_s(sim[k], setup, simulated=True)
        hm = float(np.median([_hop_s(x, setup) for x in meas[k]]))
        print(f"  {k:24s} {s:11.3f} {m:9.3f} {med[k]:8.3f} {(s - m) / m:+7.1%} {spread:7.1%} {hs:14.4f} {hm:13.4f}"
              f"  {best[k].bytes_per_link}")
    print("  (error: simulated against the fastest run; spread: (slowest - fastest) / median of the runs)")
    for comp, plain in pairs:
        ps = sim[plain].latency_s / sim[comp].latency_s - 1
        pm = best[plain].latency_s / best[comp].latency_s - 1
        paired = [a.latency_s / b.latency_s - 1 for a, b in zip(meas[plain], meas[comp])]  # same round
        q1, q3 = np.percentile(paired, [25, 75])
        print(f"  speed-up of {comp!r} over {plain!r}: simulated {ps:+.1%}; measured fastest-of-{repeats} "
              f"{pm:+.1%}, medians {med[plain] / med[comp] - 1:+.1%}, paired by round {_iqr(paired)}; "
              f"the prediction is {'inside' if q1 <= ps <= q3 else 'outside'} the paired IQR, "
              f"{abs(pm - ps) * 100:.1f} points from the fastest-run gain")
        print(f"    runs (s): {comp}: {[round(x.latency_s, 3) for x in meas[comp]]}; "
              f"{plain}: {[round(x.latency_s, 3) for x in meas[plain]]}")
    print(f"  load average at the end {_load()}; validation bounds (issue 15): median |error| <= 5%, p90 <= 12%")


# -- testbed ------------------------------------------------------------------------
def testbed() -> None:
    import yaml

    from hpipe.planners import make_plan

    path = ROOT / "scenarios/paper-llama7b.yaml"
    base = yaml.safe_load(path.read_text())
    plain = make_plan(parse_scenario(base, str(path)).resolve(), "hpipe")
    print(f"paper-llama7b, hpipe uncompressed: {plain.predicted['latency_s']:.3f} s "
          f"(stages {[s.units for s in plain.stages]})")
    # each with the default min_gain (the least lossy plan within 1% of the fastest) and with 0
    for allow, hops, gain in ((["int8"], 1, None), (["int8"], 1, 0.0), (["int8"], 5, None), (["int8"], 5, 0.0),
                              (["int8", "int4"], 5, None), (["int8", "int4"], 5, 0.0)):
        comp = {"allow": allow, "max_lossy_hops": hops, **({} if gain is None else {"min_gain": gain})}
        p = make_plan(parse_scenario({**base, "compression": comp}, str(path)).resolve(), "hpipe")
        t = p.predicted["latency_s"]
        print(f"  allow {allow} max_lossy_hops {hops}{'' if gain is None else f' min_gain {gain:g}'}: {t:.3f} s, "
              f"speed-up {plain.predicted['latency_s'] / t - 1:+.2%}, codecs {p.codecs}")
    # GPT3-2.7B on the same testbed: more activation bytes against its compute
    path3 = ROOT / "scenarios/paper-gpt3-2.7b.yaml"
    g = yaml.safe_load(path3.read_text())
    plain3 = make_plan(parse_scenario(g, str(path3)).resolve(), "hpipe")
    for allow, gain in ((["int8"], None), (["int8", "int4"], None), (["int8", "int4"], 0.0)):
        comp = {"allow": allow, "max_lossy_hops": 5, **({} if gain is None else {"min_gain": gain})}
        p = make_plan(parse_scenario({**g, "compression": comp}, str(path3)).resolve(), "hpipe")
        t = p.predicted["latency_s"]
        print(f"paper-gpt3-2.7b, allow {allow} max_lossy_hops 5{'' if gain is None else f' min_gain {gain:g}'}: "
              f"{plain3.predicted['latency_s']:.4f} -> {t:.4f} s, "
              f"speed-up {plain3.predicted['latency_s'] / t - 1:+.2%}, codecs {p.codecs}, "
              f"stages {[s.units for s in p.stages]} (uncompressed: {[s.units for s in plain3.stages]})")
    # where the link, not compute, sets the pace: the same testbed on 100 Mbit/s Ethernet
    slow = {**base, "cluster": {**base["cluster"], "network": {"bandwidth_gbps": 0.1, "latency_us": 200}}}
    plain = make_plan(parse_scenario(slow, str(path)).resolve(), "hpipe")
    print(f"paper-llama7b on 100 Mbit/s, hpipe uncompressed: {plain.predicted['latency_s']:.3f} s "
          f"(stages {[s.units for s in plain.stages]})")
    for allow in (["int8"], ["int8", "int4"]):
        data = {**slow, "compression": {"allow": allow, "max_lossy_hops": 1}}
        p = make_plan(parse_scenario(data, str(path)).resolve(), "hpipe")
        t = p.predicted["latency_s"]
        print(f"  allow {allow} max_lossy_hops 1: {t:.3f} s, speed-up {plain.predicted['latency_s'] / t - 1:+.2%}, "
              f"codecs {p.codecs}, stages {[s.units for s in p.stages]}")


# -- codec time ---------------------------------------------------------------------
def codec_time(repeats: int = 7) -> None:
    """Each codec's encode and decode CPU time on one thread, for a prefill message of
    small-llama at batch 2 (2 x 512 tokens x 512) and a one-token decode step, against the
    roofline (its counted bytes and ops) at the local scenarios' 10 GB/s and CPU op overhead; both
    block layouts (the codec's own marked '*'; the other one by handing the codec a 1-D
    tensor already laid out so, which it keeps in order)."""
    import torch

    from hpipe.codecs import CPU_OP_OVERHEAD_S, get_codec, roofline_codec_time_s
    from hpipe.runtime.codecs import HAS_FP8, decode, encode

    torch.set_num_threads(1)

    def median_cpu_s(fn, reps):
        fn()
        out = []
        for _ in range(repeats):
            t0 = time.process_time()
            for _ in range(reps):
                fn()
            out.append((time.process_time() - t0) / reps)
        return sorted(out)[len(out) // 2]

    print(f"{cpu_model()}, load average {_load()} at start; one thread, CPU time, median of {repeats}")
    for shape, reps in (((2, 512, 512), 20), ((1, 1, 512), 2000)):
        x = torch.randn(*shape)
        layouts = {"along a token": x.reshape(-1), "channel-major": x.reshape(-1, shape[-1]).t().contiguous().reshape(-1)}
        for name in ("int8", "fp8", "int4") if HAS_FP8 else ("int8", "int4"):
            codec = get_codec(name)
            model = [float(t) * 1e3 for t in roofline_codec_time_s(codec, x.numel(), 4, 10.0, CPU_OP_OVERHEAD_S)]
            cells = []
            for label, flat in layouts.items():
                own = (label == "channel-major") == codec.channel_major
                # the codec's own layout timed as the runtime calls it (the copy included)
                v = x if own else flat
                buf = encode(v, name)
                e = median_cpu_s(lambda: encode(v, name), reps) * 1e3
                d = median_cpu_s(lambda: decode(buf, name, v.shape, v.dtype), reps) * 1e3
                cells.append(f"{label}{'*' if own else ''} {e:.3f} / {d:.3f}")
            print(f"  {str(shape):14s} {name}: encode / decode ms: {'; '.join(cells)}; "
                  f"roofline {model[0]:.3f} / {model[1]:.3f}")


# -- accuracy -----------------------------------------------------------------------
# A small byte-level LLaMA trained here on Python's own standard library source, so that
# the activations crossing a stage boundary have a trained model's statistics.
CORPUS_GLOB = "lib/python3*/[a-m]*.py"  # training text; held-out prompts come from [n-z]*.py
SMALL = dict(family="llama", n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, d_ff=352, vocab_size=256)
# stage boundaries of a three-stage plan (units: embed, 4 x (attention, MLP), head)
CUTS = (3, 7)
PROMPT_BYTES = 96
SLICE = 32  # the plan's prefill slices (local-cpu-hetero's token granularity)


def _python_root() -> Path:
    return Path(sys.base_prefix)


def _corpus(pattern: str, limit_bytes: int) -> bytes:
    out, n = [], 0
    for f in sorted(_python_root().glob(pattern)):
        b = f.read_bytes()
        out.append(b)
        n += len(b)
        if n >= limit_bytes:
            break
    return b"\n".join(out)[:limit_bytes]


# How the small LLaMA is trained.  The context covers the prompt plus every generated
# token: a model trained on 64-byte windows and asked for positions up to 224 (the
# recipe before 2026-12-02 night) wrote garbage past its window, full of near-ties that
# any perturbation flips.  A fixed step count with the schedule tied to it makes the
# checkpoint the same however loaded the machine (for one CPU kind, torch build and
# Python, whose standard library is the text).
TRAIN = dict(steps=8000, batch=8, context=256, peak_lr=3e-3, warmup_steps=200, final_lr_frac=0.1,
             betas=(0.9, 0.95), weight_decay=0.01, seed=0)


def _lr(step: int) -> float:
    """Linear warm-up, then cosine decay to ``final_lr_frac`` of the peak at the last step."""
    t = TRAIN
    warm = min(1.0, (step + 1) / t["warmup_steps"])
    cos = 0.5 * (1 + math.cos(math.pi * step / t["steps"]))
    return t["peak_lr"] * warm * (t["final_lr_frac"] + (1 - t["final_lr_frac"]) * cos)


def train_small_llama(folder: Path, seed: int = 0) -> dict:
    """Train SMALL as a transformers LlamaForCausalLM on bytes by the TRAIN recipe with ``seed``
    (the initial weights and the batches drawn), or reuse the checkpoint in ``folder`` when
    ``train_log.json`` there names the same model and recipe.
    Saved as safetensors for ``HFWeights``; ``train_log.json`` says how it was trained."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hashlib
    import platform

    t = {**TRAIN, "seed": seed}
    # The text is this Python's own standard library: another Python version is other text,
    # so the recipe names the version and a hash of the bytes trained on.
    corpus = _corpus(CORPUS_GLOB, 4 << 20)
    recipe = {"model": SMALL, "train": {k: list(v) if isinstance(v, tuple) else v for k, v in t.items()},
              "corpus": CORPUS_GLOB, "python": platform.python_version(),
              "corpus_sha256": hashlib.sha256(corpus).hexdigest()}
    log_path = folder / "train_log.json"
    if (folder / "config.json").exists():
        log = json.loads(log_path.read_text()) if log_path.exists() else {}
        if log.get("recipe") != recipe:
            raise SystemExit(f"{folder}: a checkpoint trained by another recipe ({log_path} "
                             f"{'says ' + json.dumps(log.get('recipe')) if log else 'is missing'}); "
                             f"remove the folder or pass another --checkpoint")
        return {"reused": str(folder), **log}
    torch.manual_seed(t["seed"])
    torch.set_num_threads(2)
    cfg = LlamaConfig(vocab_size=256, hidden_size=SMALL["d_model"], intermediate_size=SMALL["d_ff"],
                      num_hidden_layers=SMALL["n_layers"], num_attention_heads=SMALL["n_heads"],
                      num_key_value_heads=SMALL["n_kv_heads"], max_position_embeddings=1024,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.train()
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
    opt = torch.optim.AdamW(model.parameters(), lr=t["peak_lr"], betas=t["betas"], weight_decay=t["weight_decay"])
    g = torch.Generator().manual_seed(t["seed"])
    T, B = t["context"], t["batch"]
    t0, losses = time.monotonic(), []
    for step in range(t["steps"]):
        for group in opt.param_groups:
            group["lr"] = _lr(step)
        idx = torch.randint(0, data.numel() - T - 1, (B,), generator=g)
        x = torch.stack([data[i:i + T] for i in idx.tolist()])  # (B, T)
        loss = model(input_ids=x, labels=x.clone()).loss  # shifts inside
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 1000 == 0:
            print(f"  step {step + 1}: loss {sum(losses[-100:]) / 100:.3f} (last 100), "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    log = {"recipe": recipe, "seconds": round(time.monotonic() - t0, 1), "loss_first": round(losses[0], 4),
           "loss_last_100": round(sum(losses[-100:]) / 100, 4), "load_average": _load(), "cpu": cpu_model()}
    from hpipe.io import write_text

    write_text(log_path, json.dumps(log, indent=1))
    return log


def per_tensor_int8(x):
    """int8 with one scale for the whole tensor: what blocks are there to avoid."""
    s = x.abs().amax().clamp(min=1e-30) / 127
    return (x / s).round().clamp(-127, 127) * s


# ---- harsh: every message through the codec, decode steps too (not how hpipe runs) ----
def _greedy(units, prompt, steps: int, boundary_fn, teacher=None):
    """Greedy generation of ``steps`` tokens in one process; ``boundary_fn(x)`` is applied to the
    activation wherever a stage ends (CUTS), decode steps included.  With ``teacher`` (token ids) the
    given tokens are fed instead of the model's own (teacher forcing), so logits compare position by
    position.  Returns (ids, logits)."""
    import torch

    from hpipe.runtime.model import make_caches

    B, T = prompt.shape
    caches = make_caches(units, B, T + steps)

    def forward(x, pos):
        for u in units:
            if u.unit.index in CUTS:
                x = boundary_fn(x)
            x = u(x, pos, caches.get(u.unit.index))
        return x

    out_ids, out_logits = [], []
    with torch.inference_mode():
        logits = forward(prompt, 0)[:, -1]  # (B, V)
        pos = T
        for k in range(steps):
            out_logits.append(logits.float())
            nxt = logits.argmax(-1)
            out_ids.append(nxt)
            feed = teacher[:, k] if teacher is not None else nxt
            logits = forward(feed[:, None], pos)[:, -1]
            pos += 1
    return torch.stack(out_ids, 1), torch.stack(out_logits, 1)


def _compare(units, prompts, steps, codec_fns, ref_fn=None) -> list[tuple]:
    ref_ids, ref_logits = _greedy(units, prompts, steps, ref_fn or (lambda x: x))
    rows = []
    for name, fn in codec_fns.items():
        free_ids, _ = _greedy(units, prompts, steps, fn)
        _, tf_logits = _greedy(units, prompts, steps, fn, teacher=ref_ids)
        err = (tf_logits - ref_logits).abs()
        agree_free = float((free_ids == ref_ids).float().mean())
        agree_tf = float((tf_logits.argmax(-1) == ref_ids).float().mean())
        rows.append((name, float(err.max()), float(err.mean()), float(ref_logits.abs().mean()),
                     agree_tf, agree_free, int((free_ids != ref_ids).sum())))
    return rows


# ---- as hpipe runs it: the plan's codecs on prefill messages, decode steps raw ----------
def _accuracy_setup(folder: Path, batch: int, tokens: int):
    """A three-device scenario for the trained model: hosts joined by local-cpu-hetero's
    100 Mbit/s link, so that the runtime's per-message rule compresses the prefill's messages."""
    from hpipe.scenario import parse_scenario

    dev = {"name": "core", "peak_tflops": 0.06, "memory_gb": 4, "memory_bandwidth_gbps": 10, "power_w": 15,
           "runtime": {"device": "cpu", "threads": 1}}
    data = {"name": "compression-accuracy", "model": {"name": "trained-byte-llama", **SMALL}, "dtype": "float32",
            "weights": str(folder), "workload": {"seq_len": PROMPT_BYTES, "batch_size": batch, "output_tokens": tokens},
            "cluster": {"hosts": [{"name": f"h{i}", "devices": [dev]} for i in range(3)],
                        "network": {"bandwidth_gbps": 0.1, "latency_us": 200}},
            "costmodel": {"kind": "roofline"}, "planner": {"kind": "hpipe", "token_granularity": SLICE}}
    return parse_scenario(data, "compression-accuracy").resolve()


def _three_stage_plan(setup, codecs):
    from hpipe.plan import Plan, Stage

    n = setup.n_units
    cuts = [(0, CUTS[0]), (CUTS[0], CUTS[1]), (CUTS[1], n)]
    return Plan(planner="hand", scenario=setup.name, slices=[SLICE] * (PROMPT_BYTES // SLICE), codecs=codecs,
                stages=[Stage(devices=[f"h{i}/core-0"], units=u) for i, u in enumerate(cuts)]).check(setup)


@dataclass(frozen=True)
class Config:
    """One row of the as-run table: the plan's codec per boundary, and what happens to the
    messages the runtime's rule sends through it."""

    codecs: tuple[str, ...]
    cast: object = None
    """None: the codec itself.  A torch dtype: those messages are cast to it and back
    instead (calibration: precisions that GPU deployments ship as 'uncompressed').  A
    function x -> x: that round trip instead (``--what-if``: variants of int8 that spend
    more bytes)."""
    one_slice: bool = False
    """No codec; the prefill in one slice instead of the plan's (calibration: float32's own
    rounding, from a different but mathematically equal schedule)."""


@contextmanager
def _cast_instead(cast):
    """The reference's codec round trip replaced by a cast to ``cast`` (a dtype) and back, or by
    the round trip ``cast`` (a function), for the messages the codec would have carried
    (benchmark calibration and what-ifs only)."""
    import torch

    import hpipe.runtime.codec_reference as ref

    saved = ref.round_trip
    ref.round_trip = ((lambda x, name: x.to(cast).to(x.dtype)) if isinstance(cast, torch.dtype)
                      else (lambda x, name: cast(x)))
    try:
        yield
    finally:
        ref.round_trip = saved


def int8_variant(block: int, zero_point: bool = False):
    """A round trip (x -> x) of int8 as the codec lays it out (channel-major blocks, an fp16
    scale rounded up) with ``block`` values a block, and with ``zero_point`` an asymmetric grid
    (uint8 values, a one-byte zero point per block: the grid spans min..max instead of
    -absmax..absmax).  Not a codec hpipe ships: ``--what-if`` measures what more bytes would buy.
    Wire bytes per value: 1 + 2 / block, plus 1 / block with the zero point."""
    import torch

    from hpipe.runtime.codecs import _blocks, _from_channel_major, _scales

    def rt(x):
        v, k = _blocks(x, block, channel_major=True)  # (nb, block)
        if zero_point:
            # the grid holds zero (as asymmetric int8 does): a one-signed block's zero point stays in 0..255
            lo, hi = v.amin(dim=1).clamp(max=0), v.amax(dim=1).clamp(min=0)
            s = _scales(((hi - lo) / 2)[:, None], 127.5).float()  # >= (hi - lo) / 255
            safe = torch.where(s == 0, torch.ones_like(s), s)
            zp = torch.round(-lo / safe).clamp(0, 255)
            q = (torch.round(v / safe[:, None]) + zp[:, None]).clamp(0, 255)
            y = (q - zp[:, None]) * s[:, None]
        else:
            s = _scales(v, 127.0).float()
            safe = torch.where(s == 0, torch.ones_like(s), s)
            y = (v / safe[:, None]).round().clamp(-127, 127) * s[:, None]
        return _from_channel_major(y.reshape(-1)[:k], x.shape).to(x.dtype)

    return rt


WHAT_IF = {"int8, blocks of 32": (32, False), "int8, blocks of 16": (16, False),
           "int8 + zero point, blocks of 64": (64, True)}
"""``accuracy --what-if``: int8 variants that spend more wire bytes than the codec (1.031 B per
value): 1.0625, 1.125 and 1.047 B per value."""


def _as_run(units, setup, prompts, tokens: int, configs: dict[str, Config]) -> list[dict]:
    """Per config: logit errors teacher-forced, argmax and greedy agreement against the same
    plan uncompressed, and the near-tie evidence: the reference's top-1 minus top-2 logit
    margin where each diverging prompt first differs."""
    from hpipe.runtime.codec_reference import CompressedRun, generate

    B, V = prompts.shape[0], SMALL["vocab_size"]
    ref_run = CompressedRun.of(setup, _three_stage_plan(setup, None))
    ref_logits = np.zeros((B, tokens, V), np.float32)
    ref_ids, _ = generate(units, prompts, tokens, ref_run, step_logits=ref_logits)
    ref_ids = np.asarray(ref_ids)
    top2 = np.sort(ref_logits, axis=-1)[..., -2:]
    margin = top2[..., 1] - top2[..., 0]  # (B, tokens)
    print("  the uncompressed model's top-1 minus top-2 logit margins: "
          + ", ".join(f"{(margin < m).mean():.2%} under {m}" for m in (0.01, 0.02, 0.05))
          + f" (of {margin.size} positions)")
    rows = []
    for label, cfg in configs.items():
        if cfg.one_slice:
            run = replace(ref_run, slices=(PROMPT_BYTES,))
        else:
            run = CompressedRun.of(setup, _three_stage_plan(setup, list(cfg.codecs)))
        tf_logits = np.zeros_like(ref_logits)
        with _cast_instead(cfg.cast) if cfg.cast is not None else nullcontext():
            free, _ = generate(units, prompts, tokens, run)
            generate(units, prompts, tokens, run, teacher=ref_ids, step_logits=tf_logits)
        free = np.asarray(free)
        err = np.abs(tf_logits - ref_logits)
        first = [int(np.argmax(free[k] != ref_ids[k])) for k in range(B)]
        diverge = [(first[k], float(margin[k, first[k]])) for k in range(B) if (free[k] != ref_ids[k]).any()]
        lossy = [c for j, per in enumerate(run.item_codecs or ()) if cfg.codecs[j] != "none" for c in per]
        rows.append(dict(label=label, share=sum(c != "none" for c in lossy) / max(len(lossy), 1), max=float(err.max()), mean=float(err.mean()),
                         scale=float(np.abs(ref_logits).mean()),
                         argmax=float((tf_logits.argmax(-1) == ref_ids).mean()),
                         greedy=float((free == ref_ids).mean()), differ=int((free != ref_ids).sum()),
                         diverge=diverge, margin_pct=[float((margin < m).mean()) for _, m in diverge]))
    return rows


def _print_as_run(rows, B: int, tokens: int) -> None:
    print(f"  {'codecs (boundary 1, 2)':30s} {'compressed':>10s} {'max |dlogit|':>12s} {'mean |dlogit|':>13s} "
          f"{'argmax agree':>12s} {'greedy agree':>12s} {'differing':>11s}  first divergence (step, ref top1-top2 "
          f"margin, its percentile)")
    for r in rows:
        div = ", ".join(f"({s}, {m:.3f}, p{100 * p:.1f})" for (s, m), p in zip(r["diverge"], r["margin_pct"])) or "-"
        print(f"  {r['label']:30s} {r['share']:10.0%} {r['max']:12.4f} {r['mean']:13.5f} {r['argmax']:12.2%} "
              f"{r['greedy']:12.2%} {r['differ']:5d}/{B * tokens}  {div}")


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    p = k / n
    mid, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (mid - half) / (1 + z * z / n), (mid + half) / (1 + z * z / n)


def _print_summary(rows, families: dict[str, list[str]], B: int, tokens: int) -> None:
    """Per codec (or calibration): the generated tokens agreeing free-running over its
    placements, and per placement the prompts whose generation diverges at all, with a 95%
    interval (placements share their prompts and near-ties, so each is its own sample)."""
    print(f"\n  {'':30s} {'greedy agree':>12s}   diverging prompts of {B}, per placement (95% interval)")
    by_label = {r["label"]: r for r in rows}
    for fam, labels in families.items():
        rs = [by_label[x] for x in labels]
        agree = 1 - sum(r["differ"] for r in rs) / (B * tokens * len(rs))
        per = []
        for r in rs:
            k = len(r["diverge"])
            lo, hi = _wilson(k, B)
            per.append(f"{k} ({lo:.1%}-{hi:.1%})")
        print(f"  {fam:30s} {agree:12.2%}   {', '.join(per)}")


def _print_boundary_error(units, prompts, codecs) -> None:
    """RMS round-trip error of each codec on the residual stream where each stage begins, as a
    share of its RMS, on the plan's prefill messages (the prompts' rows, slices of SLICE
    tokens), with blocks along each token and with blocks along each channel's rows (a 1-D
    tensor keeps its order, so each layout is laid out here and handed over flat); '*' marks
    the layout the codec uses (``Codec.channel_major``)."""
    import torch

    from hpipe.codecs import get_codec
    from hpipe.runtime.codecs import _channel_major, _from_channel_major, round_trip

    acts = {}
    with torch.inference_mode():
        x = prompts
        for u in units:
            if u.unit.index in CUTS:
                acts[u.unit.index] = x.clone()  # (B, T, D)
            x = u(x, 0)

    def along_token(m, c):
        return round_trip(m.reshape(-1), c).view(m.shape)

    def along_channel(m, c):
        return _from_channel_major(round_trip(_channel_major(m), c), m.shape)

    print(f"\nround-trip error at the boundaries, % of the residual stream's RMS ({prompts.shape[0]} prompts' "
          f"prefill messages of {SLICE} tokens): blocks along a token / along a channel ('*': the codec's)")
    for cut, a in acts.items():
        rms = float(a.pow(2).mean().sqrt())
        msgs = [a[:, i:i + SLICE] for i in range(0, a.shape[1], SLICE)]
        cells = []
        for c in codecs:
            err = [float(torch.cat([(f(m, c) - m).reshape(-1) for m in msgs]).pow(2).mean().sqrt()) / rms
                   for f in (along_token, along_channel)]
            mark = ("", "*") if get_codec(c).channel_major else ("*", "")
            cells.append(f"{c} {err[0]:.2%}{mark[0]} / {err[1]:.2%}{mark[1]}")
        for name, dtype in (("bf16 cast", torch.bfloat16), ("fp16 cast", torch.float16)):
            e = torch.cat([(m.to(dtype).to(m.dtype) - m).reshape(-1) for m in msgs])
            cells.append(f"{name} {float(e.pow(2).mean().sqrt()) / rms:.3%}")
        print(f"  stage starting at unit {cut}: " + "; ".join(cells))


def accuracy(tokens: int, checkpoint: str | None, n_prompts: int = 256, seed: int = 0, what_if: bool = False) -> None:
    """What the codecs cost in accuracy, on the small LLaMA trained here (``TRAIN``, ``seed``)
    and on random weights, against the same plan uncompressed, per codec:

    1. *as hpipe runs it*: a three-stage plan, the codec on the prefill messages where the
       runtime's rule says it pays, decode steps raw; per placement (hop 1, hop 2, both): max
       and mean |logit error| and argmax agreement teacher-forced on the uncompressed tokens,
       greedy agreement free-running, and where each diverging prompt first differs with the
       uncompressed model's top-1 minus top-2 margin there.  Calibration rows put the same
       messages through casts nobody calls lossy (bf16, fp16: what GPU runs ship between
       stages) and float32 with the prefill in one slice, to show what free-running agreement
       can be with perturbations that small; a summary gives each its greedy agreement over
       the placements and, per placement, the prompts that diverge at all with a 95% interval;
       and the share of the uncompressed model's top-1 minus top-2 margins under 0.01, 0.02
       and 0.05 (the near-ties a perturbation can flip).
    2. *harsh* (not how hpipe runs): every message compressed at both boundaries, decode steps
       included, with and without two persistent outlier channels at 100x the RMS, and int8
       with one scale per tensor beside the blockwise codecs.

    ``what_if``: part 1 only, for int8 and the variants in ``WHAT_IF`` (more bytes per value)."""
    import torch

    from hpipe.models import get_model
    from hpipe.runtime.codecs import HAS_FP8, round_trip
    from hpipe.runtime.model import build_units
    from hpipe.runtime.weights import HFWeights, RandomWeights, spec_from_hf_config

    torch.manual_seed(0)
    codecs = ["int8", "fp8", "int4"] if HAS_FP8 else ["int8", "int4"]
    fns = {c: (lambda x, c=c: round_trip(x, c)) for c in codecs}
    fns["int8 per-tensor"] = per_tensor_int8
    held = _corpus(CORPUS_GLOB.replace("[a-m]", "[n-z]"), 1 << 20)
    B, T = n_prompts, PROMPT_BYTES
    # evenly spaced through the held-out text, never chosen by outcome
    starts = [len(held) * (i + 1) // (B + 1) for i in range(B)]
    prompts = torch.tensor([list(held[s:s + T]) for s in starts], dtype=torch.long)
    print(f"{cpu_model()}, load average {_load()} at start ({os.cpu_count()} CPUs; other work shows in it); {B} prompts of {T} bytes "
          f"(held-out Python source), {tokens} greedy tokens each (no EOS stop)")
    if T + tokens > TRAIN["context"]:
        raise SystemExit(f"--tokens {tokens}: the prompt ({T}) plus the output would run past the "
                         f"{TRAIN['context']} positions the model is trained on")
    folder = Path(checkpoint or f"/tmp/hpipe-compression-llama-ctx256{f'-seed{seed}' if seed else ''}")
    info = train_small_llama(folder, seed)  # on two threads: a quiet machine's both cores
    torch.set_num_threads(1)  # the measurement: one core, as a stage worker has
    print(f"trained small LLaMA {SMALL} at {folder}: {info}")
    spec = spec_from_hf_config(folder)
    trained = HFWeights(folder, spec)
    units = build_units(spec, 0, spec.n_units, trained)

    # 0. the codecs' error where the stages meet, on the plan's prefill messages
    spread = prompts[::max(1, B // 16)][:16]  # 16 of the prompts, spread over the text
    _print_boundary_error(units, spread, codecs)

    # 1. as hpipe runs it
    setup = _accuracy_setup(folder, B, tokens)
    configs, families = {}, {}
    placements = ((0,), (1,), (0, 1))

    def at(name, js):
        return tuple(name if j in js else "none" for j in range(len(CUTS)))

    if what_if:
        codecs = ["int8"]
    for c in codecs:
        families[c] = [", ".join(at(c, js)) for js in placements]
        configs.update({", ".join(at(c, js)): Config(at(c, js)) for js in placements})
    if what_if:
        for name, (block, zp) in WHAT_IF.items():
            families[name] = [", ".join(at(name, js)) for js in placements]
            configs.update({", ".join(at(name, js)): Config(at("int8", js), cast=int8_variant(block, zp))
                            for js in placements})
        print(f"\nwhat if int8 spent more bytes (trained, as hpipe runs it: units {[0, *CUTS, spec.n_units]}, "
              f"prefill in {T // SLICE} slices of {SLICE}, decode steps raw):")
        rows = _as_run(units, setup, prompts.numpy(), tokens, configs)
        _print_as_run(rows, B, tokens)
        _print_summary(rows, families, B, tokens)
        return
    # Calibration: how often free-running greedy agreement breaks for perturbations that nobody
    # calls lossy: the same messages cast to bf16 / fp16 and back (what GPU runs ship between
    # stages), and float32 with the prefill in one slice instead of three.
    for name, dtype in (("bf16 cast", torch.bfloat16), ("fp16 cast", torch.float16)):
        families[name] = [", ".join(at(name, js)) for js in placements]
        configs.update({", ".join(at(name, js)): Config(at("int8", js), cast=dtype) for js in placements})
    families["fp32, prefill in one slice"] = ["fp32, prefill in one slice"]
    configs["fp32, prefill in one slice"] = Config(("none", "none"), one_slice=True)
    print(f"\ntrained, as hpipe runs it: a three-stage plan (units {[0, *CUTS, spec.n_units]}), prefill in "
          f"{T // SLICE} slices of {SLICE}, the codec on each prefill message where it pays (the runtime's "
          f"rule, 100 Mbit/s links), decode steps raw; against the same plan uncompressed; logit errors "
          f"teacher-forced on the uncompressed tokens; 'compressed': share of the prefill messages on the lossy "
          f"boundaries that the rule compressed:")
    rows = _as_run(units, setup, prompts.numpy(), tokens, configs)
    _print_as_run(rows, B, tokens)
    _print_summary(rows, families, B, tokens)

    # 2. harsh: every message, decode steps included, at both boundaries; 16 of the prompts
    # (the random-weights model is 30x the trained one's compute per token)
    # random weights at the catalog's small-llama width (512 channels)
    prompts, B = spread, spread.shape[0]
    models = {"trained": (spec, units), }
    rw = RandomWeights(get_model("small-llama"), seed=0)
    models["random weights"] = (rw.spec, build_units(rw.spec, 0, rw.spec.n_units, rw))
    for label, (s, units) in models.items():
        with torch.inference_mode():  # the residual stream's scale where it crosses the first boundary
            x = prompts
            for u in units[:CUTS[0]]:
                x = u(x, 0)
            rms = float(x.pow(2).mean().sqrt())
        # Two persistent outlier features (as LLMs grow: the same channels, every token), 100x the
        # residual stream's typical value, channels 17 and 40.  They ride through the boundary and
        # the receiver takes them out again (x + o -> codec -> - o), as a model that ignores them
        # would: what remains is what the outliers did to their neighbours' grid.  Channel-major
        # blocks keep a prefill message's outlier channels in blocks of their own; a decode step's
        # message (one token of B rows) has blocks of 64 / B channels, so there they share.
        outlier = torch.zeros(s.d_model)
        outlier[[17, 40]] = 100 * rms

        for case, with_outliers in (("", False), (" + outliers", True)):
            wrap = (lambda fn: (lambda x: fn(x + outlier) - outlier)) if with_outliers else (lambda fn: fn)
            case_fns = {name: wrap(fn) for name, fn in fns.items()}
            print(f"\n{label} (d_model {s.d_model}){case}, HARSH (not how hpipe runs): every position "
                  f"compressed at both boundaries (units {list(CUTS)}), decode steps included, whole prompt "
                  f"in one pass:")
            print(f"  {'codec':16s} {'max |dlogit|':>12s} {'mean |dlogit|':>13s} {'mean |logit|':>12s} "
                  f"{'argmax agree':>12s} {'greedy agree':>12s} {'tokens differing':>16s}")
            for name, mx, mean, scale, tf, free, ndiff in _compare(units, prompts, tokens, case_fns,
                                                                    ref_fn=wrap(lambda x: x)):
                print(f"  {name:16s} {mx:12.4f} {mean:13.5f} {scale:12.3f} {tf:12.2%} {free:12.2%} "
                      f"{ndiff:10d} / {B * tokens}")
        if label == "trained":
            ids, _ = _greedy(units, prompts[:1], 64, lambda x: x)
            print("  sample (uncompressed greedy):", repr(bytes(ids[0].tolist()).decode("utf-8", "replace")))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--repeats", type=int, default=5)
    lat.add_argument("--profile", choices=["full", "quick"], default="full",
                     help="the profile to measure into the cache when it has none that fits")
    sub.add_parser("testbed")
    sub.add_parser("codec-time")
    acc = sub.add_parser("accuracy")
    acc.add_argument("--tokens", type=int, default=128)
    acc.add_argument("--checkpoint", default=None,
                     help="where the trained model is kept (trained there first, by TRAIN, when absent); "
                          "default /tmp/hpipe-compression-llama-ctx256[-seedN]")
    acc.add_argument("--seed", type=int, default=0, help="the training seed (initial weights, batches)")
    acc.add_argument("--what-if", action="store_true",
                     help="only int8 and variants that spend more bytes (WHAT_IF), as hpipe runs it")
    acc.add_argument("--prompts", type=int, default=256,
                     help="prompts, evenly spaced through the held-out text (a divergence is rare: many are needed)")
    args = ap.parse_args(argv)
    if args.what == "latency":
        latency(args.repeats, args.profile)
    elif args.what == "testbed":
        testbed()
    elif args.what == "codec-time":
        codec_time()
    else:
        accuracy(args.tokens, args.checkpoint, args.prompts, args.seed, args.what_if)


if __name__ == "__main__":
    main()
