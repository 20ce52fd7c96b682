"""The attention kernels as TPU and GPU code, checked without either: compiled for libtpu's
compile-only v5e devices, lowered to Triton for CUDA, and run per shard inside shard_map on
8 CPU devices."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from accelerators import no_persistent_cache, ops_named, tpu_devices, tpu_mesh, triton_modules
from helpers import REPO
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax.kernels import MaskSpec, attention
from mmjax.kernels.pallas_attention import Tiling, pallas_attention, tpu_tiling
from mmjax.kernels.reference import attention_reference

S = 256


def _ids(*runs: tuple[int, int]) -> np.ndarray:
    """[1, S] ids from (id, length) runs."""
    return np.concatenate([np.full(n, i, np.int32) for i, n in runs])[None]


# The masks of the attention contract, as `attention` keywords over S tokens.
MASKS = {
    "bidirectional": {},
    "causal": {"causal": True},
    "segments_and_spans": {
        "causal": True,
        "segment_ids": _ids((1, 100), (2, 156)),
        "span_ids": _ids((0, 30), (1, 40), (0, 60), (2, 50), (0, 76)),
    },
    "window": {"window": 100},
}


def _grads(impl: str, mask: dict, **kw):
    """(q, k, v) -> (out, dq, dk, dv) of `attention` under `mask` (ids traced)."""

    def run(q, k, v, ids):
        def f(q, k, v):
            return attention(q, k, v, **{**mask, **ids}, impl=impl, **kw)

        out, pullback = jax.vjp(f, q, k, v)
        return out, *pullback(out)

    return run


def _abstract(batch: int, heads: int, kv_heads: int, d: int, sharding=None, length: int = S):
    q = jax.ShapeDtypeStruct((batch, length, heads, d), jnp.bfloat16, sharding=sharding)
    k = jax.ShapeDtypeStruct((batch, length, kv_heads, d), jnp.bfloat16, sharding=sharding)
    return q, k


def _traced_ids(mask: dict, batch: int) -> tuple[dict, dict]:
    """(static keywords, ids as [batch, S] arrays to pass traced)."""
    ids = {k: np.repeat(v, batch, 0) for k, v in mask.items() if k.endswith("_ids")}
    return {k: v for k, v in mask.items() if k not in ids}, ids


@pytest.mark.parametrize("name", sorted(MASKS))
def test_triton_kernels_hold_no_branch_around_their_dots(name: str) -> None:
    """Lowered for CUDA through the public entry point, the forward, dq and dk/dv kernels
    loop over their block lists without an scf.if around any dot (Hopper's wgmma pipelining
    needs branch-free loops), and every dot sits inside a loop."""
    static, ids = _traced_ids(MASKS[name], 1)
    q, k = _abstract(1, 4, 2, 64)
    lowered = (
        jax.jit(_grads("auto", static)).trace(q, k, k, ids).lower(lowering_platforms=("cuda",))
    )
    modules = triton_modules(lowered)
    assert len(modules) == 3  # forward, dq, dk/dv
    for module in modules:
        dots = ops_named(module.operation, "tt.dot")
        loops = ops_named(module.operation, "scf.for")
        assert dots and loops
        assert sum(len(ops_named(loop, "tt.dot")) for loop in loops) >= len(dots)
        for branch in ops_named(module.operation, "scf.if"):
            assert not ops_named(branch, "tt.dot"), "a dot inside a branch"


def test_one_traced_call_carries_each_platforms_kernel() -> None:
    """The backend is chosen at lowering: one trace lowers to Mosaic calls for TPU, Triton
    calls for CUDA and ROCm and interpret-mode loops for CPU (long sequences) or the XLA reference
    (short ones), forward and backward alike."""
    q, k = _abstract(2, 4, 2, 64, length=512)  # 512^2 pairs: the CPU branch is the kernel
    ids = {"segment_ids": jax.ShapeDtypeStruct((2, 512), jnp.int32)}
    traced = jax.jit(_grads("auto", {"causal": True})).trace(q, k, k, ids)
    platforms = ("cpu", "cuda", "rocm", "tpu")
    text = {p: traced.lower(lowering_platforms=(p,)).as_text() for p in platforms}
    assert text["tpu"].count("tpu_custom_call") == 3 and "triton" not in text["tpu"]
    for gpu in ("cuda", "rocm"):
        assert text[gpu].count("xla.gpu.triton") == 3 and "tpu_custom_call" not in text[gpu]
    assert "custom_call" not in text["cpu"] and "stablehlo.while" in text["cpu"]  # interpret

    short = jnp.zeros((1, 64, 2, 16), jnp.float32)
    cpu = jax.jit(lambda q: attention(q, q, q, causal=True)).lower(short).as_text()
    assert "while" not in cpu and "custom_call" not in cpu  # the reference below 512^2 pairs


@pytest.mark.parametrize("name", sorted(MASKS))
def test_mosaic_kernels_compile_for_a_v5e_topology_inside_shard_map(name: str) -> None:
    """Forward and both backward kernels compile for a v5e 2x2 topology with the batch and
    heads sharded over the mesh (the kernels run inside shard_map), and XLA's cost analysis
    counts their FLOPs (each pallas_call carries its cost estimate)."""
    mesh = tpu_mesh("v5e:2x2", (2, 2), ("data", "tensor"))
    sharding = NamedSharding(mesh, P("data", None, "tensor", None))
    static, ids = _traced_ids(MASKS[name], 4)
    q, k = _abstract(4, 4, 2, 64, sharding)
    ids = {n: jax.ShapeDtypeStruct(x.shape, x.dtype) for n, x in ids.items()}
    run = _grads("pallas", static, partition=("data", None, "tensor", None))
    with jax.set_mesh(mesh), no_persistent_cache():
        compiled = jax.jit(run).trace(q, k, k, ids).lower().compile()
    assert compiled.as_text().count("tpu_custom_call") == 3
    # 2 examples x 2 heads per chip, S^2 pairs at most, 64-wide heads: (2 + 3 + 4) matmuls
    visible = 2 * 2 * S * S * 64 * 2 * (2 + 3 + 4)
    assert compiled.cost_analysis()["flops"] >= (0.3 if static.get("causal") else 0.9) * visible


def test_tpu_tiles_fit_the_length_and_cut_the_compiled_flops() -> None:
    """197 ViT tokens run as two 104-row query blocks against one 200-key block (not 2 x 2
    padded 128-token blocks): the compiled FLOPs of forward + backward fall by the padding
    share, 1 - (208 x 200) / 256^2."""
    assert tpu_tiling(197, 197, MaskSpec()) == Tiling.uniform(104, 200)
    assert tpu_tiling(4096, 4096, MaskSpec(causal=True)) == Tiling.uniform(128, 128)
    chip = jax.sharding.SingleDeviceSharding(tpu_devices("v5e:2x2")[0])
    x = jax.ShapeDtypeStruct((4, 197, 12, 64), jnp.bfloat16, sharding=chip)

    def flops(**options) -> float:
        def f(q):
            kernel = functools.partial(pallas_attention, platform="tpu", **options)
            out, pullback = jax.vjp(lambda q: kernel(q, q, q), q)
            return pullback(out)

        with no_persistent_cache():
            return jax.jit(f).trace(x).lower().compile().cost_analysis()["flops"]

    fitted, padded = flops(), flops(tiling=Tiling.uniform(128, 128))
    attention_flops = 4 * 12 * 197**2 * 64 * 2 * (2 + 3 + 4)
    assert fitted == pytest.approx(padded * 208 * 200 / 256**2, rel=0.02)
    assert padded - fitted == pytest.approx(
        attention_flops * (256**2 - 208 * 200) / 197**2, rel=0.02
    )


@pytest.fixture(scope="module")
def mesh_2x2x2():
    return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def test_sharded_kernels_equal_the_unsharded_reference(mesh_2x2x2) -> None:
    """Batch over data x fsdp and heads over tensor on 8 CPU devices: the per-shard
    kernels (interpret mode) give the reference's outputs and q/k/v gradients."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(4, 64, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(4, 64, 2, 16)), jnp.float32) for _ in range(2))
    segment_ids = jnp.asarray(np.repeat([[1, 2, 0, 3]], 16, axis=1).repeat(4, 0), jnp.int32)
    partition = (("data", "fsdp"), None, "tensor", None)

    def loss(impl: str, q, k, v):
        out = attention(
            q, k, v, segment_ids=segment_ids, causal=True, impl=impl, partition=partition
        )
        return jnp.sum(out * jnp.sin(out))

    def both(q, k, v):
        grad = functools.partial(jax.value_and_grad, argnums=(0, 1, 2))
        return grad(functools.partial(loss, "pallas"))(q, k, v), grad(
            functools.partial(loss, "xla")
        )(q, k, v)

    with jax.set_mesh(mesh_2x2x2):
        jaxpr = str(jax.make_jaxpr(functools.partial(loss, "pallas"))(q, k, v))
        ours, want = jax.jit(both)(q, k, v)
    assert "shard_map" in jaxpr
    np.testing.assert_allclose(ours[0], want[0], rtol=1e-5)
    for got, expected in zip(ours[1], want[1], strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_a_sequence_split_over_devices_is_xla_or_a_clear_error(mesh_2x2x2) -> None:
    x = jnp.ones((2, 64, 2, 8), jnp.float32)
    seq_split = (None, "data", None, None)
    with jax.set_mesh(mesh_2x2x2):
        with pytest.raises(ValueError, match="cannot split the sequence"):
            attention(x, x, x, causal=True, impl="pallas", partition=seq_split)
        auto = attention(x, x, x, causal=True, impl="auto", partition=seq_split)
    np.testing.assert_allclose(auto, attention_reference(x, x, x, MaskSpec(causal=True)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment, mesh, overrides",
    [
        ("clip.py:tiny", "data=2,fsdp=2", []),
        ("transfusion.py:tiny", "fsdp=2,tensor=2", ["model.depth=2"]),
    ],
)
def test_a_2_layer_models_sharded_train_step_compiles_for_v5e_2x2(
    experiment: str, mesh: str, overrides: list[str]
) -> None:
    """`mmjax.aot` builds the real train step through the trainer (no eager op under the
    mesh of compile-only devices), the attention kernels run as Mosaic calls inside
    shard_map, and the report's numbers hang together."""
    from mmjax.aot import compile_train_step
    from mmjax.train.config_cli import apply_overrides, load_config

    config = load_config(f"experiments/{experiment}")
    apply_overrides(config, [*overrides, *(f"mesh.{kv}" for kv in mesh.split(","))])
    report = compile_train_step(config, "v5e:2x2")
    assert report["chips"] == 4 and report["fits"]
    assert report["custom_calls"]["tpu_custom_call"] == report["pallas_calls"] >= 2 * 3
    assert 0 < report["peak_bytes"] < report["hbm_bytes"]
    assert report["model_flops_per_chip"] <= report["executed_flops_per_chip"]
    assert report["collectives"]["all-gather"]["count"] > 0  # FSDP gathers the weights
    assert 0 < report["roofline"]["mfu_bound"] <= 1


@pytest.mark.slow
def test_no_involuntary_rematerialisation_on_a_data_fsdp_tensor_mesh() -> None:
    """The token lookup and the timestep embedding reshard from their weights' split to the
    batch's in steps XLA's partitioner can take: compiling Transfusion for v5e:2x4 as data x
    fsdp x tensor = 2 x 2 x 2 logs no "Involuntary full rematerialization" (without the
    steps, 3 such warnings)."""
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "0",
        "LIBTPU_INIT_ARGS": "--minloglevel=0 --stderrthreshold=0",
    }
    proc = subprocess.run(
        [
            sys.executable, "-m", "mmjax.aot",
            "--config", "experiments/transfusion.py:tiny", "--config.model.depth=2",
            "--topology", "v5e:2x4", "--mesh", "data=2,fsdp=2,tensor=2",
        ],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "spmd_partitioner" in proc.stderr  # the partitioner's log is on
    assert "Involuntary full rematerialization" not in proc.stderr


@pytest.mark.parametrize("experiment", ["clip.py:tiny", "transfusion.py:tiny", "llava.py:tiny"])
def test_batch_shapes_without_data_are_the_training_batches(experiment: str) -> None:
    """What `mmjax.aot` compiles for: the keys, shapes and dtypes of a real training batch,
    and a vocabulary of the trained tokenizer's size, from the config alone."""
    from mmjax import data as mmdata
    from mmjax.train.config_cli import load_config

    config = load_config(f"experiments/{experiment}")
    real = mmdata.load_or_train_tokenizer(config.data, None, write=False)
    sized = mmdata.sized_tokenizer(config.data)
    assert sized.vocab_size == real.vocab_size
    batch = next(mmdata.make_train_iterator(config.data, real, global_batch_size=8, seed=0))
    shapes = mmdata.batch_shapes(config.data, sized, 8)
    assert shapes == {k: (v.shape, v.dtype) for k, v in batch.items()}


def test_cudnn_takes_only_what_it_expresses_exactly() -> None:
    from mmjax.kernels.dispatch import cudnn_eligible

    q = jnp.zeros((2, 128, 8, 64), jnp.bfloat16)
    k = jnp.zeros((2, 128, 2, 64), jnp.bfloat16)
    ids = jnp.ones((2, 128), jnp.int32)
    assert cudnn_eligible(q, k, MaskSpec(causal=True))
    assert cudnn_eligible(q, k, MaskSpec())
    assert not cudnn_eligible(q, k, MaskSpec(segment_ids=ids, kv_segment_ids=ids))
    assert not cudnn_eligible(q, k, MaskSpec(causal=True, window=16))
    assert not cudnn_eligible(q, k, MaskSpec(causal=True, q_offset=3))
    assert not cudnn_eligible(q[:, :1], k, MaskSpec(causal=True))  # decoding: Sq != Sk
    assert not cudnn_eligible(q.astype(jnp.float32), k, MaskSpec(causal=True))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--topology", "v9z:2x2"], "unknown chip"),
        (["--topology", "cpu:999"], "only 8 CPU devices"),
        (["--topology", "v5e:2x2", "--mesh", "fsdp"], "expected axis=size pairs"),
        (["--topology", "v5e:2x2", "--config.model.widht=3"], "unknown config key"),
    ],
)
def test_aot_cli_bad_input_is_one_error_line(args, message, capsys) -> None:
    from mmjax.aot import main

    assert main(["--config", "experiments/clip.py:tiny", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmjax.aot: error:") and message in err[0]


def test_a_2_layer_train_step_lowers_for_cuda_with_the_triton_kernels() -> None:
    """The trainer's whole step (loss, grads, AdamW) traced on this CPU host lowers for
    CUDA: each layer's attention forward, dq and dk/dv are Triton calls."""
    from mmjax import data as mmdata
    from mmjax.train.config_cli import apply_overrides, load_config
    from mmjax.train.loop import Trainer, make_train_step

    config = load_config("experiments/transfusion.py:tiny")
    apply_overrides(config, ["model.depth=2"])
    tokenizer = mmdata.sized_tokenizer(config.data)
    trainer = Trainer(config, None, devices=jax.devices()[:1], tokenizer=tokenizer)
    shapes = mmdata.batch_shapes(config.data, tokenizer, 8)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}
    state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainer.abstract_state(batch)
    )
    step = jax.jit(make_train_step(trainer.loss_fn, trainer.tx, trainer.schedule, seed=0))
    text = step.trace(state, batch).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2 * 3


def test_a_mesh_that_does_not_divide_a_parameter_is_one_error_line(capsys) -> None:
    """SigLIP So400m's width of 1,152 does not split over 256 fsdp devices: the error names
    the parameter, its logical axis and the devices, before anything compiles."""
    from mmjax.aot import main

    code = main(["--config", "experiments/siglip.py:So400m/14", "--topology", "v5e:16x16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "size 1152 does not split over mesh axes ('fsdp',) = 256 devices" in err[0]


@pytest.mark.slow
def test_a_step_larger_than_the_chips_hbm_is_reported_not_raised() -> None:
    """A 4.8B-parameter stack data-parallel on 4 v5e chips: the TPU compiler refuses it, and
    the report says it does not fit and by how much instead of a traceback."""
    from mmjax.aot import compile_train_step
    from mmjax.train.config_cli import apply_overrides, load_config

    config = load_config("experiments/transfusion.py:tiny")
    apply_overrides(
        config,
        ["model.width=8192", "model.mlp_dim=32768", "model.depth=6", "model.num_heads=64"],
    )
    report = compile_train_step(config, "v5e:2x2")
    assert not report["fits"] and report["peak_bytes"] > report["hbm_bytes"]
    assert report["error"].startswith("out of HBM: the compiler needs")
