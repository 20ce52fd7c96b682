"""Tiny randomly initialised transformers Qwen2-VL / Qwen2.5-VL models and rows for them, the
reference the Qwen-VL tests compare mmjax with."""

import numpy as np

from mmjax.data.native_resolution import PlaceholderIds, VisionGeometry, Visual, build_row

IMAGE, VIDEO, START, END = 100, 101, 102, 103
PLACEHOLDERS = PlaceholderIds(IMAGE, VIDEO)
TEXT = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=1e4),
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
TOKENS = dict(
    image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END
)


def hf_model(kind: str, seed: int = 0):
    """A tiny f32 Qwen2VLForConditionalGeneration ("qwen2_vl") or Qwen2.5-VL one."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2)
        config = tf.Qwen2VLConfig(text_config=TEXT, vision_config=vision, **TOKENS)
        model = tf.Qwen2VLForConditionalGeneration(config)
    else:
        vision = dict(
            depth=4,
            hidden_size=32,
            intermediate_size=48,
            num_heads=4,
            out_hidden_size=64,
            fullatt_block_indexes=[1, 3],
            window_size=112,
            tokens_per_second=4,
        )
        config = tf.Qwen2_5_VLConfig(text_config=TEXT, vision_config=vision, **TOKENS)
        model = tf.Qwen2_5_VLForConditionalGeneration(config)
    with torch.no_grad():  # visible biases and norms, which initialise to 0 and 1
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval().float()


def visual(rng: np.random.Generator, grid: tuple[int, int, int], *, video=False, interval=1.0):
    """Random patches of a (t, h, w) grid, in the processor's layout."""
    t, h, w = grid
    patches = rng.normal(size=(t * h * w, 3 * 2 * 14 * 14)).astype(np.float32)
    return Visual(patches, grid, video, interval)


def row(text: list[int], visuals: list[Visual], geometry: VisionGeometry, capacity: int) -> dict:
    """build_row, with each placeholder wrapped in vision start/end tokens as the chat
    template writes it."""
    ids = []
    for token in text:
        ids += [START, token, END] if token in (IMAGE, VIDEO) else [token]
    return build_row(ids, visuals, PLACEHOLDERS, geometry, capacity)


def hf_inputs(r: dict, visuals: list[Visual], kind: str) -> dict:
    """The transformers forward's keyword arguments for one mmjax row."""
    import torch

    tokens = torch.tensor(r["tokens"][None], dtype=torch.long)
    types = torch.zeros_like(tokens)
    types[tokens == IMAGE], types[tokens == VIDEO] = 1, 2
    out = {"input_ids": tokens, "mm_token_type_ids": types}
    for video, prefix in ((False, ""), (True, "_videos")):
        chosen = [v for v in visuals if v.video == video]
        if chosen:
            out[f"pixel_values{prefix}"] = torch.tensor(np.concatenate([v.patches for v in chosen]))
            key = "video_grid_thw" if video else "image_grid_thw"
            out[key] = torch.tensor([list(v.grid) for v in chosen])
    if kind == "qwen2_5_vl" and any(v.video for v in visuals):
        out["second_per_grid_ts"] = torch.tensor([1.0 for v in visuals if v.video])
    return out


SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CORPUS = [
    "describe the image. a red circle left of a blue square",
    "locate the green triangle, output its bbox coordinates using JSON format.",
    '[{"bbox_2d": [10, 24, 124, 38], "label": "yellow circle"}] 0123456789',
    "which way does the purple square move? left right up down",
] * 20


def save_checkpoint(kind: str, directory: str) -> str:
    """A tiny random Qwen2-VL / Qwen2.5-VL saved as a transformers checkpoint, with a
    byte-level BPE tokenizer of its own holding Qwen's specials (their ids in config.json)."""
    import tokenizers
    import transformers as tf

    from mmjax.data.qwen_tasks import SPECIAL_TOKENS

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[*SPECIALS, *SPECIAL_TOKENS],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS, trainer)
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(directory)
    ids = {t: bpe.token_to_id(t) for t in (*SPECIALS, *SPECIAL_TOKENS)}
    model = hf_model(kind)
    model.config.image_token_id = ids["<|image_pad|>"]
    model.config.video_token_id = ids["<|video_pad|>"]
    model.config.vision_start_token_id = ids["<|vision_start|>"]
    model.config.vision_end_token_id = ids["<|vision_end|>"]
    assert bpe.get_vocab_size() <= TEXT["vocab_size"] * 3
    model.resize_token_embeddings(bpe.get_vocab_size())
    model.save_pretrained(directory)
    return directory
