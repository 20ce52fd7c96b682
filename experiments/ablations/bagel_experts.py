r"""BAGEL ablation (Deng et al., 2025): dense vs MoE vs MoT decoders.

At equal active parameters (every token runs one width-128, 4-layer Qwen2 path), the dense
decoder shares all weights between text/ViT and VAE tokens, the MoE duplicates the MLPs (the
official `Qwen2MoEDecoderLayer`) and the MoT every weight of the block (`Qwen2MoTDecoderLayer`);
the paper finds MoT's generation (MSE) and understanding (CE) losses lowest. Tiny scale, on the
shapes through the frozen tiny VAE (experiments/bagel.py:tiny_shapes with BAGEL's own linear
latent maps and one task a row, the setting the README's table was measured in):

  python -m mmjax.ablate --config experiments/ablations/bagel_experts.py \
      --workdir /tmp/bagel_experts

Compare `heldout_diffusion_loss` and `heldout_lm_loss` (and the judged accuracies).
"""

import ml_collections

from mmjax.nn.mot import EXPERT_LAYOUTS
from mmjax.train.config_cli import load_config

VARIANTS = EXPERT_LAYOUTS  # dense, moe, mot


def get_config(arg: str = "mot") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; valid: {VARIANTS}")
    c = load_config("../bagel.py:tiny_shapes", relative_to=__file__)
    c.model.experts = arg
    # the official flow weight and image positions, as the README's table was measured
    c.objective.kwargs.mse_weight = 1.0
    c.evals.generation.loss.mse_weight = 1.0
    c.data.sequence.bagel_image_rope = "shared"
    c.model.latent_encoder = "linear"
    c.data.sequence.bagel_pack = False
    c.data.sequence.bagel_tasks = dict(t2i=2.0, caption=1.0, edit=1.0)
    return c
