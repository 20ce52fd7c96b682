"""CLIP training-step throughput, mmjax vs open_clip, alternately in one run; one line of JSON.

  python benchmarks/clip_step.py [--batch 64] [--steps 2] [--rounds 7] [--threads 2]

A "small" CLIP on both sides: ViT width 256, 6 layers, 4 heads, patch 8, 64x64 images; text
width 256, 6 layers, 4 heads, context 32, vocab 8192; embed dim 256; MLP 4x width; exact GELU;
softmax InfoNCE with a learnable temperature; AdamW (lr, betas, eps, weight decay on matrices
only, global-norm clipping at 1.0 from experiments/clip.py) on random inputs of the same shapes
(images [B, 64, 64, 3] for JAX, [B, 3, 64, 64] for torch; tokens ending in an end-of-text id,
the largest one, so both CLIP poolings pick it).

- mmjax: the trainer's own jitted step (`Trainer.jit_train_step`: loss, grads, clipping, AdamW,
  NaN guard, donated state) for experiments/clip.py:tiny with the shapes above overridden, on
  one CPU device. `key=value` arguments override the config further (e.g.
  `model.attention_impl=xla model.image.remat_policy=full`).
- open_clip: `open_clip.CLIP` of the same shapes in eager torch (f32, `--threads` intra-op
  threads), `open_clip.ClipLoss`, `torch.optim.AdamW` and the same clipping, with
  open_clip's logit-scale clamp after each step.

After compiling and warming up both, each of `--rounds` rounds times `--steps` mmjax steps
(dispatched back to back, as the trainer does, then blocked on), then `--steps` open_clip
steps, then `--matmul_repeats` f32 `--matmul_n`-cubed matmuls in JAX (jitted) and in torch.
Samples/s come from the median per-step times; `ratio` is the median over rounds of the
open_clip / mmjax step-time ratio. On a shared machine the load changes from round to round,
so each round's step times are set against that round's matmul peak (the better of JAX and
torch, median of the repeats): `*_peak_fraction` is the median over rounds of step FLOPs
(XLA's cost analysis of the compiled mmjax step, used for both) / step time / peak. The
fastest step of each and the 1-minute load average (start, end) are reported too: under
other load, eager torch's OpenMP threads suffer more than XLA's pool, so compare runs with
a similar load. Progress goes to stderr.

Then every matmul of the mmjax step (forward, backward, optimizer) is run alone, each shape
`--matmul_bound_repeats` times, in JAX and in torch (benchmarks/step_matmuls.py): the faster
engine's sum is the step's matmul-only time, a floor no fusion or scheduling goes below.
`max_samples_per_s`, `max_ratio` (open_clip step time / that floor) and `max_peak_fraction`
(step FLOPs / that floor / peak) are what the mmjax step would reach were every other op
free: upper bounds on `mmjax_samples_per_s`, `ratio` and `mmjax_peak_fraction`.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

from matmul_peak import matmul_probe  # benchmarks/ is on sys.path as the script's folder
from step_matmuls import time_matmuls
from trainer_step import compile_trainer_step

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def log(msg: str) -> None:
    print(f"[clip_step] {msg}", file=sys.stderr, flush=True)


def small_config(args):
    """experiments/clip.py:tiny with the benchmark's shapes, batch and dtype."""
    from mmjax.train.config_cli import apply_overrides, load_config

    config = load_config("experiments/clip.py:tiny")
    config.batch_size = args.batch
    config.mesh.update(data=1, fsdp=1, tensor=1)
    config.data.update(tokenizer="byte", image_size=args.image_size, max_text_len=args.context)
    tower = dict(width=args.width, depth=args.depth, num_heads=args.heads, mlp_dim=4 * args.width)
    config.model.update(embed_dim=args.width, dtype=args.dtype)
    config.model.image.update(patch_size=args.patch, pool="cls", remat_policy="none", **tower)
    config.model.text.update(
        vocab_size=args.vocab, max_len=args.context, remat_policy="none", **tower
    )
    apply_overrides(config, args.overrides)
    return config


