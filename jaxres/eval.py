"""Evaluate a checkpoint on the test split (or, for a run with data.holdout, its holdout).

    python -m jaxres.eval --workdir DIR [--step latest|best|N] [--json]
    python -m jaxres.eval --config experiments/base.py --torch-checkpoint model.pth [--json]
    python -m jaxres.eval --workdir DIR1 --workdir DIR2 [--json]

Reports test loss, test accuracy, per-class accuracy and the confusion matrix. With
--workdir repeated, it evaluates the ensemble of those runs, as jaxres.predict labels
with it: each run with its own normalization and test-time augmentation, the mean of
their class probabilities; it reports each run's loss and accuracy beside the
ensemble's (--json: the ensemble's report, the runs' under 'members'). The runs must
evaluate on the same images (not holdout runs beside test-set runs). The data
source is the run's (DIR/config.json), or --config's; --data_name / --data_root
override it (e.g. to evaluate on a local copy of CIFAR-10). A run trained with
data.holdout > 0 is evaluated on the same held-out training images, never on the test
set (as during training: the split for choices). --tta, --tta_shifts and
--tta_center_weight override the test-time augmentation (config.eval_tta*), e.g. to
compare view sets on a holdout run (for an ensemble, --step and every override apply to
each run):

    python -m jaxres.eval --workdir DIR --tta flip_translate --tta_shifts="-1,-1 1,1"
"""

import functools
import json

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from jaxres import checkpoints, cli, config_lib, evaluation, input_pipeline, models, parallel, steps
from jaxres.errors import UsageError
from jaxres.train_state import TrainState


def _torch_state(config, model, path: str, sharding):
  """(TrainState, label) of a PyTorch state_dict of the seed model that fits `model`.

  Only params and BatchNorm statistics are needed to evaluate; the step is the
  checkpoint's num_batches_tracked (the train steps it has seen).
  """
  from jaxres import torch_compat  # imports torch; only this path needs it
  state_dict = torch_compat.load_torch_checkpoint(path)
  variables = torch_compat.variables_from_torch(state_dict, model)
  state = TrainState(step=jax.numpy.asarray(torch_compat.batches_tracked(state_dict), jax.numpy.int32),
                     params=variables['params'], batch_stats=variables['batch_stats'],
                     opt_state=None, plateau=None, rng=None)
  return jax.device_put(state, sharding), path


def evaluation_data(config) -> tuple[input_pipeline.Split, str]:
  """(split, its name) that config evaluates on: the test set, or the holdout of a run
  with data.holdout."""
  train, test = input_pipeline.load(config.data, config.seed)
  _, split, split_name = input_pipeline.evaluation_split(config.data, train, test)
  return split, split_name


def run_eval(config, state, mesh, data=None, probabilities: bool = False) -> dict:
  """The evaluation report of `state` on config's evaluation split (the test set, or the
  holdout of a run with data.holdout, whose report says so in 'eval_split', as
  metrics.jsonl does: its test_* figures are the holdout's).

  `data` is evaluation_data(config) when already loaded. With `probabilities` the report
  also holds 'probabilities', every image's class probabilities (numpy, split order).
  """
  split, split_name = data or evaluation_data(config)
  model = models.create_model(config, mesh.devices.size)
  loader = input_pipeline.eval_loader(split, config, jax.process_index(), jax.process_count(),
                                      mesh.devices.size)
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=model, probabilities=probabilities,
                                      **evaluation.tta_options(config)))
  sums = evaluation.evaluate(eval_fn, state, loader.epoch(0), parallel.data_sharding(mesh))
  result = evaluation.report(sums, split.classes)
  if split_name != 'test':
    result['eval_split'] = split_name
  if probabilities:
    result['probabilities'] = sums[evaluation.PER_EXAMPLE]
  return result


def _same_split(a: tuple, b: tuple) -> bool:
  (split_a, name_a), (split_b, name_b) = a, b
  return (name_a == name_b and np.array_equal(split_a.labels, split_b.labels)
          and np.array_equal(split_a.images, split_b.images))


def run_ensemble(members, mesh) -> dict:
  """The evaluation report of an ensemble, its members' under 'members'.

  `members` are (workdir, config, state, step); each is evaluated as run_eval does (its
  own normalization and test-time augmentation), and the ensemble predicts the mean of
  their class probabilities. Every member must evaluate on the same images and labels
  (UsageError otherwise: e.g. a holdout run beside a test-set run).
  """
  first, reports, probabilities = None, [], []
  for workdir, config, state, step in members:
    data = evaluation_data(config)
    if first is None:
      first = (workdir, data)
    elif not _same_split(first[1], data):
      mine, theirs = (f'{len(d[0])} {d[1]} images' for d in (data, first[1]))
      detail = f'{mine} against {theirs}' if mine != theirs else f'{mine} of other data'
      raise UsageError(f'{workdir} evaluates on other images than {first[0]} ({detail}): '
                       f'the runs of an ensemble must evaluate on the same split')
    result = run_eval(config, state, mesh, data, probabilities=True)
    probabilities.append(result.pop('probabilities'))
    reports.append({'workdir': workdir, 'checkpoint': step, **result})
  split, split_name = first[1]
  mean = evaluation.average_probabilities(probabilities, [r['workdir'] for r in reports])
  result = evaluation.report(evaluation.probability_sums(mean, split.labels), split.classes)
  if split_name != 'test':
    result['eval_split'] = split_name
  result['members'] = reports
  return result


