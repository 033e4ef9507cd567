"""Optimizers and learning-rate rules, as optax transforms.

- `create_optimizer`: the update direction (Adam or SGD) with PyTorch's coupled weight
  decay (decay added to the gradient first), wrapped in `optax.inject_hyperparams` so the
  learning rate lives in the optimizer state: visible, checkpointed, settable.
- `create_plateau`: optax's reduce_on_plateau configured to behave exactly like
  torch.optim.lr_scheduler.ReduceLROnPlateau stepped once per epoch.
"""

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import optax
from optax import contrib


def _direction(optimizer: str, *, weight_decay: float, b1=0.9, b2=0.999, eps=1e-8,
               momentum=0.9, nesterov=False) -> optax.GradientTransformation:
  if optimizer == 'adam':
    core = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  elif optimizer == 'sgd':
    core = optax.trace(decay=momentum, nesterov=nesterov) if momentum else optax.identity()
  else:
    raise ValueError(f'unknown optimizer {optimizer!r}')
  # torch.optim.{Adam,SGD}(weight_decay=wd) adds wd * param to the gradient (L2), before
  # the moments: not AdamW's decoupled decay.
  return optax.chain(optax.add_decayed_weights(weight_decay), core)


def param_labels(params, config: ml_collections.ConfigDict):
  """The optimizer group of every parameter, a pytree of strings like `params`.

  'frozen'    paths matching a regex of config.frozen: never updated;
  'frozen_after_I'  paths matching config.frozen_after[I][0]: updated until epoch
              config.frozen_after[I][1], then frozen;
  'bias'      BatchNorm biases (a 'bias' in a module without a 'kernel'), when
              config.bias_lr_scale != 1: learning rate x bias_lr_scale, weight decay /
              bias_lr_scale (so the decay per step is unchanged);
  'default'   everything else.
  Paths are 'module/submodule/param', e.g. 'whiten/kernel', 'layer1_0/bn1/bias'.
  """
  frozen = [re.compile(p) for p in config.get('frozen', ())]
  frozen_after = [re.compile(p) for p, _ in config.get('frozen_after', ())]
  scale_biases = config.get('bias_lr_scale', 1.0) != 1.0

  def label(path, _):
    keys = [str(getattr(k, 'key', k)) for k in path]
    name = '/'.join(keys)
    if any(r.search(name) for r in frozen):
      return 'frozen'
    for i, r in enumerate(frozen_after):
      if r.search(name):
        return f'frozen_after_{i}'
    if scale_biases and keys[-1] == 'bias' and 'kernel' not in _siblings(params, keys[:-1]):
      return 'bias'
    return 'default'

  return jax.tree_util.tree_map_with_path(label, params)


def _siblings(params, module_path):
  node = params
  for key in module_path:
    node = node[key]
  return node


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """config.learning_rate as a constant (plateau, constant) or an optax schedule (triangle).

  triangle: linear from learning_rate x triangle.start at step 0 to learning_rate at
  triangle.peak of the run, then linear to learning_rate x triangle.end at the last step.
  """
  if config.schedule in ('plateau', 'constant'):
    return config.learning_rate
  if config.schedule == 'triangle':
    t = config.triangle
    total = config.num_epochs * steps_per_epoch
    peak = max(int(t.peak * total), 1)
    lr = config.learning_rate
    return optax.join_schedules(
        [optax.linear_schedule(lr * t.start, lr, peak),
         optax.linear_schedule(lr, lr * t.end, max(total - peak, 1))], [peak])
  raise ValueError(f'unknown schedule {config.schedule!r}')


def create_optimizer(config: ml_collections.ConfigDict, learning_rate=None,
                     steps_per_epoch: int = 1):
  """optax transform for `config`; the learning rate is an injected hyperparameter.

  `learning_rate` may be a float or an optax schedule (a function of the step count);
  it defaults to `learning_rate_schedule(config, steps_per_epoch)`. Parameter groups
  (frozen, BatchNorm biases) follow `param_labels`.
  """
  lr = learning_rate_schedule(config, steps_per_epoch) if learning_rate is None else learning_rate
  direction = functools.partial(_direction, config.optimizer, b1=config.adam_b1,
                                b2=config.adam_b2, eps=config.adam_eps,
                                momentum=config.momentum, nesterov=config.nesterov)
  bias_scale = config.get('bias_lr_scale', 1.0)
  frozen_after = list(config.get('frozen_after', ()))

  def make(learning_rate):
    groups = {
        'default': optax.chain(direction(weight_decay=config.weight_decay),
                               optax.scale_by_learning_rate(learning_rate)),
        'bias': optax.chain(direction(weight_decay=config.weight_decay / bias_scale),
                            optax.scale_by_learning_rate(learning_rate * bias_scale)),
        'frozen': optax.set_to_zero(),
    }
    for i, (_, epochs) in enumerate(frozen_after):
      until = epochs * steps_per_epoch
      groups[f'frozen_after_{i}'] = optax.chain(
          direction(weight_decay=config.weight_decay),
          optax.scale_by_learning_rate(learning_rate),
          _zero_from_step(until))
    return optax.multi_transform(groups, lambda params: param_labels(params, config))

  return optax.inject_hyperparams(make)(learning_rate=lr)


def _zero_from_step(step: int) -> optax.GradientTransformation:
  """Pass updates through for the first `step` steps, then zero them (freeze)."""

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    keep = state.count < step
    updates = jax.tree.map(lambda u: jnp.where(keep, u, jnp.zeros_like(u)), updates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def learning_rate(opt_state) -> jax.Array:
  """The learning rate held by an optimizer state made by `create_optimizer`."""
  return opt_state.hyperparams['learning_rate']


def set_learning_rate(opt_state, value):
  """A copy of `opt_state` whose learning rate is `value` (plateau rule)."""
  hyperparams = dict(opt_state.hyperparams)
  hyperparams['learning_rate'] = jnp.asarray(value, hyperparams['learning_rate'].dtype)
  return opt_state._replace(hyperparams=hyperparams)


# ReduceLROnPlateau's default eps: it skips a reduction of the learning rate by less.
TORCH_PLATEAU_EPS = 1e-8


def torch_min_scale(learning_rate: float, factor: float, eps: float = TORCH_PLATEAU_EPS) -> float:
  """The plateau scale below which PyTorch never takes `learning_rate`.

  ReduceLROnPlateau sets lr = lr * factor only if the change exceeds `eps`, so it stops
  at the first lr with lr - lr * factor <= eps (1e-8 for the seed's 1e-3 and 0.1).
  """
  lr = learning_rate
  while lr - lr * factor > eps:
    lr *= factor
  return lr / learning_rate


def create_plateau(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """ReduceLROnPlateau(mode='min', threshold_mode='rel') as an optax transform.

  optax reduces when the count of bad epochs *reaches* `patience`; PyTorch when it
  *exceeds* it. Passing patience + 1 makes the two agree step for step, and
  `torch_min_scale` stops the reductions where PyTorch's eps does (tested against
  torch). Step it once per epoch: `_, state = plateau.update(None, state, value=loss)`;
  the learning-rate multiplier is `state.scale`.
  """
  p = config.plateau
  return contrib.reduce_on_plateau(
      factor=p.factor, patience=p.patience + 1, rtol=p.threshold, atol=0.0,
      cooldown=p.cooldown, min_scale=torch_min_scale(config.learning_rate, p.factor))
