"""Optimizers and learning-rate rules, as optax transforms.

- `create_optimizer`: the update direction (an `OPTIMIZERS` entry: adam, sgd) with
  PyTorch's coupled weight decay (decay added to the gradient first), wrapped in
  `optax.inject_hyperparams` so the learning rate lives in the optimizer state: visible,
  checkpointed, settable.
- `SCHEDULES`: the learning-rate rules config.schedule names (plateau, constant, triangle).
- `create_plateau`: optax's reduce_on_plateau configured to behave exactly like
  torch.optim.lr_scheduler.ReduceLROnPlateau stepped once per epoch.
- `orthogonalize`, `renormalize_kernels`: the two pieces Muon adds to Nesterov momentum
  for convolution kernels (config.muon; Jordan et al. 2024, as in airbench94_muon).
- `Lookahead`: the averaged slow copy of the weights (config.lookahead).
"""

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from optax import contrib

from jaxres.registry import Registry

# config.optimizer: name -> function of the config giving the update direction (before
# weight decay and learning rate).
OPTIMIZERS = Registry('optimizer', 'config.optimizer')


@OPTIMIZERS.register('adam')
def _adam(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)


@OPTIMIZERS.register('sgd')
def _sgd(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  if not config.momentum:
    return optax.identity()
  return optax.trace(decay=config.momentum, nesterov=config.nesterov)


def _direction(config: ml_collections.ConfigDict, *,
               weight_decay: float) -> optax.GradientTransformation:
  # torch.optim.{Adam,SGD}(weight_decay=wd) adds wd * param to the gradient (L2), before
  # the moments: not AdamW's decoupled decay.
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     OPTIMIZERS.get(config.optimizer)(config))


def param_labels(params, config: ml_collections.ConfigDict):
  """The optimizer group of every parameter, a pytree of strings like `params`.

  'frozen'    paths matching a regex of config.frozen: never updated;
  'frozen_after_I'  paths matching config.frozen_after[I][0]: updated until epoch
              config.frozen_after[I][1], then frozen; an optional third entry scales
              the learning rate (and divides the weight decay), as bias_lr_scale does;
  'muon'      convolution kernels (4-D) matching config.muon.params, when config.muon
              is enabled: Muon (`orthogonalize`, `renormalize_kernels`);
  'bias'      BatchNorm biases (a 'bias' in a module without a 'kernel'), when
              config.bias_lr_scale != 1: learning rate x bias_lr_scale, weight decay /
              bias_lr_scale (so the decay per step is unchanged);
  'default'   everything else.
  Paths are 'module/submodule/param', e.g. 'whiten/kernel', 'layer1_0/bn1/bias'.
  """
  frozen = [re.compile(p) for p in config.get('frozen', ())]
  frozen_after = [re.compile(entry[0]) for entry in config.get('frozen_after', ())]
  scale_biases = config.get('bias_lr_scale', 1.0) != 1.0
  muon = config.get('muon')
  muon_params = re.compile(muon.params) if muon is not None and muon.enabled else None

  def label(path, leaf):
    keys = path_keys(path)
    name = '/'.join(keys)
    if any(r.search(name) for r in frozen):
      return 'frozen'
    for i, r in enumerate(frozen_after):
      if r.search(name):
        return f'frozen_after_{i}'
    if muon_params is not None and jnp.ndim(leaf) == 4 and muon_params.search(name):
      return 'muon'
    if scale_biases and keys[-1] == 'bias' and 'kernel' not in _siblings(params, keys[:-1]):
      return 'bias'
    return 'default'

  return jax.tree_util.tree_map_with_path(label, params)


def path_keys(path) -> list[str]:
  """The keys of a pytree path (jax.tree_util), e.g. ['whiten', 'kernel']."""
  return [str(getattr(k, 'key', k)) for k in path]


def frozen_in_epoch(config: ml_collections.ConfigDict, epoch: int) -> tuple[str, ...]:
  """Regexes of the parameters no optimizer step of `epoch` (1-based) changes:
  config.frozen, and config.frozen_after entries whose epochs are over."""
  return tuple(config.get('frozen', ())) + tuple(
      entry[0] for entry in config.get('frozen_after', ()) if epoch > entry[1])


