"""Attention kernels side by side: time, compiled peak memory and block sparsity per mask.

  python benchmarks/attention.py                          # S=1024, 4096; every mask; CPU
  python benchmarks/attention.py --seq 16384 --skip_time  # memory rows only (compile only)
  python benchmarks/attention.py --backend gpu --dtype bfloat16 --head_dim 128 \
      --seq 4096 16384 --max_time_seq '{"xla": 16384}'      # one prepared GPU run

One JSON line per (S, mask, impl): forward and forward+backward median wall time over
`--repeats` runs after a compile run, compiled peak memory of both
(`jit(...).lower(...).compile().memory_analysis()`), and for "pallas" the fraction of
non-empty (q block, kv block) tiles and the number of kv blocks the kernel executed (its
debug counter, summed over batch, heads and q blocks). Masks, batch 1, heads 8:

- full: no mask; causal: lower triangle; window: |i - j| < 512 (bidirectional);
- packed: Transfusion packing, 4 samples of S/4 tokens, each text / image / text / image /
  text with causal text and bidirectional image spans of min(256, S/16) tokens.

Ids are traced arguments by default (what a training step sees: the block map is computed
in the step); `--static_ids` closes over them instead, so it is computed at trace time
(numpy) and the grid variant's slot axis is sized statically. `--variant` picks the Pallas
variant ("grid": TPU-style grid step per listed block; "loop": an in-kernel loop over each
block's list; default per backend: loop on CPU and GPU). On CPU the kernel runs in Pallas
interpret mode, and xla at S=16384 needs ~30 GB, so use `--skip_time` there.
`--backend gpu` adds TFLOP/s (only unmasked pairs counted, fwd+bwd counted as 3.5x the
forward) and the cuDNN (`jax.nn.dot_product_attention`, full / causal) and JAX Pallas `mha`
(no window, no span ids) baselines, with the device name; there "pallas" is mmjax's Triton
kernel alone and "auto" what models run (cuDNN for full / causal, the Triton kernel for the
rest). `benchmarks/gpu_check.sh` is the prepared GPU run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

MASKS = ("full", "causal", "packed", "window")


def packed_ids(seq: int, samples: int = 4) -> tuple[np.ndarray, np.ndarray, int]:
    """Transfusion packing: (segment_ids [1, S], span_ids [1, S], image length)."""
    sample = seq // samples
    image = min(256, sample // 4)
    text = sample - 2 * image
    parts = [text // 3, image, text // 3, image, text - 2 * (text // 3)]
    segment, span, next_span = [], [], 1
    for s in range(samples):
        for p, length in enumerate(parts):
            segment += [s + 1] * length
            span += [next_span if p % 2 else 0] * length
            next_span += p % 2
    return np.array([segment], np.int32), np.array([span], np.int32), image


def mask_kwargs(mask: str, seq: int) -> dict:
    """Keyword arguments of `mmjax.kernels.attention` for one benchmark mask."""
    if mask == "full":
        return {}
    if mask == "causal":
        return {"causal": True}
    if mask == "window":
        return {"window": 512}
    segment_ids, span_ids, _ = packed_ids(seq)
    return {"causal": True, "segment_ids": segment_ids, "span_ids": span_ids}


def unmasked_pairs(mask: str, seq: int) -> int:
    """Exact number of visible (query, key) pairs, counted row block by row block."""
    from mmjax.kernels import attention_mask

    kw = mask_kwargs(mask, seq)
    total, rows = 0, 512
    for start in range(0, seq, rows):
        stop = min(seq, start + rows)
        sub = {
            name: value[:, start:stop] if name in ("segment_ids", "span_ids") else value
            for name, value in kw.items()
        }
        for name in ("segment_ids", "span_ids"):
            if name in kw:
                sub[f"kv_{name}"] = kw[name]
        m = attention_mask(stop - start, seq, q_offset=start, **sub)
        total += int(np.asarray(m).sum())
    return total


def peak_bytes(compiled) -> int:
    """Compiled peak memory: arguments + outputs + temporaries - aliased buffers.

    (The CPU client's `peak_memory_in_bytes` leaves the temporaries out, so it is not used.)
    """
    stats = compiled.memory_analysis()
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def measure(fn: Callable, args: tuple, repeats: int, skip_time: bool) -> dict:
    """Compiles `fn` once; returns its peak memory and (unless skipped) median seconds."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    result = {"compile_s": round(time.perf_counter() - t0, 2), "peak_mb": peak_bytes(compiled)}
    result["peak_mb"] = round(result["peak_mb"] / 2**20, 2)
    if skip_time:
        return result
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    result["median_s"] = round(statistics.median(times), 4)
    return result


def pallas_options(args) -> dict:
    """Keyword arguments of `pallas_attention` besides the mask: tiles and variant."""
    return {"block_q": args.block, "block_kv": args.block, "variant": args.variant}


def attention_fn(impl: str, mask: str, seq: int, static_ids: bool, options: dict):
    """(forward(q, k, v, ids), ids): the attention call of one impl, ids traced or closed."""
    import jax

    from mmjax.kernels import MaskSpec, attention
    from mmjax.kernels.pallas_attention import pallas_attention

    kw = mask_kwargs(mask, seq)
    ids = {name: kw.pop(name) for name in ("segment_ids", "span_ids") if name in kw}
    if impl == "pallas":
        call = lambda q, k, v, **a: pallas_attention(q, k, v, MaskSpec(**a), **options)  # noqa: E731
    elif impl == "cudnn":
        call = lambda q, k, v, **a: jax.nn.dot_product_attention(  # noqa: E731
            q, k, v, is_causal=a.get("causal", False), implementation="cudnn"
        )
    elif impl == "jax_pallas_mha":
        from jax.experimental.pallas.ops.gpu.attention import mha

        def call(q, k, v, **a):
            seg = a.get("segment_ids")
            scale = 1.0 / q.shape[-1] ** 0.5
            return mha(q, k, v, segment_ids=seg, sm_scale=scale, causal=a.get("causal", False))
    else:
        call = lambda q, k, v, **a: attention(q, k, v, impl=impl, **a)  # noqa: E731
    if static_ids:
        return (lambda q, k, v, _: call(q, k, v, **kw, **ids)), {}
    return (lambda q, k, v, dyn: call(q, k, v, **kw, **dyn)), ids


def run_case(args, seq: int, mask: str, impl: str) -> dict:
    """Measures one (S, mask, impl) and returns its JSON row."""
    import jax
    import jax.numpy as jnp

    from mmjax.kernels import MaskSpec
    from mmjax.kernels.pallas_attention import BACKENDS, executed_kv_blocks, forward_block_map

    shape = (1, seq, args.heads, args.head_dim)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, ct = (jax.random.normal(key, shape, args.dtype) for key in keys)
    forward, ids = attention_fn(impl, mask, seq, args.static_ids, pallas_options(args))

    def fwd_bwd(q, k, v, ids, ct):  # ct an argument: a closed-over one is constant-folded
        out, vjp = jax.vjp(lambda q, k, v: forward(q, k, v, ids), q, k, v)
        return out, vjp(ct)

    row = {"benchmark": "attention", "backend": jax.default_backend(), "seq": seq}
    row |= {"mask": mask, "impl": impl, "heads": args.heads, "head_dim": args.head_dim}
    row |= {"dtype": args.dtype, "static_ids": args.static_ids}
    if mask == "packed":
        row["image_span"] = packed_ids(seq)[2]
        if impl == "jax_pallas_mha":
            row["mask_note"] = "segments + causal only: mha has no bidirectional spans"
    skip_time = args.skip_time or seq > args.max_time_seq.get(impl, 1 << 30)
    row["forward"] = measure(forward, (q, k, v, ids), args.repeats, skip_time)
    row["forward_backward"] = measure(fwd_bwd, (q, k, v, ids, ct), args.repeats, skip_time)
    if impl == "pallas":
        spec = MaskSpec(**mask_kwargs(mask, seq))
        row["variant"] = args.variant or BACKENDS[jax.default_backend()].variant
        if skip_time:  # the block map only: running the debug kernel costs a forward
            bm = forward_block_map(q, k, spec, **pallas_options(args))
        else:
            visits, bm = executed_kv_blocks(q, k, v, spec, **pallas_options(args))
            row["executed_kv_blocks"] = int(jnp.sum(visits))
        row["nonempty_block_fraction"] = round(float(jnp.mean(bm.kind != 0)), 4)
        row["block"] = int(seq // bm.kind.shape[1])
        row["nonempty_kv_blocks_x_heads"] = int(jnp.sum(bm.kv_count)) * args.heads
    if args.backend == "gpu":
        pairs = unmasked_pairs(mask, seq)
        flops = 4 * pairs * args.head_dim * args.heads  # QK^T and PV, 2 flops per MAC
        for name, mult in (("forward", 1.0), ("forward_backward", 3.5)):
            if "median_s" in row[name]:
                row[name]["tflops"] = round(mult * flops / row[name]["median_s"] / 1e12, 2)
        row["device"] = jax.devices()[0].device_kind
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    parser.add_argument("--impls", nargs="+", default=None)
    parser.add_argument("--backend", default="cpu", choices=["cpu", "gpu", "tpu"])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--block", type=int, default=None, help="pallas tile (default: backend's)")
    parser.add_argument("--variant", default=None, choices=["grid", "loop"], help="pallas variant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--static_ids", action="store_true")
    parser.add_argument("--skip_time", action="store_true", help="memory rows only")
    parser.add_argument(
        "--max_time_seq",
        type=json.loads,
        default={"xla": 4096},
        help="JSON {impl: S}: above S only memory is measured (xla at 16384 needs ~30 GB)",
    )
    args = parser.parse_args()
    impls = args.impls or (
        ["pallas", "auto", "xla", "cudnn", "jax_pallas_mha"]
        if args.backend == "gpu"
        else ["pallas", "xla"]
    )
    for seq in args.seq:
        for mask in args.masks:
            for impl in impls:
                if impl == "cudnn" and mask not in ("full", "causal"):
                    continue
                if impl == "jax_pallas_mha" and mask == "window":
                    continue
                try:
                    row = run_case(args, seq, mask, impl)
                except Exception as e:  # one unsupported combination must not stop the rest
                    row = {"benchmark": "attention", "seq": seq, "mask": mask, "impl": impl}
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
