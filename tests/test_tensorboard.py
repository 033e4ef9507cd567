"""jaxres.tensorboard: TFRecord framing, hand-encoded Event protos, and the trainer's events."""

import shutil
import struct

import numpy as np
import pytest

from jaxres import tensorboard
from tests.conftest import read_metrics

SMOKE = ('--config', 'experiments/smoke.py')
SMOKE_STEPS = [16, 32, 48]  # global step at the end of each smoke epoch (1024 / 64 a epoch)
STEP_TAGS = {'steps/train_loss', 'steps/train_accuracy', 'steps/learning_rate'}


def _f32(x) -> float:
  return float(np.float32(x))


def _masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _framed(data: bytes) -> bytes:
  length = struct.pack('<Q', len(data))
  return (length + struct.pack('<I', _masked(tensorboard.crc32c(length))) + data
          + struct.pack('<I', _masked(tensorboard.crc32c(data))))


def test_crc32c_known_vectors():
  assert tensorboard.crc32c(b'123456789') == 0xE3069283
  assert tensorboard.crc32c(b'') == 0
  # RFC 3720 (iSCSI), appendix B.4.
  assert tensorboard.crc32c(bytes(32)) == 0x8A9136AA
  assert tensorboard.crc32c(b'\xff' * 32) == 0x62A8AB43
  assert tensorboard.crc32c(bytes(range(32))) == 0x46DD794E
  assert tensorboard.crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
  assert tensorboard.masked_crc32c(b'123456789') == _masked(0xE3069283)


def test_the_byte_layout_of_a_file(tmp_path, monkeypatch):
  monkeypatch.setattr(tensorboard.time, 'time', lambda: 1.5)
  with tensorboard.EventWriter(str(tmp_path)) as writer:
    assert not list(tmp_path.iterdir())  # nothing before the first write
    writer.scalar('loss', 0.25, 3)
  wall_time = b'\x09' + struct.pack('<d', 1.5)  # field 1, fixed64
  version = wall_time + b'\x1a\x0d' + b'brain.Event:2'  # field 3, 13 bytes (step 0: left out)
  value = b'\x0a\x04loss' + b'\x15' + struct.pack('<f', 0.25)  # tag = 1, simple_value = 2
  summary = b'\x0a' + bytes([len(value)]) + value  # Summary.value = 1
  scalar = wall_time + b'\x10\x03' + b'\x2a' + bytes([len(summary)]) + summary  # step, summary
  assert len(scalar) == 26
  [path] = tmp_path.iterdir()
  assert path.name.startswith('events.out.tfevents.')
  assert path.read_bytes() == _framed(version) + _framed(scalar)


def test_round_trip_and_a_resumed_run(tmp_path):
  logdir = str(tmp_path)
  writer = tensorboard.EventWriter(logdir, start_step=1)
  for step in range(1, 6):
    writer.scalars({'a': step / 10, 'b/zero': 0.0}, step)
  writer.scalar('c', -3.5, 2 ** 40)
  writer.flush()  # visible before close
  assert tensorboard.read_scalars(logdir) == {
      'a': [(s, _f32(s / 10)) for s in range(1, 6)], 'b/zero': [(s, 0.0) for s in range(1, 6)],
      'c': [(2 ** 40, -3.5)]}
  writer.close()
  # A run resumed from step 3: what the first file holds from step 4 on is dropped.
  with tensorboard.EventWriter(logdir, start_step=4) as resumed:
    for step in range(4, 8):
      resumed.scalar('a', -step, step)
  first, second = tensorboard.event_files(logdir)
  assert second > first  # TensorBoard reads them in name order
  assert tensorboard.read_scalars(logdir) == {
      'a': [(1, _f32(0.1)), (2, _f32(0.2)), (3, _f32(0.3)), (4, -4.0), (5, -5.0), (6, -6.0),
            (7, -7.0)],
      'b/zero': [(1, 0.0), (2, 0.0), (3, 0.0)]}


def test_corrupt_records_are_errors_and_a_cut_tail_ends_the_file(tmp_path):
  with tensorboard.EventWriter(str(tmp_path)) as writer:
    writer.scalar('a', 1.0, 1)
    writer.scalar('a', 2.0, 2)
  [path] = tmp_path.iterdir()
  data = path.read_bytes()
  path.write_bytes(data[:-3])  # the last record cut short
  assert tensorboard.read_scalars(str(tmp_path)) == {'a': [(1, 1.0)]}
  damaged = bytearray(data)
  damaged[-6] ^= 1  # a byte of the last record's data
  path.write_bytes(bytes(damaged))
  with pytest.raises(ValueError, match='corrupt record data'):
    tensorboard.read_scalars(str(tmp_path))


