"""jaxres next to the seed's PyTorch code: the same training, step by step; a checkpoint; a
run's curve; or several seeds of each, trained to the end.

    python -m tools.compare_torch --steps 20 [--config experiments/base.py] [--config.FIELD=...]
    python -m tools.compare_torch --torch_checkpoint model.pth [--config experiments/base.py]
    python -m tools.compare_torch --metrics runs/base/metrics.jsonl
    python -m tools.compare_torch --train --seeds 3 --train_images N --test_images M --out DIR
        [--epochs E] [--config experiments/base.py] [--config.FIELD=...]

--steps N: builds jaxres's initial weights for the config (its seed), loads them into the
PyTorch reference (jaxres/torch_reference.py) with load_state_dict(strict=True), then trains
both on CPU on the same N batches of the config's training data (the jaxres loader's
batches, augmentation included, fed to both). Prints both loss curves, the relative
difference at each step, and the final difference of every parameter and BatchNorm
statistic. Exits 1 when a step's loss differs by more than --rtol (relative).
--float64_reference also runs PyTorch in float64: Adam magnifies float32 rounding in the
coordinates whose gradients are tiny, so two float32 runs drift apart in the parameters
even when each step is right; the distance of each float32 run to the float64 one says
how much drift rounding alone causes.

--torch_checkpoint FILE.pth: evaluates a PyTorch state_dict of the seed's model on the
config's test split twice, with the seed's PyTorch test loop and with jaxres (converted by
jaxres.torch_compat), and prints both losses and accuracies and how many predictions differ.

--metrics FILE: prints a jaxres run's per-epoch numbers next to the seed's published ones
(epochs 29, 30 and 40 of its notebook's log).

--train: trains the config to its end, --seeds runs in PyTorch with the seed's own loop and
--seeds runs in jaxres, on the same class-balanced subset of the data, into --out (resumable),
and reports the per-epoch spread, the final test accuracies, Welch's 95 % interval of their
difference and a verdict (tools.compare_seeds).
"""

import copy
import dataclasses
import functools
import os
import time
from typing import Iterable, Iterator, Optional

from absl import flags
import jax
import numpy as np
from ml_collections import config_flags
import torch

from jaxres import cli, config_lib, input_pipeline, models, optim, reporting, runtime, steps
from jaxres import torch_compat, torch_reference, train_state
from jaxres.errors import UsageError

DEFAULT_STEPS = 20
# With --float64_reference: how much farther from float64 than PyTorch float32 jaxres may
# end and still count as float32 rounding (two float32 runs are about equally far).
ROUNDING_FACTOR = 1.5
FLOAT32_RTOL = 1e-6  # values equal up to float32 rounding
METRIC_COLUMNS = (('train_loss', 'train loss'), ('train_accuracy', 'train acc'),
                  ('test_loss', 'test loss'), ('test_accuracy', 'test acc'))


# ---------------------------------------------------------------------------- the reference

def torch_model(config, variables) -> torch_reference.ModifiedResNet:
  """The PyTorch reference for config.model, holding `variables` (strict load)."""
  m = config.model
  model = torch_reference.ModifiedResNet(num_blocks=tuple(m.blocks), widths=tuple(m.widths),
                                         num_classes=m.num_classes)
  model.load_state_dict(torch_compat.torch_state_dict(variables), strict=True)
  return model


def check_mirrored(config) -> None:
  """UsageError naming the first config field whose recipe the PyTorch side does not mirror.

  The reference is the seed's: ModifiedResNet, Adam or SGD on every parameter alike, a
  learning rate that is constant within the compared steps (the plateau rule only acts
  between epochs), no lookahead, no Muon.
  """
  if config.model.name != 'resnet':
    raise UsageError(f'config.model.name={config.model.name!r}: the PyTorch reference is the '
                     f'seed\'s ModifiedResNet (model.name=resnet)')
  if config.schedule not in ('plateau', 'constant'):
    raise UsageError(f'config.schedule={config.schedule!r}: the PyTorch reference trains at a '
                     f'constant learning rate (schedule plateau or constant)')
  for field, neutral in (('bias_lr_scale', 1.0), ('frozen', ()), ('frozen_after', ())):
    value = config.get(field, neutral)
    if (tuple(value) if isinstance(value, (list, tuple)) else value) != neutral:
      raise UsageError(f'config.{field}={value!r}: the PyTorch reference trains every '
                       f'parameter alike (set it to {neutral!r})')
  if config.get('lookahead') is not None and config.lookahead.get('enabled', False):
    raise UsageError('config.lookahead.enabled=True: the PyTorch reference has no lookahead')
  if config.get('muon') is not None and config.muon.get('enabled', False):
    raise UsageError('config.muon.enabled=True: the PyTorch reference has no Muon')


