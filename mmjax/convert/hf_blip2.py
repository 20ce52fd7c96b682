"""Hugging Face BLIP-2 Q-Former -> mmjax's `qformer` connector (models/resamplers.py).

  imported = mmjax.convert.from_hf_blip2(model)  # Blip2Model, ...ForConditionalGeneration,
                                                 # ...ForImageTextRetrieval, or a local dir
  imported = mmjax.convert.from_hf_blip2(qformer, query_tokens=model.query_tokens)
  module = imported.module()
  visual_tokens = module.apply({"params": imported.params}, image_tokens)

HF's `Blip2QFormerModel` LayerNorms its input sequence (queries, then text embeddings), puts
cross-attention in the layers with `i % cross_attention_frequency == 0`, and keeps separate
feed-forward weights for queries (`intermediate_query` / `output_query`) and, with
`use_qformer_text_input`, for text (`intermediate` / `output`): mmjax's QFormer is built the
same way. A whole BLIP-2 model brings its query tokens, its text embeddings (image-text
retrieval) and its `language_projection` (the connector's `proj`; without one the connector
returns the Q-Former's outputs unprojected).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.convert.imported import activation
from mmjax.convert.torch_layers import Reader, check_against_model
from mmjax.errors import UserError
from mmjax.models.resamplers import build_connector

SOURCE = "HF BLIP-2 Q-Former"


@dataclasses.dataclass(frozen=True)
class ImportedConnector:
    """An imported connector: `connector` is its `build_connector` config, `params` its
    parameters and `in_dim` the width of the image tokens it reads."""

    connector: dict[str, Any]
    params: dict[str, Any]
    in_dim: int

    def module(self, **kw: Any) -> nn.Module:
        """The connector module, f32 unless `kw` says otherwise (dtypes, name)."""
        return build_connector(self.connector, **{"dtype": jnp.float32, **kw})

    def example_tokens(self, batch: int = 1, tokens: int = 4) -> jax.Array:
        return jnp.zeros((batch, tokens, self.in_dim), jnp.float32)


def finish_connector(
    connector: dict[str, Any], params: dict, in_dim: int, source: str, tokens: int = 4
) -> ImportedConnector:
    """Checks `params` against the connector `connector` describes (reading `tokens` image
    tokens) and packs the result."""
    imported = ImportedConnector(connector=connector, params={}, in_dim=in_dim)
    module = imported.module()
    example = imported.example_tokens(tokens=tokens)
    checked = check_against_model(params, lambda: module.init(jax.random.key(0), example), source)
    return dataclasses.replace(imported, params=checked)


def load(model_or_path: Any) -> Any:
    """A `transformers` model instance, or one loaded from a local `save_pretrained` directory."""
    if isinstance(model_or_path, str):
        import transformers

        return transformers.AutoModel.from_pretrained(model_or_path, local_files_only=True)
    return model_or_path


def model_type(model: Any) -> str:
    """The HF `model_type` of a model, or its class name when it has no config."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", type(model).__name__)


def prefixed(prefix: str, module: Any) -> dict[str, Any]:
    """A torch module's state dict with `prefix.` before every key."""
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _config_and_state(
    model: Any, query_tokens: Any, text_embeddings: Any, projection: Any
) -> tuple[Any, Mapping[str, Any]]:
    """The Q-Former config and a state dict keyed as a whole BLIP-2 model's."""
    kind = model_type(model)
    parts = (query_tokens, text_embeddings, projection)
    if kind == "blip-2":
        if any(part is not None for part in parts):
            raise UserError(
                f"{SOURCE}: a whole BLIP-2 model brings its own query tokens, text embeddings "
                "and projection; pass them only with a bare Blip2QFormerModel"
            )
        return model.config.qformer_config, model.state_dict()
    if kind != "blip_2_qformer":
        raise UserError(
            f"expected a 'blip-2' model or a 'blip_2_qformer' Blip2QFormerModel but got a "
            f"{kind!r} one; use mmjax.convert.from_hf_llava for LLaVA projectors"
        )
    if query_tokens is None:
        raise UserError(
            f"{SOURCE}: a bare Blip2QFormerModel needs query_tokens= (the learned queries, "
            "[1, num_queries, hidden_size], a BLIP-2 model's `query_tokens`)"
        )
    state = {**prefixed("qformer", model), "query_tokens": query_tokens}
    if text_embeddings is not None:
        state.update(prefixed("embeddings", text_embeddings))
    if projection is not None:
        state.update(prefixed("language_projection", projection))
    return model.config, state


