import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres import config_lib, evaluation, models, optim, steps, train_state
from jaxres.errors import UsageError
from tests.conftest import read_metrics, run_probabilities, smoke_test_split, tiny_config


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


# ---------------------------------------------------------------------------- test-time views

def test_tta_views():
  config = tiny_config()
  model = models.create_model(config)
  tx = optim.create_optimizer(config)
  state = jax.jit(functools.partial(train_state.create, config, model, tx))()
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  logits = functools.partial(evaluation.tta_logits, model, state.variables)
  none = jax.jit(functools.partial(logits, tta='none'))
  plain, flipped = none(images), none(jnp.flip(images, axis=2))
  np.testing.assert_allclose(jax.jit(functools.partial(logits, tta='flip'))(images),
                             0.5 * (plain + flipped), rtol=1e-5, atol=1e-6)
  padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  up_left, down_right = padded[:, :32, :32], padded[:, 2:, 2:]
  mirror = lambda x: 0.5 * (none(x) + none(jnp.flip(x, axis=2)))
  expected = 0.5 * mirror(images) + 0.25 * (mirror(up_left) + mirror(down_right))
  np.testing.assert_allclose(jax.jit(functools.partial(logits, tta='flip_translate'))(images),
                             expected, rtol=1e-5, atol=1e-6)
  # Other shifts and weights: the centre pair at center_weight, the shifts sharing the rest.
  padded = jnp.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode='reflect')
  two_down, left = padded[:, :32, 2:34], padded[:, 2:34, 3:35]
  expected = 0.4 * mirror(images) + 0.3 * (mirror(two_down) + mirror(left))
  other = functools.partial(logits, tta='flip_translate', shifts=((2, 0), (0, -1)),
                            center_weight=0.4)
  np.testing.assert_allclose(jax.jit(other)(images), expected, rtol=1e-5, atol=1e-6)
  with pytest.raises(UsageError, match='config.eval_tta must be one of none, flip or '
                     'flip_translate'):
    evaluation.tta_logits(model, state.variables, images, 'rotate')


def test_tta_options_from_config():
  config = tiny_config()
  assert evaluation.tta_options(config) == {'tta': 'none', 'shifts': ((-1, -1), (1, 1)),
                                            'center_weight': 0.5}
  config.eval_tta, config.eval_tta_shifts = 'flip_translate', [[0, 2], [-2, 0]]  # from JSON
  config.eval_tta_center_weight = 0.25
  assert evaluation.tta_options(config) == {'tta': 'flip_translate',
                                            'shifts': ((0, 2), (-2, 0)), 'center_weight': 0.25}
  old = tiny_config()  # a run's config from before eval_tta_shifts: airbench's views
  del old['eval_tta_shifts'], old['eval_tta_center_weight']
  assert evaluation.tta_options(old)['shifts'] == evaluation.AIRBENCH_SHIFTS


@pytest.mark.parametrize('field,value,message', [
    ('eval_tta_shifts', (), 'eval_tta_shifts must be'),
    ('eval_tta_shifts', ((1, 1, 1),), 'eval_tta_shifts must be'),
    ('eval_tta_shifts', ((0, 32),), 'eval_tta_shifts must be'),
    ('eval_tta_shifts', ((0.5, 1),), 'eval_tta_shifts must be'),
    ('eval_tta_center_weight', 1.5, 'eval_tta_center_weight must be in'),
])
def test_tta_config_is_checked(field, value, message):
  config = tiny_config()
  config.eval_tta = 'flip_translate'
  config[field] = value
  with pytest.raises(UsageError, match=message):
    config_lib.validate(config)


class _MeanColour:
  """A stand-in model: the logits of an image are its mean colour."""

  @staticmethod
  def apply(variables, images, train):
    assert not train
    return images.mean(axis=(1, 2))


def test_a_tta_mode_registered_outside_is_validated_and_used(register_for_test):
  upside_down = lambda forward, images, **_: forward(jnp.flip(images, axis=1)[:, :2])
  register_for_test(evaluation.TTA_MODES, 'top_rows_upside_down', upside_down)
  config = tiny_config()
  config.eval_tta = 'top_rows_upside_down'
  config_lib.validate_tta(config)
  images = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  logits = evaluation.tta_logits(_MeanColour, {}, images, **evaluation.tta_options(config))
  np.testing.assert_array_equal(logits, images[:, 2:].mean(axis=(1, 2)))
  config.eval_tta = 'rotate'
  with pytest.raises(UsageError, match='or top_rows_upside_down, got'):
    config_lib.validate_tta(config)
