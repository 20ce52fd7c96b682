"""The Qwen-VL eval (mmjax/evals/qwen_vl.py) and chat CLI (mmjax/chat.py): grounding scores in
both box formats (the true box scores 1, the other object's counts as the wrong object, an
unparsable answer 0), the eval end to end on tiny random Qwen2.5-VLs (images and videos), and
the chat CLI on a tiny random Hugging Face Qwen2.5-VL with an image of odd size."""

import json
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from helpers import REPO
from PIL import Image

from mmjax import chat
from mmjax.data import qwen_tasks
from mmjax.data.pipeline import first_example
from mmjax.data.scenes import MovingShapesSource, ScenesSource
from mmjax.data.sequences import SEQUENCE_DEFAULTS
from mmjax.errors import UserError
from mmjax.evals import build_evaluators
from mmjax.evals.qwen_vl import grounding, grounding_metrics, named_object, score_answer
from mmjax.train.build import build
from mmjax.train.config_cli import load_config

SCENES = ScenesSource("test", 40)


def seq_of(box_format: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {**SEQUENCE_DEFAULTS, "kind": "qwen_vl", "box_format": box_format, "patch_size": 14}
    )


@pytest.mark.parametrize("box_format", qwen_tasks.BOX_FORMATS)
def test_grounding_scores_the_true_box_the_other_object_and_garbage(box_format):
    seq = seq_of(box_format)
    two = next(r for r in SCENES if len(r["shapes"]) == 2)
    one = next(r for r in SCENES if len(r["shapes"]) == 1)
    named, other = qwen_tasks.task_pairs(two, "refer", seq)
    (single,) = qwen_tasks.task_pairs(one, "refer", seq)
    target = named_object(two, named, seq)
    assert {target, named_object(two, other, seq)} == {0, 1}
    # the reference answer: IoU 1 up to its rounding (pixels / 1000ths of the side)
    iou, distractor, _ = grounding(named.answer, two, target, seq)
    assert iou > 0.85 and distractor == 0.0
    assert score_answer(named.answer, named, two, seq) == iou
    # where the image is its own resized frame, an absolute answer is exact: IoU 1
    same = next(
        r for r in SCENES if len(r["shapes"]) == 2 and r["image"].shape[:2] in ((56, 112), (84, 84))
    )
    for pair in qwen_tasks.task_pairs(same, "refer", seq):
        iou = score_answer(pair.answer, pair, same, seq)
        assert iou == 1.0 if box_format == "absolute" else iou > 0.9
    # the other object's box: the wrong object, counted among the distractor scenes only
    answers = [named.answer, other.answer, single.answer, "a red circle", ""]
    records = [two, two, one, two, one]
    targets = [target, target, 0, target, 0]
    wrong_iou, wrong_other, _ = grounding(other.answer, two, target, seq)
    assert wrong_iou < 0.5 < wrong_other
    metrics = grounding_metrics(answers, records, targets, seq)
    ious = [grounding(a, r, t, seq)[0] for a, r, t in zip(answers, records, targets, strict=True)]
    assert ious[3] == ious[4] == 0.0  # nothing parses
    assert metrics["grounding_miou"] == pytest.approx(np.mean(ious))
    assert metrics["grounding_accuracy"] == pytest.approx(2 / 5)
    # distractor scenes: answers 0, 1 and 3 (the garbage one has no box: IoU 0 with both)
    assert metrics["grounding_wrong_object"] == pytest.approx(1 / 3)
    assert metrics["grounding_miou_distractors"] == pytest.approx((ious[0] + wrong_iou) / 3)
    assert "grounding_wrong_object" not in grounding_metrics([single.answer], [one], [0], seq)


def test_caption_and_video_answers_match_exactly_up_to_case_and_spaces():
    seq = seq_of("absolute")
    record = SCENES[0]
    (pair,) = qwen_tasks.task_pairs(record, "caption", seq)
    assert score_answer(f"  {record['caption'].upper()}  ", pair, record, seq) == 1.0
    assert score_answer(record["caption"] + ".", pair, record, seq) == 0.0
    video = MovingShapesSource("test", 4, frames=4)[0]
    (pair,) = qwen_tasks.task_pairs(video, "video", seq)
    assert score_answer(f" {video['direction'].title()}\n", pair, video, seq) == 1.0
    wrong = "up" if video["direction"] != "up" else "down"
    assert score_answer(wrong, pair, video, seq) == 0.0


# ------------------------------------------------------------------------ end to end