def hold_constant(params, patterns: Sequence[str]):
  """`params` with jax.lax.stop_gradient on every leaf whose path ('module/param')
  matches a regex of `patterns`: no gradient is computed through them, so the backward
  pass skips what only they need (the input gradient of the layer above a frozen
  first layer)."""
  if not patterns:
    return params
  regexes = [re.compile(p) for p in patterns]

  def hold(path, leaf):
    name = '/'.join(path_keys(path))
    return jax.lax.stop_gradient(leaf) if any(r.search(name) for r in regexes) else leaf

  return jax.tree_util.tree_map_with_path(hold, params)


def _siblings(params, module_path):
  node = params
  for key in module_path:
    node = node[key]
  return node


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A learning-rate rule config.schedule can name.

  `learning_rate(config, steps_per_epoch)` is the optimizer's learning rate: a float or
  an optax schedule of the step count. `steps_on_test_loss`: the trainer steps the
  plateau rule (`create_plateau`) on each epoch's test loss. `counts_from_num_epochs`:
  the rate at a step depends on config.num_epochs (a resumed run cannot change it).
  """

  learning_rate: Callable[[ml_collections.ConfigDict, int], Any]
  steps_on_test_loss: bool = False
  counts_from_num_epochs: bool = False


SCHEDULES = Registry('schedule', 'config.schedule')


def _constant(config: ml_collections.ConfigDict, steps_per_epoch: int) -> float:
  del steps_per_epoch
  return config.learning_rate


def _triangle(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """Linear from learning_rate x triangle.start at step 0 to learning_rate at
  triangle.peak of the run, then linear to learning_rate x triangle.end at the last step."""
  t = config.triangle
  total = config.num_epochs * steps_per_epoch
  peak = max(int(t.peak * total), 1)
  lr = config.learning_rate
  return optax.join_schedules(
      [optax.linear_schedule(lr * t.start, lr, peak),
       optax.linear_schedule(lr, lr * t.end, max(total - peak, 1))], [peak])


SCHEDULES.register('plateau', Schedule(_constant, steps_on_test_loss=True))
SCHEDULES.register('constant', Schedule(_constant))
SCHEDULES.register('triangle', Schedule(_triangle, counts_from_num_epochs=True))


def schedule(config: ml_collections.ConfigDict) -> Schedule:
  """The SCHEDULES entry config.schedule names."""
  return SCHEDULES.get(config.schedule)


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """config.learning_rate as its schedule (SCHEDULES) gives it: a constant (plateau,
  constant) or an optax schedule of the step count (triangle)."""
  return schedule(config).learning_rate(config, steps_per_epoch)


def create_optimizer(config: ml_collections.ConfigDict, learning_rate=None,
                     steps_per_epoch: int = 1):
  """optax transform for `config`; the learning rate is an injected hyperparameter.

  `learning_rate` may be a float or an optax schedule (a function of the step count);
  it defaults to `learning_rate_schedule(config, steps_per_epoch)`. Parameter groups
  (frozen, BatchNorm biases) follow `param_labels`.
  """
  lr = learning_rate_schedule(config, steps_per_epoch) if learning_rate is None else learning_rate
  direction = functools.partial(_direction, config)
  bias_scale = config.get('bias_lr_scale', 1.0)
  frozen_after = list(config.get('frozen_after', ()))
  muon = config.get('muon')

  def make(learning_rate):
    def scaled(scale):
      # The rate x scale and the decay coefficient / scale: the decay per step is unchanged.
      return optax.chain(direction(weight_decay=config.weight_decay / scale),
                         optax.scale_by_learning_rate(learning_rate * scale))

    groups = {'default': scaled(1.0), 'bias': scaled(bias_scale), 'frozen': optax.set_to_zero()}
    for i, (_, epochs, *scale) in enumerate(frozen_after):
      groups[f'frozen_after_{i}'] = optax.chain(scaled(scale[0] if scale else 1.0),
                                                _zero_from_step(epochs * steps_per_epoch))
    if muon is not None and muon.enabled:
      # The schedule's factor of config.learning_rate, applied to Muon's own rate.
      groups['muon'] = optax.chain(
          optax.trace(decay=muon.momentum, nesterov=muon.nesterov),
          orthogonalize(muon.ns_steps),
          optax.scale_by_learning_rate(learning_rate * (muon.learning_rate / config.learning_rate)),
          renormalize_kernels() if muon.renormalize else optax.identity())
    return optax.multi_transform(groups, lambda params: param_labels(params, config))

  return optax.inject_hyperparams(make)(learning_rate=lr)


def _zero_from_step(step: int) -> optax.GradientTransformation:
  """Pass updates through for the first `step` steps, then zero them (freeze)."""

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    keep = state.count < step
    updates = jax.tree.map(lambda u: jnp.where(keep, u, jnp.zeros_like(u)), updates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


# Newton-Schulz quintic coefficients of Muon (Jordan et al. 2024): steep at zero, so a few
# iterations take every singular value of the normalized matrix into roughly [0.7, 1.2].
NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(matrix: jax.Array, steps: int,
                  coeffs: tuple[float, float, float] = NEWTON_SCHULZ_COEFFS,
                  eps: float = 1e-7) -> jax.Array:
  """Approximately U V^T for the SVD U S V^T of a 2-D `matrix`, by `steps` iterations.

  X <- a X + (b A + c A A) X with A = X X^T, from X = matrix / |matrix|_F (so every
  singular value starts in (0, 1]); done on the wide orientation (rows <= columns),
  where A is the smaller product.
  """
  a, b, c = coeffs
  tall = matrix.shape[0] > matrix.shape[1]
  x = matrix.T if tall else matrix
  x = x / (jnp.linalg.norm(x) + eps)
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if tall else x


def orthogonalize(ns_steps: int = 5) -> optax.GradientTransformation:
  """Replace each convolution kernel's update by its nearest (semi-)orthogonal matrix.

  A kernel (kh, kw, in, out) is the matrix (kh kw in) x out, as PyTorch's Muon treats
  its (out, in kh kw) weight; the update becomes `newton_schulz` of it, which does not
  depend on the update's scale.
  """

  def update(updates, state, params=None):
    del params

    def one(u):
      return newton_schulz(u.reshape(-1, u.shape[-1]), ns_steps).reshape(u.shape)

    return jax.tree.map(one, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def renormalize_kernels() -> optax.GradientTransformation:
  """Rescale each kernel to Frobenius norm sqrt(out_channels) before the update lands.

  Adds params * (sqrt(out) / |params| - 1) to the update, so params + update is
  the rescaled kernel plus the original update, as airbench94_muon's Muon step does.
  Behind BatchNorm the scale of a kernel does not change the function; keeping it fixed
  keeps the effective step size of an orthogonalized update fixed as well.
  """

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('renormalize_kernels needs the parameters')

    def one(u, p):
      target = math.sqrt(p.shape[-1])
      return u + p * (target / jnp.linalg.norm(p) - 1)

    return jax.tree.map(one, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


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


@dataclasses.dataclass(frozen=True)
class Lookahead:
  """Lookahead with an averaged slow copy, as the airbench speed runs use it.

  Every `every` steps from `start_step` on, the slow copy of params and BatchNorm
  statistics moves towards the fast one, slow = rho * slow + (1 - rho) * fast, and the
  fast weights are reset to it. rho = decay**every * (step / total_steps)**power grows
  over training: move fast early, average strongly at the end. The first such step only
  takes the copy. `sync` (end of each epoch) resets the fast weights to the slow copy.
  Both take and return a train_state.TrainState.
  """

  start_step: int
  total_steps: int
  every: int = 5
  decay: float = 0.95
  power: float = 3.0

  @property
  def first_step(self) -> int:
    return -(-max(self.start_step, 1) // self.every) * self.every

  def update(self, state):
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

  def sync(self, state):
    started = state.step >= self.first_step
    pick = lambda s, f: jnp.where(started, s, f)
    return state.replace(params=jax.tree.map(pick, state.slow['params'], state.params),
                         batch_stats=jax.tree.map(pick, state.slow['batch_stats'],
                                                  state.batch_stats))


def create_lookahead(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """The Lookahead config.lookahead describes, or None."""
  la = config.get('lookahead')
  if la is None or not la.enabled:
    return None
  return Lookahead(start_step=la.start_epoch * steps_per_epoch,
                   total_steps=config.num_epochs * steps_per_epoch,
                   every=la.every, decay=la.decay, power=la.power)
