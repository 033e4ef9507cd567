"""Runs survive kill -9, signals, damaged checkpoints, NaNs and bad input (issue: reliability)."""

import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from experiments import smoke
from jaxres import checkpoints, models, optim, train, workdir_lock
from jaxres.errors import UsageError
from tests.conftest import read_metrics
from tests.test_multihost import _devices, _free_port

SMOKE = ('--config', 'experiments/smoke.py')
TMP_SUFFIX = '.orbax-checkpoint-tmp'  # Orbax's name for a checkpoint being written


def _wait_for(predicate, proc, timeout=300, poll=0.002):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(poll)
  raise TimeoutError


def _checkpoint_being_written(workdir):
  ckpt = Path(workdir) / 'checkpoints'
  return ckpt.exists() and any('tmp' in p.name for p in ckpt.iterdir())


def _copy_run(smoke_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(smoke_run[0], workdir)
  return workdir


def _tree_hashes(root):
  root = Path(root)
  if not root.exists():
    return None
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob('*')) if p.is_file()}


def test_sigkill_anywhere_then_rerun_gives_the_uninterrupted_metrics(smoke_run, start_cli,
                                                                       run_main, tmp_path):
  expected = read_metrics(smoke_run[0], drop_timing=True)
  workdir = tmp_path / 'run'
  # 1. kill -9 while epoch 1's checkpoint is being written (or right after its report).
  proc = start_cli('jaxres.train', *SMOKE, '--workdir', workdir)
  _wait_for(lambda: _checkpoint_being_written(workdir) or read_metrics(workdir), proc)
  proc.kill()
  proc.wait()
  # 2. rerun (taking over the dead trainer's lock), kill -9 in the middle of epoch 3.
  proc = start_cli('jaxres.train', *SMOKE, '--workdir', workdir)
  _wait_for(lambda: len(read_metrics(workdir)) >= 2, proc)
  time.sleep(0.4)
  proc.kill()
  _, stderr = proc.communicate()
  assert stderr.startswith(f'warning: taking over the lock of {workdir} left by host '), stderr
  # 3. rerun to the end: whatever a kill left half-written is gone, and so is the lock.
  done = run_main('jaxres.train', *SMOKE, '--workdir', workdir)
  assert done.returncode == 0, done.stderr
  assert read_metrics(workdir, drop_timing=True) == expected
  assert not [p for p in (workdir / 'checkpoints').iterdir() if TMP_SUFFIX in p.name]
  assert not (workdir / workdir_lock.LOCK_NAME).exists()


def _stop_with(signum, proc, workdir, epochs):
  """Send `signum` to the trainer `proc` some steps after its `epochs`-th epoch record:
  it writes a checkpoint mid-epoch and exits 128 + signum."""
  assert _wait_for(lambda: len(read_metrics(workdir)) >= epochs, proc, poll=0.01)
  time.sleep(0.3)
  proc.send_signal(signum)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signum, stderr
  assert 'checkpoint written' in stderr and 'Traceback' not in stderr
  return stdout


def test_signals_checkpoint_mid_epoch_and_resume(smoke_run, start_cli, run_main, tmp_path):
  """SIGINT in epoch 2, then SIGTERM to the resumed run in epoch 3: each writes a
  checkpoint mid-epoch and exits 130 / 143; the second resumption ends with the
  uninterrupted run's metrics."""
  expected = read_metrics(smoke_run[0], drop_timing=True)
  workdir = tmp_path / 'run'
  _stop_with(signal.SIGINT, start_cli('jaxres.train', *SMOKE, '--workdir', workdir), workdir, 1)
  stdout = _stop_with(signal.SIGTERM, start_cli('jaxres.train', *SMOKE, '--workdir', workdir),
                      workdir, 2)
  assert 'Resuming from checkpoint' in stdout
  resumed = run_main('jaxres.train', *SMOKE, '--workdir', workdir)
  assert resumed.returncode == 0, resumed.stderr
  assert 'Resuming from checkpoint' in resumed.stdout
  assert read_metrics(workdir, drop_timing=True) == expected


