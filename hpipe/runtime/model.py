"""Transformer inference code cut into hpipe's partition units.

In the spirit of gpt-fast / nanoGPT: one readable file, no framework.  A model
is the sequence of units the planner works with -- ``Embedding``, then per
block an ``AttentionUnit`` and an ``MLPUnit``, then the ``Head`` -- so a
pipeline stage is simply a run of units (``build_units(spec, start, end)``).

Two families, matching the Hugging Face reference implementations so HF
weights load unchanged:

* llama: RMSNorm, rotary embeddings (HF's rotate_half convention), SwiGLU MLP,
  grouped-query attention, no biases.
* gpt:   LayerNorm, learned positions, GELU (tanh approximation, GPT-2's
  "gelu_new") MLP, biases everywhere, output projection tied to the embedding.

Every unit's ``forward(x, pos, cache)`` takes a *slice* of the sequence that
starts at token ``pos`` (the context already seen); attention writes the
slice's keys and values into the micro-batch's ``KVCache`` and attends over
``cache[:pos + n]`` with a causal mask shifted by ``pos``.  This is what lets
a sequence be pipelined on the token dimension (TeraPipe / HPipe).

Tensor parallelism is Megatron-style: attention is split by query heads, each
rank holding the key/value heads its query heads use (replicated when there
are more ranks than key/value heads, as Megatron does for grouped-query
attention), the MLP by the columns of its first and the rows of its second
projection; each split unit sums its partial output with the ``all_reduce``
it is given, then adds the (unsplit) output bias.  Parts may be uneven (the
first ranks get one head or column more), so any size up to ``n_heads`` works.  Embedding and
head are built whole on every tensor-parallel rank (they are one unit each,
and replicating them needs no communication); a stage worker then runs the head on its
leader alone, the one rank whose logits are read.

Weights come from a *weight source* (see ``weights.py``): an object with
``get(unit, name, shard) -> Tensor`` returning the tensor in this module's
layout (``nn.Linear``'s (out, in)), already cut to ``shard = (dim, start,
stop)`` when one is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from hpipe.models import ModelSpec, Unit, check_tensor_parallel, split_range, tp_heads  # noqa: F401  (tp_heads: tests)

# enable_gqa arrived in torch 2.5; older versions get the key/value heads repeated instead.
_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

AllReduce = Callable[[torch.Tensor], torch.Tensor]
Shard = tuple[int, int, int]  # (dim, start, stop): rows/columns [start, stop) of dimension dim


class WeightSource(Protocol):
    def get(self, unit: Unit, name: str, shard: Shard | None = None) -> torch.Tensor: ...


def param_shapes(spec: ModelSpec, unit: Unit) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every tensor of a unit, in this module's layout.

    The names are the contract between the units and the weight sources."""
    d, kv, ff, V = spec.d_model, spec.kv_dim, spec.d_ff, spec.vocab_size
    gpt = spec.family == "gpt"
    norm = {"norm.weight": (d,), **({"norm.bias": (d,)} if gpt else {})}
    if unit.kind == "embed":
        return {"tok": (V, d), **({"pos": (spec.max_seq_len, d)} if gpt else {})}
    if unit.kind == "attn":
        shapes = {**norm, "wq": (d, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, d)}
        if gpt:
            shapes.update(bq=(d,), bk=(kv,), bv=(kv,), bo=(d,))
        return shapes
    if unit.kind == "mlp":
        if gpt:
            return {**norm, "w_fc": (ff, d), "b_fc": (ff,), "w_proj": (d, ff), "b_proj": (d,)}
        return {**norm, "w_gate": (ff, d), "w_up": (ff, d), "w_down": (d, ff)}
    return {**norm, "out": (V, d)}


def tp_shard(spec: ModelSpec, unit: Unit, name: str, rank: int, size: int) -> Shard | None:
    """The rows or columns of tensor ``name`` that rank ``rank`` of ``size`` holds (None: all)."""
    if size == 1 or unit.kind not in ("attn", "mlp"):
        return None
    hd = spec.head_dim
    (h0, h1), (k0, k1) = tp_heads(spec, rank, size)
    f0, f1 = split_range(spec.d_ff, rank, size)
    return {
        "wq": (0, h0 * hd, h1 * hd), "bq": (0, h0 * hd, h1 * hd), "wo": (1, h0 * hd, h1 * hd),
        "wk": (0, k0 * hd, k1 * hd), "bk": (0, k0 * hd, k1 * hd),
        "wv": (0, k0 * hd, k1 * hd), "bv": (0, k0 * hd, k1 * hd),
        "w_gate": (0, f0, f1), "w_up": (0, f0, f1), "w_fc": (0, f0, f1), "b_fc": (0, f0, f1),
        "w_down": (1, f0, f1), "w_proj": (1, f0, f1),
    }.get(name)


