"""Linear probe on frozen image features (CLIP, Sec. 3.2): L2-regularised logistic regression,
its strength picked on a held-out part of the training features, then refit on all of them."""

from typing import Any

import ml_collections
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from mmjax import data as mmdata
from mmjax.evals.features import SplitEmbedder

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, seed: int = 0) -> Pipeline:
    """Picks C on a seeded 80/20 split of the training features, then refits on all."""
    order = np.random.default_rng(seed).permutation(len(train_x))
    cut = int(0.8 * len(order))
    fit, val = order[:cut], order[cut:]

    def probe(c: float) -> Pipeline:
        # standardised features make L-BFGS converge in tens of iterations
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500))

    best = max(
        C_GRID,
        key=lambda c: probe(c).fit(train_x[fit], train_y[fit]).score(train_x[val], train_y[val]),
    )
    return probe(best).fit(train_x, train_y)


class LinearProbe:
    """`linear_probe_accuracy` on `split` of a probe trained on `train_split` features."""

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        embedder: SplitEmbedder,
        tokenizer: mmdata.Tokenizer,
        data_cfg: ml_collections.ConfigDict,
    ):
        self.cfg, self.tokenizer, self.data_cfg = cfg, tokenizer, data_cfg
        self.embedder = embedder

    def __call__(self, params: Any) -> dict[str, float]:
        def features(split: str) -> dict[str, np.ndarray]:
            return self.embedder(
                params,
                self.data_cfg,
                self.tokenizer,
                split,
                self.cfg.batch_size,
                ["image_features"],
            )

        train, test = features(self.cfg.train_split), features(self.cfg.split)
        probe = fit_probe(train["image_features"], train["label"])
        return {"linear_probe_accuracy": float(probe.score(test["image_features"], test["label"]))}