def test_damaged_latest_checkpoint_falls_back_to_the_previous(smoke_run, run_main, tmp_path):
  workdir = _copy_run(smoke_run, tmp_path)
  for f in (workdir / 'checkpoints' / '48').rglob('*'):
    if f.is_file():
      f.write_bytes(f.read_bytes()[:7])  # truncated
  proc = run_main('jaxres.train', *SMOKE, '--workdir', workdir)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr.startswith(f'warning: checkpoint 48 in {workdir / "checkpoints"} is '
                                f'unreadable (') and proc.stderr.count('\n') == 1, proc.stderr
  assert 'Resuming from checkpoint 32' in proc.stdout
  assert (workdir / 'checkpoints' / 'corrupt-48').is_dir()
  assert read_metrics(workdir, drop_timing=True) == read_metrics(smoke_run[0], drop_timing=True)


def test_non_finite_loss_stops_with_exit_3_and_keeps_the_good_checkpoint(smoke_run, run_main,
                                                                           tmp_path):
  workdir = _copy_run(smoke_run, tmp_path)
  before = _tree_hashes(workdir / 'checkpoints')
  proc = run_main('jaxres.train', *SMOKE, '--workdir', workdir, '--config.num_epochs=4',
                  '--config.learning_rate=3e38', '--config.allow_config_change=True')
  assert proc.returncode == 3, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and 'non-finite loss' in lines[0]
  assert 'at step 5' in lines[0] and '(epoch 4, batch' in lines[0] and 'learning rate 3e+38' in lines[0]
  assert _tree_hashes(workdir / 'checkpoints') == before
  assert len(read_metrics(workdir)) == 3
  check = run_main('jaxres.eval', '--workdir', workdir, '--json')
  assert check.returncode == 0 and '"checkpoint": 48' in check.stdout


def _images(tmp_path):
  """Inputs for the predict rows of the bad-input table."""
  wrong_shape, wrong_dtype, corrupt = tmp_path / 'shape.npy', tmp_path / 'dtype.npy', tmp_path / 'bad'
  np.save(wrong_shape, np.zeros((2, 28, 28, 3), np.uint8))
  np.save(wrong_dtype, np.zeros((2, 32, 32, 3), np.float32))
  corrupt.mkdir()
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(corrupt / 'a.png')
  (corrupt / 'b.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
  return wrong_shape, wrong_dtype, corrupt


BAD_TRAIN_INPUTS = {
    'unknown field': ['--config.no_such_field=1'],
    'wrong type': ['--config.num_epochs=three'],
    'non-positive learning rate': ['--config.learning_rate=0'],
    'non-positive epochs': ['--config.num_epochs=0'],
    'non-positive batch size': ['--config.batch_size=-64'],
    'over the parameter budget': ['--config.param_budget=1000'],
}


@pytest.mark.parametrize('case', sorted(BAD_TRAIN_INPUTS))
def test_bad_train_input_is_one_line_exit_2_and_changes_nothing(case, smoke_run, run_main,
                                                                tmp_path):
  workdir = _copy_run(smoke_run, tmp_path)
  before = _tree_hashes(workdir)
  proc = run_main('jaxres.train', *SMOKE, '--workdir', workdir, *BAD_TRAIN_INPUTS[case])
  _assert_clean_failure(proc)
  assert _tree_hashes(workdir) == before


def test_bad_inputs_outside_the_config_values(smoke_run, run_main, tmp_path):
  """Missing data, unwritable workdir, bad config files, bad predict inputs."""
  workdir = _copy_run(smoke_run, tmp_path)
  before = _tree_hashes(workdir)
  (tmp_path / 'no_get_config.py').write_text('x = 1\n')
  (tmp_path / 'a_file').write_text('')
  wrong_shape, wrong_dtype, corrupt = _images(tmp_path)
  fresh = tmp_path / 'fresh'
  cases = [
      ('jaxres.train', *SMOKE, '--workdir', fresh, '--config.data.name=cifar10',
       '--config.data.root', tmp_path / 'nowhere', '--config.data.download=False'),
      ('jaxres.train', *SMOKE, '--workdir', tmp_path / 'a_file' / 'run'),
      ('jaxres.train', '--config', tmp_path / 'missing.py', '--workdir', fresh),
      ('jaxres.train', '--config', tmp_path / 'no_get_config.py', '--workdir', fresh),
      ('jaxres.predict', '--workdir', workdir, '--input', wrong_shape, '--output', fresh),
      ('jaxres.predict', '--workdir', workdir, '--input', wrong_dtype, '--output', fresh),
      ('jaxres.predict', '--workdir', workdir, '--input', corrupt, '--output', fresh),
  ]
  for args in cases:
    proc = run_main(*args)
    _assert_clean_failure(proc)
    assert not fresh.exists()
    if '--config.data.download=False' in args:
      assert 'CIFAR-10 not found under' in proc.stderr
  assert _tree_hashes(workdir) == before


def _assert_clean_failure(proc):
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  assert 'Traceback' not in proc.stderr


def _mount_tmpfs(path, size):
  path.mkdir()
  try:
    subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                   check=True, capture_output=True)
  except (OSError, subprocess.CalledProcessError) as e:
    pytest.skip(f'cannot mount a small tmpfs to fill ({e})')


