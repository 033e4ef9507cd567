"""tools.verify: its quick run end to end, and its pieces in-process.

The end-to-end run (--quick) takes the stages that no other test runs (--stages): the
float32 bench stage is tests/test_bench.py's, the tests stage runs below on one test,
fast.py's training is tests/test_fast_recipe.py's (at its shipped settings) and
tests/test_multihost.py's (from the command line on two hosts).
"""

import dataclasses
import json
import os
import sys

import pytest

from jaxres.errors import UsageError
from tests.conftest import REPO
from tools import verify

STAGES = ('environment', 'bench_base_bfloat16', 'bench_fast', 'base')
CPU = {'backend': 'cpu', 'platform': 'cpu', 'devices': ['cpu']}
# Stands in for jaxres.train: an epoch every 0.2 s into metrics.jsonl; exits 143 on SIGTERM.
FAKE_TRAINER = '''
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
os.makedirs(sys.argv[1], exist_ok=True)
for epoch in range(1, 41):
  time.sleep(0.2)
  with open(os.path.join(sys.argv[1], 'metrics.jsonl'), 'a') as f:
    f.write(json.dumps({'epoch': epoch, 'epoch_seconds': 0.15, 'eval_seconds': 0.05,
                        'test_accuracy': epoch / 100, 'images_per_second': 10.0}) + '\\n')
'''


@pytest.mark.skipif(bool(os.environ.get(verify.GUARD)), reason='inside a tools.verify run')
def test_quick_run_passes_its_stages(run_main, tmp_path):
  out = tmp_path / 'verify'
  proc = run_main('tools.verify', '--quick', '--out', out, '--stages', ','.join(STAGES[1:]))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  report = json.loads((out / 'verify.json').read_text())
  assert [s['name'] for s in report['stages']] == list(STAGES)
  assert [s['status'] for s in report['stages']] == ['passed'] * len(STAGES), proc.stdout
  assert report['passed'] and report['quick'] and report['data'] == 'generated images'
  assert report['command'].endswith(f' --stages={",".join(STAGES[1:])}')
  figures = {s['name']: s['figures'] for s in report['stages']}
  for name in ('bench_base_bfloat16', 'bench_fast'):
    assert figures[name]['jax_train_img_s'] > 0, name
  assert figures['bench_base_bfloat16']['dtype'] == 'bfloat16'
  assert figures['bench_base_bfloat16']['ratio'] > 0  # the seed's model has a reference
  base = figures['base']
  assert base['epochs'] == 2 and base['extrapolated_epochs'] == 40
  assert base['extrapolated_seconds'] > base['seconds_to_first_epoch'] > 0
  assert base['seed_accuracy_by_epoch'] == {'29': 0.8782, '30': 0.9105, '40': 0.9148}
  markdown = (out / 'verify.md').read_text()
  assert markdown == verify.markdown(report)  # the JSON holds everything it shows
  assert markdown.startswith('### tools.verify --quick: cpu: ')
  assert '| tools.bench smoke.py bfloat16 | passed |' in markdown
  assert '| 40 | n/a | 91.48 % |' in markdown
  for stage in report['stages']:
    assert (out / stage['log']).stat().st_size > 0
    assert f'verify: {stage["title"]}' in proc.stdout
  assert 'verify: every stage passed' in proc.stdout


def test_quick_plan_has_every_stage_and_its_tests_stage_counts_a_real_run(tmp_path):
  """The quick plan's stages in --stages' order; its tests stage (here on one of its two
  selections) runs pytest and reads the counts."""
  stages = verify.plan(True, str(tmp_path), (), 2, (), True, 2)
  assert tuple(s.name for s in stages) == verify.STAGES
  tests = stages[0]
  assert tests.args[-len(verify.QUICK_TESTS):] == verify.QUICK_TESTS
  one = dataclasses.replace(tests, args=tests.args[:-len(verify.QUICK_TESTS)]
                            + verify.QUICK_TESTS[1:])
  result = verify.run_stage(one, str(tmp_path), verify.stage_env(True, str(tmp_path)), 300)
  assert result['status'] == 'passed' and result['figures'] == {'passed': 1}, result


def test_bad_flags_are_one_line_exit_2(run_main, tmp_path):
  for args in (('--minutes', '0'), ('--data_root', tmp_path), ('--quick', 'extra'),
               ('--compare_seeds', '1'), ('--stages', 'fast,nope'), ('--stages', 'compare'),
               ('--stages=',)):
    proc = run_main('tools.verify', '--out', tmp_path / 'out', *args)
    assert proc.returncode == 2 and proc.stderr.count('\n') == 1, (args, proc.stderr)
    assert proc.stderr.startswith('error: ') and not (tmp_path / 'out').exists()


