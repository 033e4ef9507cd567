"""Evaluate a checkpoint on the test split.

    python -m jaxres.eval --workdir DIR [--step latest|best|N] [--json]
    python -m jaxres.eval --config experiments/base.py --torch-checkpoint model.pth [--json]

Reports test loss, test accuracy, per-class accuracy and the confusion matrix. The data
source is the run's (DIR/config.json), or --config's; --data_name / --data_root
override it (e.g. to evaluate on a local copy of CIFAR-10).
"""

import functools
import json

from absl import flags
import jax
from ml_collections import config_flags

from jaxres import checkpoints, cli, evaluation, input_pipeline, models, parallel, steps
from jaxres.errors import UsageError
from jaxres.train_state import TrainState

_WORKDIR = flags.DEFINE_string('workdir', None, 'A jaxres run directory.')
_STEP = flags.DEFINE_string('step', 'latest', 'Checkpoint to evaluate: latest, best or a step.')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (with --torch-checkpoint).')
_TORCH = flags.DEFINE_string('torch-checkpoint', None,
                             'A PyTorch state_dict (.pth) of the seed model to evaluate.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of tables.')
_DATA_NAME = flags.DEFINE_string('data_name', None, 'Override data.name.')
_DATA_ROOT = flags.DEFINE_string('data_root', None, 'Override data.root.')


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
  """The evaluation report of `state` on config's test split."""
  _, test = input_pipeline.load(config.data, config.seed)
  model = models.create_model(config, mesh.devices.size)
  loader = input_pipeline.eval_loader(test, config, jax.process_index(), jax.process_count(),
                                      mesh.devices.size)
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=model))
  sums = evaluation.evaluate(eval_fn, state, loader, parallel.data_sharding(mesh))
  return evaluation.report(sums, test.classes)


def main(argv):
  if len(argv) > 1:
    raise UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  mesh = parallel.make_mesh()
  if _TORCH.value:
    if cli.config_value(_CONFIG) is None:
      raise UsageError('--torch-checkpoint needs --config (e.g. experiments/base.py)')
    config = cli.config_value(_CONFIG).copy_and_resolve_references()
    model = models.create_model(config)
    state, step = _torch_state(config, model, _TORCH.value, parallel.replicated(mesh))
  elif _WORKDIR.value:
    config, _, state, step = checkpoints.load_run(_WORKDIR.value, _STEP.value, mesh)
  else:
    raise UsageError('give --workdir DIR, or --config FILE with --torch-checkpoint FILE')
  with config.unlocked():
    if _DATA_NAME.value:
      config.data.name = _DATA_NAME.value
    if _DATA_ROOT.value:
      config.data.root = _DATA_ROOT.value
  result = run_eval(config, state, mesh)
  result['checkpoint'] = step
  if parallel.is_main_process():
    if _JSON.value:
      print(json.dumps(result))
    else:
      print(f'checkpoint {step}')
      print(evaluation.format_report(result))


if __name__ == '__main__':
  cli.run(main)
