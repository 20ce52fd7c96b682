"""parallel.layout: parameters converted between the scanned and unscanned stack layouts give
the same function, round-trip bit for bit, and what cannot be mapped is a one-line ValueError."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmjax.models.vit import VisionTransformer
from mmjax.nn import Transformer
from mmjax.parallel.layout import differs_by_layout, to_layout

F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="xla")
WIDTH = 16
VIT = dict(patch_size=4, width=WIDTH, num_heads=2, mlp_dim=32, **F32)
IMAGES = np.random.default_rng(1).standard_normal((2, 8, 8, 3), np.float32)


def param_paths(tree: dict, prefix: str = "") -> dict:
    """{"a/b": x} of nested dicts of arrays (train.stages.param_paths, without importing the
    training package)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= param_paths(value, f"{prefix}{key}/")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def nest(flat: dict) -> dict:
    """{"a/b": x} -> {"a": {"b": x}}: param_paths undone."""
    tree: dict = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = leaf
    return tree


def shapes(flat: dict) -> dict:
    return {p: jax.ShapeDtypeStruct(np.shape(x), x.dtype) for p, x in flat.items()}


def tokens(seed: int) -> jnp.ndarray:
    return jax.random.normal(jax.random.key(seed), (2, 5, WIDTH))


def transformer(depth: int, scan: bool, causal: bool = False) -> Transformer:
    return Transformer(depth, 2, 32, causal=causal, scan_layers=scan, **F32)


@functools.cache
def layout(depth: int, scan: bool, causal: bool = False) -> dict:
    """A Transformer's flat parameter shapes, traced by its own init (nothing compiled)."""
    boxed = jax.eval_shape(transformer(depth, scan, causal).init, jax.random.key(0), tokens(0))
    return param_paths(nn.unbox(boxed["params"]))


def random_params(target: dict, seed: int = 0) -> dict:
    """Random numpy arrays of `target`'s shapes. Unlike an init (zero biases, unit norm
    scales) every block's parameters differ, so a block or parameter mixed up shows in the
    outputs; and nothing compiles (a scanned init compiles its scan body: seconds on CPU)."""
    rng = np.random.default_rng(seed)
    return {p: 0.1 * rng.standard_normal(x.shape, np.float32) for p, x in target.items()}


def params_of(depth: int, scan: bool, prefix: str = "", seed: int = 0) -> dict:
    """Random flat params of a Transformer's own layout, under `prefix`."""
    flat = random_params(layout(depth, scan), seed)
    return {prefix + p: x for p, x in flat.items()}


@functools.cache
def compiled_apply(depth: int, scan: bool, causal: bool = False):
    """The model's jitted apply, compiled once per (depth, scan) for all examples (eagerly a
    scanned stack compiles its scan body at every call)."""
    return jax.jit(transformer(depth, scan, causal).apply)


def run(depth: int, scan: bool, flat: dict, seed: int) -> jnp.ndarray:
    return compiled_apply(depth, scan)({"params": nest(flat)}, tokens(seed))


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for path in want:
        assert np.shape(got[path]) == np.shape(want[path]), path
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)


