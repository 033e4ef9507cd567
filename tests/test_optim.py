import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import base, smoke
from jaxres import config_lib, models, optim, train_state
from jaxres.errors import UsageError


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
  config.frozen_after = (('whiten/bias', 2, 8.0),)  # with its own learning-rate scale
  np.testing.assert_allclose(_one_step_updates(config)['whiten']['bias'], -0.8)
  np.testing.assert_allclose(_one_step_updates(config, steps=3)['whiten']['bias'], 0.0)


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


def test_newton_schulz_orthogonalizes_either_orientation():
  rng = np.random.default_rng(0)
  wide = jnp.asarray(rng.normal(size=(16, 40)), jnp.float32)
  u, _, vt = np.linalg.svd(np.asarray(wide), full_matrices=False)
  x = optim.newton_schulz(wide, steps=5)
  singular = np.linalg.svd(np.asarray(x), compute_uv=False)
  assert singular.min() > 0.6 and singular.max() < 1.25, singular  # about 1, not exactly
  # Same singular vectors as U V^T: projecting onto them leaves a diagonal, positive matrix.
  core = u.T @ np.asarray(x) @ vt.T
  np.testing.assert_allclose(core, np.diag(np.diag(core)), atol=2e-3)
  np.testing.assert_allclose(optim.newton_schulz(wide.T, steps=5), x.T, atol=1e-5)
  np.testing.assert_allclose(optim.newton_schulz(100.0 * wide, steps=5), x, atol=1e-5)


def _muon_config(**overrides):
  config = _config(**overrides)
  config.muon.enabled = True
  config.muon.learning_rate = 0.5
  config.muon.momentum = 0.6
  return config


def test_muon_labels_only_convolution_kernels():
  labels = optim.param_labels(_params(), _muon_config(frozen=('whiten/kernel',)))
  assert labels['conv']['kernel'] == 'muon'
  assert labels['whiten']['kernel'] == 'frozen'  # frozen comes first
  assert labels['linear']['kernel'] == 'default'  # 2-D: not a convolution
  config = _muon_config()
  config.muon.params = r'^conv/'
  assert optim.param_labels(_params(), config)['whiten']['kernel'] == 'default'


def test_muon_step_matches_airbench_rule():
  # airbench94_muon: kernel <- kernel * sqrt(out) / |kernel| - lr * NS(g + m * buf), buf = g
  # on the first step; everything else keeps its own group (SGD here).
  config = _muon_config(learning_rate=0.1)
  rng = np.random.default_rng(1)
  params = _params()
  params['conv']['kernel'] = jnp.asarray(rng.normal(size=(3, 3, 2, 2)), jnp.float32)
  grads = jax.tree.map(jnp.ones_like, params)
  grads['conv']['kernel'] = jnp.asarray(rng.normal(size=(3, 3, 2, 2)), jnp.float32)
  tx = optim.create_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  p, g = np.asarray(params['conv']['kernel']), np.asarray(grads['conv']['kernel'])
  ortho = optim.newton_schulz(jnp.asarray((1 + 0.6) * g).reshape(18, 2), config.muon.ns_steps)
  expected = p * np.sqrt(2) / np.linalg.norm(p) - 0.5 * np.asarray(ortho).reshape(p.shape)
  np.testing.assert_allclose(new['conv']['kernel'], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates['linear']['kernel'], -0.1)


def test_muon_rate_follows_the_schedule():
  config = _muon_config(schedule='triangle', learning_rate=2.0, num_epochs=10)
  config.triangle.start, config.triangle.peak, config.triangle.end = 1.0, 0.0, 0.0
  config.muon.renormalize = False
  tx = optim.create_optimizer(config, steps_per_epoch=10)
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  sizes = []
  for _ in range(51):
    updates, state = tx.update(grads, state, params)
    sizes.append(float(jnp.linalg.norm(updates['conv']['kernel'])))
  # Constant gradients: the orthogonalized direction is the same every step, so the
  # update's size is the rate, linear from 0.5 (muon.learning_rate) to 0 at step 100.
  np.testing.assert_allclose(sizes[50] / sizes[0], 0.5, rtol=2e-2)
  np.testing.assert_allclose(sizes[25] / sizes[0], 0.75, rtol=2e-2)


def test_config_checks_muon_and_frozen_after_entries():
  config = _muon_config()
  config_lib.validate(config)
  for field, value, words in (('ns_steps', 0, 'ns_steps'), ('momentum', 1.0, 'momentum'),
                              ('params', '(', 'regex')):
    bad = _muon_config()
    bad.muon[field] = value
    with pytest.raises(UsageError, match=words):
      config_lib.validate(bad)
  bad = _config(frozen_after=(('whiten/bias', 3, 0.0),))
  with pytest.raises(UsageError, match='frozen_after'):
    config_lib.validate(bad)


