"""jaxres.backends: the CPU backend is a plug-in. Only jaxres.backends imports it, and
jaxres without it trains on XLA's convolutions, with the same parameter tree."""

import ast
import json
import math
import subprocess
import sys
import textwrap

import jax
import pytest

from experiments import fast, smoke
from jaxres import backends, models, train_state
from tests.conftest import REPO, cli_env

BACKEND = 'jaxres.cpu'
# The backend's own tools, which may import it.
BACKEND_TOOLS = ('tools/bench_transforms.py',)


def _imports_the_backend(path) -> list[str]:
  """The import statements of a source file that name jaxres.cpu (or a module in it)."""
  names = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names += [node.module] + [f'{node.module}.{a.name}' for a in node.names]
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (
        path.name != 'backends.py'):  # importlib.import_module('jaxres.cpu')
      names.append(node.value)
  return [n for n in names if n == BACKEND or n.startswith(BACKEND + '.')]


def test_only_the_backends_module_imports_the_cpu_backend():
  sources = [p for p in sorted((REPO / 'jaxres').rglob('*.py')) + sorted(
      (REPO / 'tools').glob('*.py'))
             if (REPO / 'jaxres' / 'cpu') not in p.parents
             and str(p.relative_to(REPO)) not in BACKEND_TOOLS]
  assert REPO / 'jaxres' / 'backends.py' in sources and REPO / 'tools' / 'bench.py' in sources
  found = {str(p.relative_to(REPO)): _imports_the_backend(p) for p in sources}
  assert {path: names for path, names in found.items() if names} == {}
  backends_source = (REPO / 'jaxres' / 'backends.py').read_text()
  assert f"'cpu': '{BACKEND}'" in backends_source  # the one, lazy import


def test_platforms_and_their_backends():
  assert backends.load('tpu') is None and backends.load('gpu') is None
  config = smoke.get_config()
  config.model.conv_impl = 'winograd'
  assert backends.conv_defs(config, 'gpu') == {}
  assert backends.describe(config, 'gpu') == 'convolutions xla; host allocator system'
  assert backends.resolved(config, 'gpu') == backends.NO_BACKEND
  cpu = backends.load('cpu')
  assert cpu is not None and cpu.PLATFORM == 'cpu'
  assert set(backends.conv_defs(config, 'cpu')) == {'conv', 'conv_pool'}
  assert backends.resolved(config, 'cpu')['conv_impl'] == 'winograd'


def test_a_backend_that_fails_to_import_says_why(monkeypatch):
  """A missing package is no backend; an import error inside one is an error."""
  monkeypatch.setitem(backends.BACKENDS, 'cpu', 'jaxres.no_such_backend')
  assert backends.load('cpu') is None
  monkeypatch.setitem(backends.BACKENDS, 'cpu', 'tests.no_such_package.backend')
  with pytest.raises(ModuleNotFoundError, match='tests.no_such_package'):
    backends.load('cpu')


def _param_shapes(config) -> dict:
  """{'path/to/param': [shape, dtype]} of config's model, without computing anything."""
  model = models.create_model(config)
  shapes = jax.eval_shape(lambda: train_state.init_variables(
      model, jax.random.PRNGKey(0), config.data.image_size))
  return {jax.tree_util.keystr(path): [list(x.shape), str(x.dtype)]
          for path, x in jax.tree_util.tree_leaves_with_path(shapes)}


def _fast_at_test_size():
  config = fast.get_config()
  with config.unlocked():
    config.model.widths = (16, 32, 32)
  return config


# In a process where `import jaxres.cpu` fails as if the package had been removed: the
# smoke config (with the backend's automatic settings, which would be Winograd on the
# CPU) trains through jaxres.train's functions; prints the start line's part, the
# parameter trees and the records.
_WITHOUT_BACKEND = '''
import json, sys
sys.modules['jaxres.cpu'] = None  # import jaxres.cpu: ModuleNotFoundError
from experiments import smoke
from jaxres import backends, runtime, train
from tests import test_backends
config = smoke.get_config()
config.model.conv_impl = 'auto'
config.model.winograd_transforms = 'auto'
config.host_allocator = 'hugepages'
config.num_epochs = 2
assert backends.load('cpu') is None and backends.conv_defs(config) == {}
records = train.train_and_evaluate(config, sys.argv[1])
print('RESULT', json.dumps({
    'describe': runtime.describe(config),
    'resnet': test_backends._param_shapes(config),
    'whitened_resnet': test_backends._param_shapes(test_backends._fast_at_test_size()),
    'losses': [r['train_loss'] for r in records],
    'modules': sorted(m for m in sys.modules if m.startswith('jaxres.cpu')),
}))
'''


def test_without_the_cpu_backend_jaxres_trains_on_xla_convolutions(tmp_path):
  proc = subprocess.run([sys.executable, '-c', textwrap.dedent(_WITHOUT_BACKEND),
                         str(tmp_path / 'run')], cwd=REPO, env=cli_env(), capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  line = next(l for l in proc.stdout.splitlines() if l.startswith('RESULT '))
  result = json.loads(line[len('RESULT '):])
  assert result['modules'] == ['jaxres.cpu']  # the None that hides it, nothing loaded
  assert 'convolutions xla; host allocator system;' in result['describe']
  assert ('jaxres: float32, matmul precision default; convolutions xla; host allocator system;'
          in proc.stdout)
  losses = result['losses']
  assert len(losses) == 2 and all(map(math.isfinite, losses)) and losses[1] < losses[0]
  # The same parameter trees as on this process's backend (Winograd on a CPU).
  config = smoke.get_config()
  config.model.conv_impl = 'auto'
  assert result['resnet'] == _param_shapes(config)
  assert result['whitened_resnet'] == _param_shapes(_fast_at_test_size())
