"""mmjax.train.tb_events writes the bytes tensorboardX's protobufs and TFRecord frames would."""

import glob
import struct

from hypothesis import given
from hypothesis import strategies as st
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import masked_crc32c

from mmjax.train.metrics import MetricWriter
from mmjax.train.tb_events import crc32c, file_version_event, scalar_event, tfrecord

TAGS = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF), max_size=40)
FLOATS = st.floats(width=32, allow_nan=False)
STEPS = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value


@given(tag=TAGS, value=FLOATS, step=STEPS, wall_time=st.floats(1.0, 4e9))
def test_scalar_event_is_the_protobuf_serialisation(tag, value, step, wall_time):
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=value)])
    expected = Event(wall_time=wall_time, step=step, summary=summary).SerializeToString()
    assert scalar_event(tag, value, step, wall_time) == expected


def test_file_version_event_is_the_protobuf_serialisation():
    expected = Event(wall_time=1.5e9, file_version="brain.Event:2").SerializeToString()
    assert file_version_event(1.5e9) == expected


@given(data=st.binary(max_size=300))
def test_tfrecord_frame(data):
    header = struct.pack("<Q", len(data))
    expected = (
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )
    assert tfrecord(data) == expected


def _records(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        blob = f.read()
    records, at = [], 0
    while at < len(blob):
        (length,) = struct.unpack("<Q", blob[at : at + 8])
        records.append(blob[at + 12 : at + 12 + length])
        at += 12 + length + 4
    assert at == len(blob)
    return records


def test_metric_writer_event_file_reads_back(tmp_path):
    writer = MetricWriter(str(tmp_path))
    writer.write(10, {"loss": 2.5, "eval/accuracy": 0.75})
    writer.write(20, {"loss": 1.25})
    writer.close()
    (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    events = [Event.FromString(r) for r in _records(path)]
    assert events[0].file_version == "brain.Event:2"
    scalars = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
    assert scalars == [(10, "loss", 2.5), (10, "eval/accuracy", 0.75), (20, "loss", 1.25)]
