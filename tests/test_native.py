"""jaxres.native: the compiled Winograd transforms equal jaxres.conv's XLA ones, and a
convolution on them equals XLA's convolution (values and gradients); without a compiler
they are unavailable and jaxres.conv falls back to XLA's transforms."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from experiments import base
from jaxres import config_lib, conv, native
from jaxres.errors import UsageError
from tests import test_conv
from tests.conftest import cli_env

needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f'{native.unavailable_reason()}')
DN = test_conv.DN
# (N, H, W, C): partial tiles (H, W not multiples of 4), channels not a multiple of the
# 64-channel block, one-tile images, the fast model's first layer.
SHAPES = [(3, 5, 7, 3), (2, 8, 8, 70), (1, 3, 3, 256), (2, 31, 31, 24), (2, 15, 15, 64)]


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
  config_lib.validate(config)  # 'auto': XLA's transforms, no error
  config.model.winograd_transforms = 'native'
  with pytest.raises(UsageError, match="winograd_transforms='native' cannot be used: no C"):
    config_lib.validate(config)
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
  with pytest.raises(UsageError, match=f'config.model.{field} must be one of'):
    config_lib.validate(config)


def test_several_devices_keep_xla_transforms():
  """XLA cannot split a custom call across devices: 'auto' keeps XLA's transforms there."""
  code = ('import jax; from jaxres import conv; print(jax.device_count(), '
          'conv.resolve_transforms("auto"))')
  env = cli_env({'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ['2', 'False']
