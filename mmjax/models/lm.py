"""A text-only causal LM whose parameters sit where a VLM keeps its LM (`lm/...`).

A frozen-LM VLM (Flamingo) starts from a language model trained on text alone. `TextLM` is
models/causal_lm.py's `CausalLM` under the name `lm`, applied to the token arrays of a batch, so a
VLM run loads it with `init_from=dict(format="workdir", path=..., load={"lm": "lm"})`.
It reads `tokens`, `segment_ids` and `positions` [B, L] and ignores any images: on a
data.sequence kind "vlm" batch in flamingo mode it reads the `<image>` marker as a plain
token, the text a Flamingo LM sees.
"""

from collections.abc import Mapping

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.causal_lm import LMFields


class TextLM(LMFields):
    """`__call__(batch)` -> {"logits" [B, L, vocab] (f32)}; the LM's fields are LMFields."""

    @nn.compact
    def __call__(self, batch: Mapping[str, jnp.ndarray], *, train: bool = False) -> dict:
        lm = self.language_model(name="lm")
        return {"logits": lm(batch["tokens"], batch["segment_ids"], batch["positions"])}


Model = TextLM
