"""Small configs shared by tests: the tiny CLIP shrunk further so a step takes milliseconds."""

import os

import ml_collections

from mmjax.train.config_cli import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_clip_config(**overrides) -> ml_collections.ConfigDict:
    """experiments/clip.py:tiny with 1-layer towers, a byte tokenizer and short schedules."""
    c = load_config(os.path.join(REPO, "experiments", "clip.py") + ":tiny")
    c.model.image.depth = 1
    c.model.text.depth = 1
    c.data.tokenizer = "byte"
    c.data.max_text_len = c.model.text.max_len = 40  # bytes of the longest digit caption
    c.batch_size = 32
    c.total_steps = 6
    c.log_every = 2
    c.eval_every = 1000
    c.checkpoint_every = 3
    c.evals.zero_shot.batch_size = 64
    c.optimizer.warmup_steps = 2
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c
