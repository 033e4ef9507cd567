"""The models a config can name (MODELS), as Flax Linen modules.

`resnet` is the seed's "ModifiedResNet" (a half-width ResNet-18), `whitened_resnet` the
fast recipe's network (experiments/fast.py). Module names follow the PyTorch reference
(conv1, bn1, layer1_0, ..., linear) so the parameter tree reads like the seed's
state_dict and converts to it key by key.

Models hold their architecture only. Their convolution is a module definition called
like flax.linen.Conv (`conv: ModuleDef = nn.Conv`, as in Flax's examples/imagenet):
`create_model` passes the ones the platform's backend provides (jaxres.backends: on the
CPU, jaxres.cpu's Winograd convolutions), and flax.linen.Conv stays where there is none.
The parameter tree is the same on every convolution.

Registering a model. MODELS maps config.model.name to a ModelEntry; the `register`
decorator adds a builder, from this module or any other:

    import flax.linen as nn
    from jaxres import models

    @models.register('tiny')
    def tiny(config, conv_defs, num_devices):
      return Tiny(width=config.model.widths[0], conv=conv_defs.get('conv', nn.Conv))

`conv_defs` is the backend's {'conv': ..., 'conv_pool': ...} ({} without a backend);
`num_devices` matters for per-device BatchNorm. A model with layers computed from the
training images registers `data_init(config, images) -> parameter overrides` with it and
`data_images(config)`, how many (the first) training images it reads, as
whitened_resnet does below. The config file imports the module that registers (its
import runs once per process), and `config.model.name = 'tiny'` picks it:
`python -m jaxres.train --config my_config.py`. A builder registered with
`MODELS.register(name)` directly is a model without data init.
"""

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxres import backends, layers
from jaxres.registry import Registry

ModuleDef = Any
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
  conv: ModuleDef = nn.Conv  # called like nn.Conv (the platform's: create_model)

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
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
  itself (jaxres.cpu's conv_pool, for one): it replaces conv1 and the pool.
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

  `conv` is called like nn.Conv; `conv_pool`, where given, like nn.Conv too, but it
  max-pools its output 2x2 itself (the backend's fused convolution and pooling); None is
  `conv` followed by layers.max_pool.
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
  conv: ModuleDef = nn.Conv
  conv_pool: Optional[ModuleDef] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    options = dict(use_bias=False, dtype=self.dtype, kernel_init=dirac_kernel_init())
    conv = functools.partial(self.conv, **options)
    conv_pool = None if self.conv_pool is None else functools.partial(self.conv_pool, **options)
    norm = functools.partial(layers.BatchNorm, use_running_average=not train, use_scale=False,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             num_groups=self.bn_groups if train else 1, dtype=self.dtype)
    act = functools.partial(nn.gelu, approximate=True)
    x = x.astype(self.dtype)
    k = self.whiten_kernel
    x = self.conv(whitening_width(k), (k, k), padding='VALID', use_bias=True, dtype=self.dtype,
                  name='whiten')(x)
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


# ---------------------------------------------------------------------------- registry

class ModelEntry(NamedTuple):
  """What MODELS holds for one config.model.name."""

  build: Callable  # (config, conv_defs, num_devices) -> nn.Module
  data_init: Optional[Callable] = None  # (config, images) -> parameter overrides
  data_images: Optional[Callable] = None  # config -> how many training images data_init reads


MODELS = Registry('model', 'config.model.name')


def register(name: str, data_init: Optional[Callable] = None,
             data_images: Optional[Callable] = None, *, replace: bool = False):
  """A decorator that registers `build(config, conv_defs, num_devices) -> nn.Module` as
  model `name` (a ModelEntry with `data_init` and `data_images`, if any; `replace`: as
  Registry.register's)."""

  def add(build):
    MODELS.register(name, ModelEntry(build, data_init, data_images), replace=replace)
    return build

  return add


def _entry(config: ml_collections.ConfigDict) -> ModelEntry:
  """config.model.name's entry (UsageError naming the choices if there is none)."""
  entry = MODELS.get(config.model.name)
  return entry if isinstance(entry, ModelEntry) else ModelEntry(entry)


def create_model(config: ml_collections.ConfigDict, num_devices: int = 1) -> nn.Module:
  """The model a config describes, on the platform backend's convolutions.

  `num_devices` matters for per-device BatchNorm only.
  """
  return _entry(config).build(config, backends.conv_defs(config), num_devices)


def data_images(config: ml_collections.ConfigDict) -> int:
  """How many training images, the first ones, `data_init` reads (0: none)."""
  entry = _entry(config)
  return 0 if entry.data_images is None else int(entry.data_images(config))


def data_init(config: ml_collections.ConfigDict, images: np.ndarray) -> dict:
  """Parameters computed from the training images, overriding the random init.

  `images`: the first `data_images(config)` training images, normalized
  (input_pipeline.normalize with config.data's mean and std). Empty for models without
  such layers; train_state.create merges the result.
  """
  entry = _entry(config)
  return {} if entry.data_init is None else entry.data_init(config, images)


def _bn_groups(config: ml_collections.ConfigDict, num_devices: int) -> int:
  return 1 if config.model.sync_batch_stats else num_devices


@register('resnet')
def _resnet(config: ml_collections.ConfigDict, conv_defs: dict, num_devices: int) -> ResNet:
  m = config.model
  return ResNet(
      widths=tuple(m.widths), blocks=tuple(m.blocks), num_classes=m.num_classes,
      bn_momentum=m.bn_momentum, bn_epsilon=m.bn_epsilon,
      bn_groups=_bn_groups(config, num_devices), dtype=jnp.dtype(config.dtype),
      conv=conv_defs.get('conv', nn.Conv))


def _whitening_init(config: ml_collections.ConfigDict, images: np.ndarray) -> dict:
  """The whitening layer's kernel from the first model.whiten_images images."""
  m = config.model
  return {'whiten': {'kernel': whitening_kernel(images[:m.whiten_images], m.whiten_kernel,
                                                m.whiten_eps)}}


@register('whitened_resnet', data_init=_whitening_init,
          data_images=lambda config: config.model.whiten_images)
def _whitened_resnet(config: ml_collections.ConfigDict, conv_defs: dict,
                     num_devices: int) -> WhitenedResNet:
  m = config.model
  return WhitenedResNet(
      widths=tuple(m.widths), whiten_kernel=m.whiten_kernel, num_classes=m.num_classes,
      bn_momentum=m.bn_momentum, bn_epsilon=m.bn_epsilon,
      bn_groups=_bn_groups(config, num_devices), logit_scale=m.logit_scale,
      residual=m.residual, dtype=jnp.dtype(config.dtype),
      conv=conv_defs.get('conv', nn.Conv), conv_pool=conv_defs.get('conv_pool'))
