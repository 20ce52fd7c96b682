"""Linear probe on frozen image features (CLIP, Sec. 3.2): L2-regularised logistic regression,
its strength picked on a held-out part of the training features, then refit on all of them."""

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from mmjax.evals.blas_threads import blas_threads_for
from mmjax.evals.features import SplitEval

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, seed: int = 0) -> "Pipeline":
    """Picks C on a seeded 80/20 split of the training features, then refits on all."""
    # Lazy: sklearn takes seconds to import, and every training process imports the evals.
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import StandardScaler

    order = np.random.default_rng(seed).permutation(len(train_x))
    cut = int(0.8 * len(order))
    fit, val = order[:cut], order[cut:]

    def probe(c: float) -> Pipeline:
        # standardised features make L-BFGS converge in tens of iterations
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500))

    # Weakly regularised fits of poor (early-training) features may stop at max_iter; the
    # validation score still ranks them, so the sweep need not print a warning per fit.
    with warnings.catch_warnings(), blas_threads_for(train_x):
        warnings.simplefilter("ignore", ConvergenceWarning)
        best = max(
            C_GRID,
            key=lambda c: (
                probe(c).fit(train_x[fit], train_y[fit]).score(train_x[val], train_y[val])
            ),
        )
        return probe(best).fit(train_x, train_y)


class LinearProbe(SplitEval):
    """`linear_probe_accuracy` on `split` of a probe trained on `train_split` features."""

    def __call__(self, params: Any) -> dict[str, float]:
        train = self.embed(params, self.cfg.train_split, ["image_features"])
        test = self.embed(params, self.cfg.split, ["image_features"])
        probe = fit_probe(train["image_features"], train["label"])
        return {"linear_probe_accuracy": float(probe.score(test["image_features"], test["label"]))}
