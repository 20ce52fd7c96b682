r"""CLI: compile a config's real train step ahead of time for a TPU topology, or CPU devices.

  python -m mmjax.aot --config experiments/clip.py:B/16 --topology v5e:16x16 \
      [--mesh fsdp=-1,tensor=1] [--config.key=value ...]

Builds the step through the trainer's own code (model, loss, optimizer, shardings, the
attention kernels inside shard_map) on libtpu's compile-only devices -- no TPU needed, only
the `libtpu` wheel (`pip install -e '.[tpu]'`) -- and prints one JSON line: per-chip
argument / output / temp bytes and whether they fit the chip's HBM, FLOPs and bytes,
collectives by kind, lowering and compile seconds, and a roofline step time with its MFU
bound. `--topology cpu:8` compiles for local CPU devices instead (tests, laptops).

No data and no tokenizer are read: batches take the shapes this config's preprocessing
gives a synthetic scene (`mmjax.data.batch_shapes`), and the vocabulary is data.vocab_size
(for hf tokenizers, the checkpoint tokenizer's size). `init_from` is ignored (weights do not
change what compiles). A config that diffuses a frozen VAE's latents (model.image_shape a
latent shape) compiles on precomputed latents: the VAE's encoder is left out of the step.

How the figures are made (docs/accelerators.md says more):
- memory: `compiled.memory_analysis()` per device; peak = arguments + outputs - aliased
  (the donated state) + temporaries; it fits when below the chip's HBM.
- FLOPs: XLA's cost analysis counts a loop body once, so a scanned stack would be
  undercounted: executed FLOPs are counted from the step's jaxpr instead (every matmul and
  convolution, scan bodies times their length, remat recomputation included, Pallas calls
  by their cost estimates), and model FLOPs from the same step traced with remat off.
- bytes: every executed HLO instruction's operands and results, loop bodies times their
  trip counts (`hlo_stats.hbm_bytes`; XLA's own figure, which sees a loop body once, is
  `xla_bytes_accessed_per_chip`).
- collectives: from the optimized HLO, loop bodies times their trip counts
  (`mmjax.parallel.hlo_stats`).
- roofline: per chip, max(FLOPs / peak, bytes / HBM bandwidth, collective bytes / ICI
  bandwidth) with the published figures of `mmjax.parallel.chips`; MFU bound = model FLOPs
  / (step time x peak).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from mmjax.errors import UserError, run_cli


@contextlib.contextmanager
def no_persistent_cache() -> Iterator[None]:
    """JAX's persistent compilation cache off for the duration: a compile-only TPU
    executable can be written to it but never read back (the read fails with a warning).
    JAX decides once per process whether the cache is used, so the decision is reset."""
    import jax
    from jax._src import compilation_cache  # the reset of that decision is not public

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def _devices(topology: str) -> tuple[list, Any]:
    """(devices, chip or None) of "v5e:16x16"-style TPU topologies or "cpu:N"."""
    import jax

    from mmjax.parallel import chips

    if topology.startswith("cpu:"):
        count = int(topology.partition(":")[2])
        available = jax.devices("cpu")
        if count > len(available):
            raise UserError(
                f"--topology {topology}: only {len(available)} CPU devices (set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={count})"
            )
        return available[:count], None
    try:
        chip = chips.chip_for_topology(topology)
        name = chips.canonical_topology(topology)
    except ValueError as e:
        raise UserError(f"--topology: {e}") from None
    # Compile-only devices touch no chip: let several processes (parallel compiles, test
    # workers) load libtpu at once instead of taking its single-process lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental.topologies import get_topology_desc

        desc = get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # libtpu missing or a shape it does not know
        raise UserError(
            f"--topology {topology}: libtpu cannot describe it ({e}); install the tpu extra"
        ) from None
    return list(desc.devices), chip


def _stacks(model_cfg: Any) -> str:
    """How the config's transformer stacks run: remat policies and scanning, e.g.
    "full, scanned" (each distinct setting once, nested towers included)."""
    settings: set[str] = set()

    def walk(cfg: Any) -> None:
        if "remat_policy" in cfg or "scan_layers" in cfg:
            policy = cfg.get("remat_policy", "none")
            policy = "no remat" if policy == "none" else policy
            settings.add(f"{policy}{', scanned' if cfg.get('scan_layers') else ''}")
        for value in cfg.values():
            if hasattr(value, "items"):
                walk(value)

    walk(model_cfg)
    return "; ".join(sorted(settings)) or "no remat"


def _mesh_overrides(spec: str) -> list[str]:
    """`fsdp=-1,tensor=4` -> config overrides of mesh.*."""
    out = []
    for item in filter(None, spec.split(",")):
        axis, sep, size = item.partition("=")
        if not sep:
            raise UserError(f"--mesh {spec!r}: expected axis=size pairs such as fsdp=-1,tensor=2")
        out.append(f"mesh.{axis.strip()}={size.strip()}")
    return out


def _memory(compiled: Any, devices_per_chip: int) -> dict[str, float]:
    stats = compiled.memory_analysis()
    per_device = {
        "argument_bytes": stats.argument_size_in_bytes,
        "output_bytes": stats.output_size_in_bytes,
        "alias_bytes": stats.alias_size_in_bytes,
        "temp_bytes": stats.temp_size_in_bytes,
    }
    per_device["peak_bytes"] = (
        per_device["argument_bytes"]
        + per_device["output_bytes"]
        - per_device["alias_bytes"]
        + per_device["temp_bytes"]
    )
    return {k: v * devices_per_chip for k, v in per_device.items()}


def model_flops(trainer: Any, state: Any, batch: Any, platform: str) -> float:
    """Matmul FLOPs one training step needs, over all devices, as lowered for `platform`:
    the step's jaxpr traced again with every stack's remat off, so recomputation is not
    counted while frozen towers (no weight gradients) and the optimizer are as they run.
    Call inside the trainer's mesh and logical-axis-rules context."""
    import jax
    import ml_collections

    from mmjax.parallel import hlo_stats
    from mmjax.train.loop import make_train_step

    def without_remat(cfg: Any) -> None:
        for key, value in cfg.items():
            if isinstance(value, ml_collections.ConfigDict):
                without_remat(value)
            elif key == "remat_policy":
                cfg[key] = "none"

    config = ml_collections.ConfigDict(trainer.config.to_dict())
    without_remat(config.model)
    plain = type(trainer)(
        config,
        None,
        devices=list(trainer.mesh.devices.flat),
        tokenizer=trainer.tokenizer,
        precomputed_latents=trainer.latents is None,
    )
    step = make_train_step(plain.loss_fn, plain.tx, plain.schedule, config.seed)
    return hlo_stats.dot_flops(jax.make_jaxpr(step)(state, batch), platform)


