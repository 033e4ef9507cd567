"""Config checks shared by every command: validity and the parameter budget."""

import json
import os
import re
from typing import Any

import jax
import ml_collections

from jaxres import augment, evaluation, input_pipeline, models, optim, train_state
from jaxres.errors import UsageError

DTYPES = ('float32', 'bfloat16')
# config.matmul_precision: jax_default_matmul_precision's values ('default' leaves JAX's
# own: TF32 for float32 matmuls and convolutions on NVIDIA GPUs since Ampere).
MATMUL_PRECISIONS = ('default', 'tensorfloat32', 'float32', 'bfloat16')


def _require(ok: bool, message: str):
  if not ok:
    raise UsageError(message)


def validate_tta(config: ml_collections.ConfigDict) -> None:
  """The test-time augmentation fields (eval_tta*, evaluation.TTA_MODES; a run's config
  from before eval_tta_shifts has evaluation.tta_options' defaults)."""
  evaluation.TTA_MODES.get(config.eval_tta)  # UsageError naming the choices
  if config.eval_tta == 'flip_translate':
    shifts = config.get('eval_tta_shifts', evaluation.AIRBENCH_SHIFTS)
    size = config.data.image_size
    _require(len(shifts) > 0 and all(
        len(s) == 2 and all(isinstance(v, int) and abs(v) < size for v in s) for s in shifts),
        'config.eval_tta_shifts must be a non-empty list of (dy, dx) integer pairs smaller '
        f'than the image, got {shifts!r}')
    weight = config.get('eval_tta_center_weight', evaluation.AIRBENCH_CENTER_WEIGHT)
    _require(0 <= weight <= 1, f'config.eval_tta_center_weight must be in [0, 1], got {weight!r}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise UsageError naming the first field whose value cannot work.

  The config alone: no JAX backend is started here (a multi-host run validates before
  jax.distributed.initialize). What depends on the platform is jaxres.runtime.check's,
  and a platform backend's own fields (jaxres.backends) are its to validate.
  """
  for field in ('num_epochs', 'batch_size', 'eval_batch_size'):
    value = config[field]
    _require(isinstance(value, int) and value > 0, f'config.{field} must be a positive integer, got {value!r}')
  _require(config.learning_rate > 0, f'config.learning_rate must be positive, got {config.learning_rate!r}')
  _require(config.weight_decay >= 0, f'config.weight_decay must be >= 0, got {config.weight_decay!r}')
  _require(config.param_budget > 0, f'config.param_budget must be positive, got {config.param_budget!r}')
  _require(config.dtype != 'float16', 'config.dtype=float16 needs loss scaling, which jaxres '
           'does not do; use bfloat16 (same speed on current accelerators, no scaling needed)')
  _require(config.dtype in DTYPES, f'config.dtype must be one of {", ".join(DTYPES)}, got {config.dtype!r}')
  precision = config.get('matmul_precision', 'default')
  _require(precision in MATMUL_PRECISIONS, f'config.matmul_precision must be one of '
           f'{", ".join(MATMUL_PRECISIONS)}, got {precision!r}')
  # Names of the registries (UsageError naming the field and its choices otherwise).
  optim.OPTIMIZERS.get(config.optimizer)
  optim.SCHEDULES.get(config.schedule)
  _require(config.bias_lr_scale > 0, 'config.bias_lr_scale must be positive')
  for entry in config.get('frozen_after', ()):
    _require(len(entry) in (2, 3) and entry[1] >= 0 and (len(entry) == 2 or entry[2] > 0),
             f'config.frozen_after entries are (regex, epochs) or (regex, epochs, lr_scale), '
             f'got {tuple(entry)!r}')
  mu = config.get('muon')
  if mu is not None and mu.enabled:
    _require(mu.learning_rate > 0, f'config.muon.learning_rate must be positive, got {mu.learning_rate!r}')
    _require(0 <= mu.momentum < 1, f'config.muon.momentum must be in [0, 1), got {mu.momentum!r}')
    _require(isinstance(mu.ns_steps, int) and mu.ns_steps > 0,
             f'config.muon.ns_steps must be a positive integer, got {mu.ns_steps!r}')
    try:
      re.compile(mu.params)
    except re.error as e:
      raise UsageError(f'config.muon.params is not a regex: {e}') from None
  validate_tta(config)
  _require(config.eval_every_epoch or not optim.schedule(config).steps_on_test_loss,
           f'config.schedule={config.schedule} steps on the test loss of every epoch: it needs '
           'config.eval_every_epoch=True')
  _require(0 < config.plateau.factor < 1, f'config.plateau.factor must be in (0, 1), got {config.plateau.factor!r}')
  _require(config.plateau.patience >= 0, 'config.plateau.patience must be >= 0')
  _require(0 <= config.label_smoothing < 1, 'config.label_smoothing must be in [0, 1)')
  _require(config.checkpoint_keep >= 1, 'config.checkpoint_keep must be >= 1')
  m = config.model
  _require(m.name in models.MODELS, f'config.model.name must be one of '
           f'{models.MODELS.choices()}, got {m.name!r}')
  _require(len(m.widths) > 0 and all(int(w) > 0 for w in m.widths),
           'config.model.widths must be positive')
  if m.name == 'resnet':
    _require(len(m.widths) == len(m.blocks),
             f'config.model.widths {tuple(m.widths)} and config.model.blocks {tuple(m.blocks)} '
             f'must have the same length')
    _require(all(int(b) > 0 for b in m.blocks), 'config.model.blocks must be positive')
  _require(m.num_classes >= 2, f'config.model.num_classes must be >= 2, got {m.num_classes!r}')
  d = config.data
  input_pipeline.DATASETS.get(d.name)
  policy = augment.POLICIES.get(d.augment)  # the policies both data paths know
  _require(policy.torchvision is not None or d.on_device is not False,
           f'config.data.augment={d.augment} runs on the device only: set '
           'config.data.on_device=True')
  _require(d.on_device in (None, True, False),
           f'config.data.on_device must be True, False or None (automatic), got {d.on_device!r}')
  _require(not d.alternating_flip or d.on_device is not False,
           'config.data.alternating_flip needs config.data.on_device=True')
  _require(d.num_workers >= 0, 'config.data.num_workers must be >= 0')
  _require(d.holdout >= 0, 'config.data.holdout must be >= 0')
  for field in ('train_subset', 'test_subset'):
    value = d.get(field, 0)
    _require(isinstance(value, int) and value >= 0,
             f'config.data.{field} must be an integer >= 0 (0: the whole split), got {value!r}')


def param_count(config: ml_collections.ConfigDict) -> tuple[int, Any]:
  """(trainable parameter count, params shape tree) without computing anything."""
  model = models.create_model(config)
  shapes = jax.eval_shape(lambda: train_state.init_variables(
      model, jax.random.PRNGKey(0), config.data.image_size))
  return train_state.count_params(shapes['params']), shapes['params']


def check_budget(config: ml_collections.ConfigDict) -> int:
  """The parameter count; UsageError if it exceeds config.param_budget."""
  count, _ = param_count(config)
  if count > config.param_budget:
    raise UsageError(f'model has {count:,} trainable parameters, over the budget of '
                     f'{config.param_budget:,} (config.param_budget)')
  return count


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json())


def load_json(path: str) -> ml_collections.ConfigDict:
  """A config saved by the trainer (DIR/config.json)."""
  if not os.path.exists(path):
    raise UsageError(f'{path} does not exist: is this a jaxres workdir?')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def differences(old: dict, new: dict, prefix: str = '') -> list[str]:
  """Dotted names of the fields that differ between two config dicts."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    name = f'{prefix}{key}'
    if isinstance(a, dict) and isinstance(b, dict):
      out += differences(a, b, name + '.')
    elif a != b:
      out.append(name)
  return out
