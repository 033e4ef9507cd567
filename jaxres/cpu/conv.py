"""Convolutions as matmuls, for XLA's CPU backend: Winograd, im2col, strided matmul.

Why: on CPU, XLA's convolutions are slow where PyTorch's oneDNN is fast -- above all
the weight gradients, which XLA computes as a convolution over the batch after
transposing activations to a batch-minor layout -- while XLA's CPU matmuls run near
the machine's peak. Every convolution of the ResNet is rewritten here as matmuls plus
cheap, fusible data movement (`python -m tools.bench` measures the train step with
and without them).

3x3, stride 1 (all but the downsampling convs): Winograd's minimal filtering algorithm
F(m x m, 3 x 3) (Lavin & Gray, 2015). With alpha = m + 2, every alpha x alpha input
tile d (stride m, overlapping by 2) and the 3x3 filter g become

    V = B^T d B,   U = G g G^T,   Y = A^T [ sum over Cin of U (.) V ] A,

and for each of the alpha^2 Winograd coordinates (i, j) the sum over input channels
is one matmul, M[i, j] (tiles x Cout) = V[i, j] (tiles x Cin) @ U[i, j] (Cin x Cout).
Per output pixel and channel pair the matmuls do alpha^2 / m^2 multiplies instead of 9:
4 for F(2x2, 3x3), 2.25 for F(4x4, 3x3) (default; rounding error about 1e-5 relative
in float32, against 1e-6 for m = 2). The backward pass stays in the Winograd domain
(a custom VJP, faster than JAX's own transpose of the forward program):

    dM = A dY A^T,   dV = dM U^T,   dx = B dV B^T (overlap-added),
    dU = V^T dM,     dw = G^T dU G.

1x1 without padding, any stride: a strided slice and one matmul.
3x3 with stride 2 or more, and stride-1 kernels with small patches (k * k * Cin <= 64,
such as a 2x2 whitening layer on RGB): im2col (k^2 strided slices side by side, one
matmul).

The four transforms are XLA ops, or with winograd_transforms='native' the loops of
jaxres/cpu/native/winograd.cc (F(4x4, 3x3) in float32 on CPU; BENCHMARKS.md, native
Winograd transforms), called
through XLA's FFI; 'auto' picks them where they apply and build (resolve_transforms).
On native transforms a convolution followed by 2x2 max pooling can be one op pair
(winograd_conv3x3_max_pool, conv_general_dilated(max_pool=True)): the output transform
pools each tile as it computes it.

Anything else (dilation, groups, other layouts) goes to lax.conv_general_dilated.
Layouts are NHWC activations and HWIO kernels, as flax.linen.Conv, so parameter trees
are shared unchanged with XLA's convolution (`conv_general_dilated(impl)` below is a
drop-in for flax.linen.Conv's `conv_general_dilated` field).
"""

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxres import layers

IMPLS = ('auto', 'xla', 'winograd')
TRANSFORMS = ('auto', 'xla', 'native')
# Stride-1 convolutions other than 3x3 go to im2col when a patch has at most this many
# entries (k * k * in_channels): a 2x2 whitening layer on RGB has 12.
IM2COL_MAX_DEPTH = 64

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


def _slices(x: jax.Array, axis: int, start: int, stride: int, count: int) -> jax.Array:
  """x[start :: stride][:count] along `axis`."""
  starts = [0] * x.ndim
  limits = list(x.shape)
  strides = [1] * x.ndim
  starts[axis], limits[axis], strides[axis] = start, start + stride * (count - 1) + 1, stride
  return lax.slice(x, starts, limits, strides)


def _tile_transform(x: jax.Array, matrix: np.ndarray, axis: int, m: int) -> jax.Array:
  """Transform overlapping tiles along `axis`: (.., m T + 2, ..) -> (alpha', .., T, ..).

  Tile t covers entries m t .. m t + alpha - 1 (alpha = matrix.shape[1] = m + 2); output
  row a (a new leading axis) is sum_k matrix[a, k] x[m t + k].
  """
  num_tiles = (x.shape[axis] - 2) // m
  parts = [_slices(x, axis, k, m, num_tiles) for k in range(matrix.shape[1])]
  return jnp.stack(_combine(matrix, parts))