def test_a_protobuf_library_parses_the_events_identically(tmp_path):
  """The hand encoding against protobuf's own, for messages with event.proto's and
  summary.proto's field numbers."""
  pytest.importorskip('google.protobuf')
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
  F = descriptor_pb2.FieldDescriptorProto
  proto = descriptor_pb2.FileDescriptorProto(name='jaxres_test_event.proto',
                                             package='jaxres_test', syntax='proto3')
  value = proto.message_type.add(name='Value')
  value.oneof_decl.add(name='value')
  value.field.add(name='tag', number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
  value.field.add(name='simple_value', number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL,
                  oneof_index=0)
  summary = proto.message_type.add(name='Summary')
  summary.field.add(name='value', number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                    type_name='.jaxres_test.Value')
  session_log = proto.message_type.add(name='SessionLog')
  session_log.field.add(name='status', number=1, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
  event = proto.message_type.add(name='Event')
  event.oneof_decl.add(name='what')
  event.field.add(name='wall_time', number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
  event.field.add(name='step', number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
  event.field.add(name='file_version', number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL,
                  oneof_index=0)
  event.field.add(name='summary', number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                  type_name='.jaxres_test.Summary', oneof_index=0)
  event.field.add(name='session_log', number=7, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                  type_name='.jaxres_test.SessionLog', oneof_index=0)
  pool = descriptor_pool.DescriptorPool()
  pool.Add(proto)
  Event = message_factory.GetMessageClass(pool.FindMessageTypeByName('jaxres_test.Event'))

  with tensorboard.EventWriter(str(tmp_path), start_step=7) as writer:
    writer.scalars({'epoch/train_loss': 1.25, 'epoch/zero': 0.0, 'ünïcode': -2.0}, 7)
  [path] = tensorboard.event_files(str(tmp_path))
  records = list(tensorboard.read_records(path))
  events = [Event.FromString(r) for r in records]
  assert [e.WhichOneof('what') for e in events] == ['file_version', 'session_log', 'summary']
  assert events[0].file_version == 'brain.Event:2' and events[0].step == 0
  assert events[1].session_log.status == tensorboard.SESSION_START and events[1].step == 7
  assert events[2].step == 7 and events[2].wall_time > 0
  assert [(v.tag, v.WhichOneof('value'), v.simple_value) for v in events[2].summary.value] == [
      ('epoch/train_loss', 'simple_value', 1.25), ('epoch/zero', 'simple_value', 0.0),
      ('ünïcode', 'simple_value', -2.0)]
  assert [e.SerializeToString() for e in events] == records  # byte for byte


def test_tensorboard_reads_them_if_installed(tmp_path):
  event_accumulator = pytest.importorskip(
      'tensorboard.backend.event_processing.event_accumulator')
  with tensorboard.EventWriter(str(tmp_path), start_step=1) as writer:
    for step in range(1, 6):
      writer.scalar('a', step, step)
  with tensorboard.EventWriter(str(tmp_path), start_step=4) as resumed:
    resumed.scalar('a', 40, 4)
  accumulator = event_accumulator.EventAccumulator(str(tmp_path))
  accumulator.Reload()
  assert [(e.step, e.value) for e in accumulator.Scalars('a')] == [(1, 1), (2, 2), (3, 3), (4, 40)]
  assert tensorboard.read_scalars(str(tmp_path)) == {'a': [(1, 1), (2, 2), (3, 3), (4, 40)]}


def test_epoch_and_window_scalars():
  record = {'epoch': 2, 'train_loss': 0.5, 'eval_split': 'holdout', 'flag': True}
  assert tensorboard.epoch_scalars(record) == {'epoch/epoch': 2, 'epoch/train_loss': 0.5}
  steps = [{'loss_sum': np.float32(6.0), 'correct': 3, 'count': 4, 'learning_rate': 0.1},
           {'loss_sum': np.float32(2.0), 'correct': 1, 'count': 4, 'learning_rate': 0.05}]
  assert tensorboard.window_scalars(steps) == {
      'steps/train_loss': 1.0, 'steps/train_accuracy': 0.5, 'steps/learning_rate': 0.05}


def _expected_epoch_scalars(records, steps):
  return {f'epoch/{key}': [(step, _f32(r[key])) for step, r in zip(steps, records)]
          for key in records[0]}


def test_the_trainer_writes_metrics_jsonl_and_the_loss_as_events(smoke_run):
  workdir, _ = smoke_run
  records = read_metrics(workdir)
  scalars = tensorboard.read_scalars(str(workdir))
  assert len(tensorboard.event_files(str(workdir))) == 1
  assert set(scalars) == {f'epoch/{key}' for key in records[0]} | STEP_TAGS
  assert {k: v for k, v in scalars.items() if k.startswith('epoch/')} == (
      _expected_epoch_scalars(records, SMOKE_STEPS))
  # 16 steps an epoch, fewer than train.CHECK_EVERY: one look at the loss per epoch, at its
  # end, over all of its steps.
  losses = scalars['steps/train_loss']
  assert [step for step, _ in losses] == SMOKE_STEPS
  np.testing.assert_allclose([v for _, v in losses], [r['train_loss'] for r in records],
                             rtol=1e-6)


def test_a_resumed_run_replaces_the_events_of_the_work_it_redoes(smoke_run, run_cli, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(smoke_run[0], workdir)
  for f in (workdir / 'checkpoints' / '48').rglob('*'):  # epoch 3's checkpoint is lost
    if f.is_file():
      f.write_bytes(f.read_bytes()[:7])
  proc = run_cli('jaxres.train', *SMOKE, '--workdir', workdir)
  assert proc.returncode == 0, proc.stderr
  assert 'Resuming from checkpoint 32' in proc.stdout
  assert len(tensorboard.event_files(str(workdir))) == 2
  scalars = tensorboard.read_scalars(str(workdir))
  records = read_metrics(workdir)  # epoch 3 as the resumed run redid it
  assert {k: v for k, v in scalars.items() if k.startswith('epoch/')} == (
      _expected_epoch_scalars(records, SMOKE_STEPS))
  assert [step for step, _ in scalars['steps/train_loss']] == SMOKE_STEPS


def test_tensorboard_false_writes_no_events_and_may_change_on_resume(smoke_run, run_cli,
                                                                     tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(smoke_run[0], workdir)
  before = {p.name: p.read_bytes() for p in workdir.glob('events.out.tfevents.*')}
  proc = run_cli('jaxres.train', *SMOKE, '--workdir', workdir, '--config.num_epochs=4',
                 '--config.tensorboard=False')
  assert proc.returncode == 0, proc.stderr
  assert [r['epoch'] for r in read_metrics(workdir)] == [1, 2, 3, 4]
  assert {p.name: p.read_bytes() for p in workdir.glob('events.out.tfevents.*')} == before
