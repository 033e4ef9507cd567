"""TensorBoard event files of a run, written without TensorFlow or a protobuf library.

An event file (`events.out.tfevents.<unix time>.<hostname>`) is a sequence of TFRecords,

    uint64 length, uint32 masked CRC32C of the length, data, uint32 masked CRC32C of data

(little-endian), each holding one serialized `Event` message (tensorboard's event.proto
and summary.proto), of which this module writes the few fields it needs by hand:

    Event:      wall_time = 1 (double), step = 2 (int64), file_version = 3 (string),
                summary = 5 (Summary), session_log = 7 (SessionLog)
    Summary:    value = 1 (repeated Value)
    Value:      tag = 1 (string), simple_value = 2 (float)
    SessionLog: status = 1 (enum, START = 1)

The first record of a file is its version, "brain.Event:2"; then a SessionLog START at
the first step the run computes: TensorBoard drops what earlier files of the directory
hold at that step and later (work a crash lost, redone by the resumed run), as
`read_scalars` does. A resumed run opens a new file beside the old ones; TensorBoard
reads a directory's files in name order, so a new file's name sorts after theirs.

What the trainer writes: `epoch_scalars` (every number of a metrics.jsonl record, tagged
`epoch/<field>`) and `window_scalars` (the training loss, accuracy and learning rate of
the steps between two host-side looks at the loss, tagged `steps/...`), both at the
global step, so that each tag's steps increase strictly (TensorBoard's fast loader takes
a step given again for a restart there, and drops that tag's points from it on).
"""

import os
import socket
import struct
import time
from typing import Iterator, Optional

FILE_VERSION = 'brain.Event:2'
FILE_PREFIX = 'events.out.tfevents.'
SESSION_START = 1  # SessionLog.SessionStatus.START
EPOCH_PREFIX = 'epoch/'
STEPS_PREFIX = 'steps/'

# Protobuf wire types.
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def _crc32c_table() -> tuple:
  """CRC32C (Castagnoli, reflected polynomial 0x82F63B78) of every byte value."""
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """The CRC32C checksum of `data` (as TFRecord framing uses it)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC32C: rotated right by 15 bits, plus a constant (mod 2^32)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, the data's masked CRC."""
  length = struct.pack('<Q', len(data))
  return (length + struct.pack('<I', masked_crc32c(length)) + data
          + struct.pack('<I', masked_crc32c(data)))


def _varint(value: int) -> bytes:
  value &= 0xFFFFFFFFFFFFFFFF  # a negative int64 is its two's complement, 10 bytes
  out = bytearray()
  while value > 0x7F:
    out.append(value & 0x7F | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _length_delimited(field: int, data: bytes) -> bytes:
  return _key(field, _BYTES) + _varint(len(data)) + data


def encode_value(tag: str, value: float) -> bytes:
  """A Summary.Value holding a scalar. simple_value is a member of a oneof: it is
  written even when 0."""
  return (_length_delimited(1, tag.encode('utf-8'))
          + _key(2, _FIXED32) + struct.pack('<f', value))


def encode_event(wall_time: float, step: int = 0, *, file_version: Optional[str] = None,
                 scalars: Optional[dict] = None, session_status: Optional[int] = None) -> bytes:
  """A serialized Event with one of file_version, scalars ({tag: value}, one Summary)
  or a SessionLog status. A zero step is left out, as proto3 leaves out defaults."""
  out = _key(1, _FIXED64) + struct.pack('<d', wall_time)
  if step:
    out += _key(2, _VARINT) + _varint(step)
  if file_version is not None:
    out += _length_delimited(3, file_version.encode('utf-8'))
  if scalars is not None:
    summary = b''.join(_length_delimited(1, encode_value(tag, v)) for tag, v in scalars.items())
    out += _length_delimited(5, summary)
  if session_status is not None:
    out += _length_delimited(7, _key(1, _VARINT) + _varint(session_status))
  return out


def _file_time(logdir: str) -> int:
  """The <unix time> of a new file's name: now, or one more than the directory's latest
  events file, so that name order is the order in which the files were started."""
  latest = 0
  for name in os.listdir(logdir):
    if name.startswith(FILE_PREFIX):
      stamp = name[len(FILE_PREFIX):].split('.', 1)[0]
      latest = max(latest, int(stamp) if stamp.isdigit() else 0)
  return max(int(time.time()), latest + 1)


class EventWriter:
  """Scalars into a new events file in `logdir`, created on the first write.

  start_step: the first step this run computes (the restored step + 1); the file's
  SessionLog START there tells TensorBoard to drop what earlier files hold from that
  step on (None: no START). Writes go through
  a buffer: flush() makes them visible to a TensorBoard reading the directory.
  """

  def __init__(self, logdir: str, start_step: Optional[int] = None):
    self.logdir, self.start_step = logdir, start_step
    self.path: Optional[str] = None
    self._file = None

  def _open(self):
    os.makedirs(self.logdir, exist_ok=True)
    name = f'{FILE_PREFIX}{_file_time(self.logdir)}.{socket.gethostname()}'
    self.path = os.path.join(self.logdir, name)
    self._file = open(self.path, 'ab')
    self._write(encode_event(time.time(), file_version=FILE_VERSION))
    if self.start_step is not None:
      self._write(encode_event(time.time(), self.start_step, session_status=SESSION_START))

  def _write(self, event: bytes):
    self._file.write(frame_record(event))

  def scalars(self, values: dict, step: int):
    """One event holding {tag: value} at `step`."""
    if self._file is None:
      self._open()
    self._write(encode_event(time.time(), int(step),
                             scalars={tag: float(v) for tag, v in values.items()}))

  def scalar(self, tag: str, value: float, step: int):
    self.scalars({tag: value}, step)

  def flush(self):
    if self._file is not None:
      self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def epoch_scalars(record: dict) -> dict:
  """{'epoch/<field>': value} for every number of a metrics.jsonl record."""
  return {EPOCH_PREFIX + k: v for k, v in record.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)}


