"""Several hosts: the README's multi-host command, two processes x two CPU devices on
localhost, with the shipped recipes' own automatic settings. Its own file so that pytest-xdist
runs these two-process trainings beside tests/test_parallel.py's, not after them."""

import socket

import numpy as np
import pytest

from tests.conftest import read_metrics


def _devices(n):
  return {'XLA_FLAGS': f'--xla_force_host_platform_device_count={n}'}


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_processes(start_cli, args, workdir, with_flags=False):
  """Train on 2 processes x 2 CPU devices on localhost: [(stdout, stderr)] of each, after
  checking both exit 0 and only process 0 reports. The coordinator is given as the
  README's flags (`with_flags`) or as its environment variables."""
  address = f'127.0.0.1:{_free_port()}'
  procs = []
  for i in range(2):
    if with_flags:
      extra, env = (f'--coordinator_address={address}', '--num_processes=2',
                    f'--process_id={i}'), _devices(2)
    else:
      extra, env = (), {**_devices(2), 'JAX_COORDINATOR_ADDRESS': address,
                        'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': str(i)}
    procs.append(start_cli('jaxres.train', *args, '--workdir', workdir, *extra, env=env))
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err
  assert '4 device(s) (cpu), 2 process(es)' in outputs[0][0]
  assert 'Final Test Accuracy' in outputs[0][0] and 'Epoch [' not in outputs[1][0]
  return outputs


# The shipped recipes at test size: sizes shrink (widths, images, batch, epochs); every
# automatic setting (convolutions, transforms, host allocator, data feed, compilation
# cache, precision) stays as base.py and fast.py ship it.
TINY_DATA = ('--config.data.name=synthetic', '--config.data.synthetic_train_size=512',
             '--config.data.synthetic_test_size=256', '--config.batch_size=64',
             '--config.eval_batch_size=128')
TINY_BASE = ('--config', 'experiments/base.py', '--config.num_epochs=1',
             '--config.model.widths=(8,16,32,64)', '--config.model.blocks=(1,1,1,1)', *TINY_DATA)
# Four epochs: fast.py's whitening bias freezes after epoch 3 (a second compiled step)
# and its lookahead starts at epoch 3.
TINY_FAST = ('--config', 'experiments/fast.py', '--config.num_epochs=4',
             '--config.model.widths=(16,32,32)', '--config.model.whiten_images=256', *TINY_DATA)


@pytest.mark.parametrize('args, paths', [
    (TINY_BASE, 'convolutions winograd F(4x4,3x3), xla transforms; host allocator {}; '
                'data torchvision (augment seed, 2 workers)'),
    (TINY_FAST, 'convolutions winograd F(4x4,3x3), xla transforms; host allocator {}; '
                'data on the device (augment reflect_translate)'),
], ids=['base', 'fast'])
def test_shipped_recipes_start_on_two_hosts(start_cli, tmp_path, args, paths):
  """The README's multi-host command with a shipped config's own automatic settings
  (a config that pinned them away once hid a start-up crash)."""
  from tests.test_host_allocator import SERVED  # the CPU's huge-page restart applies
  (out, _), _ = _two_processes(start_cli, args, tmp_path / 'run', with_flags=True)
  assert 'jaxres: float32, matmul precision ' in out
  assert paths.format('hugepages' if SERVED else 'system') in out
  records = read_metrics(tmp_path / 'run')
  assert all(np.isfinite(r['train_loss']) for r in records)
  if len(records) == 4:  # fast.py: the step compiled again when the frozen set changed
    assert records[0]['compile_seconds'] > 0 and records[3]['compile_seconds'] > 0
