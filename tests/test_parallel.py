"""Data parallelism: 8 fake CPU devices, and two processes on localhost (issue: scale out).

The runs use the smoke config at a small learning rate (1e-4, one epoch). At the smoke
config's own rate (3e-3) training is chaotic enough that *any* change in the order of
floating-point additions -- splitting the batch over devices, or merely reversing the
order of the samples within each batch on one device -- grows from 1e-7 to 1e-3 relative
within 16 steps; at 1e-4 the same reordering stays below 1e-6, so the tolerance of 1e-5
tests that the parallel run computes the same function, not float luck.
"""

import json
import socket

import pytest

from tests.conftest import read_metrics

STABLE_SMOKE = ('--config', 'experiments/smoke.py', '--config.num_epochs=1',
                '--config.learning_rate=1e-4', '--config.log_train_steps=True')


def _devices(n):
  return {'XLA_FLAGS': f'--xla_force_host_platform_device_count={n}'}


def _step_losses(workdir):
  with open(workdir / 'train_steps.jsonl') as f:
    return [json.loads(line)['loss'] for line in f]


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


@pytest.mark.parametrize('saved_on, restored_on', [(8, 1), (1, 8)])
def test_checkpoints_restore_on_any_device_count(runs, run_cli, saved_on, restored_on):
  proc = run_cli('jaxres.eval', '--workdir', runs[saved_on], '--json', env=_devices(restored_on))
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  last = read_metrics(runs[saved_on])[-1]
  assert result['test_accuracy'] == last['test_accuracy']
  assert abs(result['test_loss'] - last['test_loss']) <= 1e-6 * last['test_loss']


def test_batch_that_does_not_split_over_devices_is_a_clear_error(run_cli, tmp_path):
  proc = run_cli('jaxres.train', *STABLE_SMOKE, '--workdir', tmp_path / 'w',
                 '--config.batch_size=60', env=_devices(8))
  assert proc.returncode == 2
  assert proc.stderr.strip() == ('error: config.batch_size=60 does not split evenly over 8 '
                                 'devices (1 processes); use a multiple of 8')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_reproduce_the_single_process_four_device_run(run_cli, start_cli, tmp_path):
  single = tmp_path / 'single'
  proc = run_cli('jaxres.train', *STABLE_SMOKE, '--workdir', single, env=_devices(4))
  assert proc.returncode == 0, proc.stderr
  multi = tmp_path / 'multi'
  address = f'127.0.0.1:{_free_port()}'
  procs = [start_cli('jaxres.train', *STABLE_SMOKE, '--workdir', multi,
                     env={**_devices(2), 'JAX_COORDINATOR_ADDRESS': address,
                          'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': str(i)})
           for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err
  assert '4 device(s) (cpu), 2 process(es)' in outputs[0][0]
  assert 'Epoch [1/1]' in outputs[0][0] and 'Epoch [' not in outputs[1][0]  # process 0 reports
  _assert_same_run(single, multi)
