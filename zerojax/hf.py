"""Hugging Face model directories <-> zerojax params (Llama, GPT-2, T5), streamed both ways.

A Hugging Face directory holds `config.json` and `model.safetensors` (or shards plus
`model.safetensors.index.json`). `load_pretrained` builds the zerojax param tree from
it, each param created directly in its shards: every device reads only its own slice
from the files (for stacked layer params, only its layers and rows). `save_pretrained`
writes one back, tensor by tensor (for stacked params, one layer at a time), in Hugging
Face names and layouts, loadable by `transformers`' `from_pretrained`.

Only safetensors is read; `pytorch_model.bin` (a pickle) is refused, never unpickled.

Name mapping: one table per model (`LLAMA_NAMES`, `GPT2_NAMES`, `T5_NAMES`). Each row is
    zerojax param: (Hugging Face tensor, layout)
`layers.*` params (T5: `encoder.layers.*`, `decoder.layers.*`) are stacked `[num_layers, ...]`
in zerojax and stored per layer by Hugging Face, `{i}` being the layer. A layout reads "Hugging Face dims -> zerojax dims":
`(h k)` is one Hugging Face dim holding heads x head_dim (heads outer), and `@j/n`
marks the j-th of n equal chunks of a dim (GPT-2's fused `c_attn` holds q|k|v).
torch `nn.Linear` stores `[out, in]`, hence the transposes for Llama; GPT-2's `Conv1D`
stores `[in, out]` already.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping

import jax
import numpy as np

from zerojax import checkpoint
from zerojax.errors import CheckpointError
from zerojax.models import MODELS, GPT2Config, LlamaConfig, T5Config, make_config
from zerojax.safetensors_io import BF16, open_checkpoint_dir, put_sharded, write_sharded

# ----------------------------------------------------------------------------- name tables
# Letters: v vocab, d embed, p positions, f mlp, h heads, g kv heads, k head_dim.

LLAMA_NAMES: dict[str, tuple[str, str]] = {
    "embed_tokens":                    ("model.embed_tokens.weight",                        "v d -> v d"),
    "layers.input_layernorm":          ("model.layers.{i}.input_layernorm.weight",          "d -> d"),
    "layers.q_proj":                   ("model.layers.{i}.self_attn.q_proj.weight",         "(h k) d -> d h k"),
    "layers.k_proj":                   ("model.layers.{i}.self_attn.k_proj.weight",         "(g k) d -> d g k"),
    "layers.v_proj":                   ("model.layers.{i}.self_attn.v_proj.weight",         "(g k) d -> d g k"),
    "layers.o_proj":                   ("model.layers.{i}.self_attn.o_proj.weight",         "d (h k) -> h k d"),
    "layers.post_attention_layernorm": ("model.layers.{i}.post_attention_layernorm.weight", "d -> d"),
    "layers.gate_proj":                ("model.layers.{i}.mlp.gate_proj.weight",            "f d -> d f"),
    "layers.up_proj":                  ("model.layers.{i}.mlp.up_proj.weight",              "f d -> d f"),
    "layers.down_proj":                ("model.layers.{i}.mlp.down_proj.weight",            "d f -> f d"),
    "norm":                            ("model.norm.weight",                                "d -> d"),
    "lm_head":                         ("lm_head.weight",                                   "v d -> d v"),  # untied only
}

GPT2_NAMES: dict[str, tuple[str, str]] = {
    "wte":                   ("transformer.wte.weight",              "v d -> v d"),   # also the LM head
    "wpe":                   ("transformer.wpe.weight",              "p d -> p d"),
    "layers.ln_1_scale":     ("transformer.h.{i}.ln_1.weight",        "d -> d"),
    "layers.ln_1_bias":      ("transformer.h.{i}.ln_1.bias",          "d -> d"),
    "layers.q_proj":         ("transformer.h.{i}.attn.c_attn.weight", "d (h k)@0/3 -> d h k"),
    "layers.k_proj":         ("transformer.h.{i}.attn.c_attn.weight", "d (h k)@1/3 -> d h k"),
    "layers.v_proj":         ("transformer.h.{i}.attn.c_attn.weight", "d (h k)@2/3 -> d h k"),
    "layers.q_bias":         ("transformer.h.{i}.attn.c_attn.bias",   "(h k)@0/3 -> h k"),
    "layers.k_bias":         ("transformer.h.{i}.attn.c_attn.bias",   "(h k)@1/3 -> h k"),
    "layers.v_bias":         ("transformer.h.{i}.attn.c_attn.bias",   "(h k)@2/3 -> h k"),
    "layers.attn_proj":      ("transformer.h.{i}.attn.c_proj.weight", "(h k) d -> h k d"),
    "layers.attn_proj_bias": ("transformer.h.{i}.attn.c_proj.bias",   "d -> d"),
    "layers.ln_2_scale":     ("transformer.h.{i}.ln_2.weight",        "d -> d"),
    "layers.ln_2_bias":      ("transformer.h.{i}.ln_2.bias",          "d -> d"),
    "layers.c_fc":           ("transformer.h.{i}.mlp.c_fc.weight",    "d f -> d f"),
    "layers.c_fc_bias":      ("transformer.h.{i}.mlp.c_fc.bias",      "f -> f"),
    "layers.c_proj":         ("transformer.h.{i}.mlp.c_proj.weight",  "f d -> f d"),
    "layers.c_proj_bias":    ("transformer.h.{i}.mlp.c_proj.bias",    "d -> d"),
    "ln_f_scale":            ("transformer.ln_f.weight",              "d -> d"),
    "ln_f_bias":             ("transformer.ln_f.bias",                "d -> d"),
}


def _t5_stack(side: str, ff: int) -> dict[str, tuple[str, str]]:
    """One T5 stack's rows; Hugging Face's block i holds sublayers self-attention, (decoder:
    cross-attention), feed-forward as `layer.0`, `layer.1`, `layer.{ff}`."""
    block = f"{side}.block.{{i}}.layer"
    rows = {
        "relative_attention_bias": (f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "p h -> p h"),
        "layers.self_attn_layer_norm": (f"{block}.0.layer_norm.weight", "d -> d"),
        "layers.mlp_layer_norm": (f"{block}.{ff}.layer_norm.weight", "d -> d"),
        "layers.wi": (f"{block}.{ff}.DenseReluDense.wi.weight", "f d -> d f"),            # "relu" only
        "layers.wi_0": (f"{block}.{ff}.DenseReluDense.wi_0.weight", "f d -> d f"),        # gated only
        "layers.wi_1": (f"{block}.{ff}.DenseReluDense.wi_1.weight", "f d -> d f"),        # gated only
        "layers.wo": (f"{block}.{ff}.DenseReluDense.wo.weight", "d f -> f d"),
        "final_layer_norm": (f"{side}.final_layer_norm.weight", "d -> d"),
    }
    attentions = [("", "0.SelfAttention")] + ([("cross_", "1.EncDecAttention")] if side == "decoder" else [])
    for prefix, where in attentions:
        rows.update({
            f"layers.{prefix}q_proj": (f"{block}.{where}.q.weight", "(h k) d -> d h k"),
            f"layers.{prefix}k_proj": (f"{block}.{where}.k.weight", "(h k) d -> d h k"),
            f"layers.{prefix}v_proj": (f"{block}.{where}.v.weight", "(h k) d -> d h k"),
            f"layers.{prefix}o_proj": (f"{block}.{where}.o.weight", "d (h k) -> h k d"),
        })
    if side == "decoder":
        rows["layers.cross_attn_layer_norm"] = (f"{block}.1.layer_norm.weight", "d -> d")
    return {f"{side}.{name}": row for name, row in rows.items()}


T5_NAMES: dict[str, tuple[str, str]] = {
    "shared": ("shared.weight", "v d -> v d"),
    **_t5_stack("encoder", 1),
    **_t5_stack("decoder", 2),
    "lm_head": ("lm_head.weight", "v d -> d v"),                                        # untied only
}

# Tensors a Hugging Face file may hold that carry no weights zerojax needs: causal-mask
# and rotary buffers of older exports, and the LM head of a tied model (a copy of the
# embedding). Anything else unexpected is an error (it means a different model).
# T5 files may also hold the stacks' copies of the tied `shared` embedding, and an unused
# cross-attention relative bias some old exports carry.
IGNORED_TENSORS = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$"
                             r"|^(encoder|decoder)\.embed_tokens\.weight$"
                             r"|^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$")
TIED_HEAD = "lm_head.weight"

# Older GPT-2 exports (e.g. the original `gpt2`) store names without `transformer.`.
NAME_PREFIXES = {"llama": ("",), "gpt2": ("", "transformer."), "t5": ("",)}

ARCHITECTURES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "t5": "T5ForConditionalGeneration"}
SEQUENCE_CLASSIFIERS = {"llama": "LlamaForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000          # Hugging Face's default "5GB"
SAVE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BF16, "float16": np.dtype(np.float16)}
FLOAT_DTYPES = {*SAVE_DTYPES.values(), np.dtype(np.float64)}


def name_table(cfg: LlamaConfig | GPT2Config | T5Config) -> dict[str, tuple[str, str]]:
    """The rows of the name table that apply to this config (no `lm_head` when tied)."""
    if isinstance(cfg, GPT2Config):
        return dict(GPT2_NAMES)
    if isinstance(cfg, T5Config):
        mlp = ("wi_0", "wi_1") if cfg.is_gated else ("wi",)
        unused = {f"{side}.layers.{w}" for side in ("encoder", "decoder") for w in ("wi", "wi_0", "wi_1")
                  if w not in mlp} | ({"lm_head"} if cfg.tie_word_embeddings else set())
        return {name: row for name, row in T5_NAMES.items() if name not in unused}
    table = dict(LLAMA_NAMES)
    if cfg.tie_word_embeddings:
        del table["lm_head"]
    return table


# ----------------------------------------------------------------------------- layouts

_DIM = re.compile(r"\(([a-z ]+)\)(?:@(\d+)/(\d+))?|([a-z])(?:@(\d+)/(\d+))?")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a zerojax array sits in a Hugging Face tensor (parsed from "hf dims -> zj dims")."""

    hf: tuple[tuple[str, ...], ...]          # letters per Hugging Face dim (outer first)
    chunk: tuple[int, int, int] | None      # (hf dim, chunk index, chunk count)
    zj: tuple[str, ...]                     # letters per zerojax dim

    @classmethod
    def parse(cls, text: str) -> "Layout":
        left, right = (side.strip() for side in text.split("->"))
        hf, chunk, pos = [], None, 0
        for m in _DIM.finditer(left):
            if left[pos:m.start()].strip():
                raise ValueError(f"bad layout {text!r}")
            pos = m.end()
            group = tuple((m.group(1) or m.group(4)).split())
            index, count = (m.group(2), m.group(3)) if m.group(1) else (m.group(5), m.group(6))
            if index is not None:
                if chunk is not None:
                    raise ValueError(f"layout {text!r} chunks more than one dim")
                chunk = (len(hf), int(index), int(count))
            hf.append(group)
        zj = tuple(right.split())
        if left[pos:].strip() or sorted(a for g in hf for a in g) != sorted(zj) or len(set(zj)) != len(zj):
            raise ValueError(f"bad layout {text!r}")
        return cls(tuple(hf), chunk, zj)

    def _sizes(self, zj_shape) -> dict[str, int]:
        return dict(zip(self.zj, zj_shape))

    def hf_shape(self, zj_shape) -> tuple[int, ...]:
        """Shape of the whole Hugging Face tensor (all chunks) for a zerojax per-layer shape."""
        sizes = self._sizes(zj_shape)
        shape = [math.prod(sizes[a] for a in group) for group in self.hf]
        if self.chunk:
            shape[self.chunk[0]] *= self.chunk[2]
        return tuple(shape)

    def to_hf(self, array: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
        """(where in the Hugging Face tensor, the values) for one zerojax per-layer array."""
        sizes = self._sizes(array.shape)
        order = [self.zj.index(a) for group in self.hf for a in group]
        values = np.transpose(array, order).reshape([math.prod(sizes[a] for a in g) for g in self.hf])
        where = [slice(None)] * len(self.hf)
        if self.chunk:
            dim, index, _ = self.chunk
            where[dim] = slice(index * values.shape[dim], (index + 1) * values.shape[dim])
        return tuple(where), values

    def read(self, read_hf, zj_shape, box: tuple[slice, ...]) -> np.ndarray:
        """`zerojax_array[box]` from a Hugging Face tensor, via `read_hf(index)` of one region.

        Per Hugging Face dim, the rows of its outer letter are read whole in the inner
        letters (so a head-split read stays one rectangular slice), then trimmed.
        """
        sizes = self._sizes(zj_shape)
        want = dict(zip(self.zj, box))
        hf_index, expanded, trim = [], [], []
        for dim, group in enumerate(self.hf):
            inner = math.prod(sizes[a] for a in group[1:])
            outer = want[group[0]]
            offset = 0
            if self.chunk and self.chunk[0] == dim:
                offset = self.chunk[1] * math.prod(sizes[a] for a in group)
            hf_index.append(slice(offset + outer.start * inner, offset + outer.stop * inner))
            expanded += [outer.stop - outer.start] + [sizes[a] for a in group[1:]]
            trim += [slice(None)] + [want[a] for a in group[1:]]
        values = np.asarray(read_hf(tuple(hf_index))).reshape(expanded)[tuple(trim)]
        letters = [a for group in self.hf for a in group]
        return np.transpose(values, [letters.index(a) for a in self.zj])


for _table in (LLAMA_NAMES, GPT2_NAMES, T5_NAMES):
    for _name, (_, _layout) in _table.items():
        Layout.parse(_layout)                       # a typo in a table fails at import


# ----------------------------------------------------------------------------- config

# Hugging Face config keys that change the math, with the only values zerojax implements.
_LLAMA_REQUIRED = {"attention_bias": False, "mlp_bias": False, "rope_scaling": None}
_GPT2_REQUIRED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                  "add_cross_attention": False, "tie_word_embeddings": True}
_T5_REQUIRED = {"is_encoder_decoder": True, "is_decoder": False}
_REQUIRED = {"llama": _LLAMA_REQUIRED, "gpt2": _GPT2_REQUIRED, "t5": _T5_REQUIRED}