def torch_optimizer(config, model) -> torch.optim.Optimizer:
  """The torch optimizer that config.optimizer stands for (coupled weight decay)."""
  if config.optimizer == 'adam':
    return torch_reference.seed_optimizer(model, lr=config.learning_rate,
                                          weight_decay=config.weight_decay,
                                          betas=(config.adam_b1, config.adam_b2),
                                          eps=config.adam_eps)
  if config.optimizer == 'sgd':
    return torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum,
                           nesterov=config.nesterov, weight_decay=config.weight_decay)
  raise UsageError(f'config.optimizer={config.optimizer!r} has no PyTorch counterpart here')


# ---------------------------------------------------------------------------- side by side

@dataclasses.dataclass
class Step:
  """One step: the losses (before the update) and the models after it.

  `reference64` / `float64_loss`: the same PyTorch code in float64 (when asked for), the
  yardstick for how far float32 rounding alone moves a run.
  """

  step: int
  torch_loss: float
  jax_loss: float
  state: train_state.TrainState
  reference: torch.nn.Module
  float64_loss: Optional[float] = None
  reference64: Optional[torch.nn.Module] = None

  @property
  def relative_difference(self) -> float:
    return relative_difference(self.jax_loss, self.torch_loss)

  def state_dicts(self) -> dict:
    """{'jaxres', 'torch'[, 'torch_float64']}: state_dicts of the models, as copies."""
    result = {'jaxres': torch_compat.torch_state_dict(
                  self.state.variables, num_batches_tracked=int(jax.device_get(self.state.step))),
              'torch': _copy(self.reference.state_dict())}
    if self.reference64 is not None:
      result['torch_float64'] = _copy(self.reference64.state_dict())
    return result


@dataclasses.dataclass
class Comparison:
  """What `run_comparison` saw: per-step losses and state_dicts at chosen steps."""

  losses: list  # (step, torch loss, jaxres loss, torch float64 loss or None)
  snapshots: dict  # step -> Step.state_dicts() after that step
  ok: bool


def _copy(state_dict) -> dict:
  return {k: v.detach().clone() for k, v in state_dict.items()}


def relative_difference(value: float, reference: float) -> float:
  return abs(value - reference) / max(abs(reference), np.finfo(np.float32).tiny)


def initial_state(config) -> train_state.TrainState:
  """jaxres's initial TrainState for `config` (its seed), as the trainer builds it."""
  model = models.create_model(config)
  return jax.jit(functools.partial(train_state.create, config, model,
                                   optim.create_optimizer(config)))()


def side_by_side(config, batches: Iterable[dict], state=None,
                 float64: bool = False) -> Iterator[Step]:
  """Train jaxres and the PyTorch reference from the same weights on the same batches.

  Both start from `state` (default: `initial_state(config)`), loaded into PyTorch with
  load_state_dict(strict=True). jaxres runs its jitted `steps.train_step`; PyTorch the
  seed's loop (`torch_reference.train_step`), in float32 and, with `float64`, also in
  float64. Yields a `Step` after each batch.
  """
  model = models.create_model(config)
  tx = optim.create_optimizer(config)
  state = initial_state(config) if state is None else state
  if int(jax.device_get(state.step)) != 0:
    raise ValueError('side_by_side starts from a fresh TrainState (step 0): only the weights '
                     'carry over to PyTorch, not the optimizer\'s moments')
  # The state holds its own learning rate (optax.inject_hyperparams); PyTorch gets config's.
  state_lr = float(jax.device_get(optim.learning_rate(state.opt_state)))
  if not np.isclose(state_lr, config.learning_rate, rtol=FLOAT32_RTOL, atol=0.0):
    raise ValueError(f'the state\'s learning rate {state_lr:g} is not config.learning_rate '
                     f'{config.learning_rate:g}')
  reference = torch_model(config, state.variables)
  torch_opt = torch_optimizer(config, reference)
  reference64 = copy.deepcopy(reference).double() if float64 else None
  torch_opt64 = torch_optimizer(config, reference64) if float64 else None
  train_fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                       label_smoothing=config.label_smoothing))
  for i, batch in enumerate(batches, start=1):
    images, labels = batch['image'], batch['label']
    torch_loss = torch_reference.train_step(reference, torch_opt, images, labels,
                                            config.label_smoothing)
    loss64 = (torch_reference.train_step(reference64, torch_opt64, images, labels,
                                         config.label_smoothing) if float64 else None)
    state, metrics = train_fn(state, {'image': images, 'label': labels})
    metrics = jax.device_get(metrics)
    yield Step(i, torch_loss, float(metrics['loss_sum'] / metrics['count']), state, reference,
               loss64, reference64)


