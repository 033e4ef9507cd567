"""tools.compare_torch --train (tools.compare_seeds, tools.run_stats): several seeds of
jaxres and of the seed's PyTorch loop, trained to the end and compared.

The pipeline runs at toy size on generated data: the smoke model, 2 seeds, 2 epochs,
256 training and 100 test images (whole batches of 64: one compiled step).
"""

import json
import math
import shutil
import types

import numpy as np
import pytest

from experiments import smoke
from jaxres import input_pipeline
from jaxres.errors import UsageError
from tests.conftest import cli_env, read_metrics
from tools import compare_seeds, run_stats, verify

pytestmark = pytest.mark.usefixtures('one_torch_thread')

RECORD_KEYS = {'epoch', 'train_loss', 'train_accuracy', 'test_loss', 'test_accuracy',
               'learning_rate', 'epoch_seconds', 'images_per_second', 'eval_seconds'}


def _config(epochs=2):
  return compare_seeds.comparison_config(smoke.get_config(), epochs, 256, 100)


@pytest.fixture(scope='module')
def compared(compile_cache, tmp_path_factory):
  """A finished comparison, run as tools.verify's comparison stage at --quick size runs it
  (the same tools.compare_torch command): (out, its output as proc.stdout)."""
  out = tmp_path_factory.mktemp('compare')
  stage = verify.compare_stage(True, str(out), (), 2, 10, ())
  assert stage.args[stage.args.index('--out') + 1:][:1] == (str(out / 'compare'),)
  env = {**verify.stage_env(), **cli_env(cache_dir=compile_cache)}
  result = verify.run_stage(stage, str(out), env, stage.share)
  text = (out / 'compare.log').read_text()
  assert result['status'] == 'passed', text
  assert result['figures'] == verify.compare_figures(str(out / 'compare'))
  return out / 'compare', types.SimpleNamespace(stdout=text, result=result)


# ---------------------------------------------------------------------------- the command

