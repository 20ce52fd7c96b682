r"""MiniGPT-v2 (Chen et al., 2023): each 4 neighbouring ViT tokens concatenated and projected
into a LLaMA-2 (the `concat` connector), and a task identifier token ("[vqa]", "[refer]",
"[grounding]", ...) leading every instruction, so one model serves captioning, VQA and
grounding without confusing them (Sec. 3).

Tiny run on the synthetic 32x32 shapes (a 3-block ViT of 4x4 patches with fixed 2D sin-cos
position embeddings: 64 tokens, 16 visual tokens after the concatenation; a 3-block LM of
width 128), every task of mmjax.data.vlm_tasks with identifiers (grounded captions and box
identification included), judged on 200 held-out scenes by caption_accuracy, vqa_accuracy and
grounding_miou, and, over the 85% of referring phrases that name one of two objects, by how
often the box lands on the other one (grounding_wrong_object; 0.5 is a coin flip; see
mmjax/evals/vlm.py):

  python -m mmjax.train --config experiments/minigpt_v2.py:tiny --workdir /tmp/minigpt_v2_tiny

Measured (6,000 steps, 44 minutes on 2 CPU cores; evals every 1,500 steps on 200 held-out
scenes, 932 referring phrases):

  step   grounding_miou  grounding_wrong_object  vqa_accuracy  caption_accuracy
  1500   0.314           0.433                   0.593         0.155
  3000   0.578           0.428                   0.770         0.350
  4500   0.725           0.300                   0.810         0.470
  6000   0.730           0.305                   0.838         0.530

The phrase starts choosing the object between steps 3,000 and 4,500 (a second seed,
`--config.seed=1`: grounding_miou 0.712, grounding_wrong_object 0.322 at step 6,000). With the
ViT's learned position embeddings instead (`--config.model.vision.posemb=learn`, CLIP's,
initialised at std 0.02) it never does in 6,000 steps: grounding_miou 0.589 but
grounding_wrong_object 0.465, chance, and caption_accuracy 0.425. What differs is how much of
the scene the from-scratch ViT spreads into each token. A linear probe for the *other* object's
colour on an object's token after the ViT's last block reads 0.87 at step 6,000 with learned
embeddings (0.17 before the first block; its own colour 0.97). With the fixed sin-cos grid
(big_vision's ViT default), it reads 0.94 at step 1,500 and falls to 0.78 by step 6,000 as the
binding appears. The paper has no such problem: its ViT is a pretrained EVA-CLIP, frozen.

Paper shapes (Sec. 3 and 4.1): EVA ViT-g/14 at 448 pixels (32x32 patch tokens -> 256 visual
tokens), LLaMA-2-chat-7B; the ViT frozen. The paper trains the LM through LoRA adapters, which
mmjax does not have: this config trains the whole LM instead (stage 2's recipe, Sec. 3.2),
starting from LLaMA-2-chat's HF checkpoint (`init_from.format=hf_llm`, its tokenizer the run's)
and the EVA ViT of a workdir holding it under `vision/` (`init_from.more.vision`):

  python -m mmjax.train --config experiments/minigpt_v2.py:7B --workdir /gcs/bucket/minigptv2 \
      --config.init_from.path=/models/llama-2-7b-chat \
      --config.init_from.more.vision.path=/gcs/bucket/eva_vit_g --config.data.path=/data/shards

Variants: tiny, 7B.
"""

import ml_collections

from mmjax.train.config_cli import load_config

# EVA-CLIP ViT-g/14 (Fang et al., 2023; MiniGPT-4's and MiniGPT-v2's encoder)
EVA_VIT_G_448 = dict(patch_size=14, width=1408, depth=40, num_heads=16, mlp_dim=6144)
LLAMA2_7B = dict(width=4096, depth=32, num_heads=32, mlp_dim=11008)
GROUP = 4  # neighbouring visual tokens concatenated into one (Sec. 3)
VARIANTS = ("tiny", "7B")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown minigpt_v2 variant {arg!r}; valid: {VARIANTS}")
    c = load_config(
        "llava.py:tiny" if arg == "tiny" else "llava.py:7B_stage2", relative_to=__file__
    )
    c.model.connector = dict(type="concat", group=GROUP)
    c.model.feature_layer = None  # the ViT's last layer
    c.data.sequence.task_identifiers = True
    if arg == "tiny":
        _tiny(c)
    else:
        _paper(c)
    return c


def _tiny(c: ml_collections.ConfigDict) -> None:
    """The llava.py tiny model with the concat connector, fixed 2D sin-cos position embeddings
    in the ViT and every task, referring weighted 4x and trained twice as long as llava.py's
    (the table above)."""
    c.model.vision.posemb = "sincos2d"  # learned ones leave the phrases unbound (above)
    visual_tokens = c.data.sequence.visual_tokens // GROUP
    c.data.sequence.update(
        visual_tokens=visual_tokens,
        max_len=visual_tokens + 96,  # a two-object grounded caption and its identifier
        tasks=dict(caption=1.0, vqa=1.0, refer=4.0, grounding=1.0, identify=1.0),
    )
    c.total_steps = 6000
    c.eval_every = c.checkpoint_every = 1500  # grounding_miou over training


def _paper(c: ml_collections.ConfigDict) -> None:
    """448-pixel images, EVA ViT-g and LLaMA-2-7B; the ViT frozen (Sec. 3.2)."""
    c.model.vision = EVA_VIT_G_448
    c.model.update(**LLAMA2_7B)
    c.data.image_size = 448
    c.data.sequence.visual_tokens = (448 // EVA_VIT_G_448["patch_size"]) ** 2 // GROUP
    vision = dict(path="", step=-1, load={"vision": "vision"})
    c.init_from.update(format="hf_llm", path="")
    c.init_from.load = None
    c.init_from.more = {"vision": vision}
    c.optimizer.update(lr=1e-5, frozen=("vision/**",))  # stage 2 (Sec. 4.1)
