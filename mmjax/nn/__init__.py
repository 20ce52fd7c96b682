"""Building blocks: attention, MLPs, norms, patch embeddings, transformer stacks."""

from mmjax.nn.attention import MultiHeadAttention
from mmjax.nn.mlp import Mlp
from mmjax.nn.norms import LayerNorm
from mmjax.nn.patch_embed import PatchEmbed
from mmjax.nn.transformer import Transformer, TransformerBlock

__all__ = [
    "LayerNorm",
    "Mlp",
    "MultiHeadAttention",
    "PatchEmbed",
    "Transformer",
    "TransformerBlock",
]
