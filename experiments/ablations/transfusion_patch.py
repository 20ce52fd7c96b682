r"""Transfusion ablation (Sec. 4.3, Table 6): patch size, i.e. image tokens per image.

The paper finds smaller patches (more tokens per image) give better generation at higher
compute; larger patches are cheaper. Tiny scale, 8x8 digits in pixel space: patch 1 (64 image
tokens), 2 (16, the tiny default) and 4 (4):

  python -m mmjax.train --config experiments/ablations/transfusion_patch.py:1 --workdir /tmp/p1

Compare `heldout_diffusion_loss` and `generation_accuracy` across the metrics.jsonl files.
"""

import ml_collections

from mmjax.train.config_cli import load_config

VARIANTS = ("1", "2", "4")


def get_config(arg: str = "2") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown patch size {arg!r}; valid: {VARIANTS}")
    c = load_config("../transfusion.py:tiny", relative_to=__file__)
    patch = int(arg)
    c.model.patch_size = patch
    c.data.sequence.patch_size = patch
    # room for (8 / p)^2 patches, the longest digit caption and <bos> <BOI> <EOI> <eos>
    c.data.sequence.max_len = (8 // patch) ** 2 + 16
    return c