# How the TPU compiler says a program does not fit: "Used 16.18G of 15.75G hbm." or "the
# total memory required for HLO temporaries (97.62G) exceeds available HBM (15.75G)".
_OUT_OF_HBM = re.compile(
    r"Used (?P<used>[\d.]+)(?P<u>[KMGT]) of (?P<hbm>[\d.]+)(?P<h>[KMGT]) hbm"
    r"|required for [\w ]+\((?P<used2>[\d.]+)(?P<u2>[KMGT])\) exceeds available HBM "
    r"\((?P<hbm2>[\d.]+)(?P<h2>[KMGT])\)"
)
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _out_of_memory(config: Any, topology: str, mesh: Any, chip: Any, devices: int, used) -> dict:
    """The report of a step the TPU compiler refused for lack of HBM: what it needed."""
    need, need_unit, have, have_unit = (
        used.group("used", "u", "hbm", "h")
        if used.group("used")
        else used.group("used2", "u2", "hbm2", "h2")
    )
    per_device = float(need) * _UNITS[need_unit]
    hbm = float(have) * _UNITS[have_unit]
    return {
        "topology": topology,
        "chips": devices // chip.devices_per_chip,
        "mesh": dict(mesh.shape),
        "batch_size": config.batch_size,
        "stacks": _stacks(config.model),
        "peak_bytes": per_device * chip.devices_per_chip,
        "hbm_bytes": hbm * chip.devices_per_chip,
        "fits": False,
        "error": f"out of HBM: the compiler needs {need} {need_unit}iB of the {have} "
        f"{have_unit}iB usable per device",
    }