def _tile_transform_adjoint(y: jax.Array, matrix: np.ndarray, axis: int, m: int) -> jax.Array:
  """The transpose of _tile_transform: (alpha', .., T, ..) -> (.., m T + 2, ..).

  Each tile's sum_a matrix[a, k] y[a] is added back at entry m t + k; tiles overlap by
  two entries, so entry m t + r (r < m) collects k = r from tile t and k = r + m from
  tile t - 1. `axis` indexes y without its leading axis.
  """
  parts = _combine(matrix.T, [y[a] for a in range(y.shape[0])])  # alpha x (.., T, ..)
  num_tiles = parts[0].shape[axis]
  phases = []
  for r in range(m):
    acc = None
    for q, k in enumerate(range(r, len(parts), m)):
      pad = [(0, 0)] * parts[k].ndim
      pad[axis] = (q, 1 - q)
      term = jnp.pad(parts[k], pad)
      acc = term if acc is None else acc + term
    phases.append(acc)  # (.., T + 1, ..): entry m t + r for t = 0..T
  out = jnp.stack(phases, axis=axis + 1)
  shape = list(parts[0].shape)
  shape[axis] = (num_tiles + 1) * m
  return lax.slice_in_dim(out.reshape(shape), 0, m * num_tiles + 2, axis=axis)


def _num_tiles(size: int, m: int) -> int:
  return -(-size // m)


def input_transform(x: jax.Array, m: int) -> jax.Array:
  """V = B^T d B for every alpha x alpha input tile d: (N, H, W, C) -> (alpha^2, N T S, C).

  Pads like PyTorch's padding=1 (plus zeros at the bottom/right when H or W is not a
  multiple of m); tile (t, s) starts at padded pixel (m t, m s); T = ceil(H / m),
  S = ceil(W / m). Separable: B^T along W, then along H.
  """
  bt, _, _ = transforms(m)
  n, h, w, c = x.shape
  th, tw = _num_tiles(h, m), _num_tiles(w, m)
  xp = jnp.pad(x, ((0, 0), (1, m * th + 1 - h), (1, m * tw + 1 - w), (0, 0)))
  v = _tile_transform(_tile_transform(xp, bt, 2, m), bt, 2, m)  # (a, b, N, T, S, C)
  return v.reshape(-1, n * th * tw, c)


def input_transform_adjoint(v: jax.Array, shape: tuple[int, int, int, int], m: int) -> jax.Array:
  """The transpose of input_transform: (alpha^2, N T S, C) -> (N, H, W, C).

  Each tile's B dV B^T is added back onto the padded image where the tile came from
  (tiles overlap by 2 pixels), and the padding is cropped.
  """
  bt, _, _ = transforms(m)
  n, h, w, c = shape
  alpha = m + 2
  th, tw = _num_tiles(h, m), _num_tiles(w, m)
  v = v.reshape(alpha, alpha, n, th, tw, c)
  xp = _tile_transform_adjoint(_tile_transform_adjoint(v, bt, 2, m), bt, 2, m)
  return xp[:, 1:h + 1, 1:w + 1, :]


def filter_transform(kernel: jax.Array, m: int) -> jax.Array:
  """U = G g G^T for a 3x3 HWIO kernel: (3, 3, Cin, Cout) -> (alpha^2, Cin, Cout).

  One small matmul with kron(G, G) (alpha^2 x 9): the kernel is tiny, and a single op
  keeps the compiled program (and its compile time) small.
  """
  _, g, _ = transforms(m)
  gg = jnp.asarray(np.kron(g, g), kernel.dtype)
  u = jnp.dot(gg, kernel.reshape(9, -1), precision=lax.Precision.HIGHEST)
  return u.reshape((gg.shape[0],) + kernel.shape[2:])


def output_transform(prod: jax.Array, shape: tuple[int, int, int], m: int) -> jax.Array:
  """Y = A^T M A per tile: (alpha^2, N T S, K) -> (N, H, W, K) for output (N, H, W)."""
  _, _, at = transforms(m)
  n, h, w = shape
  alpha = m + 2
  th, tw = _num_tiles(h, m), _num_tiles(w, m)
  k = prod.shape[-1]
  prod = prod.reshape(alpha, alpha, n, th, tw, k)
  y = jnp.stack(_combine(at, [prod[a] for a in range(alpha)]))  # (i, b, N, T, S, K)
  y = jnp.stack(_combine(at, [y[:, b] for b in range(alpha)]))  # (j, i, N, T, S, K)
  # y[j, i, n, t, s, k] is output pixel (m t + i, m s + j).
  y = y.transpose(2, 3, 1, 4, 0, 5).reshape(n, m * th, m * tw, k)
  return y[:, :h, :w, :]


def output_transform_adjoint(dy: jax.Array, m: int) -> jax.Array:
  """The transpose of output_transform: (N, H, W, K) -> (alpha^2, N T S, K).

  dM = A dY A^T for every m x m tile dY of the (zero-padded) output gradient.
  """
  _, _, at = transforms(m)
  n, h, w, k = dy.shape
  th, tw = _num_tiles(h, m), _num_tiles(w, m)
  dy = jnp.pad(dy, ((0, 0), (0, m * th - h), (0, m * tw - w), (0, 0)))
  dy = dy.reshape(n, th, m, tw, m, k)
  dm = jnp.stack(_combine(at.T, [dy[:, :, i] for i in range(m)]))  # (a, N, T, S, m, K)
  dm = jnp.stack(_combine(at.T, [dm[:, :, :, :, j] for j in range(m)]), 1)  # (a, b, ..)
  return dm.reshape(-1, n * th * tw, k)


def _bmm(a, b, contract_a: int, contract_b: int, precision=None):
  """Batched matmul over the leading (Winograd coordinate) axis."""
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((0,), (0,))),
                         precision=precision)


