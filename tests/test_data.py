"""Behaviour tests of mmjax.data: sources, tokenizers, grain pipelines, the ArrayRecord builder."""

import json
import pathlib
import re
from collections.abc import Iterator

import grain
import ml_collections
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mmjax import data
from mmjax.data import build_array_record
from mmjax.data.sources import SHAPE_COLOURS, SHAPE_RELATIONS
from mmjax.errors import UserError


def make_cfg(**overrides: object) -> ml_collections.ConfigDict:
    return data.data_config(**overrides)


@pytest.fixture(scope="module")
def sp_tokenizer() -> data.Tokenizer:
    return data.load_or_train_tokenizer(make_cfg(), None, write=False)


def take(iterator: Iterator[dict], n: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def write_png(path: pathlib.Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


# ------------------------------------------------------------------------- train pipeline


def test_train_batches_have_the_contract_shapes(sp_tokenizer):
    cfg = make_cfg()
    batch = next(data.make_train_iterator(cfg, sp_tokenizer, global_batch_size=8, seed=0))
    assert batch["image"].shape == (8, 8, 8, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["text"].shape == (8, 16) and batch["text"].dtype == np.int32
    assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
    assert (batch["text"][:, 0] == sp_tokenizer.bos_id).all()
    source = data.build_source(cfg, "train")
    for i, row in zip(batch["index"], batch["text"], strict=True):
        # training draws one of the record's captions per visit
        assert sp_tokenizer.decode(row) in source[i]["captions"]


def test_training_draws_a_caption_per_visit_and_eval_keeps_the_fixed_one(sp_tokenizer):
    cfg = make_cfg()
    train = data.make_train_iterator(cfg, sp_tokenizer, global_batch_size=64, seed=0)
    drawn: dict[int, set[str]] = {}
    for _ in range(3 * 1437 // 64):  # about three epochs
        batch = next(train)
        for i, row in zip(batch["index"], batch["text"], strict=True):
            drawn.setdefault(int(i), set()).add(sp_tokenizer.decode(row))
    assert np.mean([len(v) > 1 for v in drawn.values()]) > 0.5
    source = data.build_source(cfg, "test")
    batch = next(data.eval_batches(cfg, sp_tokenizer, "test", 8))
    assert [sp_tokenizer.decode(r) for r in batch["text"]] == [
        source[i]["caption"] for i in range(8)
    ]


def test_augment_is_seeded_and_train_only():
    cfg = make_cfg(augment=("random_shift",), tokenizer="byte", max_text_len=40)
    tok = data.ByteTokenizer()
    plain = make_cfg(tokenizer="byte", max_text_len=40)
    shifted = [
        next(data.make_train_iterator(cfg, tok, global_batch_size=16, seed=s)) for s in (0, 0)
    ]
    unshifted = next(data.make_train_iterator(plain, tok, global_batch_size=16, seed=0))
    np.testing.assert_array_equal(shifted[0]["image"], shifted[1]["image"])
    np.testing.assert_array_equal(shifted[0]["index"], unshifted["index"])
    assert not np.array_equal(shifted[0]["image"], unshifted["image"])
    evals = [next(data.eval_batches(c, tok, "test", 16))["image"] for c in (cfg, plain)]
    np.testing.assert_array_equal(evals[0], evals[1])
    with pytest.raises(UserError, match=r"unknown data\.augment"):
        next(
            data.make_train_iterator(make_cfg(augment=("spin",)), tok, global_batch_size=8, seed=0)
        )


def test_train_pipeline_is_deterministic_per_seed(sp_tokenizer):
    cfg = make_cfg()

    def batches(seed: int) -> list[dict]:
        return take(data.make_train_iterator(cfg, sp_tokenizer, global_batch_size=8, seed=seed), 3)

    first = batches(0)
    assert_batches_equal(first, batches(0))
    other = batches(1)
    assert not np.array_equal(first[0]["index"], other[0]["index"])


def test_each_epoch_is_a_new_permutation():
    cfg = make_cfg(source="shapes", shapes_num_train=16, image_size=32, tokenizer="byte")
    it = data.make_train_iterator(cfg, data.ByteTokenizer(), global_batch_size=4, seed=3)
    order = np.concatenate([b["index"] for b in take(it, 8)])
    epoch0, epoch1 = order[:16], order[16:]
    assert sorted(epoch0) == list(range(16)) and sorted(epoch1) == list(range(16))
    assert not np.array_equal(epoch0, epoch1)


def test_two_processes_split_each_global_batch(sp_tokenizer):
    cfg = make_cfg()
    full = take(data.make_train_iterator(cfg, sp_tokenizer, global_batch_size=8, seed=5), 4)
    local = [
        take(
            data.make_train_iterator(
                cfg, sp_tokenizer, global_batch_size=8, seed=5, process_index=p, process_count=2
            ),
            4,
        )
        for p in range(2)
    ]
    for step, batch in enumerate(full):
        assert local[0][step]["image"].shape[0] == 4
        assert not set(local[0][step]["index"]) & set(local[1][step]["index"])
        for key in batch:
            joined = np.concatenate([local[0][step][key], local[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key])


def test_indivisible_global_batch_is_a_user_error(sp_tokenizer):
    with pytest.raises(UserError, match="batch_size 9"):
        data.make_train_iterator(
            make_cfg(), sp_tokenizer, global_batch_size=9, seed=0, process_count=2
        )


def test_restored_iterator_continues_with_the_next_batch(sp_tokenizer):
    cfg = make_cfg()
    it = data.make_train_iterator(cfg, sp_tokenizer, global_batch_size=8, seed=0)
    take(it, 3)
    state = it.get_state()
    expected = take(it, 2)
    restored = data.make_train_iterator(cfg, sp_tokenizer, global_batch_size=8, seed=0)
    restored.set_state(state)
    assert_batches_equal(take(restored, 2), expected)


def test_iterator_round_trips_through_orbax(sp_tokenizer, tmp_path):
    import orbax.checkpoint as ocp

    cfg = make_cfg()
    it = data.make_train_iterator(cfg, sp_tokenizer, global_batch_size=8, seed=0)
    take(it, 4)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        expected = take(it, 2)
        restored = data.make_train_iterator(cfg, sp_tokenizer, global_batch_size=8, seed=0)
        manager.restore(
            4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored))
        )
    assert_batches_equal(take(restored, 2), expected)


# -------------------------------------------------------------------------- eval pipeline


def test_eval_batches_cover_the_split_once_with_padding(sp_tokenizer):
    cfg = make_cfg()
    batches = list(data.eval_batches(cfg, sp_tokenizer, "test", 64))
    assert len(batches) == 6 and all(b["image"].shape[0] == 64 for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    assert mask.dtype == np.float32 and mask.sum() == 360
    np.testing.assert_array_equal(index[mask == 1], np.arange(360))
    assert (batches[-1]["label"][mask[-64:] == 0] == -1).all()


def test_eval_batches_split_across_processes(sp_tokenizer):
    cfg = make_cfg()
    single = list(data.eval_batches(cfg, sp_tokenizer, "test", 100))
    parts = [
        list(data.eval_batches(cfg, sp_tokenizer, "test", 100, process_index=p, process_count=2))
        for p in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == len(single) == 4
    for step, batch in enumerate(single):
        joined = np.concatenate([parts[0][step]["index"], parts[1][step]["index"]])
        np.testing.assert_array_equal(joined, batch["index"])


# -------------------------------------------------------------------------------- sources


def test_digits_splits_are_disjoint_with_fixed_sizes():
    train, test = data.DigitsSource("train"), data.DigitsSource("test")
    assert (len(train), len(test)) == (1437, 360)
    train_ids, test_ids = set(train.dataset_ids()), set(test.dataset_ids())
    assert not train_ids & test_ids and len(train_ids | test_ids) == 1797
    record = test[5]
    assert record["image"].shape == (8, 8, 3) and record["image"].dtype == np.uint8
    assert record["index"] == 5 and 0 <= record["label"] <= 9
    assert data.DIGIT_NAMES[record["label"]] in record["caption"] or (
        str(record["label"]) in record["caption"]
    )


def test_shapes_records_are_deterministic():
    a, b = data.ShapesSource("train", 50), data.ShapesSource("train", 50)
    for i in (0, 17, 49):
        ra, rb = a[i], b[i]
        np.testing.assert_array_equal(ra["image"], rb["image"])
        assert (ra["caption"], ra["shapes"]) == (rb["caption"], rb["shapes"])
    test = data.ShapesSource("test", 50)
    assert [a.caption(i) for i in range(50)] != [test.caption(i) for i in range(50)]


def test_shapes_captions_match_the_drawn_attributes():
    source = data.ShapesSource("train", 200)
    pattern = re.compile(r"a (\w+) (\w+)(?: (left of|right of|above|below) a (\w+) (\w+))?")
    for i in range(200):
        record = source[i]
        match = pattern.fullmatch(record["caption"])
        assert match, record["caption"]
        objects = record["shapes"]
        words = [w for w in match.groups() if w is not None]
        named = [(words[0], words[1])] + ([(words[3], words[4])] if len(words) > 2 else [])
        assert named == [(o["colour"], o["shape"]) for o in objects]
        first = objects[0]
        assert record["label"] == data.SHAPE_CLASS_NAMES.index(
            f"{first['colour']} {first['shape']}"
        )
        for obj in objects:
            x0, y0, x1, y1 = obj["bbox"]
            centre = record["image"][(y0 + y1) // 2, (x0 + x1 - 1) // 2]
            assert tuple(centre) == SHAPE_COLOURS[obj["colour"]]
        if len(objects) == 2:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = (o["bbox"] for o in objects)
            holds = dict(
                zip(SHAPE_RELATIONS, (ax1 <= bx0, bx1 <= ax0, ay1 <= by0, by1 <= ay0), strict=True)
            )
            assert holds[match.group(3)], (record["caption"], objects)


def test_skimage_source_has_rgb_photos():
    source = data.build_source(make_cfg(source="skimage"), "test")
    assert len(source) >= 10
    for i in range(len(source)):
        record = source[i]
        assert record["image"].ndim == 3 and record["image"].shape[2] == 3
        assert record["image"].dtype == np.uint8 and record["label"] == i and record["caption"]


def test_unknown_source_and_missing_tfds_are_user_errors():
    with pytest.raises(UserError, match=r"unknown data\.source 'mnist'.*digits"):
        data.build_source(make_cfg(source="mnist"), "train")
    with pytest.raises(UserError, match="pip install tensorflow-datasets"):
        data.build_source(make_cfg(source="tfds", tfds_name="mnist"), "train")
    with pytest.raises(UserError, match="unknown split 'val'"):
        data.build_source(make_cfg(), "val")


def test_zero_shot_names_and_templates():
    assert data.class_names(make_cfg()) == data.DIGIT_NAMES
    assert data.prompt_templates(make_cfg()) == data.DIGIT_PROMPT_TEMPLATES
    assert len(data.class_names(make_cfg(source="shapes"))) == 18
    assert data.class_names(make_cfg(source="skimage")) is None
    assert data.class_names(make_cfg(source="skimage", class_names=("a", "b"))) == ["a", "b"]
    assert all("{}" in t for t in data.prompt_templates(make_cfg(source="array_record")))


# ----------------------------------------------------------------------------- tokenizers


def test_sentencepiece_round_trip(sp_tokenizer):
    assert sp_tokenizer.pad_id == 0
    for caption in ("a photo of the digit seven", "the digit 7", "a handwritten nine"):
        ids = sp_tokenizer.encode(caption)
        assert sp_tokenizer.decode(ids) == caption
        row = sp_tokenizer.tokenize([caption], 16)[0]
        assert sp_tokenizer.decode(row) == caption


def test_byte_round_trip_and_decode_stops_at_eos():
    tok = data.ByteTokenizer()
    assert tok.vocab_size == 259 and tok.pad_id == 0
    assert tok.decode(tok.encode("héllo, wörld")) == "héllo, wörld"
    ids = [tok.bos_id, *tok.encode("ab"), tok.eos_id, *tok.encode("cd"), tok.pad_id]
    assert tok.decode(ids) == "ab"


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40), max_len=st.integers(2, 24))
def test_tokenize_keeps_eos_under_truncation(sp_tokenizer, text, max_len):
    for tok in (data.ByteTokenizer(), sp_tokenizer):
        row = tok.tokenize([text], max_len)[0]
        ids = tok.encode(text)[: max_len - 2]
        expected = [tok.bos_id, *ids, tok.eos_id]
        expected += [tok.pad_id] * (max_len - len(expected))
        assert row.dtype == np.int32 and row.tolist() == expected
        assert tok.decode(row) == tok.decode(ids)


def test_tokenize_rejects_too_short_max_len():
    with pytest.raises(UserError, match="max_text_len"):
        data.ByteTokenizer().tokenize(["x"], 1)


def test_tokenizer_is_saved_once_and_reloaded(tmp_path, sp_tokenizer):
    cfg = make_cfg()
    data.load_or_train_tokenizer(cfg, str(tmp_path / "other"), write=False)
    assert not (tmp_path / "other" / "tokenizer.model").exists()
    trained = data.load_or_train_tokenizer(cfg, str(tmp_path), write=True)
    assert (tmp_path / "tokenizer.model").read_bytes() == sp_tokenizer.model_proto
    loaded = data.load_or_train_tokenizer(cfg, str(tmp_path), write=False)
    assert loaded.vocab_size == trained.vocab_size
    assert loaded.encode("a handwritten three") == trained.encode("a handwritten three")
    assert isinstance(
        data.load_or_train_tokenizer(make_cfg(tokenizer="byte"), None, write=False),
        data.ByteTokenizer,
    )


# ------------------------------------------------------------------------ ArrayRecord data


@pytest.fixture
def image_folder(tmp_path):
    """Five 6x6 PNGs and a captions JSONL (labels on some lines)."""
    rng = np.random.default_rng(0)
    images, lines = [], []
    for i in range(5):
        rgb = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        write_png(tmp_path / "images" / "sub" / f"{i}.png", rgb)
        images.append(rgb)
        line = {"image": f"sub/{i}.png", "caption": f"picture number {i} ünïcode"}
        if i % 2 == 0:
            line["label"] = i
        lines.append(json.dumps(line))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path, images


def test_build_array_record_round_trip(image_folder):
    root, images = image_folder
    out = root / "shards"
    argv = ["--images", str(root / "images"), "--captions", str(root / "captions.jsonl")]
    assert build_array_record.main([*argv, "--out", str(out), "--num_shards", "2"]) == 0
    assert len(list(out.glob("*.array_record"))) == 2
    cfg = make_cfg(source="array_record", path=str(out), image_size=6, max_text_len=40)
    tok = data.ByteTokenizer()
    batches = list(data.eval_batches(cfg, tok, "train", 2))
    mask = np.concatenate([b["mask"] for b in batches]) == 1
    texts = np.concatenate([b["text"] for b in batches])[mask]
    assert [tok.decode(t) for t in texts] == [f"picture number {i} ünïcode" for i in range(5)]
    labels = np.concatenate([b["label"] for b in batches])[mask]
    np.testing.assert_array_equal(labels, [0, -1, 2, -1, 4])
    got = np.concatenate([b["image"] for b in batches])[mask]
    np.testing.assert_allclose(got, np.stack(images) / 127.5 - 1.0, atol=1e-6)


def test_cli_rejects_missing_images_dir(tmp_path, capsys):
    (tmp_path / "c.jsonl").write_text("")
    argv = ["--images", str(tmp_path / "nope"), "--captions", str(tmp_path / "c.jsonl")]
    assert build_array_record.main([*argv, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "nope") in err[0]
    assert not (tmp_path / "out").exists()


def test_cli_rejects_a_corrupt_image_and_writes_nothing(image_folder, capsys):
    root, _ = image_folder
    (root / "images" / "sub" / "3.png").write_bytes(b"not a png at all")
    out = root / "shards"
    argv = ["--images", str(root / "images"), "--captions", str(root / "captions.jsonl")]
    assert build_array_record.main([*argv, "--out", str(out)]) == 1
    assert "3.png" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists() and not list(root.glob(".shards-*"))


def test_corrupt_image_in_a_shard_is_a_user_error_naming_it(tmp_path, sp_tokenizer):
    png = tmp_path / "ok.png"
    write_png(png, np.zeros((8, 8, 3), np.uint8))
    shard = tmp_path / "data" / "bad.array_record"
    shard.parent.mkdir()
    writer = ArrayRecordWriter(str(shard), "group_size:1")
    for i in range(4):
        image = b"\x89PNG garbage" if i == 2 else png.read_bytes()
        writer.write(data.pack_record(image, f"caption {i}", -1, f"{i}.png"))
    writer.close()
    cfg = make_cfg(source="array_record", path=str(shard.parent), tokenizer="byte")
    expected = re.escape(f"record 2 of shard '{shard}'")
    with pytest.raises(UserError, match=expected):
        list(data.eval_batches(cfg, data.ByteTokenizer(), "test", 2))
    with pytest.raises(UserError, match=expected):
        take(data.make_train_iterator(cfg, data.ByteTokenizer(), global_batch_size=4, seed=0), 1)


def test_missing_data_path_is_a_user_error(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(UserError, match=re.escape(f"data.path '{missing}' does not exist")):
        data.build_source(make_cfg(source="array_record", path=missing), "train")
