"""jaxres.cpu.native: the compiled Winograd transforms equal jaxres.cpu.conv's XLA ones, and
a convolution on them equals XLA's convolution (values and gradients); without a compiler
they are unavailable and jaxres.cpu.conv falls back to XLA's transforms."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import base
from jaxres import config_lib, cpu, layers, models, runtime
from jaxres.cpu import conv, native
from jaxres.errors import UsageError
from tests import test_conv
from tests.conftest import cli_env

pytestmark = pytest.mark.cpu_only
needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f'{native.unavailable_reason()}')
DN = test_conv.DN
# (N, H, W, C): partial tiles (H, W not multiples of 4), channels not a multiple of the
# 64-channel block, one-tile images, the fast model's first layer; channel counts whose
# input transform writes groups of tiles (24, 8), one of them with a per-thread range of
# tiles that starts mid-group (18 tiles on 2 threads).
SHAPES = [(3, 5, 7, 3), (2, 8, 8, 70), (1, 3, 3, 256), (2, 31, 31, 24), (2, 15, 15, 64),
          (3, 5, 9, 24), (2, 7, 7, 8)]


def _tiles(n, h, w):
  return n * conv._num_tiles(h, 4) * conv._num_tiles(w, 4)


@needs_native
@pytest.mark.parametrize('shape', SHAPES)
def test_transforms_match_xla(shape):
  n, h, w, c = shape
  kx, kv = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, shape)
  v = jax.random.normal(kv, (36, _tiles(n, h, w), c))
  pairs = {
      'input': (native.input_transform(x), conv.input_transform(x, 4)),
      'input adjoint': (native.input_transform_adjoint(v, shape),
                        conv.input_transform_adjoint(v, shape, 4)),
      'output': (native.output_transform(v, (n, h, w)), conv.output_transform(v, (n, h, w), 4)),
      'output adjoint': (native.output_transform_adjoint(x), conv.output_transform_adjoint(x, 4)),
  }
  for name, (got, want) in pairs.items():
    assert got.shape == want.shape, name
    assert test_conv._rel(got, want) < 1e-6, name


@needs_native
@pytest.mark.parametrize('n, size, cin, cout', [(2, 16, 8, 16), (2, 15, 8, 16), (2, 7, 16, 8),
                                                (2, 3, 16, 8), (2, 31, 24, 64)])
def test_winograd_conv_on_native_transforms_matches_xla(n, size, cin, cout):
  x, w = test_conv._data((n, size, size, cin), (3, 3, cin, cout), seed=1)
  fast = conv.conv_general_dilated('winograd', winograd_transforms='native')
  call = lambda x, w: fast(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)
  assert 'jaxres_winograd' in jax.jit(call).lower(x, w).as_text()
  # F(4x4, 3x3) rounds to about 1e-5 relative; the kernel gradient sums the most terms
  # (XLA's transforms: 7e-6 on the largest case, these: 1.1e-5).
  test_conv.check_against_xla(fast, x, w, 1, ((1, 1), (1, 1)), kernel_grad_tol=3e-5)


@needs_native
@pytest.mark.parametrize('shape', SHAPES + [(1, 4, 4, 2), (2, 6, 9, 5)])
def test_pooling_output_transform_matches_output_transform_then_max_pool(shape):
  """Odd sizes drop a row or column; even ones ending a tile mid-way (6 = 4 + 2) do not."""
  n, h, w, k = shape
  kv, kg = jax.random.split(jax.random.PRNGKey(2))
  v = jax.random.normal(kv, (36, _tiles(n, h, w), k))
  dy = jax.random.normal(kg, (n, h // 2, w // 2, k))
  y, mask = native.output_transform_pool(v, (n, h, w))
  want, pool_vjp = jax.vjp(lambda v: layers.max_pool(conv.output_transform(v, (n, h, w), 4), 2), v)
  assert y.shape == mask.shape == want.shape and mask.dtype == jnp.uint8
  assert test_conv._rel(y, want) < 1e-6
  # Exactly one pixel per window is the maximum of random data: one bit of 1, 2, 4, 8.
  assert set(np.unique(np.asarray(mask))) <= {1, 2, 4, 8}
  dm = native.output_transform_pool_adjoint(dy, mask, (h, w))
  assert test_conv._rel(dm, pool_vjp(dy)[0]) < 1e-6


@needs_native
def test_pooling_adjoint_sends_the_gradient_to_every_marked_pixel():
  """A tie (mask bits 1 | 8) sends the full gradient to both pixels, as layers.max_pool."""
  dy = jnp.ones((1, 2, 2, 1))
  mask = jnp.array([9, 1, 2, 0], jnp.uint8).reshape(1, 2, 2, 1)
  dm = native.output_transform_pool_adjoint(dy, mask, (4, 4))
  dy_full = jnp.zeros((1, 4, 4, 1)).at[0, 0, 0].set(1).at[0, 1, 1].set(1).at[0, 0, 2].set(1)
  dy_full = dy_full.at[0, 2, 1].set(1)  # window (1, 0), pixel (0, 1): bit 2
  assert test_conv._rel(dm, native.output_transform_adjoint(dy_full)) < 1e-6


@needs_native
@pytest.mark.parametrize('n, size, cin, cout', [(2, 31, 24, 64), (2, 15, 64, 70), (2, 7, 8, 130),
                                                (2, 8, 3, 5)])
def test_convolution_fused_with_max_pool_matches_xla(n, size, cin, cout):
  x, w = test_conv._data((n, size, size, cin), (3, 3, cin, cout), seed=3)
  fused = conv.conv_general_dilated('winograd', winograd_transforms='native', max_pool=True)
  call = lambda x, w: fused(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)
  assert 'jaxres_winograd_output_pool' in jax.jit(call).lower(x, w).as_text()
  ref = lambda x, w: layers.max_pool(test_conv._reference(x, w, 1, ((1, 1), (1, 1))), 2)
  assert test_conv._rel(jax.jit(call)(x, w), ref(x, w)) < 1e-5
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  dx, dw = jax.jit(jax.grad(loss(call), (0, 1)))(x, w)
  rx, rw = jax.grad(loss(ref), (0, 1))(x, w)
  assert test_conv._rel(dx, rx) < 1e-5 and test_conv._rel(dw, rw) < 3e-5


@pytest.mark.parametrize('impl, transforms', [('xla', 'xla'), ('winograd', 'xla')])
def test_max_pool_convolution_without_native_transforms_pools_after(impl, transforms):
  x, w = test_conv._data((2, 9, 9, 4), (3, 3, 4, 8), seed=4)
  fused = conv.conv_general_dilated(impl, winograd_transforms=transforms, max_pool=True)
  got = fused(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)
  want = layers.max_pool(test_conv._reference(x, w, 1, ((1, 1), (1, 1))), 2)
  assert got.shape == (2, 4, 4, 8) and test_conv._rel(got, want) < 1e-5


def test_resolve_transforms():
  assert conv.resolve_transforms('xla') is False
  assert conv.resolve_transforms('auto', backend='gpu') is False
  assert conv.resolve_transforms('auto', winograd_tile=2) is False
  assert conv.resolve_transforms('auto', dtype=jnp.bfloat16) is False
  assert conv.resolve_transforms('auto') is native.available()
  with pytest.raises(ValueError, match='F\\(4x4, 3x3\\)'):
    conv.resolve_transforms('native', winograd_tile=2)
  with pytest.raises(ValueError, match='unknown winograd_transforms'):
    conv.resolve_transforms('cuda')


def test_without_a_compiler_conv_keeps_xla_transforms(monkeypatch, tmp_path):
  monkeypatch.setattr(native, '_state', {})
  monkeypatch.setenv('CXX', 'no-such-compiler-here')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert not native.available()
  assert 'no C++ compiler' in native.unavailable_reason()
  assert conv.resolve_transforms('auto') is False
  with pytest.raises(ValueError, match='no C\\+\\+ compiler'):
    conv.conv_general_dilated('winograd', winograd_transforms='native')
  with pytest.raises(RuntimeError, match='no C\\+\\+ compiler'):
    native.input_transform(jnp.zeros((1, 4, 4, 1)))
  config = base.get_config()
  runtime.check(config)  # 'auto': XLA's transforms, no error
  config.model.winograd_transforms = 'native'
  config_lib.validate(config)  # the config alone is fine: no backend is asked
  with pytest.raises(UsageError, match="winograd_transforms='native' cannot be used: no C"):
    runtime.check(config)
  fallback = conv.conv_general_dilated('winograd', winograd_transforms='auto')
  x = jnp.ones((1, 4, 4, 2))
  w = jnp.ones((3, 3, 2, 2))
  assert 'jaxres_winograd' not in jax.jit(functools.partial(
      fallback, window_strides=(1, 1), padding=((1, 1), (1, 1)),
      dimension_numbers=DN)).lower(x, w).as_text()


def test_build_is_cached_by_content(tmp_path, monkeypatch):
  """The library's name hashes what goes into it: same inputs, same file."""
  if native._compiler() is None:
    pytest.skip('no C++ compiler')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  path = native.library_path(native._compiler())
  assert path.startswith(str(tmp_path)) and path == native.library_path(native._compiler())
  assert path != native.library_path('/some/other/c++')


