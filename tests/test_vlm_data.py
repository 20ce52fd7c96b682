"""VLM data: task pairs true to their scenes, Qwen-VL boxes, the batch contract, the loss."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmjax.data import data_config, load_or_train_tokenizer, make_train_iterator
from mmjax.data.kinds import check_sequence_config, sequence_example
from mmjax.data.sequences import SEQUENCE_DEFAULTS, vlm_layout
from mmjax.data.sources import DIGIT_NAMES, DigitsSource, ShapesSource
from mmjax.data.tokenizer import ByteTokenizer, WithImageMarkers, WithVlmTokens
from mmjax.data.vlm_tasks import (
    BOX_BINS,
    SPECIAL_TOKENS,
    TASK_IDENTIFIERS,
    TASKS,
    box_iou,
    box_text,
    parse_boxes,
    sample_pair,
    task_pairs,
)
from mmjax.errors import UserError
from mmjax.objectives import build_loss

SHAPES = ShapesSource("train", 400)
TOK = WithVlmTokens(ByteTokenizer())
NUMBER_WORDS = {w: i for i, w in enumerate(DIGIT_NAMES)}


def vlm_seq(**overrides) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {**SEQUENCE_DEFAULTS, "kind": "vlm", "visual_tokens": 4, "max_len": 160, **overrides}
    )


# ------------------------------------------------------------- the scene, checked separately


def left_of(a, b) -> bool:
    """Every pixel column of box a lies before every column of box b (ends exclusive)."""
    return max(range(a[0], a[2])) < min(range(b[0], b[2]))


def holds(relation: str, a, b) -> bool:
    flip = lambda box: (box[1], box[0], box[3], box[2])  # noqa: E731  transpose x and y
    return {
        "left of": lambda: left_of(a, b),
        "right of": lambda: left_of(b, a),
        "above": lambda: left_of(flip(a), flip(b)),
        "below": lambda: left_of(flip(b), flip(a)),
    }[relation]()


def the_one(objects, **attrs):
    """The only object with `attrs`; fails the test when the phrase would be ambiguous."""
    hits = [o for o in objects if all(o[k] == v for k, v in attrs.items())]
    assert len(hits) == 1, f"{attrs} names {len(hits)} objects in {objects}"
    return hits[0]


def answer_of(question: str, objects) -> str:
    """The answer the scene gives, from the question's words and the shapes metadata."""
    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        return the_one(objects, shape=m[1])["colour"]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        return the_one(objects, colour=m[1])["shape"]
    if question == "how many shapes are there?":
        return DIGIT_NAMES[len(objects)]
    if m := re.fullmatch(r"what is (left of|right of|above|below) the (\w+) (\w+)\?", question):
        anchor = the_one(objects, colour=m[2], shape=m[3])
        hits = [o for o in objects if o is not anchor and holds(m[1], o["bbox"], anchor["bbox"])]
        assert len(hits) == 1, f"{question!r} has {len(hits)} answers in {objects}"
        return f"a {hits[0]['colour']} {hits[0]['shape']}"
    raise AssertionError(f"unexpected question {question!r}")


def test_every_vqa_answer_is_what_the_scene_says_and_each_question_has_one_answer():
    kinds, relation_from_caption = set(), 0
    for record in SHAPES:
        pairs = task_pairs(record, "vqa", "shapes")
        questions = [p.instruction for p in pairs]
        assert len(set(questions)) == len(questions)
        for pair in pairs:
            assert pair.answer == answer_of(pair.instruction, record["shapes"])
            kinds.add(pair.kind)
        # the caption's relation "A rel B" is asked as "what is rel the B?" -> A
        if m := re.fullmatch(
            r"a (\w+ \w+) (left of|right of|above|below) a (\w+ \w+)", record["caption"]
        ):
            q = f"what is {m[2]} the {m[3]}?"
            assert dict(zip(questions, [p.answer for p in pairs], strict=True))[q] == f"a {m[1]}"
            relation_from_caption += 1
    assert kinds == {"colour", "shape", "count", "relation"}
    assert relation_from_caption > len(SHAPES) // 2
    for record in DigitsSource("test"):
        (pair,) = task_pairs(record, "vqa", "digits")
        assert (pair.instruction, pair.answer) == (
            "what digit is this?",
            DIGIT_NAMES[record["label"]],
        )


