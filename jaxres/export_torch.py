"""Write a jaxres checkpoint as a PyTorch state_dict of the seed's ModifiedResNet.

    python -m jaxres.export_torch --workdir DIR --output model.pth [--step latest|best|N]

The file loads into the seed's PyTorch model with
`ModifiedResNet(num_blocks, widths, num_classes).load_state_dict(torch.load(path,
weights_only=True), strict=True)` and computes the same function (the conversion is exact;
see jaxres/torch_compat.py). Every BatchNorm's num_batches_tracked is the checkpoint's
step count, as PyTorch would have counted it.
"""

import os

from absl import flags
import jax

from jaxres import checkpoints, cli, parallel, torch_compat, train_state
from jaxres.errors import UsageError


def export(workdir: str, which: str, output: str) -> str:
  """Write checkpoint `which` of `workdir` to `output`; returns a one-line summary."""
  directory = os.path.dirname(os.path.abspath(output))
  if not os.path.isdir(directory):
    raise UsageError(f'cannot write {output}: directory {directory} does not exist')
  config, _, state, step = checkpoints.load_run(workdir, which)
  variables = jax.device_get(state.variables)
  state_dict = torch_compat.torch_state_dict(variables,
                                             num_batches_tracked=int(jax.device_get(state.step)))
  torch_compat.save_torch_checkpoint(state_dict, output)
  m = config.model
  return (f'wrote {output}: checkpoint {step} of {workdir}, {len(state_dict)} tensors, '
          f'{train_state.count_params(variables["params"]):,} parameters; load it with '
          f'ModifiedResNet(num_blocks={tuple(m.blocks)}, widths={tuple(m.widths)}, '
          f'num_classes={m.num_classes}).load_state_dict(torch.load({output!r}, '
          f'weights_only=True))')


def command():
  """The command-line entry point: defines the flags (only then, so that importing this
  module as a library defines none) and returns main(argv)."""
  workdir_flag = flags.DEFINE_string('workdir', None, 'A jaxres run directory.')
  step_flag = flags.DEFINE_string('step', 'latest', 'Checkpoint to export: latest, best or a step.')
  output_flag = flags.DEFINE_string('output', None, 'The .pth file to write.')

  def main(argv):
    if len(argv) > 1:
      raise UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    if not workdir_flag.value or not output_flag.value:
      raise UsageError('give --workdir DIR and --output FILE.pth')
    summary = export(workdir_flag.value, step_flag.value, output_flag.value)
    if parallel.is_main_process():
      print(summary)

  return main


if __name__ == '__main__':
  cli.run(command())