def test_requirements_come_from_pyproject_with_or_without_tomllib(monkeypatch):
  path = os.path.join(REPO, 'pyproject.toml')
  reqs = verify.requirements(path)
  assert 'ml_collections>=1.0' in reqs['runtime'] and 'jax>=0.6' in reqs['runtime']
  assert [verify.requirement_name(r) for r in reqs['test']] == ['pytest', 'pytest-xdist']
  monkeypatch.setitem(sys.modules, 'tomllib', None)  # as on Python 3.10
  assert verify.requirements(path) == reqs


def test_a_missing_package_is_one_line_with_its_pip_command(monkeypatch, tmp_path, capsys):
  installed = verify.installed_version
  monkeypatch.setattr(verify, 'installed_version',
                      lambda name: None if name == 'ml_collections' else installed(name))
  monkeypatch.setattr(verify, 'probe_devices', lambda env, timeout: CPU)
  reqs = verify.requirements(os.path.join(REPO, 'pyproject.toml'))
  env, result = verify.environment_stage(reqs, {}, 10, str(tmp_path))
  printed = [line for line in capsys.readouterr().out.splitlines() if 'ml_collections' in line]
  python = os.path.basename(sys.executable)
  line = (f"ml_collections (every stage but environment): {python} -m pip install "
          f"'ml_collections>=1.0'")
  assert printed == [f'missing     {line}']
  assert result['status'] == 'failed' and result['reason'] == f'missing {line}'
  stages = verify.plan(False, 'out', (), 2, ('ml_collections',), xdist=True)
  assert all(verify.missing_for(stage, env['missing']) == [f'missing {line}']
             for stage in stages)


def test_verify_names_its_own_missing_dependency(monkeypatch):
  monkeypatch.setattr(verify, 'installed_version', lambda name: None)
  assert verify.missing_for_verify() == [
      f"absl-py (tools.verify): {os.path.basename(sys.executable)} -m pip install 'absl-py>=2.0'"]


def test_data_root_layouts(tmp_path):
  (tmp_path / 'official' / 'cifar-10-batches-py').mkdir(parents=True)
  (tmp_path / 'official' / 'cifar-10-batches-py' / 'data_batch_1').touch()
  official = ('--config.data.name=cifar10', f'--config.data.root={tmp_path / "official"}',
              '--config.data.download=False')
  assert verify.data_overrides(str(tmp_path / 'official')) == official
  assert verify.data_overrides(str(tmp_path / 'official' / 'cifar-10-batches-py')) == official
  for split in ('train', 'test'):
    (tmp_path / 'folder' / split).mkdir(parents=True)
  assert verify.data_overrides(str(tmp_path / 'folder')) == (
      '--config.data.name=imagefolder', f'--config.data.root={tmp_path / "folder"}')
  with pytest.raises(UsageError, match='holds neither cifar-10-batches-py/'):
    verify.data_overrides(str(tmp_path))


def test_stop_rule_and_extrapolation():
  records = [{'epoch': 1, 'epoch_seconds': 10.0, 'eval_seconds': 2.0},
             {'epoch': 2, 'epoch_seconds': 5.0, 'eval_seconds': 1.0},
             {'epoch': 3, 'epoch_seconds': 7.0, 'eval_seconds': 1.0}]
  assert verify.steady_epoch_seconds(records) == 7.0  # epochs 2-3: no compilation
  assert verify.steady_epoch_seconds(records[:1]) == 12.0
  assert not verify.should_stop(records, 90, 100) and verify.should_stop(records, 94, 100)
  assert not verify.should_stop([], 99, 100) and verify.should_stop([], 100, 100)
  assert verify.extrapolate(records, first_epoch_end=30.0) == {
      'seconds_to_first_epoch': 30.0, 'steady_epoch_seconds': 7.0, 'steady_from': 'epochs 2-3',
      'extrapolated_seconds': 30.0 + 39 * 7.0, 'extrapolated_epochs': 40}
  assert verify.extrapolate(records[:1], 30.0)['steady_from'] == 'epoch 1, compilation included'


def test_pytest_counts():
  assert verify.pytest_counts('x\n=== 3 passed, 1 skipped, 2 deselected in 4.20s ===\n') == {
      'passed': 3, 'skipped': 1, 'deselected': 2}
  assert verify.pytest_counts('1 failed, 2 passed, 2 errors in 3.1s') == {
      'failed': 1, 'passed': 2, 'error': 2}
  assert verify.pytest_counts('collected 3 passed items\n') == {}