def _attention(read: Reader, prefix: str, num_heads: int) -> dict:
    """An HF `Blip2QFormerAttention` (q/k/v linears, output dense) -> MultiHeadAttention."""
    qkv = [f"{prefix}.attention.{name}" for name in ("query", "key", "value")]
    return read.attention(*qkv, f"{prefix}.output.dense", num_heads)


def _layer(read: Reader, i: int, config: Any, text: bool) -> dict:
    p = f"qformer.encoder.layer.{i}"
    heads = config.num_attention_heads
    layer = {
        "self_attn": _attention(read, f"{p}.attention", heads),
        "self_attn_norm": read.layer_norm(f"{p}.attention.output.LayerNorm"),
        "query_mlp": read.mlp(f"{p}.intermediate_query.dense", f"{p}.output_query.dense"),
        "query_mlp_norm": read.layer_norm(f"{p}.output_query.LayerNorm"),
    }
    if i % config.cross_attention_frequency == 0:
        layer["cross_attn"] = _attention(read, f"{p}.crossattention", heads)
        layer["cross_attn_norm"] = read.layer_norm(f"{p}.crossattention.output.LayerNorm")
    if text:
        layer["text_mlp"] = read.mlp(f"{p}.intermediate.dense", f"{p}.output.dense")
        layer["text_mlp_norm"] = read.layer_norm(f"{p}.output.LayerNorm")
    return layer


def convert(
    model_or_path: Any,
    *,
    query_tokens: Any = None,
    text_embeddings: Any = None,
    projection: Any = None,
) -> ImportedConnector:
    """Imports an HF BLIP-2 Q-Former as mmjax's `qformer` connector.

    `model_or_path`: a BLIP-2 model (or its local directory), or a bare `Blip2QFormerModel`
    with `query_tokens` ([1, Q, hidden]) and optionally `text_embeddings` (a
    `Blip2TextEmbeddings`, required with `use_qformer_text_input`) and `projection` (an
    `nn.Linear` to the LM width).
    """
    model = load(model_or_path)
    config, state = _config_and_state(model, query_tokens, text_embeddings, projection)
    read = Reader(state, SOURCE)
    text = read.has("embeddings.word_embeddings.weight")
    if text != bool(config.use_qformer_text_input):
        raise UserError(
            f"{SOURCE}: use_qformer_text_input={config.use_qformer_text_input} but text "
            f"embeddings are {'given' if text else 'missing'}; the Q-Former reads text "
            "(its text feed-forward weights) exactly when it has text embeddings"
        )
    queries = read("query_tokens")
    if queries.ndim != 3 or queries.shape[0] != 1:
        raise UserError(f"{SOURCE}: query_tokens must be [1, Q, hidden], got {queries.shape}")
    params = {
        "query_tokens": queries[0],
        "embed_norm": read.layer_norm("qformer.layernorm"),
        **{f"layers_{i}": _layer(read, i, config, text) for i in range(config.num_hidden_layers)},
    }
    connector = dict(
        type="qformer",
        out_dim=None,
        num_queries=queries.shape[1],
        width=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_dim=config.intermediate_size,
        cross_attention_freq=config.cross_attention_frequency,
        activation=activation(config.hidden_act, SOURCE),
        norm_eps=config.layer_norm_eps,
    )
    if text:
        params["word_embedding"] = read("embeddings.word_embeddings.weight")
        params["position_embedding"] = read("embeddings.position_embeddings.weight")
        connector["vocab_size"] = params["word_embedding"].shape[0]
        connector["max_text_len"] = params["position_embedding"].shape[0]
    if read.has("language_projection.weight"):
        params["proj"] = read.linear("language_projection")
        connector["out_dim"] = params["proj"]["kernel"].shape[1]
    return finish_connector(connector, params, config.encoder_hidden_size, SOURCE)