def random_batch(args, seed: int = 0) -> dict:
    """Images in [-1, 1] [B, H, W, 3] and tokens [B, L]: random ids, EOT, then padding 0."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, n, s = args.batch, args.context, args.image_size
    images = rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32)
    tokens = rng.integers(1, args.vocab - 1, (b, n)).astype(np.int32)
    lengths = rng.integers(n // 4, n + 1, b)
    for i, length in enumerate(lengths):
        tokens[i, length - 1] = args.vocab - 1
        tokens[i, length:] = 0
    return {"image": images, "text": tokens}


def build_mmjax(args, batch):
    """(run(k): k steps then block, compiled step FLOPs, config) for the trainer's step."""
    import jax

    from mmjax.train.loop import Trainer

    config = small_config(args)
    trainer = Trainer(config, workdir=None, devices=jax.devices()[:1])
    compiled, state, device_batch, flops, matmuls = compile_trainer_step(trainer, batch, log)
    holder = {"state": state}

    def run(k: int) -> float:
        state = holder["state"]
        for _ in range(k):
            state, metrics = compiled(state, device_batch)
        loss = float(jax.block_until_ready(metrics)["loss"])
        holder["state"] = state
        return loss

    params = sum(x.size for x in jax.tree.leaves(state.params))
    return run, flops, config, params, matmuls


