r"""BLIP-2 (Li et al., 2023): a frozen image encoder, a Querying Transformer, a frozen LLM.

Stage 1 (Sec. 3.2) trains the Q-Former on the frozen ViT's features with ITC + ITM (hard
negatives) + ITG, each under its own self-attention mask (models/blip.py, objectives/blip.py).
Stage 2 (Sec. 3.3) puts the Q-Former's 32 query outputs, through one linear projection, in
front of a frozen LLM as a soft visual prompt and trains on captions with the LM loss
(models/vlm.py, prefix mode). It reads two earlier workdirs (mmjax/train/stages.py): the ViT
and the Q-Former come from stage 1's (`init_from`, `qformer_connector_load`), the pretrained
LLM from its own (`init_from.more.lm`); the ViT and the LLM stay frozen, so only the Q-Former
and its projection train.

Tiny runs on the bundled digits (2 CPU cores). The frozen image encoder is the image tower of
a tiny CLIP run, as BLIP-2 freezes a CLIP ViT; the frozen LLM is a text-only LM trained on the
digits' captions (experiments/lm.py:tiny_digits, the same SentencePiece vocabulary as stage 2:
init_from refuses an LM of another tokenizer); then stage 1, then stage 2:

  python -m mmjax.train --config experiments/clip.py:tiny --workdir /tmp/clip_tiny
  python -m mmjax.train --config experiments/blip2.py:tiny_stage1 --workdir /tmp/blip2_stage1
  python -m mmjax.train --config experiments/lm.py:tiny_digits --workdir /tmp/lm_digits
  python -m mmjax.train --config experiments/blip2.py:tiny_stage2 --workdir /tmp/blip2_stage2

(`--config.init_from.path=...` and `--config.init_from.more.lm.path=...` point stage 2 at
other earlier workdirs.) Measured on 2 CPU cores shared with other jobs: CLIP 2 min 52 s,
stage 1 3 min 57 s (600 steps; last logged ITC 1.93, ITM 0.00, ITG 1.10), the LM 2 min 24 s
(600 steps, answer loss 2.06 at step 50 -> 0.607), stage 2 4 min 7 s with the eval (800 steps,
loss 0.724 at step 50 -> 0.607, the frozen LM and ViT bit-identical). Stage 2 captions poorly:
caption_accuracy 0.095 on 200 held-out digits, chance level (every caption is "a handwritten
digit zero"). The loss settles at the LM's own text-only loss: this tiny LM never saw text
whose context decides the digit, so it has no way to be steered by a prompt, soft or not,
and the Q-Former only learns to make its prefix harmless. A frozen LM that can be prompted
(the paper's OPT and FlanT5) is what stage 2 assumes; the tiny one would need pretraining
texts in which the context names the digit.

Paper shapes: `stage1` (EVA ViT-g/14 at 224 pixels, its second-last layer's features, a
BERT-base Q-Former with 32 queries, Table 6 / Sec. 3.4), then `stage2_opt2.7b` or
`stage2_opt6.7b` (OPT's block: LayerNorm, ReLU, biases, learned positions; ViT and LM
frozen). Stage 1 loads `vision` from a workdir holding the ViT; stage 2 imports OPT from its
Hugging Face checkpoint (`init_from.format=hf_llm`: its architecture and tokenizer become the
run's; a checkpoint with only vocab.json and merges.txt needs one `save_pretrained` with
transformers to write its tokenizer.json) and takes the ViT and the Q-Former from stage 1:

  python -m mmjax.train --config experiments/blip2.py:stage1 --workdir /gcs/bucket/blip2_s1 \
      --config.init_from.path=/gcs/bucket/eva_vit_g --config.data.path=/data/pairs
  python -m mmjax.train --config experiments/blip2.py:stage2_opt2.7b \
      --workdir /gcs/bucket/blip2_opt27 --config.init_from.path=/models/opt-2.7b \
      --config.init_from.more.stage1.path=/gcs/bucket/blip2_s1 --config.data.path=/data/pairs

The FlanT5 stage-2 models (FLANT5_SHAPES) are encoder-decoder LLMs, which models/vlm.py does
not build; their shapes are listed for reference.

Variants: tiny_stage1, tiny_stage2, stage1, stage2_opt2.7b, stage2_opt6.7b.
"""

import ml_collections

from mmjax.data import data_config
from mmjax.models.blip import qformer_connector_load
from mmjax.models.causal_lm import OPT
from mmjax.train.config_cli import base_config, load_config