def read_hf_config(path: str) -> dict:
    """The parsed `config.json` of a Hugging Face model directory."""
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such model directory")
    try:
        with open(file) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; a Hugging Face model directory has config.json") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return hf


def _model_type(hf: Mapping[str, Any], file: str) -> str:
    kind = hf.get("model_type")
    archs = hf.get("architectures") or []
    if kind not in ARCHITECTURES:
        raise CheckpointError(f"{file}: model_type {kind!r} is not supported; zerojax reads "
                              f"{sorted(ARCHITECTURES)} ({', '.join(ARCHITECTURES.values())})")
    others = [a for a in archs if a != ARCHITECTURES[kind]]
    if others:
        raise CheckpointError(f"{file}: architectures {others} are not supported; zerojax reads "
                              f"{ARCHITECTURES[kind]}")
    return kind


def config_from_hf(hf: Mapping[str, Any], file: str = "config.json") -> LlamaConfig | GPT2Config:
    """The zerojax config for a Hugging Face config dict.

    Keys that do not change the forward math (token ids, dropout, `use_cache`, dtype,
    ...) are ignored; ones that do and are not implemented are rejected by name.
    """
    kind = _model_type(hf, file)
    required = _REQUIRED[kind]
    for key, supported in required.items():
        if hf.get(key, supported) != supported:
            raise CheckpointError(f"{file}: {key}={hf[key]!r} is not supported by zerojax's {kind} "
                                  f"(only {json.dumps(supported)})")
    config_cls = MODELS[kind][1]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: hf[k] for k in fields if k in hf}
    if kind == "llama":
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise CheckpointError(f"{file}: rope_parameters.rope_type={rope['rope_type']!r} is not "
                                  f"supported (only 'default' rotary embeddings)")
        extra = sorted(set(rope) - {"rope_type", "rope_theta"})
        if extra:
            raise CheckpointError(f"{file}: rope_parameters keys {extra} are not supported")
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from None


