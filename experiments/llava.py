r"""LLaVA (Liu et al., 2023) and LLaVA-1.5 (Liu et al., 2023b): a ViT's patch features through a
projector as a prefix of a causal LM, instruction-tuned with the loss on the answers only.

LLaVA-1.5 reads the ViT's penultimate layer (`model.feature_layer=-2`) through a two-layer MLP
(`mlp` connector); LLaVA-1 through one linear layer (`tiny_linear`, `*_llava1` variants).

Tiny run on the synthetic 32x32 shapes (a 3-block ViT of 4x4 patches: 64 visual tokens, a
3-block LM of width 128), captioning, VQA ("what colour is the circle?") and referring
("find <ref>the red circle</ref>" -> Qwen-VL box text), judged on 200 held-out scenes by
caption_accuracy, vqa_accuracy and grounding_miou (mmjax/evals/vlm.py):

  python -m mmjax.train --config experiments/llava.py:tiny --workdir /tmp/llava_tiny

The same on the bundled digits (8x8 grey, 2x2 patches: 16 visual tokens; captions and "what
digit is this?"):

  python -m mmjax.train --config experiments/llava.py:tiny_digits --workdir /tmp/llava_digits

Paper shapes (LLaVA-1.5, Sec. 3 and App. Table 9 of Liu et al., 2023b): CLIP ViT-L/14 at 336
pixels (576 visual tokens), Vicuna-7B or -13B, two stages. Stage 1 trains the projector alone
on image-caption pairs (`optimizer.frozen` holds the ViT and the LM), starting from the HF
checkpoints of Vicuna (its architecture and tokenizer become the run's) and of CLIP (its image
tower and preprocessing); stage 2 starts from stage 1's workdir and trains the LM and the
projector on the instruction mix:

  python -m mmjax.train --config experiments/llava.py:7B_stage1 --workdir /gcs/bucket/llava7b_s1 \
      --config.init_from.path=/models/vicuna-7b-v1.5 \
      --config.init_from.more.vision.path=/models/clip-vit-large-patch14-336 \
      --config.data.path=/data/lcs558k
  python -m mmjax.train --config experiments/llava.py:7B_stage2 --workdir /gcs/bucket/llava7b_s2 \
      --config.init_from.path=/gcs/bucket/llava7b_s1 --config.data.path=/data/llava_mix665k \
      --config.data.tokenizer_path=/models/vicuna-7b-v1.5

Variants: tiny, tiny_linear, tiny_digits, {7B,13B}_stage{1,2}, and LLaVA-1's linear projector
as {7B,13B}_stage{1,2}_llava1.
"""

import ml_collections

from mmjax.data import data_config
from mmjax.train.config_cli import base_config

