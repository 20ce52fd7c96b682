r"""UniFluid (Fan et al., 2025): autoregressive generation of continuous visual tokens with a
per-token diffusion head, and image understanding, in one causal decoder.

Tiny run on the bundled real digits in pixel space (8x8 grey, 2x2 patches: 16 visual tokens),
judged as Transfusion's: generation_accuracy 0.995, caption_accuracy 0.965 in 7 min 49 s on 2
shared CPU cores, the final eval included:

  python -m mmjax.train --config experiments/unifluid.py:tiny --workdir /tmp/uf_tiny

Tiny run on the synthetic 32x32 shapes through the frozen tiny VAE (experiments/vae.py:tiny,
8x8x4 latents, 2x2 latent patches: 16 visual tokens), the same parameters count and steps as
experiments/transfusion.py:tiny_shapes, judged by compositional_accuracy:

  python -m mmjax.train --config experiments/vae.py:tiny --workdir /tmp/vae_tiny
  python -m mmjax.train --config experiments/unifluid.py:tiny_shapes --workdir /tmp/uf_shapes \
      [--config.latents.vae_workdir=/tmp/vae_tiny]

Measured (4,000 steps, 67 min on 2 CPU cores shared with two other runs, 200 held-out prompts
and scenes): compositional_accuracy 0.085 (colour 0.375, shape 0.19, count 0.735, relation
0.026), caption_accuracy 0.765; transfusion.py:tiny_shapes, same parameters and steps: 0.875
and 0.31.

The tiny run with the understanding encoder of a trained tiny CLIP (or SigLIP) run, frozen: its
image tower's parameters are copied into UniFluid's ViT (`init_from.load`, vit <- image_tower)
and get no updates (`optimizer.frozen`); both runs use the 8x8 digits with patch 2, and the
grey digits are repeated to the 3 channels the encoder was trained on:

  python -m mmjax.train --config experiments/clip.py:tiny --workdir /tmp/clip_tiny
  python -m mmjax.train --config experiments/unifluid.py:tiny_clip --workdir /tmp/uf_clip \
      [--config.init_from.path=/tmp/clip_tiny]

Measured: generation_accuracy 1.0, caption_accuracy 0.96 (the jointly trained ViT of `tiny`:
0.995, 0.965), the 39 ViT parameters bit-identical to the CLIP run's after the 1,000 steps.
(`tiny_siglip` reads /tmp/siglip_tiny; `--config.optimizer.frozen='()'` trains the loaded
encoder on jointly.) Another image size or patch gives another number of ViT positions; the run
then stops with one line naming `vit/pos_embedding` and both shapes.

Sampling from a trained workdir (per-token DDPM, 100 steps, temperature and CFG from the eval):

  python -m mmjax.sample --workdir /tmp/uf_tiny --prompt "a handwritten seven" --num 16
  python -m mmjax.sample --workdir /tmp/uf_tiny --caption 16

Paper shapes (Gemma-2 decoders, Sec. 4.1; SigLIP-So400m-like image encoder; 256x256 images as
32x32x4 VAE latents in 2x2 patches: 256 visual tokens):

  python -m mmjax.train --config experiments/unifluid.py:2B --workdir /gcs/bucket/uf2b \
      --config.init_from.format=hf_llm --config.init_from.path=/models/gemma-2-2b \
      --config.data.path=/data/shards

Variants: tiny, tiny_shapes, tiny_clip, tiny_siglip, 2B, 9B.
"""

import ml_collections

from mmjax.data import data_config
from mmjax.models.causal_lm import GEMMA2
from mmjax.models.siglip import IMAGE_DEFAULTS as SIGLIP_IMAGE_DEFAULTS
from mmjax.train.config_cli import base_config, load_config

