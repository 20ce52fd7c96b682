"""Collectives counted from compiled HLO (CPU and TPU compile-only), matmul FLOPs of jaxprs,
chip figures and TPU topology names."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from accelerators import no_persistent_cache, tpu_devices
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax.parallel.chips import (
    CHIPS,
    canonical_topology,
    chip_for_topology,
    topology_chips,
    topology_devices,
)
from mmjax.parallel.hlo_stats import (
    UNKNOWN_TRIP_COUNTS,
    collective_stats,
    dot_flops,
    dot_flops_report,
    hbm_bytes,
    roofline,
)

ROWS, COLS = 16, 128  # the per-device block every collective below moves
BLOCK = ROWS * COLS * 4  # bytes of one f32 block


def compiled_text(jitted, *args) -> str:
    with no_persistent_cache():
        return jitted.trace(*args).lower().compile().as_text()


def compile_psum_scan(devices: list) -> str:
    """A psum inside a 5-step scan, one after it and one all-gather: 6 all-reduces, 1 gather."""
    mesh = Mesh(np.asarray(devices), ("x",))

    def step(carry, _):
        return carry + jax.lax.psum(carry * 2.0, "x"), None

    @partial(jax.shard_map, mesh=mesh, in_specs=P("x"), out_specs=P("x"))
    def f(block):
        carry, _ = jax.lax.scan(step, block, None, length=5)
        gathered = jax.lax.all_gather(carry, "x")
        return jax.lax.psum(carry, "x") + gathered.sum(0)

    sharding = NamedSharding(mesh, P("x"))
    arg = jax.ShapeDtypeStruct((len(devices) * ROWS, COLS), jnp.float32, sharding=sharding)
    jitted = jax.jit(f, in_shardings=sharding, out_shardings=sharding)
    return compiled_text(jitted, arg)


def test_collectives_in_a_scan_count_per_iteration_on_cpu():
    devices = jax.devices()
    assert len(devices) == 8
    text = compile_psum_scan(devices)
    assert '"known_trip_count":{"n":"5"}' in text  # CPU HLO states the trip count
    assert collective_stats(text) == {
        "all-reduce": {"count": 6, "bytes": 6.0 * BLOCK},
        "all-gather": {"count": 1, "bytes": 8.0 * BLOCK},
    }


def test_collectives_in_a_scan_count_per_iteration_on_tpu():
    devices = tpu_devices("v5e:2x2")
    text = compile_psum_scan(devices)
    # TPU HLO drops known_trip_count: the count comes from the loop's condition and body.
    assert "known_trip_count" not in text
    assert collective_stats(text) == {
        "all-reduce": {"count": 6, "bytes": 6.0 * BLOCK},
        "all-gather": {"count": 1, "bytes": 4.0 * BLOCK},
    }


def test_fsdp_all_gathers_count_once_per_layer_and_pass_on_tpu():
    """TPU splits each weight all-gather into start/continuation/done fusions (one chain_id);
    with fsdp x tensor sharding each of the 2 weights per layer is gathered once forward and
    once backward."""
    devices = tpu_devices("v5e:2x2")
    mesh = Mesh(np.asarray(devices).reshape(2, 2), ("fsdp", "tensor"))
    layers, d, f, batch = 4, 2048, 8192, 64

    def loss(params, x):
        def layer(h, p):
            w1, w2 = p
            return h + jnp.tanh(h @ w1) @ w2, None

        h, _ = jax.lax.scan(layer, x, params)
        return (h.astype(jnp.float32) ** 2).mean()

    def step(params, x):
        value, grads = jax.value_and_grad(loss)(params, x)
        return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), value

    shardings = (
        NamedSharding(mesh, P(None, "fsdp", "tensor")),
        NamedSharding(mesh, P(None, "tensor", "fsdp")),
    )
    params = (
        jax.ShapeDtypeStruct((layers, d, f), jnp.bfloat16, sharding=shardings[0]),
        jax.ShapeDtypeStruct((layers, f, d), jnp.bfloat16, sharding=shardings[1]),
    )
    x_sharding = NamedSharding(mesh, P("fsdp"))
    x = jax.ShapeDtypeStruct((batch, d), jnp.bfloat16, sharding=x_sharding)
    out_shardings = (shardings, NamedSharding(mesh, P()))
    jitted = jax.jit(step, in_shardings=(shardings, x_sharding), out_shardings=out_shardings)
    text = compiled_text(jitted, params, x)
    assert "chain_id=" in text  # the split form this test is about is present

    stats = collective_stats(text)
    gathered = d * f // 2 * 2  # one weight, gathered over fsdp, still split over tensor; bf16
    assert stats["all-gather"] == {"count": 4 * layers, "bytes": 4.0 * layers * gathered}
    assert UNKNOWN_TRIP_COUNTS not in stats


def test_conditionals_take_the_largest_branch_and_unknown_loops_count_once():
    mesh = Mesh(np.asarray(jax.devices()), ("x",))

    @partial(jax.shard_map, mesh=mesh, in_specs=(P("x"), P()), out_specs=P("x"), check_vma=False)
    def f(a, i):
        branches = [
            lambda a: a,
            lambda a: jax.lax.psum(a, "x"),
            lambda a: jax.lax.all_gather(a, "x", tiled=True)[:ROWS],
        ]
        a = jax.lax.switch(i, branches, a)
        return jax.lax.while_loop(lambda c: c.sum() > 1.0, lambda c: jax.lax.psum(c, "x") / 2, a)

    sharding, replicated = NamedSharding(mesh, P("x")), NamedSharding(mesh, P())
    a = jax.ShapeDtypeStruct((8 * ROWS, COLS), jnp.float32, sharding=sharding)
    i = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    jitted = jax.jit(f, in_shardings=(sharding, replicated), out_shardings=sharding)
    stats = collective_stats(compiled_text(jitted, a, i))
    assert stats == {
        "all-reduce": {"count": 1, "bytes": 1.0 * BLOCK},  # the while body, once
        "all-gather": {"count": 1, "bytes": 8.0 * BLOCK},  # the switch's largest branch
        UNKNOWN_TRIP_COUNTS: 1,
    }


# Async pairs as GPU and TPU print them, wrapped lines and operands without "%" included.
ASYNC_HLO = """
HloModule m, num_partitions=4

