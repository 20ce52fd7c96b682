"""Qwen2-VL vision tower throughput on mixed-size images, packed vs padded; one line of JSON.

  python benchmarks/packed_vit.py                       # the "mixed" preset, CPU, f32
  python benchmarks/packed_vit.py --grids 8x8:4,16x16:2,32x32:1 --repeats 9
  python benchmarks/packed_vit.py --backend gpu --dtype bfloat16   # attention "auto" there

The same `QwenVisionTower` and weights run the same images (random patches, one frame
each) laid out two ways:

- packed (`mmjax.data.native_resolution.pack_row`): the images' patches concatenated into
  rows of `--capacity` patches (default: the largest image's), first-fit decreasing into as
  few rows as that allows; block-diagonal attention through segment ids, padding only at
  each row's tail;
- padded: one image per row, each padded to the largest image's patch count
  ([images, N_max, D]); padding patches carry segment id 0, so real patches' results are
  unchanged.

Both jitted forward passes are compiled and warmed up, then `--repeats` rounds each time one
packed and one padded pass (`block_until_ready`), interleaved so that both see the same
machine noise; images/s come from the median times, `speedup` is the median over rounds of
the padded / packed time ratio. `max_abs_diff` is the largest |difference| between the two
layouts' merged tokens over every image (~1e-6 in f32): the segment ids make packing exact.
`max_over_median_patches` is the mix's largest image's patch count over the median one.

On CPU the default attention is "xla" (the dense reference: a row's segment mask is
materialised, so packed rows pay capacity^2 attention like padded ones, and the packed win
is the rows saved: 15 -> 4 for "mixed", at most 3.75x); "auto" runs the Pallas kernel
(interpret mode on CPU: slow, for checking only; on TPU / GPU it skips masked-out blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

# Patch grids (rows, columns of 14-px patches; even: 2x2 merging) and how many of each.
PRESETS = {
    # thumbnails and icons, a few medium photos, one large photo and one wide screenshot
    "mixed": "8x8:4,8x12:3,12x8:3,16x16:3,32x32:1,24x40:1",
    # documents and photos of similar sizes: packing has less to win
    "uniform": "16x16:4,16x20:4,20x16:4,24x24:2",
}


def parse_grids(spec: str) -> list[tuple[int, int]]:
    """Images as "HxW[:count],...", e.g. "8x8:4,32x32" -> [(8, 8)] * 4 + [(32, 32)]."""
    grids = []
    for item in spec.split(","):
        shape, _, count = item.strip().partition(":")
        h, w = (int(v) for v in shape.lower().split("x"))
        if h % 2 or w % 2 or h < 2 or w < 2:
            raise SystemExit(f"grid {shape}: sides must be even (2x2 merging) and positive")
        grids += [(h, w)] * int(count or 1)
    return grids


def pack_greedy(sizes: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: image indices per row, each row's sizes summing to <= capacity."""
    rows, free = [], []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for r, room in enumerate(free):
            if sizes[i] <= room:
                rows[r].append(i)
                free[r] -= sizes[i]
                break
        else:
            rows.append([i])
            free.append(capacity - sizes[i])
    return rows