def tiny(variant: str, tasks: tuple[str, ...]) -> ml_collections.ConfigDict:
    config = load_config(os.path.join(REPO, "experiments", f"qwen2_5_vl.py:{variant}"))
    config.evals.qwen_vl.update(num_samples=4, batch_size=2, max_new_tokens=8, tasks=tasks)
    config.model.depth = 1  # fewer blocks to trace and compile
    config.model.vision.depth = 2
    return config


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    bundle = build(config, workdir)
    example = first_example(bundle.config.data, bundle.tokenizer)
    batch = {k: np.asarray(v)[None] for k, v in example.items() if k != "label"}
    # random parameters of the model's shapes, without compiling its init
    shapes = nn.meta.unbox(jax.eval_shape(bundle.model.init, jax.random.key(0), batch))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes["params"]
    )
    evaluators = build_evaluators(
        bundle.config.evals,
        bundle.model,
        bundle.tokenizer,
        bundle.config.data,
        bundle.mesh,
        workdir,
    )
    with jax.set_mesh(bundle.mesh):
        return evaluators["qwen_vl"](params)


@pytest.mark.parametrize(
    "variant, tasks, keys",
    [
        (
            "tiny",
            ("refer", "caption"),
            {
                "grounding_miou",
                "grounding_accuracy",
                "grounding_wrong_object",
                "grounding_miou_distractors",
                "caption_accuracy",
            },
        ),
        ("tiny_video", ("video",), {"video_accuracy"}),
    ],
)
def test_the_eval_scores_a_random_model_and_writes_its_samples(tmp_path, variant, tasks, keys):
    metrics = evaluate(tiny(variant, tasks), str(tmp_path))
    assert set(metrics) == keys and all(0.0 <= v <= 1.0 for v in metrics.values()), metrics
    assert sorted(os.listdir(tmp_path / "samples")) == ["qwen_vl_001.png", "qwen_vl_001.txt"]
    lines = (tmp_path / "samples" / "qwen_vl_001.txt").read_text().splitlines()
    assert {line.split()[0] for line in lines} == {f"[{t}]" for t in tasks}
    assert all("reference" in line and "score" in line for line in lines)
    assert Image.open(tmp_path / "samples" / "qwen_vl_001.png").size[0] > 0


def test_bad_eval_configs_are_one_line_errors(tmp_path):
    config = tiny("tiny", ("refer", "colour"))
    with pytest.raises(UserError, match=r"tasks \['colour'\] are unknown"):
        evaluate(config, str(tmp_path))
    config = tiny("tiny", ("video",))  # scenes are images: no video question
    with pytest.raises(UserError, match="supports the task 'video'"):
        evaluate(config, str(tmp_path))


# ------------------------------------------------------------------------------ chat

# the tiny HF model's (tests/qwen_reference.py) placeholder and delimiter ids
QWEN_IDS = {
    "<|image_pad|>": 100,
    "<|video_pad|>": 101,
    "<|vision_start|>": 102,
    "<|vision_end|>": 103,
    "<|object_ref_start|>": 104,
    "<|object_ref_end|>": 105,
    "<|box_start|>": 106,
    "<|box_end|>": 107,
}
WORDS = (
    *("system", "You", "are", "a", "helpful", "assistant", ".", "user"),
    *("describe", "the", "image", "what", "is", "this"),
)


def tiny_tokenizer(directory) -> None:
    """A word-level tokenizer.json of < 128 ids with the Qwen chat and vision specials at the
    tiny model's ids."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate([*specials, "[UNK]", *WORDS])}
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), 100)})
    vocab.update(QWEN_IDS)
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([*specials, *QWEN_IDS])
    tok.save(str(directory / "tokenizer.json"))
    config = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import qwen_reference as ref

    directory = tmp_path_factory.mktemp("qwen25_hf")
    ref.hf_model("qwen2_5_vl").save_pretrained(directory)
    tiny_tokenizer(directory)
    return directory


def test_chat_answers_about_an_image_of_odd_size(hf_dir, tmp_path, capsys):
    image = tmp_path / "odd.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (203, 97, 3), dtype=np.uint8)).save(image)
    argv = ["--hf", str(hf_dir), "--image", str(image), "--prompt", "describe the image ."]
    assert chat.main([*argv, "--max_new_tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and len(out.splitlines()) == 1


def test_chat_bad_input_is_one_line(hf_dir, tmp_path, capsys):
    missing = str(tmp_path / "missing.png")
    assert chat.main(["--hf", str(hf_dir), "--image", missing, "--prompt", "hi"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.png" in err[0] and "no such file" in err[0]
    (tmp_path / "junk.png").write_text("not an image")
    assert chat.main(["--hf", str(hf_dir), "--image", str(tmp_path / "junk.png"), "--prompt", "x"])
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    image = tmp_path / "ok.png"
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(image)
    assert chat.main(["--workdir", str(tmp_path), "--image", str(image), "--prompt", "x"])
    assert "config.json does not exist" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "clip"}}))
    assert chat.main(["--workdir", str(tmp_path), "--image", str(image), "--prompt", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'clip' run, not a qwen_vl one" in err[0]
