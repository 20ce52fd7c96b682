"""Published per-chip peak figures for TPUs and GPUs, and TPU topology names.

The ahead-of-time report (`python -m mmjax.aot`) compiles a step for a topology such as
"v5e:4x4" and divides the compiled program's FLOPs and bytes by these peaks (see
`mmjax.parallel.hlo_stats.roofline`). Figures are the vendors' published peaks, not measured
ones; each `Chip` names the page it comes from.

Units: FLOP/s and bytes/s, bytes. Where a page gives GB (10^9 bytes) or GiB (2^30 bytes) the
value is converted as written; Gbps (gigabits per second) is divided by 8 to give bytes/s.
"""

from __future__ import annotations

import dataclasses
import math

GB = 10**9
GIB = 2**30
TERA = 10**12


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip's published peaks.

    name: the chip, as vendors name it.
    peak_flops_bf16: dense bf16 matmul FLOP/s per chip.
    hbm_bytes: HBM capacity per chip, in bytes.
    hbm_bandwidth: HBM bandwidth per chip, bytes/s.
    ici_bandwidth: chip-to-chip bandwidth (TPU ICI, GPU NVLink) per chip, bytes/s, summed over
        all links and both directions (the "bidirectional" figure both vendors publish).
    source: the URL the figures come from.
    devices_per_chip: jax devices per chip in libtpu's compile-only topology (TPU v4 shows its
        two TensorCores as two devices there; v5p's two run as one megacore device).
    """

    name: str
    peak_flops_bf16: float
    hbm_bytes: float
    hbm_bandwidth: float
    ici_bandwidth: float
    source: str
    devices_per_chip: int = 1


CHIPS: dict[str, Chip] = {
    # "Peak compute per chip 275 teraflops (bf16 or int8)", "HBM2 capacity and bandwidth 32 GiB,
    # 1200 GBps". The page gives no per-chip ICI figure; its "All-reduce bandwidth per Pod
    # 1.1 PB/s" over the 4096-chip pod is 268.6 GB/s per chip one way, doubled here to the
    # bidirectional convention (the same division gives exactly half of the published
    # bidirectional figure for v5e, 51.2 TB/s / 256 = 200 GB/s, and v6e, 102.4 TB/s / 256).
    "v4": Chip(
        name="TPU v4",
        peak_flops_bf16=275 * TERA,
        hbm_bytes=32 * GIB,
        hbm_bandwidth=1200 * GB,
        ici_bandwidth=2 * 1.1e15 / 4096,
        source="https://docs.cloud.google.com/tpu/docs/v4",
        devices_per_chip=2,
    ),
    # "Peak compute per chip (bf16) 197 TFLOPs", "HBM capacity per chip 16 GiB", "HBM bandwidth
    # per chip 819 GBps", "Bidirectional inter-chip interconnect (ICI) bandwidth (per chip)
    # 400 GBps" (older revisions: "Interchip Interconnect BW 1600 Gbps" = 200 GB/s one way).
    "v5e": Chip(
        name="TPU v5e",
        peak_flops_bf16=197 * TERA,
        hbm_bytes=16 * GIB,
        hbm_bandwidth=819 * GB,
        ici_bandwidth=400 * GB,
        source="https://docs.cloud.google.com/tpu/docs/v5e",
    ),
    # "Peak compute per chip (BF16) (TFLOPs) 459", "HBM capacity per chip (GiB) 95" (96 GiB
    # physical, 95 allocatable), "HBM bandwidth per chip (GBps) 2765", "Bidirectional
    # inter-chip interconnect (ICI) bandwidth per chip (GBps) 1200" (older revisions:
    # "Interchip Interconnect BW 4800 Gbps" = 600 GB/s one way).
    "v5p": Chip(
        name="TPU v5p",
        peak_flops_bf16=459 * TERA,
        hbm_bytes=95 * GIB,
        hbm_bandwidth=2765 * GB,
        ici_bandwidth=1200 * GB,
        source="https://docs.cloud.google.com/tpu/docs/v5p",
    ),
    # Trillium. "Peak compute per chip (bf16) 918 TFLOPs", "HBM capacity per chip 32 GB",
    # "HBM bandwidth per chip 1638 GBps", "Bidirectional inter-chip interconnect (ICI)
    # bandwidth (per chip) 800 GBps".
    "v6e": Chip(
        name="TPU v6e (Trillium)",
        peak_flops_bf16=918 * TERA,
        hbm_bytes=32 * GB,
        hbm_bandwidth=1638 * GB,
        ici_bandwidth=800 * GB,
        source="https://docs.cloud.google.com/tpu/docs/v6e",
    ),
    # H100 SXM: "BFLOAT16 Tensor Core 1,979 teraFLOPS" is with 2:4 sparsity, so dense is half;
    # "GPU memory 80GB", "GPU memory bandwidth 3.35TB/s", "NVIDIA NVLink: 900GB/s" (total over
    # both directions, 450 GB/s each way).
    "h100": Chip(
        name="NVIDIA H100 SXM",
        peak_flops_bf16=1979 * TERA / 2,
        hbm_bytes=80 * GB,
        hbm_bandwidth=3.35 * TERA,
        ici_bandwidth=900 * GB,
        source="https://www.nvidia.com/en-us/data-center/h100/",
    ),
    # H200 SXM: the H100's compute (1,979 teraFLOPS bf16 with sparsity) with "GPU memory 141GB",
    # "GPU memory bandwidth 4.8TB/s", "NVIDIA NVLink: 900GB/s".
    "h200": Chip(
        name="NVIDIA H200 SXM",
        peak_flops_bf16=1979 * TERA / 2,
        hbm_bytes=141 * GB,
        hbm_bandwidth=4.8 * TERA,
        ici_bandwidth=900 * GB,
        source="https://www.nvidia.com/en-us/data-center/h200/",
    ),
}

# Other spellings of a topology prefix (libtpu itself knows only "v5e" for v5 lite).
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}


def _split(topology: str) -> tuple[str, str]:
    prefix, sep, dims = topology.strip().partition(":")
    if not sep:
        raise ValueError(f"topology {topology!r} is not of the form 'v5e:4x4' (prefix:dims)")
    return prefix.strip().lower(), dims.strip()


def chip_for_topology(topology: str) -> Chip:
    """The `Chip` of a topology name such as "v5e:16x16", "v5p:4x4x4" or "v4:2x2x1"."""
    prefix, _ = _split(topology) if ":" in topology else (topology.strip().lower(), "")
    key = ALIASES.get(prefix, prefix)
    if key not in CHIPS:
        valid = sorted([*CHIPS, *ALIASES])
        raise ValueError(f"unknown chip {prefix!r} in topology {topology!r}; valid: {valid}")
    return CHIPS[key]


def canonical_topology(topology: str) -> str:
    """The name libtpu accepts for `topology`: "v5litepod:4x4" -> "v5e:4x4" (libtpu rejects
    "v5litepod"); other names come back lowercased, spaces dropped."""
    prefix, dims = _split(topology)
    chip_for_topology(topology)
    return f"{ALIASES.get(prefix, prefix)}:{dims.lower()}"


def topology_chips(topology: str) -> int:
    """Chips in a topology: the product of its dims ("v5p:4x4x8" -> 128, "v5e:4x4" -> 16).

    Every dim counts chips, also on v4/v5p (whose accelerator types "v5p-256" count cores).
    """
    chip_for_topology(topology)
    _, dims = _split(topology)
    try:
        sizes = [int(d) for d in dims.lower().split("x")]
    except ValueError:
        sizes = []
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"topology {topology!r} needs dims like '4x4' or '2x2x1' after ':'")
    return math.prod(sizes)


def topology_devices(topology: str) -> int:
    """jax devices libtpu's compile-only topology has: chips times `Chip.devices_per_chip`.

    This equals `len(get_topology_desc(platform="tpu", topology_name=topology).devices)`.
    """
    return topology_chips(topology) * chip_for_topology(topology).devices_per_chip
