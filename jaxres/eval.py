"""Evaluate a checkpoint on the test split (or, for a run with data.holdout, its holdout).

    python -m jaxres.eval --workdir DIR [--step latest|best|N] [--json]
    python -m jaxres.eval --config experiments/base.py --torch-checkpoint model.pth [--json]

Reports test loss, test accuracy, per-class accuracy and the confusion matrix. The data
source is the run's (DIR/config.json), or --config's; --data_name / --data_root
override it (e.g. to evaluate on a local copy of CIFAR-10). A run trained with
data.holdout > 0 is evaluated on the same held-out training images, never on the test
set (as during training: the split for choices). --tta, --tta_shifts and
--tta_center_weight override the test-time augmentation (config.eval_tta*), e.g. to
compare view sets on a holdout run:

    python -m jaxres.eval --workdir DIR --tta flip_translate --tta_shifts="-1,-1 1,1"
"""

import functools
import json

from absl import flags
import jax
from ml_collections import config_flags

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


def run_eval(config, state, mesh) -> dict:
  """The evaluation report of `state` on config's evaluation split (the test set, or the
  holdout of a run with data.holdout, whose report says so in 'eval_split', as
  metrics.jsonl does: its test_* figures are the holdout's)."""
  train, test = input_pipeline.load(config.data, config.seed)
  _, split, split_name = input_pipeline.evaluation_split(config.data, train, test)
  model = models.create_model(config, mesh.devices.size)
  loader = input_pipeline.eval_loader(split, config, jax.process_index(), jax.process_count(),
                                      mesh.devices.size)
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=model, **steps.tta_options(config)))
  sums = evaluation.evaluate(eval_fn, state, loader, parallel.data_sharding(mesh))
  result = evaluation.report(sums, split.classes)
  if split_name != 'test':
    result['eval_split'] = split_name
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


def command():
  """The command-line entry point: defines the flags (only then, so that importing this
  module as a library defines none) and returns main(argv)."""
  workdir_flag = flags.DEFINE_string('workdir', None, 'A jaxres run directory.')
  step_flag = flags.DEFINE_string('step', 'latest',
                                  'Checkpoint to evaluate: latest, best or a step.')
  config_flag = config_flags.DEFINE_config_file('config', None,
                                                'Config file (with --torch-checkpoint).')
  torch_flag = flags.DEFINE_string('torch-checkpoint', None,
                                   'A PyTorch state_dict (.pth) of the seed model to evaluate.')
  json_flag = flags.DEFINE_bool('json', False, 'Print one JSON object instead of tables.')
  data_name_flag = flags.DEFINE_string('data_name', None, 'Override data.name.')
  data_root_flag = flags.DEFINE_string('data_root', None, 'Override data.root.')
  tta_flag = flags.DEFINE_enum('tta', None, ['none', 'flip', 'flip_translate'],
                               'Override config.eval_tta.')
  shifts_flag = flags.DEFINE_string('tta_shifts', None,
                                    'Override config.eval_tta_shifts: "dy,dx dy,dx ...".')
  center_flag = flags.DEFINE_float('tta_center_weight', None,
                                   'Override config.eval_tta_center_weight.')

  def main(argv):
    if len(argv) > 1:
      raise UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    mesh = parallel.make_mesh()
    if torch_flag.value:
      if cli.config_value(config_flag) is None:
        raise UsageError('--torch-checkpoint needs --config (e.g. experiments/base.py)')
      config = cli.config_value(config_flag).copy_and_resolve_references()
      model = models.create_model(config)
      state, step = _torch_state(config, model, torch_flag.value, parallel.replicated(mesh))
    elif workdir_flag.value:
      config, _, state, step = checkpoints.load_run(workdir_flag.value, step_flag.value, mesh)
    else:
      raise UsageError('give --workdir DIR, or --config FILE with --torch-checkpoint FILE')
    with config.unlocked():
      if data_name_flag.value:
        config.data.name = data_name_flag.value
      if data_root_flag.value:
        config.data.root = data_root_flag.value
      if tta_flag.value:
        config.eval_tta = tta_flag.value
      if shifts_flag.value:
        config.eval_tta_shifts = parse_shifts(shifts_flag.value)
      if center_flag.value is not None:
        config.eval_tta_center_weight = center_flag.value
    config_lib.validate_tta(config)
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