def is_parameter(key: str) -> bool:
  """Whether a state_dict key is a trained parameter (not a BatchNorm buffer)."""
  return not key.rsplit('.', 1)[-1].startswith(('running_', torch_compat.NUM_BATCHES_TRACKED))


def differences(ours: dict, theirs: dict) -> dict:
  """{key: (relative L2 difference, max absolute difference)} of two state_dicts."""
  result = {}
  for key, value in theirs.items():
    a, b = ours[key].double(), value.double()
    norm = float(torch.linalg.vector_norm(b))
    diff = float(torch.linalg.vector_norm(a - b))
    result[key] = (diff / norm if norm else diff, float((a - b).abs().max()) if a.numel() else 0.0)
  return result


def total_difference(ours: dict, theirs: dict, keys) -> float:
  """Relative L2 difference of the tensors `keys` of two state_dicts, taken together."""
  diff = sum(float(torch.sum((ours[k].double() - theirs[k].double()) ** 2)) for k in keys)
  norm = sum(float(torch.sum(theirs[k].double() ** 2)) for k in keys)
  return (diff / norm) ** 0.5 if norm else diff ** 0.5


def training_batches(config, num_steps: int) -> Iterator[dict]:
  """The first `num_steps` training batches the jaxres trainer would see for `config`."""
  train, _ = input_pipeline.load(config.data, config.seed)
  loader = input_pipeline.train_loader(train, config)
  taken, epoch = 0, 1
  while taken < num_steps:
    for batch in loader.epoch(epoch):
      yield batch
      taken += 1
      if taken == num_steps:
        return
    epoch += 1


def _platform() -> str:
  """The platform jax computes on here (jax.default_device included)."""
  return next(iter(jax.numpy.zeros(()).devices())).platform


def _worst(diffs: dict, keys) -> tuple:
  key = max(keys, key=lambda k: diffs[k][0])
  return key, diffs[key][0], max(diffs[k][1] for k in keys)


