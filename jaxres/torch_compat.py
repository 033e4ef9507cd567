"""The seed's PyTorch checkpoints in and out: state_dict <-> jaxres variables.

The seed saves `model.state_dict()` of its ModifiedResNet: keys such as `conv1.weight`,
`bn1.running_mean`, `layer2.0.shortcut.0.weight`, `layer2.0.shortcut.1.bias`,
`linear.weight`, plus one `num_batches_tracked` per BatchNorm. jaxres names its modules
after the same layers (models.py), so each key maps to one variable:

    PyTorch                               jaxres
    conv1.weight            (O, I, H, W)  params/conv1/kernel                (H, W, I, O)
    bn1.weight / bn1.bias                 params/bn1/scale / params/bn1/bias
    bn1.running_mean / running_var        batch_stats/bn1/mean / batch_stats/bn1/var
    bn1.num_batches_tracked               (none: TrainState.step counts the same thing)
    layer2.0.conv1.weight                 params/layer2_0/conv1/kernel
    layer2.0.shortcut.0.weight            params/layer2_0/shortcut_conv/kernel
    layer2.0.shortcut.1.*                 .../layer2_0/shortcut_bn/*
    linear.weight           (out, in)     params/linear/kernel               (in, out)

Both BatchNorms use the same running-statistics convention (layers.BatchNorm follows
PyTorch), so the conversion is a pure relabelling and transposition: exact both ways.

    state_dict = load_torch_checkpoint('model.pth')   # torch.load(weights_only=True)
    variables = variables_from_torch(state_dict)      # {'params': ..., 'batch_stats': ...}
    state_dict = torch_state_dict(variables, num_batches_tracked=batches_tracked(state_dict))
"""

import collections
import dataclasses
import os
import pickle
import re
from typing import Any, Mapping, Optional

import flax.linen as nn
from flax import traverse_util
import jax
import numpy as np
import torch

from jaxres import models, train_state
from jaxres.errors import UsageError

NUM_BATCHES_TRACKED = 'num_batches_tracked'

# (jaxres collection, variable name) -> PyTorch parameter or buffer name.
_LEAF_NAMES = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}
# jaxres module names that differ from PyTorch's (the shortcut is an nn.Sequential there).
_MODULE_NAMES = {'shortcut_conv': 'shortcut.0', 'shortcut_bn': 'shortcut.1'}
_BLOCK_NAME = re.compile(r'^layer(\d+)_(\d+)$')  # layer2_0 <-> layer2.0
_STAGE_NAME = re.compile(r'^layer(\d+)$')

# PyTorch's state_dict order (module registration order), used to list keys as it does.
_TORCH_ORDER = ('conv1', 'bn1', 'conv2', 'bn2', 'shortcut', 'layer', 'linear',
                'weight', 'bias', 'running_mean', 'running_var', NUM_BATCHES_TRACKED)

# Containers that training scripts wrap a state_dict in, and prefixes that wrappers add
# to its keys (DataParallel / DistributedDataParallel, torch.compile).
_CONTAINER_KEYS = ('state_dict', 'model_state_dict', 'model')
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')


class IncompatibleStateDict(UsageError):
  """A state_dict (or variables) that is not the seed's ModifiedResNet of this shape."""


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One state_dict key and the jaxres variable it holds (collection None: a counter)."""

  torch_key: str
  collection: Optional[str]
  path: tuple
  torch_shape: tuple


# ---------------------------------------------------------------------------- names, layouts

def torch_key(collection: str, path: tuple) -> str:
  """The state_dict key of jaxres variable `collection`/`path`.

  ('params', ('layer2_0', 'shortcut_conv', 'kernel')) -> 'layer2.0.shortcut.0.weight'.
  """
  *modules, leaf = path
  if (collection, leaf) not in _LEAF_NAMES:
    raise IncompatibleStateDict(f'jaxres variable {"/".join((collection,) + tuple(path))} has '
                                f'no PyTorch counterpart in the seed model')
  names = [_BLOCK_NAME.sub(r'layer\1.\2', _MODULE_NAMES.get(m, m)) for m in modules]
  return '.'.join(names + [_LEAF_NAMES[(collection, leaf)]])


def _torch_rank(key: str) -> tuple:
  """Sort key putting state_dict keys in PyTorch's registration order."""
  rank = []
  for token in key.split('.'):
    stage = _STAGE_NAME.match(token)
    if token.isdigit():
      rank.append((0, int(token)))
    elif stage:
      rank.append((_TORCH_ORDER.index('layer'), int(stage.group(1))))
    else:
      rank.append((_TORCH_ORDER.index(token) if token in _TORCH_ORDER else len(_TORCH_ORDER), 0))
  return tuple(rank)


def _torch_shape(path: tuple, shape: tuple) -> tuple:
  """The PyTorch shape of a jaxres variable: kernels are transposed, others kept."""
  if path[-1] == 'kernel':
    return tuple(shape[i] for i in _kernel_to_torch(len(shape)))
  return tuple(shape)


