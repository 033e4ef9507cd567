import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxres import feeds, models, optim, steps, train_state
from tests.conftest import tiny_config


def _state(config):
  model = models.create_model(config)
  tx = optim.create_optimizer(config)
  return model, tx, jax.jit(functools.partial(train_state.create, config, model, tx))()


def test_train_step_is_pure_and_counts():
  config = tiny_config()
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


def test_steps_on_device_are_train_steps_on_the_batches_they_make():
  """train_steps_on_device scans train_step over the batches its make_batch (here
  feeds.device_batch, as the trainer composes them) makes from fold_in(rng, step)."""
  config = tiny_config()
  model, tx, state = _state(config)
  rng = np.random.default_rng(0)
  data = {'image': jnp.asarray(rng.integers(0, 256, (16, 32, 32, 3), np.uint8)),
          'label': jnp.asarray(np.arange(16) % 10, jnp.int32)}
  indices = jnp.asarray(rng.permutation(16).reshape(2, 8), jnp.int32)
  make_batch = functools.partial(feeds.device_batch, policy='flip_crop', mean=(0.5,) * 3,
                                 std=(0.5,) * 3)
  scanned, metrics = jax.jit(functools.partial(
      steps.train_steps_on_device, make_batch=make_batch, model=model, tx=tx))(
          state, data, indices, 1)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx))
  one_by_one = state
  for rows in indices:
    batch = make_batch(data, rows, jax.random.fold_in(one_by_one.rng, one_by_one.step), 1)
    one_by_one, _ = step(one_by_one, batch)
  assert metrics['loss_sum'].shape == (2,) and int(scanned.step) == 2
  for x, y in zip(jax.tree.leaves(scanned.params), jax.tree.leaves(one_by_one.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_eval_step_masks_padding_and_counts_confusion():
  config = tiny_config()
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
