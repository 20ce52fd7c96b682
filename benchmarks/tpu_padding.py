"""The TPU attention kernel's padding waste in a compiled step: tiles fitted to the length
against the fixed 128-token tiles (and head_dim padded to 128) it used before; one JSON line.

  python benchmarks/tpu_padding.py [--config experiments/clip.py:B/16] [--topology v5e:16x16]

Compiles the config's train step twice with `mmjax.aot.compile_train_step` (libtpu
compile-only devices): once as the kernels tile now (`pallas_attention.tpu_tiling`: 197
ViT tokens run as two 104-row query blocks against one 200-key block, head_dim unpadded),
once with every TPU tile 128 x 128 and head_dim padded to a multiple of 128 (the earlier
defaults: 197 tokens padded to 256, head_dim 64 to 128). Both carry the same per-call cost
estimates, so the difference of XLA's compiled FLOPs is the attention work padding wasted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/clip.py:B/16")
    parser.add_argument("--topology", default="v5e:16x16")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()

    import importlib

    from mmjax.aot import compile_train_step
    from mmjax.train.config_cli import apply_overrides, load_config

    # the module (the package re-exports a function of the same name)
    pa = importlib.import_module("mmjax.kernels.pallas_attention")

    def compile_with(backend) -> dict:
        saved = pa.BACKENDS["tpu"]
        pa.BACKENDS["tpu"] = backend
        try:
            config = load_config(args.config)
            apply_overrides(config, args.overrides)
            return compile_train_step(config, args.topology)
        finally:
            pa.BACKENDS["tpu"] = saved

    @dataclasses.dataclass(frozen=True)
    class Fixed128(pa.Backend):
        def tiling(self, q_len, kv_len, head_dim, mask):
            return pa.Tiling.uniform(128, 128)

    fitted = compile_with(pa.BACKENDS["tpu"])
    padded = compile_with(Fixed128("grid", pow2=False, d_multiple=128))
    row = {"benchmark": "tpu_padding", "config": args.config, "topology": args.topology}
    for name, report in (("fitted", fitted), ("padded_128", padded)):
        row[name] = {
            k: report[k]
            for k in ("xla_flops_per_chip", "executed_flops_per_chip", "peak_bytes", "compile_s")
        }
    row["flops_saved_fraction"] = round(
        1 - fitted["xla_flops_per_chip"] / padded["xla_flops_per_chip"], 4
    )
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
