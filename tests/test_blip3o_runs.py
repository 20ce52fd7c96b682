"""BLIP3-o's tiny chain through the real trainer (experiments/blip3o.py): a CLIP and a VLM
run, the pixel decoder on the frozen CLIP tower, the generator on the frozen VLM (both frozen
parts bit-identical to their runs'), sampling and captioning from the CLI, the design
ablation's variants, and the clear errors for a backbone or a CLIP run that does not fit."""

import os

import numpy as np
import pytest
from flax.core import meta
from helpers import REPO
from test_frozen_lm_experiments import leaf_bytes

from mmjax.errors import UserError
from mmjax.sample import main as sample_main
from mmjax.train import train_and_evaluate
from mmjax.train.build import load_trained
from mmjax.train.config_cli import apply_overrides, load_config
from mmjax.train.metrics import read_metrics
from mmjax.train.stages import param_paths

pytestmark = pytest.mark.slow
SHORT = ["batch_size=8", "log_every=2", "checkpoint_every=4", "optimizer.warmup_steps=1"]


def config(spec: str, steps: int, *overrides: str):
    c = load_config(os.path.join(REPO, "experiments", spec))
    apply_overrides(c, [*SHORT, f"total_steps={steps}", f"eval_every={steps}", *overrides])
    return c


def train(spec: str, workdir: str, steps: int, *overrides: str, evals: bool = False) -> None:
    c = config(spec, steps, *overrides)
    if not evals:
        c.evals = {}
    train_and_evaluate(c, workdir)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, str]:
    """Workdirs of a few steps of each run of the chain."""
    root = tmp_path_factory.mktemp("blip3o")
    runs = {name: str(root / name) for name in ("clip", "vlm", "decoder", "blip3o")}
    train("clip.py:tiny_shapes", runs["clip"], 4)
    train("llava.py:tiny", runs["vlm"], 4)
    train("blip3o.py:tiny_decoder", runs["decoder"], 4, f"init_from.path={runs['clip']}")
    train(
        "blip3o.py:tiny_shapes", runs["blip3o"], 8, f"init_from.path={runs['vlm']}",
        f"latents.vae_workdir={runs['decoder']}", "evals.generation.num_samples=4",
        # the design ablation's setting: the evaluator reads a CLIP tower of its own
        f"evals.generation.clip_workdir={runs['decoder']}",
        "evals.generation.num_steps=3", evals=True,
    )  # fmt: skip
    return runs


def test_the_frozen_parts_stay_bit_identical_to_their_runs(chain):
    decoder, clip = load_trained(chain["decoder"]), load_trained(chain["clip"])
    tower = leaf_bytes(clip.params, "image_tower")
    assert len(tower) > 20 and leaf_bytes(decoder.params, "image_tower") == tower
    blip3o, vlm = load_trained(chain["blip3o"]), load_trained(chain["vlm"])
    whole = {
        path: np.asarray(x).tobytes() for path, x in param_paths(meta.unbox(vlm.params)).items()
    }
    assert len(whole) > 60 and leaf_bytes(blip3o.params, "backbone") == whole  # bit for bit
    losses = [r["loss"] for r in read_metrics(chain["blip3o"]) if "loss" in r]
    assert len(losses) == 4 and all(loss > 0 for loss in losses)
    evals = [r for r in read_metrics(chain["blip3o"]) if "clip_cosine" in r]
    assert evals and {"compositional_accuracy", "backbone_caption_accuracy"} <= set(evals[-1])


def test_joint_training_moves_the_backbones_lm_but_not_its_vit(chain, tmp_path):
    c = config(
        "ablations/blip3o_schedule.py:joint", 4, f"init_from.path={chain['vlm']}",
        f"latents.vae_workdir={chain['decoder']}",
    )  # fmt: skip
    c.evals = {}
    train_and_evaluate(c, str(tmp_path / "joint"))
    joint, vlm = load_trained(str(tmp_path / "joint")), load_trained(chain["vlm"])
    vit = leaf_bytes(vlm.params, "vision")
    assert len(vit) > 20 and leaf_bytes(joint.params, "backbone/vision") == vit
    assert leaf_bytes(joint.params, "backbone/lm") != leaf_bytes(vlm.params, "lm")
    assert all("lm_loss" in r for r in read_metrics(str(tmp_path / "joint")) if "loss" in r)


def test_sample_draws_and_the_backbone_captions(chain, capsys):
    sample_main(["--workdir", chain["blip3o"], "--prompt", "a red circle", "--num", "2"])
    assert os.path.isfile(os.path.join(chain["blip3o"], "samples", "a_red_circle.png"))
    sample_main(["--workdir", chain["blip3o"], "--caption", "2"])
    assert len(capsys.readouterr().out.strip().splitlines()) >= 2


def test_a_backbone_or_clip_run_that_does_not_fit_is_one_clear_error(chain, tmp_path):
    with pytest.raises(UserError, match=r"holds a 'clip' run, but init_from\.family asks for"):
        train("blip3o.py:tiny_shapes", str(tmp_path / "a"), 2, f"init_from.path={chain['clip']}",
              f"latents.vae_workdir={chain['decoder']}")  # fmt: skip
    other_vocab = str(tmp_path / "vlm250")
    train("llava.py:tiny", other_vocab, 1, "data.vocab_size=250")
    with pytest.raises(UserError, match="trained with another tokenizer"):
        train("blip3o.py:tiny_shapes", str(tmp_path / "b"), 2, f"init_from.path={other_vocab}",
              f"latents.vae_workdir={chain['decoder']}")  # fmt: skip
    with pytest.raises(
        UserError, match=r"init_from: image_tower/.* is \(.*\) in .* but \(.*\) here"
    ):
        # a CLIP tower of other shapes (width 32) than the decoder's config
        train("blip3o.py:tiny_decoder", str(tmp_path / "c"), 2, f"init_from.path={chain['clip']}",
              "model.image.width=32", "model.image.mlp_dim=128")  # fmt: skip
    with pytest.raises(UserError, match="holds no trained VAE: its model is 'clip'"):
        train("blip3o.py:tiny_shapes", str(tmp_path / "d"), 2, f"init_from.path={chain['vlm']}",
              f"latents.vae_workdir={chain['clip']}")  # fmt: skip


@pytest.mark.parametrize("variant", ["clip_flow", "clip_mse", "vae_flow"])
def test_the_design_variants_build_with_equal_dit_bodies(variant):
    c = load_config(os.path.join(REPO, "experiments", "ablations", f"blip3o_design.py:{variant}"))
    base = load_config(os.path.join(REPO, "experiments", "blip3o.py:tiny_shapes"))
    body = ("width", "depth", "num_heads", "mlp_dim")
    assert {k: c.model.dit[k] for k in body} == {k: base.model.dit[k] for k in body}
    assert c.total_steps == base.total_steps and c.batch_size == base.batch_size
    assert c.evals.generation.clip_workdir == base.latents.vae_workdir
