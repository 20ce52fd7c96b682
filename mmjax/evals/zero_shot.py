"""Zero-shot classification (CLIP, Sec. 3.1.2): nearest prompt-ensemble class embedding."""

from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from mmjax import data as mmdata
from mmjax.errors import UserError
from mmjax.evals.features import EvalContext, SplitEmbedder, SplitEval


def class_embeddings(
    embedder: SplitEmbedder,
    params: Any,
    tokenizer: mmdata.Tokenizer,
    names: Sequence[str],
    templates: Sequence[str],
    max_len: int,
) -> np.ndarray:
    """[num_classes, D]: per class, the renormalised mean of its prompts' unit embeddings."""
    prompts = [t.format(n) for n in names for t in templates]
    emb = embedder.encode_texts(params, tokenizer.tokenize(prompts, max_len))
    emb = emb.reshape(len(names), len(templates), -1).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


class ZeroShotClassifier(SplitEval):
    """Accuracy of labelling `split` images with their nearest class prompt ensemble."""

    def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
        super().__init__(cfg, ctx)
        data_cfg = ctx.data_cfg
        self.names = mmdata.class_names(data_cfg)
        if not self.names:
            raise UserError(
                f"evals.{cfg.name}: data source {data_cfg.source!r} has no class names for "
                "zero-shot classification (set data.class_names)"
            )
        self.templates = list(cfg.get("templates", ()) or mmdata.prompt_templates(data_cfg))

    def __call__(self, params: Any) -> dict[str, float]:
        classes = class_embeddings(
            self.embedder,
            params,
            self.tokenizer,
            self.names,
            self.templates,
            self.data_cfg.max_text_len,
        )
        split = self.embed(params, self.cfg.split, ["image_emb"])
        predicted = np.argmax(split["image_emb"] @ classes.T, axis=-1)
        return {"zero_shot_accuracy": float(np.mean(predicted == split["label"]))}