def compile_train_step(config: Any, topology: str, flops_only: bool = False) -> dict[str, Any]:
    """Lowers and compiles `config`'s train step for `topology`; returns the report.
    `flops_only`: trace the step and count its FLOPs only (seconds, not minutes: no lowering
    or compile, so no memory, bytes or collectives)."""
    import flax.linen as nn
    import jax

    from mmjax import data as mmdata
    from mmjax import parallel
    from mmjax.parallel import hlo_stats
    from mmjax.train.latents import latent_image_shape
    from mmjax.train.loop import Trainer

    # A config that diffuses VAE latents compiles on precomputed latents: the frozen VAE's
    # weights would be read on devices, and its encoder is not what the step trains.
    latent_shape = latent_image_shape(config)
    config.init_from = {**config.init_from, "format": "", "path": "", "more": {}}
    devices, chip = _devices(topology)
    tokenizer = mmdata.sized_tokenizer(config.data)
    trainer = Trainer(
        config,
        None,
        devices=devices,
        tokenizer=tokenizer,
        precomputed_latents=latent_shape is not None,
    )
    mesh, rules = trainer.mesh, trainer.rules
    batch_sharding = parallel.batch_sharding(mesh)
    shapes = mmdata.batch_shapes(config.data, tokenizer, config.batch_size)
    if latent_shape is not None:
        images, dtype = shapes["images"]
        shapes["images"] = ((*images[:2], *latent_shape), dtype)
    batch = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
        for k, (shape, dtype) in shapes.items()
    }
    state = trainer.abstract_state(batch)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = trainer.jit_train_step(shardings)
    platform = "cpu" if chip is None else "tpu"
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        t0 = time.perf_counter()
        traced = step.trace(state, batch)
        useful = model_flops(trainer, state, batch, platform)
        if flops_only:
            return _flops_report(config, topology, mesh, chip, len(devices), traced, useful)
        lowered = traced.lower()
        t1 = time.perf_counter()
        try:
            if chip is None:
                compiled = lowered.compile()
            else:
                with no_persistent_cache():
                    compiled = lowered.compile()
        except Exception as e:  # XLA refuses a program larger than the chip's HBM
            used = _OUT_OF_HBM.search(str(e))
            if used is None:
                raise
            return _out_of_memory(config, topology, mesh, chip, len(devices), used)
        t2 = time.perf_counter()

    devices_per_chip = chip.devices_per_chip if chip else 1
    flops = _flops_report(config, topology, mesh, chip, len(devices), traced, useful)
    cost = compiled.cost_analysis()
    text = compiled.as_text()
    bytes_accessed = hlo_stats.hbm_bytes(text) * devices_per_chip
    collectives = hlo_stats.collective_stats(text)
    collective_bytes = devices_per_chip * sum(
        v["bytes"] for k, v in collectives.items() if isinstance(v, dict)
    )
    report: dict[str, Any] = {
        **flops,
        "lower_s": round(t1 - t0, 1),
        "compile_s": round(t2 - t1, 1),
        **_memory(compiled, devices_per_chip),
        "xla_flops_per_chip": cost.get("flops", 0.0) * devices_per_chip,
        "bytes_accessed_per_chip": bytes_accessed,
        "xla_bytes_accessed_per_chip": cost.get("bytes accessed", 0.0) * devices_per_chip,
        "custom_calls": dict(collections.Counter(_CUSTOM_CALL.findall(text))),
        "collectives": collectives,
        "hlo_text_bytes": len(text),  # the optimized HLO's size: grows with unrolled depth
    }
    executed_flops, useful = flops["executed_flops_per_chip"], flops["model_flops_per_chip"]
    if chip is not None:
        hbm = chip.hbm_bytes
        roof = hlo_stats.roofline(executed_flops, bytes_accessed, collective_bytes, chip)
        report.update(
            chip=chip.name,
            hbm_bytes=hbm,
            fits=report["peak_bytes"] <= hbm,
            roofline={**roof, "mfu_bound": useful / (roof["step_s"] * chip.peak_flops_bf16)},
            chip_figures={
                "peak_flops_bf16": chip.peak_flops_bf16,
                "hbm_bandwidth": chip.hbm_bandwidth,
                "ici_bandwidth": chip.ici_bandwidth,
                "source": chip.source,
            },
        )
    return report


def _flops_report(
    config: Any, topology: str, mesh: Any, chip: Any, num_devices: int, traced: Any, useful: float
) -> dict[str, Any]:
    """The FLOP counts of a traced step, per chip (`--flops_only`)."""
    from mmjax.parallel import hlo_stats

    num_chips = num_devices // (chip.devices_per_chip if chip else 1)
    executed = hlo_stats.dot_flops_report(traced.jaxpr, "cpu" if chip is None else "tpu")
    return {
        "topology": topology,
        "chips": num_chips,
        "mesh": dict(mesh.shape),
        "batch_size": config.batch_size,
        "stacks": _stacks(config.model),
        "executed_flops_per_chip": executed.flops / num_chips,
        "model_flops_per_chip": useful / num_chips,
        "pallas_calls": executed.pallas_calls,
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m mmjax.aot",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="experiments/NAME.py:VARIANT")
    parser.add_argument(
        "--topology", required=True, help="a TPU topology such as v5e:16x16 or v5p:4x4x8, or cpu:N"
    )
    parser.add_argument("--mesh", default="", help="mesh sizes, e.g. data=1,fsdp=-1,tensor=4")
    parser.add_argument(
        "--flops_only", action="store_true", help="trace and count FLOPs only: no compile"
    )
    overrides = [a[len("--config.") :] for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])

    def job() -> None:
        from mmjax.train.config_cli import apply_overrides, load_config

        config = load_config(args.config)
        apply_overrides(config, [*overrides, *_mesh_overrides(args.mesh)])
        report = compile_train_step(config, args.topology, args.flops_only)
        print(json.dumps({"config": args.config, **report}), flush=True)

    return run_cli("mmjax.aot", job)


if __name__ == "__main__":
    sys.exit(main())
