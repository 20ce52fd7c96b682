r"""Transfusion ablation (Sec. 4.3, Table 5): bidirectional vs causal attention inside images.

The paper finds intra-image bidirectional attention lowers the diffusion loss (and FID)
compared with causal attention over the patches. Tiny scale, on the digits:

  python -m mmjax.train --config experiments/ablations/transfusion_attention.py:bidirectional \
      --workdir /tmp/tf_bidir
  python -m mmjax.train --config experiments/ablations/transfusion_attention.py:causal \
      --workdir /tmp/tf_causal

Compare `heldout_diffusion_loss` and `generation_accuracy` in the two metrics.jsonl files.
"""

import ml_collections

from mmjax.train.config_cli import load_config

VARIANTS = ("bidirectional", "causal")


def get_config(arg: str = "bidirectional") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; valid: {VARIANTS}")
    c = load_config("../transfusion.py:tiny", relative_to=__file__)
    c.model.bidirectional_images = arg == "bidirectional"
    return c
