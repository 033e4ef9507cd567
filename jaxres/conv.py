"""Convolutions for the ResNet as batched matmuls (Winograd), for CPU backends.

XLA's CPU convolution is a direct convolution that moves much more data than its
arithmetic needs; XLA's CPU matmul runs near the machine's peak. This module recasts
the model's 3x3 stride-1 convolutions as Winograd's minimal filtering algorithm
F(m x m, 3 x 3) (Lavin & Gray, 2015), whose heavy part is alpha^2 independent GEMMs
(alpha = m + 2):

    Y = A^T [ (G W G^T) (.) (B^T X B) ] A            (per tile, per channel pair)

For an input tile X (alpha x alpha, one channel) and a filter W (3 x 3), B^T X B and
G W G^T are alpha x alpha; their elementwise product, summed over input channels, is
a matmul per Winograd coordinate (i, j):

    M[i, j] (tiles x Cout) = V[i, j] (tiles x Cin) @ U[i, j] (Cin x Cout),

and A^T M A maps each alpha x alpha block of M back to an m x m output tile. Per
output pixel and channel pair the GEMMs do alpha^2 / m^2 multiplies instead of 9:
4 for F(2x2, 3x3), 2.25 for F(4x4, 3x3).

All transforms are linear maps of strided slices of the padded input, written as
sums of slices with constant coefficients so that XLA fuses each into one loop; the
backward pass is the autodiff transpose of the same program (again transforms and
GEMMs, in the Winograd domain), so no hand-written gradient is needed.

Layouts are NHWC activations and HWIO kernels, as flax.linen.Conv, so a parameter
tree is shared unchanged between this path and XLA's convolution.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Winograd transforms F(m, 3) from the Cook-Toom construction (Lavin & Gray, 2015).
# Rows of BT act on alpha = m + 2 consecutive inputs, rows of G on the 3 filter taps,
# rows of AT on the alpha products; F(m x m, 3 x 3) nests F(m, 3) in both axes.
_TRANSFORMS = {
    2: dict(
        BT=np.array([[1, 0, -1, 0],
                     [0, 1, 1, 0],
                     [0, -1, 1, 0],
                     [0, 1, 0, -1]], np.float64),
        G=np.array([[1, 0, 0],
                    [1 / 2, 1 / 2, 1 / 2],
                    [1 / 2, -1 / 2, 1 / 2],
                    [0, 0, 1]], np.float64),
        AT=np.array([[1, 1, 1, 0],
                     [0, 1, -1, -1]], np.float64)),
    4: dict(
        BT=np.array([[4, 0, -5, 0, 1, 0],
                     [0, -4, -4, 1, 1, 0],
                     [0, 4, -4, -1, 1, 0],
                     [0, -2, -1, 2, 1, 0],
                     [0, 2, -1, -2, 1, 0],
                     [0, 4, 0, -5, 0, 1]], np.float64),
        G=np.array([[1 / 4, 0, 0],
                    [-1 / 6, -1 / 6, -1 / 6],
                    [-1 / 6, 1 / 6, -1 / 6],
                    [1 / 24, 1 / 12, 1 / 6],
                    [1 / 24, -1 / 12, 1 / 6],
                    [0, 0, 1]], np.float64),
        AT=np.array([[1, 1, 1, 1, 1, 0],
                     [0, 1, -1, 2, -2, 0],
                     [0, 1, 1, 4, 4, 0],
                     [0, 1, -1, 8, -8, 1]], np.float64)),
}
TILE_SIZES = tuple(sorted(_TRANSFORMS))


def transforms(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(BT, G, AT) of F(m, 3): alpha x alpha, alpha x 3 and m x alpha, float64."""
  if m not in _TRANSFORMS:
    raise ValueError(f'Winograd tile size {m} not supported (choose from {TILE_SIZES})')
  t = _TRANSFORMS[m]
  return t['BT'], t['G'], t['AT']


