"""Weight import: small randomly initialised HF CLIP, HF SigLIP and open_clip models, converted
to mmjax, give the same embeddings (1e-4, f32) and logits; wrong inputs fail with one clear line.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import convert
from mmjax.errors import UserError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

VOCAB, CONTEXT, EOS, BOS = 99, 12, 98, 97


def tokens(pad_id: int, eos_at: tuple[int, ...]) -> torch.Tensor:
    """[BOS] words [EOS] pads..., one row per end-of-text position."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, BOS, (len(eos_at), CONTEXT), generator=g)
    ids[:, 0] = BOS
    for row, at in enumerate(eos_at):
        ids[row, at] = EOS
        ids[row, at + 1 :] = pad_id
    return ids


def images(imported: convert.Imported) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, imported.channels, *imported.image_size, generator=g)


def pooled(out):
    """transformers 5 returns model outputs from get_*_features; 4.x returned tensors."""
    return getattr(out, "pooler_output", out)


def assert_parity(imported: convert.Imported, reference, ids: torch.Tensor) -> None:
    """Embeddings within 1e-4 of the reference's and the logit matrix too."""
    pixels = images(imported)
    module = imported.module()
    variables = {"params": imported.params}
    batch = {
        "image": jnp.asarray(pixels.permute(0, 2, 3, 1).numpy()),
        "text": jnp.asarray(ids.numpy()),
    }
    out = jax.jit(module.apply)(variables, batch)
    with torch.no_grad():
        ref_image, ref_text, ref_logits = reference(pixels, ids)
    normalize = torch.nn.functional.normalize
    np.testing.assert_allclose(out["image_emb"], normalize(ref_image, dim=-1), atol=1e-4)
    np.testing.assert_allclose(out["text_emb"], normalize(ref_text, dim=-1), atol=1e-4)
    logits = out["logit_scale"] * out["image_emb"] @ out["text_emb"].T + out.get("logit_bias", 0)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-3, rtol=1e-4)


def hf_reference(model):
    def run(pixels, ids):
        out = model(pixel_values=pixels, input_ids=ids)
        image = pooled(model.get_image_features(pixel_values=pixels))
        text = pooled(model.get_text_features(input_ids=ids))
        return image, text, out.logits_per_image

    return run


HF_CLIP_CONFIGS = {
    # OpenAI-style: QuickGELU, padding with the end-of-text id, first-eos pooling
    "quick_gelu_eos": dict(
        text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, hidden_act="quick_gelu", eos_token_id=EOS,
                  pad_token_id=EOS, bos_token_id=BOS),
        vision=dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                    intermediate_size=50, image_size=16, patch_size=4, hidden_act="quick_gelu"),
        projection_dim=24,
    ),
    # legacy eos_token_id 2 (argmax pooling), exact GELU, grey 24x24 images with patch 6
    "gelu_argmax_grey": dict(
        text=dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                  intermediate_size=64, hidden_act="gelu", eos_token_id=2, pad_token_id=1,
                  bos_token_id=0),
        vision=dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=2,
                    intermediate_size=30, image_size=24, patch_size=6, num_channels=1,
                    hidden_act="gelu"),
        projection_dim=16,
    ),
}  # fmt: skip


def hf_clip(name: str) -> "transformers.CLIPModel":
    c = HF_CLIP_CONFIGS[name]
    text = dict(vocab_size=VOCAB, max_position_embeddings=CONTEXT, **c["text"])
    config = transformers.CLIPConfig(
        text_config=text, vision_config=c["vision"], projection_dim=c["projection_dim"]
    )
    torch.manual_seed(0)
    return transformers.CLIPModel(config).eval()


@pytest.mark.parametrize("name", sorted(HF_CLIP_CONFIGS))
def test_hf_clip_parity(name):
    model = hf_clip(name)
    imported = convert.from_hf_clip(model)
    # first-eos pooling: pads repeat the eos id; argmax pooling: EOS is the largest id
    ids = tokens(model.config.text_config.pad_token_id, eos_at=(4, CONTEXT - 1, 7))
    assert_parity(imported, hf_reference(model), ids)


def test_hf_clip_imports_from_a_local_directory(tmp_path):
    model = hf_clip("quick_gelu_eos")
    model.save_pretrained(tmp_path)
    imported = convert.from_hf_clip(str(tmp_path))
    assert_parity(imported, hf_reference(model), tokens(EOS, eos_at=(3, 5, 11)))


HF_SIGLIP_CONFIGS = {
    "base_like": dict(
        text=dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, projection_size=40),
        vision=dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                    intermediate_size=50, image_size=16, patch_size=4),
    ),
    "narrow_text_deep_vision": dict(
        text=dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=30, projection_size=32, layer_norm_eps=1e-5),
        vision=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                    intermediate_size=48, image_size=20, patch_size=5),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HF_SIGLIP_CONFIGS))
