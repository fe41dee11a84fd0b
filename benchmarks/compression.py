"""Activation compression: what it saves in time (simulated and measured) and costs in accuracy.

    PYTHONPATH=. python benchmarks/compression.py latency [--repeats 5]
    PYTHONPATH=. python benchmarks/compression.py testbed
    PYTHONPATH=. python benchmarks/compression.py accuracy [--tokens 128] [--train-s 240]

``latency``: on ``scenarios/local-cpu-hetero-int8.yaml`` (a 100 Mbit/s shaped link
between two emulated hosts; needs root, ip, tc and cgroups), hpipe's plan with its
codecs against the very same plan uncompressed, and a one-slice two-stage plan (the
transfer on the critical path) with and without int8: predicted (the scenario's
fitted model) and measured (fastest of ``--repeats`` runs each, the plans
interleaved, as ``hpipe validate`` takes them), and the bytes measured per link.

``testbed``: the paper's testbed (``scenarios/paper-llama7b.yaml``) with int8 allowed
on one hop, and on up to all hops: hpipe's simulated latency against uncompressed hpipe.

``accuracy``: see ``accuracy`` below.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from hpipe.scenario import load_scenario, parse_scenario  # noqa: E402


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


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


def latency(repeats: int) -> None:
    from hpipe.planners import make_plan
    from hpipe.runtime import emulation
    from hpipe.runtime.launcher import execute
    from hpipe.sim import simulate

    setup = load_scenario(ROOT / "scenarios/local-cpu-hetero-int8.yaml").resolve()
    why = emulation.emulation_unsupported(setup)
    if why:
        print(f"skipped: this machine cannot emulate local-cpu-hetero ({why})")
        return
    hp = make_plan(setup, "hpipe")
    gp = make_plan(setup, "gpipe")  # one slice over two stages: the transfer is on the critical path
    plans = {
        f"hpipe {hp.codecs}": hp, "hpipe same plan, none": hp.model_copy(update={"codecs": None}),
        "one-slice int8": gp.model_copy(update={"codecs": ["int8"]}), "one-slice none": gp,
    }
    print(f"{setup.name}: {_cpu_name()}, 2 cores shared with other work (load average {_load()} at start)")
    for name, p in plans.items():
        print(f"  {name:24s} stages {[s.units for s in p.stages]} slices {p.slices} mb {p.micro_batches}")
    sim = {k: simulate(setup, p) for k, p in plans.items()}
    meas: dict[str, list] = {k: [] for k in plans}
    for r in range(repeats):  # interleaved: drifting load hits every plan alike
        for k, p in plans.items():
            meas[k].append(execute(setup, p, quiet=True, warmup=1))
    best = {k: min(v, key=lambda x: x.latency_s) for k, v in meas.items()}
    print(f"  {'plan':24s} {'simulated s':>11s} {'measured s':>10s} {'error':>7s} {'hop s/item sim':>14s} "
          f"{'meas (median)':>13s}  bytes per link (measured)")
    for k in plans:
        s, m = sim[k].latency_s, best[k].latency_s
        hs = _hop_s(sim[k], setup, simulated=True)
        hm = float(np.median([_hop_s(x, setup) for x in meas[k]]))
        print(f"  {k:24s} {s:11.3f} {m:10.3f} {(s - m) / m:+7.1%} {hs:14.4f} {hm:13.4f}  {best[k].bytes_per_link}")
    keys = list(plans)
    for comp, plain in ((keys[0], keys[1]), (keys[2], keys[3])):
        ps = sim[plain].latency_s / sim[comp].latency_s - 1
        pm = best[plain].latency_s / best[comp].latency_s - 1
        all_m = [round(x.latency_s, 3) for x in meas[comp]], [round(x.latency_s, 3) for x in meas[plain]]
        print(f"  speed-up of {comp!r} over {plain!r}: simulated {ps:+.1%}, measured {pm:+.1%} "
              f"(runs: {all_m[0]} vs {all_m[1]})")
    print(f"  load average at the end {_load()}")


# -- testbed ------------------------------------------------------------------------
def testbed() -> None:
    import yaml

    from hpipe.planners import make_plan

    path = ROOT / "scenarios/paper-llama7b.yaml"
    base = yaml.safe_load(path.read_text())
    plain = make_plan(parse_scenario(base, str(path)).resolve(), "hpipe")
    print(f"paper-llama7b, hpipe uncompressed: {plain.predicted['latency_s']:.3f} s "
          f"(stages {[s.units for s in plain.stages]})")
    for allow, hops in ((["int8"], 1), (["int8"], 5), (["int8", "int4"], 5)):
        data = {**base, "compression": {"allow": allow, "max_lossy_hops": hops}}
        p = make_plan(parse_scenario(data, str(path)).resolve(), "hpipe")
        t = p.predicted["latency_s"]
        print(f"  allow {allow} max_lossy_hops {hops}: {t:.3f} s, speed-up {plain.predicted['latency_s'] / t - 1:+.2%}, "
              f"codecs {p.codecs}")
    # GPT3-2.7B on the same testbed: more activation bytes against its compute
    path3 = ROOT / "scenarios/paper-gpt3-2.7b.yaml"
    g = yaml.safe_load(path3.read_text())
    plain3 = make_plan(parse_scenario(g, str(path3)).resolve(), "hpipe")
    for allow in (["int8"], ["int8", "int4"]):
        p = make_plan(parse_scenario({**g, "compression": {"allow": allow, "max_lossy_hops": 5}}, str(path3)).resolve(),
                      "hpipe")
        t = p.predicted["latency_s"]
        print(f"paper-gpt3-2.7b, allow {allow} max_lossy_hops 5: {plain3.predicted['latency_s']:.4f} -> {t:.4f} s, "
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


# -- accuracy -----------------------------------------------------------------------
# A small byte-level LLaMA trained here on Python's own standard library source, so that
# the activations crossing a stage boundary have a trained model's statistics.
CORPUS_GLOB = "lib/python3*/[a-m]*.py"  # training text; held-out prompts come from [n-z]*.py
SMALL = dict(family="llama", n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, d_ff=352, vocab_size=256)
# stage boundaries of a three-stage plan (units: embed, 4 x (attention, MLP), head)
CUTS = (3, 7)


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


def train_small_llama(folder: Path, train_s: float, seed: int = 0) -> dict:
    """Train SMALL as a transformers LlamaForCausalLM on bytes for ``train_s`` seconds (or reuse
    a checkpoint already there); saved as safetensors for ``HFWeights``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return {"reused": str(folder)}
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=SMALL["d_model"], intermediate_size=SMALL["d_ff"],
                      num_hidden_layers=SMALL["n_layers"], num_attention_heads=SMALL["n_heads"],
                      num_key_value_heads=SMALL["n_kv_heads"], max_position_embeddings=1024,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    data = torch.frombuffer(bytearray(_corpus(CORPUS_GLOB, 4 << 20)), dtype=torch.uint8).long()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    T, B = 64, 8  # small steps: the 2 shared cores give this a fraction of one
    t0, step, losses = time.monotonic(), 0, []
    while time.monotonic() - t0 < train_s:
        idx = torch.randint(0, data.numel() - T - 1, (B,), generator=g)
        x = torch.stack([data[i:i + T + 1] for i in idx.tolist()])
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1].clone()).loss  # shifts inside
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
    model.save_pretrained(folder, safe_serialization=True)
    return {"steps": step, "seconds": time.monotonic() - t0, "loss_first": losses[0],
            "loss_last_50": sum(losses[-50:]) / len(losses[-50:])}


