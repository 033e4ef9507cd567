"""The training state: one pytree holding everything a run needs to continue."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxres import optim


@flax.struct.dataclass
class TrainState:
  """All mutable training state, explicitly.

  step: global optimizer steps taken. params / batch_stats: the model's variables.
  opt_state: optax state (holds the learning rate). plateau: the plateau rule's state,
  stepped once per epoch. rng: a raw uint32 PRNG key for randomness inside the step.
  slow: lookahead's slow copy of {'params', 'batch_stats'} (None without lookahead).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  plateau: Any
  rng: jax.Array
  slow: Any = None

  @property
  def variables(self):
    return {'params': self.params, 'batch_stats': self.batch_stats}


def init_variables(model: nn.Module, key: jax.Array, image_size: int = 32):
  """The model's initial {'params', 'batch_stats'} for NHWC images of image_size."""
  return model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)


def create(config: ml_collections.ConfigDict, model: nn.Module,
           tx: optax.GradientTransformation, param_overrides=None) -> TrainState:
  """A fresh TrainState, a pure function of config.seed (and `param_overrides`).

  `param_overrides` is a nested dict of parameters that replace the initialized ones,
  e.g. a whitening layer computed from the training images (models.data_init).
  """
  init_key, rng = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = init_variables(model, init_key, config.data.image_size)
  params = _merge(variables['params'], param_overrides or {})
  batch_stats = variables.get('batch_stats', {})
  lookahead = config.get('lookahead')
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      plateau=optim.create_plateau(config).init(jnp.zeros((), jnp.float32)),
      rng=rng,
      slow=({'params': params, 'batch_stats': batch_stats}
            if lookahead is not None and lookahead.enabled else None))


def _merge(tree: dict, overrides: dict) -> dict:
  """`tree` with the leaves of `overrides` put in (same shapes required)."""
  out = dict(tree)
  for key, value in overrides.items():
    if isinstance(value, dict):
      out[key] = _merge(tree[key], value)
    else:
      if tuple(tree[key].shape) != tuple(value.shape):
        raise ValueError(f'override of {key}: shape {value.shape} != {tree[key].shape}')
      out[key] = jnp.asarray(value, tree[key].dtype)
  return out


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