@settings(max_examples=10, deadline=None)
@given(depth=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_converted_transformer_params_give_the_same_outputs_both_ways(depth, seed):
    unscanned, scanned_layout = params_of(depth, False, seed=seed), layout(depth, True)
    assert differs_by_layout(unscanned, scanned_layout)
    assert differs_by_layout(scanned_layout, unscanned)

    as_scanned = to_layout(unscanned, scanned_layout)
    assert set(as_scanned) == set(scanned_layout)
    want = run(depth, False, unscanned, seed)
    np.testing.assert_allclose(run(depth, True, as_scanned, seed), want, atol=1e-5)
    assert_same(to_layout(as_scanned, shapes(unscanned)), unscanned)  # round trip

    scanned = random_params(scanned_layout, seed)
    as_unscanned = to_layout(scanned, shapes(unscanned))
    want = run(depth, True, scanned, seed)
    np.testing.assert_allclose(run(depth, False, as_unscanned, seed), want, atol=1e-5)
    assert_same(to_layout(as_unscanned, scanned_layout), scanned)


def test_depth_one_scanned_is_only_last_and_maps_to_block0():
    scanned, unscanned = params_of(1, True), params_of(1, False)
    assert {p.split("/")[0] for p in scanned} == {"last"}
    renamed = {p.replace("block0", "last"): x for p, x in unscanned.items()}
    assert_same(to_layout(unscanned, scanned), renamed)  # arrays as the target's shapes too
    assert_same(
        to_layout(scanned, unscanned), {p.replace("last", "block0"): x for p, x in scanned.items()}
    )


def test_logically_boxed_target_shapes_are_read_through_their_box():
    """param_paths of an eval_shape'd init, not unboxed: nn.Partitioned leaves."""
    boxed = jax.eval_shape(transformer(3, True).init, jax.random.key(0), tokens(0))["params"]
    target = param_paths(boxed)
    assert isinstance(target["layers/attn/query/kernel"], nn.Partitioned)
    converted = to_layout(params_of(3, False), target)
    assert_same(converted, to_layout(params_of(3, False), layout(3, True)))


def test_a_vision_and_a_text_tower_in_one_tree_convert_together():
    """Stacks of depth 3 at `vision/encoder` and 2 at `lm` in one tree; the parameters
    outside them pass through as the same objects."""

    def tree(scan: bool) -> dict:
        """The shapes scanned, random params unscanned."""
        vit = VisionTransformer(depth=3, scan_layers=scan, **VIT)
        vision = jax.eval_shape(vit.init, jax.random.key(0), IMAGES)["params"]
        shaped = param_paths({"vision": nn.unbox(vision), "lm": nest(layout(2, scan, True))})
        return shaped if scan else random_params(shaped)

    unscanned, scanned = tree(False), tree(True)
    assert "vision/encoder/layers/attn/query/kernel" in scanned
    assert "lm/layers/mlp/fc1/kernel" in scanned
    assert differs_by_layout(unscanned, scanned)
    converted = to_layout(unscanned, scanned)
    assert set(converted) == set(scanned)
    assert converted["vision/pos_embedding"] is unscanned["vision/pos_embedding"]
    q = converted["vision/encoder/layers/attn/query/kernel"]
    assert q.shape == (2, WIDTH, 2, 8)
    np.testing.assert_array_equal(q[1], unscanned["vision/encoder/block1/attn/query/kernel"])

    params = nest(converted)

    # CLS pooling: the scanned `last` block computes only the CLS token (read_at). Jitted:
    # eagerly the ViT takes seconds on CPU
    def pooled(scan: bool, vision: dict) -> jnp.ndarray:
        vit = VisionTransformer(depth=3, scan_layers=scan, **VIT)
        return jax.jit(functools.partial(vit.apply, pooled_only=True))(vision, IMAGES)[0]

    want = pooled(False, {"params": nest(unscanned)["vision"]})
    np.testing.assert_allclose(pooled(True, {"params": params["vision"]}), want, atol=1e-5)
    want = compiled_apply(2, False, True)({"params": nest(unscanned)["lm"]}, tokens(3))
    got = compiled_apply(2, True, True)({"params": params["lm"]}, tokens(3))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert_same(to_layout(converted, shapes(unscanned)), unscanned)


def test_a_vit_without_its_last_block_converts_to_layers_only():
    """feature_layer=-2 builds blocks 0..depth-2 unscanned and only `layers` scanned."""
    images, key = IMAGES, jax.random.key(0)

    def params(scan: bool) -> dict:
        """The shapes scanned, random params unscanned."""
        vit = VisionTransformer(depth=3, scan_layers=scan, **VIT)
        built = jax.eval_shape(functools.partial(vit.init, feature_layer=-2), key, images)
        shaped = param_paths(nn.unbox(built["params"]))
        return shaped if scan else random_params(shaped)

    unscanned, scanned = params(False), params(True)
    assert not any("/last/" in p for p in scanned)
    converted = to_layout(unscanned, scanned)

    def features(scan: bool, params: dict) -> jnp.ndarray:
        vit = VisionTransformer(depth=3, scan_layers=scan, **VIT)
        apply = jax.jit(functools.partial(vit.apply, feature_layer=-2))
        return apply({"params": nest(params)}, images)[1]

    np.testing.assert_allclose(features(True, converted), features(False, unscanned), atol=1e-5)
    assert_same(to_layout(converted, shapes(unscanned)), unscanned)


# Model-free stacks: several prefixes (one at the root), any depth, numpy or jax arrays.
stack_specs = st.lists(
    st.tuples(
        st.integers(1, 4),  # depth
        st.booleans(),  # with its last block
        st.lists(st.integers(1, 3), min_size=0, max_size=2),  # a parameter's shape
    ),
    min_size=1,
    max_size=3,
)


def synthetic(specs: list, scan: bool, as_jax: bool) -> dict:
    """Stacks `s{k}/enc` (the first at the root) of two parameters each, plus `head/w`."""
    rng = np.random.default_rng(0)
    tree = {"head/w": rng.normal(size=(2, 3)).astype(np.float32)}
    for k, (depth, has_last, shape) in enumerate(specs):
        prefix = "" if k == 0 else f"s{k}/enc/"
        n = depth if has_last else depth - 1
        for name in ("attn/w", "norm/scale"):
            blocks = [rng.normal(size=shape).astype(np.float32) for _ in range(n)]
            if not scan:
                tree |= {f"{prefix}block{i}/{name}": b for i, b in enumerate(blocks)}
                continue
            if depth > 1:
                tree[f"{prefix}layers/{name}"] = np.stack(blocks[: depth - 1])
            if has_last:
                tree[f"{prefix}last/{name}"] = blocks[-1]
    return {p: jnp.asarray(x) for p, x in tree.items()} if as_jax else tree


@settings(max_examples=25, deadline=None)
@given(specs=stack_specs, as_jax=st.booleans())
def test_synthetic_stacks_round_trip_exactly(specs, as_jax):
    specs = [(d, last or d == 1, s) for d, last, s in specs]  # a stack has at least one block
    unscanned, scanned = synthetic(specs, False, as_jax), synthetic(specs, True, as_jax)
    assert_same(to_layout(unscanned, shapes(scanned)), scanned)
    assert_same(to_layout(scanned, shapes(unscanned)), unscanned)
    assert_same(to_layout(unscanned, shapes(unscanned)), unscanned)  # identity
    converted = to_layout(unscanned, shapes(scanned))
    back = to_layout(scanned, shapes(unscanned))
    kind = jax.Array if as_jax else np.ndarray  # numpy stays numpy, 0-d included
    assert all(isinstance(x, kind) for x in [*converted.values(), *back.values()])
    assert converted["head/w"] is unscanned["head/w"]
    assert differs_by_layout(unscanned, scanned) and not differs_by_layout(scanned, scanned)


def one_line_error(source: dict, target: dict, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        to_layout(source, target)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_a_depth_mismatch_is_a_clear_error():
    message = one_line_error(
        params_of(3, False), layout(4, True), r"stack <root> has depth 3 in the source"
    )
    assert "(unscanned, 3 blocks) but 4 in the target (scanned, 3 layers + last)" in message
    one_line_error(params_of(4, True), layout(3, False), r"depth 4 in the source")
    one_line_error(params_of(2, True), layout(3, True), r"depth 2 in the source")
    # the same layout with more blocks in the target: block3 has no source
    one_line_error(params_of(3, False), layout(4, False), r"depth 3 .* but 4 in the target")


def test_a_missing_path_or_shape_mismatch_is_a_clear_error():
    source = params_of(2, False, "lm/")
    target = shapes(params_of(2, True, "lm/"))
    extra = target | {"lm/head/kernel": jax.ShapeDtypeStruct((16, 40), jnp.float32)}
    one_line_error(source, extra, r"target lm/head/kernel \(16, 40\) has no source")

    del source["lm/block1/mlp/fc1/kernel"]
    one_line_error(
        source,
        target,
        r"target lm/last/mlp/fc1/kernel \(16, 32\) needs source lm/block1/mlp/fc1/kernel, "
        "which is absent",
    )

    source = params_of(2, True, "lm/")
    kernel = "lm/layers/attn/query/kernel"
    source[kernel] = np.zeros((1, WIDTH, 2, 4), np.float32)
    one_line_error(
        source,
        shapes(params_of(2, False, "lm/")),
        r"target lm/block0/attn/query/kernel \(16, 2, 8\) needs source "
        r"lm/layers/attn/query/kernel of shape \(1, 16, 2, 8\), but it is \(1, 16, 2, 4\)",
    )
    bad = {"lm/norm/scale": jax.ShapeDtypeStruct((3,), jnp.float32)}
    one_line_error(
        {"lm/norm/scale": np.ones(4)},
        bad,
        r"target lm/norm/scale is \(3,\), but source lm/norm/scale is \(4,\)",
    )


def test_differs_by_layout_only_for_flipped_stacks_with_the_same_parameters():
    unscanned, scanned = set(layout(2, False)), set(layout(2, True))
    assert differs_by_layout(unscanned, scanned)
    assert not differs_by_layout(unscanned, unscanned)
    assert not differs_by_layout(unscanned, scanned | {"head/kernel"})
    assert not differs_by_layout(unscanned - {"block1/mlp/fc1/kernel"}, scanned)
    assert not differs_by_layout({"a/block0/w"}, {"b/layers/w"})
