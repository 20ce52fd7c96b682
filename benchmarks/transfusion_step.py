"""Transfusion training-step throughput, mmjax vs transfusion-pytorch, alternately; one JSON line.

  python benchmarks/transfusion_step.py [--batch 16] [--steps 1] [--rounds 5] [--threads 2 1]
  python benchmarks/transfusion_step.py --large  # 32x32x4 latents, 2x2 patches (256), batch 8

The issue's config on both sides (f32, CPU): width 256, 6 layers, 4 heads of 64, SwiGLU/GEGLU
hidden 682 (= int(8/3 * 256), what transfusion-pytorch's `ff_expansion_factor=4` gives), text
vocab 8192; each sample is 32 text tokens, one image of 8x8 latents of dim 16 (patch 1: 64
image tokens), then 16 text tokens; batch 16; AdamW (lr 1e-3, betas (0.9, 0.95), eps 1e-8,
weight decay 0.1 on matrices only, global-norm clipping at 1.0, from experiments/transfusion.py).
A latent of H x W x C in p x p patches is fed to transfusion-pytorch as an (H/p, W/p, p*p*C)
tensor: its linear latent projection is then exactly mmjax's linear patch embedding.

- mmjax: the trainer's own jitted step (`Trainer.jit_train_step`: noising, loss
  L_LM + 5 * L_DDPM, grads, clipping, AdamW, NaN guard, donated state) for
  experiments/transfusion.py:tiny with the shapes above, on one CPU device, over one fixed
  batch laid out by `mmjax.data.sequences.layout` (the function the data pipeline uses):
  <bos> 32 text <BOI> patches <EOI> 16 text <eos>, padded to `--seq_len` (default: the next
  multiple of 8). `key=value` arguments override the config further (e.g.
  `model.attention_impl=pallas`).
- transfusion-pytorch: `Transfusion(num_text_tokens=vocab, dim_latent=p*p*C,
  modality_default_shape=(H/p, W/p), transformer=dict(dim, depth, dim_head, heads,
  ff_expansion_factor=4, qk_rmsnorm=False, attn_kwargs=dict(gate_values=False)),
  flow_loss_weight=5)` in eager torch (f32) on the same samples
  as lists `[text(32), image, text(16)]`; its forward returns L_text + 5 * L_flow; then
  backward, the same clipping and AdamW (no decay on vectors and the text embedding).

Architecture differences left after switching transfusion-pytorch's optional extras off (its
QK RMSNorm and value gates; `unet_skips=False` fails an assertion in 0.20.0, so its U-Net skips,
a Linear(2*dim -> dim) in each layer of the second half, stay on):
- transfusion-pytorch wraps attention and feed-forward of every layer in an adaptive LayerNorm
  (FiLM scale/shift + a sigmoid output gate, both Linear(4*dim -> dim) maps of a per-token
  time condition, computed for every token, text included): about 3x the block's own matmul
  FLOPs. `--torch_lean` monkeypatches it to its text path (LayerNorm * (1 + gamma), output
  * (1 + layerscale)) for every token, so both sides do about the same work; `step_gflops`
  shows what each side computes.
- transfusion-pytorch mixes all previous layer outputs into the residual stream after each
  layer (`AttentionResidual`, cheap); soft-caps attention logits at 50 (tanh); uses LayerNorm
  (no affine) + learned scale instead of RMSNorm; GEGLU with biases instead of bias-free
  SwiGLU; a random-Fourier time embedding to 4*dim on every token; RoPE with all patches of an
  image at one position; meta tokens ([meta] "8,8" [som]) before an image (sequence 119 vs
  mmjax's 116 + padding); 137 extra special ids in its text vocab; its attention is a
  materialised masked softmax (einsum), as is mmjax's "xla" reference, which "auto" picks on
  CPU.
- mmjax adds learned 2D patch positions and an RMSNorm before its patch read-out.
- Objective: mmjax L_LM + 5 * DDPM epsilon MSE (cosine, 1,000 steps); transfusion-pytorch
  L_text + 5 * rectified-flow MSE and CFG text dropout 10%; the arithmetic of both is tiny.

After compiling and warming up both, each of `--rounds` rounds times `--steps` mmjax steps
(dispatched back to back, as the trainer does, then blocked on), then `--steps`
transfusion-pytorch steps at each of `--threads` torch intra-op thread counts, then
`--matmul_repeats` f32 `--matmul_n`-cubed matmuls in JAX and in torch at each thread count.
On a shared machine torch's OpenMP threads can wait on each other: with another process on
the second core, 2 threads ran 2-3x slower than 1 here, so every count is timed and the
fastest (by median) is the reported baseline; `by_torch_threads` has each. Samples/s come
from the median per-step times; `ratio` (mmjax / transfusion-pytorch samples/s) is the
median over rounds of the per-round time ratio. `step_gflops`: mmjax from XLA's cost
analysis of the compiled step, transfusion-pytorch from torch's FlopCounterMode over one
forward + backward (matmul-like ops only). `*_peak_fraction`: median over rounds of each
side's FLOP/s over that round's matmul peak (the best of JAX and torch). Progress goes to
stderr.
"""

