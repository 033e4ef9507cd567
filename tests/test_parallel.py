"""Data parallelism: 8 fake CPU devices, and two processes on localhost (issue: scale out).

The runs use the smoke config at a small learning rate (1e-4, one epoch). At the smoke
config's own rate (3e-3) training is chaotic enough that *any* change in the order of
floating-point additions -- splitting the batch over devices, or merely reversing the
order of the samples within each batch on one device -- grows from 1e-7 to 1e-3 relative
within 16 steps; at 1e-4 the same reordering stays below 1e-6, so the tolerance of 1e-5
tests that the parallel run computes the same function, not float luck.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import smoke
from jaxres import models, reporting, steps
from tests.conftest import read_metrics
from tests.test_multihost import _devices, _two_processes
from tools import compare_torch

STABLE_SMOKE = ('--config', 'experiments/smoke.py', '--config.num_epochs=1',
                '--config.learning_rate=1e-4', '--config.log_train_steps=True')


def _step_losses(workdir):
  return [r['loss'] for r in reporting.read_jsonl(str(workdir / 'train_steps.jsonl'))]


def _assert_same_run(a, b, tol=1e-5):
  la, lb = _step_losses(a), _step_losses(b)
  assert len(la) == len(lb) == 16
  for step, (x, y) in enumerate(zip(la, lb), 1):
    assert abs(x - y) <= tol * abs(x), f'step {step}: {x} vs {y}'
  ma, mb = read_metrics(a)[-1], read_metrics(b)[-1]
  assert ma['train_accuracy'] == mb['train_accuracy']
  assert ma['test_accuracy'] == mb['test_accuracy']
  for key in ('train_loss', 'test_loss'):
    assert abs(ma[key] - mb[key]) <= tol * abs(ma[key])


@pytest.fixture(scope='module')
def runs(run_cli, tmp_path_factory):
  root = tmp_path_factory.mktemp('parallel')
  out = {}
  for n in (1, 8):
    proc = run_cli('jaxres.train', *STABLE_SMOKE, '--workdir', root / f'd{n}', env=_devices(n))
    assert proc.returncode == 0, proc.stderr
    assert f'{n} device(s)' in proc.stdout
    out[n] = root / f'd{n}'
  return out


def test_eight_devices_train_the_same_model_as_one(runs):
  _assert_same_run(runs[1], runs[8])


def _assert_evaluates_as_its_last_epoch(proc, workdir):
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  last = read_metrics(workdir)[-1]
  assert result['test_accuracy'] == last['test_accuracy']
  assert abs(result['test_loss'] - last['test_loss']) <= 1e-6 * last['test_loss']


def test_checkpoints_restore_on_any_device_count(runs, run_cli, run_main):
  """Saved on 8 devices, evaluated on this process's one; saved on one, evaluated on 8."""
  _assert_evaluates_as_its_last_epoch(run_main('jaxres.eval', '--workdir', runs[8], '--json'),
                                      runs[8])
  _assert_evaluates_as_its_last_epoch(
      run_cli('jaxres.eval', '--workdir', runs[1], '--json', env=_devices(8)), runs[1])


def test_per_device_batch_statistics_end_to_end(runs, run_cli, run_main, tmp_path):
  """model.sync_batch_stats=False on 2 devices: each device normalizes its own half of
  the batch (the first step's loss is that of a model whose BatchNorm splits the batch in
  two, not the synchronized run's), and the checkpoint evaluates on one device as the
  run's last epoch did."""
  workdir = tmp_path / 'per_device'
  proc = run_cli('jaxres.train', *STABLE_SMOKE, '--workdir', workdir,
                 '--config.model.sync_batch_stats=False', env=_devices(2))
  assert proc.returncode == 0, proc.stderr
  assert '2 device(s)' in proc.stdout
  config = smoke.get_config()
  config.learning_rate, config.model.sync_batch_stats = 1e-4, False
  batch = next(compare_torch.training_batches(config, 1))
  state = compare_torch.initial_state(config)

  def first_loss(groups):
    logits, _ = models.create_model(config, groups).apply(
        {'params': state.params, 'batch_stats': state.batch_stats}, batch['image'],
        train=True, mutable=['batch_stats'])
    return float(jnp.mean(steps.cross_entropy(logits, batch['label'])))

  loss, synchronized = _step_losses(workdir)[0], _step_losses(runs[1])[0]
  assert abs(loss - first_loss(2)) <= 1e-5 * loss
  assert abs(synchronized - first_loss(1)) <= 1e-5 * loss
  assert abs(loss - synchronized) > 1e-4 * loss  # the halves' statistics differ
  assert all(np.isfinite(_step_losses(workdir)))
  _assert_evaluates_as_its_last_epoch(run_main('jaxres.eval', '--workdir', workdir, '--json'),
                                      workdir)


def test_batch_that_does_not_split_over_devices_is_a_clear_error(run_cli, tmp_path):
  proc = run_cli('jaxres.train', *STABLE_SMOKE, '--workdir', tmp_path / 'w',
                 '--config.batch_size=60', env=_devices(8))
  assert proc.returncode == 2
  assert proc.stderr.strip() == ('error: config.batch_size=60 does not split evenly over 8 '
                                 'devices (1 processes); use a multiple of 8')


def test_two_processes_train_the_same_model_as_one_device(runs, start_cli, tmp_path):
  multi = tmp_path / 'multi'
  _two_processes(start_cli, STABLE_SMOKE, multi)
  _assert_same_run(runs[1], multi)