def within_a_step(box, bbox, size: int) -> bool:
    """Each corner at most one bin (size / 1000 pixels) from the true one, up to rounding."""
    return all(abs(a - b) <= size / BOX_BINS + 1e-9 for a, b in zip(box, bbox, strict=True))


def test_boxes_and_phrases_of_the_grounding_tasks_name_the_right_objects():
    size = SHAPES[0]["image"].shape[0]
    for record in SHAPES:
        objects = record["shapes"]
        for pair in task_pairs(record, "refer", "shapes"):
            words = re.fullmatch(r"find <ref>the ([\w ]+)</ref>", pair.instruction)[1].split()
            if len(words) == 1:  # "the circle"
                target = the_one(objects, shape=words[0])
            elif words[1] == "shape":  # "the red shape"
                target = the_one(objects, colour=words[0])
            else:  # "the red circle"
                target = the_one(objects, colour=words[0], shape=words[1])
            (found,) = parse_boxes(pair.answer, size, size)
            assert found.ref is None and within_a_step(found.box, target["bbox"], size)
        for pair in task_pairs(record, "identify", "shapes"):
            (found,) = parse_boxes(pair.instruction, size, size)
            colour, shape = re.fullmatch(r"a (\w+) (\w+)", pair.answer).groups()
            assert within_a_step(
                found.box, the_one(objects, colour=colour, shape=shape)["bbox"], size
            )
        (grounded,) = task_pairs(record, "grounding", "shapes")
        found = parse_boxes(grounded.answer, size, size)
        assert len(found) == len(objects)
        for item, obj in zip(found, objects, strict=True):
            assert item.ref == f"a {obj['colour']} {obj['shape']}"
            assert within_a_step(item.box, obj["bbox"], size)
        plain = re.sub(r"</?ref>|<box>[^<]*</box>", "", grounded.answer)
        assert plain == record["caption"]


def test_digits_support_only_captions_and_questions():
    record = DigitsSource("train")[0]
    assert [t for t in TASKS if task_pairs(record, t, "digits")] == ["caption", "vqa"]
    with pytest.raises(UserError, match=r"supports none of the tasks \['grounding', 'refer'\]"):
        sample_pair(record, "digits", {"refer": 1.0, "grounding": 2.0}, np.random.default_rng(0))


def test_tasks_are_drawn_by_their_weights():
    weights = {"caption": 3.0, "vqa": 1.0, "refer": 0.0, "grounding": 0.0, "identify": 0.0}
    rng = np.random.default_rng(0)
    draws = [sample_pair(SHAPES[i % 50], "shapes", weights, rng).task for i in range(4000)]
    assert set(draws) == {"caption", "vqa"}
    assert abs(draws.count("caption") / len(draws) - 0.75) < 0.03


# ------------------------------------------------------------------------- boxes and IoU


@settings(max_examples=200, deadline=None)
@given(
    width=st.integers(1, 4096),
    height=st.integers(1, 4096),
    fractions=st.lists(st.floats(0, 1), min_size=4, max_size=4),
)
def test_box_text_round_trips_to_pixels_within_one_normalisation_step(width, height, fractions):
    xs = sorted(round(f * width) for f in fractions[:2])
    ys = sorted(round(f * height) for f in fractions[2:])
    bbox = (xs[0], ys[0], xs[1], ys[1])
    text = box_text(bbox, width, height)
    bins = [int(v) for v in re.findall(r"\d+", text)]
    assert all(0 <= b < BOX_BINS for b in bins)
    (found,) = parse_boxes(f"<ref>a red circle</ref> {text}", width, height)
    assert found.ref == "a red circle"
    for got, want, size in zip(found.box, bbox, (width, height) * 2, strict=True):
        assert abs(got - want) <= size / BOX_BINS + 1e-9


boxes = st.tuples(
    st.floats(-100, 100), st.floats(-100, 100), st.floats(0.01, 100), st.floats(0.01, 100)
).map(lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3]))