def test_hf_siglip_parity(name):
    c = HF_SIGLIP_CONFIGS[name]
    text = dict(vocab_size=VOCAB, max_position_embeddings=CONTEXT, **c["text"])
    config = transformers.SiglipConfig(text_config=text, vision_config=c["vision"])
    torch.manual_seed(0)
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():  # random init leaves the bias at 0: a non-trivial value tests it
        model.logit_bias.fill_(-3.5)
    imported = convert.from_hf_siglip(model)
    assert imported.model["image"]["pool"] == "map"
    assert_parity(imported, hf_reference(model), tokens(0, eos_at=(4, CONTEXT - 1, 7)))


OPEN_CLIP_CONFIGS = {
    "quick_gelu_argmax": dict(
        embed_dim=24,
        vision_cfg=dict(layers=2, width=32, head_width=8, patch_size=4, image_size=16),
        text_cfg=dict(width=32, heads=4, layers=2),
        quick_gelu=True,
    ),
    "gelu_eos_no_ln_pre": dict(
        embed_dim=16,
        vision_cfg=dict(layers=1, width=48, head_width=16, patch_size=8, image_size=32,
                        mlp_ratio=2.0, no_ln_pre=True),
        text_cfg=dict(width=24, heads=2, layers=3, pool_type="eos", eos_id=EOS),
    ),
}  # fmt: skip


def make_open_clip(name: str, **text_extra) -> "open_clip.CLIP":
    c = OPEN_CLIP_CONFIGS[name]
    text = dict(context_length=CONTEXT, vocab_size=VOCAB, **c["text_cfg"], **text_extra)
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=c["embed_dim"],
        vision_cfg=open_clip.CLIPVisionCfg(**c["vision_cfg"]),
        text_cfg=open_clip.CLIPTextCfg(**text),
        quick_gelu=c.get("quick_gelu", False),
    ).eval()


@pytest.mark.parametrize("name", sorted(OPEN_CLIP_CONFIGS))
def test_open_clip_parity(name):
    model = make_open_clip(name)
    imported = convert.from_open_clip(model)

    def reference(pixels, ids):
        logits, _ = model.get_logits(pixels, ids)
        return model.encode_image(pixels), model.encode_text(ids), logits

    assert_parity(imported, reference, tokens(0, eos_at=(4, CONTEXT - 1, 7)))


def test_converter_given_the_wrong_architecture_names_both():
    siglip = transformers.SiglipModel(
        transformers.SiglipConfig(
            text_config=dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=16, projection_size=16),
            vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16, image_size=8, patch_size=4),
        )
    )  # fmt: skip
    with pytest.raises(UserError, match="expected a 'clip' checkpoint but got a 'siglip'"):
        convert.from_hf_clip(siglip)
    with pytest.raises(UserError, match="expected a 'siglip' checkpoint but got a 'clip'"):
        convert.from_hf_siglip(hf_clip("quick_gelu_eos"))
    with pytest.raises(UserError, match=r"expected an open_clip\.CLIP, got SiglipModel"):
        convert.from_open_clip(siglip)


def test_open_clip_features_mmjax_lacks_are_refused_by_name():
    model = make_open_clip("quick_gelu_argmax")
    model.visual.pool_type = "avg"
    with pytest.raises(UserError, match="image pool_type 'avg'"):
        convert.from_open_clip(model)


def test_a_missing_or_misshapen_tensor_is_named():
    model = hf_clip("quick_gelu_eos")
    state = model.state_dict()
    del state["text_model.final_layer_norm.bias"]
    model.state_dict = lambda: state
    with pytest.raises(UserError, match=r"no 'text_model.final_layer_norm.bias'"):
        convert.from_hf_clip(model)
    state["text_model.final_layer_norm.bias"] = torch.zeros(31)
    with pytest.raises(UserError, match=r"norm_final/LayerNorm_0/bias has shape \(31,\)"):
        convert.from_hf_clip(model)


def test_tokenizer_vocab_mismatch_is_an_error():
    imported = convert.from_hf_clip(hf_clip("quick_gelu_eos"))
    convert.check_vocab(imported, VOCAB, "clip-bpe")
    with pytest.raises(UserError, match=f"has 259 ids but the imported text embedding has {VOCAB}"):
        convert.check_vocab(imported, 259, "ByteTokenizer()")


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((2, 16, 16, 3), np.uint8), "must be floating point.*got uint8"),
        (np.zeros((2, 32, 32, 3), np.float32), "give 65 tokens.*built for 17 tokens"),
        (np.zeros((2, 16, 16, 1), np.float32), "images have 1 channels.*built for 3"),
        (np.zeros((16, 16, 3), np.float32), r"must be \[batch, height, width, channels\]"),
    ],
)
def test_imported_model_rejects_a_wrong_image_batch(image, message):
    imported = convert.from_hf_clip(hf_clip("quick_gelu_eos"))
    module = imported.module()
    with pytest.raises(ValueError, match=message):
        module.apply({"params": imported.params}, jnp.asarray(image), method=module.encode_image)