def per_tensor_int8(x):
    """int8 with one scale for the whole tensor: what blocks are there to avoid."""
    s = x.abs().amax().clamp(min=1e-30) / 127
    return (x / s).round().clamp(-127, 127) * s


def _greedy(units, prompt, steps: int, boundary_fn, teacher=None):
    """Greedy generation of ``steps`` tokens in one process; ``boundary_fn(x)`` is applied to the
    activation wherever a stage ends (CUTS).  With ``teacher`` (token ids) the given tokens are fed instead of the
    model's own (teacher forcing), so logits compare position by position.  Returns (ids, logits)."""
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


def accuracy(tokens: int, train_s: float, checkpoint: str) -> None:
    import torch

    from hpipe.models import get_model
    from hpipe.runtime.codecs import HAS_FP8, round_trip
    from hpipe.runtime.model import build_units
    from hpipe.runtime.weights import HFWeights, RandomWeights, spec_from_hf_config

    torch.manual_seed(0)
    torch.set_num_threads(1)  # two threads on two oversubscribed cores only spin against each other
    codecs = ["int8", "fp8", "int4"] if HAS_FP8 else ["int8", "int4"]
    fns = {c: (lambda x, c=c: round_trip(x, c)) for c in codecs}
    fns["int8 per-tensor"] = per_tensor_int8
    held = _corpus(CORPUS_GLOB.replace("[a-m]", "[n-z]"), 1 << 20)
    B, T = 4, 96
    starts = [len(held) * (i + 1) // (B + 1) for i in range(B)]
    prompts = torch.tensor([list(held[s:s + T]) for s in starts], dtype=torch.long)
    print(f"{_cpu_name()}, loaded by other work (load average {_load()}); {B} prompts of {T} bytes "
          f"(held-out Python source), {tokens} greedy tokens each, codec at unit boundaries {list(CUTS)} "
          f"(a three-stage plan); logit errors teacher-forced on the uncompressed tokens")
    folder = Path(checkpoint)
    info = train_small_llama(folder, train_s)
    print(f"trained small LLaMA {SMALL} at {folder}: {info}")
    # random weights at the catalog's small-llama width (512: 8 blocks of 64 per token, where the
    # trained model's 128 has only 2, so an outlier's block is half of each token there)
    models = {"random weights": RandomWeights(get_model("small-llama"), seed=0)}
    spec = spec_from_hf_config(folder)
    models["trained"] = HFWeights(folder, spec)
    for label, source in models.items():
        s = spec if label == "trained" else source.spec
        units = build_units(s, 0, s.n_units, source)
        with torch.inference_mode():  # the residual stream's scale where it crosses the first boundary
            x = prompts
            for u in units[:CUTS[0]]:
                x = u(x, 0)
            rms = float(x.pow(2).mean().sqrt())
        # Two persistent outlier features (as LLMs grow: the same channels, every token), 100x the
        # residual stream's typical value, both in the first block of 64.  They ride through the
        # boundary and the receiver takes them out again (x + o -> codec -> - o), as a model that
        # ignores them would: what remains is what the outliers did to their neighbours' grid.
        outlier = torch.zeros(s.d_model)
        outlier[[17, 40]] = 100 * rms

        for case, with_outliers in (("", False), (" + outliers", True)):
            wrap = (lambda fn: (lambda x: fn(x + outlier) - outlier)) if with_outliers else (lambda fn: fn)
            case_fns = {name: wrap(fn) for name, fn in fns.items()}
            print(f"\n{label} (d_model {s.d_model}){case}:")
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
    sub.add_parser("testbed")
    acc = sub.add_parser("accuracy")
    acc.add_argument("--tokens", type=int, default=128)
    acc.add_argument("--train-s", type=float, default=240.0)
    acc.add_argument("--checkpoint", default="/tmp/hpipe-compression-llama")
    args = ap.parse_args(argv)
    if args.what == "latency":
        latency(args.repeats)
    elif args.what == "testbed":
        testbed()
    else:
        accuracy(args.tokens, args.train_s, args.checkpoint)


if __name__ == "__main__":
    main()
