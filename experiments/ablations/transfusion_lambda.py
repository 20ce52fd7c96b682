r"""Transfusion ablation (Sec. 4.1 and 4.3): the diffusion loss weight lambda.

L = L_LM + lambda * L_DDPM with lambda = 5 in the paper; smaller weights favour text (captions),
larger ones images. Tiny scale, on the digits:

  python -m mmjax.train --config experiments/ablations/transfusion_lambda.py:1 --workdir /tmp/l1

Compare `heldout_diffusion_loss`, `heldout_lm_loss`, `generation_accuracy` and
`caption_accuracy` across the metrics.jsonl files.
"""

import ml_collections

from mmjax.train.config_cli import load_config

VARIANTS = ("0.5", "1", "2", "5", "10")


def get_config(arg: str = "5") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown lambda {arg!r}; valid: {VARIANTS}")
    c = load_config("../transfusion.py:tiny", relative_to=__file__)
    c.objective.kwargs.diffusion_weight = float(arg)
    return c
