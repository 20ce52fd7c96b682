"""Hugging Face causal LMs (Llama-2/3, Vicuna, Mistral, Qwen2/2.5, Gemma-2, OPT) <-> mmjax's
CausalLM.

  imported = mmjax.convert.from_hf_llm("/ckpt/Qwen2.5-1.5B")  # a save_pretrained directory
  lm = imported.module()                                     # models/causal_lm.py's CausalLM
  logits = lm.apply({"params": imported.params}, tokens, None, positions)

  mmjax.convert.to_hf_llm(imported.lm, params, "/out/dir", tokenizer_dir=...)  # and back

The architecture comes from the checkpoint's `config.json` (`model_type` llama, mistral, qwen2,
gemma2 or opt), the weights from its safetensors files (one file or shards with an index; read with
numpy, no torch). In a run, `config.init_from = dict(format="hf_llm", path=DIR)` puts the LM
into the `lm/` subtree of any model holding one (VLM, TextLM, UniFluid), its architecture into
`config.model` and its tokenizer (`DIR`'s tokenizer.json or tokenizer.model) into `config.data`.

The weight layout: HF stores a linear layer as [out, in], mmjax as [in, out] with the attention
heads split out ([width, heads, head_dim], output [heads, head_dim, width]). Llama's
`post_attention_layernorm` is the norm before the MLP (mmjax `norm2`); Gemma-2's is the norm
after attention (`post_norm1`), its `pre_feedforward_layernorm` is `norm2`, and its RMSNorm
multiplies by (1 + weight), so its weights import as 1 + weight. OPT keeps its layers under
`model.decoder`, names its pre-MLP norm `final_layer_norm` and reads its learned positions two
rows into the table.
"""

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.convert.imported import activation
from mmjax.convert.tensor_files import Checkpoint, write_safetensors
from mmjax.convert.torch_layers import array, check_against_model
from mmjax.errors import UserError
from mmjax.models.causal_lm import OPT, CausalLM, architecture_defaults

SOURCE = "HF causal LM"
MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma2", "opt")
OPT_POSITION_OFFSET = 2  # HF OPT's position table starts 2 rows in (OPTLearnedPositionalEmbedding)
TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
# Gemma-2 layers alternate: sliding-window attention, then global (HF `layer_types`)
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class ImportedLM:
    """An imported causal LM: `lm` holds CausalLM's architecture fields (what a run's
    `config.model` takes), `params` its parameters (unscanned), `tokenizer_path` the
    directory of its tokenizer (None when the checkpoint has none)."""

    lm: dict[str, Any]
    params: dict[str, Any]
    model_type: str
    tokenizer_path: str | None

    def module(self, **kw: Any) -> CausalLM:
        """The CausalLM `params` apply to (`kw`: execution fields such as dtype)."""
        return CausalLM(**{**self.lm, **kw})


def read_config(directory: str) -> dict[str, Any]:
    """The checkpoint's config.json as a dict."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{SOURCE}: cannot read {path!r}: {e}") from None


def lm_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """CausalLM's fields for an HF config dict; unsupported settings are a UserError."""
    kind = config.get("model_type")
    if kind not in MODEL_TYPES:
        raise UserError(
            f"{SOURCE}: model_type {kind!r} is not one of {MODEL_TYPES}; for CLIP/SigLIP use "
            "init_from.format=hf_clip/hf_siglip"
        )
    if kind == "opt":
        return {**architecture_defaults(), **_opt_fields(config)}
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise UserError(f"{SOURCE}: {flag}=True (biases on every projection) is not supported")
    heads = config["num_attention_heads"]
    rope = _rope(config)
    fields = dict(
        vocab_size=config["vocab_size"],
        width=config["hidden_size"],
        depth=config["num_hidden_layers"],
        num_heads=heads,
        mlp_dim=config["intermediate_size"],
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        qkv_bias=kind == "qwen2",
        activation=activation(config.get("hidden_activation") or config["hidden_act"], SOURCE),
        rope_theta=float(rope.pop("rope_theta", 10_000.0)),
        rope_scaling=rope or None,
        norm_eps=config["rms_norm_eps"],
        tie_embeddings=bool(config.get("tie_word_embeddings", kind == "gemma2")),
        **_window(config, kind),
    )
    if kind == "gemma2":
        fields.update(
            post_norms=True,
            embed_scale=True,
            attention_scale=config["query_pre_attn_scalar"] ** -0.5,
            attn_logit_softcap=config.get("attn_logit_softcapping"),
            final_logit_softcap=config.get("final_logit_softcapping"),
        )
    return {**architecture_defaults(), **fields}