def stack_rows(rows: list[dict]) -> tuple:
    """pack_row dicts -> the tower's batched arguments (patches, positions, segment ids and,
    with windows, window ids and order)."""
    keys = ["patches", "patch_positions", "patch_segment_ids"]
    if "patch_order" in rows[0]:
        keys += ["patch_window_ids", "patch_order"]
    return tuple(np.stack([row[k] for row in rows]) for k in keys)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpu", choices=("cpu", "gpu", "tpu"))
    parser.add_argument("--preset", default="mixed", choices=sorted(PRESETS))
    parser.add_argument("--grids", help='images as "HxW[:count],...", overrides --preset')
    parser.add_argument("--capacity", type=int, help="patches per packed row (default N_max)")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mlp", type=int, default=512)
    parser.add_argument("--out_dim", type=int, default=256)
    parser.add_argument("--window_size", type=int, help="pixels (Qwen2.5-VL: 112); default off")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--attention_impl", help='"xla" on CPU, "auto" elsewhere by default')
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if "jax" not in sys.modules:  # (already imported, e.g. under pytest: checked below)
        os.environ["JAX_PLATFORMS"] = {"gpu": "cuda"}.get(args.backend, args.backend)
    import jax
    import jax.numpy as jnp

    from mmjax.data.native_resolution import VisionGeometry, pack_row
    from mmjax.models.qwen_vision import QwenVisionTower

    backend = jax.default_backend()
    if backend != args.backend:
        raise SystemExit(f"--backend {args.backend}, but JAX runs on {backend}")
    impl = args.attention_impl or ("xla" if backend == "cpu" else "auto")
    geometry = VisionGeometry(window_size=args.window_size)
    grids = parse_grids(args.grids or PRESETS[args.preset])
    sizes = [h * w for h, w in grids]
    n_max = max(sizes)
    capacity = args.capacity or n_max
    if capacity < n_max or capacity % 4:
        raise SystemExit(f"capacity {capacity}: a multiple of 4, at least N_max = {n_max}")
    rng = np.random.default_rng(args.seed)
    patches = [rng.standard_normal((n, geometry.patch_dim), np.float32) for n in sizes]
    grid3 = [(1, h, w) for h, w in grids]

    rows = pack_greedy(sizes, capacity)
    packed = stack_rows(
        [pack_row([patches[i] for i in r], [grid3[i] for i in r], geometry, capacity) for r in rows]
    )
    where = {}  # image -> (row, first patch) in the packed layout
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            where[i] = (r, start)
            start += sizes[i]
    padded = stack_rows(
        [pack_row([p], [g], geometry, n_max) for p, g in zip(patches, grid3, strict=True)]
    )

    dtype = jnp.dtype(args.dtype)
    tower = QwenVisionTower(
        width=args.width,
        depth=args.depth,
        num_heads=args.heads,
        mlp_dim=args.mlp,
        out_dim=args.out_dim,
        global_every=2 if args.window_size else 0,
        attention_impl=impl,
        dtype=dtype,
    )
    params = jax.jit(tower.init)(jax.random.key(args.seed), *(a[:1] for a in padded))
    forward = jax.jit(tower.apply)
    packed, padded = jax.device_put(packed), jax.device_put(padded)

    def run(batch) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(forward(params, *batch))
        return time.perf_counter() - t0

    out_packed = np.asarray(forward(params, *packed), np.float32)  # compile + warm-up
    out_padded = np.asarray(forward(params, *padded), np.float32)
    run(packed), run(padded)
    diff = 0.0
    for i, n in enumerate(sizes):
        r, start = where[i]
        a = out_packed[r, start // 4 : (start + n) // 4]
        diff = max(diff, float(np.abs(a - out_padded[i, : n // 4]).max()))

    t_packed, t_padded = [], []
    for _ in range(args.repeats):
        t_packed.append(run(packed))
        t_padded.append(run(padded))
    images, total = len(sizes), sum(sizes)
    device = jax.devices()[0]
    result = {
        "benchmark": "packed_vit",
        "device": f"{device.platform}:{device.device_kind}",
        "attention_impl": impl,
        "dtype": args.dtype,
        "tower": [args.width, args.depth, args.heads, args.mlp],
        "window_size": args.window_size,
        "images": images,
        "grids": args.grids or args.preset,
        "patches_total": total,
        "max_over_median_patches": round(n_max / statistics.median(sizes), 3),
        "packed_rows": len(rows),
        "packed_capacity": capacity,
        "packed_fill": round(total / (len(rows) * capacity), 4),
        "padded_shape": list(padded[0].shape),
        "padded_fill": round(total / (images * n_max), 4),
        "packed_ms": round(1e3 * statistics.median(t_packed), 2),
        "padded_ms": round(1e3 * statistics.median(t_padded), 2),
        "packed_images_per_s": round(images / statistics.median(t_packed), 2),
        "padded_images_per_s": round(images / statistics.median(t_padded), 2),
        "speedup": round(
            statistics.median(b / a for a, b in zip(t_packed, t_padded, strict=True)), 3
        ),
        "max_abs_diff": diff,
        "repeats": args.repeats,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