def test_train_mode_runs_both_frameworks_and_reports(compared):
  out, proc = compared
  for number, name, seed in ((1, 'jaxres', 0), (2, 'PyTorch', 0), (3, 'jaxres', 1),
                             (4, 'PyTorch', 1)):
    assert f'[{number}/4] {name} seed {seed} (' in proc.stdout
  assert proc.stdout.count('Epoch [2/2]') == 4
  assert 'PyTorch: 78,002 trainable parameters; 256 train / 100 test images' in proc.stdout

  summary = json.loads((out / 'compare.json').read_text())
  assert summary['seeds'] == [0, 1] and summary['num_epochs'] == 2
  assert (summary['train_images'], summary['test_images']) == (256, 100)
  for framework in ('jaxres', 'torch'):
    runs = summary['frameworks'][framework]['runs']
    assert [r['seed'] for r in runs] == [0, 1]
    for run in runs:
      records = read_metrics(out / run['workdir'])
      assert [r['epoch'] for r in records] == [1, 2]
      assert set(records[0]) - {'compile_seconds'} == RECORD_KEYS  # jaxres's compile time
      assert run['records'] == records
      assert run['final']['test_accuracy'] == records[-1]['test_accuracy']
      assert run['cut_epochs'] == run_stats.cut_epochs(records)
    per_epoch = summary['frameworks'][framework]['per_epoch']
    assert [row['epoch'] for row in per_epoch] == [1, 2]
    losses = [r['records'][1]['test_loss'] for r in runs]
    assert per_epoch[1]['test_loss']['mean'] == pytest.approx(np.mean(losses))
    assert per_epoch[1]['test_loss']['std'] == pytest.approx(np.std(losses, ddof=1))
  accuracy = summary['final']['test_accuracy']
  welch = accuracy['welch']
  assert accuracy['jaxres']['values'] == [r['final']['test_accuracy']
                                         for r in summary['frameworks']['jaxres']['runs']]
  assert welch['difference'] == pytest.approx(
      np.mean(accuracy['jaxres']['values']) - np.mean(accuracy['torch']['values']))
  assert welch['low'] <= welch['difference'] <= welch['high']
  assert summary['verdict'] == run_stats.verdict(welch)

  # The jaxres runs are jaxres.train runs on the subset.
  config = json.loads((out / 'jaxres' / 'seed_1' / 'config.json').read_text())
  assert (config['seed'], config['data']['train_subset'], config['data']['test_subset']) == (
      1, 256, 100)
  assert (out / 'jaxres' / 'seed_1' / 'checkpoints').is_dir()
  assert (out / 'torch' / 'seed_1' / compare_seeds.CHECKPOINT).is_file()

  table = (out / 'compare.md').read_text()
  assert '| epoch | train loss jaxres | train loss PyTorch |' in table
  assert table.count('\n| 2 | ') == 1 and f'Verdict: {summary["verdict"]}.' in table
  assert '95 % interval' in table and table in proc.stdout
  assert (out / 'compare.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_verify_stage_reports_the_comparison(compared):
  out, proc = compared
  summary = json.loads((out / 'compare.json').read_text())
  figures = proc.result['figures']
  accuracy = summary['final']['test_accuracy']
  assert figures['jaxres_values'] == accuracy['jaxres']['values'] and figures['torch_n'] == 2
  assert figures['difference'] == accuracy['welch']['difference']
  assert figures['verdict'] == summary['verdict'] and figures['epochs'] == 2
  assert verify.summary(proc.result).endswith(summary['verdict'])
  lines = verify.compare_table(proc.result)
  assert lines[1] == (f'compare_torch --train, 2 seeds a side: 2 epochs on {summary["data"]}; '
                      f'{summary["verdict"]}.')
  jaxres_row = ('| jaxres | 2 | ' + verify.percent(figures['jaxres_mean']) + ' | '
                + verify.percent(figures['jaxres_std']) + ' | ')
  assert any(line.startswith(jaxres_row) for line in lines)


def test_verify_plans_the_comparison_only_when_asked():
  assert 'compare' not in [s.name for s in verify.plan(False, 'out', (), 2, (), True)]
  stage = verify.plan(False, 'out', ('--config.data.name=imagefolder',), 2, (), True, 3, 90)[-1]
  assert stage.name == 'compare' and stage.own_limit and stage.share == 90 * 60
  assert stage.args == ('-m', 'tools.compare_torch', '--train', '--config',
                        'experiments/base.py', '--seeds', '3', '--out', 'out/compare',
                        '--config.data.name=imagefolder')  # the whole dataset: no subset
  assert verify.compare_figures('no/such/dir') == {}


def test_rerun_skips_finished_runs_and_resumes_a_stopped_one(compared, tmp_path):
  out, _ = compared
  # PyTorch seed 1 as if stopped after its first epoch: a 1-epoch run's files.
  stopped = tmp_path / 'stopped'
  compare_seeds.torch_train_and_evaluate(compare_seeds.run_config(_config(epochs=1), 1),
                                         str(stopped), log=lambda line: None)
  workdir = out / 'torch' / 'seed_1'
  unstopped = read_metrics(workdir, drop_timing=True)
  for name in ('metrics.jsonl', compare_seeds.CHECKPOINT, 'config.json'):
    shutil.copy(stopped / name, workdir / name)
  others = {p: p.stat().st_mtime_ns for p in out.rglob('*')
            if p.is_file() and workdir not in p.parents and not p.name.startswith('compare.')}

  lines = []
  summary = compare_seeds.run_all(_config(), str(out), 2, log=lines.append)
  assert sum(line.endswith(': finished, skipped') for line in lines) == 3
  assert any(line.startswith('[4/4] PyTorch seed 1') and line.endswith('resuming after epoch 1')
             for line in lines)
  assert read_metrics(workdir, drop_timing=True) == unstopped  # as if it had not stopped
  assert {p: p.stat().st_mtime_ns for p in others} == others
  assert len(summary['frameworks']['torch']['runs']) == 2

  changed = _config()
  changed.learning_rate = 1e-2
  with pytest.raises(UsageError, match=r'holds a run with a different config \(learning_rate\)'):
    compare_seeds.run_all(changed, str(out), 2, log=lines.append)


def test_train_mode_usage_errors(run_main):
  proc = run_main('tools.compare_torch', '--train', '--config', 'experiments/smoke.py')
  assert proc.returncode == 2 and proc.stderr.strip() == (
      'error: --train needs --out DIR (where the runs and the report go)')


@pytest.mark.parametrize('field, value, message', [
    ('dtype', 'bfloat16', 'trains in float32'), ('eval_tta', 'flip', 'test-time augmentation'),
    ('schedule', 'triangle', 'constant learning rate')])
def test_comparison_refuses_recipes_pytorch_does_not_mirror(field, value, message):
  config = smoke.get_config()
  config[field] = value
  with pytest.raises(UsageError, match=message):
    compare_seeds.comparison_config(config)


def test_both_frameworks_get_the_same_images():
  config = compare_seeds.run_config(_config(), 1)
  train, test = input_pipeline.load(config.data, config.seed)
  batches = compare_seeds.torch_test_batches(test, config)
  images = np.concatenate([b[0].numpy() for b in batches]).transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(images, input_pipeline.normalize(test.images))
  loader = compare_seeds.torch_train_loader(train, config, compare_seeds.torch_device())
  assert loader.dataset.images is train.images and len(train) == 256


# ---------------------------------------------------------------------------- statistics

@pytest.mark.parametrize('df, expected', [(1, 12.706205), (2, 4.302653), (5, 2.570582),
                                          (10, 2.228139), (30, 2.042272), (1e6, 1.959966)])
def test_t_quantile_matches_the_table(df, expected):
  assert run_stats.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)
  assert run_stats.t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-6)
  assert run_stats.t_cdf(expected, df) == pytest.approx(0.975, abs=1e-7)


