"""Runs survive kill -9, signals, damaged checkpoints, NaNs and bad input (issue: reliability)."""

import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import read_metrics

SMOKE = ('--config', 'experiments/smoke.py')


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
                                                                       run_cli, tmp_path):
  expected = read_metrics(smoke_run[0], drop_timing=True)
  workdir = tmp_path / 'run'
  # 1. kill -9 while epoch 1's checkpoint is being written (or right after its report).
  proc = start_cli('jaxres.train', *SMOKE, '--workdir', workdir)
  _wait_for(lambda: _checkpoint_being_written(workdir) or read_metrics(workdir), proc)
  proc.kill()
  proc.wait()
  # 2. rerun, kill -9 in the middle of epoch 3.
  proc = start_cli('jaxres.train', *SMOKE, '--workdir', workdir)
  _wait_for(lambda: len(read_metrics(workdir)) >= 2, proc)
  time.sleep(0.4)
  proc.kill()
  proc.wait()
  # 3. rerun to the end.
  done = run_cli('jaxres.train', *SMOKE, '--workdir', workdir)
  assert done.returncode == 0, done.stderr
  assert read_metrics(workdir, drop_timing=True) == expected


@pytest.mark.parametrize('signum, code', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_mid_epoch_and_resumes(smoke_run, start_cli, run_cli, tmp_path,
                                                  signum, code):
  expected = read_metrics(smoke_run[0], drop_timing=True)
  workdir = tmp_path / 'run'
  proc = start_cli('jaxres.train', *SMOKE, '--workdir', workdir)
  assert _wait_for(lambda: len(read_metrics(workdir)) >= 1, proc)
  time.sleep(0.3)
  proc.send_signal(signum)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == code, stderr
  assert 'checkpoint written' in stderr and 'Traceback' not in stderr
  resumed = run_cli('jaxres.train', *SMOKE, '--workdir', workdir)
  assert resumed.returncode == 0, resumed.stderr
  assert 'Resuming from checkpoint' in resumed.stdout
  assert read_metrics(workdir, drop_timing=True) == expected


def test_damaged_latest_checkpoint_falls_back_to_the_previous(smoke_run, run_cli, tmp_path):
  workdir = _copy_run(smoke_run, tmp_path)
  for f in (workdir / 'checkpoints' / '48').rglob('*'):
    if f.is_file():
      f.write_bytes(f.read_bytes()[:7])  # truncated
  proc = run_cli('jaxres.train', *SMOKE, '--workdir', workdir)
  assert proc.returncode == 0, proc.stderr
  assert 'warning: checkpoint 48' in proc.stderr and 'unreadable' in proc.stderr
  assert 'Resuming from checkpoint 32' in proc.stdout
  assert (workdir / 'checkpoints' / 'corrupt-48').is_dir()
  assert read_metrics(workdir, drop_timing=True) == read_metrics(smoke_run[0], drop_timing=True)


def test_non_finite_loss_stops_with_exit_3_and_keeps_the_good_checkpoint(smoke_run, run_cli,
                                                                           tmp_path):
  workdir = _copy_run(smoke_run, tmp_path)
  before = _tree_hashes(workdir / 'checkpoints')
  proc = run_cli('jaxres.train', *SMOKE, '--workdir', workdir, '--config.num_epochs=4',
                 '--config.learning_rate=3e38', '--config.allow_config_change=True')
  assert proc.returncode == 3, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and 'non-finite loss' in lines[0]
  assert 'at step 5' in lines[0] and '(epoch 4, batch' in lines[0] and 'learning rate 3e+38' in lines[0]
  assert _tree_hashes(workdir / 'checkpoints') == before
  assert len(read_metrics(workdir)) == 3
  check = run_cli('jaxres.eval', '--workdir', workdir, '--json')
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
def test_bad_train_input_is_one_line_exit_2_and_changes_nothing(case, smoke_run, run_cli, tmp_path):
  workdir = _copy_run(smoke_run, tmp_path)
  before = _tree_hashes(workdir)
  proc = run_cli('jaxres.train', *SMOKE, '--workdir', workdir, *BAD_TRAIN_INPUTS[case])
  _assert_clean_failure(proc)
  assert _tree_hashes(workdir) == before


def test_bad_inputs_outside_the_config_values(smoke_run, run_cli, tmp_path):
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
    _assert_clean_failure(run_cli(*args))
    assert not fresh.exists()
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


def test_disk_full_while_checkpointing(smoke_run, run_cli, tmp_path):
  used = sum(f.stat().st_size for f in smoke_run[0].rglob('*') if f.is_file())
  disk = tmp_path / 'small_disk'
  _mount_tmpfs(disk, used + (700 << 10))  # room for the run, not for one more checkpoint
  try:
    workdir = disk / 'run'
    shutil.copytree(smoke_run[0], workdir)
    before = _tree_hashes(workdir)
    proc = run_cli('jaxres.train', *SMOKE, '--workdir', workdir, '--config.num_epochs=4')
    _assert_clean_failure(proc)
    assert 'disk full' in proc.stderr
    after = _tree_hashes(workdir)
    # Checkpoints and metrics are untouched; config.json records the longer run it began.
    assert after.pop('config.json') != before.pop('config.json')
    assert after == before
    config = json.loads((workdir / 'config.json').read_text())
    assert config['num_epochs'] == 4
  finally:
    subprocess.run(['umount', str(disk)], check=False)


def test_resume_refuses_a_changed_recipe_but_not_a_changed_allocator(smoke_run, run_cli, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(smoke_run[0], workdir)
  proc = run_cli('jaxres.train', *SMOKE, '--workdir', workdir, '--config.learning_rate=0.1')
  _assert_clean_failure(proc)
  assert 'different config (learning_rate)' in proc.stderr
  # host_allocator changes how memory is served, not what is computed; 'hugepages' also
  # takes the command through its restart.
  proc = run_cli('jaxres.train', *SMOKE, '--workdir', workdir, '--config.host_allocator=hugepages')
  assert proc.returncode == 0, proc.stderr
