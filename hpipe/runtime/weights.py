"""Where a stage's tensors come from: seeded random weights, or a Hugging Face folder.

Both sources answer ``get(unit, name, shard)`` with one tensor of one unit in
``model.py``'s layout (``nn.Linear``'s (out, in)), already cut to its
tensor-parallel shard, so a stage builds only what it holds:

* ``RandomWeights`` draws every tensor from a generator seeded by (seed, unit
  index, tensor name): each stage and each tensor-parallel rank rebuilds the
  very same full tensors without any communication, and the launcher's
  single-process check sees the same model.
* ``HFWeights`` reads a folder with ``config.json`` and ``*.safetensors``
  (LLaMA and GPT-2 naming).  Files are opened lazily with ``safe_open`` and
  only the requested rows/columns are read (``get_slice``), so a stage reads
  its own units' tensors and only its shard of them.  GPT-2 stores its
  projections as ``Conv1D`` (in, out) and fuses q, k, v into ``c_attn``: the
  slicing accounts for both.  A tied output projection reads the embedding.
  Never pickle: only safetensors files are read.

``spec_from_hf_config`` turns the folder's ``config.json`` into a ``ModelSpec``.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from hpipe.errors import InputError
from hpipe.models import ModelSpec, Unit
from hpipe.runtime.model import Shard, param_shapes

INIT_STD = 0.02  # GPT-2 / LLaMA initializer_range


def _cut(t: torch.Tensor, shard: Shard | None) -> torch.Tensor:
    if shard is None:
        return t
    dim, start, stop = shard
    return t.narrow(dim, start, stop - start).contiguous()


class RandomWeights:
    """Seeded random weights of the model's shapes (N(0, 0.02) matrices, norms near 1)."""

    def __init__(self, spec: ModelSpec, seed: int = 0):
        self.spec, self.seed = spec, seed

    def get(self, unit: Unit, name: str, shard: Shard | None = None) -> torch.Tensor:
        index = unit.index
        shape = param_shapes(self.spec, unit)[name]
        if unit.kind == "head" and name == "out" and self.spec.tie_embeddings:
            index, name = 0, "tok"  # tied: the head draws exactly the embedding matrix
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{index}/{name}".encode()))
        t = torch.randn(shape, generator=g) * INIT_STD
        if name == "norm.weight":
            t += 1.0
        return _cut(t, shard)


def check_folder(weights: str | Path, scenario_file: str | None) -> None:
    """Refuse a scenario's ``weights`` that is no folder, naming the scenario that gives it."""
    folder = Path(weights)
    if not folder.is_dir():
        raise InputError(f"{weights} " + ("is a file, not a folder" if folder.exists() else "does not exist")
                         + " (a Hugging Face folder: config.json and *.safetensors)", file=scenario_file,
                         field="weights")


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise InputError("no config.json in the weights folder", file=str(folder), field="weights")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON: {e}", file=str(path)) from None


