"""The causal language model every decoder-only LM in mmjax is: Llama (Llama-2/3, Vicuna),
Qwen2 and Gemma-2 are settings of its fields, so their checkpoints import into it
(mmjax.convert.hf_llm) and a VLM, a text-only LM or UniFluid holds one under `lm`.

`LMFields` declares those fields once; `CausalLM`, the VLM (models/vlm.py), `TextLM`
(models/lm.py) and UniFluid inherit them and build their LM with `language_model()`.

  Llama-2/Vicuna: the defaults (RMSNorm, SwiGLU, RoPE, untied head); Llama-3 adds
    num_kv_heads, rope_theta=500_000 and rope_scaling={"rope_type": "llama3", ...}.
  Qwen2/2.5: num_kv_heads, qkv_bias=True, rope_theta=1e6, norm_eps=1e-6; the small ones
    tie_embeddings=True.
  OPT (Zhang et al., 2022): norm="layer", gated_mlp=False, activation="relu",
    use_bias=True, positions="learned" (max_positions rows), tie_embeddings=True.
  Qwen2-VL/2.5-VL's LM: Qwen2's, with mrope_sections (M-RoPE, Wang et al., 2024, Sec. 2.1):
    positions are then [B, 3, L] (temporal, height, width ids; mmjax.data.mrope).
  Gemma-2 (Gemma Team, 2024, Sec. 2): activation="gelu_tanh" (GeGLU), post_norms=True,
    head_dim=256, attention_scale=query_pre_attn_scalar^-1/2, attn_logit_softcap=50,
    final_logit_softcap=30, sliding_window=4096 with global_every=2 (layers alternate local
    and global, the first local), embed_scale=True (embeddings times sqrt(width)),
    tie_embeddings=True, norm_eps=1e-6.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.core import freeze

from mmjax.nn import TokenEmbed, Transformer
from mmjax.nn.axes import ACT
from mmjax.nn.dense import DenseGeneral, dtypes
from mmjax.nn.initializers import logical
from mmjax.nn.norms import make_norm
from mmjax.nn.rope import rope_angles

BlockHook = Callable[[int, jnp.ndarray], jnp.ndarray]
POSITIONS = ("rope", "learned")

# OPT's architecture beyond its shape (Zhang et al., 2022, Sec. 2.1: the GPT-3 block, pre-norm,
# ReLU, learned positions over a 2,048-token context)
OPT = dict(
    norm="layer",
    gated_mlp=False,
    activation="relu",
    use_bias=True,
    positions="learned",
    max_positions=2048,
    tie_embeddings=True,
)

# Gemma-2's architecture beyond its shape (Gemma Team, 2024, Sec. 2 and Table 1; the 2B and 9B
# models, whose query_pre_attn_scalar is head_dim = 256)
GEMMA2 = dict(
    head_dim=256,
    activation="gelu_tanh",
    post_norms=True,
    attention_scale=256**-0.5,
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
    sliding_window=4096,
    global_every=2,
    embed_scale=True,
    tie_embeddings=True,
    norm_eps=1e-6,
)


class LMFields(nn.Module):
    """The architecture of a causal LM (and how it runs); no parameters of its own."""

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_kv_heads: int | None = None  # grouped-query attention (Llama-2 70B, Llama-3, Qwen2)
    head_dim: int | None = None  # None: width / num_heads (Gemma-2: 256)
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen)
    use_bias: bool = False  # biases on every projection (OPT)
    norm: str = "rms"  # "layer": LayerNorm (OPT)
    gated_mlp: bool = True  # False: fc1 -> activation -> fc2 (OPT)
    activation: str = "silu"  # silu (SwiGLU), gelu_tanh (GeGLU, Gemma), relu (OPT)
    positions: str = "rope"  # or "learned": a table of max_positions rows (OPT)
    max_positions: int = 0
    rope_theta: float = 10_000.0
    rope_scaling: Mapping[str, Any] | None = None  # nn.rope.rope_frequencies (Llama 3.1)
    mrope_sections: tuple[int, ...] | None = None  # M-RoPE (Qwen2-VL): positions [B, 3, L]
    norm_eps: float = 1e-5
    post_norms: bool = False  # Gemma-2: norms after attention and MLP too
    sliding_window: int | None = None  # local attention span (Gemma-2: 4,096)
    global_every: int = 0  # with sliding_window: every N-th layer global (Gemma-2: 2; 0: none)
    attention_scale: float | None = None  # None: 1 / sqrt(head_dim)
    attn_logit_softcap: float | None = None  # cap * tanh(s / cap) on attention scores
    final_logit_softcap: float | None = None  # ... and on the output logits
    embed_scale: bool = False  # embeddings times sqrt(width) (Gemma)
    tie_embeddings: bool = False  # the head is the embedding table (Gemma, small Qwen2s)
    decode: bool = False  # KV cache: batches are chunks written at `cache_offset`
    remat_policy: str = "none"  # nn.transformer.REMAT_POLICIES
    scan_layers: bool = False  # one nn.scan over the blocks (nn.transformer.Transformer)
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown positions {self.positions!r}; valid: {POSITIONS}")
        if self.positions == "learned" and self.max_positions < 1:
            raise ValueError("positions='learned' needs max_positions, the table's rows")
        if self.rope_scaling is not None:  # hashable, so the model can be a static jit arg
            object.__setattr__(self, "rope_scaling", freeze(dict(self.rope_scaling)))
        if self.mrope_sections is not None:
            object.__setattr__(self, "mrope_sections", tuple(self.mrope_sections))
        super().__post_init__()

    @nn.nowrap  # unbound when called outside apply: CausalLM(...).apply(params["lm"], ...)
    def language_model(self, **kw: Any) -> "CausalLM":
        """The LM these fields describe (`kw`: a name, or fields to change)."""
        return CausalLM(**{**{n: getattr(self, n) for n in lm_field_names()}, **kw})


def lm_field_names() -> tuple[str, ...]:
    """The names of LMFields' fields (Flax's parent and name left out)."""
    return tuple(f.name for f in dataclasses.fields(LMFields) if f.name not in ("parent", "name"))


# How an LM runs rather than what it computes: not part of a checkpoint's architecture
EXECUTION_FIELDS = (
    "decode",
    "remat_policy",
    "scan_layers",
    "attention_impl",
    "dtype",
    "param_dtype",
)


def architecture_defaults() -> dict[str, Any]:
    """LMFields' architecture fields with a default, at their defaults: what an imported
    architecture starts from, so that none of a config's other settings survive it."""
    return {
        f.name: f.default
        for f in dataclasses.fields(LMFields)
        if f.name in lm_field_names()
        and f.name not in EXECUTION_FIELDS
        and f.default is not dataclasses.MISSING
    }


