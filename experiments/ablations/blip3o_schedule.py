r"""BLIP3-o's training schedules (Chen et al., 2025, Sec. 3.3): sequential (the understanding
model trained first, then frozen while the generator trains: experiments/blip3o.py) against
joint (the backbone trained on understanding and generation together: each row also holds one
of the backbone's own understanding tasks, `data.sequence.understanding`, and its answer
cross-entropy joins the flow loss). The ViT stays frozen in both.

  python -m mmjax.ablate --config experiments/ablations/blip3o_schedule.py \
      --workdir /tmp/blip3o_schedule

Compare `backbone_caption_accuracy` and `backbone_vqa_accuracy` with the backbone run's own
(sequential leaves them bit for bit) and `compositional_accuracy`.
"""

import ml_collections

from mmjax.train.config_cli import load_config

VARIANTS = ("sequential", "joint")


def get_config(arg: str = "sequential") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; valid: {VARIANTS}")
    c = load_config("../blip3o.py:tiny_shapes", relative_to=__file__)
    if arg == "joint":
        c.data.sequence.understanding = c.evals.generation.backbone_sequence.to_dict()
        c.objective.kwargs.lm_weight = 1.0
        c.optimizer.frozen = ("backbone/vision/**",)
        c.evals.generation.loss = c.objective.kwargs
    return c
