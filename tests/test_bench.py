"""tools.bench runs end to end and reports every figure it promises (no timing asserted),
as tools.verify's quick float32 bench stage runs it."""

import json

from tools import bench, verify


def test_bench_json_on_the_smoke_model(tmp_path):
  (stage,) = [s for s in verify.plan(True, str(tmp_path), (), 2, (), True)
              if s.name == 'bench_base_float32']
  assert stage.args[:2] == ('-m', 'tools.bench') and '--json' in stage.args
  outcome = verify.run_stage(stage, str(tmp_path), verify.stage_env(True, str(tmp_path)), 600)
  text = (tmp_path / 'bench_base_float32.log').read_text()
  assert outcome['status'] == 'passed', text
  result = json.loads(text.strip().splitlines()[-1])
  assert outcome['figures'] == verify.bench_figures(text)
  assert outcome['figures']['jax_train_img_s'] == result['jax_train_img_s']
  for key in ('jax_train_img_s', 'jax_on_device_train_img_s', 'torch_train_img_s',
              'torchvision_pipeline_img_s', 'on_device_pipeline_img_s'):
    assert result[key] > 0, key
  assert result['ratio'] == result['jax_train_img_s'] / result['torch_train_img_s'] > 0
  assert result['device'].startswith('cpu') and result['batch_size'] == 16
  assert result['dtype'] == 'float32' and result['model'] == 'resnet'
  assert result['conv_impl'] == 'xla' and result['winograd_transforms'] == 'n/a'  # smoke's
  assert result['peak_host_rss_mb'] > 0
  table = bench.format_table(result)
  assert 'ratio jaxres / PyTorch eager' in table and 'input pipeline' in table


def test_bench_bad_input(run_main):
  proc = run_main('tools.bench', '--steps', '0')
  assert proc.returncode == 2 and proc.stderr.count('\n') == 1
