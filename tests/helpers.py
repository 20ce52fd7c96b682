"""Small configs shared by tests: the tiny CLIP shrunk further so a step takes milliseconds."""

import hashlib
import os
import sys

import ml_collections

from mmjax.train.config_cli import apply_overrides, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# experiments/clip.py:tiny shrunk so a step takes milliseconds: 1-layer towers, byte tokens.
SHRINK = [
    "model.image.depth=1",
    "model.text.depth=1",
    "data.tokenizer=byte",
    "data.max_text_len=40",  # bytes of the longest digit caption
    "model.text.max_len=40",
    "batch_size=32",
    "evals.zero_shot.batch_size=64",
    "evals.retrieval.batch_size=64",
    "evals.linear_probe.batch_size=64",
    "optimizer.warmup_steps=2",
    "total_steps=6",
    "log_every=2",
    "eval_every=1000",
    "checkpoint_every=3",
]
FAST = [f"--config.{item}" for item in SHRINK]  # the same, as CLI flags

# experiments/transfusion.py:tiny shrunk the same way, with a token generation eval at the end.
TRANSFUSION_FAST = [
    f"--config.{item}"
    for item in (
        "model.depth=1",
        "model.width=32",
        "model.mlp_dim=64",
        "batch_size=16",
        "optimizer.warmup_steps=2",
        "total_steps=6",
        "log_every=2",
        "eval_every=1000",
        "checkpoint_every=3",
        "evals.generation.num_samples=4",
        "evals.generation.num_steps=2",
    )
]
EXPERIMENTS = {
    "clip": ("experiments/clip.py:tiny", FAST),
    "transfusion": ("experiments/transfusion.py:tiny", TRANSFUSION_FAST),
}


def cli(workdir: str, *args: str, devices: int = 1, experiment: str = "clip", **popen) -> dict:
    """subprocess keyword arguments running a shrunk tiny experiment's CLI (EXPERIMENTS) on
    `devices` CPU devices."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    spec, fast = EXPERIMENTS[experiment]
    cmd = [sys.executable, "-m", "mmjax.train", "--config", spec, "--workdir", workdir]
    return dict(args=[*cmd, *fast, *args], cwd=REPO, env=env, **popen)


def tiny_clip_config(**overrides: object) -> ml_collections.ConfigDict:
    """experiments/clip.py:tiny with SHRINK applied, then `overrides` (top-level keys)."""
    c = load_config(os.path.join(REPO, "experiments", "clip.py") + ":tiny")
    apply_overrides(c, SHRINK + [f"{key}={value}" for key, value in overrides.items()])
    return c


def tree_digest(directory: str) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path."""
    digests = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def random_vae_run(workdir: str, devices) -> str:
    """A randomly initialised tiny VAE (32x32x3 -> 8x8x4, widths 8/16/32) saved as a run in
    `workdir`, for models trained on its latents."""
    from mmjax.train.checkpoint import Checkpointer
    from mmjax.train.loop import Trainer

    config = load_config(os.path.join(REPO, "experiments", "vae.py") + ":tiny")
    apply_overrides(config, ["model.channels=8", "model.norm_groups=4", "batch_size=8"])
    trainer = Trainer(config, workdir, devices=devices)
    data = trainer.data_iterator()
    state, _ = trainer.init_state(next(data))
    ckpt = Checkpointer(workdir, keep=1)
    ckpt.save(0, state, data, force=True)
    ckpt.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json())
    return workdir
