"""Contrastive losses: the sharded CLIP and chunked SigLIP losses equal their references.

Sharded runs use 8 CPU devices (conftest) with the batch sharded over ("data", "fsdp") under
`jax.jit`; references run on the same (unsharded) values.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax.objectives import build_loss
from mmjax.objectives.contrastive import (
    clip_loss,
    clip_loss_sharded,
    siglip_loss,
    siglip_loss_sharded,
)
from mmjax.parallel import make_mesh
from mmjax.parallel.sharding import BATCH_AXES

TOL = dict(rtol=1e-5, atol=1e-5)
MESHES = {
    "data8": {"data": 8},
    "data2_fsdp4": {"data": 2, "fsdp": 4},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},  # replicated over tensor
    "single": {"data": 1},
}
# (reference, sharded, number of scalar parameters after the two embeddings)
LOSSES = {
    "clip": (clip_loss, clip_loss_sharded, 1),
    "siglip": (siglip_loss, siglip_loss_sharded, 2),
}


def _mesh(name: str) -> Mesh:
    sizes = MESHES[name]
    return make_mesh(sizes, jax.devices()[:1] if name == "single" else None)


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _pairs(seed: int, batch: int, dim: int, align: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """Unit-norm image/text embeddings, text i correlated with image i by `align`."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    img = _unit(jax.random.normal(k1, (batch, dim)))
    txt = _unit(align * img + (1 - align) * _unit(jax.random.normal(k2, (batch, dim))))
    return img, txt


def _value_and_grads(fn: Callable, n_scalars: int, mesh: Mesh | None = None) -> Callable:
    """jit(value_and_grad) of `fn` w.r.t. every argument; inputs sharded over the batch axes."""
    argnums = tuple(range(2 + n_scalars))
    vg = jax.value_and_grad(fn, argnums=argnums, has_aux=True)
    if mesh is None:
        return jax.jit(vg)
    batch, rep = NamedSharding(mesh, P(BATCH_AXES)), NamedSharding(mesh, P())
    return jax.jit(vg, in_shardings=(batch, batch) + (rep,) * n_scalars)


def _compare(name: str, mesh: Mesh, img: jax.Array, txt: jax.Array, scalars: tuple) -> None:
    ref_fn, sharded_fn, n_scalars = LOSSES[name]
    scalars = tuple(jnp.float32(s) for s in scalars[:n_scalars])
    (ref_loss, ref_metrics), ref_grads = _value_and_grads(ref_fn, n_scalars)(img, txt, *scalars)
    with jax.set_mesh(mesh):
        (loss, metrics), grads = _value_and_grads(sharded_fn, n_scalars, mesh)(img, txt, *scalars)
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    assert set(metrics) == set(ref_metrics)
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], **TOL, err_msg=key)
    for i, (g, ref_g) in enumerate(zip(grads, ref_grads, strict=True)):
        np.testing.assert_allclose(g, ref_g, **TOL, err_msg=f"grad of argument {i}")


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_equals_reference(name: str, mesh_name: str) -> None:
    img, txt = _pairs(0, 32, 16)
    _compare(name, _mesh(mesh_name), img, txt, (10.0, -10.0))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_ties_break_like_argmax(name: str) -> None:
    """All-equal embeddings tie every logit; accuracy counts the first index, as argmax."""
    img = jnp.ones((16, 4)) / 2.0
    _compare(name, _mesh("data2_fsdp4"), img, img, (3.0, -1.0))


