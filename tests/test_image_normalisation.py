"""Image resize rules and mean/std normalisation (data.image_resize, image_mean, image_std):
the default reproduces mmjax's [-1, 1] pipeline; CLIP's and SigLIP's rules give what torchvision
(open_clip's transform) and HF's image processors give on a real photo; an import records its
checkpoint's values in the resolved config and the data pipeline applies them.
"""

import json

import numpy as np
import pytest
from PIL import Image

from mmjax.data import data_config
from mmjax.data.image_ops import ImageSpec, image_preprocessor
from mmjax.errors import UserError

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """scikit-image's cat, uint8 [300, 451, 3]: landscape, so the resize rules differ."""
    return skimage_data.chelsea()


def old_pipeline(image: np.ndarray, size: int) -> np.ndarray:
    """mmjax before these keys: the centred square, PIL bilinear, x / 127.5 - 1."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(image[top : top + side, left : left + side])
    resized = np.asarray(square.resize((size, size), Image.Resampling.BILINEAR))
    return resized.astype(np.float32) / 127.5 - 1.0


@pytest.mark.parametrize("transpose", [False, True])
def test_default_pipeline_is_unchanged(photo, transpose):
    image = photo.transpose(1, 0, 2).copy() if transpose else photo
    want = old_pipeline(image, 24)
    got = image_preprocessor(data_config(image_size=24))(image)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)  # x * (1 / 127.5) - 1 vs x / 127.5 - 1
    # a config.json written before these keys (the ops list of the time, no resize/mean/std)
    old = {"image_size": 24, "image_ops": ("central_crop", "resize", "value_range")}
    np.testing.assert_allclose(image_preprocessor(old)(image), want, atol=1e-6)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize(
    "rule, interpolation, mean, std",
    [
        ("shortest_side_bicubic", "BICUBIC", (0.48145466, 0.4578275, 0.40821073),
         (0.26862954, 0.26130258, 0.27577711)),
        ("squash_bilinear", "BILINEAR", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ("crop_bicubic", "BICUBIC", (0.2, 0.4, 0.6), (0.3, 0.2, 0.1)),
    ],
)  # fmt: skip
def test_rules_match_torchvision_and_the_numpy_formula(
    photo, transpose, rule, interpolation, mean, std
):
    """open_clip's transforms (torchvision on PIL images): Resize + CenterCrop, or Resize to
    the square; ToTensor and Normalize. "crop" crops first with numpy (offsets rounded down:
    torchvision rounds half to even, one pixel over for this photo's odd margin of 151)."""
    T = pytest.importorskip("torchvision.transforms")
    image = photo.transpose(1, 0, 2).copy() if transpose else photo
    size = 224  # 451 * 224 / 300 -> 336: an even margin, the crop offsets agree
    mode = T.InterpolationMode[interpolation]
    geometry = rule.rpartition("_")[0]
    steps = {
        "shortest_side": [T.Resize(size, mode), T.CenterCrop(size)],
        "squash": [T.Resize((size, size), mode)],
        "crop": [T.Resize((size, size), mode)],
    }[geometry]
    if geometry == "crop":
        side = min(image.shape[:2])
        top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
        image = image[top : top + side, left : left + side]
    reference = T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
    want = reference(Image.fromarray(image)).numpy().transpose(1, 2, 0)
    cfg = data_config(image_size=size, image_resize=rule, image_mean=mean, image_std=std)
    got = image_preprocessor(cfg)(image)
    np.testing.assert_allclose(got, want, atol=1e-5)  # float32 rounding only: same PIL resize
    # value_range alone is the formula, per channel
    spec = ImageSpec(size, rule, mean, std)
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    formula = (pixels / 255.0 - np.array(mean)) / np.array(std)
    only_values = image_preprocessor({**cfg, "image_ops": ("value_range",)})
    np.testing.assert_allclose(only_values(pixels), formula, atol=1e-5)
    assert spec == ImageSpec.from_config(cfg)


HF_PROCESSORS = {  # class name: (published defaults, processor keywords)
    "CLIPImageProcessor": ("OPENAI_CLIP_PREPROCESSING", {}),
    "SiglipImageProcessor": ("HF_SIGLIP_PREPROCESSING", {}),
    "SiglipImageProcessor384": ("HF_SIGLIP_PREPROCESSING", {"size": {"height": 384, "width": 384}}),
}


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("name", sorted(HF_PROCESSORS))
def test_hf_image_processors(photo, name, transpose):
    """The processor's saved config, read as the converters read it, gives its pixel_values.

    transformers 5 has two backends: `...ImageProcessorPil` (PIL, as the 4.x processors) and
    the default torchvision one. PIL's: equal up to float32 rounding. Torchvision's uint8
    antialiased resize rounds differently from PIL's, up to 2 uint8 levels at a few pixels: we
    are as far from it as HF's own PIL backend is (the same numbers), at most 2 / (255 * std).
    """
    transformers = pytest.importorskip("transformers")
    from mmjax.convert import hf_clip, imported

    image = photo[:, :449]  # CLIP: 449 * 224 / 300 -> 335, a margin of 111: HF floors 55.5
    image = image.transpose(1, 0, 2).copy() if transpose else image.copy()
    published, kwargs = HF_PROCESSORS[name]
    cls = name.removesuffix("384")
    pil = getattr(transformers, f"{cls}Pil")(**kwargs)
    fast = getattr(transformers, cls)(**kwargs)
    config = pil.to_dict()
    settings = hf_clip.processor_preprocessing(config, getattr(imported, published), "test")
    crop = config["crop_size"] if config.get("do_center_crop") else config["size"]
    cfg = data_config(image_size=crop["height"], **settings)
    got = image_preprocessor(cfg)(image)

    def pixels(processor):
        return processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)

    np.testing.assert_allclose(got, pixels(pil), atol=1e-5)
    tv = pixels(fast)
    np.testing.assert_allclose(got - tv, pixels(pil) - tv, atol=1e-5)
    level = 1 / (255 * np.asarray(settings["image_std"]))
    assert np.all(np.abs(got - tv) <= 2 * level + 1e-5)
    assert np.mean(np.abs(got - tv)) < 2e-3