class KVCache:
    """Keys and values of one attention unit for one micro-batch.

    Preallocated to the whole sequence so a slice only writes its rows; torch.empty
    so the memory is touched (and counted as resident) as the sequence fills it."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.empty(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)  # (B, Hkv, T, hd)
        self.v = torch.empty_like(self.k)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def rows(self, start: int, stop: int) -> "KVCache":
        """The cache of sequences [start, stop) of the batch: views, sharing the memory."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[start:stop], self.v[start:stop]
        return view


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class _Unit(nn.Module):
    """Common plumbing: fetch this unit's (sharded) tensors from the source as buffers."""

    def __init__(self, spec: ModelSpec, unit: Unit, source: WeightSource, dtype, device,
                 tp_rank: int, tp_size: int, all_reduce: AllReduce | None):
        super().__init__()
        self.spec, self.unit = spec, unit
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.all_reduce = all_reduce if (all_reduce is not None and tp_size > 1) else _identity
        for name, shape in param_shapes(spec, unit).items():
            shard = tp_shard(spec, unit, name, tp_rank, tp_size)
            t = source.get(unit, name, shard)
            want = list(shape)
            if shard:
                want[shard[0]] = shard[2] - shard[1]
            if list(t.shape) != want:
                raise ValueError(f"unit {unit.index} ({unit.kind}) tensor {name}: shape {list(t.shape)}, "
                                 f"expected {want}")
            # Buffers, not parameters: inference only, and state_dict() still lists them.
            self.register_buffer(name.replace(".", "_"), t.to(device=device, dtype=dtype).contiguous())

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.family == "gpt":
            return F.layer_norm(x, (x.shape[-1],), self.norm_weight, self.norm_bias, self.spec.norm_eps)
        # As HF's LlamaRMSNorm: normalise in float32, scale in the input dtype.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.spec.norm_eps)
        return self.norm_weight * x32.to(dtype)

    def make_cache(self, batch: int, max_len: int) -> KVCache | None:
        return None