def _opt_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """CausalLM's fields for an OPT config: the pre-norm variants with biases (OPT-350m's
    post-norm block and its projections in and out of a narrower embedding are refused)."""
    required = dict(
        do_layer_norm_before=True,
        enable_bias=True,
        layer_norm_elementwise_affine=True,
        _remove_final_layer_norm=False,
    )
    for key, value in required.items():
        if config.get(key, value) != value:
            raise UserError(f"{SOURCE}: OPT with {key}={config.get(key)} is not supported")
    width = config["hidden_size"]
    if config.get("word_embed_proj_dim", width) != width:
        raise UserError(f"{SOURCE}: OPT with word_embed_proj_dim != hidden_size is not supported")
    return dict(
        vocab_size=config["vocab_size"],
        width=width,
        depth=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        mlp_dim=config["ffn_dim"],
        num_kv_heads=config["num_attention_heads"],
        head_dim=width // config["num_attention_heads"],
        norm_eps=1e-5,
        **{
            **OPT,
            "max_positions": config["max_position_embeddings"],
            "activation": activation(config.get("activation_function", "relu"), SOURCE),
            "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
        },
    )


def _rope(config: Mapping[str, Any]) -> dict[str, Any]:
    """{rope_theta, and a scaling's keys}: transformers 5's `rope_parameters`, or the older
    `rope_theta` and `rope_scaling`; "default" RoPE has no scaling keys."""
    rope = dict(config.get("rope_parameters") or {})
    if not rope:
        rope = {
            "rope_theta": config.get("rope_theta", 10_000.0),
            **(config.get("rope_scaling") or {}),
        }
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind == "default":
        return {"rope_theta": rope.get("rope_theta", 10_000.0)}
    if kind not in ("linear", "llama3"):
        raise UserError(f"{SOURCE}: rope scaling {kind!r} is not supported (linear, llama3)")
    return {**rope, "rope_type": kind}