def build_open_clip(args, batch, opt_cfg):
    """run(k): k open_clip training steps (forward, ClipLoss, backward, clip, AdamW, clamp)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=args.width,
        vision_cfg=open_clip.CLIPVisionCfg(
            layers=args.depth,
            width=args.width,
            head_width=args.width // args.heads,
            mlp_ratio=4.0,
            patch_size=args.patch,
            image_size=args.image_size,
        ),
        text_cfg=open_clip.CLIPTextCfg(
            context_length=args.context,
            vocab_size=args.vocab,
            width=args.width,
            heads=args.heads,
            layers=args.depth,
            mlp_ratio=4.0,
        ),
    )
    model.train()
    loss_fn = open_clip.ClipLoss()
    # open_clip's training script: no weight decay on gains, biases, embeddings, logit scale.
    no_decay = ("embedding", "logit_scale", "class_embedding")
    decay, rest = [], []
    for name, p in model.named_parameters():
        (rest if p.ndim < 2 or any(s in name for s in no_decay) else decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": opt_cfg.weight_decay},
            {"params": rest, "weight_decay": 0},
        ],
        lr=opt_cfg.lr,
        betas=(opt_cfg.b1, opt_cfg.b2),
        eps=opt_cfg.eps,
        foreach=args.torch_foreach,
    )
    images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
    tokens = torch.from_numpy(batch["text"]).long()
    max_scale = math.log(100)

    def run(k: int) -> float:
        for _ in range(k):
            opt.zero_grad(set_to_none=True)
            image_f, text_f, scale = model(images, tokens)
            loss = loss_fn(image_f, text_f, scale)
            loss.backward()
            if opt_cfg.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip_norm)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, max_scale)
        return float(loss.detach())

    params = sum(p.numel() for p in model.parameters())
    return run, params


def matmul_bound(matmuls, args, flops, jax_s, torch_s, peak) -> dict:
    """The step's matmuls timed alone (step_matmuls.py): the fastest the mmjax step could be
    with every other op free, as samples/s, ratio to open_clip and fraction of the peak."""
    log(f"timing the step's {sum(matmuls.values())} matmuls ({len(matmuls)} shapes) alone")
    bound = time_matmuls(matmuls, args.matmul_bound_repeats)
    for label, count, jax_rate, torch_rate in bound["shapes"][:10]:
        log(f"  {count:3d} x {label}: GFLOP/s jax {jax_rate:.0f}, torch {torch_rate:.0f}")
    best = min(bound["seconds"].values())
    return {
        "matmul_only_step_ms": {k: round(1000 * v, 1) for k, v in bound["seconds"].items()},
        "matmul_flops_share": round(bound["flops"] / flops, 3),
        "max_peak_fraction": round(flops / best / 1e9 / peak, 3),
        "max_samples_per_s": round(args.batch / best, 2),
        "max_ratio": round(torch_s / best, 3),
        "mmjax_step_over_matmul_only": round(jax_s / best, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps each, after compile")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--dtype", default="float32", help="mmjax compute dtype")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--matmul_n", type=int, default=2048)
    parser.add_argument("--matmul_repeats", type=int, default=3, help="per round, each")
    parser.add_argument(
        "--matmul_bound_repeats",
        type=int,
        default=5,
        help="times each of the step's matmul shapes is run alone (0: no bound)",
    )
    parser.add_argument(
        "--torch_foreach",
        type=lambda s: {"true": True, "false": False, "none": None}[s.lower()],
        default=True,
        help="torch AdamW foreach (true/false/none)",
    )
    parser.add_argument("overrides", nargs="*", help="mmjax key=value config overrides")
    args = parser.parse_args()

    import jax
    import torch

    torch.set_num_threads(args.threads)
    batch = random_batch(args)
    run_jax, flops, config, jax_params, matmuls = build_mmjax(args, batch)
    run_torch, torch_params = build_open_clip(args, batch, config.optimizer)
    log(f"params: mmjax {jax_params:,}, open_clip {torch_params:,}; step {flops / 1e9:.1f} GFLOP")

    t0 = time.perf_counter()
    loss_jax = run_jax(args.warmup)
    loss_torch = run_torch(args.warmup)
    warm = time.perf_counter() - t0
    log(f"warm-up {warm:.1f}s; loss mmjax {loss_jax:.3f}, open_clip {loss_torch:.3f}")
    probe = matmul_probe(args.matmul_n)

    load_start = os.getloadavg()[0]
    step_s = {"mmjax": [], "open_clip": []}
    peaks = []  # per round: the better of the JAX and torch matmul GFLOP/s
    for r in range(args.rounds):
        for name, run in (("mmjax", run_jax), ("open_clip", run_torch)):
            t0 = time.perf_counter()
            run(args.steps)
            step_s[name].append((time.perf_counter() - t0) / args.steps)
        mm = [probe() for _ in range(args.matmul_repeats)]
        peaks.append({k: statistics.median(m[k] for m in mm) for k in mm[0]})
        log(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k} {1000 * v[-1]:.0f} ms/step" for k, v in step_s.items())
            + ", matmul GFLOP/s "
            + ", ".join(f"{k} {v:.0f}" for k, v in peaks[-1].items())
        )
    median = statistics.median
    jax_s, torch_s = median(step_s["mmjax"]), median(step_s["open_clip"])
    peak = [max(p.values()) for p in peaks]

    def fraction(times: list[float]) -> float:
        """Median over rounds of (step FLOP/s) / (that round's matmul peak)."""
        return round(median(flops / t / 1e9 / p for t, p in zip(times, peak, strict=True)), 3)

    result = {
        "benchmark": "clip_step",
        "batch": args.batch,
        "mmjax_dtype": str(config.model.dtype),
        "threads": args.threads,
        "steps_x_rounds": [args.steps, args.rounds],
        "mmjax_samples_per_s": round(args.batch / jax_s, 2),
        "open_clip_samples_per_s": round(args.batch / torch_s, 2),
        # paired: median over rounds of open_clip step time / mmjax step time
        "ratio": round(median(t / j for j, t in zip(*step_s.values(), strict=True)), 3),
        "mmjax_step_ms": round(1000 * jax_s, 1),
        "open_clip_step_ms": round(1000 * torch_s, 1),
        "best_step_ms": {k: round(1000 * min(v), 1) for k, v in step_s.items()},
        "step_gflops": round(flops / 1e9, 2),
        "matmul_gflops": {k: round(median(p[k] for p in peaks), 1) for k in peaks[0]},
        "mmjax_peak_fraction": fraction(step_s["mmjax"]),
        "open_clip_peak_fraction": fraction(step_s["open_clip"]),
        "load_avg_1min": [round(load_start, 1), round(os.getloadavg()[0], 1)],  # start, end
        "versions": {"jax": jax.__version__, "torch": torch.__version__.split("+")[0]},
    }
    if args.matmul_bound_repeats > 0:
        result.update(matmul_bound(matmuls, args, flops, jax_s, torch_s, median(peak)))
    if args.overrides:
        result["overrides"] = args.overrides
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
