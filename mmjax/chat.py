"""CLI: ask a Qwen2-VL / Qwen2.5-VL about images (and a video) of any size; prints its answer.

  python -m mmjax.chat --workdir DIR --image cat.jpg --prompt "describe the image."
  python -m mmjax.chat --workdir DIR --image a.png --image b.png --prompt "which is larger?"
  python -m mmjax.chat --workdir DIR --video clip.gif --prompt "which way does it move?"
  python -m mmjax.chat --hf /models/Qwen2.5-VL-3B-Instruct --image photo.jpg \
      --prompt "locate the dog, output its bbox coordinates using JSON format."

`--workdir`: the newest checkpoint of a trained qwen_vl run (mmjax.train), prompted as its
training rows are: each image's (then the video's) vision block
`<|vision_start|><|image_pad|><|vision_end|>`, then the prompt. `--hf`: a Hugging Face
Qwen2-VL or Qwen2.5-VL checkpoint directory (config.json's model_type picks the importer,
mmjax.convert.hf_qwen2_vl; its tokenizer files must be in the directory), prompted through the
Qwen chat template with its default system message, stopping at <|im_end|>.

Images are read with PIL at their own size (any format PIL reads, converted to RGB); a video
is a `.npy` array [T, H, W, 3] (uint8, or floats in [0, 1]) or an animated `.gif`, shot at
`--fps` frames a second (else a gif's own frame durations, else the run's data.sequence.video_fps
or 2). Each row's patch
capacity is its visuals' patches, so any size fits. Decoding is greedy at --temperature 0,
else nucleus sampling (--top_p).
"""

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmjax.data.image_ops import read_image_file
from mmjax.data.qwen_tasks import CHAT_PREFIX, CHAT_SUFFIX
from mmjax.errors import UserError, run_cli

PROG = "python -m mmjax.chat"
IM_END = "<|im_end|>"
DEFAULT_FPS = 2.0  # Qwen2-VL's processor samples videos at 2 frames a second


@dataclasses.dataclass
class Chat:
    """What a conversation needs: the decoder (decode=True) and its parameters, the tokenizer,
    the processor's constants, placeholder and delimiter ids and how videos advance M-RoPE."""

    decoder: Any
    params: Any
    tokenizer: Any
    geometry: Any
    placeholders: Any
    vision_start: int
    vision_end: int
    eos_id: int
    template: bool  # the Qwen chat template around the prompt (HF checkpoints)
    tokens_per_second: float  # 0: Qwen2-VL's one temporal id per temporal patch
    fps: float = DEFAULT_FPS  # a video's frame rate when neither it nor --fps says
    mesh: Any = None
    rules: tuple = ()


def read_video(path: str, fps: float | None) -> tuple[np.ndarray, float | None]:
    """(uint8 RGB frames [T, H, W, 3], frames a second: `fps`, else a gif's own, else None)
    of a `.npy` array or an animated gif."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    if not os.path.isfile(path):
        raise UserError(f"--video {path!r}: no such file")
    if path.lower().endswith(".npy"):
        try:
            frames = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"--video {path!r}: not a numpy array file ({e})") from None
        if frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
            raise UserError(f"--video {path!r}: need frames [T, H, W, 3], got {frames.shape}")
        if np.issubdtype(frames.dtype, np.floating):
            frames = np.round(np.clip(frames, 0.0, 1.0) * 255.0)
        return frames.astype(np.uint8), fps
    if not path.lower().endswith(".gif"):
        raise UserError(f"--video {path!r}: expected a .npy array or a .gif")
    try:
        with Image.open(path) as gif:
            durations = [f.info.get("duration", 0) for f in ImageSequence.Iterator(gif)]
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"--video {path!r}: not a gif PIL can read ({e})") from None
    if fps is None:
        mean_ms = float(np.mean(durations)) if durations else 0.0
        fps = 1000.0 / mean_ms if mean_ms > 0 else None
    return np.stack(frames), fps


def from_workdir(workdir: str) -> Chat:
    """The newest checkpoint of a trained qwen_vl run."""
    from mmjax.data import qwen_tasks
    from mmjax.data.native_resolution import PlaceholderIds
    from mmjax.train.build import load_trained
    from mmjax.train.workdir import read_config

    config = read_config(workdir)
    name = (config.get("model") or {}).get("name")
    if name != "qwen_vl":
        raise UserError(f"{workdir!r} holds a {name!r} run, not a qwen_vl one (Qwen2-VL)")
    trained = load_trained(workdir)
    bundle, seq = trained.bundle, trained.config.data.sequence
    tok = bundle.tokenizer
    ids = tok.special_ids
    return Chat(
        decoder=bundle.model.clone(decode=True),
        params=trained.params,
        tokenizer=tok,
        geometry=qwen_tasks.geometry(seq),
        placeholders=PlaceholderIds(ids[qwen_tasks.IMAGE_PAD], ids[qwen_tasks.VIDEO_PAD]),
        vision_start=ids[qwen_tasks.VISION_START],
        vision_end=ids[qwen_tasks.VISION_END],
        eos_id=tok.eos_id,
        template=False,
        tokens_per_second=float(seq.get("tokens_per_second", 0.0) or 0.0),
        fps=float(seq.get("video_fps", 0.0) or DEFAULT_FPS),
        mesh=bundle.mesh,
        rules=bundle.rules,
    )


def from_hf(directory: str) -> Chat:
    """A Hugging Face Qwen2-VL / Qwen2.5-VL checkpoint directory and its tokenizer."""
    from mmjax.convert import hf_qwen2_vl
    from mmjax.data import qwen_tasks
    from mmjax.data.hf_tokenizer import HFTokenizer
    from mmjax.data.native_resolution import PlaceholderIds

    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"--hf {directory!r}: no config.json (a save_pretrained directory?)")
    try:
        with open(config_path) as f:
            kind = json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        raise UserError(f"--hf {config_path!r}: unreadable ({e})") from None
    if kind not in hf_qwen2_vl.MODEL_TYPES:
        raise UserError(
            f"--hf {directory!r} holds model_type {kind!r}, not one of "
            f"{list(hf_qwen2_vl.MODEL_TYPES)}"
        )
    imported = hf_qwen2_vl.convert(directory, kind)
    tok = qwen_tasks.WithQwenTokens(HFTokenizer(imported.tokenizer_path or directory))
    ids, tokens = tok.special_ids, imported.tokens
    end = tok.encode(IM_END)
    if len(end) != 1:
        raise UserError(f"--hf {directory!r}: the tokenizer has no {IM_END} token")
    return Chat(
        decoder=imported.module(decode=True),
        params=imported.params,
        tokenizer=tok,
        geometry=imported.geometry,
        placeholders=PlaceholderIds(
            tokens.get("image_token_id", ids[qwen_tasks.IMAGE_PAD]),
            tokens.get("video_token_id", ids[qwen_tasks.VIDEO_PAD]),
        ),
        vision_start=tokens.get("vision_start_token_id", ids[qwen_tasks.VISION_START]),
        vision_end=tokens.get("vision_end_token_id", ids[qwen_tasks.VISION_END]),
        eos_id=end[0],
        template=True,
        tokens_per_second=float(imported.tokens_per_second or 0.0),
    )


def prompt_ids(chat: Chat, prompt: str, visuals: Sequence[Any]) -> list[int]:
    """The prompt as ids: a vision block per visual, in order, then the text (inside the chat
    template for HF checkpoints). The placeholders and delimiters are the model's own ids."""
    tok = chat.tokenizer
    ids = tok.encode(CHAT_PREFIX) if chat.template else []
    for vis in visuals:
        pad = chat.placeholders.video if vis.video else chat.placeholders.image
        ids += [chat.vision_start, pad, chat.vision_end]
    ids += tok.encode(prompt)
    if chat.template:
        ids += tok.encode(CHAT_SUFFIX)
    return ids


