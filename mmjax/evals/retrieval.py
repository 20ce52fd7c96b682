"""Image<->text retrieval Recall@K over an eval split (CLIP, Sec. 3.1.4; open_clip's metric).

Positives are defined by caption identity: image i and caption j match when j is i's caption
or the same text, so datasets with repeated captions (templates) and several captions per
image are scored consistently.
"""

from typing import Any

import numpy as np

from mmjax.evals.features import SplitEval

KS = (1, 5, 10)


def recall_at_k(similarity: np.ndarray, positives: np.ndarray, ks=KS) -> dict[int, float]:
    """Fraction of rows whose top-k columns (by similarity) hold a positive, for each k."""
    order = np.argsort(-similarity, axis=1, kind="stable")
    hits = np.take_along_axis(positives, order, axis=1)
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), np.iinfo(np.int64).max)
    return {k: float(np.mean(first < k)) for k in ks}


class Retrieval(SplitEval):
    """`retrieval_i2t_r{1,5,10}` and `retrieval_t2i_r{1,5,10}` on `split`."""

    def __call__(self, params: Any) -> dict[str, float]:
        split = self.embed(params, self.cfg.split, ["image_emb", "text_emb"])
        similarity = split["image_emb"] @ split["text_emb"].T
        text = split["text"]
        positives = (text[:, None, :] == text[None, :, :]).all(axis=-1)
        i2t = recall_at_k(similarity, positives)
        t2i = recall_at_k(similarity.T, positives.T)
        out = {f"retrieval_i2t_r{k}": v for k, v in i2t.items()}
        return out | {f"retrieval_t2i_r{k}": v for k, v in t2i.items()}
