"""A Qwen-VL preset starting from a Hugging Face Qwen2.5-VL checkpoint (`init_from.format=
hf_qwen_vl`): its architecture, tokenizer and processor constants become the run's, its
weights fill the model, and with the vision tower frozen two training steps leave it
bit-identical to the checkpoint's. A model that is not qwen_vl is one clear line."""

import numpy as np
import pytest
import qwen_reference as ref
from flax.traverse_util import flatten_dict
from helpers import REPO

from mmjax import convert
from mmjax.errors import UserError
from mmjax.train import train_and_evaluate
from mmjax.train.build import build, load_trained
from mmjax.train.config_cli import load_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return ref.save_checkpoint("qwen2_5_vl", str(tmp_path_factory.mktemp("qwen25")))


def _config(checkpoint: str):
    c = load_config(f"{REPO}/experiments/qwen2_5_vl.py:tiny")
    c.update(batch_size=8, total_steps=2, log_every=1, eval_every=2, checkpoint_every=2)
    c.evals = {}
    c.data.sequence.max_len = 240  # the checkpoint's small BPE spells words out
    c.init_from = dict(format="hf_qwen_vl", path=checkpoint)
    c.optimizer.update(frozen=("vision/**",), warmup_steps=1, lr=1e-2)
    return c


def test_the_checkpoint_gives_the_run_its_architecture_tokenizer_and_processor(checkpoint):
    bundle = build(_config(checkpoint))
    model, seq = bundle.config.model, bundle.config.data.sequence
    assert (model.width, model.depth, model.num_kv_heads, model.mrope_sections) == (
        64,
        2,
        2,
        (2, 3, 3),
    )
    assert (model.vision.width, model.vision.global_every, model.vision.norm) == (32, 2, "rms")
    assert bundle.config.data.tokenizer == "hf" and bundle.config.data.tokenizer_path == checkpoint
    assert (seq.window_size, seq.tokens_per_second) == (112, 4.0)
    imported = convert.from_hf_qwen2_5_vl(checkpoint)
    # the placeholders are the checkpoint's own tokens: no rows are added
    assert bundle.tokenizer.special_ids["<|image_pad|>"] == imported.tokens["image_token_id"]
    assert model.vocab_size == imported.model["vocab_size"]


@pytest.mark.slow
def test_a_run_fine_tunes_the_imported_model_with_the_tower_frozen(checkpoint, tmp_path):
    workdir = str(tmp_path / "run")
    train_and_evaluate(_config(checkpoint), workdir)
    trained = load_trained(workdir)
    assert trained.step == 2
    imported = flatten_dict(convert.from_hf_qwen2_5_vl(checkpoint).params, sep="/")
    got = flatten_dict(trained.params, sep="/")
    for path, value in imported.items():
        if path.startswith("vision/"):
            np.testing.assert_array_equal(np.asarray(got[path]), value, err_msg=path)
    moved = [p for p in imported if p.startswith("lm/") and not np.array_equal(got[p], imported[p])]
    assert moved  # the LM trained


def test_a_model_that_is_not_qwen_vl_is_refused(checkpoint):
    config = _config(checkpoint)
    config.model.name = "vlm"
    with pytest.raises(UserError, match=r"needs model\.name 'qwen_vl'"):
        build(config)
