"""Reading and writing Hugging Face checkpoints' tensors: safetensors files, alone or sharded
with a `model.safetensors.index.json`, with numpy only (no torch, no safetensors package).

The safetensors format: an 8-byte little-endian header length N, N bytes of JSON mapping each
tensor name to {dtype, shape, data_offsets [begin, end)} (plus an optional "__metadata__"),
then the tensors' bytes, row-major little-endian. bfloat16 (how LLMs ship) has no numpy dtype;
`ml_dtypes` (a JAX dependency) provides it. Files are memory-mapped, so a tensor is read only
when a converter asks for it.
"""

import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

from mmjax.errors import UserError

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


class SafetensorsFile(Mapping[str, np.ndarray]):
    """One .safetensors file as a read-only mapping name -> array (memory-mapped)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, struct.error, ValueError) as e:
            raise UserError(f"cannot read safetensors file {path!r}: {e}") from None
        header.pop("__metadata__", None)
        self._entries = header
        self._start = 8 + size
        self._data = np.memmap(path, np.uint8, mode="r") if header else None

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        if entry["dtype"] not in DTYPES:
            raise UserError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        raw = self._data[self._start + begin : self._start + end]
        return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class Checkpoint(Mapping[str, np.ndarray]):
    """The tensors of a checkpoint directory: `model.safetensors`, or the shards its
    `model.safetensors.index.json` names (every shard must be present)."""

    def __init__(self, directory: str) -> None:
        index = os.path.join(directory, INDEX)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise UserError(f"cannot read {index!r}: {e}") from None
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(directory, SINGLE)):
            files = [SINGLE]
        else:
            found = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
            hint = " (PyTorch .bin weights: re-save them with safe_serialization=True)"
            raise UserError(
                f"{directory!r} has no {SINGLE} or {INDEX}"
                + (hint if any(f.endswith(".bin") for f in found) else "")
            )
        missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
        if missing:
            raise UserError(f"{directory!r}: shard {missing[0]} named by {INDEX} is missing")
        self._files = {}
        self._where = {}
        for name in files:
            shard = SafetensorsFile(os.path.join(directory, name))
            self._files[name] = shard
            self._where.update(dict.fromkeys(shard, name))

    def __getitem__(self, name: str) -> np.ndarray:
        return self._files[self._where[name]][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def write_safetensors(
    path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes `tensors` to one .safetensors file (atomically: a temporary file renamed);
    `metadata` (str -> str) goes in the header (`transformers` wants {"format": "pt"})."""
    header, offset, arrays = {}, 0, []
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name, value in tensors.items():
        array = np.ascontiguousarray(value)
        if array.dtype not in NAMES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} has no safetensors name")
        header[name] = {
            "dtype": NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays:
            f.write(array.tobytes())
    os.replace(tmp, path)
