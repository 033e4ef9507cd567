"""jaxres.cpu.conv: every matmul formulation equals XLA's convolution (values and gradients).

Whole models on these formulations are checked against PyTorch in tests/test_parity.py
(its config runs conv_impl='auto', Winograd on a CPU): logits, BatchNorm statistics and
every parameter's gradient.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxres.cpu import conv

DN = ('NHWC', 'HWIO', 'NHWC')


def _reference(x, w, stride, padding):
  return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=DN,
                                  precision=lax.Precision.HIGHEST)


def _data(shape, kernel_shape, seed=0):
  kx, kw = jax.random.split(jax.random.PRNGKey(seed))
  return jax.random.normal(kx, shape), jax.random.normal(kw, kernel_shape) / np.sqrt(
      np.prod(kernel_shape[:3]))


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize('m', conv.TILE_SIZES)
def test_transforms_are_an_exact_1d_filter(m):
  """F(m, 3): AT [(G g) * (BT d)] is the valid correlation of d (m + 2) with g (3)."""
  bt, g, at = conv.transforms(m)
  rng = np.random.default_rng(0)
  d, f = rng.normal(size=m + 2), rng.normal(size=3)
  np.testing.assert_allclose(at @ ((g @ f) * (bt @ d)), np.correlate(d, f, 'valid'), atol=1e-10)


# (batch, size, in, out, kernel, stride, padding): the model's convolutions, odd sizes
# (partial Winograd tiles), and the whitening layer's 2x2 VALID one.
CASES = [
    (2, 16, 8, 16, 3, 1, ((1, 1), (1, 1))),
    (2, 15, 8, 16, 3, 1, ((1, 1), (1, 1))),
    (2, 7, 16, 8, 3, 1, ((1, 1), (1, 1))),
    (2, 3, 16, 8, 3, 1, ((1, 1), (1, 1))),
    (2, 16, 8, 16, 3, 2, ((1, 1), (1, 1))),
    (2, 15, 8, 16, 3, 2, ((1, 1), (1, 1))),
    (2, 16, 8, 16, 1, 2, ((0, 0), (0, 0))),
    (2, 16, 8, 16, 1, 1, 'VALID'),
    (2, 32, 3, 24, 2, 1, 'VALID'),
]


@pytest.mark.parametrize('tile, n, size, cin, cout, k, stride, padding',
                         [(4,) + case for case in CASES] + [(2,) + case for case in CASES[:2]])
def test_matmul_formulations_match_xla(tile, n, size, cin, cout, k, stride, padding):
  x, w = _data((n, size, size, cin), (k, k, cin, cout))
  check_against_xla(conv.conv_general_dilated('winograd', winograd_tile=tile,
                                              winograd_transforms='xla'),
                    x, w, stride, padding)


def check_against_xla(fast, x, w, stride, padding, kernel_grad_tol=1e-5):
  """`fast` (a conv_general_dilated) equals XLA's convolution in value and gradients."""
  new = lambda x, w: fast(x, w, (stride, stride), padding, dimension_numbers=DN)
  ref = functools.partial(_reference, stride=stride, padding=padding)
  assert _rel(jax.jit(new)(x, w), ref(x, w)) < 1e-5
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  dx, dw = jax.jit(jax.grad(loss(new), (0, 1)))(x, w)
  rx, rw = jax.grad(loss(ref), (0, 1))(x, w)
  assert _rel(dx, rx) < 1e-5 and _rel(dw, rw) < kernel_grad_tol


def test_unsupported_convolutions_fall_back_to_xla():
  x, w = _data((2, 9, 9, 32), (5, 5, 32, 8))  # 5x5, deep patches: not a matmul formulation
  fast = conv.conv_general_dilated('winograd')
  np.testing.assert_allclose(fast(x, w, (1, 1), ((2, 2), (2, 2)), dimension_numbers=DN),
                             lax.conv_general_dilated(x, w, (1, 1), ((2, 2), (2, 2)),
                                                      dimension_numbers=DN), rtol=1e-6)
  assert conv._formulation(w.shape, (1, 1), 'SAME', None, None, DN, 1, 1, None, 4, False) is None
  assert conv._formulation(w.shape, (1, 1), ((1, 1), (1, 1)), None, (2, 2), DN, 1, 1,
                           None, 4, False) is None


def test_resolve_picks_winograd_only_for_float32_on_cpu():
  assert conv.resolve('auto', 'cpu') == 'winograd'
  assert conv.resolve('auto', 'gpu') == 'xla'
  assert conv.resolve('auto', 'cpu', jnp.bfloat16) == 'xla'
  assert conv.resolve('xla', 'cpu') == 'xla'
  with pytest.raises(ValueError, match='unknown conv_impl'):
    conv.resolve('fft')
  with pytest.raises(ValueError, match='tile size 3'):
    conv.conv_general_dilated('winograd', winograd_tile=3)
