"""The seed's "ModifiedResNet" (a half-width ResNet-18) as a Flax Linen module.

Module names follow the PyTorch reference (conv1, bn1, layer1_0, ..., linear) so the
parameter tree reads like the seed's state_dict and converts to it key by key.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from jaxres import layers

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

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=layers.torch_kernel_init)
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


def create_model(config: ml_collections.ConfigDict, num_devices: int = 1) -> nn.Module:
  """The model a config describes. `num_devices` matters for per-device BatchNorm only."""
  m = config.model
  if m.name != 'resnet':
    raise ValueError(f'unknown model.name {m.name!r}')
  return ResNet(
      widths=tuple(m.widths), blocks=tuple(m.blocks), num_classes=m.num_classes,
      bn_momentum=m.bn_momentum, bn_epsilon=m.bn_epsilon,
      bn_groups=1 if m.sync_batch_stats else num_devices,
      dtype=jnp.dtype(config.dtype))


def data_init(config: ml_collections.ConfigDict, train_split) -> dict:
  """Parameters computed from the training images, overriding the random init.

  Empty for models without such layers; train_state.create merges the result.
  """
  del train_split
  if config.model.name == 'resnet':
    return {}
  raise ValueError(f'unknown model.name {config.model.name!r}')
