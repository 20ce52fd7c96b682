"""Weight import: Hugging Face CLIP and SigLIP, open_clip and big_vision SigLIP into mmjax
parameters; Hugging Face causal LMs (Llama, Qwen2, Gemma-2) into models/causal_lm.py's CausalLM
and back (hf_llm.py); the BLIP-2 Q-Former and the LLaVA projector into mmjax connectors
(models/resamplers.py).

  imported = mmjax.convert.from_hf_clip(transformers_model_or_local_dir)
  module = imported.module()
  emb = module.apply({"params": imported.params}, images, method=module.encode_image)

Images are NHWC floats normalised as the source model expects; text is the source tokenizer's
ids. To fine-tune or evaluate imported weights, an experiment sets
`config.init_from = dict(format="hf_clip", path=DIR)` (open_clip: `name=` and `path=` a local
checkpoint file) with `config.data.tokenizer = "hf"` and the checkpoint's tokenizer directory
in `config.data.tokenizer_path`.

LLMs: `config.init_from = dict(format="hf_llm", path=DIR)` puts the LM into the model's `lm/`
subtree and its tokenizer into `config.data`; `to_hf_llm` writes one back (`python -m
mmjax.export` for a run's workdir).

Qwen2-VL / Qwen2.5-VL, whole models (vision tower, merger, M-RoPE LM, tokenizer, processor
constants): `from_hf_qwen2_vl` / `from_hf_qwen2_5_vl` (hf_qwen2_vl.py); in a run,
`config.init_from = dict(format="hf_qwen_vl", path=DIR)`.

Connectors: `from_hf_blip2` (a BLIP-2 model or a bare Blip2QFormerModel with its query
tokens) and `from_hf_llava` (a LLaVA model or its LlavaMultiModalProjector with the config)
return an `ImportedConnector`: `connector` (a `build_connector` config) and `params`.

Each converter checks the architecture, every tensor's presence and every shape against the
mmjax model it builds, and fails with one line naming what differs.
"""

import os
from collections.abc import Mapping
from typing import Any

from mmjax.convert import (
    big_vision,
    hf_blip2,
    hf_clip,
    hf_llava,
    hf_llm,
    hf_qwen2_vl,
    hf_siglip,
    open_clip,
)
from mmjax.convert.hf_blip2 import ImportedConnector
from mmjax.convert.hf_llm import ImportedLM
from mmjax.convert.imported import Imported, check_vocab
from mmjax.errors import UserError

from_hf_clip = hf_clip.convert
from_hf_siglip = hf_siglip.convert
from_open_clip = open_clip.convert
from_big_vision_siglip = big_vision.convert
CONVERTERS = {
    "big_vision_siglip": from_big_vision_siglip,
    "hf_clip": from_hf_clip,
    "hf_siglip": from_hf_siglip,
    "open_clip": from_open_clip,
}
from_hf_blip2 = hf_blip2.convert
from_hf_llava = hf_llava.convert
CONNECTOR_CONVERTERS = {"hf_blip2": from_hf_blip2, "hf_llava": from_hf_llava}
from_hf_llm = hf_llm.convert
to_hf_llm = hf_llm.export
from_hf_qwen2_vl = hf_qwen2_vl.convert_qwen2_vl
from_hf_qwen2_5_vl = hf_qwen2_vl.convert_qwen2_5_vl
QWEN_VL_FORMAT = "hf_qwen_vl"  # a whole Qwen2-VL / Qwen2.5-VL into a qwen_vl model
LM_FORMAT = "hf_llm"  # into the `lm/` subtree of a model holding a CausalLM


def load(init_from: Mapping[str, Any]) -> Imported | ImportedLM:
    """Imports what a config's `init_from` names: {format, path[, name for open_clip]}."""
    fmt = init_from.get("format")
    if fmt not in (*CONVERTERS, LM_FORMAT):
        valid = sorted((*CONVERTERS, LM_FORMAT))
        raise UserError(f"init_from.format {fmt!r} is not one of {valid}")
    path = init_from.get("path", "")
    if not path or not os.path.exists(path):
        raise UserError(f"init_from.path {path!r} does not exist")
    if fmt == LM_FORMAT:
        return from_hf_llm(path)
    if fmt == "open_clip":
        if not init_from.get("name"):
            raise UserError("init_from.format=open_clip needs init_from.name (the model name)")
        return from_open_clip(init_from["name"], pretrained=path)
    return CONVERTERS[fmt](path)


__all__ = [
    "CONNECTOR_CONVERTERS",
    "CONVERTERS",
    "LM_FORMAT",
    "QWEN_VL_FORMAT",
    "Imported",
    "ImportedConnector",
    "ImportedLM",
    "check_vocab",
    "from_big_vision_siglip",
    "from_hf_blip2",
    "from_hf_clip",
    "from_hf_llava",
    "from_hf_llm",
    "from_hf_qwen2_5_vl",
    "from_hf_qwen2_vl",
    "from_hf_siglip",
    "from_open_clip",
    "load",
    "to_hf_llm",
]
