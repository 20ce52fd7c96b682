"""TensorBoard scalar event files, written without TensorFlow, PyTorch or tensorboardX.

tensorboardX imports PyTorch whenever it is installed (seconds in every training process); a
scalar event is a few protobuf fields in a TFRecord frame, so this module writes them itself:
`events.out.tfevents.<time>.<host>` files that TensorBoard reads like any other.
"""

import os
import socket
import struct
import time


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as TFRecord frames use it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The TFRecord checksum: the CRC rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """`data` framed as one TFRecord: length, its checksum, the bytes, their checksum."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # int64 fields: negatives as ten-byte two's complement
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _message(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, body: bytes) -> bytes:
    """An `Event` proto: wall_time (1, double), step (2, int64; proto3 omits 0), then `body`."""
    step_field = _key(2, 0) + _varint(step) if step else b""
    return _key(1, 1) + struct.pack("<d", wall_time) + step_field + body


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
    """A serialised `Event` whose `Summary` (field 5) holds one `simple_value` for `tag`."""
    tag_field = _message(1, tag.encode()) if tag else b""  # proto3 omits an empty string
    summary_value = tag_field + _key(2, 5) + struct.pack("<f", value)
    return _event(wall_time, step, _message(5, _message(1, summary_value)))


def file_version_event(wall_time: float) -> bytes:
    """The first event of every file: `file_version` (field 3) "brain.Event:2"."""
    return _event(wall_time, 0, _message(3, b"brain.Event:2"))


class ScalarEventWriter:
    """Appends scalar events to a new event file in `logdir`."""

    def __init__(self, logdir: str):
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
        self._file = open(os.path.join(logdir, name), "ab")  # noqa: SIM115
        self._file.write(tfrecord(file_version_event(now)))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._file.write(tfrecord(scalar_event(tag, value, step, time.time())))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
