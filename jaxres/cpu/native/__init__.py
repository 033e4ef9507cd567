"""Native Winograd transforms for XLA:CPU: winograd.cc, built on first use, called by XLA FFI.

jaxres.cpu.conv computes every 3x3 convolution on CPU as Winograd F(4x4, 3x3): matmuls
between four data transforms (input, output and their adjoints). XLA's fusions of those
transforms are memory-bound passes, slower than a plain loop over each tile
(BENCHMARKS.md, native Winograd transforms); winograd.cc is that loop (one pass per
tile over blocks of channels, on every core, results written with non-temporal stores).
It also has the output transform followed by 2x2 max pooling, and that pair's adjoint
(output_transform_pool*), for jaxres.cpu.conv.winograd_conv3x3_max_pool.
`python -m tools.profile_step` shows what they cost in a train step.

The shared library is compiled from winograd.cc with the system's C++ compiler ($CXX,
else c++) the first time a process needs it, into a cache directory
($XDG_CACHE_HOME/jaxres, else ~/.cache/jaxres), named by a hash of everything that
goes into it (source, compiler, flags, jax's version and FFI header directory, the CPU's
features), so a build is reused by later processes and never by a machine it was not
built for. Where it cannot be built (no compiler, neither Linux nor macOS, ...),
`available()` is False with the reason in `unavailable_reason()`, and jaxres.cpu.conv keeps
XLA's transforms.

Only float32, F(4x4, 3x3), NHWC, the layouts of jaxres/cpu/conv.py.
"""

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Optional

import jax
import numpy as np

SOURCE = os.path.join(os.path.dirname(__file__), 'winograd.cc')
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w', '-pthread')
TARGETS = {  # jax.ffi target name: symbol in winograd.cc
    'jaxres_winograd_input': 'JaxresInputTransform',
    'jaxres_winograd_input_adjoint': 'JaxresInputTransformAdjoint',
    'jaxres_winograd_output': 'JaxresOutputTransform',
    'jaxres_winograd_output_adjoint': 'JaxresOutputTransformAdjoint',
    'jaxres_winograd_output_pool': 'JaxresOutputPoolTransform',
    'jaxres_winograd_output_pool_adjoint': 'JaxresOutputPoolTransformAdjoint',
}
ALPHA2 = 36  # Winograd coordinates of F(4x4, 3x3)
TILE = 4

_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> str:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'jaxres')


def _cpu_features() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next((line for line in f if line.startswith(('flags', 'Features'))), '')
  except OSError:
    return platform.processor()


def _compiler() -> Optional[str]:
  return shutil.which(os.environ.get('CXX', 'c++'))


def library_path(compiler: str) -> str:
  """Where the build for this source, compiler, flags, jaxlib and CPU lives."""
  h = hashlib.sha256()
  with open(SOURCE, 'rb') as f:
    h.update(f.read())
  for part in (compiler, ' '.join(FLAGS), jax.ffi.include_dir(), jax.__version__,
               platform.machine(), _cpu_features()):
    h.update(part.encode() + b'\0')
  return os.path.join(cache_dir(), f'winograd-{h.hexdigest()[:16]}.so')