def load_config(path: str) -> LlamaConfig | GPT2Config | T5Config:
    """The zerojax model config of a Hugging Face model directory."""
    cfg = config_from_hf(read_hf_config(path), os.path.join(path, "config.json"))
    if isinstance(cfg, T5Config) and cfg.tie_word_embeddings and _t5_head_untied(path):
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    return cfg


def _t5_head_untied(path: str) -> bool:
    """transformers 5.x saves every T5 config with `tie_word_embeddings` true (T5 v1.1's
    rescale then lives in `scale_decoder_outputs`) and keeps a `lm_head.weight` that differs
    from `shared.weight` untied, so the files tell."""
    _refuse_pickles(path)
    with open_checkpoint_dir(path) as reader:
        if TIED_HEAD not in set(reader.names()):
            return False
        head, shared = (np.asarray(reader.read(n)) for n in (TIED_HEAD, "shared.weight"))
        return head.shape != shared.shape or not np.array_equal(head, shared)


def model_section(path: str) -> dict:
    """`{"type": "llama" | "gpt2", **fields}` for `zerojax.models.build` / the config file."""
    cfg = load_config(path)
    return {"type": _kind(cfg), **dataclasses.asdict(cfg)}


def _kind(cfg: LlamaConfig | GPT2Config | T5Config) -> str:
    if isinstance(cfg, LlamaConfig):
        return "llama"
    if isinstance(cfg, GPT2Config):
        return "gpt2"
    if isinstance(cfg, T5Config):
        return "t5"
    raise TypeError(f"expected a LlamaConfig, GPT2Config or T5Config, got {type(cfg).__name__}")


