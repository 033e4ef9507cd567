import json

from tests.conftest import read_metrics


def test_eval_after_restore_reproduces_last_epoch_exactly(smoke_run, run_cli):
  workdir, _ = smoke_run
  proc = run_cli('jaxres.eval', '--workdir', workdir, '--json')
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  last = read_metrics(workdir)[-1]
  assert result['test_loss'] == last['test_loss']
  assert result['test_accuracy'] == last['test_accuracy']
  assert len(result['per_class_accuracy']) == 10
  assert sum(map(sum, result['confusion_matrix'])) == result['num_examples'] == 500


def test_eval_table_and_step_choice(smoke_run, run_cli):
  workdir, _ = smoke_run
  proc = run_cli('jaxres.eval', '--workdir', workdir, '--step', '16')
  assert proc.returncode == 0, proc.stderr
  assert 'checkpoint 16' in proc.stdout and 'confusion matrix' in proc.stdout
  first = read_metrics(workdir)[0]
  assert f"Test Acc: {first['test_accuracy']:.4f}" in proc.stdout
  proc = run_cli('jaxres.eval', '--workdir', workdir, '--step', '17')
  assert proc.returncode == 2 and 'no checkpoint at step 17' in proc.stderr


def test_eval_of_a_holdout_run_reads_its_holdout_and_overrides_tta(holdout_run, run_cli):
  workdir, _ = holdout_run
  (record,) = read_metrics(workdir)
  proc = run_cli('jaxres.eval', '--workdir', workdir, '--json')
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  assert result['eval_split'] == 'holdout' and result['num_examples'] == 200
  assert result['test_accuracy'] == record['test_accuracy']
  proc = run_cli('jaxres.eval', '--workdir', workdir, '--tta', 'flip_translate',
                 '--tta_shifts=0,1 -1,0 2,2', '--tta_center_weight', '0.25')
  assert proc.returncode == 0, proc.stderr
  assert 'Holdout Loss:' in proc.stdout and 'Test' not in proc.stdout
  assert f"Holdout Loss: {record['test_loss']:.4f}," not in proc.stdout  # other views
  proc = run_cli('jaxres.eval', '--workdir', workdir, '--tta_shifts', '1,2,3')
  assert proc.returncode == 2 and '--tta_shifts must be pairs' in proc.stderr
  proc = run_cli('jaxres.eval', '--workdir', workdir, '--tta', 'flip_translate',
                 '--tta_shifts=0,40')
  assert proc.returncode == 2 and 'eval_tta_shifts must be' in proc.stderr
