"""The train and eval steps: pure functions of (state, batch) -> (state, metrics).

Metrics are sums over the batch (loss_sum, correct, count), so any number of steps,
devices or hosts reduce by addition; divide at the end.
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxres import augment, optim
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

  `lookahead` (a Lookahead) pulls the weights towards their slow copy after the update.
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


@dataclasses.dataclass(frozen=True)
class Lookahead:
  """Lookahead with an averaged slow copy, as the airbench speed runs use it.

  Every `every` steps from `start_step` on, the slow copy of params and BatchNorm
  statistics moves towards the fast one, slow = rho * slow + (1 - rho) * fast, and the
  fast weights are reset to it. rho = decay**every * (step / total_steps)**power grows
  over training: move fast early, average strongly at the end. The first such step only
  takes the copy. `sync` (end of each epoch) resets the fast weights to the slow copy.
  """

  start_step: int
  total_steps: int
  every: int = 5
  decay: float = 0.95
  power: float = 3.0

  @property
  def first_step(self) -> int:
    return -(-max(self.start_step, 1) // self.every) * self.every

  def update(self, state: TrainState) -> TrainState:
    step = state.step
    active = (step >= self.first_step) & (step % self.every == 0)
    rho = (self.decay ** self.every) * (step / self.total_steps) ** self.power
    rho = jnp.where(step == self.first_step, 0.0, rho)
    fast = {'params': state.params, 'batch_stats': state.batch_stats}
    moved = jax.tree.map(lambda s, f: jnp.where(active, rho * s + (1 - rho) * f, s),
                         state.slow, fast)
    new_fast = jax.tree.map(lambda m, f: jnp.where(active, m, f), moved, fast)
    return state.replace(params=new_fast['params'], batch_stats=new_fast['batch_stats'],
                         slow=moved)

  def sync(self, state: TrainState) -> TrainState:
    started = state.step >= self.first_step
    pick = lambda s, f: jnp.where(started, s, f)
    return state.replace(params=jax.tree.map(pick, state.slow['params'], state.params),
                         batch_stats=jax.tree.map(pick, state.slow['batch_stats'],
                                                  state.batch_stats))


def create_lookahead(config, steps_per_epoch: int):
  """The Lookahead config.lookahead describes, or None."""
  la = config.get('lookahead')
  if la is None or not la.enabled:
    return None
  return Lookahead(start_step=la.start_epoch * steps_per_epoch,
                   total_steps=config.num_epochs * steps_per_epoch,
                   every=la.every, decay=la.decay, power=la.power)


# airbench's flip-and-translate test-time augmentation: the unshifted pair of views at
# weight 0.5, the pairs shifted one pixel up-left and one down-right at 0.25 each.
AIRBENCH_SHIFTS = ((-1, -1), (1, 1))
AIRBENCH_CENTER_WEIGHT = 0.5


def tta_options(config) -> dict:
  """tta_logits' keyword arguments from config.eval_tta, eval_tta_shifts and
  eval_tta_center_weight (the latter two absent from configs older than them: defaults)."""
  shifts = config.get('eval_tta_shifts', AIRBENCH_SHIFTS)
  return {'tta': config.eval_tta,
          'shifts': tuple((int(dy), int(dx)) for dy, dx in shifts),
          'center_weight': float(config.get('eval_tta_center_weight', AIRBENCH_CENTER_WEIGHT))}


def tta_logits(model: nn.Module, variables, images, tta: str = 'none',
               shifts: Sequence[tuple[int, int]] = AIRBENCH_SHIFTS,
               center_weight: float = AIRBENCH_CENTER_WEIGHT):
  """Eval-mode logits, averaged over test-time augmentations of NHWC `images`.

  none: the images. flip: the mean of the image and its mirror. flip_translate: the flip
  logits of the image at `center_weight`, plus the flip logits of each of `shifts`
  ((dy, dx): the content moved dy pixels down and dx right, borders reflected, as
  augment.shift) sharing the rest equally; the defaults are the airbench speed runs' six
  views.
  """
  forward = lambda x: model.apply(variables, x, train=False)
  mirror = lambda x: 0.5 * (forward(x) + forward(jnp.flip(x, axis=2)))
  if tta == 'none':
    return forward(images)
  if tta == 'flip':
    return mirror(images)
  if tta == 'flip_translate':
    weight = (1 - center_weight) / len(shifts)
    logits = center_weight * mirror(images)
    for dy, dx in shifts:
      logits = logits + weight * mirror(augment.shift(images, dy, dx))
    return logits
  raise ValueError(f'unknown test-time augmentation {tta!r}')


def tta_probabilities(model: nn.Module, variables, images, tta: str = 'none', **tta_kwargs):
  """Class probabilities of NHWC `images`: the softmax of tta_logits' logits (what an
  ensemble of runs averages)."""
  return jax.nn.softmax(tta_logits(model, variables, images, tta, **tta_kwargs), axis=-1)


def eval_step(state: TrainState, batch: dict, *, model: nn.Module, tta: str = 'none',
              probabilities: bool = False, **tta_kwargs) -> dict:
  """Metric sums on `batch` in eval mode; rows with mask 0 (padding) do not count.

  Logits are tta_logits' (`tta`, `tta_kwargs`: shifts, center_weight). Also returns
  the batch's confusion matrix (rows: true class, columns: predicted) and, with
  `probabilities`, every row's class probabilities (padding rows included).
  """
  logits = tta_logits(model, state.variables, batch['image'], tta, **tta_kwargs)
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


def device_batch(data: dict, indices, key, epoch, *, policy: str, mean, std) -> dict:
  """A training batch made on the device: gather rows of the uint8 dataset `data`,
  augment them with `policy` (jaxres.augment) from `key`, normalize with mean and std.

  If `data` holds per-image 'flip' bits, images are also mirrored by alternating flips
  (augment.alternating_hflip) for `epoch`.
  """
  images = augment.augment(key, data['image'][indices], policy)
  if 'flip' in data:
    images = augment.alternating_hflip(images, data['flip'][indices], epoch)
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  return {'image': (images - mean) / std, 'label': data['label'][indices]}


def train_steps_on_device(state: TrainState, data: dict, indices, epoch, *, model: nn.Module,
                          tx: optax.GradientTransformation, policy: str, mean, std,
                          label_smoothing: float = 0.0, lookahead=None,
                          frozen: Sequence[str] = ()):
  """len(indices) optimizer steps in one dispatch (lax.scan), batches made on the device.

  `indices` is (steps, batch) rows of `data`; step s augments with
  fold_in(state.rng, s), so the randomness is a pure function of (seed, step).
  Returns (state, metrics stacked over the steps).

  On the CPU the scan is unrolled: XLA's CPU backend ran the convolutions of a step
  inside a while loop many times slower than the same step outside one when we built
  this, while unrolled steps cost what separate steps do (`python -m tools.bench` times
  this function as "batch made on device"). On accelerators the loop stays rolled
  (compile time does not grow with it).
  """

  def one_step(state, rows):
    key = jax.random.fold_in(state.rng, state.step)
    batch = device_batch(data, rows, key, epoch, policy=policy, mean=mean, std=std)
    return train_step(state, batch, model=model, tx=tx, label_smoothing=label_smoothing,
                      lookahead=lookahead, frozen=frozen)

  return jax.lax.scan(one_step, state, indices, unroll=jax.default_backend() == 'cpu')
