"""M-RoPE position ids (Qwen2-VL, Wang et al., 2024, Sec. 2.1; Qwen2.5-VL, Bai et al., 2025,
Sec. 2.1): three ids per token (temporal, height, width), laid out as transformers'
`Qwen2VLModel.get_rope_index` lays them out.

Text tokens carry the same id three times, counting on from the block before them. A visual
block of a (t, h, w) patch grid, merged `merge` x `merge` into (h / merge) x (w / merge) tokens
per frame, starts at the current id p: token (i, j, k) gets (p + i * time_interval, p + j,
p + k); the text after it continues at p + max(h, w) / merge (transformers 5's rule; older
releases continued at the block's largest id + 1, which differs only when a video has more
frames than rows and columns). `time_interval` is 1 for Qwen2-VL, and for Qwen2.5-VL's
absolute-time ids `tokens_per_second * second_per_grid_t` (Sec. 2.1.1).
"""

import itertools
from collections.abc import Sequence

import numpy as np

TEXT = 0  # token types: text, image, video (transformers' mm_token_type_ids)


def mrope_positions(
    token_types: Sequence[int],
    grids: Sequence[tuple[int, int, int]],
    merge: int,
    time_intervals: Sequence[float] | None = None,
) -> tuple[np.ndarray, int]:
    """(ids [3, S] int32, delta) for one sequence of `token_types` (0 text, else one visual
    block per run of equal non-zero types, in order), `grids` the (t, h, w) patch grids of
    its visual blocks in order. `delta` (the largest id + 1 - S) is what positions of
    later, cached tokens add to their index: decoding step n sits at n + delta."""
    types = np.asarray(token_types)
    intervals = list(time_intervals) if time_intervals is not None else [1.0] * len(grids)
    blocks = iter(zip(grids, intervals, strict=True))
    parts, current = [], 0
    for kind, run in itertools.groupby(types.tolist()):
        length = len(list(run))
        if kind == TEXT:
            parts.append(np.broadcast_to(np.arange(current, current + length), (3, length)))
            current += length
            continue
        try:
            (t, h, w), interval = next(blocks)
        except StopIteration:
            raise ValueError("more visual blocks in the tokens than grids") from None
        if h % merge or w % merge:
            raise ValueError(f"grid {(t, h, w)} is not divisible by the merge size {merge}")
        hh, ww = h // merge, w // merge
        if length != t * hh * ww:
            raise ValueError(
                f"a visual block of {length} tokens does not match its grid {(t, h, w)}: "
                f"{t * hh * ww} tokens after merging {merge} x {merge}"
            )
        temporal = (np.arange(t) * interval).astype(np.int64)
        grid = np.meshgrid(temporal, np.arange(hh), np.arange(ww), indexing="ij")
        parts.append(np.stack([g.reshape(-1) for g in grid]) + current)
        current += max(hh, ww)
    if next(blocks, None) is not None:
        raise ValueError("more grids than visual blocks in the tokens")
    ids = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
    delta = int(ids.max()) + 1 - len(types) if len(types) else 0
    return ids.astype(np.int32), delta