def test_text_of_the_wrong_dtype_is_named():
    imported = convert.from_hf_clip(hf_clip("quick_gelu_eos"))
    module = imported.module()
    with pytest.raises(ValueError, match="text must be integer token ids"):
        module.apply(
            {"params": imported.params}, jnp.zeros((2, CONTEXT)), method=module.encode_text
        )


def save_digits_clip(directory, layers: int = 1) -> "transformers.CLIPModel":
    """A random HF CLIP for 8x8 digits with a word-level HF tokenizer of the digit captions,
    saved as a checkpoint directory would be (weights + tokenizer); `layers` per tower."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from mmjax.data import data_config
    from mmjax.data.pipeline import class_names, prompt_templates
    from mmjax.data.sources import build_source, sample_captions

    cfg = data_config(source="digits")
    texts = [*sample_captions(build_source(cfg, "train"), 2000), *prompt_templates(cfg)]
    texts += class_names(cfg)
    words = sorted({w for t in texts for w in t.replace("{}", " ").split()} | set("0123456789"))
    vocab = {"[PAD]": 0, "[UNK]": 1, "<s>": 2, "</s>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="[PAD]",
        unk_token="[UNK]",
    )  # fmt: skip
    fast.save_pretrained(directory)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(fast), max_position_embeddings=16, hidden_size=32,
                         num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                         eos_token_id=3, pad_token_id=0, bos_token_id=2),
        vision_config=dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=64, image_size=8, patch_size=2),
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(directory)
    return model


def init_from_config(directory, **overrides):
    from helpers import tiny_clip_config

    return tiny_clip_config(
        **{
            "init_from.format": "hf_clip",
            "init_from.path": str(directory),
            "data.tokenizer": "hf",
            "data.tokenizer_path": str(directory),
            "data.max_text_len": 16,
            "total_steps": 0,
            **overrides,
        }
    )


def test_training_starts_from_imported_weights_and_evaluates_with_their_tokenizer(tmp_path):
    import flax

    from mmjax.train.loop import Trainer, TrainingRun

    save_digits_clip(tmp_path / "ckpt")
    trainer = Trainer(init_from_config(tmp_path / "ckpt"), str(tmp_path / "run"))
    with TrainingRun(trainer, str(tmp_path / "run")) as run:
        final = run.train()
        got = flax.traverse_util.flatten_dict(run.state.params, sep="/")
    want = flax.traverse_util.flatten_dict(trainer.bundle.imported.params, sep="/")
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)
    assert 0.0 <= final["zero_shot_accuracy"] <= 1.0
    assert trainer.config.model.text.pool == "eos"


def test_imported_weights_fill_scanned_towers_with_the_same_outputs(tmp_path):
    """The converters write towers unscanned (block0..); a run that scans its towers gets
    them stacked (mmjax.parallel.layout) and computes what the unscanned import computes."""
    from mmjax.train.config_cli import apply_overrides
    from mmjax.train.loop import Trainer

    save_digits_clip(tmp_path / "ckpt", layers=3)
    plain = Trainer(init_from_config(tmp_path / "ckpt"), str(tmp_path / "a"))
    config = init_from_config(tmp_path / "ckpt")
    # how the towers run is kept over the import's architecture
    apply_overrides(config, ["model.image.scan_layers=true", "model.text.scan_layers=true"])
    scanned = Trainer(config, str(tmp_path / "b"))
    assert scanned.config.model.image.scan_layers and scanned.config.model.image.depth == 3
    batch = next(plain.data_iterator())
    outputs = []
    for trainer in (plain, scanned):
        state, shardings = trainer.init_state(batch)
        params = trainer.bundle.imported_params(batch, state.params, shardings.params)
        outputs.append(trainer.model.apply({"params": params}, batch))
        encoder = params["image_tower"]["encoder"]
    assert (
        set(encoder) == {"layers", "last"}
        and encoder["layers"]["mlp"]["fc1"]["kernel"].shape[0] == 2
    )
    for a, b in zip(*map(jax.tree.leaves, outputs), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_import_with_a_mismatched_tokenizer_or_image_size_fails_clearly(tmp_path):
    from mmjax.train.loop import Trainer, TrainingRun

    save_digits_clip(tmp_path / "ckpt")
    byte = init_from_config(tmp_path / "ckpt", **{"data.tokenizer": "byte"})
    with pytest.raises(UserError, match=r"ByteTokenizer\(\) has 259 ids but the imported text"):
        Trainer(byte, str(tmp_path / "a"))
    long = init_from_config(tmp_path / "ckpt", **{"data.max_text_len": 40})
    with pytest.raises(UserError, match="max_text_len 40 exceeds the imported text context of 16"):
        Trainer(long, str(tmp_path / "a"))
    big = init_from_config(tmp_path / "ckpt", **{"data.image_size": 16})
    trainer = Trainer(big, str(tmp_path / "b"))
    with (
        pytest.raises(
            UserError,
            match=r"gives 16x16x3 images but .* trained on 8x8x3",
        ),
        TrainingRun(trainer, str(tmp_path / "b")) as run,
    ):
        run.train()
