"""What a command runs on: the start-up order, the platform, and JAX's process-wide options.

Every command that runs a config starts with `start(config, ...)`, in this order:

1. `config_lib.validate(config)`: the config alone, no JAX backend touched;
2. the platform backend's validation and process preparation (jaxres.backends; on the
   CPU, jaxres.cpu's huge-page allocator, which may restart the process), for the
   platform `expected_platform()` decides from JAX's settings and the installed plugins,
   without starting a backend;
3. `jax.distributed.initialize` for a multi-host run (parallel.initialize_distributed),
   which must come before anything that starts a backend;
4. `configure(config)`: matmul precision and the persistent compilation cache;
5. `check(config)`: the checks that need the platform or the device count (the platform
   backend's, such as native Winograd transforms asked for where they cannot run; the
   data feed).

Automatic settings are resolved here, from the platform, and never written back into
the config: a run's config.json keeps 'auto' and resolves again where it is resumed.
`describe(config)` names what is in use, for the trainer's start line.
"""

import importlib.metadata
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from jaxres import augment, backends, config_lib, parallel
from jaxres.errors import UsageError

_ACCELERATOR_PLUGINS = {'cuda': 'gpu', 'rocm': 'gpu', 'tpu': 'tpu'}
_DEVICE_NODES = {'gpu': ('/dev/nvidiactl', '/dev/kfd'), 'tpu': ('/dev/accel0', '/dev/vfio')}


def _platform_name(name: str) -> str:
  name = name.strip().lower()
  return {'cuda': 'gpu', 'rocm': 'gpu'}.get(name, name)


def _installed_accelerator_plugins() -> set:
  """Platforms ('gpu', 'tpu') whose JAX plugin is installed (package metadata only)."""
  found = set()
  for entry in importlib.metadata.entry_points(group='jax_plugins'):
    for key, platform in _ACCELERATOR_PLUGINS.items():
      if key in entry.name.lower():
        found.add(platform)
  for dist in importlib.metadata.distributions():
    name = (dist.metadata['Name'] or '').lower()
    if name.startswith(('jax-cuda', 'jax_cuda', 'jax-rocm', 'jax_rocm')):
      found.add('gpu')
    elif name == 'libtpu' or name.startswith('libtpu-'):
      found.add('tpu')
  return found


def expected_platform(platforms: Optional[str] = None) -> str:
  """The platform ('cpu', 'gpu', 'tpu') a run in this process will use, without starting
  a JAX backend: the first of `platforms` (default: jax.config's jax_platforms, which
  JAX_PLATFORMS sets) where given, else an installed accelerator plugin whose device is
  present, else 'cpu'."""
  if platforms is None:
    platforms = jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return _platform_name(platforms.split(',')[0])
  for platform in ('gpu', 'tpu'):
    if (platform in _installed_accelerator_plugins()
        and any(os.path.exists(p) for p in _DEVICE_NODES[platform])):
      return platform
  return 'cpu'


def platform() -> str:
  """The platform of this run's devices (starts the backend)."""
  return jax.default_backend()


def on_device(config: ml_collections.ConfigDict, platform_name: Optional[str] = None) -> bool:
  """Whether the training data lives on the devices (feeds.DeviceFeed).

  config.data.on_device None means automatic: on an accelerator, where the seed's
  augmentations run inside the step and a host loader would starve the device; on the
  CPU, the torchvision path, where the host pipeline shares the cores with the step.
  """
  value = config.data.on_device
  if value is None:
    return (platform_name or platform()) != 'cpu'
  return bool(value)


def _compilation_cache_dir(setting: str, environ=None) -> Optional[str]:
  """The persistent compilation cache's directory for config.compilation_cache, or None.

  'auto': $JAX_COMPILATION_CACHE_DIR where set (JAX reads it itself), else
  $XDG_CACHE_HOME/jaxres/xla (~/.cache/jaxres/xla); 'none' or '': no cache.
  """
  environ = os.environ if environ is None else environ
  if setting in ('', 'none'):
    return None
  if setting != 'auto':
    return os.path.expanduser(setting)
  if environ.get('JAX_COMPILATION_CACHE_DIR'):
    return environ['JAX_COMPILATION_CACHE_DIR']
  base = environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'jaxres', 'xla')


def configure(config: ml_collections.ConfigDict) -> None:
  """JAX's process-wide options that a config sets: matmul precision, compilation cache."""
  precision = config.get('matmul_precision', 'default')
  if precision != 'default':
    jax.config.update('jax_default_matmul_precision', precision)
  cache = _compilation_cache_dir(config.get('compilation_cache', 'auto'))
  if cache:
    try:
      os.makedirs(cache, exist_ok=True)
    except OSError:
      return  # an unwritable cache directory only costs compile time
    jax.config.update('jax_compilation_cache_dir', cache)


def check(config: ml_collections.ConfigDict) -> None:
  """UsageError for what cannot work on this platform and device count (after
  jax.distributed.initialize)."""
  backends.check(config, platform())
  policy = augment.POLICIES.get(config.data.augment)
  if policy.torchvision is None and not on_device(config):
    raise UsageError(f'config.data.augment={config.data.augment} runs on the device only: '
                     f'config.data.on_device resolves to False on {platform()}; set it to True')
  if config.data.alternating_flip and not on_device(config):
    raise UsageError('config.data.alternating_flip needs the data on the device: '
                     f'config.data.on_device resolves to False on {platform()}; set it to True')


def start(config: ml_collections.ConfigDict, coordinator_address: Optional[str] = None,
          num_processes: Optional[int] = None, process_id: Optional[int] = None) -> None:
  """A command's start-up, in the order the module docstring gives."""
  config_lib.validate(config)
  backends.prepare_process(config, expected_platform())  # may restart this command, once
  parallel.initialize_distributed(coordinator_address, num_processes, process_id)
  configure(config)
  check(config)


def describe(config: ml_collections.ConfigDict) -> str:
  """What the run uses, one line: dtype, matmul precision, the platform backend's part
  (convolutions, host allocator), data feed (a silent fallback shows here)."""
  dtype = jnp.dtype(config.dtype)
  precision = jax.config.jax_default_matmul_precision or 'default'
  if precision == 'default' and platform() == 'gpu':
    precision += ' (tensorfloat32 on NVIDIA)'
  if on_device(config):
    feed = f'on the device (augment {config.data.augment})'
  else:
    feed = f'torchvision (augment {config.data.augment}, {config.data.num_workers} workers)'
  return (f'{dtype.name}, matmul precision {precision}; {backends.describe(config, platform())}; '
          f'data {feed}')