def spec_from_hf_config(folder: str | Path) -> ModelSpec:
    """The ``ModelSpec`` of a Hugging Face LLaMA or GPT-2 folder (from its config.json)."""
    folder = Path(folder)
    cfg = _config(folder)
    where = str(folder / "config.json")
    kind = cfg.get("model_type")

    def need(key, *alts):
        for k in (key, *alts):
            if cfg.get(k) is not None:
                return cfg[k]
        raise InputError("missing", file=where, field=key)

    def refuse(field, value, why):
        raise InputError(f"{value!r}: {why}; hpipe runs only the plain LLaMA and GPT-2 layouts",
                         file=where, field=field)

    if kind == "llama":
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                refuse(flag, cfg[flag], "biases are not supported for llama")
        if cfg.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", cfg["hidden_act"], "only silu (SwiGLU) is supported")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            refuse("rope_parameters.rope_type", rope_type, "only default rotary embeddings are supported")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        d, heads = need("hidden_size"), need("num_attention_heads")
        if cfg.get("head_dim") not in (None, d // heads):
            refuse("head_dim", cfg["head_dim"], f"must be hidden_size / num_attention_heads = {d // heads}")
        fields = dict(family="llama", n_layers=need("num_hidden_layers"), d_model=d, n_heads=heads,
                      n_kv_heads=cfg.get("num_key_value_heads") or heads, d_ff=need("intermediate_size"),
                      vocab_size=need("vocab_size"), max_seq_len=cfg.get("max_position_embeddings", 2048),
                      norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    elif kind == "gpt2":
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            refuse("activation_function", act, "only gelu_new (tanh GELU) is supported")
        if cfg.get("scale_attn_by_inverse_layer_idx"):
            refuse("scale_attn_by_inverse_layer_idx", True, "not supported")
        if cfg.get("scale_attn_weights", True) is not True:
            refuse("scale_attn_weights", cfg["scale_attn_weights"], "unscaled attention is not supported")
        d = need("n_embd", "hidden_size")
        fields = dict(family="gpt", n_layers=need("n_layer", "num_hidden_layers"), d_model=d,
                      n_heads=need("n_head", "num_attention_heads"), d_ff=cfg.get("n_inner") or 4 * d,
                      vocab_size=need("vocab_size"), max_seq_len=cfg.get("n_positions", 1024),
                      norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                      tie_embeddings=bool(cfg.get("tie_word_embeddings", True)))
        fields["n_kv_heads"] = fields["n_heads"]
    else:
        raise InputError(f"model_type {kind!r} is not supported (llama or gpt2)", file=where, field="model_type")
    try:
        return ModelSpec(name=folder.name, source=where, **fields)
    except ValueError as e:
        raise InputError(str(e), file=where) from None


# Our (unit kind, tensor name) -> (HF name template, stored as Conv1D (in, out)?, which third of c_attn)
_LLAMA = {
    ("embed", "tok"): "model.embed_tokens.weight",
    ("attn", "norm.weight"): "model.layers.{l}.input_layernorm.weight",
    ("attn", "wq"): "model.layers.{l}.self_attn.q_proj.weight",
    ("attn", "wk"): "model.layers.{l}.self_attn.k_proj.weight",
    ("attn", "wv"): "model.layers.{l}.self_attn.v_proj.weight",
    ("attn", "wo"): "model.layers.{l}.self_attn.o_proj.weight",
    ("mlp", "norm.weight"): "model.layers.{l}.post_attention_layernorm.weight",
    ("mlp", "w_gate"): "model.layers.{l}.mlp.gate_proj.weight",
    ("mlp", "w_up"): "model.layers.{l}.mlp.up_proj.weight",
    ("mlp", "w_down"): "model.layers.{l}.mlp.down_proj.weight",
    ("head", "norm.weight"): "model.norm.weight",
    ("head", "out"): "lm_head.weight",
}
_GPT2 = {
    ("embed", "tok"): "wte.weight",
    ("embed", "pos"): "wpe.weight",
    ("attn", "norm.weight"): "h.{l}.ln_1.weight",
    ("attn", "norm.bias"): "h.{l}.ln_1.bias",
    ("attn", "wo"): "h.{l}.attn.c_proj.weight",
    ("attn", "bo"): "h.{l}.attn.c_proj.bias",
    ("mlp", "norm.weight"): "h.{l}.ln_2.weight",
    ("mlp", "norm.bias"): "h.{l}.ln_2.bias",
    ("mlp", "w_fc"): "h.{l}.mlp.c_fc.weight",
    ("mlp", "b_fc"): "h.{l}.mlp.c_fc.bias",
    ("mlp", "w_proj"): "h.{l}.mlp.c_proj.weight",
    ("mlp", "b_proj"): "h.{l}.mlp.c_proj.bias",
    ("head", "norm.weight"): "ln_f.weight",
    ("head", "norm.bias"): "ln_f.bias",
    ("head", "out"): "lm_head.weight",
}
_GPT2_QKV = {"wq": 0, "wk": 1, "wv": 2, "bq": 0, "bk": 1, "bv": 2}


class HFWeights:
    """Tensors of a Hugging Face folder, read lazily and only as far as asked."""

    def __init__(self, folder: str | Path, spec: ModelSpec | None = None):
        self.folder = Path(folder)
        self.spec = spec or spec_from_hf_config(self.folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise InputError("no *.safetensors file in the weights folder (pickled .bin weights are "
                             "never loaded)", file=str(self.folder), field="weights")
        self._file_of: dict[str, Path] = {}
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            for name, fname in json.loads(index.read_text())["weight_map"].items():
                self._file_of[name] = self.folder / fname
        else:
            from safetensors import safe_open
            for f in files:  # reads each file's header only
                with safe_open(str(f), framework="pt") as h:
                    for name in h.keys():
                        self._file_of[name] = f
        self._handles: dict[Path, object] = {}

    # -- lookup ---------------------------------------------------------------
    def _resolve(self, template: str, layer: int | None) -> str | None:
        name = template.format(l=layer)
        # GPT-2 checkpoints come with ("transformer.") and without the prefix; LLaMA ones
        # saved from the bare model lack "model.".
        bare = name[len("model."):] if name.startswith("model.") else name
        for cand in (name, "transformer." + name, bare):
            if cand in self._file_of:
                return cand
        return None

    def _slice(self, name: str):
        path = self._file_of[name]
        h = self._handles.get(path)
        if h is None:
            from safetensors import safe_open
            h = self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return h.get_slice(name)

    def _missing(self, what: str) -> InputError:
        return InputError(f"tensor {what} not found in its *.safetensors files", file=str(self.folder),
                          field="weights")

    def get(self, unit: Unit, name: str, shard: Shard | None = None) -> torch.Tensor:
        sl, index, conv = self._locate(unit, name, shard)
        t = sl[index]
        if conv:
            t = t.t()
        return t.contiguous()

    def verify(self) -> None:
        """Check that every tensor of the model is there with its shape, reading headers only,
        so a bad folder is an input error before any worker starts."""
        from hpipe.runtime.model import param_shapes

        for unit in self.spec.units():
            for name in param_shapes(self.spec, unit):
                self._locate(unit, name, None)

    def _locate(self, unit: Unit, name: str, shard: Shard | None):
        """(lazy slice of the stored tensor, index into it, stored as Conv1D?) for one tensor."""
        spec = self.spec
        gpt = spec.family == "gpt"
        ours = param_shapes(spec, unit)[name]
        conv = False
        offset = None  # first row (in our layout) inside a fused tensor
        if gpt and unit.kind == "attn" and name in _GPT2_QKV:
            template = "h.{l}.attn.c_attn." + ("weight" if name.startswith("w") else "bias")
            offset = (0, spec.d_model, spec.d_model + spec.kv_dim)[_GPT2_QKV[name]]
            conv = name.startswith("w")
        else:
            template = (_GPT2 if gpt else _LLAMA)[(unit.kind, name)]
            conv = gpt and unit.kind in ("attn", "mlp") and len(ours) == 2
        hf = self._resolve(template, unit.layer)
        if hf is None and unit.kind == "head" and name == "out":
            hf = self._resolve(_GPT2[("embed", "tok")] if gpt else _LLAMA[("embed", "tok")], None)  # tied
        if hf is None:
            raise self._missing(template.format(l=unit.layer))
        sl = self._slice(hf)
        stored = tuple(sl.get_shape())

        # Row/column ranges in our layout, then mapped onto the stored layout.
        ranges = [[0, n] for n in ours]
        if offset is not None:
            ranges[0] = [offset, offset + ours[0]]
        if shard is not None:
            dim, start, stop = shard
            a = ranges[dim][0]
            ranges[dim] = [a + start, a + stop]
        if conv:
            ranges = ranges[::-1]
        expect = list(ours[::-1] if conv else ours)
        if offset is not None:
            expect[-1] = spec.d_model + 2 * spec.kv_dim  # fused q, k, v columns
        if list(stored) != expect or any(b > n for (_, b), n in zip(ranges, stored)):
            raise InputError(f"tensor {hf} has shape {list(stored)}, expected {expect} for the model "
                             f"in config.json", file=str(self._file_of[hf]), field="weights")
        return sl, tuple(slice(a, b) for a, b in ranges), conv

    def close(self) -> None:
        self._handles.clear()


def weight_source(spec: ModelSpec, weights: str | Path | None, seed: int = 0):
    """HF weights when a folder is given, else seeded random weights."""
    return HFWeights(weights, spec) if weights else RandomWeights(spec, seed)