def _window(config: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """sliding_window and global_every from the config's per-layer attention types."""
    depth, window = config["num_hidden_layers"], config.get("sliding_window")
    types = config.get("layer_types")
    if types is None:  # configs before transformers 4.53
        if kind == "gemma2":
            types = [SLIDING if i % 2 == 0 else FULL for i in range(depth)]
        elif kind == "mistral" or config.get("use_sliding_window"):
            types = [SLIDING] * depth
        else:
            types = [FULL] * depth
    if window is None or SLIDING not in types:
        return dict(sliding_window=None, global_every=0)
    every = types.index(FULL) + 1 if FULL in types else 0
    expected = [FULL if every and (i + 1) % every == 0 else SLIDING for i in range(depth)]
    if list(types) != expected:
        raise UserError(f"{SOURCE}: layer_types {types} is not a repeating local/global pattern")
    return dict(sliding_window=int(window), global_every=every)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor and where it sits in CausalLM's params; `kind` picks the relayout."""

    hf: str
    path: str
    kind: str  # "copy", "linear", "heads_in", "heads_bias", "heads_out", "norm", "positions"
    heads: int = 0


def _tensors(fields: Mapping[str, Any], model_type: str) -> list[_Tensor]:
    """Every tensor of an HF checkpoint of this architecture, with its mmjax path."""
    opt = model_type == "opt"
    model = "model.decoder" if opt else "model"
    out = [_Tensor(f"{model}.embed_tokens.weight", "token_embedding/embedding", "copy")]
    if opt:
        out.append(_Tensor(f"{model}.embed_positions.weight", "position_embedding", "positions"))
    heads, kv_heads = fields["num_heads"], fields["num_kv_heads"]
    for i in range(fields["depth"]):
        hf, mm = f"{model}.layers.{i}", f"decoder/block{i}"
        for name, ours, n in (
            ("q", "query", heads),
            ("k", "key", kv_heads),
            ("v", "value", kv_heads),
        ):
            proj, target = f"{hf}.self_attn.{name}_proj", f"{mm}/attn/{ours}"
            out.append(_Tensor(f"{proj}.weight", f"{target}/kernel", "heads_in", n))
            if fields.get("qkv_bias") or opt:
                out.append(_Tensor(f"{proj}.bias", f"{target}/bias", "heads_bias", n))
        out_proj = f"{hf}.self_attn.{'out_proj' if opt else 'o_proj'}"
        out.append(_Tensor(f"{out_proj}.weight", f"{mm}/attn/out/kernel", "heads_out", heads))
        mlp = (
            {"fc1": "fc1", "fc2": "fc2"}
            if opt
            else {"mlp.gate_proj": "gate", "mlp.up_proj": "fc1", "mlp.down_proj": "fc2"}
        )
        for name, ours in mlp.items():
            out.append(_Tensor(f"{hf}.{name}.weight", f"{mm}/mlp/{ours}/kernel", "linear"))
        if opt:
            out.append(_Tensor(f"{out_proj}.bias", f"{mm}/attn/out/bias", "copy"))
            out += [_Tensor(f"{hf}.{n}.bias", f"{mm}/mlp/{n}/bias", "copy") for n in mlp]
        for name, ours in _NORMS[model_type].items():
            out += _norm(f"{hf}.{name}", f"{mm}/{ours}", opt)
    out += _norm(f"{model}.{'final_layer_norm' if opt else 'norm'}", "norm_final", opt)
    if not fields["tie_embeddings"]:
        out.append(_Tensor("lm_head.weight", "lm_head/kernel", "linear"))
    return out


_LLAMA_NORMS = {"input_layernorm": "norm1", "post_attention_layernorm": "norm2"}
# HF norm names -> mmjax's (Llama's post_attention_layernorm is the norm before the MLP)
_NORMS = {
    "llama": _LLAMA_NORMS,
    "mistral": _LLAMA_NORMS,
    "qwen2": _LLAMA_NORMS,
    "gemma2": {
        "input_layernorm": "norm1",
        "post_attention_layernorm": "post_norm1",
        "pre_feedforward_layernorm": "norm2",
        "post_feedforward_layernorm": "post_norm2",
    },
    "opt": {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"},
}


def _norm(hf: str, mm: str, layer_norm: bool) -> list[_Tensor]:
    """An RMSNorm's scale, or a LayerNorm's scale and bias."""
    if not layer_norm:
        return [_Tensor(f"{hf}.weight", f"{mm}/RMSNorm_0/scale", "norm")]
    return [
        _Tensor(f"{hf}.weight", f"{mm}/LayerNorm_0/scale", "copy"),
        _Tensor(f"{hf}.bias", f"{mm}/LayerNorm_0/bias", "copy"),
    ]


def _to_mmjax(t: _Tensor, x: np.ndarray, norm_offset: float) -> np.ndarray:
    if t.kind == "linear":
        return x.T
    if t.kind == "heads_in":  # [heads * head_dim, width] -> [width, heads, head_dim]
        return x.T.reshape(x.shape[1], t.heads, -1)
    if t.kind == "heads_bias":
        return x.reshape(t.heads, -1)
    if t.kind == "heads_out":  # [width, heads * head_dim] -> [heads, head_dim, width]
        return x.T.reshape(t.heads, -1, x.shape[0])
    if t.kind == "positions":
        return x[OPT_POSITION_OFFSET:]
    return x + norm_offset if t.kind == "norm" else x


def _to_hf(t: _Tensor, x: np.ndarray, norm_offset: float) -> np.ndarray:
    if t.kind == "linear":
        return x.T
    if t.kind == "heads_in":
        return x.reshape(x.shape[0], -1).T
    if t.kind == "heads_bias":
        return x.reshape(-1)
    if t.kind == "heads_out":
        return x.reshape(-1, x.shape[-1]).T
    if t.kind == "positions":  # the offset rows, which no position reads
        return np.concatenate([np.zeros((OPT_POSITION_OFFSET, x.shape[1]), x.dtype), x])
    return x - norm_offset if t.kind == "norm" else x


def convert(model_or_path: Any) -> ImportedLM:
    """Imports an HF causal LM: a `save_pretrained` directory (config.json and safetensors)
    or a `transformers` model instance."""
    config, tensors, tokenizer_path = open_checkpoint(model_or_path)
    fields = lm_fields(config)
    kind = config["model_type"]
    params = read_lm(fields, kind, tensors)
    module = CausalLM(**fields)
    tokens = jnp.zeros((1, 1), jnp.int32)
    checked = check_against_model(
        params, lambda: module.init(jax.random.key(0), tokens, None, tokens), SOURCE
    )
    return ImportedLM(fields, checked, kind, tokenizer_path)


def open_checkpoint(model_or_path: Any) -> tuple[dict[str, Any], Mapping[str, Any], str | None]:
    """(config dict, tensors by name, tokenizer directory or None) of a `save_pretrained`
    directory (config.json and safetensors, read lazily) or a `transformers` model."""
    if not isinstance(model_or_path, str):
        return model_or_path.config.to_dict(), model_or_path.state_dict(), None
    config = read_config(model_or_path)
    has_tokenizer = any(os.path.exists(os.path.join(model_or_path, f)) for f in TOKENIZER_MODELS)
    return config, Checkpoint(model_or_path), model_or_path if has_tokenizer else None


def read_lm(
    fields: Mapping[str, Any],
    kind: str,
    tensors: Mapping[str, Any],
    rename: Callable[[str], str] = lambda name: name,
) -> dict[str, Any]:
    """CausalLM's parameters (nested, not yet checked against the model) from the tensors of
    an HF `kind` checkpoint; `rename` maps the LM's own tensor names to the checkpoint's (a
    VLM keeps its LM under another prefix)."""
    offset = 1.0 if kind == "gemma2" else 0.0
    flat = {}
    for t in _tensors(fields, kind):
        name = rename(t.hf)
        if name not in tensors:
            raise UserError(f"{SOURCE} ({kind}) checkpoint has no tensor {name!r}")
        flat[t.path] = _to_mmjax(t, array(tensors[name]), offset)
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def hf_model_type(fields: Mapping[str, Any]) -> str:
    """The HF architecture that computes what these CausalLM fields do: opt (its block),
    gemma2 (its block), qwen2 (QKV bias), mistral (a window on every layer) or llama; else a
    UserError."""
    if fields.get("norm", "rms") == "layer" or fields.get("positions", "rope") == "learned":
        theirs = {k: fields.get(k) for k in OPT if k != "max_positions"}
        ours = {k: v for k, v in OPT.items() if k != "max_positions"}
        if theirs != ours or fields.get("num_kv_heads") not in (None, fields["num_heads"]):
            raise UserError(f"no HF architecture has this mix of OPT features: {theirs}")
        return "opt"
    if fields.get("post_norms") or fields.get("embed_scale"):
        gemma = {k: bool(fields.get(k)) for k in ("post_norms", "embed_scale", "tie_embeddings")}
        if not all(gemma.values()) or fields.get("qkv_bias"):
            raise UserError(f"no HF architecture has this mix of Gemma-2 features: {gemma}")
        return "gemma2"
    for key in ("attn_logit_softcap", "final_logit_softcap", "attention_scale"):
        if fields.get(key) is not None:
            raise UserError(f"{key} has an HF equivalent in gemma2 only (with its other features)")
    if fields.get("sliding_window") and fields.get("global_every"):
        raise UserError("alternating local/global attention has an HF equivalent in gemma2 only")
    if fields.get("qkv_bias"):
        return "qwen2"
    return "mistral" if fields.get("sliding_window") else "llama"


def hf_config(fields: Mapping[str, Any], max_position_embeddings: int, dtype: str) -> dict:
    """The config.json of the HF model that computes what these CausalLM fields do."""
    kind = hf_model_type(fields)
    if kind == "opt":
        return dict(
            model_type="opt",
            architectures=["OPTForCausalLM"],
            vocab_size=fields["vocab_size"],
            hidden_size=fields["width"],
            word_embed_proj_dim=fields["width"],
            ffn_dim=fields["mlp_dim"],
            num_hidden_layers=fields["depth"],
            num_attention_heads=fields["num_heads"],
            max_position_embeddings=fields["max_positions"],
            activation_function=_HF_ACTIVATIONS[fields["activation"]],
            do_layer_norm_before=True,
            enable_bias=True,
            layer_norm_elementwise_affine=True,
            tie_word_embeddings=bool(fields.get("tie_embeddings")),
            torch_dtype=dtype,
            dtype=dtype,
        )
    heads, width = fields["num_heads"], fields["width"]
    rope = dict(fields.get("rope_scaling") or {"rope_type": "default"})
    rope["rope_theta"] = fields.get("rope_theta", 10_000.0)
    config = dict(
        model_type=kind,
        architectures=[_ARCHITECTURES[kind]],
        vocab_size=fields["vocab_size"],
        hidden_size=width,
        intermediate_size=fields["mlp_dim"],
        num_hidden_layers=fields["depth"],
        num_attention_heads=heads,
        num_key_value_heads=fields.get("num_kv_heads") or heads,
        head_dim=fields.get("head_dim") or width // heads,
        hidden_act=_HF_ACTIVATIONS[fields.get("activation", "silu")],
        rms_norm_eps=fields.get("norm_eps", 1e-5),
        tie_word_embeddings=bool(fields.get("tie_embeddings")),
        max_position_embeddings=max_position_embeddings,
        rope_parameters=rope,  # transformers >= 5; older ones read the two keys below
        rope_theta=rope["rope_theta"],
        rope_scaling=fields.get("rope_scaling"),
        torch_dtype=dtype,
        dtype=dtype,
    )
    window = fields.get("sliding_window")
    if kind == "gemma2":
        every = fields.get("global_every", 0)
        config.update(
            hidden_activation=config["hidden_act"],
            query_pre_attn_scalar=round(
                (fields.get("attention_scale") or config["head_dim"] ** -0.5) ** -2
            ),
            attn_logit_softcapping=fields.get("attn_logit_softcap"),
            final_logit_softcapping=fields.get("final_logit_softcap"),
            sliding_window=window or max_position_embeddings,
            layer_types=[
                FULL if not window or (every and (i + 1) % every == 0) else SLIDING
                for i in range(fields["depth"])
            ],
        )
    elif kind == "mistral":
        config["sliding_window"] = window
    elif kind == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None)
    return config


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
_HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"}
_DTYPES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "float32": lambda x: x.astype(np.float32),
    "bfloat16": lambda x: x.astype(jnp.bfloat16),
}


def export(
    fields: Mapping[str, Any],
    params: Mapping[str, Any],
    directory: str,
    *,
    tokenizer_dir: str | None = None,
    dtype: str = "bfloat16",
    max_position_embeddings: int = 8192,
) -> str:
    """Writes CausalLM `params` (unscanned, as `fields` describe them) as an HF checkpoint
    `transformers` loads: config.json, model.safetensors and the tokenizer files of
    `tokenizer_dir`. Returns the HF model type."""
    if dtype not in _DTYPES:
        raise UserError(f"export dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    config = hf_config(fields, max_position_embeddings, dtype)
    kind = config["model_type"]
    flat = flax.traverse_util.flatten_dict(jax.device_get(dict(params)), sep="/")
    offset = 1.0 if kind == "gemma2" else 0.0
    tensors = {}
    for t in _tensors(dict(fields), kind):
        if t.path not in flat:
            raise UserError(
                f"export: the parameters have no {t.path!r} (unscanned CausalLM params)"
            )
        value = _to_hf(t, np.asarray(flat[t.path], np.float32), offset)
        tensors[t.hf] = _DTYPES[dtype](value)
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors, {"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(tokenizer_dir, name)):
                shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(directory, name))
    return kind
