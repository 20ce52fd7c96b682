r"""MiniGPT-4 (Zhu et al., 2023): BLIP-2's frozen vision component (EVA ViT-g/14 + Q-Former)
and a frozen Vicuna, aligned by one trainable linear projection (Sec. 3).

The model is experiments/blip2.py's stage-2 VLM (prefix mode: the Q-Former's query outputs,
projected, lead the LLM's input); every parameter but the projection `connector/proj` is
frozen (`optimizer.frozen`). Stage 1 trains on image-caption pairs (20k steps at batch 256),
stage 2 on 3,500 curated detailed descriptions in a conversation template (400 steps at
batch 12), Sec. 3.1-3.2.

Tiny run on the bundled digits after experiments/blip2.py's tiny runs (its docstring): the
ViT, the Q-Former and the LM of the BLIP-2 tiny_stage2 workdir, frozen, and a new projection:

  python -m mmjax.train --config experiments/minigpt4.py:tiny --workdir /tmp/minigpt4_tiny

Paper shapes: Vicuna-13B (MiniGPT-4's release) or -7B. Stage 1 takes Vicuna from its HF
checkpoint (`init_from.format=hf_llm`: its architecture and tokenizer become the run's) and
BLIP-2's ViT and Q-Former (`vision/`, `connector/`) from a BLIP-2 run's workdir
(`init_from.more.blip2`):

  python -m mmjax.train --config experiments/minigpt4.py:13B_stage1 \
      --workdir /gcs/bucket/minigpt4_s1 --config.init_from.path=/models/vicuna-13b \
      --config.init_from.more.blip2.path=/gcs/bucket/blip2_stage1 --config.data.path=/data/pairs
  python -m mmjax.train --config experiments/minigpt4.py:13B_stage2 \
      --workdir /gcs/bucket/minigpt4_s2 --config.init_from.path=/gcs/bucket/minigpt4_s1 \
      --config.data.path=/data/cc_sbu_align --config.data.tokenizer_path=/models/vicuna-13b

Variants: tiny, {7B,13B}_stage{1,2}.
"""

import ml_collections

from mmjax.models.blip import qformer_connector_load
from mmjax.models.causal_lm import architecture_defaults
from mmjax.train.config_cli import load_config

# Vicuna v0 = LLaMA shapes: (layers, width, heads, SwiGLU width)
VICUNA_SHAPES = {"7B": (32, 4096, 32, 11008), "13B": (40, 5120, 40, 13824)}
# stage: (peak lr, end lr fraction, warmup steps, batch, steps) of MiniGPT-4's released configs
STAGES = {
    "stage1": (1e-4, 0.8, 5000, 256, 20_000),
    "stage2": (3e-5, 1 / 3, 200, 12, 400),
}
# Everything but the projection: the ViT, the LLM and the Q-Former's own weights
FROZEN = (
    "vision/**",
    "lm/**",
    "connector/query_tokens",
    "connector/embed_norm/**",
    "connector/layers_*/**",
)
VARIANTS = ("tiny", *(f"{size}_{stage}" for size in VICUNA_SHAPES for stage in STAGES))


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown minigpt4 variant {arg!r}; valid: {VARIANTS}")
    if arg == "tiny":
        return _tiny()
    size, stage = arg.split("_")
    return _paper(size, stage)


def _tiny() -> ml_collections.ConfigDict:
    """BLIP-2 tiny_stage2's model with a fresh projection, trained alone on digit captions."""
    c = load_config("blip2.py:tiny_stage2", relative_to=__file__)
    c.total_steps = 400
    c.checkpoint_every = 200
    c.eval_every = c.total_steps
    qformer = c.model.connector
    load = qformer_connector_load(
        qformer.depth, qformer.cross_attention_freq, dst="connector", src="connector"
    )
    c.init_from.path = "/tmp/blip2_stage2"
    c.init_from.load = {"vision": "vision", "lm": "lm", **load}
    c.init_from.more = {}  # the LM too comes from the stage-2 workdir
    c.optimizer.update(frozen=FROZEN)
    return c


def _paper(size: str, stage: str) -> ml_collections.ConfigDict:
    """BLIP-2's stage-2 VLM with Vicuna's shapes; stage 1 loads Vicuna's HF checkpoint and a
    BLIP-2 workdir's ViT and Q-Former (the projection stays new), stage 2 all of stage 1's
    parameters."""
    c = load_config("blip2.py:stage2_opt2.7b", relative_to=__file__)
    depth, width, heads, mlp_dim = VICUNA_SHAPES[size]
    lr, end_factor, warmup, batch, steps = STAGES[stage]
    # Vicuna: the Llama block (LMFields' defaults) in place of BLIP-2's OPT
    c.model.update(architecture_defaults())
    c.model.update(width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim)
    c.batch_size = batch
    c.total_steps = steps
    c.eval_every = steps
    c.checkpoint_every = min(c.checkpoint_every, steps)
    c.optimizer.update(
        lr=lr, end_factor=end_factor, warmup_steps=warmup, weight_decay=0.05, frozen=FROZEN
    )
    qformer = c.model.connector
    if stage == "stage1":
        load = qformer_connector_load(
            qformer.depth, qformer.cross_attention_freq, dst="connector", src="connector"
        )
        blip2 = dict(path="", step=-1, load={"vision": "vision", **load})
        c.init_from.update(format="hf_llm", path="")
        c.init_from.more = {"blip2": blip2}
    else:  # every parameter of stage 1
        c.init_from.update(format="workdir", path="", step=-1)
        c.init_from.more = {}
    c.init_from.load = None
    return c