class CausalLM(LMFields):
    """tokens [B, L] -> logits [B, L, vocab] (f32); `embed`, `hidden` and `head` are its
    parts, for a model that edits the embeddings, adds layers or reads the hidden states."""

    def setup(self) -> None:
        kw = dtypes(self)
        self.token_embedding = TokenEmbed(self.vocab_size, self.width, self.param_dtype)
        if self.positions == "learned":
            init = logical(nn.initializers.normal(0.02), "position", "embed")
            shape = (self.max_positions, self.width)
            self.position_embedding = self.param(
                "position_embedding", init, shape, self.param_dtype
            )
        self.decoder = Transformer(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            causal=True,
            norm=self.norm,
            gated_mlp=self.gated_mlp,
            use_bias=self.use_bias,
            norm_eps=self.norm_eps,
            rope_theta=self.rope_theta if self.positions == "rope" else None,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            qkv_bias=True if self.qkv_bias else None,  # None: as use_bias
            activation=self.activation,
            rope_scaling=self.rope_scaling,
            post_norms=self.post_norms,
            sliding_window=self.sliding_window,
            global_every=self.global_every,
            attention_scale=self.attention_scale,
            attn_logit_softcap=self.attn_logit_softcap,
            decode=self.decode,
            remat_policy=self.remat_policy,
            scan_layers=self.scan_layers,
            attention_impl=self.attention_impl,
            **kw,
        )
        self.norm_final = make_norm(self.norm, epsilon=self.norm_eps, **kw)
        if not self.tie_embeddings:
            self.lm_head = DenseGeneral(
                (self.vocab_size,), ("embed", "vocab"), use_bias=False, **kw
            )

    def embed(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """Token ids [B, L] -> embeddings [B, L, width] (scaled by sqrt(width) for Gemma)."""
        x = self.token_embedding(tokens).astype(self.dtype)
        return x * jnp.asarray(math.sqrt(self.width), self.dtype) if self.embed_scale else x

    def hidden(
        self,
        x: jnp.ndarray,
        segment_ids: jnp.ndarray | None,
        positions: jnp.ndarray,
        cache_offset: jnp.ndarray | None = None,
        before_block: BlockHook | None = None,
        span_ids: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """Embeddings [B, L, width] -> the final normed hidden states [B, L, width]."""
        if self.positions == "learned":
            table = self.position_embedding.astype(x.dtype)
            x = x + jnp.take(table, positions, axis=0, mode="clip")
        angles = None
        if self.mrope_sections is not None:
            if positions.ndim != 3 or positions.shape[1] != 3:
                raise ValueError(
                    f"an M-RoPE LM takes positions [batch, 3, length], got {positions.shape}"
                )
            head_dim = self.head_dim or self.width // self.num_heads
            ids = jnp.moveaxis(positions, 1, 0)  # [3, B, L]
            angles = rope_angles(
                ids, head_dim, self.rope_theta, self.rope_scaling, self.mrope_sections
            )
        x = nn.with_logical_constraint(x, ACT)
        x = self.decoder(
            x,
            segment_ids,
            span_ids,
            positions,
            cache_offset,
            before_block=before_block,
            rope_angles=angles,
        )
        return self.norm_final(x)

    def head(self, h: jnp.ndarray) -> jnp.ndarray:
        """Hidden states [..., width] -> logits [..., vocab] in f32 (soft-capped for Gemma-2)."""
        logits = self.token_embedding.attend(h) if self.tie_embeddings else self.lm_head(h)
        logits = logits.astype(jnp.float32)
        if self.final_logit_softcap is not None:
            cap = self.final_logit_softcap
            logits = cap * jnp.tanh(logits / cap)
        return logits

    def readout(self, h: jnp.ndarray, hidden: bool) -> dict[str, jnp.ndarray]:
        """{"hidden": h} (BLIP3-o's condition) or {"logits": head(h)}. Initialising with
        `hidden` still builds the head, so a trained model's whole LM loads into this one."""
        if not hidden:
            return {"logits": self.head(h)}
        if self.is_initializing():
            self.head(h[:, :1])
        return {"hidden": h}

    def logits(
        self,
        x: jnp.ndarray,
        segment_ids: jnp.ndarray | None,
        positions: jnp.ndarray,
        cache_offset: jnp.ndarray | None = None,
        before_block: BlockHook | None = None,
    ) -> jnp.ndarray:
        """Embeddings [B, L, width] -> logits [B, L, vocab] in f32."""
        return self.head(self.hidden(x, segment_ids, positions, cache_offset, before_block))

    def __call__(
        self,
        tokens: jnp.ndarray,
        segment_ids: jnp.ndarray | None,
        positions: jnp.ndarray,
        cache_offset: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        return self.logits(self.embed(tokens), segment_ids, positions, cache_offset)
