from tools import count_params
from jaxres import config_lib
from experiments import base


def test_base_prints_the_seeds_count(run_main):
  proc = run_main('tools.count_params', '--config', 'experiments/base.py')
  assert proc.returncode == 0, proc.stderr
  assert 'total trainable parameters: 2797610 (within budget' in proc.stdout
  assert 'layer4_1' in proc.stdout and 'linear' in proc.stdout


def test_over_budget_exits_1(run_main):
  proc = run_main('tools.count_params', '--config', 'experiments/base.py',
                  '--config.model.widths=(64,128,256,512)')
  assert proc.returncode == 1
  assert 'total trainable parameters: 11173962 (OVER BUDGET' in proc.stdout


def test_per_module_rows_add_up():
  total, shapes = config_lib.param_count(base.get_config())
  rows = count_params.per_module(shapes)
  assert sum(n for _, n in rows) == total == 2_797_610
  assert dict(rows)['linear'] == 256 * 10 + 10