def test_welch_interval_by_hand():
  # means 2 and 5; variances 1 and 20/3, over n: 1/3 and 5/3; se = sqrt(2);
  # df = 2^2 / ((1/3)^2 / 2 + (5/3)^2 / 3) = 216/53; t_0.975(216/53) = 2.7562849.
  w = run_stats.welch_interval([1, 2, 3], [2, 4, 6, 8])
  assert w['difference'] == -3 and w['se'] == pytest.approx(math.sqrt(2))
  assert w['df'] == pytest.approx(216 / 53)
  half = 2.7562849 * math.sqrt(2)
  assert (w['low'], w['high']) == (pytest.approx(-3 - half), pytest.approx(-3 + half))
  same = run_stats.welch_interval([0.5, 0.5], [0.25, 0.25, 0.25])
  assert (same['low'], same['high'], same['df']) == (0.25, 0.25, 3.0)
  with pytest.raises(ValueError, match='2 values or more'):
    run_stats.welch_interval([1.0], [1.0, 2.0])


def test_verdict_cut_epochs_and_spread():
  assert run_stats.verdict({'low': -0.01, 'high': 0.02}).startswith(
      'no difference shown: the 95 % interval of jaxres - PyTorch in final test accuracy, '
      '[-0.0100, +0.0200], contains 0')
  assert run_stats.verdict({'low': -0.03, 'high': -0.01}).startswith(
      'jaxres\'s final test accuracy is lower than PyTorch\'s by at least 0.0100')
  assert 'higher than PyTorch\'s by at least 0.0050' in run_stats.verdict(
      {'low': 0.005, 'high': 0.02})
  lrs = [1e-3, 1e-3, 1e-4, 1e-4, 1e-5]
  assert run_stats.cut_epochs([{'epoch': e, 'learning_rate': lr}
                               for e, lr in enumerate(lrs, 1)]) == [3, 5]
  runs = [[{'epoch': 1, 'test_accuracy': a}] for a in (0.5, 0.6, 0.7)]
  row, = run_stats.per_epoch(runs, 1, metrics=('test_accuracy',))
  assert row['test_accuracy']['mean'] == pytest.approx(0.6)
  assert row['test_accuracy']['std'] == pytest.approx(0.1)
  assert row['test_accuracy']['n'] == 3
