"""Builds ArrayRecord shards of (image, caption, label) from a folder of images + a JSONL file.

  python -m mmjax.data.build_array_record --images DIR --captions FILE.jsonl --out DIR \\
      [--num_shards N]

Each JSONL line is {"image": "relative/path.png", "caption": "...", "label": 3} (label
optional), the image path relative to --images. Each record is `sources.pack_record`'s layout:
a uint32 little-endian header length, a UTF-8 JSON header {"caption", "label" (-1 if none),
"filename"}, then the original encoded image bytes. Shards are `--out/data-SSSSS-of-NNNNN
.array_record`, records in JSONL order. Every image is decoded before it is written; on any
error nothing is left in --out (shards are written to a temporary folder, renamed at the end).
Train with `data.source='array_record'`, `data.path=--out`.
"""

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from mmjax.data.image_ops import ImageDecodeError, decode_image
from mmjax.data.sources import pack_record
from mmjax.errors import UserError


def _read_entries(captions: pathlib.Path, images: pathlib.Path) -> list[dict[str, Any]]:
    """Parses and checks the JSONL file; returns entries with `path`, `caption`, `label`."""
    entries = []
    with captions.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{captions} line {line_no}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e})") from e
            if not isinstance(item, dict):
                raise UserError(f"{where}: expected a JSON object")
            if not isinstance(item.get("image"), str) or not isinstance(item.get("caption"), str):
                raise UserError(f"{where}: needs string fields 'image' and 'caption'")
            label = item.get("label", -1)
            if isinstance(label, bool) or not isinstance(label, int):
                raise UserError(f"{where}: 'label' must be an integer, got {label!r}")
            path = images / item["image"]
            if not path.is_file():
                raise UserError(f"{where}: image '{path}' does not exist")
            entries.append(
                {"path": path, "file": item["image"], "caption": item["caption"], "label": label}
            )
    if not entries:
        raise UserError(f"{captions} holds no records")
    return entries


def _write_shards(entries: list[dict[str, Any]], folder: pathlib.Path, num_shards: int) -> None:
    """Writes `entries` into `num_shards` contiguous shards, checking every image decodes."""
    writers = [
        ArrayRecordWriter(
            str(folder / f"data-{s:05d}-of-{num_shards:05d}.array_record"), "group_size:1"
        )
        for s in range(num_shards)
    ]
    try:
        for i, entry in enumerate(tqdm(entries, desc="records", unit="img")):
            data = entry["path"].read_bytes()
            try:
                decode_image(data)
            except ImageDecodeError as e:
                raise UserError(f"image '{entry['path']}' cannot be decoded: {e}") from e
            record = pack_record(data, entry["caption"], entry["label"], entry["file"])
            writers[i * num_shards // len(entries)].write(record)
    finally:
        for writer in writers:
            writer.close()


def build(images: str, captions: str, out: str, num_shards: int) -> None:
    """Builds the shards in `out`; raises UserError (and writes nothing) on bad input."""
    images_dir, captions_file, out_dir = map(pathlib.Path, (images, captions, out))
    if not images_dir.is_dir():
        raise UserError(f"--images directory '{images}' does not exist")
    if not captions_file.is_file():
        raise UserError(f"--captions file '{captions}' does not exist")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"--out '{out}' already exists and is not an empty directory")
    entries = _read_entries(captions_file, images_dir)
    if not 1 <= num_shards <= len(entries):
        raise UserError(f"--num_shards must be in [1, {len(entries)}], got {num_shards}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        _write_shards(entries, tmp, num_shards)
        if out_dir.exists():
            out_dir.rmdir()  # Empty, checked above.
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints one error line and returns 1 on bad input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, help="folder the JSONL image paths are under")
    parser.add_argument("--captions", required=True, help="JSONL: image, caption[, label]")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--num_shards", type=int, default=1, help="number of shards")
    args = parser.parse_args(argv)
    try:
        build(args.images, args.captions, args.out, args.num_shards)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
