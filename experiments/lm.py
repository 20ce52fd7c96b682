r"""A text-only language model pretrained on the VLM tasks' texts, for the VLMs that start from
a pretrained LM: Flamingo freezes it (experiments/flamingo.py), xGen-MM trains it on
(experiments/xgen_mm.py).

The model is models/lm.py's `TextLM`: the VLM's Llama-style `CausalLM` under the parameter
names a VLM gives its LM (`lm/...`), reading only the token arrays of a batch. The data is
data.sequence kind "vlm" in flamingo mode, `<image> instruction answer <eos>` per row, with
the images ignored: the LM reads the `<image>` marker as a plain token, the text a Flamingo LM
reads, and learns the instructions' answers from text alone (the "vlm" objective scores the
answer tokens). A later run loads it with

  init_from=dict(format="workdir", path=LM_WORKDIR, load={"lm": "lm"})

Tiny run on the synthetic 32x32 shapes, every task of mmjax/data/vlm_tasks.py (caption, vqa,
refer, grounding, identify), a SentencePiece vocabulary of 128 trained on their texts (the
same, deterministically, in every run with the same data.source and vocab_size):

  python -m mmjax.train --config experiments/lm.py:tiny --workdir /tmp/lm_tiny

`tiny_digits` is the frozen LM of experiments/blip2.py:tiny_stage2: width 128 over the digits'
captions, laid out as that stage lays them out (prefix mode, DIGITS_VISUAL_SLOTS `<image>`
slots, which this LM reads as plain tokens and BLIP-2 fills with the Q-Former's outputs). Its
data config is the one tiny_stage2 reads (same data.source, vocab_size and sequence kind "vlm":
the same SentencePiece vocabulary; init_from checks it piece for piece):

  python -m mmjax.train --config experiments/lm.py:tiny_digits --workdir /tmp/lm_digits

(600 steps, 2 min 24 s on 2 shared CPU cores: answer loss 2.06 at step 50 -> 0.607.)

Paper shapes, the LMs the VLMs start from (trained here on the captions of an array_record
dataset; the papers take them pretrained on text): Chinchilla 1.4B / 7B / 70B of Flamingo-3B /
9B / 80B (Alayrac et al., 2022, App. B.1.1; Llama-style blocks here, where Chinchilla has GeLU
MLPs and relative positions, at its parameter count) and phi-3-mini of xGen-MM (Xue et al.,
2024; Abdin et al., 2024):

  python -m mmjax.train --config experiments/lm.py:phi3_mini --workdir /gcs/bucket/phi3 \
      --config.data.path=/data/shards

Variants: tiny, tiny_digits, chinchilla_1.4b, chinchilla_7b, chinchilla_70b, phi3_mini.
"""

import ml_collections

from mmjax.data import data_config
from mmjax.data.vlm_tasks import TASKS
from mmjax.train.config_cli import base_config

# name: (layers, width, heads, MLP width, vocabulary). Chinchilla's GeLU MLP of 4x its width
# becomes a SwiGLU of 8/3x (rounded up to 128): the same parameter count in three matrices.
PAPER_SHAPES = {
    "chinchilla_1.4b": (24, 2048, 16, 5504, 32_000),
    "chinchilla_7b": (40, 4096, 32, 11008, 32_000),
    "chinchilla_70b": (80, 8192, 64, 21888, 32_000),
    "phi3_mini": (32, 3072, 32, 8192, 32_064),
}
VARIANTS = ("tiny", "tiny_digits", *PAPER_SHAPES)
TINY_MAX_LEN = 72  # the longest tiny task pair (a grounded caption, 66 tokens) + <image>, <eos>
DIGITS_VISUAL_SLOTS = 8  # experiments/blip2.py's tiny Q-Former queries
DIGITS_TEXT_LEN = 24  # the longest digit caption pair, with <eos>, fits


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown lm variant {arg!r}; valid: {VARIANTS}")
    c = base_config(b2=0.95, weight_decay=0.1, end_factor=0.1)
    c.objective = dict(name="vlm")  # next-token CE on the answers (objectives/vlm.py)
    if arg == "tiny":
        _tiny(c)
    elif arg == "tiny_digits":
        _tiny_digits(c)
    else:
        _paper(c, arg)
    return c


def _tiny(c: ml_collections.ConfigDict) -> None:
    """2 layers of width 64 over the shapes' task texts."""
    c.total_steps = 1500
    c.batch_size = 32
    c.log_every = 50
    c.eval_every = c.total_steps
    c.checkpoint_every = 500
    c.data = data_config(
        source="shapes",
        image_size=32,
        vocab_size=128,
        sequence=dict(
            kind="vlm",
            mode="flamingo",
            max_len=TINY_MAX_LEN,
            tasks={task: 1.0 for task in TASKS},
        ),
    )
    c.model = dict(
        name="lm",
        vocab_size=0,  # the tokenizer's, rounded up to 128
        width=64,
        depth=2,
        num_heads=4,
        mlp_dim=256,
        dtype="float32",
        attention_impl="auto",
    )
    c.optimizer.update(lr=3e-3, warmup_steps=100)
    c.evals = {}


def digits_data(visual_slots: int = DIGITS_VISUAL_SLOTS) -> ml_collections.ConfigDict:
    """Captions of the 8x8 digits in prefix mode behind `visual_slots` image slots: the data of
    tiny_digits and of experiments/blip2.py:tiny_stage2 (one tokenizer for both)."""
    return data_config(
        source="digits",
        image_size=8,
        vocab_size=128,
        sequence=dict(
            kind="vlm",
            mode="prefix",
            channels=3,  # the stage-1 ViT saw the digits as RGB (this LM ignores images)
            visual_tokens=visual_slots,
            max_len=visual_slots + DIGITS_TEXT_LEN,
            tasks=dict(caption=1.0),
        ),
    )


def _tiny_digits(c: ml_collections.ConfigDict) -> None:
    """2 layers of width 128 over the digits' captions, the LM BLIP-2's tiny stage 2 freezes."""
    c.total_steps = 600
    c.batch_size = 32
    c.log_every = 50
    c.eval_every = c.total_steps
    c.checkpoint_every = 300
    c.data = digits_data()
    width = 128
    c.model = dict(
        name="lm",
        vocab_size=0,  # the tokenizer's, rounded up to 128
        width=width,
        depth=2,
        num_heads=4,
        mlp_dim=3 * width,
        dtype="float32",
        attention_impl="auto",
    )
    c.optimizer.update(lr=3e-3, warmup_steps=50)
    c.evals = {}


def _paper(c: ml_collections.ConfigDict, arg: str) -> None:
    """The LM shape of PAPER_SHAPES[arg] on the captions of an array_record dataset."""
    depth, width, heads, mlp, vocab = PAPER_SHAPES[arg]
    c.mesh.update(data=1, fsdp=-1)
    c.batch_size = 1024
    c.total_steps = 500_000
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 2_000
    c.optimizer.update(lr=2e-4, warmup_steps=2000)
    c.data = data_config(
        source="array_record",
        image_size=224,
        vocab_size=vocab,
        prefetch=4,
        sequence=dict(kind="vlm", mode="flamingo", max_len=2048, tasks={"caption": 1.0}),
    )
    c.model = dict(
        name="lm",
        vocab_size=0,
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=mlp,
        dtype="bfloat16",
        attention_impl="auto",
        remat_policy="full",
        scan_layers=True,  # Flamingo's gated layers run inside the scan (models/vlm.py)
    )
    c.evals = {}
