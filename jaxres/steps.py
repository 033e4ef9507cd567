"""The train and eval steps: pure functions of (state, batch) -> (state, metrics).

Metrics are sums over the batch (loss_sum, correct, count), so any number of steps,
devices or hosts reduce by addition; divide at the end.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxres import optim
from jaxres.train_state import TrainState


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Per-example cross-entropy, optionally with label smoothing (PyTorch's definition)."""
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def _sums(logits, labels, losses, mask=None):
  mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {'loss_sum': jnp.sum(losses * mask), 'correct': jnp.sum(correct * mask),
          'count': jnp.sum(mask)}


def train_step(state: TrainState, batch: dict, *, model: nn.Module,
               tx: optax.GradientTransformation, label_smoothing: float = 0.0):
  """One optimizer step on `batch` {'image': NHWC float, 'label': int}."""

  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                  batch['image'], train=True, mutable=['batch_stats'])
    losses = cross_entropy(logits, batch['label'], label_smoothing)
    return jnp.mean(losses), (logits, losses, updates['batch_stats'])

  grads, (logits, losses, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  metrics = _sums(logits, batch['label'], losses)
  metrics['learning_rate'] = optim.learning_rate(state.opt_state)
  metrics['step'] = state.step + 1
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model: nn.Module) -> dict:
  """Metric sums on `batch` in eval mode; rows with mask 0 (padding) do not count.

  Also returns the batch's confusion matrix (rows: true class, columns: predicted).
  """
  logits = model.apply(state.variables, batch['image'], train=False)
  losses = cross_entropy(logits, batch['label'])
  mask = batch.get('mask')
  metrics = _sums(logits, batch['label'], losses, mask)
  num_classes = logits.shape[-1]
  weights = jnp.ones(losses.shape) if mask is None else mask
  metrics['confusion'] = jnp.zeros((num_classes, num_classes)).at[
      batch['label'], jnp.argmax(logits, -1)].add(weights)
  return metrics


def apply_plateau_scale(state: TrainState, base_learning_rate: float) -> TrainState:
  """Set the optimizer's learning rate to base_learning_rate x the plateau rule's scale."""
  opt_state = optim.set_learning_rate(state.opt_state, base_learning_rate * state.plateau.scale)
  return state.replace(opt_state=opt_state)


def plateau_step(state: TrainState, metric, *, plateau: optax.GradientTransformationExtraArgs,
                 base_learning_rate: float) -> TrainState:
  """Step the plateau rule once (end of epoch) and set the learning rate it implies."""
  _, plateau_state = plateau.update(None, state.plateau, value=metric)
  return apply_plateau_scale(state.replace(plateau=plateau_state), base_learning_rate)


def summarize(metric_sums: dict, prefix: str) -> dict:
  """{'loss_sum', 'correct', 'count'} (numpy) -> {prefix_loss, prefix_accuracy}."""
  count = max(float(metric_sums['count']), 1.0)
  return {f'{prefix}_loss': float(metric_sums['loss_sum']) / count,
          f'{prefix}_accuracy': float(metric_sums['correct']) / count}


def device_batch(data: dict, indices, key, *, policy: str) -> dict:
  """A training batch made on the device: gather rows of the uint8 dataset `data`,
  augment them with `policy` (jaxres.augment) from `key`, normalize as the seed does."""
  from jaxres import augment, input_pipeline
  images = augment.augment(key, data['image'][indices], policy)
  mean = jnp.asarray(input_pipeline.MEAN, jnp.float32)
  std = jnp.asarray(input_pipeline.STD, jnp.float32)
  return {'image': (images - mean) / std, 'label': data['label'][indices]}


def train_steps_on_device(state: TrainState, data: dict, indices, *, model: nn.Module,
                          tx: optax.GradientTransformation, policy: str,
                          label_smoothing: float = 0.0):
  """len(indices) optimizer steps in one dispatch (lax.scan), batches made on the device.

  `indices` is (steps, batch) rows of `data`; step s augments with
  fold_in(state.rng, s), so the randomness is a pure function of (seed, step).
  Returns (state, metrics stacked over the steps).
  """

  def one_step(state, rows):
    key = jax.random.fold_in(state.rng, state.step)
    batch = device_batch(data, rows, key, policy=policy)
    return train_step(state, batch, model=model, tx=tx, label_smoothing=label_smoothing)

  return jax.lax.scan(one_step, state, indices)