def _transform_fns(m: int, native: bool):
  """(input, input adjoint, output, output adjoint) transforms: XLA's or jaxres.cpu.native's."""
  if native:
    from jaxres.cpu import native as native_lib
    return (native_lib.input_transform, native_lib.input_transform_adjoint,
            native_lib.output_transform, native_lib.output_transform_adjoint)
  return (lambda x: input_transform(x, m),
          lambda v, shape: input_transform_adjoint(v, shape, m),
          lambda prod, shape: output_transform(prod, shape, m),
          lambda dy: output_transform_adjoint(dy, m))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def winograd_conv3x3(x: jax.Array, kernel: jax.Array, m: int = 4,
                     precision=None, native: bool = False) -> jax.Array:
  """3x3 convolution, stride 1, padding 1 (NHWC x HWIO -> NHWC) by Winograd F(m x m, 3 x 3).

  Equals lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
  dimension_numbers=('NHWC', 'HWIO', 'NHWC')) up to floating-point rounding, which
  grows with m (the transforms' coefficients grow). Gradients: see the module
  docstring; three batches of alpha^2 matmuls in all, each the size of the forward's.
  `native`: the data transforms of jaxres.cpu.native (m = 4, float32, CPU) instead of XLA's.
  """
  return _winograd_fwd(x, kernel, m, precision, native)[0]


def _winograd_products(x, kernel, m, precision, to_v):
  """(V, U, M): the transformed input and kernel and their alpha^2 matmuls."""
  v = to_v(x)
  u = filter_transform(kernel.astype(x.dtype), m)
  return v, u, _bmm(v, u, 2, 1, precision)


def _winograd_grads(m, precision, from_v, v, u, kernel, dm, x_shape):
  """(dx, dkernel) from dM, the gradient of the matmuls' products."""
  dx = from_v(_bmm(dm, u, 2, 2, precision), x_shape)
  du = _bmm(v, dm, 1, 1, precision)
  _, filter_vjp = jax.vjp(lambda k: filter_transform(k, m), kernel.astype(du.dtype))
  (dk,) = filter_vjp(du)
  return dx, dk.astype(kernel.dtype)


def _winograd_fwd(x, kernel, m, precision, native):
  n, h, w, _ = x.shape
  to_v, _, from_m, _ = _transform_fns(m, native)
  v, u, prod = _winograd_products(x, kernel, m, precision, to_v)
  return from_m(prod, (n, h, w)), (v, u, kernel)


def _winograd_bwd(m, precision, native, res, dy):
  v, u, kernel = res
  _, from_v, _, to_m = _transform_fns(m, native)
  return _winograd_grads(m, precision, from_v, v, u, kernel, to_m(dy),
                         dy.shape[:3] + v.shape[-1:])


winograd_conv3x3.defvjp(_winograd_fwd, _winograd_bwd)