# EVA-CLIP ViT-g/14 (Fang et al., 2023), as BLIP-2 uses it: 16x16 patches of 224 pixels + CLS
VIT_G = dict(patch_size=14, width=1408, depth=40, num_heads=16, mlp_dim=6144, pool="cls")
# BERT-base (Sec. 3.1); cross-attention every other layer
QFORMER_BASE = dict(
    num_queries=32, width=768, depth=12, num_heads=12, mlp_dim=3072, cross_attention_freq=2
)
# OPT (Zhang et al., 2022, Table 1): (layers, width, heads, FFN width)
OPT_SHAPES = {"opt2.7b": (32, 2560, 32, 10240), "opt6.7b": (32, 4096, 32, 16384)}
# FlanT5 (Chung et al., 2022): (encoder and decoder layers each, width, heads, FFN width)
FLANT5_SHAPES = {"flant5xl": (24, 2048, 32, 5120), "flant5xxl": (24, 4096, 64, 10240)}
TINY_QFORMER = dict(
    num_queries=8, width=64, depth=2, num_heads=4, mlp_dim=256, cross_attention_freq=2
)
TINY_TEXT_LEN = 16
VARIANTS = ("tiny_stage1", "tiny_stage2", "stage1", *(f"stage2_{lm}" for lm in OPT_SHAPES))


def get_config(arg: str = "tiny_stage1") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown blip2 variant {arg!r}; valid: {VARIANTS}")
    # AdamW, beta2 0.98, weight decay 0.05, peak lr 1e-4 after 2k warmup steps, cosine
    # decay (Sec. 3.4; to 5e-5 in stage 2)
    c = base_config(lr=1e-4, b2=0.98, weight_decay=0.05, warmup_steps=2000, end_factor=0.0)
    if arg == "tiny_stage1":
        tiny_stage1(c)
    elif arg == "tiny_stage2":
        tiny_stage2(c)
    elif arg == "stage1":
        _paper_stage1(c)
    else:
        _paper_stage2(c, arg.removeprefix("stage2_"))
    return c


def tiny_vision() -> dict:
    """The image tower of experiments/clip.py:tiny, which the tiny stages load and freeze."""
    return dict(load_config("clip.py:tiny", relative_to=__file__).model.image)


def tiny_stage1(c: ml_collections.ConfigDict) -> None:
    """A 2-layer Q-Former (8 queries) on the frozen ViT of /tmp/clip_tiny, on the digits."""
    c.total_steps = 600
    c.batch_size = 64
    c.log_every = 25
    c.eval_every = c.total_steps
    c.checkpoint_every = 300
    c.data = data_config(source="digits", image_size=8, max_text_len=TINY_TEXT_LEN, vocab_size=128)
    # A digit's captions name its label alone: an image of the same digit is no ITM negative
    c.objective = dict(name="blip", kwargs=dict(label_smoothing=0.1, same_key="label"))
    c.model = dict(
        name="blip2",
        vision=tiny_vision(),
        qformer=TINY_QFORMER,
        vocab_size=0,  # the tokenizer's
        embed_dim=64,
        max_text_len=TINY_TEXT_LEN,
        dtype="float32",
        attention_impl="auto",
    )
    c.init_from.update(
        format="workdir", path="/tmp/clip_tiny", step=-1, load={"vision": "image_tower"}
    )
    c.optimizer.update(lr=1e-3, warmup_steps=40, frozen=("vision/**",))
    c.evals = dict()


def tiny_lm() -> ml_collections.ConfigDict:
    """experiments/lm.py:tiny_digits, the text-only LM that tiny_stage2 loads and freezes."""
    return load_config("lm.py:tiny_digits", relative_to=__file__)


def tiny_stage2(c: ml_collections.ConfigDict) -> None:
    """The stage-1 ViT and Q-Former in front of the frozen LM of /tmp/lm_digits, captioning
    the digits: only the Q-Former and its new projection train."""
    c.total_steps = 800
    c.batch_size = 32
    c.log_every = 50
    c.eval_every = c.total_steps
    c.checkpoint_every = 400
    queries = TINY_QFORMER["num_queries"]
    lm = tiny_lm()
    # The LM run's data: the same SentencePiece vocabulary and the same text positions
    c.data = lm.data
    if c.data.sequence.visual_tokens != queries:
        raise ValueError(
            f"lm.py:tiny_digits lays out {c.data.sequence.visual_tokens} image slots but the "
            f"tiny Q-Former has {queries} queries"
        )
    c.objective = dict(name="vlm")
    c.model = dict(
        name="vlm",
        vision=tiny_vision(),
        keep_cls=True,  # the Q-Former read every ViT token in stage 1
        connector=dict(type="qformer", **TINY_QFORMER),
        **{k: lm.model[k] for k in ("vocab_size", "width", "depth", "num_heads", "mlp_dim")},
        dtype="float32",
        attention_impl="auto",
    )
    load = {"vision": "vision", **_connector_load(TINY_QFORMER)}
    c.init_from.update(
        format="workdir",
        path="/tmp/blip2_stage1",
        step=-1,
        load=load,
        more=dict(lm=dict(path="/tmp/lm_digits", step=-1, load={"lm": "lm"})),
    )
    c.optimizer.update(lr=1e-3, warmup_steps=40, frozen=("vision/**", "lm/**"))
    c.evals = dict(
        vlm=dict(type="vlm", split="test", num_samples=200, batch_size=64, tasks=("caption",))
    )


