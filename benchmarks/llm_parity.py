"""How close the imported LLMs come to `transformers`: max |logit difference| in f32 for the
small random Llama (GQA, llama3 RoPE scaling), Qwen2, Gemma-2 and OPT models of
tests/test_convert_llm.py, for a full forward pass (XLA reference and Pallas kernel), 16 tokens
of KV-cached greedy decoding (the same tokens?) and the export -> transformers round trip.

  python benchmarks/llm_parity.py     # one JSON line; needs the test extras (torch, transformers)
"""

import json
import os
import sys
import tempfile

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_convert_llm import (  # the tests' models, so both measure the same
    ARCHITECTURES,
    COMMON,
    LENGTH,
    greedy,
    hf_logits,
    hf_model,
    mmjax_logits,
)

from mmjax import convert


def measure(arch: str) -> dict:
    model = hf_model(arch)
    with tempfile.TemporaryDirectory() as source, tempfile.TemporaryDirectory() as exported:
        model.save_pretrained(source, max_shard_size="20KB")
        imported = convert.from_hf_llm(source)
        tokens = np.random.default_rng(0).integers(0, COMMON["vocab_size"], (2, LENGTH))
        want = hf_logits(model, tokens)
        prompt = np.random.default_rng(2).integers(0, COMMON["vocab_size"], (2, 4))
        ours, ours_logits = greedy(imported, prompt, 16)
        model.generation_config.eos_token_id = None
        with torch.no_grad():
            out = model.generate(
                torch.as_tensor(prompt), max_new_tokens=16, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=0,
            )  # fmt: skip
        convert.to_hf_llm(imported.lm, imported.params, exported, dtype="float32")
        back = transformers.AutoModelForCausalLM.from_pretrained(
            exported, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        return {
            "full_xla": float(np.abs(mmjax_logits(imported, tokens) - want).max()),
            "full_pallas": float(np.abs(mmjax_logits(imported, tokens, "pallas") - want).max()),
            "greedy_same_tokens": bool((ours == out.sequences[:, 4:].numpy()).all()),
            "greedy_logits": float(np.abs(ours_logits - torch.stack(out.logits, 1).numpy()).max()),
            "round_trip": float(np.abs(hf_logits(back, tokens) - want).max()),
        }


if __name__ == "__main__":
    print(json.dumps({arch: measure(arch) for arch in sorted(ARCHITECTURES)}))
