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
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  plateau: Any
  rng: jax.Array

  @property
  def variables(self):
    return {'params': self.params, 'batch_stats': self.batch_stats}


def init_variables(model: nn.Module, key: jax.Array, image_size: int = 32):
  """The model's initial {'params', 'batch_stats'} for NHWC images of image_size."""
  return model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)


def create(config: ml_collections.ConfigDict, model: nn.Module,
           tx: optax.GradientTransformation) -> TrainState:
  """A fresh TrainState, a pure function of config.seed."""
  init_key, rng = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = init_variables(model, init_key, config.data.image_size)
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(params),
      plateau=optim.create_plateau(config).init(jnp.zeros((), jnp.float32)),
      rng=rng)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