# name: (layers, width, heads, kv heads, MLP width); Gemma 2 (Gemma Team, 2024, Table 1),
# whose block (GQA, head_dim 256, GeGLU, sandwich norms, soft-capping, alternating 4,096-token
# windows, tied embeddings) is models/causal_lm.py's GEMMA2
PAPER_SHAPES = {
    "2B": (26, 2304, 8, 4, 9216),
    "9B": (42, 3584, 16, 8, 14336),
}
# tiny_<encoder>: the image tower of experiments/<encoder>.py:tiny, with the defaults its model
# adds (models/siglip.py), loaded from that run's workdir and frozen
ENCODERS = {"clip": {}, "siglip": SIGLIP_IMAGE_DEFAULTS}
# tiny_shapes decoder MLP width: 1,116,592 parameters, transfusion.py:tiny_shapes 1,118,244
PARITY_MLP_DIM = 424
VARIANTS = ("tiny", "tiny_shapes", *(f"tiny_{e}" for e in ENCODERS), *PAPER_SHAPES)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown unifluid variant {arg!r}; valid: {VARIANTS}")
    c = base_config(b2=0.95, weight_decay=0.02, warmup_steps=5000, end_factor=0.0)
    # L = L_text + w * L_image; MAR's diffusion loss: cosine schedule over 1,000 steps, eps
    # prediction, 4 noise draws per token (diffusion_batch_mul); raster or random order.
    c.objective = dict(
        name="unifluid",
        kwargs=dict(
            image_weight=1.0,
            schedule="cosine",
            num_train_steps=1000,
            diffusion_batch_mul=4,
            order="raster",
        ),
    )
    c.latents = dict(vae_workdir="", scaling_factor=0.0, sample=False)
    if arg == "tiny":
        _tiny(c)
    elif arg == "tiny_shapes":
        _tiny_shapes(c)
    elif arg.startswith("tiny_"):
        _tiny_frozen_encoder(c, arg.removeprefix("tiny_"))
    else:
        _paper(c, arg)
    return c


def _tiny(c: ml_collections.ConfigDict) -> None:
    """4 layers of width 128 over 8x8 grey digits in pixel space. Held-out (generation,
    caption) accuracy measured with 2,000 steps: (0.995, 0.98) at step 1,000, (1.0, 0.98) at
    1,500, (1.0, 0.975) at 2,000; so 1,000 steps."""
    c.total_steps = 1000
    c.batch_size = 64
    c.log_every = 50
    c.eval_every = c.total_steps  # the final eval only
    c.checkpoint_every = 500
    patch = 2
    c.data = data_config(
        source="digits",
        image_size=8,
        vocab_size=128,
        sequence=dict(
            kind="unifluid",
            max_len=32,
            patch_size=patch,
            channels=1,
            caption_first=0.5,  # half generation rows, half understanding rows
            tokens_per_step=1,
        ),
    )
    c.model = dict(
        name="unifluid",
        vocab_size=0,
        width=128,
        depth=4,
        num_heads=4,
        mlp_dim=384,
        image_shape=(8, 8, 1),
        patch_size=patch,
        head_width=128,
        head_depth=3,
        vision_patch=patch,  # pixels
        vision_width=64,
        vision_depth=2,
        vision_heads=4,
        vision_mlp_dim=128,
        dtype="float32",
        attention_impl="auto",
        remat_policy="none",  # nn.transformer.REMAT_POLICIES
        scan_layers=False,
    )
    c.optimizer.update(lr=1e-3, warmup_steps=100)
    c.evals = dict(
        generation=dict(
            type="unifluid",
            split="test",
            num_samples=200,
            num_steps=100,  # per-token reverse diffusion steps (MAR)
            temperature=1.0,
            cfg_scale=3.0,
            order="raster",
            clip_x0=1.0,  # pixel space: images in [-1, 1]
            loss=c.objective.kwargs,
        )
    )


