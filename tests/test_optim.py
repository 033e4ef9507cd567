import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import base
from jaxres import optim


def _params():
  return {'conv': {'kernel': jnp.ones((3, 3, 2, 2))},
          'bn': {'scale': jnp.ones(2), 'bias': jnp.ones(2)},
          'linear': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)},
          'whiten': {'kernel': jnp.ones((2, 2, 3, 4)), 'bias': jnp.ones(4)}}


def _config(**overrides):
  config = base.get_config()
  config.optimizer, config.momentum, config.nesterov = 'sgd', 0.0, False
  config.weight_decay = 0.0
  config.update(overrides)
  return config


def _one_step_updates(config, steps_per_epoch=1, steps=1):
  tx = optim.create_optimizer(config, steps_per_epoch=steps_per_epoch)
  params = _params()
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
  return updates


def test_param_labels():
  config = _config(bias_lr_scale=64.0, frozen=('whiten/kernel',), frozen_after=(('whiten/bias', 3),))
  labels = optim.param_labels(_params(), config)
  assert labels['whiten'] == {'kernel': 'frozen', 'bias': 'frozen_after_0'}
  assert labels['bn'] == {'scale': 'default', 'bias': 'bias'}  # a BatchNorm bias
  assert labels['linear'] == {'kernel': 'default', 'bias': 'default'}  # a Dense bias
  assert optim.param_labels(_params(), _config())['bn']['bias'] == 'default'


def test_groups_scale_frozen_and_bias_learning_rates():
  config = _config(learning_rate=0.1, bias_lr_scale=64.0, frozen=('whiten/kernel',),
                   frozen_after=(('whiten/bias', 2),))
  updates = _one_step_updates(config)
  np.testing.assert_allclose(updates['conv']['kernel'], -0.1)
  np.testing.assert_allclose(updates['bn']['bias'], -6.4)
  np.testing.assert_allclose(updates['whiten']['kernel'], 0.0)
  np.testing.assert_allclose(updates['whiten']['bias'], -0.1)  # step 1 of 2 epochs
  later = _one_step_updates(config, steps=3)  # step 3: past 2 epochs of 1 step
  np.testing.assert_allclose(later['whiten']['bias'], 0.0)


def test_bias_group_keeps_the_decay_per_step():
  config = _config(learning_rate=0.1, bias_lr_scale=64.0, weight_decay=0.01)
  tx = optim.create_optimizer(config)
  params = _params()
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # lr x wd x param for both groups: 0.1 x 0.01 and (0.1 x 64) x (0.01 / 64).
  np.testing.assert_allclose(updates['conv']['kernel'], -1e-3, rtol=1e-6)
  np.testing.assert_allclose(updates['bn']['bias'], -1e-3, rtol=1e-6)


def test_triangle_schedule():
  config = _config(schedule='triangle', learning_rate=2.0, num_epochs=10)
  config.triangle.start, config.triangle.peak, config.triangle.end = 0.2, 0.25, 0.1
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=10)  # 100 steps
  values = [float(schedule(s)) for s in (0, 25, 100)]
  np.testing.assert_allclose(values, [0.4, 2.0, 0.2], rtol=1e-6)
  assert float(schedule(10)) < float(schedule(20)) and float(schedule(60)) > float(schedule(90))
  assert optim.learning_rate_schedule(_config(learning_rate=0.3), 10) == 0.3


def test_learning_rate_is_readable_and_settable():
  config = _config(learning_rate=0.1)
  tx = optim.create_optimizer(config)
  state = tx.init(_params())
  assert float(optim.learning_rate(state)) == np.float32(0.1)
  state = optim.set_learning_rate(state, 0.01)
  assert float(optim.learning_rate(state)) == np.float32(0.01)
