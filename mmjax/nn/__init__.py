"""Building blocks: attention, MLPs, norms, RoPE, patch and timestep embeddings, transformers."""

from mmjax.nn.attention import MultiHeadAttention
from mmjax.nn.embed import TokenEmbed
from mmjax.nn.mlp import Mlp
from mmjax.nn.norms import LayerNorm, RMSNorm, make_norm
from mmjax.nn.patch_embed import PatchEmbed
from mmjax.nn.rope import apply_rope
from mmjax.nn.timestep import TimestepEmbed, sinusoidal
from mmjax.nn.transformer import Transformer, TransformerBlock, llama_decoder

__all__ = [
    "LayerNorm",
    "Mlp",
    "MultiHeadAttention",
    "PatchEmbed",
    "RMSNorm",
    "TimestepEmbed",
    "TokenEmbed",
    "Transformer",
    "TransformerBlock",
    "apply_rope",
    "llama_decoder",
    "make_norm",
    "sinusoidal",
]