@pytest.mark.parametrize('field, value', [('conv_impl', 'fft'), ('winograd_tile', 3),
                                          ('winograd_transforms', 'cuda')])
def test_config_names_a_bad_convolution_field(field, value):
  config = base.get_config()
  config.model[field] = value
  config_lib.validate(config)  # the core leaves the backend's fields to it
  with pytest.raises(UsageError, match=f'config.model.{field} must be one of'):
    cpu.validate(config)
  with pytest.raises(UsageError, match=f'config.model.{field} must be one of'):
    runtime.check(config)


def test_several_devices_keep_xla_transforms():
  """XLA cannot split a custom call across devices: 'auto' keeps XLA's transforms there."""
  code = ('import jax; from jaxres.cpu import conv; print(jax.device_count(), '
          'conv.resolve_transforms("auto"))')
  env = cli_env({'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ['2', 'False']


@needs_native
def test_fast_model_on_fused_pooling_matches_xla_convolutions():
  """WhitenedResNet's conv-pool layers on the fused native transforms: the same
  parameter tree, logits and gradients as on XLA's convolution and nn-free pooling."""
  from experiments import fast
  config = fast.get_config()
  x = jax.random.normal(jax.random.PRNGKey(5), (4, 32, 32, 3))
  results = {}
  for impl in ('xla', 'winograd'):
    with config.unlocked():
      config.model.widths = (16, 32, 32)
      config.model.conv_impl = impl
      config.model.winograd_transforms = 'native' if impl == 'winograd' else 'xla'
    model = models.create_model(config)
    variables = model.init(jax.random.PRNGKey(0), x)

    def loss(params, model=model, variables=variables):
      logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                              mutable=['batch_stats'])
      return jnp.sum(jnp.sin(logits)), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
    text = jax.jit(loss).lower(variables['params']).as_text()
    results[impl] = (logits, grads, 'jaxres_winograd_output_pool' in text)
  assert not results['xla'][2] and results['winograd'][2]
  assert test_conv._rel(results['winograd'][0], results['xla'][0]) < 1e-4
  flat_xla = jax.tree_util.tree_leaves_with_path(results['xla'][1])
  flat_native = jax.tree.leaves(results['winograd'][1])
  for (path, want), got in zip(flat_xla, flat_native):
    assert test_conv._rel(got, want) < 1e-3, jax.tree_util.keystr(path)


@needs_native
def test_bench_transforms_times_every_transform_of_each_convolution():
  from tools import bench_transforms
  convs = (('pooled', 7, 24, 8, True), ('plain', 3, 8, 16, False))
  rows = bench_transforms.bench(batch=2, repeats=1, convs=convs)
  assert [r['conv'] for r in rows] == ['pooled', 'plain']
  assert set(rows[0]) == {'conv', 'shape', 'input', 'input_adjoint', 'output_pool',
                          'output_pool_adjoint'}
  assert set(rows[1]) == {'conv', 'shape', 'input', 'input_adjoint', 'output',
                          'output_adjoint'}
  assert all(t > 0 for r in rows for k, t in r.items() if k not in ('conv', 'shape'))