@settings(max_examples=12, deadline=None, database=None)
@given(
    name=st.sampled_from(sorted(LOSSES)),
    mesh_name=st.sampled_from(["data8", "data2_fsdp4"]),
    per_device=st.integers(1, 6),
    dim=st.integers(1, 24),
    scale=st.floats(0.5, 100.0),
    bias=st.floats(-15.0, 5.0),
    align=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow
def test_sharded_equals_reference_property(
    name: str,
    mesh_name: str,
    per_device: int,
    dim: int,
    scale: float,
    bias: float,
    align: float,
    seed: int,
) -> None:
    img, txt = _pairs(seed, 8 * per_device, dim, align)
    _compare(name, _mesh(mesh_name), img, txt, (scale, bias))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_without_mesh_falls_back_to_reference(name: str) -> None:
    ref_fn, sharded_fn, n_scalars = LOSSES[name]
    img, txt = _pairs(1, 12, 8)
    scalars = (jnp.float32(10.0), jnp.float32(-10.0))[:n_scalars]
    loss, _ = jax.jit(sharded_fn)(img, txt, *scalars)
    np.testing.assert_allclose(loss, ref_fn(img, txt, *scalars)[0], **TOL)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_batch_not_divisible_is_a_clear_error(name: str) -> None:
    _, sharded_fn, n_scalars = LOSSES[name]
    img, txt = _pairs(2, 12, 8)
    scalars = (jnp.float32(10.0), jnp.float32(-10.0))[:n_scalars]
    with (
        jax.set_mesh(_mesh("data8")),
        pytest.raises(ValueError, match="batch 12 is not divisible by the 8 shards"),
    ):
        sharded_fn(img, txt, *scalars)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_aligned_pairs_give_near_zero_loss(name: str) -> None:
    """One-hot embeddings, text i = image i, large scale: every pair is separated."""
    _, sharded_fn, n_scalars = LOSSES[name]
    img = jnp.eye(16, 32)
    scalars = (jnp.float32(100.0), jnp.float32(-50.0))[:n_scalars]
    with jax.set_mesh(_mesh("data8")):
        loss, metrics = jax.jit(sharded_fn)(img, img, *scalars)
    assert float(loss) < 1e-6
    assert float(metrics["i2t_accuracy"]) == float(metrics["t2i_accuracy"]) == 1.0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_shuffled_pairs_give_higher_loss(name: str) -> None:
    _, sharded_fn, n_scalars = LOSSES[name]
    img, txt = _pairs(3, 64, 32, align=0.6)
    shuffled = txt[jax.random.permutation(jax.random.key(4), 64)]
    scalars = (jnp.float32(10.0), jnp.float32(-10.0))[:n_scalars]
    with jax.set_mesh(_mesh("data2_fsdp4")):
        fn = jax.jit(sharded_fn)
        loss, metrics = fn(img, txt, *scalars)
        shuffled_loss, shuffled_metrics = fn(img, shuffled, *scalars)
    assert float(shuffled_loss) > float(loss) + 0.1
    assert float(shuffled_metrics["i2t_accuracy"]) < float(metrics["i2t_accuracy"])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_build_loss_objective(name: str) -> None:
    """`build_loss(name, apply_fn)` reads the model outputs and matches the reference."""
    ref_fn, _, _ = LOSSES[name]
    img, txt = _pairs(5, 16, 8)
    out = {
        "image_emb": img,
        "text_emb": txt,
        "logit_scale": jnp.float32(10.0),
        "logit_bias": jnp.float32(-10.0),
    }
    loss_fn = build_loss(name, lambda params, batch, rng: out)
    scalars = (out["logit_scale"], out["logit_bias"])[: LOSSES[name][2]]
    with jax.set_mesh(_mesh("data8")):
        loss, metrics = jax.jit(loss_fn)({}, {}, jax.random.key(0))
    np.testing.assert_allclose(loss, ref_fn(img, txt, *scalars)[0], **TOL)
    assert metrics["loss"] == loss


def _temp_bytes(fn: Callable, n_scalars: int, devices: int, per_device: int, dim: int) -> int:
    """Per-device temp bytes of jit(value_and_grad(fn)) with the batch over `devices`."""
    mesh = make_mesh({"data": devices}, jax.devices()[:devices])
    emb = jax.ShapeDtypeStruct((devices * per_device, dim), jnp.float32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    with jax.set_mesh(mesh):
        compiled = (
            _value_and_grads(fn, n_scalars, mesh).lower(emb, emb, *(scalar,) * n_scalars).compile()
        )
    return compiled.memory_analysis().temp_size_in_bytes


def test_sigmoid_loss_memory_is_flat_in_global_batch() -> None:
    """Global batch x8 at a fixed per-device batch: the chunked loss's per-device memory stays
    flat (a few B_local x B_local blocks), while the single-device reference grows with B^2."""
    per_device, dim = 256, 64
    sharded = {d: _temp_bytes(siglip_loss_sharded, 2, d, per_device, dim) for d in (1, 4, 8)}
    # The reference at the same global batches, each on one device.
    reference = [_temp_bytes(siglip_loss, 2, 1, per_device * d, dim) for d in (1, 8)]
    assert reference[1] > 32 * reference[0], reference
    # 1 -> 8 devices adds the ring's loop buffers once; more devices add nothing.
    assert sharded[8] < 2 * sharded[1], sharded
    assert sharded[8] <= 1.05 * sharded[4], sharded
    # Below one B_local x B_global f32 matrix, let alone the global one.
    assert sharded[8] < 8 * per_device * per_device * 4, sharded
    assert sharded[8] < reference[1] / 8, (sharded, reference)
