r"""UniFluid ablation (Sec. 3.1 and 4.3 of the paper): raster vs random generation order.

Random order (MAR / Fluid) trains on a fresh permutation of the visual tokens each example and
samples in a random permutation; the decoder learns which token comes next from the target
position embedding. Tiny scale, on the digits:

  python -m mmjax.ablate --config experiments/ablations/unifluid_order.py --workdir /tmp/uf_order
"""

import ml_collections

from mmjax.objectives.unifluid import ORDERS
from mmjax.train.config_cli import load_config

VARIANTS = ORDERS


def get_config(arg: str = "raster") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown generation order {arg!r}; valid: {VARIANTS}")
    c = load_config("../unifluid.py:tiny", relative_to=__file__)
    c.objective.kwargs.order = arg
    c.evals.generation.order = arg
    return c
