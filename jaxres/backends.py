"""Platform backends: optional packages that plug one platform's speed-ups into a run.

The core runs everywhere on XLA's own operations. A backend package adds what pays on
one platform only -- today `jaxres.cpu`: convolutions as matmuls, compiled Winograd
transforms, the huge-page allocator -- and jaxres runs without it where it is not
installed (XLA's convolutions). This module is the one place outside a backend that
imports it: lazily, and only for a run whose platform is the backend's. Everything else
(runtime, models, the commands and tools) asks here, but the backend's own tool
(tools/bench_transforms.py).

A backend package (BACKENDS: platform -> package) provides, in its __init__:

  PLATFORM                  the platform it serves ('cpu')
  validate(config)          UsageError for its own config fields (the config alone)
  prepare_process(config)   a command's first step, before jax.distributed.initialize
                            and before any JAX backend starts (it may restart the process)
  check(config)             UsageError for what cannot work on this machine and devices
  conv_defs(config, dtype)  {'conv': ..., 'conv_pool': ...}: convolution module defs,
                            called like flax.linen.Conv, for models.create_model (a key
                            left out keeps the model's own)
  resolved(config)          what its automatic settings resolve to, as flat fields for
                            measurement records (tools.bench): NO_BACKEND's keys
  describe(config)          its part of the start line ('convolutions ...; ...')
"""

import importlib
from types import ModuleType
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

BACKENDS = {'cpu': 'jaxres.cpu'}
# resolved() where no backend is plugged in: XLA's convolutions, the system's allocator.
NO_BACKEND = {'conv_impl': 'xla', 'winograd_transforms': 'n/a', 'host_allocator': 'system'}


def load(platform: str) -> Optional[ModuleType]:
  """The backend package for `platform`, imported on first use; None where there is
  none (no backend for the platform, or its package is not installed)."""
  name = BACKENDS.get(platform)
  if name is None:
    return None
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as e:
    if e.name != name:  # the package is there but something it needs is not: say so
      raise
    return None


def _plugged(platform: Optional[str]) -> Optional[ModuleType]:
  """The backend of `platform`, by default the platform of this process's devices (that
  default starts JAX's backend)."""
  return load(platform or jax.default_backend())


def prepare_process(config: ml_collections.ConfigDict, platform: str) -> None:
  """The backend's validation and process preparation, for a command's first lines.

  `platform` is the run's expected platform (runtime.expected_platform): nothing here
  starts a JAX backend, so it may come before jax.distributed.initialize.
  """
  backend = load(platform)
  if backend is not None:
    backend.validate(config)
    backend.prepare_process(config)  # may restart this command, once


def check(config: ml_collections.ConfigDict, platform: Optional[str] = None) -> None:
  """UsageError for the backend's fields: invalid, or asking what cannot run here."""
  backend = _plugged(platform)
  if backend is not None:
    backend.validate(config)
    backend.check(config)


def conv_defs(config: ml_collections.ConfigDict, platform: Optional[str] = None) -> dict:
  """The convolution module defs a model of `config` runs on: the backend's, or {} (the
  model's defaults, flax.linen.Conv: XLA's convolution)."""
  backend = _plugged(platform)
  if backend is None:
    return {}
  return backend.conv_defs(config, jnp.dtype(config.dtype))


def resolved(config: ml_collections.ConfigDict, platform: Optional[str] = None) -> dict:
  """What the backend's automatic settings resolve to (NO_BACKEND's keys)."""
  backend = _plugged(platform)
  return dict(NO_BACKEND) if backend is None else backend.resolved(config)


def describe(config: ml_collections.ConfigDict, platform: Optional[str] = None) -> str:
  """The backend's part of the start line; without one, NO_BACKEND's: 'convolutions xla;
  host allocator system'."""
  backend = _plugged(platform)
  if backend is None:
    return f'convolutions xla; host allocator {NO_BACKEND["host_allocator"]}'
  return backend.describe(config)
