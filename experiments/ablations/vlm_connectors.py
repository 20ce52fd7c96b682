r"""Issue-7 comparison: the same tiny prefix VLM (experiments/llava.py:tiny: a 3-block ViT of 4x4
patches, 64 image tokens from its penultimate layer, a 3-block LM of width 128, the shapes'
captioning, VQA and referring tasks, 3,000 steps) with each connector of models/resamplers.py
swapped in by the one key `model.connector`:

  linear      LLaVA: one linear layer, 64 visual tokens
  mlp         LLaVA-1.5: Linear-GELU-Linear, 64 visual tokens
  concat      MiniGPT-v2: 4 neighbouring tokens concatenated, then projected, 16 tokens
  qformer     BLIP-2: 16 learned queries, 2 BERT layers, cross-attention every other layer
  perceiver   Flamingo / xGen-MM: 16 latents, 2 Perceiver blocks
  cross_attn  Qwen-VL: one cross-attention layer, 16 queries with 2D absolute positions

  python -m mmjax.ablate --config experiments/ablations/vlm_connectors.py --workdir /tmp/connectors

The table (WORKDIR/table.md) holds per connector the held-out caption_accuracy, vqa_accuracy
and grounding_miou (mmjax/evals/vlm.py, 200 scenes), visual tokens per image, parameters and
the median ms per training step.
"""

import ml_collections

from mmjax.train.config_cli import load_config

WIDTH = 128  # llava.py:tiny's LM width
QUERIES = 16
CONNECTORS = {
    "linear": dict(type="linear"),
    "mlp": dict(type="mlp"),
    "concat": dict(type="concat", group=4),
    "qformer": dict(
        type="qformer",
        num_queries=QUERIES,
        width=64,
        depth=2,
        num_heads=4,
        mlp_dim=256,
        cross_attention_freq=2,
    ),
    "perceiver": dict(type="perceiver", num_latents=QUERIES, depth=2, num_heads=4, head_dim=32),
    "cross_attn": dict(type="cross_attn", num_queries=QUERIES, num_heads=WIDTH // 128),
}
VISUAL_TOKENS = {"linear": 64, "mlp": 64, "concat": 16}
VARIANTS = tuple(CONNECTORS)
CONFIG_COLUMNS = {"visual_tokens": "data.sequence.visual_tokens"}


def get_config(arg: str = "mlp") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown connector {arg!r}; valid: {VARIANTS}")
    c = load_config("../llava.py:tiny", relative_to=__file__)
    c.model.connector = dict(CONNECTORS[arg])
    tokens = VISUAL_TOKENS.get(arg, QUERIES)
    c.data.sequence.update(visual_tokens=tokens, max_len=tokens + 48)
    return c
