"""SigLIP (Zhai et al., 2023): the two-tower model of models/clip.py configured as the paper.

Image tower without ln_pre, pooled by a MAP head that gives the embedding directly; text tower
bidirectional, padding attended, pooled at the last position, then a linear head with bias;
learned temperature t' = log 10 and bias b = -10 for the sigmoid loss (Sec. 3.1).
"""

import math
from collections.abc import Mapping
from typing import Any

from mmjax.models.clip import CLIP

IMAGE_DEFAULTS = dict(pool="map", pre_norm=False)
TEXT_DEFAULTS = dict(causal=False, pool="last", mask_padding=False)


def Model(image: Mapping[str, Any], text: Mapping[str, Any], **config: Any) -> CLIP:
    """SigLIP with the paper's defaults; any keyword overrides them."""
    defaults = dict(
        logit_scale_init=math.log(10.0),
        logit_scale_max=None,
        logit_bias_init=-10.0,
        image_proj=False,
        proj_bias=True,
    )
    return CLIP(
        image={**IMAGE_DEFAULTS, **image},
        text={**TEXT_DEFAULTS, **text},
        **{**defaults, **config},
    )
