"""The train and eval steps: pure functions of (state, batch) -> (state, metrics).

Metrics are sums over the batch (loss_sum, correct, count), so any number of steps,
devices or hosts reduce by addition; divide at the end. Batches are arrays: how they are
made (jaxres.feeds, jaxres.augment) is the caller's, which composes it with the step.
"""

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxres import evaluation, optim
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
               tx: optax.GradientTransformation, label_smoothing: float = 0.0,
               lookahead=None, frozen: Sequence[str] = ()):
  """One optimizer step on `batch` {'image': NHWC float, 'label': int}.

  `lookahead` (an optim.Lookahead) pulls the weights towards their slow copy after the update.
  `frozen` (regexes of parameter paths, optim.frozen_in_epoch) are held constant in the
  loss: their gradients are zeros, and what only they need is not computed. It must
  name only parameters the optimizer leaves unchanged at this step; then parameters and
  statistics come out as without it (only the optimizer's momentum of those parameters,
  which no later step uses, stops accumulating gradients).
  """

  def loss_fn(params):
    params = optim.hold_constant(params, frozen)
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
  if lookahead is not None:
    new_state = lookahead.update(new_state)
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model: nn.Module, tta: str = 'none',
              probabilities: bool = False, **tta_kwargs) -> dict:
  """Metric sums on `batch` in eval mode; rows with mask 0 (padding) do not count.

  Logits are evaluation.tta_logits' (`tta`, `tta_kwargs`: shifts, center_weight). Also returns
  the batch's confusion matrix (rows: true class, columns: predicted) and, with
  `probabilities`, every row's class probabilities (padding rows included).
  """
  logits = evaluation.tta_logits(model, state.variables, batch['image'], tta, **tta_kwargs)
  losses = cross_entropy(logits, batch['label'])
  mask = batch.get('mask')
  metrics = _sums(logits, batch['label'], losses, mask)
  num_classes = logits.shape[-1]
  weights = jnp.ones(losses.shape) if mask is None else mask
  metrics['confusion'] = jnp.zeros((num_classes, num_classes)).at[
      batch['label'], jnp.argmax(logits, -1)].add(weights)
  if probabilities:
    metrics['probabilities'] = jax.nn.softmax(logits, axis=-1)
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


def train_steps_on_device(state: TrainState, data: dict, indices, epoch, *,
                          make_batch: Callable, model: nn.Module,
                          tx: optax.GradientTransformation, label_smoothing: float = 0.0,
                          lookahead=None, frozen: Sequence[str] = ()):
  """len(indices) optimizer steps in one dispatch (lax.scan), batches made on the device.

  `indices` is (steps, batch) rows of `data`; step s makes its batch with
  make_batch(data, rows, key, epoch) (a pure function, e.g. feeds.device_batch's) from
  key = fold_in(state.rng, s), so the randomness is a pure function of (seed, step).
  Returns (state, metrics stacked over the steps).

  On the CPU the scan is unrolled: XLA's CPU backend ran the convolutions of a step
  inside a while loop many times slower than the same step outside one when we built
  this, while unrolled steps cost what separate steps do (`python -m tools.bench` times
  this function as "batch made on device"). On accelerators the loop stays rolled
  (compile time does not grow with it).
  """

  def one_step(state, rows):
    key = jax.random.fold_in(state.rng, state.step)
    batch = make_batch(data, rows, key, epoch)
    return train_step(state, batch, model=model, tx=tx, label_smoothing=label_smoothing,
                      lookahead=lookahead, frozen=frozen)

  return jax.lax.scan(one_step, state, indices, unroll=jax.default_backend() == 'cpu')
