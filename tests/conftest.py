"""Shared test helpers: run a jaxres command in this process or in a subprocess; the runs
that several test files read (a smoke run, ...), made once per test run.

Commands run in this process (`run_main`) unless the behaviour under test needs a
process of its own: its start-up (flags, --help: tests/test_cli.py), fake CPU devices,
several processes, signals from outside, kill -9, the host allocator's restart. The
runs that several files share are made once per test run, whichever pytest-xdist
worker asks first (`shared`: a directory guarded by a lock file that the workers share),
and so is the persistent compilation cache that every test, in-process or not, uses.

The suite runs on whatever backend is present. On a CPU it is the whole suite. On an
accelerator: each pytest worker and subprocess takes device memory as it needs it (not
75 % of it up front), float32 matmuls and convolutions run at full float32 precision
(the tolerances compare with PyTorch and XLA:CPU float32), and the tests marked
`cpu_only` (the CPU backend's machinery) are skipped with the reason.
"""

import contextlib
import fcntl
import importlib
import io
import json
import os
import shutil
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


def tiny_config():
  """smoke.py at widths 4 and one block per stage: the cheapest model of the seed's shape."""
  from experiments import smoke
  config = smoke.get_config()
  config.model.widths, config.model.blocks = (4, 4, 4, 4), (1, 1, 1, 1)
  return config


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


def _shared_root(tmp_path_factory) -> Path:
  """The directory every pytest-xdist worker of this test run shares: the run's base
  temporary directory (without xdist, this process's own)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


def shared(tmp_path_factory, name, make=None):
  """(directory, value): `name`'s directory, made once per test run by whichever worker
  asks first, make(directory) -> a JSON value; the other workers wait on its lock file,
  then reuse both. A make that failed leaves nothing behind: the next asker tries again."""
  root = _shared_root(tmp_path_factory) / 'shared'
  root.mkdir(exist_ok=True)
  directory, done = root / name, root / f'{name}.json'
  with open(root / f'{name}.lock', 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not done.exists():
      shutil.rmtree(directory, ignore_errors=True)
      directory.mkdir()
      value = make(directory) if make else None
      done.write_text(json.dumps(value))
  return directory, json.loads(done.read_text())


@pytest.fixture(scope='session', autouse=True)
def compile_cache(tmp_path_factory):
  """One persistent compilation cache for the whole test run: every worker, every
  command run in-process (through JAX_COMPILATION_CACHE_DIR, config.compilation_cache's
  'auto') and every subprocess (which inherits it)."""
  cache, _ = shared(tmp_path_factory, 'xla_cache')
  before = (os.environ.get('JAX_COMPILATION_CACHE_DIR'), jax.config.jax_compilation_cache_dir)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = str(cache)
  jax.config.update('jax_compilation_cache_dir', str(cache))
  yield cache
  if before[0] is None:
    os.environ.pop('JAX_COMPILATION_CACHE_DIR', None)
  else:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = before[0]
  jax.config.update('jax_compilation_cache_dir', before[1])


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


def _no_restart(policy):
  from jaxres.cpu import host_allocator
  if host_allocator.environment(policy, os.environ) is not None:
    raise RuntimeError(f'host_allocator {policy!r} restarts the command: run it with run_cli')


def run_command(module, *args):
  """`python -m module args` run in this process: the command's flags, main and exit
  code mapping (jaxres.cli.run), with its stdout and stderr captured ->
  CompletedProcess. Paths are relative to the checkout, as run_cli runs them. A command
  whose host allocator would restart the process is refused (it would restart pytest)."""
  from absl import flags
  from jaxres import cli
  from jaxres.cpu import host_allocator
  command = importlib.import_module(module).command
  argv = [module, *map(str, args)]
  defined, saved = set(flags.FLAGS), (sys.argv, sys.unraisablehook, os.getcwd())
  out, err, code = io.StringIO(), io.StringIO(), 0
  apply = host_allocator.apply
  try:
    # ml_collections reads --config.FIELD overrides from sys.argv, and loads a --config
    # file into the module 'config_config', whose names a fresh process would not have.
    sys.modules.pop('config_config', None)
    sys.argv, host_allocator.apply = argv, _no_restart
    os.chdir(REPO)
    main = command()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        cli.run(main, argv)
      except SystemExit as e:
        code = e.code or 0
  finally:
    sys.argv, sys.unraisablehook, cwd = saved
    os.chdir(cwd)
    host_allocator.apply = apply
    for name in set(flags.FLAGS) - defined:  # the command's flags: the next one defines its own
      delattr(flags.FLAGS, name)
  return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope='session')
def run_main(compile_cache):
  """run_main('jaxres.eval', '--workdir', ...) -> CompletedProcess: run_command, for
  commands whose behaviour under test needs no process of their own."""
  return run_command


def _shared_run(tmp_path_factory, name, *args):
  """A finished smoke.py training run made once per test run: (workdir, CompletedProcess)."""

  def train(directory):
    proc = run_command('jaxres.train', '--config', 'experiments/smoke.py', '--workdir',
                       directory / 'run', *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {'stdout': proc.stdout, 'stderr': proc.stderr}

  directory, output = shared(tmp_path_factory, name, train)
  return directory / 'run', subprocess.CompletedProcess(name, 0, **output)


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory, compile_cache):
  """A finished smoke training run: (workdir, CompletedProcess). Read it, never write it
  (copy it first): every worker shares it."""
  return _shared_run(tmp_path_factory, 'smoke')


@pytest.fixture(scope='session')
def holdout_run(tmp_path_factory, compile_cache):
  """A finished one-epoch smoke run that held out 200 training images: (workdir, proc)."""
  return _shared_run(tmp_path_factory, 'holdout', '--config.data.holdout=200',
                     '--config.num_epochs=1')


@pytest.fixture(scope='session')
def second_smoke_run(tmp_path_factory, compile_cache):
  """A finished one-epoch smoke run on smoke_run's data with its own normalization and
  test-time augmentation (an ensemble's second member): (workdir, proc)."""
  return _shared_run(tmp_path_factory, 'smoke2', '--config.num_epochs=1',
                     '--config.eval_tta=flip', '--config.data.mean=(0.4,0.45,0.5)')


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
