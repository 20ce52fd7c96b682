"""The README's ahead-of-time table: every paper preset compiled for TPU pods with `mmjax.aot`.

  python benchmarks/aot_table.py [--out /tmp/mmjax_aot.jsonl] [--only clip_b16 ...]
  python benchmarks/aot_table.py --markdown            # the table from what --out holds
  python benchmarks/aot_table.py --refresh_flops       # recount model FLOPs of --out's rows

Each (preset, topology) runs `python -m mmjax.aot` in a fresh process (one at a time: a
256-chip compile takes gigabytes of host memory) over its candidate meshes and remat
policies in order, keeping the first whose per-chip peak fits the chip's HBM; every
attempt's JSON line, with its command, is appended to --out, and pairs already there are
skipped, so an interrupted run resumes. Topologies: v5e-256 (v5e:16x16) and v5p-128
(v5p:4x4x8).

`--refresh_flops` recounts the model FLOPs of every fitting row with `mmjax.aot --flops_only`
(a trace, no compile) and recomputes its MFU bound from the row's roofline step time: for rows
compiled before a change of how model FLOPs are counted, whose compiled figures still hold.
The step's executed FLOPs must come out the same, or the row is left as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

TOPOLOGIES = ("v5e:16x16", "v5p:4x4x8")

# BLIP-2's 2,320 pairs (16 GPUs x 145) split over no power-of-two pod: 2,304 = 9 x 256.
BLIP2_BATCH = ["batch_size=2304"]

# name: (experiment, label, [(mesh, overrides), ...] candidates in order)
PRESETS: dict[str, tuple[str, str, list[tuple[str, list[str]]]]] = {
    "clip_b16": ("clip.py:B/16", "CLIP B/16", [("data=1,fsdp=-1", [])]),
    "clip_l14": ("clip.py:L/14", "CLIP L/14", [("data=1,fsdp=-1", [])]),
    # So400m's width of 1,152 = 9 x 128 splits over 128 fsdp devices at most
    "siglip_so400m": (
        "siglip.py:So400m/14",
        "SigLIP So400m/14",
        [("data=1,fsdp=-1", []), ("data=2,fsdp=-1", [])],
    ),
    "transfusion_1.4b": ("transfusion.py:1.4B", "Transfusion 1.4B", [("data=1,fsdp=-1", [])]),
    "transfusion_7b": (
        "transfusion.py:7B",
        "Transfusion 7B",
        [("data=1,fsdp=-1", []), ("data=1,fsdp=-1,tensor=4", [])],
    ),
    "unifluid_9b": (
        "unifluid.py:9B",
        "UniFluid 9B",
        # Its So400m ViT's width of 1,152 splits over 128 fsdp devices at most; its 256k
        # vocabulary's logits dominate the memory of each example
        [
            ("data=1,fsdp=-1", []),
            ("data=1,fsdp=-1,tensor=4", []),
            ("data=2,fsdp=-1", []),
            ("data=2,fsdp=-1,tensor=2", []),
        ],
    ),
    "llava_7b": (
        "llava.py:7B_stage2",
        "LLaVA-1.5 7B (stage 2)",
        [("data=1,fsdp=-1", []), ("data=1,fsdp=-1,tensor=2", [])],
    ),
    "flamingo_9b": (
        "flamingo.py:9B",
        "Flamingo 9B",
        [("data=1,fsdp=-1", []), ("data=1,fsdp=-1,tensor=4", [])],
    ),
    # The Qwen-VL fine-tuning batch of 128 rows spreads over 128 data-parallel devices at most
    "qwen2_vl_7b": (
        "qwen2_vl.py:7B",
        "Qwen2-VL 7B",
        [("data=1,fsdp=-1", []), ("data=1,fsdp=-1,tensor=2", [])],
    ),
    "qwen2_5_vl_7b": (
        "qwen2_5_vl.py:7B",
        "Qwen2.5-VL 7B",
        [("data=1,fsdp=-1", []), ("data=1,fsdp=-1,tensor=2", [])],
    ),
    "qwen2_5_vl_72b": (
        "qwen2_5_vl.py:72B",
        "Qwen2.5-VL 72B",
        [("data=1,fsdp=-1", []), ("data=1,fsdp=-1,tensor=2", []), ("data=1,fsdp=-1,tensor=4", [])],
    ),
    # BAGEL: Qwen2.5-7B with a generation expert (14B parameters, 7B active a token) and
    # SigLIP2-so400m, whose width of 1,152 splits over 128 fsdp devices at most
    "bagel_7b": (
        "bagel.py:7B",
        "BAGEL 7B-active MoT",
        [("data=1,fsdp=-1", []), ("data=2,fsdp=-1", []), ("data=2,fsdp=-1,tensor=2", [])],
    ),
    # BLIP3-o: the generator (NextDiT 24 x 1792) trains on the frozen Qwen2.5-VL, the queries'
    # gradient running back through it; batch 128 as Qwen-VL's fine-tuning
    "blip3o_4b": (
        "blip3o.py:4B",
        "BLIP3-o 4B (Qwen2.5-VL-3B frozen)",
        [("data=1,fsdp=-1", []), ("data=1,fsdp=-1,tensor=2", [])],
    ),
    "blip3o_8b": (
        "blip3o.py:8B",
        "BLIP3-o 8B (Qwen2.5-VL-7B frozen)",
        [("data=1,fsdp=-1", []), ("data=1,fsdp=-1,tensor=2", [])],
    ),
    # ViT-g's width of 1,408 = 11 x 128 splits over 128 fsdp devices at most
    "blip2_stage1": (
        "blip2.py:stage1",
        "BLIP-2 stage 1 (ViT-g)",
        [("data=1,fsdp=-1", BLIP2_BATCH), ("data=2,fsdp=-1", BLIP2_BATCH)],
    ),
}


def command(experiment: str, topology: str, mesh: str, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mmjax.aot",
        "--config",
        f"experiments/{experiment}",
        "--topology",
        topology,
        "--mesh",
        mesh,
        *(f"--config.{o}" for o in overrides),
    ]


def _done(path: str) -> set[tuple[str, str]]:
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {(r["preset"], r["topology"]) for r in rows if r.get("fits") or r.get("final")}


def run(out: str, only: list[str], timeout: int) -> None:
    done = _done(out)
    for name, (experiment, _, candidates) in PRESETS.items():
        if only and name not in only:
            continue
        for topology in TOPOLOGIES:
            if (name, topology) in done:
                continue
            for i, (mesh, overrides) in enumerate(candidates):
                cmd = command(experiment, topology, mesh, overrides)
                shown = " ".join(["python", *cmd[1:]])
                print(f"[aot_table] {shown}", file=sys.stderr, flush=True)
                try:
                    row = _last_json(cmd, timeout)
                except subprocess.TimeoutExpired:
                    row = {"error": f"compile ran past {timeout} s"}
                row.update(preset=name, topology=topology, command=shown, mesh_arg=mesh)
                row["final"] = row.get("fits", False) or i == len(candidates) - 1
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if row.get("fits"):
                    break


def _last_json(cmd: list[str], timeout: int) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": proc.stderr[-2000:]}


def refresh_flops(out: str, timeout: int) -> None:
    """Recounts model FLOPs and MFU bounds of `out`'s fitting rows (module docstring)."""
    with open(out) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        if not row.get("fits"):
            continue
        cmd = [sys.executable, *shlex.split(row["command"])[1:], "--flops_only"]
        print(f"[aot_table] {row['command']} --flops_only", file=sys.stderr, flush=True)
        new = _last_json(cmd, timeout)
        executed = new.get("executed_flops_per_chip", 0.0)
        if abs(executed - row["executed_flops_per_chip"]) > 1e-6 * executed:
            print(f"[aot_table] left as it was: {new.get('error', new)}", file=sys.stderr)
            continue
        row["model_flops_per_chip"] = new["model_flops_per_chip"]
        peak = row["chip_figures"]["peak_flops_bf16"]
        row["roofline"]["mfu_bound"] = new["model_flops_per_chip"] / (
            row["roofline"]["step_s"] * peak
        )
        row["model_flops_command"] = f"{row['command']} --flops_only"
    with open(out + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(out + ".tmp", out)


def _gib(x: float) -> str:
    return f"{x / 2**30:.1f}"


def markdown(out: str) -> str:
    """The README table, in PRESETS order: the attempt that fits of every (preset, topology),
    or, where none fits, the one that came closest (the least per-chip memory asked for)."""
    with open(out) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    lines = [
        "| preset | pod | mesh (data, fsdp, tensor) | remat, layers | batch | per-chip peak / HBM "
        "(GiB) | compile (s) | roofline step (s), bound | MFU bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    commands = []
    for name, (_, label, _) in PRESETS.items():
        for topology in TOPOLOGIES:
            tried = [r for r in rows if (r["preset"], r["topology"]) == (name, topology)]
            fitting = [r for r in tried if r.get("fits")]
            sized = sorted((r for r in tried if "peak_bytes" in r), key=lambda r: r["peak_bytes"])
            r = (fitting or sized or tried or [None])[-1 if fitting else 0]
            if r is None:
                continue
            commands.append(r["command"])
            pod = f"{topology.split(':')[0]}-{r.get('chips', '?')}"
            if "mesh" not in r:
                lines.append(
                    f"| {label} | {pod} | {r['mesh_arg']} | | | failed: {r['error'][-120:]} |||"
                )
                continue
            mesh = ", ".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
            head = f"| {label} | {pod} | {mesh} | {r['stacks']} | {r['batch_size']} | "
            memory = f"{_gib(r['peak_bytes'])} / {_gib(r['hbm_bytes'])}"
            if not r["fits"]:
                lines.append(f"{head}does not fit: {memory} | | | |")
                continue
            roof = r["roofline"]
            lines.append(
                f"{head}{memory} | {r['compile_s']:.0f} | {roof['step_s']:.3f}, {roof['bound']} | "
                f"{roof['mfu_bound']:.0%} |"
            )
    return "\n".join([*lines, "", "```bash", *commands, "```"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/mmjax_aot.jsonl")
    parser.add_argument("--only", nargs="*", default=[], choices=sorted(PRESETS))
    parser.add_argument("--timeout", type=int, default=5400, help="seconds per compile")
    parser.add_argument("--markdown", action="store_true", help="print the table only")
    parser.add_argument("--refresh_flops", action="store_true", help="recount model FLOPs")
    args = parser.parse_args()
    if args.refresh_flops:
        refresh_flops(args.out, args.timeout)
    elif not args.markdown:
        run(args.out, args.only, args.timeout)
    print(markdown(args.out))


if __name__ == "__main__":
    sys.exit(main())