def test_disk_full_while_checkpointing(smoke_run, run_main, tmp_path):
  used = sum(f.stat().st_size for f in smoke_run[0].rglob('*') if f.is_file())
  disk = tmp_path / 'small_disk'
  _mount_tmpfs(disk, used + (700 << 10))  # room for the run, not for one more checkpoint
  try:
    workdir = disk / 'run'
    shutil.copytree(smoke_run[0], workdir)
    before = _tree_hashes(workdir)
    proc = run_main('jaxres.train', *SMOKE, '--workdir', workdir, '--config.num_epochs=4')
    _assert_clean_failure(proc)
    assert 'disk full' in proc.stderr
    after = _tree_hashes(workdir)
    # Checkpoints and metrics are untouched; config.json records the longer run it began,
    # and a new TensorBoard events file the loss of the steps it took (which a resumed run's
    # events supersede).
    assert after.pop('config.json') != before.pop('config.json')
    new = sorted(set(after) - set(before))
    assert len(new) == 1 and new[0].startswith('events.out.tfevents.'), new
    del after[new[0]]
    assert after == before
    config = json.loads((workdir / 'config.json').read_text())
    assert config['num_epochs'] == 4
  finally:
    subprocess.run(['umount', str(disk)], check=False)


def test_resume_refuses_a_changed_recipe_but_not_a_changed_allocator(smoke_run, run_main, run_cli,
                                                                      tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(smoke_run[0], workdir)
  proc = run_main('jaxres.train', *SMOKE, '--workdir', workdir, '--config.learning_rate=0.1')
  _assert_clean_failure(proc)
  assert 'different config (learning_rate)' in proc.stderr
  # host_allocator changes how memory is served, not what is computed; 'hugepages' also
  # takes the command through its restart (in a process of its own).
  proc = run_cli('jaxres.train', *SMOKE, '--workdir', workdir, '--config.host_allocator=hugepages')
  assert proc.returncode == 0, proc.stderr


def _truncate(directory):
  for f in Path(directory).rglob('*'):
    if f.is_file():
      f.write_bytes(f.read_bytes()[:7])


def test_a_checkpoint_that_does_not_fit_is_refused_and_left_alone(smoke_run, run_main, tmp_path):
  workdir = _copy_run(smoke_run, tmp_path)
  before = _tree_hashes(workdir)
  proc = run_main('jaxres.train', *SMOKE, '--workdir', workdir, '--config.num_epochs=4',
                  '--config.allow_config_change=True', '--config.model.widths=(16,32,64,128)')
  _assert_clean_failure(proc)
  assert (f'checkpoint 48 in {workdir / "checkpoints"} does not fit this run: params/bn1/bias '
          f'is float32[8] in the checkpoint but float32[16] in this run') in proc.stderr
  assert _tree_hashes(workdir) == before


def test_unreadable_checkpoints_are_set_aside_and_the_run_never_restarts_silently(
    smoke_run, run_main, tmp_path):
  workdir = _copy_run(smoke_run, tmp_path)
  _truncate(workdir / 'checkpoints')
  proc = run_main('jaxres.train', *SMOKE, '--workdir', workdir)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert [line.split(' in ')[0] for line in lines[:3]] == [
      'warning: checkpoint 48', 'warning: checkpoint 32', 'warning: checkpoint 16']
  assert len(lines) == 4 and lines[3].startswith('error: no readable checkpoint in ')
  names = ['corrupt-16', 'corrupt-32', 'corrupt-48']
  assert sorted(os.listdir(workdir / 'checkpoints')) == names
  before = _tree_hashes(workdir)
  again = run_main('jaxres.train', *SMOKE, '--workdir', workdir)
  _assert_clean_failure(again)
  assert (f'{workdir} holds a run (metrics.jsonl with 3 epochs; unreadable checkpoints set '
          f'aside as {", ".join(names)}) but no checkpoint to resume from; '
          f'--config.resume=False starts over') in again.stderr
  assert _tree_hashes(workdir) == before
  over = run_main('jaxres.train', *SMOKE, '--workdir', workdir, '--config.resume=False',
                  '--config.num_epochs=1')
  assert over.returncode == 0, over.stderr
  assert os.listdir(workdir / 'checkpoints') == ['16'] and len(read_metrics(workdir)) == 1


def _smoke_target(fields=None):
  """The abstract TrainState of the smoke config with `fields` ({'a.b': value}) changed."""
  config = smoke.get_config()
  config.update_from_flattened_dict(fields or {})
  return checkpoints.abstract_state(config, models.create_model(config, 1),
                                    optim.create_optimizer(config))


DAMAGES = {
    'array data truncated': lambda step: _truncate(step / 'state' / 'ocdbt.process_0'),
    'array metadata missing': lambda step: (step / 'state' / '_METADATA').unlink(),
    'tree metadata garbled': lambda step: (step / 'state' / '_METADATA').write_text('{"tree'),
    'position (meta) garbled': lambda step: (step / 'meta' / 'metadata').write_text('{"epo'),
    'state missing': lambda step: shutil.rmtree(step / 'state'),
}


@pytest.mark.parametrize('damage', sorted(DAMAGES))
def test_only_a_checkpoint_that_cannot_be_read_is_set_aside(damage, smoke_run, tmp_path):
  directory = _copy_run(smoke_run, tmp_path) / 'checkpoints'
  DAMAGES[damage](directory / '48')
  ckpts = checkpoints.Checkpoints(str(directory))
  warnings = []
  step, _, meta = ckpts.restore_latest_valid(_smoke_target(),
                                             log=lambda *a, **k: warnings.append(a[0]))
  ckpts.close()
  assert (step, meta['epoch']) == (32, 2)
  assert len(warnings) == 1 and warnings[0].startswith(f'warning: checkpoint 48 in {directory} '
                                                       f'is unreadable (')
  assert sorted(os.listdir(directory)) == ['16', '32', 'corrupt-48']


@pytest.mark.parametrize('fields, difference', [
    ({'optimizer': 'sgd'}, 'opt_state/inner_state/inner_states/default/inner_state/0/1/trace/'
                           'bn1/bias is absent in the checkpoint but float32[8] in this run'),
    ({'lookahead.enabled': True},
     'slow/batch_stats/bn1/mean is absent in the checkpoint but float32[8] in this run'),
], ids=['optimizer', 'lookahead'])
def test_a_checkpoint_of_another_optimizer_or_lookahead_is_not_damage(fields, difference,
                                                                       smoke_run, tmp_path):
  directory = _copy_run(smoke_run, tmp_path) / 'checkpoints'
  before = _tree_hashes(directory)
  ckpts = checkpoints.Checkpoints(str(directory))
  with pytest.raises(UsageError) as refused:
    ckpts.restore_latest_valid(_smoke_target(fields))
  ckpts.close()
  assert str(refused.value).startswith(f'checkpoint 48 in {directory} does not fit this run: '
                                       f'{difference} ')
  assert _tree_hashes(directory) == before


def test_running_out_of_memory_while_restoring_moves_nothing(smoke_run, tmp_path, monkeypatch):
  directory = _copy_run(smoke_run, tmp_path) / 'checkpoints'
  before = _tree_hashes(directory)
  ckpts = checkpoints.Checkpoints(str(directory))

  def out_of_memory(*args, **kwargs):
    raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB')

  monkeypatch.setattr(ckpts.manager, 'restore', out_of_memory)
  with pytest.raises(UsageError, match=f'^out of memory while restoring checkpoint 48 from '
                                       f'{directory} .*; nothing was changed'):
    ckpts.restore_latest_valid(_smoke_target())
  ckpts.close()
  assert _tree_hashes(directory) == before


def test_disk_filling_during_a_write_keeps_the_previous_checkpoint(tmp_path):
  """A write that fails half-way (here: past a file-size limit, as on a full disk) is a
  one-line error; the half-written checkpoint is ignored, then removed by the next save."""
  directory = str(tmp_path / 'checkpoints')
  state = {'w': jax.random.normal(jax.random.PRNGKey(0), (256, 256))}  # 256 KiB, incompressible
  ckpts = checkpoints.Checkpoints(directory)
  ckpts.save(1, state, {'epoch': 1, 'step_in_epoch': 0})
  ckpts.wait()
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes fail with EFBIG
  resource.setrlimit(resource.RLIMIT_FSIZE, (100 << 10, limits[1]))
  try:
    with pytest.raises(UsageError, match=f'^disk full while writing a checkpoint to {directory} '
                                         r'\(File too large\); free space and rerun'):
      ckpts.save(2, state, {'epoch': 2, 'step_in_epoch': 0})
      ckpts.wait()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, handler)
  assert f'2{TMP_SUFFIX}' in os.listdir(directory)
  ckpts = checkpoints.Checkpoints(directory)
  assert ckpts.steps() == [1]
  assert ckpts.restore(1, state)[1] == {'epoch': 1, 'step_in_epoch': 0}
  ckpts.save(3, state, {'epoch': 3, 'step_in_epoch': 0})
  ckpts.close()
  assert sorted(os.listdir(directory)) == ['1', '3']