def _combine(matrix: np.ndarray, parts: Sequence[jax.Array]) -> list[jax.Array]:
  """[sum_k matrix[r, k] * parts[k] for each row r], skipping zero coefficients.

  Coefficients +-1 become adds and subtracts, so XLA sees the cheapest elementwise
  program and fuses it with the slicing that produced `parts`.
  """
  rows = []
  for coeffs in matrix:
    acc = None
    for c, part in zip(coeffs, parts):
      if c == 0:
        continue
      term = part if abs(c) == 1 else part * jnp.asarray(abs(c), part.dtype)
      if acc is None:
        acc = -term if c < 0 else term
      else:
        acc = acc - term if c < 0 else acc + term
    rows.append(acc if acc is not None else jnp.zeros_like(parts[0]))
  return rows


def _tiles_along(x: jax.Array, axis: int, m: int, num_tiles: int) -> list[jax.Array]:
  """alpha strided slices of `x` along `axis`: slice k holds x[m * t + k] for each tile t."""
  alpha = m + 2
  out = []
  for k in range(alpha):
    start = [0] * x.ndim
    limit = list(x.shape)
    strides = [1] * x.ndim
    start[axis], limit[axis], strides[axis] = k, k + m * (num_tiles - 1) + 1, m
    out.append(lax.slice(x, start, limit, strides))
  return out


def input_transform(x: jax.Array, m: int) -> jax.Array:
  """B^T d B for every alpha x alpha input tile d: (N, H, W, C) -> (alpha^2, N*T*S, C).

  Pads like PyTorch's padding=1 (plus zeros at the bottom/right when H or W is not a
  multiple of m); tile (t, s) starts at padded pixel (m t, m s). T = ceil(H / m),
  S = ceil(W / m).
  """
  bt, _, _ = transforms(m)
  n, h, w, c = x.shape
  th, tw = -(-h // m), -(-w // m)
  xp = jnp.pad(x, ((0, 0), (1, m * th + 1 - h), (1, m * tw + 1 - w), (0, 0)))
  rows = _combine(bt, _tiles_along(xp, 1, m, th))  # alpha x (N, T, Wp, C)
  v = [col for r in rows for col in _combine(bt, _tiles_along(r, 2, m, tw))]
  return jnp.stack(v).reshape(len(v), n * th * tw, c)


def filter_transform(kernel: jax.Array, m: int) -> jax.Array:
  """G g G^T for a 3x3 HWIO kernel: (3, 3, Cin, Cout) -> (alpha^2, Cin, Cout)."""
  _, g, _ = transforms(m)
  g = jnp.asarray(g, kernel.dtype)
  u = jnp.einsum('ai,bj,ijck->abck', g, g, kernel, precision=lax.Precision.HIGHEST)
  return u.reshape((-1,) + kernel.shape[2:])


def output_transform(prod: jax.Array, shape: tuple[int, int, int], m: int) -> jax.Array:
  """A^T M A per tile: (alpha^2, N*T*S, K) -> (N, H, W, K) for output (N, H, W)."""
  _, _, at = transforms(m)
  n, h, w = shape
  alpha = m + 2
  th, tw = -(-h // m), -(-w // m)
  k = prod.shape[-1]
  prod = prod.reshape(alpha, alpha, n, th, tw, k)
  rows = _combine(at, [prod[i] for i in range(alpha)])  # m x (alpha, N, T, S, K)
  y = jnp.stack([jnp.stack(_combine(at, [r[j] for j in range(alpha)])) for r in rows])
  # y[i, j, n, t, s, k] is output pixel (m t + i, m s + j).
  y = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, m * th, m * tw, k)
  return y[:, :h, :w, :]


def winograd_conv3x3(x: jax.Array, kernel: jax.Array, m: int = 2,
                     precision=None) -> jax.Array:
  """3x3 convolution, stride 1, padding 1 (NHWC x HWIO -> NHWC) by Winograd F(m x m, 3 x 3).

  Equals lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
  dimension_numbers=('NHWC', 'HWIO', 'NHWC')) up to floating-point rounding, which
  grows with m (the transforms' coefficients grow).
  """
  if kernel.shape[:2] != (3, 3):
    raise ValueError(f'winograd_conv3x3 needs a 3x3 kernel, got {kernel.shape[:2]}')
  n, h, w, _ = x.shape
  v = input_transform(x, m)
  u = filter_transform(kernel.astype(x.dtype), m)
  prod = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), precision=precision)
  return output_transform(prod, (n, h, w), m)