# Vicuna v1.5 = Llama-2 shapes: (layers, width, heads, SwiGLU width)
LM_SHAPES = {"7B": (32, 4096, 32, 11008), "13B": (40, 5120, 40, 13824)}
# CLIP ViT-L/14 at 336 pixels (Radford et al., 2021, Table 20): 24x24 = 576 patch tokens
CLIP_VIT_L_336 = dict(
    patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096, activation="quick_gelu"
)
# stage: (peak lr, batch size, steps = one epoch of the stage's data, frozen parameters)
STAGES = {
    "stage1": (1e-3, 256, 558_128 // 256, ("vision/**", "lm/**")),  # LCS-558K, projector only
    "stage2": (2e-5, 128, 665_298 // 128, ("vision/**",)),  # the 665K instruction mix
}
VARIANTS = (
    "tiny",
    "tiny_linear",
    "tiny_digits",
    *(
        f"{size}_{stage}{suffix}"
        for size in LM_SHAPES
        for stage in STAGES
        for suffix in ("", "_llava1")
    ),
)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown llava variant {arg!r}; valid: {VARIANTS}")
    # AdamW without weight decay, 3% warmup, cosine decay to 0 (LLaVA-1.5 App. Table 9)
    c = base_config(weight_decay=0.0, end_factor=0.0)
    c.objective = dict(name="vlm")  # answer-only cross-entropy (LLaVA Sec. 4.2)
    if arg.startswith("tiny"):
        tiny(c, connector="linear" if arg == "tiny_linear" else "mlp")
        if arg == "tiny_digits":
            _digits(c)
    else:
        size, stage, *llava1 = arg.split("_")
        _paper(c, size, stage, connector="linear" if llava1 else "mlp")
    return c


def tiny(c: ml_collections.ConfigDict, *, connector: str) -> None:
    """A prefix VLM on the 32x32 shapes, jointly trained from scratch (no pretrained towers
    exist at this size): about 4 CPU minutes. Other experiments start from it."""
    c.total_steps = 3000
    c.batch_size = 32
    c.log_every = 100
    c.eval_every = c.total_steps  # the final eval only
    c.checkpoint_every = 1000
    vision = dict(patch_size=4, width=64, depth=3, num_heads=4, mlp_dim=128, posemb="learn")
    visual_tokens = (32 // vision["patch_size"]) ** 2
    c.data = data_config(
        source="shapes",
        image_size=32,
        vocab_size=256,  # SentencePiece on the task texts, each digit its own piece (boxes)
        sequence=dict(
            kind="vlm",
            mode="prefix",
            visual_tokens=visual_tokens,
            max_len=visual_tokens + 48,  # the longest instruction + box answer + <eos>
            tasks=dict(caption=1.0, vqa=1.0, refer=1.0),
        ),
    )
    width = 128
    c.model = dict(
        name="vlm",
        vision=vision,
        connector=dict(type=connector),
        feature_layer=-2,  # LLaVA-1.5: the penultimate ViT layer (Sec. 3.1 of Liu et al., 2023b)
        vocab_size=0,  # the tokenizer's
        width=width,
        depth=3,
        num_heads=4,
        mlp_dim=3 * width,
        dtype="float32",
        attention_impl="auto",
    )
    c.optimizer.update(lr=1e-3, warmup_steps=100)
    c.evals = dict(
        vlm=dict(
            type="vlm",
            split="test",
            num_samples=200,
            batch_size=64,
            tasks=("caption", "vqa", "refer"),
        )
    )


def _digits(c: ml_collections.ConfigDict) -> None:
    """The tiny model on the 8x8 grey digits: 2x2 patches (16 visual tokens), captions and the
    digit question."""
    c.data.update(source="digits", image_size=8, vocab_size=128)
    c.data.sequence.update(
        channels=1, visual_tokens=16, max_len=16 + 24, tasks=dict(caption=1.0, vqa=1.0)
    )
    c.model.vision.patch_size = 2
    c.evals.vlm.tasks = ("caption", "vqa")


def _paper(c: ml_collections.ConfigDict, size: str, stage: str, *, connector: str) -> None:
    """LLaVA-1.5 at the paper's sizes; the ViT stays frozen in both stages."""
    depth, width, heads, mlp_dim = LM_SHAPES[size]
    lr, batch, steps, frozen = STAGES[stage]
    c.mesh.update(data=1, fsdp=-1)
    c.batch_size = batch
    c.total_steps = steps
    c.log_every = 10
    c.eval_every = steps
    c.checkpoint_every = 500
    c.optimizer.update(lr=lr, warmup_steps=int(0.03 * steps), frozen=frozen)
    if stage == "stage1":  # Vicuna (HF) into lm/, CLIP ViT-L/14-336's image tower into vision/
        clip = dict(format="hf_clip", path="", load={"vision": "image_tower"})
        c.init_from.update(format="hf_llm", path="", more=dict(vision=clip))
    else:  # all of stage 1's parameters
        c.init_from.update(format="workdir", path="", step=-1)
    visual_tokens = (336 // CLIP_VIT_L_336["patch_size"]) ** 2
    c.data = data_config(
        source="array_record",
        image_size=336,
        tokenizer="hf",  # Vicuna's: stage 1 takes it from init_from, stage 2 from tokenizer_path
        vocab_size=32000,  # that tokenizer's size, for compiling without it (mmjax.aot)
        prefetch=4,
        sequence=dict(
            kind="vlm",
            mode="prefix",
            visual_tokens=visual_tokens,
            max_len=2048,
            tasks=dict(caption=1.0),  # array_record sources hold image-caption pairs
        ),
    )
    c.model = dict(
        name="vlm",
        vision=CLIP_VIT_L_336,
        connector=dict(type=connector),
        feature_layer=-2,
        vocab_size=0,
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=mlp_dim,
        dtype="bfloat16",
        attention_impl="auto",
        remat_policy="full",
        scan_layers=True,
    )
    c.evals = dict(
        vlm=dict(type="vlm", split="test", num_samples=500, batch_size=64, tasks=("caption",))
    )