def _write_saved_config(workdir, **fields):
  config = smoke.get_config()
  config.update_from_flattened_dict(fields)
  workdir.mkdir(exist_ok=True)
  (workdir / 'config.json').write_text(config.to_json())
  return config


@pytest.mark.parametrize('fields, refused', [
    ({'schedule': 'plateau'}, None),
    ({'schedule': 'constant'}, None),
    ({'schedule': 'triangle'}, 'config.schedule=triangle count steps from that total: '
                               'resuming it with num_epochs=5 would change its learning rate'),
    ({'lookahead.enabled': True}, 'config.lookahead count steps from that total'),
], ids=['plateau', 'constant', 'triangle', 'lookahead'])
def test_extending_num_epochs_is_refused_where_a_total_depends_on_it(fields, refused, tmp_path):
  config = _write_saved_config(tmp_path, **fields)
  config.num_epochs = 5
  if refused:
    with pytest.raises(UsageError, match=f'holds a run of num_epochs=3 whose {refused}'):
      train.check_resume(config, str(tmp_path))
    config.allow_config_change = True
  train.check_resume(config, str(tmp_path))


def test_config_file_errors_name_the_file_and_line(run_main, tmp_path):
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config(:\n  pass\n')
  raising = tmp_path / 'raising.py'
  raising.write_text('from experiments import smoke\n\n\ndef get_config():\n'
                     '  return smoke.get_config()[0]\n')
  cases = [(('jaxres.train', '--workdir', tmp_path / 'w'), broken,
            f'{broken}, line 1: SyntaxError: invalid syntax'),
           (('tools.count_params',), raising, f"{raising}, line 5: KeyError: '0'")]
  for args, config, message in cases:
    proc = run_main(*args, '--config', config)
    _assert_clean_failure(proc)
    assert proc.stderr.strip() == f'error: cannot load the --config file: {message}'
  assert not (tmp_path / 'w').exists()


def test_a_running_trainer_keeps_other_trainers_out_but_not_readers(smoke_run, start_cli,
                                                                     run_main, tmp_path):
  workdir = _copy_run(smoke_run, tmp_path)
  lock = workdir / workdir_lock.LOCK_NAME
  proc = start_cli('jaxres.train', *SMOKE, '--workdir', workdir, '--config.num_epochs=100')
  assert _wait_for(lock.exists, proc)
  second = run_main('jaxres.train', *SMOKE, '--workdir', workdir, '--config.num_epochs=100')
  _assert_clean_failure(second)
  assert (f'error: workdir {workdir} is in use by another trainer (host {socket.gethostname()}, '
          f'pid {proc.pid}, since ') in second.stderr
  reader = run_main('jaxres.eval', '--workdir', workdir, '--json')
  assert reader.returncode == 0, reader.stderr
  assert _wait_for(lambda: len(read_metrics(workdir)) > 3, proc, poll=0.01)  # training
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 143, stderr
  assert not lock.exists()


def test_sigterm_to_one_of_two_processes_stops_both_and_a_busy_workdir_stops_both(
    start_cli, tmp_path):
  workdir = tmp_path / 'run'

  def start_pair():
    address = f'127.0.0.1:{_free_port()}'
    return [start_cli('jaxres.train', *SMOKE, '--workdir', workdir,
                      '--config.data.synthetic_train_size=256',  # 4 steps an epoch
                      '--config.data.synthetic_test_size=100',
                      env={**_devices(2), 'JAX_COORDINATOR_ADDRESS': address,
                           'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': str(i)})
            for i in range(2)]

  # Process 0 finds the workdir in use: process 1 learns it and stops as well.
  workdir.mkdir()
  (workdir / workdir_lock.LOCK_NAME).write_text(json.dumps(
      {'host': socket.gethostname(), 'pid': os.getpid(), 'started': 'now', 'token': 'test'}))
  outputs = [p.communicate(timeout=300) for p in start_pair()]
  for _, err in outputs:
    assert err.strip() == (f'error: workdir {workdir} is in use by another trainer (host '
                           f'{socket.gethostname()}, pid {os.getpid()}, since now); wait for it '
                           f'to finish or stop it (a lock left by a process that died is taken '
                           f'over)')
  # SIGTERM to process 1 only: both write the checkpoint and stop.
  (workdir / workdir_lock.LOCK_NAME).unlink()
  procs = start_pair()
  assert _wait_for(lambda: read_metrics(workdir), procs[0])
  procs[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 143, err
    assert err.strip().endswith('checkpoint written, rerun the same command to resume')
  epochs = [r['epoch'] for r in read_metrics(workdir)]
  assert epochs in ([1], [1, 2])  # stopped before the end, at the same step on both
  assert any(p.name.isdigit() for p in (workdir / 'checkpoints').iterdir())
  assert not (workdir / workdir_lock.LOCK_NAME).exists()