@settings(max_examples=200, deadline=None)
@given(a=boxes, b=boxes, gap=st.floats(0, 50), vertical=st.booleans())
def test_iou_is_one_for_identical_boxes_and_zero_for_disjoint_ones(a, b, gap, vertical):
    assert box_iou(a, a) == 1.0
    axis = 1 if vertical else 0
    moved = list(b)  # b moved to start `gap` past a's end along the axis
    moved[axis] = a[axis + 2] + gap
    moved[axis + 2] = moved[axis] + (b[axis + 2] - b[axis])
    assert box_iou(a, moved) == 0.0 == box_iou(moved, a)
    assert 0.0 <= box_iou(a, b) <= 1.0


def test_iou_of_half_overlapping_squares_is_a_third():
    assert box_iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------- tokenizer


def test_specials_are_single_ids_after_the_base_vocabulary():
    base = ByteTokenizer()
    assert TOK.vocab_size == base.vocab_size + len(SPECIAL_TOKENS)
    text = "[refer] find <ref>the red circle</ref><box>(12,500),(31,999)</box>"
    ids = TOK.encode(text)
    for token in ("[refer]", "<ref>", "</ref>", "<box>", "</box>"):
        assert ids.count(TOK.special_ids[token]) == 1
        assert TOK.special_ids[token] >= base.vocab_size
    assert TOK.encode("find the red circle") == base.encode("find the red circle")
    assert TOK.decode([*ids, TOK.eos_id, *TOK.encode("<image>")]) == text
    assert TOK.image_id == TOK.special_ids["<image>"]
    # Transfusion's markers keep their ids: right after the base vocabulary
    markers = WithImageMarkers(base)
    assert (markers.boi_id, markers.eoi_id) == (base.vocab_size, base.vocab_size + 1)


def tiny_data(tmp_dir=None, **sequence) -> ml_collections.ConfigDict:
    return data_config(
        source="shapes",
        image_size=32,
        shapes_num_train=300,
        prefetch=0,
        vocab_size=256,
        sequence={"kind": "vlm", "visual_tokens": 4, "max_len": 80, **sequence},
    )


def test_the_vlm_sentencepiece_model_spells_numbers_digit_by_digit():
    cfg = tiny_data()
    tok = load_or_train_tokenizer(cfg, None, write=False)
    assert isinstance(tok, WithVlmTokens)
    ids = tok.encode("<box>(123,908),(45,6)</box>")
    pieces = [tok.base._sp.id_to_piece(i) for i in ids[1:-1]]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("123908456")
    assert tok.decode(ids).replace(" ", "") == "<box>(123,908),(45,6)</box>"
    assert tok.base.vocab_size <= cfg.vocab_size


# --------------------------------------------------------------------------- the layout


@settings(max_examples=100, deadline=None)
@given(
    prompt=st.lists(st.integers(3, 258), min_size=1, max_size=20),
    answer=st.lists(st.integers(3, 258), max_size=20),
    mode=st.sampled_from(["prefix", "flamingo"]),
    visual_tokens=st.integers(1, 8),
)
def test_the_layout_follows_the_batch_contract(prompt, answer, mode, visual_tokens):
    seq = vlm_seq(mode=mode, visual_tokens=visual_tokens, max_len=64)
    answer = [*answer, TOK.eos_id]
    out = vlm_layout(prompt, answer, TOK, seq)
    slots = visual_tokens if mode == "prefix" else 1
    n = slots + len(prompt) + len(answer)
    ids = [TOK.image_id] * slots + prompt + answer
    np.testing.assert_array_equal(out["tokens"], ids + [TOK.pad_id] * (64 - n))
    np.testing.assert_array_equal(out["targets"][: n - 1], ids[1:])
    assert (out["targets"][n - 1 :] == TOK.pad_id).all()
    # loss only on the answer and its <eos>: exactly the slots whose target is an answer token
    scored = np.flatnonzero(out["loss_mask"])
    np.testing.assert_array_equal(scored, np.arange(n - 1 - len(answer), n - 1))
    np.testing.assert_array_equal(out["targets"][scored], answer)
    np.testing.assert_array_equal(out["segment_ids"], np.arange(64) < n)
    np.testing.assert_array_equal(out["positions"], np.arange(64))
    if mode == "prefix":
        np.testing.assert_array_equal(out["visual_positions"], np.arange(visual_tokens))
        assert (out["tokens"][out["visual_positions"]] == TOK.image_id).all()
        assert "media_ids" not in out
    else:  # one image, read by every real token from its marker on
        np.testing.assert_array_equal(out["media_ids"], np.arange(64) < n)
        assert "visual_positions" not in out
    assert all(v.dtype == (np.float32 if k == "loss_mask" else np.int32) for k, v in out.items())