def run_comparison(config, batches: Iterable[dict], *, rtol: float, log=print, state=None,
                   snapshot_steps=(), float64: bool = False) -> Comparison:
  """Train both side by side on `batches`, printing the comparison through `log`.

  Parity holds (`ok`) when every step's loss agrees within `rtol` (relative), or, with
  `float64`, when the difference is float32 rounding: jaxres's parameters end no farther
  (up to ROUNDING_FACTOR) from PyTorch float64's than PyTorch float32's do. State_dicts are
  kept after each step in `snapshot_steps` and after the last.
  """
  config_lib.validate(config)
  check_mirrored(config)
  m = config.model
  num_params, _ = config_lib.param_count(config)
  log(f'compare_torch: ModifiedResNet(widths={tuple(m.widths)}, blocks={tuple(m.blocks)}, '
      f'num_classes={m.num_classes}), {num_params:,} parameters; {config.optimizer} '
      f'lr={config.learning_rate:g} weight_decay={config.weight_decay:g}; batches of '
      f'{config.batch_size} from {config.data.name} (augment {config.data.augment}); '
      f'{_platform().upper()}, float32, torch {torch.__version__}, jax {jax.__version__}')
  header = f'{"step":>4}  {"torch loss":>12}  {"jaxres loss":>12}  {"rel diff":>9}'
  if float64:
    header += f'  {"torch f64 loss":>14}  {"torch vs f64":>12}  {"jaxres vs f64":>13}'
  log(header)
  t0 = time.perf_counter()
  losses, snapshots, last = [], {}, None
  for last in side_by_side(config, batches, state, float64):
    losses.append((last.step, last.torch_loss, last.jax_loss, last.float64_loss))
    row = (f'{last.step:>4}  {last.torch_loss:>12.7f}  {last.jax_loss:>12.7f}  '
           f'{last.relative_difference:>9.2e}')
    if float64:
      row += (f'  {last.float64_loss:>14.7f}  '
              f'{relative_difference(last.torch_loss, last.float64_loss):>12.2e}  '
              f'{relative_difference(last.jax_loss, last.float64_loss):>13.2e}')
    log(row)
    if last.step in snapshot_steps:
      snapshots[last.step] = last.state_dicts()
  if last is None:
    raise UsageError('no training batches: the data is empty')
  snapshots[last.step] = final = last.state_dicts()
  step, torch_loss, jax_loss, _ = max(losses, key=lambda r: relative_difference(r[2], r[1]))
  worst = relative_difference(jax_loss, torch_loss)
  log(f'max relative loss difference: {worst:.2e} at step {step} (tolerance {rtol:g})')
  diffs = differences(final['jaxres'], final['torch'])
  params = [k for k in diffs if is_parameter(k)]
  stats = [k for k in diffs if k.rsplit('.', 1)[-1].startswith('running_')]
  key, rel, absolute = _worst(diffs, params)
  log(f'final parameters: relative L2 difference '
      f'{total_difference(final["jaxres"], final["torch"], params):.2e} over all, at most '
      f'{rel:.2e} in one tensor ({key}); max absolute difference {absolute:.2e}')
  key, rel, absolute = _worst(diffs, stats)
  log(f'final BatchNorm running statistics: at most {rel:.2e} relative in one tensor ({key}); '
      f'max absolute difference {absolute:.2e}')
  ok, lines = verdict(losses, final, rtol)
  for line in lines[:-1]:
    log(line)
  log(f'{lines[-1]} ({time.perf_counter() - t0:.0f} s)')
  return Comparison(losses, snapshots, ok)


def verdict(losses: list, final: dict, rtol: float) -> tuple:
  """(parity holds, lines saying why) from a run's losses and final state_dicts.

  Parity holds when every step's loss agrees within `rtol`, or, when a PyTorch float64
  run is at hand (`final['torch_float64']`), when jaxres's parameters end no farther from
  it than ROUNDING_FACTOR times PyTorch float32's: then the difference is float32
  rounding, amplified by training.
  """
  worst = max(relative_difference(r[2], r[1]) for r in losses)
  if worst <= rtol:
    return True, [f'parity OK: every step\'s loss within {rtol:g}']
  if 'torch_float64' not in final:
    return False, [f'parity NOT SHOWN: the losses differ by more than {rtol:g}; rerun with '
                   f'--float64_reference to measure how far float32 rounding alone moves PyTorch']
  params = [k for k in final['torch'] if is_parameter(k)]
  rounding = max(relative_difference(r[1], r[3]) for r in losses)
  ours = total_difference(final['jaxres'], final['torch_float64'], params)
  theirs = total_difference(final['torch'], final['torch_float64'], params)
  lines = [f'PyTorch float32 vs float64: losses differ by up to {rounding:.2e}; final parameters, '
           f'relative L2 distance to float64: jaxres {ours:.2e}, PyTorch float32 {theirs:.2e}']
  if ours <= ROUNDING_FACTOR * theirs:
    return True, lines + ['parity OK (float32 rounding): jaxres is no farther from PyTorch '
                          'float64 than PyTorch float32 is']
  return False, lines + [f'parity FAILED: jaxres is farther from PyTorch float64 than '
                         f'{ROUNDING_FACTOR:g} x PyTorch float32']


# ---------------------------------------------------------------------------- a checkpoint