def test_fast_recipe_groups():
  from experiments import fast
  config = fast.get_config()
  _, shapes = config_lib.param_count(config)
  labels = optim.param_labels(shapes, config)
  assert labels['whiten'] == {'kernel': 'frozen', 'bias': 'frozen_after_0'}
  for group in ('group1', 'group2', 'group3'):
    assert labels[group] == {'conv1': {'kernel': 'muon'}, 'conv2': {'kernel': 'muon'},
                             'norm1': {'bias': 'bias'}, 'norm2': {'bias': 'bias'}}
  assert labels['linear'] == {'kernel': 'default'}
  # airbench94_muon's rates: biases at 0.053 / 0.67 of the head's summed-loss rate, which
  # becomes 64x here with the head's 1/9 logit scale in place of 1/256.
  np.testing.assert_allclose(config.bias_lr_scale, 0.053 / 0.67 * (256 / 9) ** 2, rtol=1e-12)
  np.testing.assert_allclose(config.learning_rate * config.weight_decay, 2e-6 * config.batch_size)


def test_schedules_say_how_the_trainer_steps_them():
  assert optim.SCHEDULES.names() == ('plateau', 'constant', 'triangle')
  assert [n for n in optim.SCHEDULES if optim.SCHEDULES.get(n).steps_on_test_loss] == ['plateau']
  assert [n for n in optim.SCHEDULES
          if optim.SCHEDULES.get(n).counts_from_num_epochs] == ['triangle']
  config = smoke.get_config()
  config.eval_every_epoch = False  # plateau needs each epoch's test loss; constant does not
  with pytest.raises(UsageError, match='config.schedule=plateau steps on the test loss'):
    config_lib.validate(config)
  config.schedule = 'constant'
  config_lib.validate(config)


def test_a_schedule_registered_outside_is_validated_and_used(register_for_test):
  halving = optim.Schedule(lambda config, steps_per_epoch: optax.exponential_decay(
      config.learning_rate, steps_per_epoch, 0.5))
  register_for_test(optim.SCHEDULES, 'halving', halving)
  config = smoke.get_config()
  config.schedule = 'halving'
  config_lib.validate(config)
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=4)
  assert float(schedule(8)) == pytest.approx(config.learning_rate / 4)
  config.schedule = 'halfing'
  with pytest.raises(UsageError, match='config.schedule must be one of plateau, constant, '
                     'triangle or halving'):
    config_lib.validate(config)


def test_an_optimizer_registered_outside_is_validated_and_used(register_for_test):
  register_for_test(optim.OPTIMIZERS, 'signsgd', lambda config: optax.scale_by_sign())
  config = _config(optimizer='signsgd', learning_rate=0.1)
  config_lib.validate(config)
  updates = _one_step_updates(config)
  np.testing.assert_allclose(updates['conv']['kernel'], -0.1, rtol=1e-6)
  with pytest.raises(UsageError, match='config.optimizer must be one of adam, sgd or signsgd'):
    config_lib.validate(_config(optimizer='lion'))


def _tiny_state(config):
  model = models.create_model(config)
  tx = optim.create_optimizer(config)
  return jax.jit(functools.partial(train_state.create, config, model, tx))()


def test_lookahead_averages_and_copies_back():
  config = smoke.get_config()
  config.model.widths, config.model.blocks = (4, 4, 4, 4), (1, 1, 1, 1)
  config.lookahead.enabled = True
  state = _tiny_state(config)
  la = optim.Lookahead(start_step=2, total_steps=10, every=2, decay=0.9, power=1.0)
  assert la.first_step == 2
  slow0 = jax.tree.map(lambda x: x + 1.0, state.params)
  state = state.replace(slow={'params': slow0, 'batch_stats': state.batch_stats})
  update, sync = jax.jit(la.update), jax.jit(la.sync)
  untouched = update(state.replace(step=jnp.asarray(1)))  # before start: nothing
  np.testing.assert_array_equal(untouched.params['linear']['bias'], state.params['linear']['bias'])
  first = update(state.replace(step=jnp.asarray(2)))  # first step takes the copy
  np.testing.assert_array_equal(first.slow['params']['linear']['bias'], state.params['linear']['bias'])
  s = state.replace(step=jnp.asarray(4))
  moved = update(s)
  rho = 0.9 ** 2 * (4 / 10)
  expected = rho * slow0['linear']['bias'] + (1 - rho) * s.params['linear']['bias']
  np.testing.assert_allclose(moved.slow['params']['linear']['bias'], expected, rtol=1e-6)
  np.testing.assert_allclose(moved.params['linear']['bias'], expected, rtol=1e-6)
  synced = sync(s.replace(step=jnp.asarray(5)))
  np.testing.assert_array_equal(synced.params['linear']['bias'], slow0['linear']['bias'])
  assert optim.create_lookahead(config, 10).total_steps == config.num_epochs * 10
