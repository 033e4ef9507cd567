"""The CPU backend: what makes XLA's CPU backend fast, plugged into a run by jaxres.backends.

Everything here pays on the CPU only, and jaxres runs without it (XLA's convolutions):
jaxres.backends imports this package only for a run on the CPU, and only this module.
Its parts:

- conv.py: convolutions as matmuls (Winograd F(m x m, 3 x 3), im2col, strided 1x1),
  drop-ins for flax.linen.Conv's `conv_general_dilated`;
- native/: the Winograd transforms as compiled loops (winograd.cc, built on first use);
- host_allocator.py: glibc's transparent huge pages for the step's host buffers (the
  command restarts itself once).

Its config fields keep the names old run directories store: config.model.conv_impl,
config.model.winograd_tile, config.model.winograd_transforms and config.host_allocator.
The functions below are the interface jaxres.backends describes.
"""

import functools

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from jaxres.cpu import conv, host_allocator
from jaxres.errors import UsageError

PLATFORM = 'cpu'


def _require(ok: bool, message: str):
  if not ok:
    raise UsageError(message)


def validate(config: ml_collections.ConfigDict) -> None:
  """UsageError naming the first of this backend's fields whose value cannot work."""
  m = config.model
  _require(m.conv_impl in conv.IMPLS, f'config.model.conv_impl must be one of '
           f'{", ".join(conv.IMPLS)}, got {m.conv_impl!r}')
  _require(m.winograd_tile in conv.TILE_SIZES, f'config.model.winograd_tile must be one of '
           f'{", ".join(map(str, conv.TILE_SIZES))}, got {m.winograd_tile!r}')
  _require(m.winograd_transforms in conv.TRANSFORMS, f'config.model.winograd_transforms must be '
           f'one of {", ".join(conv.TRANSFORMS)}, got {m.winograd_transforms!r}')
  _require(config.host_allocator in host_allocator.POLICIES,
           f'config.host_allocator must be one of {", ".join(host_allocator.POLICIES)}, '
           f'got {config.host_allocator!r}')


def prepare_process(config: ml_collections.ConfigDict) -> None:
  """Serve this process with config.host_allocator's policy: may restart the command,
  once (host_allocator.apply). Starts no JAX backend."""
  host_allocator.apply(config.host_allocator)


def _conv_general_dilated(config: ml_collections.ConfigDict, dtype, max_pool: bool = False):
  """conv.conv_general_dilated for config.model's fields and compute `dtype`; UsageError
  where native transforms are asked for and cannot run (no compiler, several devices)."""
  m = config.model
  try:
    return conv.conv_general_dilated(m.conv_impl, m.winograd_tile, dtype,
                                     m.winograd_transforms, max_pool)
  except ValueError as e:
    raise UsageError(f'config.model.{e}') from None


def check(config: ml_collections.ConfigDict) -> None:
  """UsageError for what cannot work on this machine and device count."""
  _conv_general_dilated(config, jnp.dtype(config.dtype))


def conv_defs(config: ml_collections.ConfigDict, dtype) -> dict:
  """flax.linen.Conv on the convolutions config.model picks for compute `dtype`: 'conv',
  and 'conv_pool', which max-pools its output 2x2 itself (in the Winograd output
  transform on native transforms; conv.conv_general_dilated's max_pool)."""
  validate(config)
  return {'conv': functools.partial(nn.Conv,
                                    conv_general_dilated=_conv_general_dilated(config, dtype)),
          'conv_pool': functools.partial(
              nn.Conv, conv_general_dilated=_conv_general_dilated(config, dtype, True))}


def resolved(config: ml_collections.ConfigDict) -> dict:
  """What the automatic settings resolve to here: conv_impl 'xla' or 'winograd',
  winograd_transforms 'native', 'xla' or 'n/a' (no Winograd), host_allocator
  'hugepages' or 'system' (the policy serving this process)."""
  m = config.model
  dtype = jnp.dtype(config.dtype)
  return {'conv_impl': conv.resolve(m.conv_impl, dtype=dtype),
          'winograd_transforms': conv.transforms_in_use(m.conv_impl, m.winograd_tile, dtype,
                                                        m.winograd_transforms),
          'host_allocator': host_allocator.in_use()}


def describe(config: ml_collections.ConfigDict) -> str:
  """This backend's part of the start line: convolutions and host allocator."""
  r = resolved(config)
  convolutions = r['conv_impl']
  if convolutions == 'winograd':
    tile = config.model.winograd_tile
    convolutions += f' F({tile}x{tile},3x3), {r["winograd_transforms"]} transforms'
  return f'convolutions {convolutions}; host allocator {r["host_allocator"]}'
