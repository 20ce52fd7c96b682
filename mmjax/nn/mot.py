"""Mixture-of-Transformers decoder: modality experts that share one self-attention.

BAGEL (Deng et al., 2025; the official `Qwen2MoTDecoderLayer`) keeps two copies of
every weight of a Qwen2 block: the understanding expert's (text and ViT tokens) and the
generation expert's (VAE latent tokens). A token is normed, projected to q, k, v (QK-normed),
read out by o and passed through the MLP with its own expert's weights, but the attention
runs once over all tokens, so the modalities read each other. `experts` picks what is
duplicated, for the paper's comparison of the three: "mot" (everything), "moe" (the MLP only,
as the official `Qwen2MoEDecoderLayer`) or "dense" (nothing: a plain Qwen2 block). Tokens stay
sorted by expert through the whole stack (nn.experts.Routing); only q, k, v and the attention
output are put back in sequence order for the attention kernel.
"""

import dataclasses
import functools

import flax.linen as nn
import jax.numpy as jnp

from mmjax import kernels
from mmjax.nn.attention import QKV_AXES, _mesh_axes, kv_cache
from mmjax.nn.dense import dtypes
from mmjax.nn.experts import TOKENS, ExpertDense, ExpertRMSNorm, Routing
from mmjax.nn.rope import apply_rope
from mmjax.nn.transformer import remat_block, run_blocks

EXPERT_LAYOUTS = ("dense", "moe", "mot")


def expert_counts(experts: str) -> tuple[int, int]:
    """(experts of the attention and norms, experts of the MLP) for a layout name."""
    if experts not in EXPERT_LAYOUTS:
        raise ValueError(f"unknown experts {experts!r}; valid: {EXPERT_LAYOUTS}")
    return (2 if experts == "mot" else 1), (1 if experts == "dense" else 2)


class MoTSettings(nn.Module):
    """The fields a MoTBlock is built from, shared by the decoder that stacks them."""

    num_heads: int
    mlp_dim: int
    experts: str = "mot"
    num_kv_heads: int | None = None
    head_dim: int | None = None
    qk_norm: bool = True
    qkv_bias: bool = True
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    decode: bool = False
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    def settings(self) -> dict:
        """The MoTSettings fields' values."""
        names = [
            f.name for f in dataclasses.fields(MoTSettings) if f.name not in ("parent", "name")
        ]
        return {name: getattr(self, name) for name in names}


class MoTBlock(MoTSettings):
    """One Qwen2 block (RMSNorm, QK-norm, GQA with q/k/v biases, RoPE, SwiGLU) whose weights
    are per expert; x [N, width] are the batch's tokens in expert order."""

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        routing: Routing,
        segment_ids: jnp.ndarray,
        span_ids: jnp.ndarray | None,
        positions: jnp.ndarray,
        cache_offset: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        kw = dtypes(self)
        g_attn, g_mlp = expert_counts(self.experts)
        width = x.shape[-1]
        head_dim = self.head_dim or width // self.num_heads
        kv_heads = self.num_kv_heads or self.num_heads
        norm = functools.partial(ExpertRMSNorm, epsilon=self.norm_eps, **kw)
        dense = functools.partial(ExpertDense, **kw)

        h = norm(g_attn, name="norm1")(x, routing)

        def project(name: str, heads: int) -> jnp.ndarray:
            y = dense((heads, head_dim), ("embed", "heads", "kv"), g_attn, use_bias=self.qkv_bias,
                      name=name)(h, routing)  # fmt: skip
            if self.qk_norm and name != "value":
                y = norm(g_attn, axis_name="kv", name=f"{name}_norm")(y, routing)
            return nn.with_logical_constraint(routing.unsort(y), QKV_AXES)

        q, k, v = (
            project("query", self.num_heads),
            project("key", kv_heads),
            project("value", kv_heads),
        )
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)
        kv_segment_ids, kv_span_ids, q_offset = None, None, 0
        if self.decode:
            k, v, kv_segment_ids, kv_span_ids, q_offset = kv_cache(
                self, k, v, segment_ids, span_ids, cache_offset
            )
        out = kernels.attention(
            q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, span_ids=span_ids,
            kv_span_ids=kv_span_ids, causal=True, q_offset=q_offset, impl=self.attention_impl,
            partition=_mesh_axes(QKV_AXES),
        )  # fmt: skip
        out = dense((width,), ("heads", "kv", "embed"), g_attn, num_in=2, use_bias=False,
                    name="out")(routing.sort(out), routing)  # fmt: skip
        x = nn.with_logical_constraint(x + out, TOKENS)
        h = norm(g_attn, name="norm2")(x, routing)
        mlp = functools.partial(dense, use_bias=False, num_experts=g_mlp)
        gate = mlp((self.mlp_dim,), ("embed", "mlp"), name="gate")(h, routing)
        up = mlp((self.mlp_dim,), ("embed", "mlp"), name="fc1")(h, routing)
        down = mlp((width,), ("mlp", "embed"), name="fc2")(nn.silu(gate) * up, routing)
        return nn.with_logical_constraint(x + down, TOKENS)


class MoTDecoder(MoTSettings):
    """`depth` MoTBlocks over expert-sorted tokens, then each expert's final RMSNorm.

    `scan_layers` runs them as one `nn.scan` (parameters stacked on "layers"); `remat_policy`
    names what the backward pass keeps (nn.transformer.REMAT_POLICIES)."""

    depth: int = 1
    remat_policy: str = "none"
    scan_layers: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, routing: Routing, *ids: jnp.ndarray | None) -> jnp.ndarray:
        """x [N, width] sorted by `routing`; `ids`: segment_ids, span_ids, positions [B, L]
        and cache_offset (int [B] or None) in sequence order."""
        block = remat_block(MoTBlock, self.remat_policy, self.scan_layers)
        x = run_blocks(block, self.settings(), self.depth, self.scan_layers, x, routing, *ids)
        g_attn, _ = expert_counts(self.experts)
        return ExpertRMSNorm(g_attn, self.norm_eps, **dtypes(self), name="norm_final")(x, routing)
