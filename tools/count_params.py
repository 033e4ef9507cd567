"""Count a config's trainable parameters and enforce its budget.

    python -m tools.count_params --config experiments/base.py

Counts the `params` collection of the initialized model (not BatchNorm's running
statistics), prints a per-module table and the total, and exits 1 when the total exceeds
config.param_budget. Nothing is computed: shapes come from jax.eval_shape.
"""

from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from jaxres import cli, config_lib
from jaxres.errors import UsageError


def per_module(params, depth: int = 1) -> list[tuple[str, int]]:
  """(module path, parameter count) rows, grouped at `depth`, sorted by path."""
  rows: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = [str(getattr(k, 'key', k)) for k in path]
    name = '/'.join(keys[:min(depth, len(keys) - 1)]) or keys[0]
    rows[name] = rows.get(name, 0) + int(np.prod(leaf.shape))
  return list(rows.items())


def command():
  """The command-line entry point: defines the flags (only then, so that importing this
  module as a library defines none) and returns main(argv)."""
  config_flag = config_flags.DEFINE_config_file('config', None, 'Config file (get_config()).')
  depth_flag = flags.DEFINE_integer('depth', 1, 'Module nesting depth of the table rows.')

  def main(argv):
    if len(argv) > 1:
      raise UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    if cli.config_value(config_flag) is None:
      raise UsageError('--config is required (e.g. --config experiments/base.py)')
    config = cli.config_value(config_flag)
    total, shapes = config_lib.param_count(config)
    rows = per_module(shapes, depth_flag.value)
    width = max(len(name) for name, _ in rows + [('module', 0)])
    print(f'{"module":<{width}}  {"parameters":>12}')
    for name, count in rows:
      print(f'{name:<{width}}  {count:>12,}')
    print(f'{"total":<{width}}  {total:>12,}')
    budget = config.param_budget
    verdict = 'OVER BUDGET' if total > budget else 'within budget'
    print(f'total trainable parameters: {total} ({verdict}: config.param_budget = {budget})')
    return 1 if total > budget else 0

  return main


if __name__ == '__main__':
  cli.run(command())