def test_two_images_give_each_token_the_latest_one():
    seq = vlm_seq(mode="flamingo", max_len=12)
    prompt = [5, 6, TOK.image_id, 7]  # a second <image> inside the instruction
    out = vlm_layout(prompt, [8, TOK.eos_id], TOK, seq)
    np.testing.assert_array_equal(out["media_ids"], [1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0, 0])


def test_task_identifiers_lead_the_instruction_only_when_switched_on():
    image = np.zeros((32, 32, 3), np.float32)
    identifier_ids = {TOK.special_ids[t]: task for task, t in TASK_IDENTIFIERS.items()}
    for on in (True, False):
        seq = vlm_seq(task_identifiers=on)
        rng = np.random.default_rng(0)
        for i in range(40):
            record = {**SHAPES[i], "source": "shapes"}
            row = sequence_example(image, [], TOK, seq, rng, record)
            first = int(row["tokens"][seq.visual_tokens])
            assert (first in identifier_ids) == on
            assert sum(int(t) in identifier_ids for t in row["tokens"]) == int(on)


def test_examples_are_deterministic_for_a_record_and_generator():
    seq, image = vlm_seq(), np.zeros((32, 32, 3), np.float32)
    record = {**SHAPES[7], "source": "shapes"}
    rows = [
        sequence_example(image, [], TOK, seq, np.random.default_rng(seed), record)
        for seed in (3, 3, 4, 5, 6)
    ]
    np.testing.assert_array_equal(rows[0]["tokens"], rows[1]["tokens"])
    assert any((r["tokens"] != rows[0]["tokens"]).any() for r in rows[2:])


# ---------------------------------------------------------------------------- pipeline


def test_the_pipeline_builds_contract_batches_from_a_config():
    cfg = tiny_data(mode="prefix", task_identifiers=True)
    tok = load_or_train_tokenizer(cfg, None, write=False)
    batch = next(make_train_iterator(cfg, tok, global_batch_size=16, seed=0))
    b, length = 16, cfg.sequence.max_len
    assert batch["images"].shape == (b, 32, 32, 3) and batch["images"].dtype == np.float32
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    for key in ("tokens", "targets", "segment_ids", "positions"):
        assert batch[key].shape == (b, length) and batch[key].dtype == np.int32
    assert batch["loss_mask"].shape == (b, length) and batch["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(batch["visual_positions"], np.tile(np.arange(4), (b, 1)))
    # every row is one of its source's task pairs: prompt, answer (scored), <eos>
    source = ShapesSource("train", 300)
    known = {
        (p.prompt(True), p.answer)
        for r in source
        for t in TASKS
        for p in task_pairs(r, t, "shapes")
    }
    squash = lambda s: s.replace(" ", "")  # noqa: E731  sentencepiece decodes runs apart
    known = {(squash(p), squash(a)) for p, a in known}
    for row in range(b):
        mask = batch["loss_mask"][row] > 0
        scored = batch["targets"][row][mask]
        assert scored[-1] == tok.eos_id and (scored[:-1] != tok.eos_id).all()
        tokens = batch["tokens"][row][4 : np.flatnonzero(mask)[0] + 1]
        assert (squash(tok.decode(tokens)), squash(tok.decode(scored))) in known
    again = next(make_train_iterator(cfg, tok, global_batch_size=16, seed=0))
    np.testing.assert_array_equal(again["tokens"], batch["tokens"])


def test_the_pipeline_gives_flamingo_batches_one_media_per_row():
    cfg = data_config(
        source="digits",
        tokenizer="byte",
        prefetch=0,
        sequence=dict(kind="vlm", mode="flamingo", max_len=72, channels=1),
    )
    tok = load_or_train_tokenizer(cfg, None, write=False)
    batch = next(make_train_iterator(cfg, tok, global_batch_size=8, seed=1))
    assert batch["images"].shape == (8, 1, 8, 8, 1)
    assert "visual_positions" not in batch
    np.testing.assert_array_equal(batch["media_ids"], batch["segment_ids"])
    assert (batch["tokens"][:, 0] == tok.image_id).all()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"mode": "cross"}, r"data.sequence.mode 'cross' is not one of \('prefix', 'flamingo'\)"),
        ({"visual_tokens": 0}, "data.sequence.visual_tokens must be an integer >= 1, got 0"),
        ({"task_identifiers": "yes"}, "data.sequence.task_identifiers must be True or False"),
        ({"tasks": {"ocr": 1.0}}, r"unknown tasks \['ocr'\] in data.sequence.tasks"),
        ({"tasks": {"vqa": -1.0}}, "data.sequence.tasks.vqa must be finite and >= 0, got -1.0"),
        ({"tasks": {"vqa": 0.0}}, "gives no task a positive weight"),
        ({"max_len": 5}, "max_len 5 cannot hold 4 image slot"),
    ],
)
def test_bad_vlm_config_values_are_named(override, message):
    with pytest.raises(UserError, match=message):
        check_sequence_config(vlm_seq(**override), 32)