def parse_shifts(text: str) -> tuple[tuple[int, int], ...]:
  """'dy,dx dy,dx ...' -> ((dy, dx), ...), for --tta_shifts."""
  try:
    shifts = tuple(tuple(int(v) for v in pair.split(',')) for pair in text.split())
  except ValueError:
    shifts = ()
  if not shifts or any(len(s) != 2 for s in shifts):
    raise UsageError(f'--tta_shifts must be pairs "dy,dx" separated by spaces, got {text!r}')
  return shifts


def apply_overrides(config, data_name=None, data_root=None, tta=None, shifts=None,
                    center_weight=None):
  """Set the fields the command line overrides (None: keep the run's), then check the
  test-time augmentation."""
  with config.unlocked():
    if data_name:
      config.data.name = data_name
    if data_root:
      config.data.root = data_root
    if tta:
      config.eval_tta = tta
    if shifts:
      config.eval_tta_shifts = parse_shifts(shifts)
    if center_weight is not None:
      config.eval_tta_center_weight = center_weight
  config_lib.validate_tta(config)
  return config


def command():
  """The command-line entry point: defines the flags (only then, so that importing this
  module as a library defines none) and returns main(argv)."""
  workdir_flag = flags.DEFINE_multi_string(
      'workdir', None, 'A jaxres run directory; repeat it to evaluate an ensemble of runs.')
  step_flag = flags.DEFINE_string('step', 'latest',
                                  'Checkpoint to evaluate: latest, best or a step (of every run).')
  config_flag = config_flags.DEFINE_config_file('config', None,
                                                'Config file (with --torch-checkpoint).')
  torch_flag = flags.DEFINE_string('torch-checkpoint', None,
                                   'A PyTorch state_dict (.pth) of the seed model to evaluate.')
  json_flag = flags.DEFINE_bool('json', False, 'Print one JSON object instead of tables.')
  data_name_flag = flags.DEFINE_string('data_name', None, 'Override data.name (of every run).')
  data_root_flag = flags.DEFINE_string('data_root', None, 'Override data.root (of every run).')
  tta_flag = flags.DEFINE_enum('tta', None, list(evaluation.TTA_MODES),
                               'Override config.eval_tta (of every run).')
  shifts_flag = flags.DEFINE_string('tta_shifts', None,
                                    'Override config.eval_tta_shifts: "dy,dx dy,dx ...".')
  center_flag = flags.DEFINE_float('tta_center_weight', None,
                                   'Override config.eval_tta_center_weight.')

  def main(argv):
    if len(argv) > 1:
      raise UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    workdirs = workdir_flag.value or []
    overrides = functools.partial(apply_overrides, data_name=data_name_flag.value,
                                  data_root=data_root_flag.value, tta=tta_flag.value,
                                  shifts=shifts_flag.value, center_weight=center_flag.value)
    mesh = parallel.make_mesh()
    if torch_flag.value:
      if workdirs:
        raise UsageError('give --workdir DIR (one or more) or --torch-checkpoint FILE, not both')
      if cli.config_value(config_flag) is None:
        raise UsageError('--torch-checkpoint needs --config (e.g. experiments/base.py)')
      config = overrides(cli.config_value(config_flag).copy_and_resolve_references())
      model = models.create_model(config)
      state, step = _torch_state(config, model, torch_flag.value, parallel.replicated(mesh))
    elif len(workdirs) == 1:
      config, _, state, step = checkpoints.load_run(workdirs[0], step_flag.value, mesh)
      config = overrides(config)
    elif workdirs:
      members = []
      for workdir in workdirs:
        config, _, state, step = checkpoints.load_run(workdir, step_flag.value, mesh)
        members.append((workdir, overrides(config), state, step))
      result = run_ensemble(members, mesh)
      if parallel.is_main_process():
        print(json.dumps(result) if json_flag.value else evaluation.format_ensemble(result))
      return
    else:
      raise UsageError('give --workdir DIR (repeated for an ensemble), or --config FILE with '
                       '--torch-checkpoint FILE')
    result = run_eval(config, state, mesh)
    result['checkpoint'] = step
    if parallel.is_main_process():
      if json_flag.value:
        print(json.dumps(result))
      else:
        print(f'checkpoint {step}')
        print(evaluation.format_report(result))

  return main


if __name__ == '__main__':
  cli.run(command())