import argparse
import json
import os
import statistics
import sys
import time

from matmul_peak import matmul_probe  # benchmarks/ is on sys.path as the script's folder
from trainer_step import compile_trainer_step

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def log(msg: str) -> None:
    print(f"[transfusion_step] {msg}", file=sys.stderr, flush=True)


def shapes(args) -> dict:
    """Derived shapes: patches per image, patch dim, mmjax sequence length."""
    h, w, c = args.latent
    p = args.patch
    if h % p or w % p:
        raise SystemExit(f"--latent {args.latent} is not divisible by --patch {p}")
    num_patches, patch_dim = (h // p) * (w // p), p * p * c
    needed = 1 + args.text_before + 1 + num_patches + 1 + args.text_after + 1
    seq_len = args.seq_len or -(-needed // 8) * 8
    if seq_len < needed:
        raise SystemExit(f"--seq_len {seq_len} < {needed} tokens of one sample")
    return dict(num_patches=num_patches, patch_dim=patch_dim, needed=needed, seq_len=seq_len)


def small_config(args, shp):
    """experiments/transfusion.py:tiny with the benchmark's shapes, batch and dtype."""
    from mmjax.train.config_cli import apply_overrides, load_config

    config = load_config("experiments/transfusion.py:tiny")
    config.batch_size = args.batch
    config.mesh.update(data=1, fsdp=1, tensor=1)
    config.data.update(tokenizer="byte", image_size=args.latent[0])
    config.data.sequence.update(
        max_len=shp["seq_len"], patch_size=args.patch, channels=args.latent[2]
    )
    config.model.update(
        vocab_size=args.vocab,
        width=args.width,
        depth=args.depth,
        num_heads=args.heads,
        mlp_dim=args.mlp_dim,
        image_shape=tuple(args.latent),
        patch_size=args.patch,
        dtype=args.dtype,
        remat_policy="none",
    )
    apply_overrides(config, args.overrides)
    return config


def random_samples(args, shp, tokenizer, seed: int = 0) -> tuple[dict, list]:
    """The same samples for both sides: (mmjax batch of numpy arrays, torch list of lists)."""
    import numpy as np
    import torch

    from mmjax.data.sequences import layout

    rng = np.random.default_rng(seed)
    h, w, c = args.latent
    p = args.patch
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}
    specials |= {tokenizer.boi_id, tokenizer.eoi_id}
    low = max(specials) + 1
    if low >= args.vocab:
        raise SystemExit(f"--vocab {args.vocab} leaves no text ids above the specials")
    rows, torch_samples = [], []
    for _ in range(args.batch):
        before = rng.integers(low, args.vocab, args.text_before).tolist()
        after = rng.integers(low, args.vocab, args.text_after).tolist()
        image = rng.standard_normal((h, w, c)).astype(np.float32)
        ids = [tokenizer.bos_id, *before, tokenizer.boi_id]
        start = len(ids)
        ids += [tokenizer.pad_id] * shp["num_patches"] + [tokenizer.eoi_id, *after]
        ids.append(tokenizer.eos_id)
        markers = (tokenizer.boi_id, tokenizer.eoi_id)
        row = layout(ids, [start], shp["num_patches"], shp["seq_len"], tokenizer.pad_id, markers)
        rows.append(row | {"images": image[None], "image_valid": np.ones((1,), np.float32)})
        # the same latent in p x p patches, channel-last: (H/p, W/p, p*p*C)
        patches = image.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4)
        patches = patches.reshape(h // p, w // p, p * p * c)
        torch_samples.append(
            [torch.tensor(before), torch.from_numpy(patches.copy()), torch.tensor(after)]
        )
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    return batch, torch_samples


def build_mmjax(args, config, trainer, batch):
    """(run(k): k steps then block -> loss, compiled step FLOPs, params)."""
    import jax

    compiled, state, device_batch, flops, _ = compile_trainer_step(trainer, batch, log)
    holder = {"state": state}

    def run(k: int) -> float:
        if k < 1:
            return float("nan")
        state = holder["state"]
        for _ in range(k):
            state, metrics = compiled(state, device_batch)  # donates the state
        loss = float(jax.block_until_ready(metrics)["loss"])
        holder["state"] = state
        return loss

    params = sum(x.size for x in jax.tree.leaves(state.params))
    return run, flops, params


def lean_adaptive_wrapper() -> None:
    """--torch_lean: transfusion-pytorch's AdaptiveWrapper takes its text path for all tokens."""
    from transfusion_pytorch import transfusion as tp

    def forward(self, x, cond=None, is_any_modality=None, modality_only=False, **kwargs):
        return self.forward_text(x, **kwargs)

    tp.AdaptiveWrapper.forward = forward


def build_torch(args, shp, samples, opt_cfg):
    """(run(k): k transfusion-pytorch training steps -> loss, fwd+bwd FLOPs, params)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transfusion_pytorch import Transfusion

    if args.torch_lean:
        lean_adaptive_wrapper()
    torch.manual_seed(0)
    model = Transfusion(
        num_text_tokens=args.vocab,
        dim_latent=shp["patch_dim"],
        modality_default_shape=(args.latent[0] // args.patch, args.latent[1] // args.patch),
        transformer=dict(
            dim=args.width,
            depth=args.depth,
            dim_head=args.width // args.heads,
            heads=args.heads,
            ff_expansion_factor=(args.mlp_dim + 0.5) * 3 / (2 * args.width),
            qk_rmsnorm=False,
            attn_kwargs=dict(gate_values=False),
        ),
        flow_loss_weight=5.0,
    )
    model.train()
    ff = model.transformer.layers[0][2].fn.net[0]
    assert ff.out_features == 2 * args.mlp_dim, ff  # GEGLU hidden == mmjax's mlp_dim
    no_decay = ("text_embed",)
    decay, rest = [], []
    for name, p in model.named_parameters():
        (rest if p.ndim < 2 or any(s in name for s in no_decay) else decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": opt_cfg.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=opt_cfg.lr,
        betas=(opt_cfg.b1, opt_cfg.b2),
        eps=opt_cfg.eps,
        foreach=True,
    )

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = model(samples)
        loss.backward()
        if opt_cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip_norm)
        opt.step()
        return loss

    def run(k: int) -> float:
        loss = torch.tensor(float("nan"))
        for _ in range(k):
            loss = step()
        return float(loss.detach())

    step()  # processing-strategy routing and lazy init happen on the first call
    counter = FlopCounterMode(display=False)
    with counter:
        model(samples).backward()
    opt.zero_grad(set_to_none=True)
    params = sum(p.numel() for p in model.parameters())
    return run, float(counter.get_total_flops()), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps each, after compile")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[2, 1],
        help="torch intra-op thread counts, each timed every round; the fastest is reported",
    )
    parser.add_argument("--dtype", default="float32", help="mmjax compute dtype")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mlp_dim", type=int, default=682, help="SwiGLU / GEGLU hidden width")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--latent", type=int, nargs=3, default=[8, 8, 16], metavar=("H", "W", "C"))
    parser.add_argument("--patch", type=int, default=1)
    parser.add_argument("--text_before", type=int, default=32)
    parser.add_argument("--text_after", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=0, help="mmjax max_len (0: next x8)")
    parser.add_argument(
        "--large", action="store_true", help="32x32x4 latents, patch 2 (256 image tokens), batch 8"
    )
    parser.add_argument(
        "--torch_lean",
        action="store_true",
        help="transfusion-pytorch without its per-token adaptive LayerNorm (see docstring)",
    )
    parser.add_argument("--matmul_n", type=int, default=1024)
    parser.add_argument("--matmul_repeats", type=int, default=3, help="per round, each")
    parser.add_argument("overrides", nargs="*", help="mmjax key=value config overrides")
    args = parser.parse_args()
    if args.large:
        args.latent, args.patch, args.batch = [32, 32, 4], 2, 8

    import jax
    import torch

    from mmjax.train.loop import Trainer

    median = statistics.median

    torch.set_num_threads(args.threads[0])
    shp = shapes(args)
    config = small_config(args, shp)
    trainer = Trainer(config, workdir=None, devices=jax.devices()[:1])
    batch, torch_samples = random_samples(args, shp, trainer.tokenizer)
    run_jax, jax_flops, jax_params = build_mmjax(args, config, trainer, batch)
    run_torch, torch_flops, torch_params = build_torch(args, shp, torch_samples, config.optimizer)
    log(
        f"params: mmjax {jax_params:,}, transfusion-pytorch {torch_params:,}; step GFLOP: "
        f"mmjax {jax_flops / 1e9:.1f} (XLA), transfusion-pytorch {torch_flops / 1e9:.1f}"
    )

    t0 = time.perf_counter()
    loss_jax = run_jax(args.warmup)
    for n in args.threads:
        torch.set_num_threads(n)
        loss_torch = run_torch(args.warmup)
    log(
        f"warm-up {time.perf_counter() - t0:.1f}s; "
        f"loss mmjax {loss_jax:.3f}, transfusion-pytorch {loss_torch:.3f}"
    )
    probe = matmul_probe(args.matmul_n)

    # name: (torch threads or None, run)
    runs = {"mmjax": (None, run_jax)} | {f"torch_t{n}": (n, run_torch) for n in args.threads}
    step_s = {name: [] for name in runs}
    peaks = []
    for r in range(args.rounds):
        for name, (threads, run) in runs.items():
            if threads:
                torch.set_num_threads(threads)
            t0 = time.perf_counter()
            run(args.steps)
            step_s[name].append((time.perf_counter() - t0) / args.steps)
        peaks.append({})
        for n in args.threads:  # the matmul peak: JAX, and torch at each thread count
            torch.set_num_threads(n)
            mm = [probe() for _ in range(args.matmul_repeats)]
            peaks[-1] |= {
                k if k == "jax" else f"torch_t{n}": median(m[k] for m in mm) for k in mm[0]
            }
        log(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k} {1000 * v[-1]:.0f} ms/step" for k, v in step_s.items())
            + ", matmul GFLOP/s "
            + ", ".join(f"{k} {v:.0f}" for k, v in peaks[-1].items())
        )
    jax_s = median(step_s["mmjax"])
    best = min((k for k in step_s if k != "mmjax"), key=lambda k: median(step_s[k]))
    torch_s = median(step_s[best])
    peak = [max(p.values()) for p in peaks]

    def paired_ratio(key: str) -> float:
        pairs = zip(step_s["mmjax"], step_s[key], strict=True)
        return round(median(t / j for j, t in pairs), 3)

    def fraction(flops: float, times: list[float]) -> float:
        return round(median(flops / t / 1e9 / p for t, p in zip(times, peak, strict=True)), 3)

    result = {
        "benchmark": "transfusion_step",
        "batch": args.batch,
        "shapes": {
            "width": args.width,
            "depth": args.depth,
            "heads": args.heads,
            "mlp_dim": args.mlp_dim,
            "vocab": args.vocab,
            "text": [args.text_before, args.text_after],
            "latent": list(args.latent),
            "patch": args.patch,
            "image_tokens": shp["num_patches"],
            "mmjax_seq_len": shp["seq_len"],
        },
        "mmjax_dtype": str(config.model.dtype),
        "attention_impl": str(config.model.attention_impl),
        "torch_lean": args.torch_lean,
        "steps_x_rounds": [args.steps, args.rounds],
        "mmjax_samples_per_s": round(args.batch / jax_s, 2),
        # at its fastest thread count
        "transfusion_pytorch_samples_per_s": round(args.batch / torch_s, 2),
        "transfusion_pytorch_threads": int(best.removeprefix("torch_t")),
        # paired: median over rounds of transfusion-pytorch step time / mmjax step time
        "ratio": paired_ratio(best),
        "by_torch_threads": {
            k.removeprefix("torch_t"): {
                "samples_per_s": round(args.batch / median(step_s[k]), 2),
                "ratio": paired_ratio(k),
            }
            for k in step_s
            if k != "mmjax"
        },
        "mmjax_step_ms": round(1000 * jax_s, 1),
        "transfusion_pytorch_step_ms": round(1000 * torch_s, 1),
        "step_gflops": {
            "mmjax_xla": round(jax_flops / 1e9, 2),
            "transfusion_pytorch_fwd_bwd": round(torch_flops / 1e9, 2),
        },
        "params": {"mmjax": jax_params, "transfusion_pytorch": torch_params},
        "matmul_gflops": {k: round(median(p[k] for p in peaks), 1) for k in peaks[0]},
        "mmjax_peak_fraction": fraction(jax_flops, step_s["mmjax"]),
        "transfusion_pytorch_peak_fraction": fraction(torch_flops, step_s[best]),
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__.split("+")[0],
            "transfusion_pytorch": _version("transfusion-pytorch"),
        },
    }
    if args.overrides:
        result["overrides"] = args.overrides
    print(json.dumps(result))


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    sys.exit(main())
