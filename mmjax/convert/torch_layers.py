"""PyTorch layer weights -> mmjax parameter subtrees, and a shape check against the model.

Torch `nn.Linear` stores [out, in]; mmjax's DenseGeneral stores [in, out] (attention kernels
split into [embed, heads, head_dim] and [heads, head_dim, embed]). Patch convolutions
[out, channels, kh, kw] become the [kh * kw * channels, out] kernel of mmjax.nn.PatchEmbed.
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np

from mmjax.errors import UserError

StateDict = Mapping[str, Any]


def array(tensor: Any) -> np.ndarray:
    """A torch tensor (or array) as an f32 numpy array."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu().float().numpy()
    return np.asarray(tensor, dtype=np.float32)


class Reader:
    """Reads tensors by key from a state dict, with a clear error for a missing key."""

    def __init__(self, state_dict: StateDict, source: str) -> None:
        self.state_dict = state_dict
        self.source = source

    def __call__(self, key: str) -> np.ndarray:
        if key not in self.state_dict:
            raise UserError(f"{self.source} checkpoint has no {key!r}: is it the right model?")
        return array(self.state_dict[key])

    def has(self, key: str) -> bool:
        return key in self.state_dict

    def linear(self, prefix: str, bias: bool = True) -> dict:
        """`prefix.weight` [out, in] (+ `prefix.bias`) -> DenseGeneral {kernel [in, out], bias}."""
        out = {"kernel": self(f"{prefix}.weight").T}
        if bias:
            out["bias"] = self(f"{prefix}.bias")
        return out

    def layer_norm(self, prefix: str) -> dict:
        return {"LayerNorm_0": {"scale": self(f"{prefix}.weight"), "bias": self(f"{prefix}.bias")}}

    def mlp(self, fc1: str, fc2: str) -> dict:
        return {"fc1": self.linear(fc1), "fc2": self.linear(fc2)}

    def attention(self, q: str, k: str, v: str, out: str, num_heads: int) -> dict:
        """Separate q/k/v/out linears (HF) -> mmjax.nn.MultiHeadAttention parameters."""
        proj = [(self(f"{p}.weight"), self(f"{p}.bias")) for p in (q, k, v)]
        return _attention(proj, self(f"{out}.weight"), self(f"{out}.bias"), num_heads)

    def packed_attention(self, prefix: str, num_heads: int) -> dict:
        """torch.nn.MultiheadAttention (`in_proj_weight` holds q, k, v stacked)."""
        weights = np.split(self(f"{prefix}.in_proj_weight"), 3)
        biases = np.split(self(f"{prefix}.in_proj_bias"), 3)
        out_w, out_b = self(f"{prefix}.out_proj.weight"), self(f"{prefix}.out_proj.bias")
        return _attention(list(zip(weights, biases, strict=True)), out_w, out_b, num_heads)

    def patch_conv(self, key: str, bias: str | None = None) -> dict:
        """Conv2d weight [out, c, kh, kw] -> PatchEmbed kernel [(kh kw c), out] (raster, NHWC)."""
        weight = self(key)
        out = {"kernel": weight.transpose(2, 3, 1, 0).reshape(-1, weight.shape[0])}
        if bias is not None:
            out["bias"] = self(bias)
        return {"proj": out}


def _attention(qkv: list, out_w: np.ndarray, out_b: np.ndarray, num_heads: int) -> dict:
    width = out_w.shape[0]
    if width % num_heads:
        raise UserError(f"attention width {width} is not divisible by {num_heads} heads")
    head_dim = width // num_heads
    params = {
        name: {
            "kernel": w.T.reshape(w.shape[1], num_heads, head_dim),
            "bias": b.reshape(num_heads, head_dim),
        }
        for name, (w, b) in zip(("query", "key", "value"), qkv, strict=True)
    }
    params["out"] = {"kernel": out_w.T.reshape(num_heads, head_dim, width), "bias": out_b}
    return params


def check_against_model(params: dict, init: Callable[[], Any], source: str) -> dict[str, jax.Array]:
    """Checks that `params` has exactly the leaves and shapes `init()` (a model.init) creates.

    Returns the params as a plain (unboxed) tree of f32 numpy arrays, in host memory. Errors
    name the first path whose presence or shape differs, so a wrong architecture or config is
    caught at import.
    """
    expected = flax.traverse_util.flatten_dict(nn.unbox(jax.eval_shape(init)["params"]), sep="/")
    got = flax.traverse_util.flatten_dict(params, sep="/")
    for path in sorted(set(expected) | set(got)):
        if path not in got:
            raise UserError(f"{source}: the converted parameters lack {path!r}")
        if path not in expected:
            raise UserError(f"{source}: the converted parameter {path!r} has no place in mmjax")
        if tuple(expected[path].shape) != tuple(got[path].shape):
            raise UserError(
                f"{source}: {path} has shape {tuple(got[path].shape)} in the checkpoint but "
                f"{tuple(expected[path].shape)} in the mmjax model"
            )
    # host (numpy) arrays: a 7B LM in f32 would not fit the default device of a TPU host; the
    # trainer places them straight onto their shardings
    return flax.traverse_util.unflatten_dict(
        {k: np.asarray(v, dtype=np.float32) for k, v in got.items()}, sep="/"
    )