def _build(compiler: str, path: str) -> None:
  """Compile winograd.cc to `path` (atomically: concurrent builders are harmless)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(path))
  os.close(fd)
  try:
    cmd = [compiler, *FLAGS, '-I', jax.ffi.include_dir(), SOURCE, '-o', tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f'{" ".join(cmd)} failed:\n{result.stderr[-2000:]}')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _load() -> Optional[str]:
  """Build (if needed), load and register the transforms; None, or why they are unavailable."""
  import ctypes
  if platform.system() not in ('Linux', 'Darwin'):
    return f'native transforms are not built on {platform.system()}'
  compiler = _compiler()
  if compiler is None:
    return f'no C++ compiler ({os.environ.get("CXX", "c++")}) on PATH'
  path = library_path(compiler)
  try:
    if not os.path.exists(path):
      _build(compiler, path)
    lib = ctypes.cdll.LoadLibrary(path)
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform='cpu')
  except (OSError, RuntimeError, AttributeError) as e:
    return f'native transforms unavailable: {e}'
  return None


def unavailable_reason() -> Optional[str]:
  """None when the native transforms are ready (building them on the first call)."""
  with _lock:
    if 'reason' not in _state:
      _state['reason'] = _load()
    return _state['reason']


def available() -> bool:
  return unavailable_reason() is None


@functools.cache
def _threads() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _call(target: str, x: jax.Array, shape, *args, **attrs):
  """The custom call `target` on float32 `x` (and `args`): a result of `shape`, or
  results of the shapes and dtypes `shape` lists."""
  reason = unavailable_reason()
  if reason is not None:
    raise RuntimeError(reason)
  if x.dtype != np.float32:
    raise TypeError(f'native Winograd transforms take float32, not {x.dtype}')
  results = (jax.ShapeDtypeStruct(tuple(shape), x.dtype) if not isinstance(shape, list)
             else [jax.ShapeDtypeStruct(tuple(s), d) for s, d in shape])
  attrs = {name: np.int64(value) for name, value in attrs.items()}
  return jax.ffi.ffi_call(target, results)(x, *args, threads=np.int64(_threads()), **attrs)


def _tiles(n: int, h: int, w: int) -> int:
  return n * -(-h // TILE) * -(-w // TILE)


def input_transform(x: jax.Array) -> jax.Array:
  """jaxres.cpu.conv.input_transform(x, 4): (N, H, W, C) -> (36, N T S, C)."""
  n, h, w, c = x.shape
  return _call('jaxres_winograd_input', x, (ALPHA2, _tiles(n, h, w), c))


def input_transform_adjoint(v: jax.Array, shape) -> jax.Array:
  """jaxres.cpu.conv.input_transform_adjoint(v, shape, 4): (36, N T S, C) -> shape (N, H, W, C)."""
  return _call('jaxres_winograd_input_adjoint', v, shape)


def output_transform(m: jax.Array, shape) -> jax.Array:
  """jaxres.cpu.conv.output_transform(m, (N, H, W), 4): (36, N T S, K) -> (N, H, W, K)."""
  return _call('jaxres_winograd_output', m, tuple(shape) + (m.shape[-1],))


def output_transform_adjoint(dy: jax.Array) -> jax.Array:
  """jaxres.cpu.conv.output_transform_adjoint(dy, 4): (N, H, W, K) -> (36, N T S, K)."""
  n, h, w, k = dy.shape
  return _call('jaxres_winograd_output_adjoint', dy, (ALPHA2, _tiles(n, h, w), k))


def output_transform_pool(m: jax.Array, shape) -> tuple[jax.Array, jax.Array]:
  """jaxres.layers.max_pool(output_transform(m, (N, H, W)), 2) in one pass over the tiles,
  and which pixels of each 2x2 window equal its maximum (uint8 bits 1, 2, 4, 8 for
  pixels (0, 0), (0, 1), (1, 0), (1, 1)): (36, N T S, K) -> (N, H / 2, W / 2, K) twice.
  """
  n, h, w = shape
  pooled = (n, h // 2, w // 2, m.shape[-1])
  return tuple(_call('jaxres_winograd_output_pool', m, [(pooled, np.float32), (pooled, np.uint8)],
                     h=h, w=w))


def output_transform_pool_adjoint(dy: jax.Array, mask: jax.Array, size) -> jax.Array:
  """The gradient of output_transform_pool's pooled output with respect to `m`: each
  pooled gradient goes to every pixel `mask` marks (as jaxres.layers.max_pool's
  gradient), then output_transform_adjoint. dy, mask (N, H / 2, W / 2, K) -> (36, N T S, K)
  for the convolution's output size (H, W).
  """
  h, w = size
  n, k = dy.shape[0], dy.shape[-1]
  return _call('jaxres_winograd_output_pool_adjoint', dy, (ALPHA2, _tiles(n, h, w), k), mask,
               h=h, w=w)