def hf_config(cfg: LlamaConfig | GPT2Config, dtype: str = "float32") -> dict:
    """The `config.json` contents `transformers` needs to rebuild this model."""
    kind = _kind(cfg)
    out = {"architectures": [ARCHITECTURES[kind]], "model_type": kind, **dataclasses.asdict(cfg)}
    if kind == "llama":
        # `rope_theta` for transformers 4.x, `rope_parameters` for 5.x.
        out.update(attention_bias=False, mlp_bias=False, attention_dropout=0.0, rope_scaling=None,
                   rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    elif kind == "t5":
        # transformers 4.x reads the head's tying and the rescale from `tie_word_embeddings`,
        # 5.x the rescale from `scale_decoder_outputs` (and an untied head from the files).
        out.update(is_encoder_decoder=True, dropout_rate=0.0, use_cache=True)
    else:
        # zerojax trains without dropout; the same math in transformers means none there.
        out.update(tie_word_embeddings=True, scale_attn_weights=True, resid_pdrop=0.0,
                   embd_pdrop=0.0, attn_pdrop=0.0)
    out.update(torch_dtype=dtype, dtype=dtype)      # the key's name in transformers 4.x / 5.x
    return out


# ----------------------------------------------------------------------------- param trees

def abstract_params(cfg: LlamaConfig | GPT2Config) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat `{"layers.q_proj": ShapeDtypeStruct, ...}` of the zerojax model for `cfg` (no arrays made)."""
    from flax import nnx

    from zerojax.models import MODELS

    model_cls = MODELS[_kind(cfg)][0]
    model = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    return flatten(jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(params)))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> `{"a.b": leaf}`."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    """`{"a.b": leaf}` -> nested dict."""
    out: dict = {}
    for name, value in flat.items():
        node = out
        *parents, last = name.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return out


def _is_stacked(name: str) -> bool:
    return "layers" in name.split(".")[:-1]


def _num_layers(cfg: LlamaConfig | GPT2Config | T5Config, name: str = "") -> int:
    if isinstance(cfg, T5Config):
        return cfg.num_decoder_layers if name.startswith("decoder.") else cfg.num_layers
    return cfg.num_hidden_layers if isinstance(cfg, LlamaConfig) else cfg.n_layer


# ----------------------------------------------------------------------------- loading

def _resolve_names(reader, cfg, table, abstract, where: str) -> dict[str, str]:
    """Table name (per layer) -> the name in the files; checks shapes and leftovers."""
    shapes = {n: s.shape for n, s in abstract.items()}
    expected: dict[str, tuple[int, ...]] = {}
    for name, (hf_name, layout) in table.items():
        per_layer = shapes[name][1:] if _is_stacked(name) else shapes[name]
        hf_shape = Layout.parse(layout).hf_shape(per_layer)
        for i in range(_num_layers(cfg, name)) if _is_stacked(name) else [None]:
            expected[hf_name.format(i=i)] = hf_shape
    present = set(reader.names())
    resolved: dict[str, str] = {}
    for hf_name, hf_shape in expected.items():
        candidates = [p + hf_name.removeprefix("transformer.") for p in NAME_PREFIXES[_kind(cfg)]]
        found = [c for c in (hf_name, *candidates) if c in present]
        if not found:
            raise CheckpointError(f"{where}: tensor {hf_name!r} is missing (config.json describes "
                                  f"a {_kind(cfg)} model with {_num_layers(cfg)} layers)")
        actual = reader.shape(found[0])
        if actual != hf_shape:
            raise CheckpointError(f"{reader.file_of(found[0])}: tensor {found[0]!r} has shape "
                                  f"{list(actual)}, config.json implies {list(hf_shape)}")
        if reader.dtype(found[0]) not in FLOAT_DTYPES:
            raise CheckpointError(f"{reader.file_of(found[0])}: tensor {found[0]!r} has dtype "
                                  f"{reader.dtype(found[0])}, expected a floating type")
        resolved[hf_name] = found[0]
    ignorable = lambda n: IGNORED_TENSORS.search(n) or n == TIED_HEAD and TIED_HEAD not in expected
    extra = sorted(n for n in present - set(resolved.values()) if not ignorable(n))
    if extra:
        raise CheckpointError(f"{where}: {len(extra)} tensor(s) the {_kind(cfg)} config does not "
                              f"describe, e.g. {extra[:5]} (a different model or config)")
    return resolved


def _refuse_pickles(path: str) -> None:
    has_safetensors = any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json")
                          for f in os.listdir(path))
    pickles = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))
                     or f == "pytorch_model.bin.index.json")
    if pickles and not has_safetensors:
        raise CheckpointError(
            f"{path}: holds {pickles} but no *.safetensors; zerojax reads only safetensors and never "
            f"unpickles. Convert it once with transformers: "
            f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)")


def load_params(path: str, *, shardings: Any = None, dtype: Any = np.float32,
                cfg: LlamaConfig | GPT2Config | None = None) -> dict:
    """The zerojax param tree (nested pure dict of jax.Arrays) of a Hugging Face directory.

    `shardings`: a nested dict of `jax.sharding.Sharding` matching the params (e.g.
    `engine.state_shardings.params`), or one Sharding for all; each param is created in
    its shards, each device reading only its own slice. Default: the first device.
    """
    cfg = cfg if cfg is not None else load_config(path)
    table = name_table(cfg)
    _refuse_pickles(path)
    abstract = abstract_params(cfg)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        flat_shardings = {name: shardings for name in abstract}
    else:
        flat_shardings = flatten(shardings)
        if set(flat_shardings) != set(abstract):
            raise ValueError(f"shardings do not match the params: missing "
                             f"{sorted(set(abstract) - set(flat_shardings))}, unexpected "
                             f"{sorted(set(flat_shardings) - set(abstract))}")

    with open_checkpoint_dir(path) as reader:
        resolved = _resolve_names(reader, cfg, table, abstract, path)
        out = {}
        for name, (hf_name, layout_text) in table.items():
            layout = Layout.parse(layout_text)
            shape = abstract[name].shape

            def read_slice(index, name=name, hf_name=hf_name, layout=layout, shape=shape):
                if not _is_stacked(name):
                    return layout.read(lambda i: reader.read(resolved[hf_name], i), shape, index)
                layers = range(index[0].start, index[0].stop)
                return np.stack([
                    layout.read(lambda i, n=resolved[hf_name.format(i=layer)]: reader.read(n, i),
                                shape[1:], index[1:])
                    for layer in layers])

            out[name] = put_sharded(shape, dtype, flat_shardings[name], read_slice)
    return unflatten(out)


def load_pretrained(path: str, *, shardings: Any = None, dtype: Any = np.float32):
    """`(model, params)` from a Hugging Face directory.

    `model` is the zerojax module (Llama or GPT2) holding the loaded params; `params` is
    the same tree as a nested pure dict of jax.Arrays (what `engine.state.params` holds).
    See `load_params` for `shardings`.
    """
    from flax import nnx

    from zerojax.models import MODELS

    cfg = load_config(path)
    params = load_params(path, shardings=shardings, dtype=dtype, cfg=cfg)
    model_cls = MODELS[_kind(cfg)][0]
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state, rest), params


# ----------------------------------------------------------------------------- saving

def _host(array: Any) -> np.ndarray:
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        raise ValueError("save_pretrained reads params on one process; in a multi-process run, export "
                         "from a checkpoint instead (zerojax.checkpoint.export_safetensors)")
    return np.asarray(array)


def save_pretrained(params: Mapping[str, Any], model_cfg: Any, path: str, *, dtype: str = "float32",
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, score: Any = None) -> list[str]:
    """Write a Hugging Face directory (`config.json` + safetensors) for zerojax params.

    `params`: the nested pure dict of the model's params (jax or numpy arrays, sharded or
    not, e.g. `engine.state.params`); `model_cfg`: a LlamaConfig / GPT2Config or a
    `{"type": ..., **fields}` section. Tensors are streamed one at a time (a stacked
    param one layer at a time); with more than `max_shard_bytes` in all, they go to
    Hugging Face shards plus an index. Returns the file names written.
    `score` ([D], a reward model's head): write a `...ForSequenceClassification` with
    one label instead of the causal LM (its `lm_head` left out, `score.weight` added).
    """
    cfg = make_config(model_cfg) if isinstance(model_cfg, Mapping) else model_cfg
    kind = _kind(cfg)
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(SAVE_DTYPES)}, got {dtype!r}")
    out_dtype = SAVE_DTYPES[dtype]
    flat = flatten(params)
    abstract = abstract_params(cfg)
    problems = sorted(set(abstract) ^ set(flat)) + sorted(
        n for n in set(abstract) & set(flat) if tuple(np.shape(flat[n])) != abstract[n].shape)
    if problems:
        raise ValueError(f"params do not fit the {kind} config: missing, unexpected or misshapen "
                         f"{problems[:8]}")

    # Hugging Face name -> [(zerojax name, layer or None, layout)]; GPT-2's c_attn has three.
    table = name_table(cfg)
    pieces: dict[str, list[tuple[str, int | None, Layout]]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (hf_name, layout_text) in table.items():
        layout = Layout.parse(layout_text)
        per_layer = abstract[name].shape[1:] if _is_stacked(name) else abstract[name].shape
        for i in range(_num_layers(cfg, name)) if _is_stacked(name) else [None]:
            key = hf_name.format(i=i)
            pieces.setdefault(key, []).append((name, i, layout))
            shapes[key] = layout.hf_shape(per_layer)

    def fetch(hf_name: str) -> np.ndarray:
        parts = pieces[hf_name]
        if len(parts) == 1 and parts[0][2].chunk is None:
            name, i, layout = parts[0]
            return layout.to_hf(_host(flat[name] if i is None else flat[name][i]))[1].astype(out_dtype)
        tensor = np.empty(shapes[hf_name], out_dtype)
        for name, i, layout in parts:
            where, values = layout.to_hf(_host(flat[name] if i is None else flat[name][i]))
            tensor[where] = values
        return tensor

    if score is not None:
        for name in [n for n in shapes if n.startswith("lm_head")]:
            del shapes[name]
        shapes["score.weight"] = (1, int(np.shape(score)[0]))
        plain_fetch = fetch
        fetch = lambda name: _host(score)[None, :].astype(out_dtype) if name == "score.weight" else plain_fetch(name)
    os.makedirs(path, exist_ok=True)
    written = write_sharded(path, [(n, s, out_dtype) for n, s in shapes.items()], fetch,
                            max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    config_file = os.path.join(path, "config.json")
    with open(config_file + ".tmp", "w") as f:
        config = hf_config(cfg, dtype)
        if score is not None:
            config.update(architectures=[SEQUENCE_CLASSIFIERS[kind]], num_labels=1, id2label={"0": "LABEL_0"},
                          label2id={"LABEL_0": 0}, pad_token_id=0)
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(config_file + ".tmp", config_file)
    return written + ["config.json"]


class _CheckpointParam:
    """One param of a zerojax checkpoint, read when first indexed; keeps only the last one read.

    `save_pretrained` indexes stacked params layer by layer, so holding one whole param
    at a time bounds host memory by the largest param, not the model.
    """

    _cache: dict[str, np.ndarray] = {}

    def __init__(self, root: str, tag: str, name: str, shape, dtype):
        self.root, self.tag, self.name, self.shape, self.dtype = root, tag, name, tuple(shape), dtype

    def _value(self) -> np.ndarray:
        if self.name not in _CheckpointParam._cache:
            _CheckpointParam._cache.clear()
            _CheckpointParam._cache[self.name] = checkpoint.read_param(
                self.root, self.tag, self.name, self.shape, self.dtype)
        return _CheckpointParam._cache[self.name]

    def __getitem__(self, index):
        return self._value()[index]

    def __array__(self, dtype=None, copy=None):
        value = self._value()
        return value if dtype is None else value.astype(dtype)


def export_checkpoint_to_hf(root: str, out_dir: str, *, tag: str | None = None,
                            dtype: str = "float32") -> str:
    """A zerojax checkpoint of a reference model as a Hugging Face directory, streamed."""
    tag = checkpoint.resolve_tag(root, tag)
    meta = checkpoint.read_meta(root, tag)
    if not meta.get("model"):
        raise CheckpointError(f"checkpoint {os.path.join(root, tag)} was not trained from a "
                              f"zerojax.models config, so there is no Hugging Face config to write; "
                              f"export plain safetensors instead (without --hf)")
    lazy = {name: _CheckpointParam(root, tag, name, shape, saved_dtype)
            for name, (shape, saved_dtype) in meta["params"].items()}
    section, prefix = checkpoint.model_section(meta)
    params, score = unflatten(lazy), None
    if prefix:                                      # a wrapper's checkpoint (DPO): its policy
        params = params[prefix]
    if section.pop("reward_head", False):          # a zerojax.rlhf reward model: base + score head
        params, score = params["base"], params["score"]
    try:
        save_pretrained(params, section, out_dir, dtype=dtype, score=score)
    finally:
        _CheckpointParam._cache.clear()
    return out_dir
