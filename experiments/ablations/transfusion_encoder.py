r"""Transfusion ablation (Sec. 4.3, Table 7): linear vs U-Net patch encoding.

The paper finds U-Net down/up blocks around the transformer improve image generation over a
single linear layer at the same transformer size (at the cost of the U-Net's parameters).
Tiny scale, on the digits:

  python -m mmjax.train --config experiments/ablations/transfusion_encoder.py:unet \
      --workdir /tmp/tf_unet

Compare `heldout_diffusion_loss` and `generation_accuracy` with the `linear` variant.
"""

import ml_collections

from mmjax.train.config_cli import load_config

VARIANTS = ("linear", "unet")


def get_config(arg: str = "linear") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown patch encoder {arg!r}; valid: {VARIANTS}")
    c = load_config("../transfusion.py:tiny", relative_to=__file__)
    c.model.patch_encoder = arg
    return c