class Embedding(_Unit):
    """Token ids (B, n) -> hidden states (B, n, D); GPT adds learned positions."""

    def forward(self, ids: torch.Tensor, pos: int, cache=None) -> torch.Tensor:
        x = F.embedding(ids, self.tok)  # (B, n, D)
        if self.spec.family == "gpt":
            n = ids.shape[1]
            if pos + n > self.spec.max_seq_len:
                raise ValueError(f"position {pos + n} beyond the model's max_seq_len {self.spec.max_seq_len}")
            x = x + self.pos[pos:pos + n]  # (n, D) broadcast over B
        return x


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class AttentionUnit(_Unit):
    """norm -> q, k, v -> rotary (llama) -> causal attention over the KV cache -> out proj; + residual."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        s = self.spec
        self.head_dim = s.head_dim
        (h0, h1), (k0, k1) = tp_heads(s, self.tp_rank, self.tp_size)
        self.n_heads = h1 - h0  # local query heads
        self.n_kv_heads = k1 - k0  # local key/value heads
        group = s.n_heads // s.n_kv_heads
        # Local query head j uses local key/value head kv_of[j].  When the split cuts a group
        # of query heads (uneven parts, more ranks than key/value heads) the pattern is not
        # the plain repeat that SDPA's enable_gqa assumes, so those ranks index instead.
        kv_of = [(h0 + j) // group - k0 for j in range(self.n_heads)]
        self.uniform_gqa = kv_of == [j // (self.n_heads // self.n_kv_heads) for j in range(self.n_heads)] \
            if self.n_heads % self.n_kv_heads == 0 else False
        self.register_buffer("kv_of", torch.tensor(kv_of, device=self.wq.device), persistent=False)
        if s.family == "llama":
            # Same arithmetic as HF's default rotary embedding, so logits match to float32 rounding.
            inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float()
                                              / self.head_dim))
            self.register_buffer("inv_freq", inv_freq.to(self.wq.device), persistent=False)
        self._rope_cache: tuple[int, int, torch.Tensor, torch.Tensor] | None = None

    def make_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(batch, self.n_kv_heads, max_len, self.head_dim, self.wq.dtype, self.wq.device)

    def _rope(self, pos: int, n: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._rope_cache
        if c is None or c[0] != pos or c[1] != n:
            t = torch.arange(pos, pos + n, device=self.inv_freq.device, dtype=torch.float32)
            freqs = t[:, None] * self.inv_freq[None, :]  # (n, hd/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (n, hd)
            c = self._rope_cache = (pos, n, emb.cos().to(dtype), emb.sin().to(dtype))
        return c[2], c[3]

    def forward(self, x: torch.Tensor, pos: int, cache: KVCache | None = None) -> torch.Tensor:
        B, n, _ = x.shape  # (B, n, D)
        hd = self.head_dim
        gpt = self.spec.family == "gpt"
        h = self.norm(x)
        q = F.linear(h, self.wq, self.bq if gpt else None).view(B, n, self.n_heads, hd).transpose(1, 2)
        k = F.linear(h, self.wk, self.bk if gpt else None).view(B, n, self.n_kv_heads, hd).transpose(1, 2)
        v = F.linear(h, self.wv, self.bv if gpt else None).view(B, n, self.n_kv_heads, hd).transpose(1, 2)
        # q: (B, H, n, hd); k, v: (B, Hkv, n, hd)
        if not gpt:
            cos, sin = self._rope(pos, n, q.dtype)  # (n, hd)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if cache is not None:
            cache.k[:, :, pos:pos + n] = k
            cache.v[:, :, pos:pos + n] = v
            k, v = cache.k[:, :, :pos + n], cache.v[:, :, :pos + n]  # (B, Hkv, pos + n, hd)
        elif pos:
            raise ValueError("a slice after a prefix needs the prefix's KV cache")
        kw = {}
        if self.n_heads != self.n_kv_heads:
            if self.uniform_gqa and _SDPA_GQA:
                kw["enable_gqa"] = True
            else:  # query head j uses key/value head kv_of[j] (HF's repeat_kv when uniform)
                k, v = k.index_select(1, self.kv_of), v.index_select(1, self.kv_of)
        if pos == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
        elif n == 1:  # a decode step: the one query sees every key, no mask to build
            o = F.scaled_dot_product_attention(q, k, v, **kw)
        else:
            # Query i of the slice sits at position pos + i and sees keys 0 .. pos + i.
            mask = torch.ones(n, pos + n, dtype=torch.bool, device=x.device).tril(diagonal=pos)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
        o = o.transpose(1, 2).reshape(B, n, self.n_heads * hd)  # (B, n, D / tp)
        o = self.all_reduce(F.linear(o, self.wo))  # partial sums over heads -> (B, n, D)
        if gpt:
            o = o + self.bo
        return x + o


class MLPUnit(_Unit):
    """norm -> SwiGLU (llama) or GELU (gpt) MLP; + residual."""

    def forward(self, x: torch.Tensor, pos: int, cache=None) -> torch.Tensor:
        h = self.norm(x)  # (B, n, D)
        if self.spec.family == "gpt":
            a = F.gelu(F.linear(h, self.w_fc, self.b_fc), approximate="tanh")  # (B, n, F / tp)
            y = self.all_reduce(F.linear(a, self.w_proj)) + self.b_proj
        else:
            a = F.silu(F.linear(h, self.w_gate)) * F.linear(h, self.w_up)  # (B, n, F / tp)
            y = self.all_reduce(F.linear(a, self.w_down))
        return x + y


class Head(_Unit):
    """Final norm and output projection: (B, n, D) -> logits (B, n, V)."""

    def forward(self, x: torch.Tensor, pos: int, cache=None) -> torch.Tensor:
        return F.linear(self.norm(x), self.out)


_CLASSES = {"embed": Embedding, "attn": AttentionUnit, "mlp": MLPUnit, "head": Head}


def build_units(spec: ModelSpec, start: int, end: int, source: WeightSource, *, dtype="float32",
                device="cpu", tp_rank: int = 0, tp_size: int = 1,
                all_reduce: AllReduce | None = None) -> list[_Unit]:
    """The units [start, end) of ``spec`` (a pipeline stage), on ``device``, for TP rank ``tp_rank``."""
    why = check_tensor_parallel(spec, tp_size)
    if why:
        raise ValueError(why)
    units = spec.units()
    if not 0 <= start < end <= len(units):
        raise ValueError(f"unit range [{start}, {end}) outside 0..{len(units)}")
    torch_dtype = TORCH_DTYPES[dtype] if isinstance(dtype, str) else dtype
    with torch.no_grad():
        return [_CLASSES[u.kind](spec, u, source, torch_dtype, device, tp_rank, tp_size, all_reduce).eval()
                for u in units[start:end]]


def run_units(units: Sequence[_Unit], x: torch.Tensor, pos: int,
              caches: dict[int, KVCache] | None = None) -> torch.Tensor:
    """One slice through a run of units; ``caches`` maps unit index -> that unit's KV cache."""
    for u in units:
        x = u(x, pos, caches.get(u.unit.index) if caches is not None else None)
    return x


def make_caches(units: Sequence[_Unit], batch: int, max_len: int) -> dict[int, KVCache]:
    """A fresh KV cache for every attention unit of a stage, for one micro-batch."""
    caches = {}
    for u in units:
        c = u.make_cache(batch, max_len)
        if c is not None:
            caches[u.unit.index] = c
    return caches


@torch.inference_mode()
def full_forward(spec: ModelSpec, source: WeightSource, ids: torch.Tensor, *, dtype="float32",
                 device="cpu", slices: Sequence[int] | None = None) -> torch.Tensor:
    """The whole model in this process: token ids (B, T) -> logits (B, T, V).

    With ``slices`` the sequence is fed slice by slice through the KV cache (the
    pipelined computation without the pipeline); without, in one pass."""
    units = build_units(spec, 0, spec.n_units, source, dtype=dtype, device=device)
    ids = ids.to(device)
    B, T = ids.shape
    if not slices:
        return run_units(units, ids, 0)
    if sum(slices) != T:
        raise ValueError(f"slices sum to {sum(slices)}, sequence has {T} tokens")
    caches = make_caches(units, B, T)
    out, pos = [], 0
    for n in slices:
        out.append(run_units(units, ids[:, pos:pos + n], pos, caches))
        pos += n
    return torch.cat(out, dim=1)
