"""Layers with PyTorch's semantics: default initializers and BatchNorm.

The seed is a PyTorch model. PyTorch initializes conv and linear weights with
kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and linear
biases with U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Its BatchNorm updates the running
variance with the *unbiased* batch variance, and its momentum is the weight of the
new batch (Flax's momentum is the weight of the old value). The BatchNorm here
follows PyTorch, so converted checkpoints and training curves agree.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# kaiming_uniform(a=sqrt(5)): gain^2 = 2 / (1 + 5) = 1/3, bound = sqrt(3 * gain^2 / fan_in).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_bias_init(fan_in: int):
  """PyTorch's default bias init for a layer with `fan_in` inputs."""
  bound = 1.0 / (fan_in ** 0.5)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with PyTorch's update rule.

  Attributes:
    use_running_average: eval mode (running statistics) when True.
    momentum: PyTorch convention: running = (1 - momentum) * running + momentum * batch.
    epsilon: added to the variance.
    num_groups: split the batch axis into this many equal groups and normalize each
      with its own statistics (per-device statistics, like DDP without SyncBatchNorm:
      with the batch sharded over devices in order, group g is device g's shard).
      Running statistics take the mean over groups, so they are identical everywhere.
    dtype: dtype of the output; statistics are always computed in float32.
    use_scale: learn a scale (PyTorch's affine weight); False fixes it at 1.
  """

  use_running_average: bool = False
  momentum: float = 0.1
  epsilon: float = 1e-5
  num_groups: int = 1
  dtype: Optional[Any] = None
  use_scale: bool = True

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = (self.param('scale', nn.initializers.ones, (features,), jnp.float32)
             if self.use_scale else jnp.ones((features,), jnp.float32))
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    dtype = self.dtype or x.dtype

    if self.use_running_average:
      mul = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
      shift = bias - ra_mean.value * mul
      return (x * mul + shift).astype(dtype)

    groups = self.num_groups
    if x.shape[0] % groups:
      raise ValueError(f'batch of {x.shape[0]} does not split into {groups} BatchNorm groups')
    xg = x.reshape((groups, -1) + x.shape[1:])
    xf = xg.astype(jnp.float32)
    axes = tuple(range(1, xg.ndim - 1))
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
    if not self.is_initializing():
      n = x.size // (groups * features)
      m = self.momentum
      group_axes = (0,) + axes
      ra_mean.value = (1 - m) * ra_mean.value + m * jnp.mean(mean, axis=group_axes)
      ra_var.value = (1 - m) * ra_var.value + m * jnp.mean(var, axis=group_axes) * (n / max(n - 1, 1))
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    shift = bias - mean * mul
    return (xg * mul + shift).astype(dtype).reshape(x.shape)


def max_pool(x: jax.Array, size: int = 2) -> jax.Array:
  """Non-overlapping size x size max pooling of NHWC `x` (nn.max_pool(x, (size, size),
  (size, size)) with VALID padding: a remainder row or column is dropped).

  The maximum of the size^2 strided views of `x` (one elementwise pass), with a
  hand-written gradient that is one elementwise pass too: the output gradient goes to
  every input equal to its window's maximum. nn.max_pool's gradient is a
  select-and-scatter, and jnp.max's (through a reshape) a reduction that counts the
  ties; on XLA's CPU backend both are separate, slow passes over the activations.
  Ties inside a window (measure zero for the conv outputs this pools) each receive the
  full gradient, where nn.max_pool and PyTorch give it to one of them.
  """
  return _max_pool(x, size)


def _window_views(x: jax.Array, size: int) -> list:
  n, h, w, c = x.shape
  ho, wo = h // size, w // size
  return [jax.lax.slice(x, (0, i, j, 0), (n, i + size * (ho - 1) + 1, j + size * (wo - 1) + 1, c),
                        (1, size, size, 1)) for i in range(size) for j in range(size)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x, size):
  return functools.reduce(jnp.maximum, _window_views(x, size))


def _max_pool_fwd(x, size):
  y = _max_pool(x, size)
  return y, (x, y)


def _max_pool_bwd(size, res, g):
  x, y = res
  n, h, w, c = x.shape
  ho, wo = y.shape[1:3]

  def upsample(a):  # (n, ho, wo, c) -> (n, ho size, wo size, c), each value size x size times
    a = jnp.broadcast_to(a[:, :, None, :, None, :], (n, ho, size, wo, size, c))
    return a.reshape(n, ho * size, wo * size, c)

  core = x[:, :ho * size, :wo * size]
  dx = jnp.where(core == upsample(y), upsample(g), jnp.zeros((), g.dtype))
  return (jnp.pad(dx, ((0, 0), (0, h - ho * size), (0, w - wo * size), (0, 0))),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