def winograd_conv3x3_max_pool(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
  """layers.max_pool(winograd_conv3x3(x, kernel, 4, native=True), 2) with the pooling done
  inside jaxres.cpu.native's output transform (F(4x4, 3x3), float32, CPU).

  The convolution's full-resolution output is never written: each output tile is
  pooled where it is computed (a 2x2 window lies inside one tile), and the gradient
  goes from the pooled gradient straight into the Winograd domain, to the pixels each
  window's maximum came from (all of them on a tie, as layers.max_pool). Saves two
  passes over the full-resolution activation forward and two backward.
  """
  return _conv_max_pool(x, kernel, precision, x.shape[1:3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_max_pool(x, kernel, precision, size):
  return _conv_max_pool_fwd(x, kernel, precision, size)[0]


def _conv_max_pool_fwd(x, kernel, precision, size):
  from jaxres.cpu import native as native_lib
  v, u, prod = _winograd_products(x, kernel, 4, precision, native_lib.input_transform)
  y, mask = native_lib.output_transform_pool(prod, (x.shape[0],) + tuple(size))
  return y, (v, u, kernel, mask)


def _conv_max_pool_bwd(precision, size, res, dy):
  from jaxres.cpu import native as native_lib
  v, u, kernel, mask = res
  dm = native_lib.output_transform_pool_adjoint(dy, mask, size)
  return _winograd_grads(4, precision, native_lib.input_transform_adjoint, v, u, kernel, dm,
                         (dy.shape[0],) + tuple(size) + v.shape[-1:])


_conv_max_pool.defvjp(_conv_max_pool_fwd, _conv_max_pool_bwd)


def im2col_conv(x: jax.Array, kernel: jax.Array, stride: int, padding, precision=None
                ) -> jax.Array:
  """k x k convolution with explicit `padding` ((top, bottom), (left, right)) and
  `stride`: one matmul on the k^2 shifted (strided) views, side by side.

  Pays where the patch matrix is small: stride 2 (9/4 of the input for 3x3), or few
  input channels (a 2x2 whitening layer on RGB); for 3x3 stride 1 Winograd is better.
  """
  n, h, w, c = x.shape
  kh, kw = kernel.shape[:2]
  (pt, pb), (pl, pr) = padding
  ho, wo = (h + pt + pb - kh) // stride + 1, (w + pl + pr - kw) // stride + 1
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  cols = jnp.concatenate(
      [lax.slice(xp, (0, i, j, 0), (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                 (1, stride, stride, 1)) for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.dot(cols, kernel.reshape(kh * kw * c, -1).astype(x.dtype), precision=precision)


def strided_conv1x1(x: jax.Array, kernel: jax.Array, stride: int, precision=None) -> jax.Array:
  """1x1 convolution without padding: a strided slice and a matmul."""
  if stride != 1:
    x = x[:, ::stride, ::stride, :]
  return jnp.dot(x, kernel[0, 0].astype(x.dtype), precision=precision)


# ---------------------------------------------------------------------------- dispatch

_NHWC_HWIO = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                      out_spec=(0, 3, 1, 2))


def _formulation(rhs_shape, window_strides, padding, lhs_dilation, rhs_dilation,
                 dimension_numbers, feature_group_count, batch_group_count,
                 preferred_element_type, winograd_tile, native, max_pool=False):
  """The matmul formulation for a conv_general_dilated call, or None for XLA's conv.

  With `max_pool`, the formulation's output is max-pooled 2x2 (layers.max_pool), in
  the output transform itself for a Winograd convolution on native transforms.
  """
  dn = lax.conv_dimension_numbers((1, 1, 1, 1), rhs_shape, dimension_numbers)
  plain = (dn == _NHWC_HWIO and feature_group_count == 1 and batch_group_count == 1
           and preferred_element_type is None
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1))))
  strides = tuple(window_strides)
  if not plain or strides[0] != strides[1]:
    return None
  stride = strides[0]
  pads = (((0, 0), (0, 0)) if padding == 'VALID' else
          None if isinstance(padding, str) else tuple(map(tuple, padding)))
  kernel_size = tuple(rhs_shape[:2])
  if pads is None:
    return None
  if kernel_size == (3, 3) and pads == ((1, 1), (1, 1)) and stride == 1:
    if max_pool and native:
      return winograd_conv3x3_max_pool
    fn = lambda x, k, precision: winograd_conv3x3(x, k, winograd_tile, precision, native)
  elif kernel_size == (1, 1) and pads == ((0, 0), (0, 0)):
    fn = functools.partial(strided_conv1x1, stride=stride)
  elif ((kernel_size == (3, 3) and stride > 1)
        or (stride == 1 and rhs_shape[2] * kernel_size[0] * kernel_size[1] <= IM2COL_MAX_DEPTH)):
    fn = functools.partial(im2col_conv, stride=stride, padding=pads)
  else:
    return None
  if max_pool:
    return lambda x, k, precision: layers.max_pool(fn(x, k, precision=precision), 2)
  return fn


def resolve(impl: str, backend: Optional[str] = None, dtype=jnp.float32) -> str:
  """The concrete implementation ('xla' or 'winograd') that `impl` means.

  'auto' is 'winograd' on CPU in float32, where it wins,
  and 'xla' elsewhere: GPU and TPU convolution libraries beat these formulations, and
  Winograd's transforms lose too much precision in 16-bit floats.
  """
  if impl not in IMPLS:
    raise ValueError(f'unknown conv_impl {impl!r} (choose {", ".join(IMPLS)})')
  if impl != 'auto':
    return impl
  backend = backend or jax.default_backend()
  return 'winograd' if backend == 'cpu' and jnp.dtype(dtype) == jnp.float32 else 'xla'


def resolve_transforms(transforms: str, winograd_tile: int = 4, dtype=jnp.float32,
                       backend: Optional[str] = None) -> bool:
  """Whether `transforms` means jaxres.cpu.native's Winograd transforms (True) or XLA's.

  'auto' is native wherever native can be used; 'native' where it cannot (see
  _native_obstacle) raises ValueError saying why; 'xla' is never native.
  """
  if transforms not in TRANSFORMS:
    raise ValueError(f'unknown winograd_transforms {transforms!r} (choose {", ".join(TRANSFORMS)})')
  if transforms == 'xla':
    return False
  obstacle = _native_obstacle(winograd_tile, dtype, backend or jax.default_backend())
  if obstacle is not None and transforms == 'native':
    raise ValueError(f"winograd_transforms='native' cannot be used: {obstacle}")
  return obstacle is None


def _native_obstacle(winograd_tile: int, dtype, backend: str) -> Optional[str]:
  """Why jaxres.cpu.native's transforms cannot run here, or None if they can (built now)."""
  if winograd_tile != 4:
    return f'winograd_tile={winograd_tile} (native transforms are F(4x4, 3x3))'
  if jnp.dtype(dtype) != jnp.float32:
    return f'dtype {jnp.dtype(dtype).name} (native transforms are float32)'
  if backend != 'cpu':
    return f'backend {backend} (native transforms run on CPU)'
  if jax.device_count() != 1:  # XLA cannot split a custom call across devices
    return f'{jax.device_count()} devices (native transforms run on one)'
  from jaxres.cpu import native as native_lib
  return native_lib.unavailable_reason()


def transforms_in_use(impl: str, winograd_tile: int = 4, dtype=jnp.float32,
                      winograd_transforms: str = 'xla') -> str:
  """Whose Winograd transforms conv_general_dilated(impl, ...) runs: 'native', 'xla', or
  'n/a' where `impl` resolves to XLA's convolution. Raises ValueError as resolve() and
  resolve_transforms() do."""
  if resolve(impl, dtype=dtype) != 'winograd':
    return 'n/a'
  return 'native' if resolve_transforms(winograd_transforms, winograd_tile, dtype) else 'xla'


def conv_general_dilated(impl: str, winograd_tile: int = 4, dtype=jnp.float32,
                         winograd_transforms: str = 'xla', max_pool: bool = False):
  """A drop-in for lax.conv_general_dilated (flax.linen.Conv's `conv_general_dilated`).

  impl 'xla' is lax.conv_general_dilated itself; 'winograd' routes 3x3 stride-1
  padding-1 convolutions to winograd_conv3x3 (tile m = winograd_tile), unpadded 1x1
  ones to strided_conv1x1, strided or small-patch ones to im2col_conv, and any other
  convolution to lax.conv_general_dilated. 'auto' is resolved here, for the
  current default backend and the model's compute `dtype` (resolve()); so is
  `winograd_transforms`, the Winograd transforms' implementation (resolve_transforms()).
  `max_pool`: the convolution followed by 2x2 max pooling (layers.max_pool), fused
  into the output transform where the convolution is Winograd on native transforms
  (winograd_conv3x3_max_pool).
  """
  transforms(winograd_tile)  # validates the tile size early
  in_use = transforms_in_use(impl, winograd_tile, dtype, winograd_transforms)
  native = in_use == 'native'

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, batch_group_count=1,
           precision=None, preferred_element_type=None):
    formulation = None if in_use == 'n/a' else _formulation(
        rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, preferred_element_type, winograd_tile, native,
        max_pool)
    if formulation is not None:
      return formulation(lhs, rhs, precision=precision)
    y = lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
    return layers.max_pool(y, 2) if max_pool else y

  if in_use == 'n/a' and not max_pool:
    return lax.conv_general_dilated
  return conv
