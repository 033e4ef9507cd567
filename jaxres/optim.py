"""Optimizers and learning-rate rules, as optax transforms.

- `create_optimizer`: the update direction (Adam or SGD) with PyTorch's coupled weight
  decay (decay added to the gradient first), wrapped in `optax.inject_hyperparams` so the
  learning rate lives in the optimizer state: visible, checkpointed, settable.
- `create_plateau`: optax's reduce_on_plateau configured to behave exactly like
  torch.optim.lr_scheduler.ReduceLROnPlateau stepped once per epoch.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax
from optax import contrib


def _direction(optimizer: str, weight_decay: float, *, b1=0.9, b2=0.999, eps=1e-8,
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


def create_optimizer(config: ml_collections.ConfigDict, learning_rate=None):
  """optax transform for `config`; the learning rate is an injected hyperparameter.

  `learning_rate` may be a float or an optax schedule (a function of the step count);
  it defaults to config.learning_rate.
  """
  lr = config.learning_rate if learning_rate is None else learning_rate

  def make(learning_rate):
    return optax.chain(
        _direction(config.optimizer, config.weight_decay, b1=config.adam_b1,
                   b2=config.adam_b2, eps=config.adam_eps, momentum=config.momentum,
                   nesterov=config.nesterov),
        optax.scale_by_learning_rate(learning_rate))

  return optax.inject_hyperparams(make)(learning_rate=lr)


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