def window_scalars(step_metrics: list) -> dict:
  """Training loss and accuracy over fetched per-step metrics (loss_sum, correct, count,
  learning_rate), and the learning rate of the last of them."""
  count = sum(float(m['count']) for m in step_metrics)
  return {STEPS_PREFIX + 'train_loss': sum(float(m['loss_sum']) for m in step_metrics) / count,
          STEPS_PREFIX + 'train_accuracy': sum(float(m['correct']) for m in step_metrics) / count,
          STEPS_PREFIX + 'learning_rate': float(step_metrics[-1]['learning_rate'])}


# Reading, for tests and tools.

def _fields(data: bytes) -> Iterator[tuple[int, int, object]]:
  """(field number, wire type, value) of a serialized message: an int for varints,
  bytes for the rest."""
  pos = 0

  def varint():
    nonlocal pos
    result = shift = 0
    while True:
      byte = data[pos]
      pos += 1
      result |= (byte & 0x7F) << shift
      shift += 7
      if not byte & 0x80:
        return result

  while pos < len(data):
    key = varint()
    field, wire_type = key >> 3, key & 7
    if wire_type == _VARINT:
      yield field, wire_type, varint()
      continue
    size = {_FIXED64: 8, _FIXED32: 4}.get(wire_type)
    if size is None:
      if wire_type != _BYTES:
        raise ValueError(f'unsupported protobuf wire type {wire_type}')
      size = varint()
    yield field, wire_type, data[pos:pos + size]
    pos += size


def decode_event(data: bytes) -> dict:
  """The fields of a serialized Event this module writes: wall_time, step, and
  file_version, scalars ({tag: value}, simple values only) or session_status."""
  event = {'wall_time': 0.0, 'step': 0}
  for field, _, value in _fields(data):
    if field == 1:
      event['wall_time'] = struct.unpack('<d', value)[0]
    elif field == 2:
      event['step'] = value - (1 << 64) if value >= 1 << 63 else value
    elif field == 3:
      event['file_version'] = value.decode('utf-8')
    elif field == 5:
      scalars = event.setdefault('scalars', {})
      for f, _, raw in _fields(value):
        if f == 1:
          tag, number = None, None
          for vf, _, v in _fields(raw):
            if vf == 1:
              tag = v.decode('utf-8')
            elif vf == 2:
              number = struct.unpack('<f', v)[0]
          if tag is not None and number is not None:
            scalars[tag] = number
    elif field == 7:
      event['session_status'] = dict((f, v) for f, _, v in _fields(value)).get(1, 0)
  return event


def read_records(path: str) -> Iterator[bytes]:
  """The data of each TFRecord of a file; ValueError on a CRC mismatch. A record cut
  short at the end (a file being written, or a crash) ends the file."""
  with open(path, 'rb') as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return
      length, length_crc = header[:8], struct.unpack('<I', header[8:])[0]
      if masked_crc32c(length) != length_crc:
        raise ValueError(f'{path}: corrupt record length at byte {f.tell() - 12}')
      data = f.read(struct.unpack('<Q', length)[0])
      footer = f.read(4)
      if len(footer) < 4:
        return
      if masked_crc32c(data) != struct.unpack('<I', footer)[0]:
        raise ValueError(f'{path}: corrupt record data at byte {f.tell() - len(data) - 4}')
      yield data


def event_files(logdir: str) -> list[str]:
  """The events files directly in `logdir`, in name order (TensorBoard's order)."""
  return [os.path.join(logdir, n) for n in sorted(os.listdir(logdir)) if 'tfevents' in n]


def read_scalars(logdir: str) -> dict:
  """{tag: [(step, value), ...]} of the scalars in `logdir`'s events files, as
  TensorBoard shows them: a SessionLog START after the first drops the scalars at its
  step and later."""
  scalars, started = {}, False
  for path in event_files(logdir):
    for data in read_records(path):
      event = decode_event(data)
      if event.get('session_status') == SESSION_START:
        if started:
          scalars = {tag: [(s, v) for s, v in points if s < event['step']]
                     for tag, points in scalars.items()}
        started = True
      for tag, value in event.get('scalars', {}).items():
        scalars.setdefault(tag, []).append((event['step'], value))
  return {tag: points for tag, points in scalars.items() if points}