def _connector_load(qformer: dict) -> dict[str, str]:
    return qformer_connector_load(qformer["depth"], qformer["cross_attention_freq"])


def _paper_common(c: ml_collections.ConfigDict, steps: int, batch_size: int) -> None:
    """The paper's steps and batch (Sec. 3.4), bf16, FSDP, the ViT frozen."""
    c.mesh.update(data=1, fsdp=-1)
    c.batch_size = batch_size
    c.total_steps = steps
    c.log_every = 100
    c.eval_every = steps
    c.checkpoint_every = 5000
    c.optimizer.update(frozen=("vision/**",))


def _paper_stage1(c: ml_collections.ConfigDict) -> None:
    """250k steps of ITC + ITM + ITG (Sec. 3.4) on the frozen ViT-g's second-last layer."""
    _paper_common(c, 250_000, 2320)  # batch 2320 with ViT-g
    c.data = data_config(
        source="array_record",
        image_size=224,
        max_text_len=32,
        tokenizer="hf",  # BERT's, from data.tokenizer_path
        vocab_size=30522,  # that tokenizer's size, for compiling without it (mmjax.aot)
        prefetch=4,
    )
    # Two captions of one image are no ITM negatives (LAVIS's image-id mask)
    c.objective = dict(name="blip", kwargs=dict(label_smoothing=0.1, same_key="index"))
    c.model = dict(
        name="blip2",
        vision=dict(VIT_G, remat_policy="full", scan_layers=True),
        feature_layer=-2,  # "remove the last layer of the ViT" (Sec. 3.4)
        qformer=QFORMER_BASE,
        vocab_size=0,
        embed_dim=256,
        max_text_len=32,
        dtype="bfloat16",
        attention_impl="auto",
    )
    c.init_from.update(format="workdir", path="", step=-1, load={"vision": "vision"})
    c.evals = dict()


def _paper_stage2(c: ml_collections.ConfigDict, lm: str) -> None:
    """80k steps of captioning with the LM loss, ViT and LLM frozen (Sec. 3.3, 3.4)."""
    _paper_common(c, 80_000, 1920)  # batch 1920 with OPT
    c.optimizer.end_factor = 0.5  # the minimum lr of stage 2, 5e-5
    depth, width, heads, mlp_dim = OPT_SHAPES[lm]
    queries = QFORMER_BASE["num_queries"]
    c.data = data_config(
        source="array_record",
        image_size=224,
        tokenizer="hf",  # OPT's, from data.tokenizer_path
        vocab_size=50265,  # that tokenizer's size, for compiling without it (mmjax.aot)
        prefetch=4,
        sequence=dict(
            kind="vlm",
            mode="prefix",
            visual_tokens=queries,
            max_len=queries + 64,
            tasks=dict(caption=1.0),
        ),
    )
    c.objective = dict(name="vlm")
    c.model = dict(
        name="vlm",
        vision=dict(VIT_G, remat_policy="full", scan_layers=True),
        feature_layer=-2,
        keep_cls=True,
        connector=dict(type="qformer", **QFORMER_BASE),
        vocab_size=0,
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=mlp_dim,
        **OPT,
        dtype="bfloat16",
        attention_impl="auto",
        remat_policy="full",
        scan_layers=True,
    )
    # OPT from its HF checkpoint, the ViT and the Q-Former from stage 1 (paths given on the
    # command line: the module docstring)
    stage1 = dict(path="", step=-1, load={"vision": "vision", **_connector_load(QFORMER_BASE)})
    c.init_from.update(format="hf_llm", path="")
    c.init_from.load = None
    c.init_from.more = dict(stage1=stage1)
    c.optimizer.frozen = ("vision/**", "lm/**")
    c.evals = dict(
        vlm=dict(type="vlm", split="test", num_samples=500, batch_size=64, tasks=("caption",))
    )