def test_processor_configs_mmjax_cannot_follow_are_refused():
    from mmjax.convert import hf_clip
    from mmjax.convert.imported import OPENAI_CLIP_PREPROCESSING

    def read(**pp):
        return hf_clip.processor_preprocessing(pp, OPENAI_CLIP_PREPROCESSING, "p.json")

    # the 4.x spelling (bare ints), no normalisation, a rescale other than 1 / 255
    assert read(size=224, crop_size=224, resample=2)["image_resize"] == "shortest_side_bilinear"
    plain = read(do_normalize=False, do_rescale=False)
    assert plain["image_mean"] == (0.0,) and plain["image_std"] == (1 / 255,)
    halved = read(rescale_factor=2 / 255, image_mean=[0.5], image_std=[1.0])
    assert halved["image_mean"] == pytest.approx((0.25,)) and halved["image_std"] == (0.5,)
    # transformers 5 writes unset keys as null: the published values
    assert read(do_center_crop=None, size=None) == OPENAI_CLIP_PREPROCESSING
    with pytest.raises(UserError, match=r"p\.json: resizing to \{'shortest_edge': 256\} then a "):
        read(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})
    with pytest.raises(UserError, match=r"p\.json: do_resize false"):
        read(do_resize=False)
    with pytest.raises(UserError, match=r"data\.image_resize 'zoom_bilinear' is not"):
        ImageSpec(8, "zoom_bilinear")
    with pytest.raises(UserError, match=r"data\.image_std must be positive"):
        ImageSpec(8, std=(0.5, 0.0, 0.5))


def test_converters_record_their_checkpoints_preprocessing():
    pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from test_convert import hf_clip, make_open_clip

    from mmjax import convert
    from mmjax.convert.imported import OPENAI_CLIP_PREPROCESSING, finish

    imported = convert.from_hf_clip(hf_clip("quick_gelu_eos"))  # no processor config: OpenAI's
    assert imported.data_settings({}) == OPENAI_CLIP_PREPROCESSING
    model = make_open_clip("quick_gelu_argmax")
    assert convert.from_open_clip(model).image_resize == "shortest_side_bicubic"
    open_clip.set_model_preprocess_cfg(
        model, {"mean": (0.5,) * 3, "std": (0.5,) * 3, "resize_mode": "squash",
                "interpolation": "bilinear"},
    )  # fmt: skip
    got = convert.from_open_clip(model)
    assert (got.image_mean, got.image_resize) == ((0.5, 0.5, 0.5), "squash_bilinear")
    model.visual.preprocess_cfg["resize_mode"] = "longest"
    with pytest.raises(UserError, match="open_clip: resize_mode 'longest'"):
        convert.from_open_clip(model)
    # finish's positional form keeps mmjax's own preprocessing; a bad rule names the source
    assert finish(imported.model, imported.params, 16, 3, "src").image_resize == "crop_bilinear"
    with pytest.raises(UserError, match=r"src: data\.image_resize 'crop' is not"):
        finish(imported.model, imported.params, 16, 3, "src", image_resize="crop")


def save_with_processor(directory, **processor):
    """A digits CLIP checkpoint (test_convert.save_digits_clip) with an HF CLIP processor."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from test_convert import save_digits_clip

    save_digits_clip(directory)
    transformers.CLIPImageProcessor(**processor).save_pretrained(directory)


def test_build_records_an_hf_clip_import_and_the_pipeline_applies_it(tmp_path):
    from test_convert import init_from_config

    from mmjax.data.pipeline import first_example
    from mmjax.data.sources import build_source
    from mmjax.train.build import build

    mean, std = (0.1, 0.2, 0.3), (0.25, 0.5, 0.75)
    save_with_processor(tmp_path, size={"shortest_edge": 8}, crop_size=8, resample=2,
                        image_mean=list(mean), image_std=list(std))  # fmt: skip
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_mean"] == list(mean)
    bundle = build(init_from_config(tmp_path))
    data = bundle.config.data
    assert (data.image_mean, data.image_std) == (mean, std)
    assert data.image_resize == "shortest_side_bilinear"
    record = build_source(data, data.split_train)[0]
    want = (record["image"] / 255.0 - np.array(mean)) / np.array(std)  # digits are 8x8 already
    np.testing.assert_allclose(first_example(data, bundle.tokenizer)["image"], want, atol=1e-5)

    # a value the run sets itself (not the mmjax default) is kept; the others are imported
    own = build(init_from_config(tmp_path, **{"data.image_resize": "squash_bicubic"}))
    assert own.config.data.image_resize == "squash_bicubic" and own.config.data.image_std == std


def test_a_config_without_an_import_keeps_the_defaults():
    from helpers import tiny_clip_config

    from mmjax.train.build import build

    data = build(tiny_clip_config()).config.data
    assert (data.image_resize, data.image_mean, data.image_std) == (
        "crop_bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    )  # fmt: skip