def evaluate_checkpoint(config, state_dict, log=print) -> dict:
  """A seed state_dict on config's test split: PyTorch's test loop and jaxres, side by side.

  PyTorch loads `state_dict` itself (strict); jaxres converts it with
  `torch_compat.variables_from_torch`. Both see the same normalized test images.
  """
  check_mirrored(config)
  _, test = input_pipeline.load(config.data, config.seed)
  images = input_pipeline.normalize(test.images, config.data.mean, config.data.std)
  labels = test.labels
  m = config.model
  reference = torch_reference.ModifiedResNet(tuple(m.blocks), tuple(m.widths), m.num_classes)
  model = models.create_model(config)
  variables = torch_compat.variables_from_torch(state_dict, model)  # checks every key first
  reference.load_state_dict(state_dict, strict=True)
  torch_logits = torch_reference.predict(reference, images, config.eval_batch_size).numpy()
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  size = config.eval_batch_size
  jax_logits = np.concatenate([np.asarray(apply(variables, images[i:i + size]))
                               for i in range(0, len(images), size)])
  result = {'num_examples': len(labels),
            'differing_predictions': int(np.sum(jax_logits.argmax(1) != torch_logits.argmax(1))),
            'max_logit_difference': float(np.max(np.abs(jax_logits - torch_logits)))}
  for name, logits in (('torch', torch_logits), ('jaxres', jax_logits)):
    result[name] = {
        'test_loss': float(np.mean(np.asarray(steps.cross_entropy(logits, labels)), dtype=np.float64)),
        'test_accuracy': float(np.mean(logits.argmax(1) == labels))}
  log(f'{"":8}  {"test loss":>9}  {"test acc":>8}   ({len(labels)} test images from '
      f'{config.data.name}, checkpoint trained {torch_compat.batches_tracked(state_dict)} steps)')
  for name, label in (('torch', 'PyTorch'), ('jaxres', 'jaxres')):
    log(f'{label:8}  {result[name]["test_loss"]:>9.4f}  {result[name]["test_accuracy"]:>8.4f}')
  log(f'predictions that differ: {result["differing_predictions"]} of {len(labels)}; '
      f'max |logit difference| {result["max_logit_difference"]:.2e}')
  return result


# ---------------------------------------------------------------------------- a run's curve

def read_metrics(path: str) -> list:
  """The epoch records of a jaxres metrics.jsonl."""
  if not os.path.isfile(path):
    raise UsageError(f'{path} does not exist (a jaxres workdir holds metrics.jsonl)')
  records = reporting.read_jsonl(path)
  for number, record in enumerate(records, start=1):
    if not isinstance(record, dict) or 'epoch' not in record:
      raise UsageError(f'{path}, record {number}: no "epoch" field')
  if not records:
    raise UsageError(f'{path} holds no epochs')
  return records


def _cell(value, digits=4) -> str:
  return '' if value is None else f'{value:.{digits}f}'


def metrics_table(records: list, published=None) -> str:
  """A run's per-epoch numbers beside the seed's published ones, and their differences."""
  published = torch_reference.PUBLISHED if published is None else published
  header = f'{"epoch":>5}' + ''.join(f'  {name + " jaxres":>16} {"seed":>6}'
                                     for _, name in METRIC_COLUMNS) + f'  {"lr":>8}'
  lines = [header]
  for r in records:
    seed = published.get(r['epoch'], {})
    cells = ''.join(f'  {_cell(r.get(k)):>16} {_cell(seed.get(k)):>6}' for k, _ in METRIC_COLUMNS)
    lr = r.get('learning_rate')
    lines.append(f'{r["epoch"]:>5}{cells}  {"" if lr is None else f"{lr:.1e}":>8}')
  by_epoch = {r['epoch']: r for r in records}
  compared = [e for e in sorted(published) if e in by_epoch]
  lines.append('')
  for epoch in compared:
    for key, name in METRIC_COLUMNS:
      if key in published[epoch] and by_epoch[epoch].get(key) is not None:
        ours, seed = by_epoch[epoch][key], published[epoch][key]
        lines.append(f'epoch {epoch} {name}: jaxres {ours:.4f}, seed {seed:.4f} '
                     f'({ours - seed:+.4f})')
  if not compared:
    lines.append(f'the run has epochs {records[0]["epoch"]}-{records[-1]["epoch"]}; the seed '
                 f'published epochs {", ".join(map(str, sorted(published)))} only')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------- command