def _tiny_shapes(c: ml_collections.ConfigDict) -> None:
    """The tiny model on 8x8x4 latents of the 32x32 shapes (the tiny VAE, f = 4), set side by
    side with transfusion.py:tiny_shapes: its data (the 128-piece word vocabulary, half the
    rows caption-first), its steps and its parameter count."""
    _tiny(c)
    c.total_steps = 4000  # as transfusion.py:tiny_shapes
    c.eval_every = c.total_steps
    patch, f = 2, 4  # 2x2 latent patches = 8x8 pixels
    c.data = data_config(
        source="shapes",
        image_size=32,
        vocab_size=128,  # a word a token: the longest caption is 8 tokens
        # <bos> 8 caption tokens <BOI> 16 visual tokens <EOI> <eos>
        sequence=dict(
            kind="unifluid", max_len=32, patch_size=patch * f, channels=3, caption_first=0.5
        ),
    )
    # Parameter parity with transfusion.py:tiny_shapes: the head and the ViT take their share
    # from the decoder's MLP.
    c.model.update(
        image_shape=(8, 8, 4),
        patch_size=patch,
        mlp_dim=PARITY_MLP_DIM,
        head_width=64,
        vision_patch=patch * f,
        vision_width=32,
        vision_mlp_dim=64,
    )
    c.latents.vae_workdir = "/tmp/vae_tiny"
    # x0 clipped at 3 latent std (unclipped: compositional 0.0 at 1,500 steps)
    c.evals.generation.update(clip_x0=3.0)


def _tiny_frozen_encoder(c: ml_collections.ConfigDict, encoder: str) -> None:
    """The tiny model whose ViT is the image tower of a trained experiments/<encoder>.py:tiny
    run (its workdir /tmp/<encoder>_tiny), frozen."""
    _tiny(c)
    source = load_config(f"{encoder}.py:tiny", relative_to=__file__)
    if source.data.image_size != c.data.image_size:
        raise ValueError(
            f"{encoder}.py:tiny trains on {source.data.image_size}px images, unifluid.py:tiny on "
            f"{c.data.image_size}px: the ViT's position table would not fit"
        )
    tower = {**ENCODERS[encoder], **source.model.image}
    c.model.update(
        vision_patch=tower.pop("patch_size"),
        vision_width=tower.pop("width"),
        vision_depth=tower.pop("depth"),
        vision_heads=tower.pop("num_heads"),
        vision_mlp_dim=tower.pop("mlp_dim"),
        vision_options=tower,
        vision_channels=3,  # the encoder saw the digits as RGB
    )
    c.init_from.update(
        format="workdir", path=f"/tmp/{encoder}_tiny", step=-1, load={"vit": "image_tower"}
    )
    c.optimizer.frozen = ("vit/**",)


def _paper(c: ml_collections.ConfigDict, arg: str) -> None:
    """Gemma-2 decoders on 256x256 images as 32x32x4 latents in 2x2 patches (256 tokens),
    a So400m-shaped ViT over 16x16 pixel patches (256 features), MAR-H's head width."""
    depth, width, heads, kv_heads, mlp = PAPER_SHAPES[arg]
    c.mesh.update(data=1, fsdp=-1)
    c.batch_size = 2048
    c.total_steps = 1_000_000
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 2_000
    c.optimizer.update(lr=1e-4, warmup_steps=5000)
    c.data = data_config(
        source="array_record",
        image_size=256,
        vocab_size=256_000,
        prefetch=4,
        sequence=dict(kind="unifluid", max_len=512, patch_size=16, channels=3, caption_first=0.5),
    )
    c.model = dict(
        name="unifluid",
        vocab_size=0,
        width=width,
        depth=depth,
        num_heads=heads,
        num_kv_heads=kv_heads,
        mlp_dim=mlp,
        **GEMMA2,
        image_shape=(32, 32, 4),
        patch_size=2,
        head_width=1280,
        head_depth=3,
        vision_patch=16,  # SigLIP-So400m's shape
        vision_width=1152,
        vision_depth=27,
        vision_heads=16,
        vision_mlp_dim=4304,
        dtype="bfloat16",
        attention_impl="auto",
        remat_policy="full",
        scan_layers=True,
    )
    # set --config.latents.vae_workdir to a VAE with f = 8 and 4 latent channels
