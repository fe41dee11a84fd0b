"""Model specs, the model catalog, and the partition units planners work with.

A model is cut into *layer-level units*, finer than transformer blocks:
the embedding, then for each block its attention part and its MLP part, then
the head (final norm and output projection).  A model of ``n_layers`` blocks
has ``2 * n_layers + 2`` units.  Each unit knows its FLOPs and the bytes it
moves as a function of (slice tokens ``n``, context tokens before the slice
``c``, batch ``b``); every such function accepts numpy arrays, so planners can
tabulate whole grids at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import numpy as np

from hpipe.errors import InputError, suggest

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

UnitKind = Literal["embed", "attn", "mlp", "head"]


class SpecError(ValueError):
    """A model shape that cannot be: the field and the problem."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only transformer; presets live in ``MODELS``."""

    family: Literal["llama", "gpt"]
    """llama: RMSNorm, rotary positions, SwiGLU MLP, no biases.
    gpt: LayerNorm, learned positions, GELU MLP, biases (GPT-2/GPT-3 layout)."""
    n_layers: int
    """Transformer blocks."""
    d_model: int
    """Hidden size."""
    n_heads: int
    """Query heads."""
    n_kv_heads: int
    """Key/value heads (< n_heads: grouped-query attention)."""
    d_ff: int
    """MLP inner size."""
    vocab_size: int
    name: str = "custom"
    max_seq_len: int = 4096
    """Longest sequence: the size of GPT's learned position table."""
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    """Output projection shares the token embedding (GPT-2 style)."""
    source: str = ""
    """Where the shape comes from."""

    def __post_init__(self):
        for f in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "max_seq_len"):
            if getattr(self, f) <= 0:
                raise SpecError(f, f"must be positive, got {getattr(self, f)}")
        for f in ("norm_eps", "rope_theta"):  # a zero or negative one makes NaN or garbage logits
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise SpecError(f, f"must be a positive number, got {v!r}")
        if self.family not in ("llama", "gpt"):
            raise SpecError("family", f"must be 'llama' or 'gpt', got {self.family!r}")
        if not isinstance(self.tie_embeddings, bool):  # a quoted 'false' would read as tied
            raise SpecError("tie_embeddings", f"must be true or false, got {self.tie_embeddings!r}")
        for f in ("name", "source"):
            if not isinstance(getattr(self, f), str):
                raise SpecError(f, f"must be text, got {getattr(self, f)!r}")
        if self.d_model % self.n_heads:
            raise SpecError("d_model", f"{self.d_model} must be a multiple of n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise SpecError("n_kv_heads", f"{self.n_kv_heads} must divide n_heads ({self.n_heads})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def n_units(self) -> int:
        return 2 * self.n_layers + 2

    def units(self) -> list["Unit"]:
        out = [Unit(self, "embed", 0, None)]
        for layer in range(self.n_layers):
            out.append(Unit(self, "attn", len(out), layer))
            out.append(Unit(self, "mlp", len(out), layer))
        out.append(Unit(self, "head", len(out), None))
        return out

    def param_count(self) -> int:
        return sum(u.param_count() for u in self.units())

    def to_dict(self) -> dict:
        return asdict(self)


def check_tensor_parallel(spec: ModelSpec, tp_size: int) -> str | None:
    """Why ``spec`` cannot be split ``tp_size`` ways, or None when it can: each rank takes
    whole attention heads (uneven counts are fine, none is not).  The plan check, the
    profiler and the runtime all ask this one rule."""
    if tp_size > spec.n_heads:
        return f"the model has only {spec.n_heads} attention heads to split"
    return None


@dataclass(frozen=True)
class Unit:
    """One layer-level unit of a model: what it computes and what it holds."""

    model: ModelSpec = field(repr=False)
    kind: UnitKind
    index: int
    """Position in model order (0 = embedding)."""
    layer: int | None
    """Block index for attn/mlp units."""

    # ---- parameters -------------------------------------------------------
    def param_count(self) -> int:
        m = self.model
        d, kv, ff, V = m.d_model, m.kv_dim, m.d_ff, m.vocab_size
        gpt = m.family == "gpt"
        if self.kind == "embed":
            return V * d + (m.max_seq_len * d if gpt else 0)
        if self.kind == "attn":
            w = d * d + 2 * d * kv + d * d
            norm = 2 * d if gpt else d
            bias = (d + 2 * kv + d) if gpt else 0
            return w + norm + bias
        if self.kind == "mlp":
            if gpt:
                return 2 * d * ff + ff + d + 2 * d
            return 3 * d * ff + d
        # head: final norm plus the output projection unless tied to the embedding
        norm = 2 * d if gpt else d
        return norm + (0 if m.tie_embeddings else V * d)

    def weight_bytes(self, dtype_bytes: int) -> int:
        """Bytes of weights this unit holds.  A tied head still holds its own copy
        of the embedding matrix when it sits on another device than the embedding,
        so it is counted here; param_count() counts it once."""
        n = self.param_count()
        if self.kind == "head" and self.model.tie_embeddings:
            n += self.model.vocab_size * self.model.d_model
        return n * dtype_bytes

    # ---- per-slice costs (numpy-broadcastable in n, c, b) -----------------
    def flops(self, n, c, b):
        """Forward FLOPs for a slice of n tokens after c context tokens, batch b.

        Attention counts the causal part exactly: token i of the slice attends
        to c + i + 1 positions, c + (n + 1) / 2 on average."""
        m = self.model
        n, c, b = np.asarray(n, float), np.asarray(c, float), np.asarray(b, float)
        d, kv, ff, V, h, hd = m.d_model, m.kv_dim, m.d_ff, m.vocab_size, m.n_heads, m.head_dim
        if self.kind == "embed":
            return b * n * d * (1.0 if m.family == "gpt" else 0.0)
        if self.kind == "attn":
            proj = 2.0 * b * n * (2 * d * d + 2 * d * kv)
            attended = c + (n + 1.0) / 2.0
            scores = 4.0 * b * h * n * attended * hd  # QK^T and PV
            return proj + scores + 10.0 * b * n * d  # norm, rotary, softmax, residual
        if self.kind == "mlp":
            mats = 3 if m.family == "llama" else 2
            return 2.0 * b * n * mats * d * ff + 10.0 * b * n * ff
        return 2.0 * b * n * d * V + 5.0 * b * n * d

    def bytes_moved(self, n, c, b, dtype_bytes: int):
        """Bytes read and written from device memory for one slice: weights,
        the KV cache read by attention, activations in and out."""
        m = self.model
        n, c, b = np.asarray(n, float), np.asarray(c, float), np.asarray(b, float)
        act = b * n * m.d_model * dtype_bytes
        w = float(self.weight_bytes(dtype_bytes))
        if self.kind == "embed":
            return 2.0 * act + 0.0 * c
        if self.kind == "attn":
            kv = b * (c + n) * 2 * m.kv_dim * dtype_bytes
            return w + kv + 4.0 * act
        if self.kind == "mlp":
            inner = b * n * m.d_ff * dtype_bytes
            return w + 2.0 * act + 3.0 * inner + 0.0 * c
        return w + act + b * n * m.vocab_size * dtype_bytes + 0.0 * c

    def out_bytes(self, n, b, dtype_bytes: int):
        """Bytes of the activation this unit hands to the next: (b, n, d_model).
        The head's output (logits) stays where it is computed."""
        if self.kind == "head":
            return 0.0 * np.asarray(n, float)
        return np.asarray(b, float) * np.asarray(n, float) * self.model.d_model * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV-cache bytes this unit keeps per token of one sequence."""
        return 2 * self.model.kv_dim * dtype_bytes if self.kind == "attn" else 0

    def workspace_bytes(self, n, b, dtype_bytes: int):
        """Transient activation memory while running a slice (fused attention,
        so no score matrix): input, output and the widest intermediate."""
        m = self.model
        n, b = np.asarray(n, float), np.asarray(b, float)
        act = b * n * m.d_model * dtype_bytes
        if self.kind == "attn":
            return 2.0 * act + b * n * (m.d_model + 2 * m.kv_dim) * dtype_bytes
        if self.kind == "mlp":
            return 2.0 * act + (3 if m.family == "llama" else 2) * b * n * m.d_ff * dtype_bytes
        if self.kind == "head":
            return act + b * n * m.vocab_size * dtype_bytes
        return 2.0 * act

    def tp_allreduce_bytes(self, n, b, dtype_bytes: int):
        """Bytes all-reduced once per slice when this unit is split Megatron-style
        across tensor-parallel devices (attention and MLP: one (b, n, d) sum)."""
        if self.kind in ("attn", "mlp"):
            return np.asarray(b, float) * np.asarray(n, float) * self.model.d_model * dtype_bytes
        return 0.0 * np.asarray(n, float)


def _llama(name, n_layers, d_model, n_heads, d_ff, n_kv_heads=None, vocab=32000, source="", **kw):
    return ModelSpec(family="llama", name=name, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                     n_kv_heads=n_kv_heads or n_heads, d_ff=d_ff, vocab_size=vocab, source=source, **kw)


def _gpt(name, n_layers, d_model, n_heads, vocab=50257, max_seq_len=2048, source="", **kw):
    return ModelSpec(family="gpt", name=name, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                     n_kv_heads=n_heads, d_ff=4 * d_model, vocab_size=vocab, max_seq_len=max_seq_len,
                     tie_embeddings=True, source=source, **kw)


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        _llama("llama-7b", 32, 4096, 32, 11008, max_seq_len=2048, norm_eps=1e-6,
               source="Touvron et al. 2023, LLaMA, Table 2 (6.7B)"),
        _llama("llama-13b", 40, 5120, 40, 13824, max_seq_len=2048, norm_eps=1e-6,
               source="Touvron et al. 2023, LLaMA, Table 2 (13.0B)"),
        _llama("llama-2-7b", 32, 4096, 32, 11008, max_seq_len=4096, norm_eps=1e-5,
               source="meta-llama/Llama-2-7b-hf config.json"),
        _llama("llama-2-70b", 80, 8192, 64, 28672, n_kv_heads=8, max_seq_len=32768, norm_eps=1e-5,
               source="meta-llama/Llama-2-70b-hf config.json (GQA, 8 KV heads); context extended to 32k"),
        _gpt("gpt3-1.3b", 24, 2048, 16,
             source="Brown et al. 2020, GPT-3, Table 2.1 (XL); heads as GPT-Neo-1.3B"),
        _gpt("gpt3-2.7b", 32, 2560, 32,
             source="Brown et al. 2020, GPT-3, Table 2.1 (2.7B: 32 layers, d_model 2560)"),
        # Small models that a CPU runs in seconds, for `hpipe execute` here.
        _llama("tiny-llama", 4, 256, 8, 688, n_kv_heads=4, vocab=1000, max_seq_len=2048,
               source="hpipe test model (GQA)"),
        _gpt("tiny-gpt", 4, 256, 8, vocab=1000, max_seq_len=2048, source="hpipe test model"),
        _llama("small-llama", 8, 512, 8, 1376, n_kv_heads=4, vocab=8000, max_seq_len=4096,
               source="hpipe CPU model, ~30M parameters"),
    ]
}

_SPEC_FIELDS = {f.name for f in fields(ModelSpec)}


def past_trained_context(spec: ModelSpec, seq_len: int, output_tokens: int, source: str) -> str | None:
    """A rotary (LLaMA) model computes at any position, but was trained on ``spec.max_seq_len``
    of them and reads and writes worse past that: the note to give, or None.  ``source`` says
    where that context comes from.  (A GPT model's learned positions end there: refused.)"""
    used = positions_used(seq_len, output_tokens)
    if spec.family == "gpt" or used <= spec.max_seq_len:
        return None
    what = (f"{seq_len} prompt + {output_tokens} new tokens run the model at {used} positions (the last new "
            f"token is not fed back)" if output_tokens else f"{seq_len} tokens run the model at {used} positions")
    return (f"{what}, past the {spec.max_seq_len} it was trained on ({source}); rotary positions compute "
            f"there, so the plan and its figures hold, but the model's outputs there usually degrade")


def decode_steps(output_tokens: int) -> int:
    """Decode steps a sequence makes for ``output_tokens`` new tokens: the first comes from the
    prefill's own logits, each further one from a step."""
    return max(output_tokens - 1, 0)


def positions_used(seq_len: int, output_tokens: int) -> int:
    """Positions a run computes: the prompt's, then one per decode step (each feeds back the
    token before it; the last new token is never fed back)."""
    return seq_len + decode_steps(output_tokens)


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise InputError(f"unknown model {name!r}{suggest(name, MODELS)}; "
                         f"`hpipe models` lists the catalog") from None


# ---- tensor-parallel splits (the runtime's, hpipe.runtime.model; the memory check's) ----------
def split_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Part ``rank`` of ``n`` things cut in ``size`` parts as evenly as can be (the first
    ``n % size`` parts one larger), as numpy.array_split."""
    q, r = divmod(n, size)
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


def tp_heads(spec: ModelSpec, rank: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Query heads [h0, h1) of a tensor-parallel rank and the key/value heads [k0, k1) they use."""
    h0, h1 = split_range(spec.n_heads, rank, size)
    group = spec.n_heads // spec.n_kv_heads
    return (h0, h1), (h0 // group, (h1 - 1) // group + 1)


def tp_degree_ok(model: ModelSpec, tp: int) -> bool:
    """Whether ``model`` splits evenly ``tp`` ways (heads, key/value heads and d_ff)."""
    return tp >= 1 and model.n_heads % tp == 0 and model.n_kv_heads % tp == 0 and model.d_ff % tp == 0


def tp_largest_shares(spec: ModelSpec, size: int) -> tuple[float, float, float]:
    """The largest share one of ``size`` tensor-parallel ranks holds of the query heads, of the
    key/value heads and of the MLP's hidden width: 1/size each where ``size`` divides them, more
    where it does not.  Split unevenly, a rank's query heads may straddle two key/value groups
    and hold both: TP 3 of 8 heads over 2 key/value heads gives a rank both, not a third."""
    q = kv = ff = 0.0
    for rank in range(size):
        (h0, h1), (k0, k1) = tp_heads(spec, rank, size)
        f0, f1 = split_range(spec.d_ff, rank, size)
        q, kv, ff = max(q, (h1 - h0) / spec.n_heads), max(kv, (k1 - k0) / spec.n_kv_heads), max(ff, (f1 - f0) / spec.d_ff)
    return q, kv, ff


def model_from_mapping(spec: dict) -> ModelSpec:
    """An inline model spec (the scenario's `model:` given as a mapping)."""
    unknown = set(spec) - _SPEC_FIELDS
    if unknown:
        bad = sorted(unknown)[0]
        raise InputError(f"unknown key{suggest(bad, _SPEC_FIELDS)}", field=bad)
    spec = dict(spec)
    if spec.get("family") == "gpt":
        spec.setdefault("tie_embeddings", True)
    spec.setdefault("n_kv_heads", spec.get("n_heads"))
    for req in ("family", "n_layers", "d_model", "n_heads", "d_ff", "vocab_size"):
        if req not in spec or spec[req] is None:
            raise InputError("missing required key", field=req)
    for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "max_seq_len"):
        if k in spec and (isinstance(spec[k], bool) or not isinstance(spec[k], int)):
            raise InputError(f"must be an integer, got {spec[k]!r}", field=k)
    for k in ("norm_eps", "rope_theta"):  # YAML 1.1 reads 1e-5 (no dot) as text; pydantic fields take it
        if isinstance(spec.get(k), str):
            try:
                spec[k] = float(spec[k])
            except ValueError:
                raise InputError(f"must be a positive number, got {spec[k]!r}", field=k) from None
    try:
        return ModelSpec(**spec)
    except SpecError as e:
        raise InputError(e.problem, field=e.field) from None
    except (ValueError, TypeError) as e:
        raise InputError(str(e)) from None
