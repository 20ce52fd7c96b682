"""Weight import: Hugging Face CLIP and SigLIP, and open_clip, into mmjax parameters.

  imported = mmjax.convert.from_hf_clip(transformers_model_or_local_dir)
  module = imported.module()
  emb = module.apply({"params": imported.params}, images, method=module.encode_image)

Images are NHWC floats normalised as the source model expects; text is the source tokenizer's
ids. Each converter checks the architecture, every tensor's presence and every shape against
the mmjax model it builds, and fails with one line naming what differs.
"""

from mmjax.convert import hf_clip, hf_siglip, open_clip
from mmjax.convert.imported import Imported, check_vocab

from_hf_clip = hf_clip.convert
from_hf_siglip = hf_siglip.convert
from_open_clip = open_clip.convert
CONVERTERS = {"hf_clip": from_hf_clip, "hf_siglip": from_hf_siglip, "open_clip": from_open_clip}

__all__ = [
    "CONVERTERS",
    "Imported",
    "check_vocab",
    "from_hf_clip",
    "from_hf_siglip",
    "from_open_clip",
]
