"""jaxres.runtime: start-up order, platform decisions, precision, and bf16 training of both
recipes (issue: where users train)."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import base, fast
from jaxres import config_lib, input_pipeline, models, optim, runtime, steps
from jaxres import train_state as train_state_lib
from jaxres.errors import UsageError
from tests.conftest import REPO, cli_env


def test_validation_and_the_platform_guess_start_no_backend():
  """What a multi-host command does before jax.distributed.initialize starts nothing:
  initialize() must come before any backend exists."""
  code = textwrap.dedent('''
      from jax._src import xla_bridge
      from experiments import base, fast, smoke
      from jaxres import config_lib, runtime
      for module in (base, fast, smoke):
        config = module.get_config()
        config_lib.validate(config)
      print(runtime.expected_platform(), sorted(xla_bridge._backends))
  ''')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=cli_env(), check=True,
                       capture_output=True, text=True).stdout
  assert out.split()[1:] == ['[]'], out


@pytest.mark.parametrize('platforms, expected', [('cpu', 'cpu'), ('cuda,cpu', 'gpu'),
                                                 ('rocm', 'gpu'), ('tpu', 'tpu')])
def test_expected_platform_follows_jax_platforms(platforms, expected):
  assert runtime.expected_platform(platforms) == expected


def test_expected_platform_needs_a_plugin_and_its_device(monkeypatch):
  monkeypatch.setattr(runtime, '_installed_accelerator_plugins', lambda: {'gpu'})
  monkeypatch.setattr(runtime.os.path, 'exists', lambda path: path == '/dev/nvidiactl')
  assert runtime.expected_platform('') == 'gpu'
  monkeypatch.setattr(runtime.os.path, 'exists', lambda path: False)  # plugin, no GPU
  assert runtime.expected_platform('') == 'cpu'
  monkeypatch.setattr(runtime, '_installed_accelerator_plugins', set)
  assert runtime.expected_platform('') == 'cpu'


@pytest.mark.parametrize('value, platform, expected', [
    (None, 'cpu', False), (None, 'gpu', True), (None, 'tpu', True),
    (True, 'cpu', True), (False, 'gpu', False)])
def test_data_on_device_is_automatic_by_platform(value, platform, expected):
  config = base.get_config()
  config.data.on_device = value
  assert runtime.on_device(config, platform) is expected


def test_shipped_configs_keep_their_automatic_settings():
  """Tested path = shipped path: what base.py and fast.py leave automatic."""
  b, f = base.get_config(), fast.get_config()
  assert b.data.on_device is None and f.data.on_device is True
  for config in (b, f):
    assert config.model.conv_impl == 'auto' and config.model.winograd_transforms == 'auto'
    assert config.host_allocator == 'hugepages' and config.matmul_precision == 'default'
    assert config.compilation_cache == 'auto'


def test_compilation_cache_directory(tmp_path):
  env = {'XDG_CACHE_HOME': str(tmp_path)}
  assert runtime._compilation_cache_dir('auto', env) == str(tmp_path / 'jaxres' / 'xla')
  assert runtime._compilation_cache_dir('auto', {**env, 'JAX_COMPILATION_CACHE_DIR': '/c'}) == '/c'
  assert runtime._compilation_cache_dir('none', env) is None
  assert runtime._compilation_cache_dir('', env) is None
  assert runtime._compilation_cache_dir(str(tmp_path / 'x'), env) == str(tmp_path / 'x')


@pytest.mark.parametrize('field, value, message', [
    ('dtype', 'float16', 'float16 needs loss scaling'),
    ('matmul_precision', 'tf32', 'config.matmul_precision must be one of'),
])
def test_config_refuses_what_it_cannot_do_honestly(field, value, message):
  config = base.get_config()
  config[field] = value
  with pytest.raises(UsageError, match=message):
    config_lib.validate(config)


def test_configure_sets_matmul_precision_and_describe_names_it(tmp_path):
  config = base.get_config()
  config.matmul_precision = 'float32'
  config.compilation_cache = str(tmp_path / 'cache')
  before = (jax.config.jax_default_matmul_precision, jax.config.jax_compilation_cache_dir)
  try:
    runtime.configure(config)
    assert jax.config.jax_default_matmul_precision == 'float32'
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'cache')
    line = runtime.describe(config)
    assert line.startswith('float32, matmul precision float32; convolutions ')
  finally:
    jax.config.update('jax_default_matmul_precision', before[0])
    jax.config.update('jax_compilation_cache_dir', before[1])


@pytest.mark.cpu_only
def test_describe_names_the_cpu_paths():
  config = base.get_config()
  line = runtime.describe(config)
  assert 'convolutions winograd F(4x4,3x3), ' in line and ' transforms;' in line
  assert 'data torchvision (augment seed, 2 workers)' in line
  config.dtype = 'bfloat16'  # Winograd loses too much in 16 bits: XLA's convolution
  assert 'bfloat16, matmul precision ' in runtime.describe(config)
  assert 'convolutions xla;' in runtime.describe(config)


def _tiny(module):
  """A shipped recipe at test size: sizes shrink, automatic settings stay."""
  config = module.get_config()
  config.batch_size = 32
  config.dtype = 'bfloat16'
  if config.model.name == 'resnet':
    config.model.widths, config.model.blocks = (8, 16, 32, 64), (1, 1, 1, 1)
  else:
    config.model.widths, config.model.whiten_images = (16, 32, 32), 64
  return config


@pytest.mark.parametrize('module', [base, fast], ids=['base', 'fast'])
def test_bfloat16_training_of_each_recipe_is_finite_and_learns(module):
  """A few bf16 steps on one batch of generated images: finite, the loss going down."""
  config = _tiny(module)
  train, _ = input_pipeline.synthetic(64, 8, seed=0)
  model = models.create_model(config)
  tx = optim.create_optimizer(config, steps_per_epoch=2)
  images = input_pipeline.normalize(train.images[:models.data_images(config)],
                                    config.data.mean, config.data.std)
  state = train_state_lib.create(config, model, tx, models.data_init(config, images))
  assert model.dtype == jnp.bfloat16
  images = input_pipeline.normalize(train.images[:32], config.data.mean, config.data.std)
  batch = {'image': jnp.asarray(images), 'label': jnp.asarray(train.labels[:32])}
  step = jax.jit(lambda s, b: steps.train_step(s, b, model=model, tx=tx,
                                               label_smoothing=config.label_smoothing))
  losses = []
  for _ in range(6):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss_sum'] / metrics['count']))
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses
  for leaf in jax.tree.leaves(state.params):
    assert leaf.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(leaf)))