def _kernel_to_torch(ndim: int) -> tuple:
  """Axis permutation of a jaxres kernel into PyTorch's layout."""
  if ndim == 4:  # conv: HWIO -> OIHW
    return (3, 2, 0, 1)
  if ndim == 2:  # dense: (in, out) -> (out, in)
    return (1, 0)
  raise IncompatibleStateDict(f'no PyTorch layout for a {ndim}-d kernel')


def _kernel_from_torch(ndim: int) -> tuple:
  return tuple(np.argsort(_kernel_to_torch(ndim)))


def _entries(variables: Mapping[str, Any]) -> list:
  """Every state_dict key of `variables` (arrays or shapes), in PyTorch's order."""
  entries = []
  for collection in ('params', 'batch_stats'):
    if collection not in variables:
      raise IncompatibleStateDict(f'variables have no {collection!r} collection '
                                  f'(have {sorted(variables)})')
    for path, leaf in traverse_util.flatten_dict(dict(variables[collection])).items():
      entries.append(_Entry(torch_key(collection, path), collection, path,
                            _torch_shape(path, np.shape(leaf))))
  batchnorms = {path[:-1] for path in traverse_util.flatten_dict(dict(variables['batch_stats']))}
  for module in batchnorms:
    key = torch_key('batch_stats', module + ('mean',)).rsplit('.', 1)[0]
    entries.append(_Entry(f'{key}.{NUM_BATCHES_TRACKED}', None, module, ()))
  return sorted(entries, key=lambda e: _torch_rank(e.torch_key))


# ---------------------------------------------------------------------------- architecture

def infer_model(state_dict: Mapping[str, Any]) -> models.ResNet:
  """The jaxres ResNet whose shapes a seed-style state_dict implies.

  Stage widths come from `layer{S}.0.conv1.weight`, block counts from the `layer{S}.{B}`
  indices, the class count from `linear.weight`. Whether every key and shape then fits
  is checked by `variables_from_torch`.
  """
  widths, blocks = [], []
  while f'layer{len(widths) + 1}.0.conv1.weight' in state_dict:
    stage = len(widths) + 1
    widths.append(int(np.shape(state_dict[f'layer{stage}.0.conv1.weight'])[0]))
    count = 0
    while f'layer{stage}.{count}.conv1.weight' in state_dict:
      count += 1
    blocks.append(count)
  if not widths:
    first = next(iter(state_dict), None)
    raise IncompatibleStateDict(
        f"not a state_dict of the seed's ModifiedResNet: no key 'layer1.0.conv1.weight' "
        f'(first key: {first!r}, {len(state_dict)} keys)')
  num_classes = (int(np.shape(state_dict['linear.weight'])[0]) if 'linear.weight' in state_dict
                 else models.ResNet.num_classes)
  return models.ResNet(widths=tuple(widths), blocks=tuple(blocks), num_classes=num_classes)


def describe(model: models.ResNet) -> str:
  return (f'ModifiedResNet(widths={tuple(model.widths)}, blocks={tuple(model.blocks)}, '
          f'num_classes={model.num_classes})')


def _abstract_variables(model: nn.Module):
  return jax.eval_shape(lambda: train_state.init_variables(model, jax.random.PRNGKey(0)))


# ---------------------------------------------------------------------------- conversion

def _to_numpy(key: str, value) -> np.ndarray:
  if isinstance(value, torch.Tensor):
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()
  if isinstance(value, (np.ndarray, np.generic, int, float)) or hasattr(value, '__array__'):
    return np.asarray(value)
  raise IncompatibleStateDict(f'state_dict[{key!r}] is a {type(value).__name__}, not a tensor')


def variables_from_torch(state_dict: Mapping[str, Any],
                         model: Optional[models.ResNet] = None) -> dict:
  """jaxres {'params', 'batch_stats'} (numpy float32) from a seed state_dict.

  Args:
    state_dict: the seed model's `state_dict()` (tensors or arrays), every key present.
    model: the jaxres ResNet it must fit (e.g. `models.create_model(config)`); by default
      the one its shapes imply (`infer_model`).

  Raises:
    IncompatibleStateDict: naming the first offending key (in the state_dict's order)
      and its shapes: a key the model does not have, a shape that differs, or, after
      those, a key the model needs that is missing.
  """
  model = infer_model(state_dict) if model is None else model
  entries = _entries(_abstract_variables(model))
  expected = {e.torch_key: e for e in entries}
  arrays = {}
  for key, value in state_dict.items():
    array = _to_numpy(key, value)
    entry = expected.get(key)
    if entry is None:
      raise IncompatibleStateDict(f'state_dict does not fit {describe(model)}: unexpected key '
                                  f'{key!r} (shape {tuple(array.shape)})')
    if tuple(array.shape) != entry.torch_shape:
      raise IncompatibleStateDict(f'state_dict does not fit {describe(model)}: {key!r} has shape '
                                  f'{tuple(array.shape)}, expected {entry.torch_shape}')
    arrays[key] = array
  for entry in entries:
    if entry.torch_key not in arrays:
      raise IncompatibleStateDict(f'state_dict does not fit {describe(model)}: missing key '
                                  f'{entry.torch_key!r} (shape {entry.torch_shape})')
  flat = {}
  for entry in entries:
    if entry.collection is None:
      continue
    array = arrays[entry.torch_key].astype(np.float32)
    if entry.path[-1] == 'kernel':
      array = np.ascontiguousarray(array.transpose(_kernel_from_torch(array.ndim)))
    flat[(entry.collection,) + entry.path] = array
  return traverse_util.unflatten_dict(flat)


