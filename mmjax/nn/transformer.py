"""Pre-norm transformer blocks and stacks shared by the vision and text towers and decoders.

The defaults are ViT/CLIP's block (LayerNorm, GELU MLP, biases); `norm="rms"`, `gated_mlp`,
`activation="silu"`, `use_bias=False` and `rope_theta` give the Llama block that Transfusion
and the other decoders use; `num_kv_heads` and `qkv_bias` Qwen2's; `activation="gelu_tanh"`,
`post_norms`, `head_dim`, `attention_scale`, `attn_logit_softcap` and `sliding_window` with
`global_every=2` Gemma-2's (Gemma Team, 2024, Sec. 2).
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.attention import MultiHeadAttention
from mmjax.nn.axes import ACT
from mmjax.nn.dense import dtypes
from mmjax.nn.mlp import Mlp
from mmjax.nn.norms import make_norm


class TransformerBlock(nn.Module):
    """x + Attn(Norm(x)), then x + MLP(Norm(x)); with `post_norms`, x + Norm(Attn(Norm(x)))
    and x + Norm(MLP(Norm(x))) (Gemma-2's sandwich norms).

    Local attention: with `sliding_window` w, tokens attend to the previous w - 1 and
    themselves only; with `local_segment_ids`, within those segments instead of `segment_ids`
    (Qwen2.5-VL's ViT windows). Called with a traced `layer` index (inside a scan) and
    `global_every` N, layers N-1, 2N-1, ... attend globally and the others locally; unscanned
    stacks tell each block statically (`attend_globally`).
    """

    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    causal: bool = False
    norm: str = "layer"
    norm_eps: float = 1e-5
    gated_mlp: bool = False
    use_bias: bool = True
    qkv_bias: bool | None = None  # None: use_bias (nn.attention.MultiHeadAttention)
    num_kv_heads: int | None = None  # grouped-query attention: kv heads dividing num_heads
    head_dim: int | None = None  # None: width / num_heads
    rope_theta: float | None = None
    rope_scaling: Mapping[str, Any] | None = None  # nn.rope.rope_frequencies
    post_norms: bool = False
    sliding_window: int | None = None
    global_every: int = 0  # with a traced layer index: every N-th layer global (0: none)
    attend_globally: bool = False  # this (unscanned) block ignores the local attention
    attention_scale: float | None = None  # None: 1 / sqrt(head_dim)
    attn_logit_softcap: float | None = None
    decode: bool = False
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        segment_ids: jnp.ndarray | None = None,
        span_ids: jnp.ndarray | None = None,
        positions: jnp.ndarray | None = None,
        cache_offset: jnp.ndarray | None = None,
        rope_angles: jnp.ndarray | None = None,
        local_segment_ids: jnp.ndarray | None = None,
        read_at: jnp.ndarray | None = None,
        layer: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """x [B, L, width] -> [B, L, width]; with `read_at` (int [B]) only the token at that
        position is computed (its keys and values still come from every token): [B, 1, width].
        `rope_angles` [B, L, head_dim/2]: precomputed RoPE (nn.rope), used instead of
        `positions`. `layer`: this block's index in a scanned stack (traced), for `global_every`."""
        kw = dtypes(self)
        local = self._local(layer)
        window, window_on = self.sliding_window, None
        if window is not None and local is not True:
            window, window_on = (None, None) if local is False else (window, local)
        if local_segment_ids is not None and local is not False:
            segment_ids = (
                local_segment_ids
                if local is True
                else jnp.where(local, local_segment_ids, segment_ids)
            )
        y = make_norm(self.norm, name="norm1", epsilon=self.norm_eps, **kw)(x)
        query = dict(
            segment_ids=segment_ids, span_ids=span_ids, positions=positions, rope_angles=rope_angles
        )
        kv = {}
        if read_at is not None:
            kv = dict(
                kv=y,
                kv_segment_ids=segment_ids,
                kv_span_ids=span_ids,
                kv_positions=positions,
                kv_rope_angles=rope_angles,
            )
            query = {k: _at(v, read_at) for k, v in query.items()}
            x, y = _at(x, read_at), _at(y, read_at)
        y = MultiHeadAttention(
            self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            use_bias=self.use_bias,
            qkv_bias=self.qkv_bias,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            scale=self.attention_scale,
            logits_soft_cap=self.attn_logit_softcap,
            decode=self.decode,
            impl=self.attention_impl,
            name="attn",
            **kw,
        )(
            y,
            causal=self.causal,
            window=window,
            window_on=window_on,
            cache_offset=cache_offset,
            query_offset=read_at,
            **query,
            **kv,
        )
        if self.post_norms:
            y = make_norm(self.norm, name="post_norm1", epsilon=self.norm_eps, **kw)(y)
        x = nn.with_logical_constraint(x + y, ACT)
        y = make_norm(self.norm, name="norm2", epsilon=self.norm_eps, **kw)(x)
        y = Mlp(
            self.mlp_dim,
            activation=self.activation,
            gated=self.gated_mlp,
            use_bias=self.use_bias,
            name="mlp",
            **kw,
        )(y)
        if self.post_norms:
            y = make_norm(self.norm, name="post_norm2", epsilon=self.norm_eps, **kw)(y)
        return nn.with_logical_constraint(x + y, ACT)

    def _local(self, layer: jnp.ndarray | None) -> bool | jnp.ndarray:
        """Whether this block attends locally: a bool, or a traced one for a scanned block
        whose `layer` index decides (every `global_every`-th attends globally)."""
        if self.attend_globally:
            return False
        if self.global_every and layer is not None:
            return (layer + 1) % self.global_every != 0
        return True


# Named jax.checkpoint policies for a block's backward pass (MaxText's names): "none" keeps
# every activation (no remat); "minimal" keeps the matmul outputs without batch dimensions
# (the projections and the MLP) and recomputes attention; "dots" keeps every matmul output,
# attention scores included; "full" keeps nothing and recomputes the whole block.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def remat_block(block: type[nn.Module], policy: str, scanned: bool) -> type[nn.Module]:
    """`block` rematerialised with the REMAT_POLICIES entry `policy` (`block` itself for
    "none"); inside a scan the loop already keeps XLA from merging the recomputation away."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {policy!r}; valid: {sorted(REMAT_POLICIES)}")
    if REMAT_POLICIES[policy] is None:
        return block
    return nn.remat(block, policy=REMAT_POLICIES[policy], prevent_cse=not scanned)


def run_blocks(
    block: type[nn.Module], fields: Mapping[str, Any], depth: int, scan_layers: bool,
    x: jnp.ndarray, *args: Any,
) -> jnp.ndarray:  # fmt: skip
    """`depth` blocks `block(**fields)` on x, each called as block(x, *args) -> x, inside the
    calling module: one `nn.scan` named `layers` (parameters stacked on a leading "layers"
    axis) or blocks `block0` ... `block{depth - 1}`."""
    if not scan_layers:
        for i in range(depth):
            x = block(**fields, name=f"block{i}")(x, *args)
        return x
    scanned = nn.scan(
        lambda mdl, carry, *a: (mdl(carry, *a), None),
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * len(args),
        length=depth,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = scanned(block(**fields, name="layers"), x, *args)
    return x


class Transformer(nn.Module):
    """`depth` TransformerBlocks; `remat_policy` (a REMAT_POLICIES name) says what each block's
    backward pass keeps of its forward activations and recomputes.

    `scan_layers` runs the blocks as one `nn.scan`, so XLA compiles one block however deep the stack
    (big_vision's and MaxText's scanned layers): the first depth - 1 blocks are `layers`, each
    parameter stacked along a leading "layers" logical axis, and the last block is `last`,
    run on its own so that `read_at` can compute only the read-out token. Unscanned, the
    blocks are `block0` ... `block{depth - 1}` (the layout converters write).
    """

    depth: int
    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    causal: bool = False
    norm: str = "layer"
    norm_eps: float = 1e-5
    gated_mlp: bool = False
    use_bias: bool = True
    qkv_bias: bool | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float | None = None
    rope_scaling: Mapping[str, Any] | None = None
    post_norms: bool = False
    sliding_window: int | None = None
    global_every: int = 0  # every N-th block attends globally, the others in the window
    attention_scale: float | None = None
    attn_logit_softcap: float | None = None
    decode: bool = False  # KV cache (nn.attention.MultiHeadAttention)
    remat_policy: str = "none"
    scan_layers: bool = False
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        segment_ids: jnp.ndarray | None = None,
        span_ids: jnp.ndarray | None = None,
        positions: jnp.ndarray | None = None,
        cache_offset: jnp.ndarray | None = None,
        read_at: jnp.ndarray | None = None,
        before_block: Callable[[int, jnp.ndarray], jnp.ndarray] | None = None,
        num_blocks: int | None = None,
        rope_angles: jnp.ndarray | None = None,
        local_segment_ids: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """x [B, L, width] -> [B, L, width]. `read_at` (int [B]): the caller reads only the
        token at that position (CLS or end-of-text pooling), so the last block computes only
        it and returns [B, 1, width]: the same values for about 1/depth less work.
        `before_block(i, x)`: the caller's layers run on x before block i (Flamingo's gated
        cross-attention inside a frozen LM); in a scanned stack `i` is a traced int32 inside
        the scan (the last block's is a Python int), so the hook must be traceable.
        `num_blocks`: only the first blocks run and exist (a tower's intermediate features);
        a scanned stack can leave out only its last block. `rope_angles` and
        `local_segment_ids`: TransformerBlock's."""
        n = self.depth if num_blocks is None else num_blocks
        if not 0 <= n <= self.depth:
            raise ValueError(f"num_blocks {n} is outside [0, {self.depth}]")
        block = self._block_class()
        args = (segment_ids, span_ids, positions, cache_offset, rope_angles, local_segment_ids)
        if not self.scan_layers:
            for i in range(n):
                if before_block is not None:
                    x = before_block(i, x)
                at = read_at if i == n - 1 else None
                x = block(**self._block_fields(i), name=f"block{i}")(x, *args, at)
            return x
        if n not in (0, self.depth - 1, self.depth):
            raise ValueError(
                f"a scanned stack of depth {self.depth} runs all its blocks or all but the last, "
                f"not {n}: set scan_layers=False"
            )
        if read_at is not None and n < self.depth:
            raise ValueError("read_at needs the last block of a scanned stack, which is left out")
        if min(n, self.depth - 1) > 0:
            scanned = nn.scan(
                functools.partial(_scan_step, before_block=before_block),
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(*(nn.broadcast,) * len(args), 0),
                length=self.depth - 1,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            index = jnp.arange(self.depth - 1, dtype=jnp.int32)
            x, _ = scanned(block(**self._block_fields(), name="layers"), x, *args, index)
        if n == self.depth:
            if before_block is not None:
                x = before_block(self.depth - 1, x)
            x = block(**self._block_fields(self.depth - 1), name="last")(x, *args, read_at)
        return x

    def _block_class(self) -> type[TransformerBlock]:
        """TransformerBlock, rematerialised with the named policy (not for "none")."""
        return remat_block(TransformerBlock, self.remat_policy, self.scan_layers)

    def _block_fields(self, index: int | None = None) -> dict:
        """The TransformerBlock fields of block `index`; None: of the scanned blocks, whose
        local or global attention the traced layer index switches (TransformerBlock)."""
        every = self.global_every
        is_global = index is not None and every and (index + 1) % every == 0
        return dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            activation=self.activation,
            causal=self.causal,
            norm=self.norm,
            norm_eps=self.norm_eps,
            gated_mlp=self.gated_mlp,
            use_bias=self.use_bias,
            qkv_bias=self.qkv_bias,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            post_norms=self.post_norms,
            sliding_window=self.sliding_window,
            global_every=every if index is None else 0,
            attend_globally=bool(is_global),
            attention_scale=self.attention_scale,
            attn_logit_softcap=self.attn_logit_softcap,
            decode=self.decode,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )


def _scan_step(
    block: TransformerBlock,
    x: jnp.ndarray,
    *args: jnp.ndarray | None,
    before_block: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray] | None = None,
) -> tuple:
    """One step of the scanned stack, the block's index last in `args`: (carry x, no
    per-layer output)."""
    *args, index = args
    if before_block is not None:
        x = before_block(index, x)
    return block(x, *args, None, index), None


def llama_decoder(
    depth: int, num_heads: int, mlp_dim: int, *, norm_eps: float, rope_theta: float, **kw
) -> Transformer:
    """The causal Llama stack of the unified decoders (Transfusion Sec. 4.1, UniFluid): RMSNorm,
    bias-free SwiGLU, RoPE; `kw` passes the Transformer's other fields: num_kv_heads (GQA),
    qkv_bias (Qwen), Gemma-2's block, decode, remat_policy, scan_layers, attention_impl, dtypes."""
    kw = {"activation": "silu", **kw}
    return Transformer(
        depth,
        num_heads,
        mlp_dim,
        causal=True,
        norm="rms",
        norm_eps=norm_eps,
        gated_mlp=True,
        use_bias=False,
        rope_theta=rope_theta,
        **kw,
    )


def _at(x: jnp.ndarray | None, index: jnp.ndarray) -> jnp.ndarray | None:
    """Row b of x [B, L, ...] at position index[b] -> [B, 1, ...]."""
    if x is None:
        return None
    index = index.reshape(-1, 1, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, index, axis=1)
