"""The wheel: built from this checkout, installed into a fresh virtualenv, it runs every
command from a directory that holds nothing but config files.

The fresh environment gets the wheel alone; its dependencies (jax, torch, ...) come from the
test's own environment through a .pth line, so nothing is downloaded and the only jaxres
it can import is the wheel's.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import numpy as np
import pytest

from tests.conftest import REPO

TINY = ('--config.num_epochs=1', '--config.data.synthetic_train_size=128',
        '--config.data.synthetic_test_size=100')


# What a checkout may hold besides its sources: never part of a build (setuptools would
# otherwise reuse a stale build/ left in the checkout).
NOT_SOURCES = ('.git', '.venv', 'build', 'dist', '*.egg-info', 'runs', 'data', '__pycache__')


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
  out = tmp_path_factory.mktemp('wheel')
  source = out / 'source'
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCES))
  proc = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                         '-q', '-w', str(out), str(source)], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  (path,) = out.glob('jaxres-*.whl')
  return path


@pytest.fixture(scope='module')
def fresh_env(wheel, tmp_path_factory):
  """(python of a fresh virtualenv with the wheel installed, a work directory holding only a
  copy of experiments/)."""
  root = tmp_path_factory.mktemp('venv')
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(root / 'env')], check=True,
                 timeout=120)
  python = root / 'env' / 'bin' / 'python'
  proc = subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '-q',
                         '--no-deps', '--no-index', str(wheel)], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  site = subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
                        capture_output=True, text=True, check=True).stdout.strip()
  with open(os.path.join(site, 'dependencies.pth'), 'w') as f:
    f.write(sysconfig.get_path('purelib') + '\n')  # this environment's packages, after its own
  work = root / 'work'
  shutil.copytree(REPO / 'experiments', work / 'experiments',
                  ignore=shutil.ignore_patterns('__pycache__'))
  return python, work


def _run(fresh_env, *args, timeout=600):
  python, work = fresh_env
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'XLA_FLAGS')}
  env['PYTHONUNBUFFERED'] = '1'
  proc = subprocess.run([str(python), *map(str, args)], cwd=work, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
  return proc.stdout


def test_the_wheel_holds_one_top_level_package(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  assert {n.split('/')[0] for n in names if not n.split('/')[0].endswith('.dist-info')} == {'jaxres'}
  for path in ('jaxres/tools/count_params.py', 'jaxres/tools/verify.py',
               'jaxres/cpu/native/winograd.cc', 'jaxres/torch_reference.py'):
    assert path in names


def test_every_command_runs_from_the_wheel(fresh_env):
  python, work = fresh_env
  where = _run(fresh_env, '-c', 'import jaxres, importlib.util as u; print(jaxres.__file__); '
               'print(u.find_spec("tools"), u.find_spec("tests"))')
  assert str(python.parent.parent) in where.splitlines()[0] and where.splitlines()[1] == 'None None'

  out = _run(fresh_env, '-m', 'jaxres.train', '--config', 'experiments/smoke.py', '--workdir',
             'run', *TINY)
  assert 'Epoch [1/1]' in out
  assert 'Test Acc' in _run(fresh_env, '-m', 'jaxres.eval', '--workdir', 'run')
  np.save(work / 'images.npy', np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), np.uint8))
  _run(fresh_env, '-m', 'jaxres.predict', '--workdir', 'run', '--input', 'images.npy',
       '--output', 'predictions.csv')
  assert (work / 'predictions.csv').read_text().count('\n') == 6  # header and 5 rows
  _run(fresh_env, '-m', 'jaxres.export_torch', '--workdir', 'run', '--output', 'run.pth')
  assert (work / 'run.pth').stat().st_size > 0
  assert '2,797,610' in _run(fresh_env, '-m', 'jaxres.tools.count_params', '--config',
                             'experiments/base.py')
  out = _run(fresh_env, '-m', 'jaxres.tools.compare_torch', '--config', 'experiments/smoke.py',
             '--steps', '2')
  assert 'step' in out.lower()
  for module in ('jaxres.tools.bench', 'jaxres.tools.verify', 'jaxres.tools.profile_step'):
    assert 'python -m' in _run(fresh_env, '-m', module, '--help')
  python, work = fresh_env
  proc = subprocess.run([str(python), '-m', 'jaxres.tools.verify'], cwd=work, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.startswith('error: tools.verify runs from a '
                                                         'jaxres checkout'), proc.stderr