def test_unknown_sequence_keys_and_augmentation_are_rejected():
    with pytest.raises(ValueError, match=r"unknown data.sequence keys \['visual_token'\]"):
        data_config(sequence=dict(kind="vlm", visual_token=4))
    cfg = tiny_data(max_len=160)  # fits the byte tokenizer's longest pair
    cfg.augment = ("random_shift",)
    with pytest.raises(UserError, match=r"data.augment .* moves pixels away from the boxes"):
        make_train_iterator(cfg, TOK, global_batch_size=2, seed=0)


def test_a_pair_longer_than_max_len_is_one_clear_error():
    cfg = tiny_data(max_len=40)
    with pytest.raises(
        UserError, match=r"max_len 40 is too short for the longest task pair, \d+ tokens"
    ):
        make_train_iterator(cfg, TOK, global_batch_size=2, seed=0)
    with pytest.raises(UserError, match=r"a vlm sequence of 43 tokens \(4 image slot\(s\), 30 "):
        vlm_layout([5] * 30, [6] * 8 + [TOK.eos_id], TOK, vlm_seq(max_len=40))


# -------------------------------------------------------------------------------- loss


def test_the_loss_is_the_masked_cross_entropy_by_hand():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = np.array([[1, 2, 3, 4, 0], [6, 5, 4, 3, 0]], np.int32)
    loss_mask = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 0]], np.float32)
    logits[1, 2, 4] = 50.0  # one confident hit among the five scored targets
    loss_fn = build_loss("vlm", lambda params, batch, rng: {"logits": params})
    batch = {"targets": jnp.asarray(targets), "loss_mask": jnp.asarray(loss_mask)}
    loss, metrics = loss_fn(jnp.asarray(logits), batch, jax.random.key(0))
    nll, hits = [], []
    for b, i in zip(*np.nonzero(loss_mask), strict=True):
        z = logits[b, i].astype(np.float64)
        nll.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[targets[b, i]])
        hits.append(z.argmax() == targets[b, i])
    assert float(loss) == pytest.approx(np.mean(nll), rel=1e-5)
    assert float(metrics["token_accuracy"]) == pytest.approx(np.mean(hits))
    assert float(metrics["loss"]) == float(loss)


def test_a_few_steps_on_pipeline_batches_lower_the_answer_loss():
    """A bigram table stands in for the model: gradients reach it through the masked loss."""
    cfg = data_config(
        source="digits",
        tokenizer="byte",
        prefetch=0,
        sequence=dict(kind="vlm", visual_tokens=4, max_len=80),
    )
    batch = next(make_train_iterator(cfg, TOK, global_batch_size=32, seed=0))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss_fn = build_loss("vlm", lambda table, b, rng: {"logits": table[b["tokens"]]})
    table = jnp.zeros((TOK.vocab_size, TOK.vocab_size))
    tx = optax.adam(0.1)
    opt_state = tx.init(table)
    grad_fn = jax.jit(jax.value_and_grad(lambda t: loss_fn(t, batch, jax.random.key(0))[0]))
    losses = []
    for _ in range(20):
        loss, grads = grad_fn(table)
        updates, opt_state = tx.update(grads, opt_state)
        table = optax.apply_updates(table, updates)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(np.log(TOK.vocab_size), rel=1e-5)
    assert losses[-1] < 0.5 * losses[0]
