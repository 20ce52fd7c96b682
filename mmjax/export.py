"""CLI: write the language model of a trained workdir as a Hugging Face checkpoint.

  python -m mmjax.export --workdir DIR --out HF_DIR [--dtype bfloat16|float32] [--step N]

Reads `DIR/config.json` and the newest complete checkpoint (or step N), takes the causal LM
(`lm/` of a VLM, TextLM or UniFluid run), unscans its blocks and writes `HF_DIR/config.json`,
`HF_DIR/model.safetensors` and the run's HF tokenizer files: `transformers` loads it as a
LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Gemma2ForCausalLM or OPTForCausalLM
(mmjax.convert.hf_llm.hf_model_type). Token rows the run added for its own special tokens (a
VLM's <image>) are kept; the tokenizer files do not name them. HF_DIR must be new or empty.
"""

import argparse
import json
import os
import sys
from collections.abc import Sequence

from mmjax.errors import UserError


def export(workdir: str, out: str, *, dtype: str = "bfloat16", step: int = -1) -> dict:
    """Writes the LM of `workdir`'s checkpoint to `out`; returns {step, model_type, out}."""
    import flax.linen as nn
    import jax

    from mmjax import convert, models
    from mmjax.models.causal_lm import CausalLM, lm_field_names
    from mmjax.parallel import layout
    from mmjax.train.build import load_trained
    from mmjax.train.stages import param_paths, replace_leaves

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out {out!r} exists and is not an empty directory")
    trained = load_trained(workdir, step=step)
    config = trained.config
    if not models.holds_causal_lm(config.model.name):
        raise UserError(f"model {config.model.name!r} holds no causal LM to export")
    fields = {k: v for k, v in config.model.to_dict().items() if k in lm_field_names()}
    fields.update(scan_layers=False, decode=False)
    lm = CausalLM(**fields)
    tokens = jax.numpy.zeros((1, 1), jax.numpy.int32)
    target = nn.unbox(jax.eval_shape(lm.init, jax.random.key(0), tokens, None, tokens))["params"]
    values = layout.to_layout(param_paths(trained.params["lm"]), param_paths(target))
    params = replace_leaves(target, values)
    tokenizer_dir = config.data.tokenizer_path if config.data.tokenizer == "hf" else None
    kind = convert.to_hf_llm(fields, params, out, tokenizer_dir=tokenizer_dir, dtype=dtype)
    return {"step": trained.step, "model_type": kind, "out": out}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmjax.export", description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--step", type=int, default=-1, help="default: the newest checkpoint")
    args = parser.parse_args(argv)
    try:
        result = export(args.workdir, args.out, dtype=args.dtype, step=args.step)
    except UserError as e:
        print(f"mmjax.export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
