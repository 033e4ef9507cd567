import json

import numpy as np
import pytest

from jaxres import evaluation, steps
from jaxres.errors import UsageError
from tests.conftest import read_metrics, run_probabilities, smoke_test_split


def test_eval_after_restore_reproduces_last_epoch_exactly(smoke_run, run_main):
  workdir, _ = smoke_run
  proc = run_main('jaxres.eval', '--workdir', workdir, '--json')
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  last = read_metrics(workdir)[-1]
  assert result['test_loss'] == last['test_loss']
  assert result['test_accuracy'] == last['test_accuracy']
  assert len(result['per_class_accuracy']) == 10
  assert sum(map(sum, result['confusion_matrix'])) == result['num_examples'] == 500


def test_eval_table_and_step_choice(smoke_run, run_main):
  workdir, _ = smoke_run
  proc = run_main('jaxres.eval', '--workdir', workdir, '--step', '16')
  assert proc.returncode == 0, proc.stderr
  assert 'checkpoint 16' in proc.stdout and 'confusion matrix' in proc.stdout
  first = read_metrics(workdir)[0]
  assert f"Test Acc: {first['test_accuracy']:.4f}" in proc.stdout
  proc = run_main('jaxres.eval', '--workdir', workdir, '--step', '17')
  assert proc.returncode == 2 and 'no checkpoint at step 17' in proc.stderr


def test_eval_of_a_holdout_run_reads_its_holdout_and_overrides_tta(holdout_run, run_main):
  workdir, _ = holdout_run
  (record,) = read_metrics(workdir)
  proc = run_main('jaxres.eval', '--workdir', workdir, '--json')
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  assert result['eval_split'] == 'holdout' and result['num_examples'] == 200
  assert result['test_accuracy'] == record['test_accuracy']
  proc = run_main('jaxres.eval', '--workdir', workdir, '--tta', 'flip_translate',
                  '--tta_shifts=0,1 -1,0 2,2', '--tta_center_weight', '0.25')
  assert proc.returncode == 0, proc.stderr
  assert 'Holdout Loss:' in proc.stdout and 'Test' not in proc.stdout
  assert f"Holdout Loss: {record['test_loss']:.4f}," not in proc.stdout  # other views
  proc = run_main('jaxres.eval', '--workdir', workdir, '--tta_shifts', '1,2,3')
  assert proc.returncode == 2 and '--tta_shifts must be pairs' in proc.stderr
  proc = run_main('jaxres.eval', '--workdir', workdir, '--tta', 'flip_translate',
                  '--tta_shifts=0,40')
  assert proc.returncode == 2 and 'eval_tta_shifts must be' in proc.stderr


def test_eval_of_an_ensemble_reports_it_beside_its_members(smoke_run, second_smoke_run,
                                                          holdout_run, run_main):
  """Two runs of different normalization and test-time augmentation: each member's
  figures are its own evaluation's, the ensemble's those of the mean of the members'
  class probabilities; runs that evaluate on different images are refused."""
  (first, _), (second, _) = smoke_run, second_smoke_run
  proc = run_main('jaxres.eval', '--workdir', first, '--workdir', second, '--json')
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  for member, workdir in zip(result['members'], (first, second)):
    last = read_metrics(workdir)[-1]
    assert member['workdir'] == str(workdir) and member['num_examples'] == 500
    assert (member['test_accuracy'], member['test_loss']) == (last['test_accuracy'],
                                                              last['test_loss'])
  split = smoke_test_split()
  mean = (run_probabilities(first, split.images) + run_probabilities(second, split.images)) / 2
  expected = evaluation.report(evaluation.probability_sums(mean, split.labels), split.classes)
  assert result['test_accuracy'] == expected['test_accuracy']
  assert result['confusion_matrix'] == expected['confusion_matrix']
  assert result['test_loss'] == pytest.approx(expected['test_loss'], rel=1e-5)
  assert result['test_accuracy'] >= max(m['test_accuracy'] for m in result['members']) - 0.01
  proc = run_main('jaxres.eval', '--workdir', first, '--workdir', second)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith('ensemble of 2 runs on 500 test images\n')
  ensemble_row = [l for l in proc.stdout.splitlines() if l.startswith('  ensemble ')]
  assert ensemble_row[0].split()[1:] == [f"{result['test_loss']:.4f}",
                                         f"{result['test_accuracy']:.4f}"]
  proc = run_main('jaxres.eval', '--workdir', first, '--workdir', holdout_run[0])
  assert proc.returncode == 2 and proc.stderr.count('\n') == 1
  assert 'evaluates on other images than' in proc.stderr and '200 holdout images' in proc.stderr


def test_probability_sums_agree_with_the_eval_step():
  probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.25, 0.25]])
  labels = np.array([0, 1, 0])
  sums = evaluation.probability_sums(probabilities, labels)
  assert sums['correct'] == 2 and sums['count'] == 3
  assert sums['loss_sum'] == pytest.approx(-np.log(0.7) - np.log(0.3) - np.log(0.5))
  assert sums['confusion'].tolist() == [[2, 0, 0], [0, 0, 1], [0, 0, 0]]
  cross_entropy = steps.cross_entropy(np.log(probabilities), labels)  # the eval step's loss
  assert float(cross_entropy.sum()) == pytest.approx(sums['loss_sum'], rel=1e-6)
  with pytest.raises(UsageError, match='must predict the same classes'):
    evaluation.average_probabilities([probabilities, probabilities[:, :2]], ['a', 'b'])