def test_run_stage_stops_a_training_run_when_the_next_epoch_would_not_fit(tmp_path, monkeypatch):
  monkeypatch.setattr(verify, 'STOP_SECONDS', 1)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'metrics.jsonl').write_text('{"epoch": 1, "epoch_seconds": 9}\n' * 30)  # stale
  stage = verify.Stage('base', 'fake trainer', 'train', ('-c', FAKE_TRAINER, str(workdir)), 6,
                       workdir=str(workdir), budget=True)
  result = verify.run_stage(stage, str(tmp_path), verify.stage_env(), stage.share)
  assert result['status'] == 'passed' and result['returncode'] == 143, result
  assert result['reason'] == 'stopped by SIGTERM: the next epoch would not fit'
  f = result['figures']
  # SIGTERM once the next epoch would end after 6 - 1 s: about 24 epochs in, a few more
  # where a busy machine delays the supervisor's look; well before the 40th.
  assert 1 <= f['epochs'] < 30 and result['seconds'] < 6
  assert f['steady_epoch_seconds'] == 0.2 and f['extrapolated_epochs'] == 40
  assert f['seconds_to_first_epoch'] >= 0.2
  assert f['accuracy_by_epoch'][str(f['epochs'])] == f['epochs'] / 100


def test_run_stage_records_a_failure_and_a_timeout(tmp_path):
  failing = verify.Stage('bench_x', 'failing', 'bench',
                         ('-c', 'import sys; print("error: no such device"); sys.exit(2)'), 30)
  result = verify.run_stage(failing, str(tmp_path), verify.stage_env(), 30)
  assert result['status'] == 'failed' and result['returncode'] == 2
  assert result['reason'] == 'exit code 2: error: no such device'
  assert result['tail'][-1] == 'error: no such device'
  hanging = verify.Stage('tests', 'hanging', 'tests', ('-c', 'import time; time.sleep(60)'), 1)
  result = verify.run_stage(hanging, str(tmp_path), verify.stage_env(), 1)
  assert result['status'] == 'timeout' and result['seconds'] < 10
  assert (tmp_path / 'tests.log').read_text().startswith('$ python -c ')


def test_markdown_of_a_report():
  records = [{'epoch': 1, 'epoch_seconds': 30.0, 'eval_seconds': 2.0, 'test_accuracy': 0.5},
             {'epoch': 2, 'epoch_seconds': 10.0, 'eval_seconds': 2.0, 'test_accuracy': 0.6}]
  base = verify.train_figures(records, 50.0, first_epoch_end=35.0, budget=True)
  fast = verify.train_figures([{'epoch': 1, 'epoch_seconds': 30.0},
                               {'epoch': 2, 'epoch_seconds': 10.0, 'eval_seconds': 5.0,
                                'test_accuracy': 0.91}], 60.0)
  bench = {'jax_train_img_s': 5000.0, 'jax_on_device_train_img_s': 6000.0,
           'torch_train_img_s': 4000.0, 'ratio': 1.25, 'jax_compile_s': 12.3,
           'peak_device_mb': 2048.0, 'batch_size': 128, 'conv_impl': 'xla'}
  env = verify.environment(verify.requirements(os.path.join(REPO, 'pyproject.toml')), CPU)

  def stage(name, title, status, figures, reason=''):
    return {'name': name, 'title': title, 'status': status, 'seconds': 75.0,
            'limit_seconds': 120.0, 'figures': figures, 'reason': reason}

  report = {'command': 'python -m tools.verify --out=runs/verify', 'date': '2026-12-01 10:00',
            'commit': 'abc1234', 'quick': False, 'data': 'imagefolder at data/x',
            'environment': env, 'passed': False, 'seconds': 500.0, 'stages': [
                stage('tests', 'tests', 'failed', {'passed': 3, 'failed': 1},
                      'exit code 1: FAILED a | b'),
                stage('bench_base_float32', 'tools.bench base.py float32', 'passed', bench),
                stage('fast', 'fast.py end to end', 'passed', fast),
                stage('base', 'base.py for up to 2 min', 'passed', base)]}
  lines = verify.markdown(report).splitlines()
  assert lines[0] == f'### tools.verify: {env["device"]}, 2026-12-01 10:00'
  assert lines[2] == ('`python -m tools.verify --out=runs/verify` at commit abc1234: 8 min 20 s, '
                      'not every stage passed. Data: imagefolder at data/x.')
  assert '| tests | failed | 1 min 15 s | 2 min 00 s | exit code 1: FAILED a / b |' in lines
  assert ('| tools.bench base.py float32 | passed | 1 min 15 s | 2 min 00 s | 5,000 img/s '
          '(1.25x PyTorch eager) |') in lines
  assert ('| base.py float32 | 128 | xla | 5,000 | 6,000 | 4,000 | 1.25x | 12.3 s | 2,048 MB |'
          in lines)
  assert any('then 12.0 s per epoch (epoch 2): **8 min 23 s**' in line for line in lines)
  assert '| 2 | 91.00 % (test) | 1 min 00 s | 40.0 s | 30.0 s | 10.0 s | 5.0 s | n/a |' in lines
  assert '| 2 | 60.00 % | n/a |' in lines and '| 40 | n/a | 91.48 % |' in lines