add {
  x = f32[] parameter(0)
  y = f32[] parameter(1)
  ROOT add = f32[] add(x, y)
}

wrapped_reduce_scatter (p: u32[8]) -> u32[2] {
  p = u32[8]{0} parameter(0)
  ROOT rs = u32[2]{0} reduce-scatter(u32[8]{0} p), replica_groups={}, dimensions={0},
    to_apply=add
}

ENTRY main {
  p0 = f32[64,32]{1,0} parameter(0)
  p1 = u32[8]{0} parameter(1)
  ars = f32[64,32]{1,0} all-reduce-start(p0), replica_groups={}, to_apply=add
  ard = f32[64,32]{1,0} all-reduce-done(ars)
  ags = (f32[64,32]{1,0}, f32[256,32]{1,0}) all-gather-start(p0), dimensions={0}
  agd = f32[256,32]{1,0} all-gather-done(ags)
  rss = ((f32[64,32]{1,0}), f32[16,32]{1,0}) reduce-scatter-start(p0), dimensions={0},
    to_apply=add
  rsu = ((f32[64,32]{1,0}), f32[16,32]{1,0}) reduce-scatter-update(rss)
  rsd = f32[16,32]{1,0} reduce-scatter-done(rsu)
  as = ((u32[8]{0}), u32[2]{0}, s32[]) async-start(p1), calls=wrapped_reduce_scatter
  ad = u32[2]{0} async-done(as), calls=wrapped_reduce_scatter
  cps = (f32[64,32]{1,0}, f32[64,32]{1,0}, u32[], u32[]) collective-permute-start(p0),
    source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  cpd = f32[64,32]{1,0} collective-permute-done(cps)
  ROOT t = (f32[64,32]{1,0}, f32[256,32]{1,0}) tuple(ard, agd)
}
"""


def test_async_starts_count_as_their_kind_with_the_done_result_bytes():
    array = 64 * 32 * 4
    assert collective_stats(ASYNC_HLO) == {
        "all-reduce": {"count": 1, "bytes": 1.0 * array},
        "all-gather": {"count": 1, "bytes": 4.0 * array},
        "reduce-scatter": {"count": 2, "bytes": array / 4 + 2 * 4},
        "collective-permute": {"count": 1, "bytes": 1.0 * array},
    }


def test_dot_flops_counts_through_scan_shard_map_custom_rules_cond_and_pallas():
    from jax.experimental import pallas as pl

    batch, d, f, layers = 32, 64, 96, 3
    mesh = Mesh(np.asarray(jax.devices()), ("x",))

    @jax.custom_vjp
    def project(x, w):
        return x @ w

    project.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))

    @jax.custom_jvp
    def act(x):
        return jnp.tanh(x)

    act.defjvp(lambda p, t: (act(p[0]), t[0] * (1 - jnp.tanh(p[0]) ** 2)))

    def double(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2

    def model(x, ws, w_up, w_down, kernel):
        def layer(h, w):
            return jax.checkpoint(lambda h: act(h @ w))(h), None

        h, _ = jax.lax.scan(layer, x, ws)  # 3 x 2*batch*d*d

        @partial(jax.shard_map, mesh=mesh, in_specs=(P("x"), P()), out_specs=P("x"))
        def up(h, w):  # per shard: 2*(batch/8)*d*f, times 8 shards
            return h @ w

        u = up(h, w_up)
        u = jax.lax.cond(u.sum() > 0, lambda u: u @ w_down @ w_down.T, lambda u: u @ jnp.eye(f), u)
        h = jax.jit(project)(u, w_down)  # 2*batch*f*d
        image = h.reshape(batch, 1, 8, 8)
        y = jax.lax.conv_general_dilated(image, kernel, (1, 1), "SAME")  # 2*(b*4*8*8)*(1*3*3)
        estimated = pl.pallas_call(
            double,
            out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
            interpret=True,
            cost_estimate=pl.CostEstimate(flops=12345, transcendentals=0, bytes_accessed=0),
        )(y)
        unestimated = pl.pallas_call(
            double, out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype), interpret=True
        )(estimated)
        return unestimated.sum()

    args = (
        jnp.ones((batch, d)),
        jnp.ones((layers, d, d)),
        jnp.ones((d, f)),
        jnp.ones((f, d)),
        jnp.ones((4, 1, 3, 3)),
    )
    jaxpr = jax.jit(model).trace(*args).jaxpr
    expected = (
        layers * 2 * batch * d * d
        + 2 * batch * d * f
        + max(2 * batch * f * d + 2 * batch * d * f, 2 * batch * f * f)  # cond: max branch
        + 2 * batch * f * d
        + 2 * (batch * 4 * 8 * 8) * (1 * 3 * 3)
        + 12345
    )
    assert dot_flops(jaxpr) == expected
    report = dot_flops_report(jaxpr)
    assert (report.flops, report.pallas_calls, report.pallas_calls_without_estimate) == (
        expected,
        2,
        1,
    )
    assert report.while_loops == 0


def test_dot_flops_counts_a_grouped_convolution_per_group():
    x = jnp.ones((2, 8, 10, 10))  # NCHW, 8 channels in 4 groups of 2
    kernel = jnp.ones((12, 2, 3, 3))  # OIHW: 12 outputs, 2 inputs per group
    jaxpr = jax.make_jaxpr(
        lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", feature_group_count=4)
    )(x, kernel)
    assert dot_flops(jaxpr) == 2 * (2 * 12 * 8 * 8) * (2 * 3 * 3)


def test_dot_flops_counts_a_while_body_once_and_says_so():
    def f(x, w):
        return jax.lax.while_loop(lambda x: x.sum() < 100.0, lambda x: x @ w, x)

    report = dot_flops_report(jax.make_jaxpr(f)(jnp.ones((4, 8)), jnp.ones((8, 8))))
    assert (report.flops, report.while_loops) == (2 * 4 * 8 * 8, 1)


def test_dot_flops_counts_a_grouped_matmul_once_per_row():
    lhs, rhs = jnp.ones((12, 8)), jnp.ones((3, 8, 5))  # 12 rows in 3 groups, K=8, N=5
    sizes = jnp.array([4, 4, 4], jnp.int32)
    jaxpr = jax.make_jaxpr(jax.lax.ragged_dot)(lhs, rhs, sizes)
    assert dot_flops(jaxpr) == 2 * 12 * 8 * 5


@pytest.mark.parametrize(
    ("topology", "name", "chips"),
    [
        ("v5e:2x2", "TPU v5e", 4),
        ("v5litepod:16x16", "TPU v5e", 256),
        ("v5p:4x4x8", "TPU v5p", 128),
        ("v4:2x2x1", "TPU v4", 4),
        ("v6e:8x8", "TPU v6e (Trillium)", 64),
    ],
)
def test_topology_names_resolve(topology, name, chips):
    assert chip_for_topology(topology).name == name
    assert topology_chips(topology) == chips


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5litepod:2x4", "v5p:2x2x1", "v4:2x2x1"])
def test_device_counts_match_libtpu(topology):
    devices = tpu_devices(canonical_topology(topology))
    assert topology_devices(topology) == len(devices)
    if not topology.startswith("v4"):  # one device per chip (v5p: megacore)
        assert topology_chips(topology) == len(devices)
    else:  # libtpu shows a v4 chip's two TensorCores as two devices
        assert {d.core_on_chip for d in devices} == {0, 1}
        assert topology_chips(topology) == len(devices) // 2


def test_unknown_topologies_say_what_is_valid():
    with pytest.raises(ValueError, match=r"unknown chip 'v9x'.*'v4'.*'v5e'.*'v5litepod'.*'v5p'"):
        chip_for_topology("v9x:4x4")
    with pytest.raises(ValueError, match="dims"):
        topology_chips("v5e:4xfour")


def test_chip_table_units():
    for chip in CHIPS.values():
        assert chip.source.startswith("https://")
        # Sanity of units: 10-5000 TFLOP/s, 10-200 GB of HBM at 0.5-10 TB/s, ICI 0.1-2 TB/s.
        assert 1e13 < chip.peak_flops_bf16 < 5e15
        assert 1e10 < chip.hbm_bytes < 2e11 and 5e11 < chip.hbm_bandwidth < 1e13
        assert 1e11 < chip.ici_bandwidth < 2e12
    assert CHIPS["v5e"].hbm_bytes == 16 * 2**30 and CHIPS["v5p"].ici_bandwidth == 1.2e12
    assert math.isclose(CHIPS["h100"].peak_flops_bf16, 989.5e12)


def test_roofline_takes_the_slowest_term():
    chip = CHIPS["v5e"]
    r = roofline(197e12, 819e9 / 2, 400e9 / 4, chip)
    assert r == {
        "compute_s": 1.0,
        "memory_s": 0.5,
        "collective_s": 0.25,
        "step_s": 1.0,
        "bound": "compute",
    }
    assert roofline(0.0, 0.0, 800e9, chip)["bound"] == "collective"


def _scan_bytes(length: int) -> float:
    """hbm_bytes of a tanh(x @ w_i) scan over `length` stacked 256x256 weights (CPU)."""

    def f(x, ws):
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0]

    x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    ws = jax.ShapeDtypeStruct((length, 256, 256), jnp.float32)
    return hbm_bytes(jax.jit(f).trace(x, ws).lower().compile().as_text())


def test_hbm_bytes_grow_with_the_trip_count_reading_one_layer_of_weights_per_step():
    """Each step adds the same bytes (the scan body times its trip count), and a step reads
    its layer's slice of the stacked weights, not the whole stack."""
    five, six, ten = (_scan_bytes(n) for n in (5, 6, 10))
    step = six - five
    assert ten - five == pytest.approx(5 * step)
    # x read, the weight slice read, and the step's outputs: a few 256 KiB arrays, far less
    # than the 10-layer stack (2.5 MiB) that reading the whole operand would cost
    assert 3 * BLOCK_256 <= step < 10 * BLOCK_256


BLOCK_256 = 256 * 256 * 4
