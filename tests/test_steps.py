import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import smoke
from jaxres import config_lib, models, optim, steps, train_state
from jaxres.errors import UsageError


def _state(config):
  model = models.create_model(config)
  tx = optim.create_optimizer(config)
  return model, tx, jax.jit(functools.partial(train_state.create, config, model, tx))()


def _tiny_config():
  config = smoke.get_config()
  config.model.widths, config.model.blocks = (4, 4, 4, 4), (1, 1, 1, 1)
  return config


def test_lookahead_averages_and_copies_back():
  config = _tiny_config()
  config.lookahead.enabled = True
  _, _, state = _state(config)
  la = steps.Lookahead(start_step=2, total_steps=10, every=2, decay=0.9, power=1.0)
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


def test_tta_views():
  config = _tiny_config()
  model, _, state = _state(config)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  logits = functools.partial(steps.tta_logits, model, state.variables)
  none = jax.jit(functools.partial(logits, tta='none'))
  plain, flipped = none(images), none(jnp.flip(images, axis=2))
  np.testing.assert_allclose(jax.jit(functools.partial(logits, tta='flip'))(images),
                             0.5 * (plain + flipped), rtol=1e-5, atol=1e-6)
  padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  up_left, down_right = padded[:, :32, :32], padded[:, 2:, 2:]
  mirror = lambda x: 0.5 * (none(x) + none(jnp.flip(x, axis=2)))
  expected = 0.5 * mirror(images) + 0.25 * (mirror(up_left) + mirror(down_right))
  np.testing.assert_allclose(jax.jit(functools.partial(logits, tta='flip_translate'))(images),
                             expected, rtol=1e-5, atol=1e-6)
  # Other shifts and weights: the centre pair at center_weight, the shifts sharing the rest.
  padded = jnp.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode='reflect')
  two_down, left = padded[:, :32, 2:34], padded[:, 2:34, 3:35]
  expected = 0.4 * mirror(images) + 0.3 * (mirror(two_down) + mirror(left))
  other = functools.partial(logits, tta='flip_translate', shifts=((2, 0), (0, -1)),
                            center_weight=0.4)
  np.testing.assert_allclose(jax.jit(other)(images), expected, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError):
    steps.tta_logits(model, state.variables, images, 'rotate')


def test_tta_options_from_config():
  config = _tiny_config()
  assert steps.tta_options(config) == {'tta': 'none', 'shifts': ((-1, -1), (1, 1)),
                                       'center_weight': 0.5}
  config.eval_tta, config.eval_tta_shifts = 'flip_translate', [[0, 2], [-2, 0]]  # from JSON
  config.eval_tta_center_weight = 0.25
  assert steps.tta_options(config) == {'tta': 'flip_translate', 'shifts': ((0, 2), (-2, 0)),
                                       'center_weight': 0.25}
  old = _tiny_config()  # a run's config from before eval_tta_shifts: airbench's views
  del old['eval_tta_shifts'], old['eval_tta_center_weight']
  assert steps.tta_options(old)['shifts'] == steps.AIRBENCH_SHIFTS


@pytest.mark.parametrize('field,value,message', [
    ('eval_tta_shifts', (), 'eval_tta_shifts must be'),
    ('eval_tta_shifts', ((1, 1, 1),), 'eval_tta_shifts must be'),
    ('eval_tta_shifts', ((0, 32),), 'eval_tta_shifts must be'),
    ('eval_tta_shifts', ((0.5, 1),), 'eval_tta_shifts must be'),
    ('eval_tta_center_weight', 1.5, 'eval_tta_center_weight must be in'),
])
def test_tta_config_is_checked(field, value, message):
  config = _tiny_config()
  config.eval_tta = 'flip_translate'
  config[field] = value
  with pytest.raises(UsageError, match=message):
    config_lib.validate(config)


def test_train_step_is_pure_and_counts():
  config = _tiny_config()
  model, tx, state = _state(config)
  batch = {'image': jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3)),
           'label': jnp.arange(8) % 10}
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx))
  a, ma = step(state, batch)
  b, mb = step(state, batch)
  assert int(a.step) == 1 and int(ma['step']) == 1 and float(ma['count']) == 8
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert not np.allclose(a.params['linear']['kernel'], state.params['linear']['kernel'])


def test_eval_step_masks_padding_and_counts_confusion():
  config = _tiny_config()
  model, _, state = _state(config)
  batch = {'image': jnp.zeros((4, 32, 32, 3)), 'label': jnp.array([1, 2, 3, 0]),
           'mask': jnp.array([1.0, 1.0, 1.0, 0.0])}
  m = jax.jit(functools.partial(steps.eval_step, model=model))(state, batch)
  assert float(m['count']) == 3 and float(m['confusion'].sum()) == 3
  assert float(m['confusion'][0].sum()) == 0  # the padded row (label 0) does not count


def _tiny_fast_config():
  from experiments import fast
  config = fast.get_config()
  config.model.widths = (8, 8, 8)
  config.frozen_after = (('whiten/bias', 1, config.bias_lr_scale),)
  return config


def test_holding_frozen_parameters_constant_changes_no_step():
  """train_step(frozen=...) skips the frozen layers' gradients but updates nothing else
  differently: the whitening layer (kernel frozen, bias frozen after epoch 1)."""
  config = _tiny_fast_config()
  model, tx = models.create_model(config), optim.create_optimizer(config, steps_per_epoch=2)
  state = jax.jit(functools.partial(train_state.create, config, model, tx))()
  assert optim.frozen_in_epoch(config, 1) == ('whiten/kernel',)
  assert optim.frozen_in_epoch(config, 2) == ('whiten/kernel', 'whiten/bias')
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 32, 32, 3))
  labels = jnp.arange(32).reshape(4, 8) % 10

  def run(frozen_by_epoch):
    s = state
    for i in range(4):  # epochs 1 and 2 of 2 steps
      frozen = frozen_by_epoch(i // 2 + 1)
      step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, frozen=frozen))
      s, _ = step(s, {'image': images[i], 'label': labels[i]})
    return s

  held = run(lambda epoch: optim.frozen_in_epoch(config, epoch))
  plain = run(lambda epoch: ())
  # Parameters and statistics agree; only the frozen bias's momentum buffer (never used
  # again) stops accumulating gradients.
  for x, y in zip(jax.tree.leaves((held.params, held.batch_stats)),
                  jax.tree.leaves((plain.params, plain.batch_stats))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(held.params['whiten']['kernel'], state.params['whiten']['kernel'])
  assert not np.allclose(held.params['whiten']['bias'], state.params['whiten']['bias'])


def test_hold_constant_stops_gradients_by_path():
  params = {'whiten': {'kernel': jnp.ones(3), 'bias': jnp.ones(3)},
            'linear': {'kernel': jnp.ones(3)}}

  def loss(p):
    p = optim.hold_constant(p, ('^whiten/',))
    return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))

  grads = jax.grad(loss)(params)
  np.testing.assert_array_equal(grads['whiten']['kernel'], 0.0)
  np.testing.assert_array_equal(grads['whiten']['bias'], 0.0)
  np.testing.assert_array_equal(grads['linear']['kernel'], 2.0)
  assert optim.hold_constant(params, ()) is params