def batches_tracked(state_dict: Mapping[str, Any]) -> int:
  """The largest `num_batches_tracked` of a state_dict: the train steps it has seen."""
  counts = [int(_to_numpy(k, v)) for k, v in state_dict.items()
            if k.endswith('.' + NUM_BATCHES_TRACKED)]
  return max(counts, default=0)


def torch_state_dict(variables: Mapping[str, Any],
                     num_batches_tracked: int = 0) -> 'collections.OrderedDict[str, torch.Tensor]':
  """The seed model's state_dict (CPU tensors, PyTorch's key order) of jaxres variables.

  `num_batches_tracked` fills every BatchNorm's counter; pass the number of training
  steps (a TrainState's `step`) for a faithful checkpoint. The result loads with
  `ModifiedResNet(...).load_state_dict(state_dict, strict=True)`.
  """
  variables = jax.device_get(variables)
  state_dict = collections.OrderedDict()
  for entry in _entries(variables):
    if entry.collection is None:
      state_dict[entry.torch_key] = torch.tensor(int(num_batches_tracked), dtype=torch.long)
      continue
    array = np.asarray(traverse_util.flatten_dict(dict(variables[entry.collection]))[entry.path])
    if entry.path[-1] == 'kernel':
      array = array.transpose(_kernel_to_torch(array.ndim))
    # A fresh, writable, C-ordered copy: torch tensors must not alias jax's buffers.
    state_dict[entry.torch_key] = torch.from_numpy(np.array(array, np.float32, order='C'))
  return state_dict


# ---------------------------------------------------------------------------- files

def _first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def _unpickler_reason(error: BaseException) -> str:
  """The reason in torch's weights-only refusal (e.g. 'Unsupported global: GLOBAL x ...')."""
  text = str(error)
  marker = 'WeightsUnpickler error:'
  if marker not in text:
    return _first_line(error)
  reason = ' '.join(text.split(marker, 1)[1].split('\n\n', 2)[:2]).split('Please use')[0]
  return ' '.join(reason.split()).rstrip('. ')


def _is_state_dict(obj) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(
      isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_torch_checkpoint(path: str) -> 'collections.OrderedDict[str, torch.Tensor]':
  """The state_dict in a `.pth` file, read with torch.load(weights_only=True).

  Only tensors and plain containers are unpickled: a file holding any other object is
  refused (UsageError), never executed. Accepts a bare state_dict, one under a
  'state_dict', 'model_state_dict' or 'model' key, and keys prefixed by DataParallel
  ('module.') or torch.compile ('_orig_mod.').
  """
  if not os.path.isfile(path):
    raise UsageError(f'PyTorch checkpoint {path} does not exist')
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    raise UsageError(f'{path}: torch.load(weights_only=True) refused it ({_unpickler_reason(e)}); '
                     f'jaxres reads plain state_dicts of tensors only') from None
  except Exception as e:  # pylint: disable=broad-except  (truncated zip, not a torch file)
    raise UsageError(f'{path} is not a readable PyTorch checkpoint '
                     f'({type(e).__name__}: {_first_line(e)})') from None
  if not _is_state_dict(obj) and isinstance(obj, Mapping):
    obj = next((obj[k] for k in _CONTAINER_KEYS if _is_state_dict(obj.get(k))), obj)
  if not _is_state_dict(obj):
    what = (f'a dict with keys {list(obj)[:5]}' if isinstance(obj, Mapping)
            else f'a {type(obj).__name__}')
    raise UsageError(f'{path} holds {what}, not a state_dict of tensors')
  for prefix in _WRAPPER_PREFIXES:
    if all(k.startswith(prefix) for k in obj):
      obj = collections.OrderedDict((k[len(prefix):], v) for k, v in obj.items())
  return collections.OrderedDict(obj)


def save_torch_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str) -> None:
  """torch.save(state_dict, path); UsageError if `path` cannot be written."""
  try:
    torch.save(state_dict, path)
  except OSError as e:
    raise UsageError(f'cannot write {path}: {e.strerror or _first_line(e)}') from None