def visuals_of(
    chat: Chat, images: Sequence[np.ndarray], video: tuple[np.ndarray, float | None] | None
) -> list[Any]:
    """The images' and the video's patches at their own (smart-resized) sizes."""
    from mmjax.data.native_resolution import Visual, preprocess

    out = [Visual(*preprocess(image, chat.geometry)) for image in images]
    if video is not None:
        frames, fps = video
        fps = fps or chat.fps
        patches, grid = preprocess(frames, chat.geometry, video=True)
        interval = 1.0
        if chat.tokens_per_second > 0:  # Qwen2.5-VL's absolute time (Sec. 2.1.1)
            interval = chat.tokens_per_second * chat.geometry.temporal_patch_size / fps
        out.append(Visual(patches, grid, True, interval))
    return out


def answer(chat: Chat, prompt: str, visuals: Sequence[Any], args: argparse.Namespace) -> str:
    """The decoded answer to one prompt."""
    import flax.linen as nn
    import jax

    from mmjax.sampling import qwen_vl

    unit = chat.geometry.merge_size**2
    patches = sum(int(np.prod(v.grid)) for v in visuals)
    capacity = max(unit, -(-patches // unit) * unit)
    ids = prompt_ids(chat, prompt, visuals)
    tok = chat.tokenizer

    def run() -> np.ndarray:
        return qwen_vl.answer(
            chat.decoder,
            chat.params,
            [(ids, list(visuals))],
            chat.placeholders,
            chat.geometry,
            eos_id=chat.eos_id,
            pad_id=tok.pad_id,
            max_new_tokens=args.max_new_tokens,
            capacity=capacity,
            rng=jax.random.key(args.seed),
            temperature=args.temperature,
            top_p=args.top_p,
        )

    if chat.mesh is not None:
        with jax.set_mesh(chat.mesh), nn.logical_axis_rules(chat.rules):
            out = run()
    else:
        out = run()
    row = out[0].tolist()
    if chat.eos_id in row:  # the tokenizer's decode stops at its own eos only
        row = row[: row.index(chat.eos_id)]
    return tok.decode(row).strip()


def chat_once(args: argparse.Namespace) -> str:
    """Reads the inputs, loads the model, answers; returns the answer."""
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError(
            f"need --temperature >= 0 and 0 < --top_p <= 1, got {args.temperature}, {args.top_p}"
        )
    images = [read_image_file(p, "--image") for p in args.image or ()]
    video = read_video(args.video, args.fps) if args.video else None
    if not images and video is None:
        raise UserError("give at least one --image or a --video")
    chat = from_hf(args.hf) if args.hf else from_workdir(args.workdir)
    text = answer(chat, args.prompt, visuals_of(chat, images, video), args)
    print(text, flush=True)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--workdir", help="a trained qwen_vl run")
    model.add_argument("--hf", help="a Hugging Face Qwen2-VL / Qwen2.5-VL checkpoint directory")
    parser.add_argument("--image", action="append", help="an image file (repeat for several)")
    parser.add_argument("--video", help="a video: .npy [T, H, W, 3] or an animated .gif")
    parser.add_argument("--fps", type=float, help=f"the video's frame rate (default {DEFAULT_FPS})")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return run_cli(PROG, lambda: chat_once(args))


if __name__ == "__main__":
    sys.exit(main())
