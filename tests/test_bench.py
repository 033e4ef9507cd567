"""tools.bench runs end to end and reports every figure it promises (no timing asserted)."""

import json

from tools import bench


def test_bench_json_on_the_smoke_model(run_cli):
  proc = run_cli('tools.bench', '--config', 'experiments/smoke.py', '--batch_size', '16',
                 '--steps', '2', '--torch_compile=false', '--json')
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  for key in ('jax_train_img_s', 'jax_on_device_train_img_s', 'torch_train_img_s',
              'torchvision_pipeline_img_s', 'on_device_pipeline_img_s'):
    assert result[key] > 0, key
  assert result['ratio'] == result['jax_train_img_s'] / result['torch_train_img_s']
  assert result['device'].startswith('cpu') and result['batch_size'] == 16
  assert result['conv_impl'] == 'xla' and result['winograd_transforms'] == 'n/a'  # smoke's
  assert result['peak_host_rss_mb'] > 0
  table = bench.format_table(result)
  assert 'ratio jaxres / PyTorch eager' in table and 'input pipeline' in table


def test_bench_bad_input(run_cli):
  proc = run_cli('tools.bench', '--steps', '0')
  assert proc.returncode == 2 and proc.stderr.count('\n') == 1
