"""A text-only causal LM whose parameters sit where a VLM keeps its LM (`lm/...`).

A frozen-LM VLM (Flamingo) starts from a language model trained on text alone. `TextLM` is
models/vlm.py's `CausalLM` under the name `lm`, applied to the token arrays of a batch, so a
VLM run loads it with `init_from=dict(format="workdir", path=..., load={"lm": "lm"})`.
It reads `tokens`, `segment_ids` and `positions` [B, L] and ignores any images: on a
data.sequence kind "vlm" batch in flamingo mode it reads the `<image>` marker as a plain
token, the text a Flamingo LM sees.
"""

from collections.abc import Mapping

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.vlm import CausalLM


class TextLM(nn.Module):
    """`__call__(batch)` -> {"logits" [B, L, vocab] (f32)}; fields as VLM's LM fields."""

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_kv_heads: int | None = None
    qkv_bias: bool = False
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    remat_policy: str = "none"  # nn.transformer.REMAT_POLICIES
    scan_layers: bool = False  # one nn.scan over the blocks (nn.transformer.Transformer)
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, batch: Mapping[str, jnp.ndarray], *, train: bool = False) -> dict:
        lm = CausalLM(
            self.vocab_size,
            self.width,
            self.depth,
            self.num_heads,
            self.mlp_dim,
            num_kv_heads=self.num_kv_heads,
            qkv_bias=self.qkv_bias,
            rope_theta=self.rope_theta,
            norm_eps=self.norm_eps,
            remat_policy=self.remat_policy,
            scan_layers=self.scan_layers,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="lm",
        )
        return {"logits": lm(batch["tokens"], batch["segment_ids"], batch["positions"])}


Model = TextLM
