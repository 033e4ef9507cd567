"""The seed's "ModifiedResNet" (a half-width ResNet-18) as a Flax Linen module.

Module names follow the PyTorch reference (conv1, bn1, layer1_0, ..., linear) so the
parameter tree reads like the seed's state_dict and converts to it key by key.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxres import conv as conv_lib
from jaxres import input_pipeline, layers

PADDING_3X3 = ((1, 1), (1, 1))  # PyTorch's padding=1; 'SAME' differs for stride 2.


class BasicBlock(nn.Module):
  """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus shortcut, add, ReLU."""

  features: int
  strides: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.features, (3, 3), self.strides, padding=PADDING_3X3, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), 1, padding=PADDING_3X3, name='conv2')(y)
    y = self.norm(name='bn2')(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = self.conv(self.features, (1, 1), self.strides, padding='VALID', name='shortcut_conv')(x)
      x = self.norm(name='shortcut_bn')(x)
    return nn.relu(y + x)


def _conv_general_dilated(module: nn.Module, max_pool: bool = False):
  """The convolution a model's conv_impl, winograd_tile, dtype, winograd_transforms pick
  (followed by 2x2 max pooling with `max_pool`: conv_lib.conv_general_dilated)."""
  return conv_lib.conv_general_dilated(module.conv_impl, module.winograd_tile, module.dtype,
                                       module.winograd_transforms, max_pool)


class ResNet(nn.Module):
  """CIFAR ResNet of BasicBlocks: stem conv, len(widths) stages, global pool, linear.

  The first block of stage i has stride 1 for i == 0 and 2 after, as in the seed.
  """

  widths: Sequence[int] = (32, 64, 128, 256)
  blocks: Sequence[int] = (2, 2, 2, 2)
  num_classes: int = 10
  bn_momentum: float = 0.1
  bn_epsilon: float = 1e-5
  bn_groups: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = 'xla'  # 'xla', 'winograd' or 'auto' (jaxres.conv.resolve)
  winograd_tile: int = 4  # m of Winograd F(m x m, 3 x 3): 4 (fewer multiplies) or 2
  winograd_transforms: str = 'xla'  # 'xla', 'native' or 'auto' (conv.resolve_transforms)

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=layers.torch_kernel_init,
                             conv_general_dilated=_conv_general_dilated(self))
    norm = functools.partial(layers.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             num_groups=self.bn_groups if train else 1, dtype=self.dtype)
    x = x.astype(self.dtype)
    x = conv(self.widths[0], (3, 3), 1, padding=PADDING_3X3, name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x))
    for stage, (features, num_blocks) in enumerate(zip(self.widths, self.blocks)):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, strides, conv, norm, name=f'layer{stage + 1}_{block}')(x)
    # The seed's avg_pool2d(4) over the final 4x4 map of a 32x32 input is a global mean.
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=layers.torch_kernel_init,
                 bias_init=layers.torch_bias_init(x.shape[-1]), name='linear')(x)
    return x.astype(jnp.float32)


def dirac_kernel_init(base_init=layers.torch_kernel_init):
  """`base_init`, then the identity for the first in_channels output channels (HWIO).

  An implicit residual at initialization, as in the airbench speed runs' convolutions.
  """

  def init(key, shape, dtype=jnp.float32):
    kernel = base_init(key, shape, dtype)
    h, w, cin, cout = shape
    eye = jnp.zeros((h, w, cin, min(cin, cout)), dtype).at[h // 2, w // 2].set(
        jnp.eye(cin, min(cin, cout), dtype=dtype))
    return kernel.at[..., :min(cin, cout)].set(eye)

  return init


class ConvGroup(nn.Module):
  """conv3x3 -> maxpool 2 -> BN -> act -> conv3x3 -> BN (+ residual) -> act.

  `conv_pool`, where given, is a convolution module that max-pools its output 2x2
  itself (a conv_general_dilated with max_pool=True): it replaces conv1 and the pool.
  """

  features: int
  conv: Any
  norm: Any
  act: Any
  residual: bool = True
  conv_pool: Any = None

  @nn.compact
  def __call__(self, x):
    if self.conv_pool is not None:
      x = self.conv_pool(self.features, (3, 3), padding=PADDING_3X3, name='conv1')(x)
    else:
      x = self.conv(self.features, (3, 3), padding=PADDING_3X3, name='conv1')(x)
      x = layers.max_pool(x, 2)
    x = self.act(self.norm(name='norm1')(x))
    y = self.conv(self.features, (3, 3), padding=PADDING_3X3, name='conv2')(x)
    y = self.norm(name='norm2')(y)
    return self.act(y + x if self.residual else y)


class WhitenedResNet(nn.Module):
  """A small wide residual net for fast CIFAR-10 training (experiments/fast.py).

  A frozen 2x2 patch-whitening convolution (its kernel computed from the training
  images by `whitening_kernel`; only its bias trains), then one ConvGroup per width, each
  halving the resolution, a global max pool and a bias-free linear layer scaled by
  `logit_scale`. BatchNorm has no scale parameter. This is the airbench94 network with a
  residual connection around each group's second convolution.
  """

  widths: Sequence[int] = (64, 256, 256)
  whiten_kernel: int = 2
  num_classes: int = 10
  bn_momentum: float = 0.4
  bn_epsilon: float = 1e-12
  bn_groups: int = 1
  logit_scale: float = 1 / 9
  residual: bool = True
  dtype: Any = jnp.float32
  conv_impl: str = 'xla'  # as ResNet.conv_impl
  winograd_tile: int = 4
  winograd_transforms: str = 'xla'

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=dirac_kernel_init(),
                             conv_general_dilated=_conv_general_dilated(self))
    conv_pool = functools.partial(conv, conv_general_dilated=_conv_general_dilated(self, True))
    norm = functools.partial(layers.BatchNorm, use_running_average=not train, use_scale=False,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             num_groups=self.bn_groups if train else 1, dtype=self.dtype)
    act = functools.partial(nn.gelu, approximate=True)
    x = x.astype(self.dtype)
    k = self.whiten_kernel
    x = nn.Conv(whitening_width(k), (k, k), padding='VALID', use_bias=True, dtype=self.dtype,
                conv_general_dilated=_conv_general_dilated(self), name='whiten')(x)
    x = act(x)
    for i, features in enumerate(self.widths):
      x = ConvGroup(features, conv, norm, act, self.residual, conv_pool,
                    name=f'group{i + 1}')(x)
    x = jnp.max(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype,
                 kernel_init=layers.torch_kernel_init, name='linear')(x)
    return (x * self.logit_scale).astype(jnp.float32)


def whitening_width(kernel_size: int) -> int:
  """Channels of the whitening layer: +/- each eigenvector of the 3 k k patch space."""
  return 2 * 3 * kernel_size * kernel_size


def whitening_kernel(images: np.ndarray, kernel_size: int = 2, eps: float = 5e-4) -> np.ndarray:
  """A k x k convolution kernel (HWIO) that whitens the patches of normalized NHWC images.

  Each eigenvector v of the patch covariance, scaled by 1/sqrt(eigenvalue + eps), is one
  filter, with -v beside it, largest eigenvalue first: the filters' responses are
  uncorrelated with unit variance over the training patches.
  """
  n, h, w, c = images.shape
  k = kernel_size
  patches = np.stack([images[:, i:h - k + 1 + i, j:w - k + 1 + j, :]
                      for i in range(k) for j in range(k)], axis=3)  # n, h', w', k*k, c
  flat = patches.reshape(-1, k * k * c).astype(np.float64)
  covariance = flat.T @ flat / len(flat)
  eigenvalues, eigenvectors = np.linalg.eigh(covariance)
  order = np.argsort(eigenvalues)[::-1]
  scaled = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + eps)
  kernel = scaled.reshape(k, k, c, k * k * c)
  return np.concatenate([kernel, -kernel], axis=-1).astype(np.float32)


def create_model(config: ml_collections.ConfigDict, num_devices: int = 1) -> nn.Module:
  """The model a config describes. `num_devices` matters for per-device BatchNorm only."""
  m = config.model
  groups = 1 if m.sync_batch_stats else num_devices
  if m.name == 'whitened_resnet':
    return WhitenedResNet(
        widths=tuple(m.widths), whiten_kernel=m.whiten_kernel, num_classes=m.num_classes,
        bn_momentum=m.bn_momentum, bn_epsilon=m.bn_epsilon, bn_groups=groups,
        logit_scale=m.logit_scale, residual=m.residual, dtype=jnp.dtype(config.dtype),
        conv_impl=m.conv_impl, winograd_tile=m.winograd_tile,
        winograd_transforms=m.winograd_transforms)
  if m.name != 'resnet':
    raise ValueError(f'unknown model.name {m.name!r}')
  return ResNet(
      widths=tuple(m.widths), blocks=tuple(m.blocks), num_classes=m.num_classes,
      bn_momentum=m.bn_momentum, bn_epsilon=m.bn_epsilon,
      bn_groups=groups,
      dtype=jnp.dtype(config.dtype),
      conv_impl=m.conv_impl, winograd_tile=m.winograd_tile,
      winograd_transforms=m.winograd_transforms)


def data_init(config: ml_collections.ConfigDict, train_split) -> dict:
  """Parameters computed from the training images, overriding the random init.

  Empty for models without such layers; train_state.create merges the result.
  """
  if config.model.name == 'resnet':
    return {}
  if config.model.name == 'whitened_resnet':
    m, d = config.model, config.data
    images = input_pipeline.normalize(train_split.images[:m.whiten_images], d.mean, d.std)
    return {'whiten': {'kernel': whitening_kernel(images, m.whiten_kernel, m.whiten_eps)}}
  raise ValueError(f'unknown model.name {config.model.name!r}')
