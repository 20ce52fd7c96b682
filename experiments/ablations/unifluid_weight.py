r"""UniFluid ablation (Sec. 4.3 of the paper): the image loss weight w trades generation against
understanding.

L = L_text + w * L_image; a larger w favours generation, a smaller one captioning. Tiny scale,
on the digits, every variant into its own folder and one table (w -> generation_accuracy,
caption_accuracy, lm_loss, diffusion_loss and their held-out values):

  python -m mmjax.ablate --config experiments/ablations/unifluid_weight.py --workdir /tmp/uf_w
"""

import ml_collections

from mmjax.train.config_cli import load_config

VARIANTS = ("0.25", "1", "4")


def get_config(arg: str = "1") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown image loss weight {arg!r}; valid: {VARIANTS}")
    c = load_config("../unifluid.py:tiny", relative_to=__file__)
    c.objective.kwargs.image_weight = float(arg)
    return c