# --train's integer flags: (name, default, help).
TRAIN_NUMBERS = (
    ('seeds', 3, 'runs per framework (seeds config.seed, config.seed + 1, ...)'),
    ('epochs', None, 'epochs (default config.num_epochs)'),
    ('train_images', None, 'a class-balanced subset of this many training images (0: all)'),
    ('test_images', None, 'a class-balanced subset of this many test images (0: all)'),
    ('torch_threads', None, 'PyTorch\'s intra-op threads (default: one per CPU core; 1 on a '
     'CPU that other work keeps busy, where more threads wait on each other)'))


def command():
  """The command-line entry point: defines its flags (only then, so that importing this
  module as a library defines none) and returns main(argv)."""
  config_flag = config_flags.DEFINE_config_file(
      'config', 'experiments/base.py', 'Config file (get_config()); fields overridable.')
  steps_flag = flags.DEFINE_integer('steps', None, 'Train both side by side for this many steps '
                                    f'(default {DEFAULT_STEPS} unless --metrics or '
                                    '--torch_checkpoint is given).')
  rtol_flag = flags.DEFINE_float('rtol', 1e-3, 'Largest relative loss difference per step that '
                                 'counts as parity.')
  float64_flag = flags.DEFINE_bool('float64_reference', False, 'Also run PyTorch in float64: '
                                   'the yardstick for float32 rounding.')
  checkpoint_flag = flags.DEFINE_string('torch_checkpoint', None, 'A PyTorch state_dict (.pth) '
                                        'of the seed model to evaluate in PyTorch and in jaxres.')
  metrics_flag = flags.DEFINE_string('metrics', None, 'A jaxres run\'s metrics.jsonl to set '
                                     'beside the seed\'s published numbers.')
  train_flag = flags.DEFINE_bool('train', False, 'Train the config to its end, --seeds runs '
                                 'each in PyTorch (the seed\'s loop) and in jaxres, into --out, '
                                 'and compare them (tools.compare_seeds).')
  out_flag = flags.DEFINE_string('out', None, '--train: the directory of the runs and the '
                                 'report; rerunning resumes.')
  numbers = {name: flags.DEFINE_integer(name, default, f'--train: {text}.')
             for name, default, text in TRAIN_NUMBERS}

  def train_main(config):
    if steps_flag.value is not None or metrics_flag.value or checkpoint_flag.value:
      raise UsageError('--train runs alone (without --steps, --metrics or --torch_checkpoint)')
    if not out_flag.value:
      raise UsageError('--train needs --out DIR (where the runs and the report go)')
    values = {name: flag.value for name, flag in numbers.items()}
    if values['torch_threads'] is None:
      values['torch_threads'] = os.cpu_count()
    for name in ('seeds', 'torch_threads'):
      if values[name] < 1:
        raise UsageError(f'--{name} must be positive, got {values[name]}')
    from . import compare_seeds  # imports this module
    config = compare_seeds.comparison_config(config, values['epochs'], values['train_images'],
                                             values['test_images'])
    runtime.start(config)  # as jaxres.train starts: validation, allocator, JAX options
    torch.set_num_threads(values['torch_threads'])
    summary = compare_seeds.run_all(config, out_flag.value, values['seeds'])
    print(compare_seeds.markdown(summary), end='')
    return 0

  def main(argv):
    if len(argv) > 1:
      raise UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    if train_flag.value:
      return train_main(cli.config_value(config_flag))
    if metrics_flag.value:
      print(metrics_table(read_metrics(metrics_flag.value)))
    config = cli.config_value(config_flag).copy_and_resolve_references()
    if checkpoint_flag.value:
      state_dict = torch_compat.load_torch_checkpoint(checkpoint_flag.value)
      with jax.default_device(jax.devices('cpu')[0]):
        evaluate_checkpoint(config, state_dict)
    if steps_flag.value is None and (metrics_flag.value or checkpoint_flag.value):
      return 0
    num_steps = DEFAULT_STEPS if steps_flag.value is None else steps_flag.value
    if num_steps <= 0:
      raise UsageError(f'--steps must be positive, got {num_steps}')
    with jax.default_device(jax.devices('cpu')[0]):
      result = run_comparison(config, training_batches(config, num_steps), rtol=rtol_flag.value,
                              float64=float64_flag.value)
    return 0 if result.ok else 1

  return main


if __name__ == '__main__':
  cli.run(command())
