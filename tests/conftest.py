"""Shared test helpers: run a jaxres command in a subprocess; one smoke run per session.

The suite runs on whatever backend is present. On a CPU it is the whole suite. On an
accelerator: each pytest worker and subprocess takes device memory as it needs it (not
75 % of it up front), float32 matmuls and convolutions run at full float32 precision
(the tolerances compare with PyTorch and XLA:CPU float32), and the tests marked
`cpu_only` (the CPU backend's machinery) are skipped with the reason.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxres import runtime

if runtime.expected_platform() != 'cpu':  # decided before any backend starts
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'float32')  # for the subprocesses
  jax.config.update('jax_default_matmul_precision', 'float32')

REPO = Path(__file__).resolve().parents[1]
FAKE_DEVICES = '--xla_force_host_platform_device_count'


def cli_env(extra=None, cache_dir=None):
  """The environment of a jaxres command run by a test: this checkout first on the path,
  unbuffered output; fake CPU devices (XLA_FLAGS' FAKE_DEVICES) run on the CPU."""
  env = dict(os.environ)
  env['PYTHONPATH'] = str(REPO) + os.pathsep + env.get('PYTHONPATH', '')
  env['PYTHONUNBUFFERED'] = '1'
  if cache_dir:
    env['JAX_COMPILATION_CACHE_DIR'] = str(cache_dir)
  env.update(extra or {})
  if FAKE_DEVICES in env.get('XLA_FLAGS', ''):
    env['JAX_PLATFORMS'] = 'cpu'
  return env


def pytest_configure(config):
  config.addinivalue_line('markers', 'cpu_only: tests of the CPU backend\'s machinery (native '
                          'Winograd transforms, XLA:CPU profiles); skipped on accelerators')


def pytest_collection_modifyitems(config, items):
  backend = jax.default_backend()
  if backend == 'cpu':
    return
  skip = pytest.mark.skip(reason=f'CPU backend only (this machine runs {backend})')
  for item in items:
    if 'cpu_only' in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope='module')
def one_torch_thread():
  """PyTorch on one thread: on a busy 2-core machine its thread pool only slows it down.
  Modules that run PyTorch use it with pytestmark = pytest.mark.usefixtures(...)."""
  import torch
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture
def register_for_test(monkeypatch):
  """register_for_test(registry, name, entry): `entry` registered under `name` for this
  test only (the registry's entries are restored afterwards), as code outside the
  package registers it."""

  def register(registry, name, entry):
    monkeypatch.setattr(registry, '_entries', dict(registry._entries))
    return registry.register(name, entry)

  return register


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory):
  return tmp_path_factory.mktemp('xla_cache')


@pytest.fixture(scope='session')
def run_cli(compile_cache):
  """run_cli('jaxres.train', '--config', ...) -> CompletedProcess (text, never raises)."""

  def run(module, *args, env=None, timeout=600, cwd=REPO):
    return subprocess.run([sys.executable, '-m', module, *map(str, args)], cwd=cwd,
                          env=cli_env(env, compile_cache), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)

  return run


@pytest.fixture(scope='session')
def start_cli(compile_cache):
  """start_cli('jaxres.train', ...) -> Popen (text pipes), for tests that signal it."""

  def start(module, *args, env=None, cwd=REPO):
    return subprocess.Popen([sys.executable, '-m', module, *map(str, args)], cwd=cwd,
                            env=cli_env(env, compile_cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

  return start


@pytest.fixture(scope='session')
def smoke_run(run_cli, tmp_path_factory):
  """A finished smoke training run: (workdir, CompletedProcess)."""
  workdir = tmp_path_factory.mktemp('smoke') / 'run'
  proc = run_cli('jaxres.train', '--config', 'experiments/smoke.py', '--workdir', workdir)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return workdir, proc


@pytest.fixture(scope='session')
def holdout_run(run_cli, tmp_path_factory):
  """A finished one-epoch smoke run that held out 200 training images: (workdir, proc)."""
  workdir = tmp_path_factory.mktemp('holdout') / 'run'
  proc = run_cli('jaxres.train', '--config', 'experiments/smoke.py', '--workdir', workdir,
                 '--config.data.holdout=200', '--config.num_epochs=1')
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return workdir, proc


@pytest.fixture(scope='session')
def second_smoke_run(run_cli, tmp_path_factory):
  """A finished one-epoch smoke run on smoke_run's data with its own normalization and
  test-time augmentation (an ensemble's second member): (workdir, proc)."""
  workdir = tmp_path_factory.mktemp('smoke2') / 'run'
  proc = run_cli('jaxres.train', '--config', 'experiments/smoke.py', '--workdir', workdir,
                 '--config.num_epochs=1', '--config.eval_tta=flip',
                 '--config.data.mean=(0.4,0.45,0.5)')
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return workdir, proc


def run_probabilities(workdir, images, step='latest', batch_size=100):
  """Class probabilities of uint8 NHWC `images` by one run, in this process (its own
  normalization and test-time augmentation, as jaxres.predict and jaxres.eval apply)."""
  from jaxres import checkpoints, evaluation, predict
  config, model, state, _ = checkpoints.load_run(str(workdir), step)
  return predict.predict_probabilities(model, state, images, batch_size, tuple(config.data.mean),
                                       tuple(config.data.std), **evaluation.tta_options(config))


def smoke_test_split():
  """The images and labels smoke runs evaluate on (experiments/smoke.py, generated)."""
  from experiments import smoke
  from jaxres import input_pipeline
  config = smoke.get_config()
  return input_pipeline.load(config.data, config.seed)[1]


def read_metrics(workdir, drop_timing=False):
  """metrics.jsonl's records; drop_timing removes the keys that differ run to run."""
  from jaxres import reporting
  records = reporting.read_jsonl(str(Path(workdir) / 'metrics.jsonl'))
  if drop_timing:
    records = [{k: v for k, v in r.items() if k not in reporting.TIMING_KEYS} for r in records]
  return records
