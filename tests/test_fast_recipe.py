"""experiments/fast.py at toy size and at its shipped settings: a run stopped mid-epoch and
resumed ends bit for bit where an uninterrupted one does, and the whitened_resnet run
evaluates and predicts as it reported.

Sizes shrink (widths, images, batch; four epochs, so that lookahead starts and the
whitening bias freezes after epoch 3); nothing automatic is pinned: the data on the device
(DeviceFeed), the convolutions the backend picks, the triangle schedule, flip-and-translate
test-time augmentation. The runs are trained in this process by jaxres.train's library entry
point (train_and_evaluate); the command's own start-up with fast.py, its restart for huge
pages included, is tests/test_multihost.py's shipped-recipe test.
"""

import contextlib
import io
import json
import os
import signal

import jax
import numpy as np
import pytest

from experiments import fast
from jaxres import checkpoints, feeds, input_pipeline, runtime, train
from jaxres.errors import Interrupted
from tests.conftest import read_metrics, run_probabilities

TINY = {'num_epochs': 4, 'batch_size': 64, 'eval_batch_size': 128,
        'model.widths': (16, 32, 32), 'model.whiten_images': 256, 'data.name': 'synthetic',
        'data.synthetic_train_size': 512, 'data.synthetic_test_size': 256}
STEPS_PER_EPOCH = 8  # 512 images in batches of 64 (fast.py drops a partial batch)
STOP_AT = (3, 3)  # (epoch, step in it): lookahead has started, the bias is not yet frozen


def _config():
  config = fast.get_config()
  config.update_from_flattened_dict(TINY)
  return config


def _train(workdir):
  """train_and_evaluate into `workdir`: its output (what the command prints)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    train.train_and_evaluate(_config(), str(workdir))
  return out.getvalue()


@pytest.fixture(scope='module')
def fast_run(tmp_path_factory):
  """An uninterrupted toy fast.py run: (workdir, its output)."""
  workdir = tmp_path_factory.mktemp('fast') / 'run'
  return workdir, _train(workdir)


def test_the_run_takes_the_shipped_paths(fast_run):
  workdir, out = fast_run
  config = _config()
  assert f'jaxres: {runtime.describe(config)}' in out
  assert 'data on the device (augment reflect_translate)' in out
  records = read_metrics(workdir)
  assert [r['epoch'] for r in records] == [1, 2, 3, 4]
  assert 'test_accuracy' in records[-1] and 'test_accuracy' not in records[0]  # at the end only
  # The step compiled again when the whitening bias froze (config.frozen_after).
  assert records[0]['compile_seconds'] > 0 and records[3]['compile_seconds'] > 0
  assert all(np.isfinite(r['train_loss']) for r in records)


def test_stopped_mid_epoch_and_resumed_equals_uninterrupted(fast_run, tmp_path, monkeypatch):
  """SIGTERM (to this process, as `kill` sends it) in epoch 3: the trainer writes a
  checkpoint after that step and stops; a second call resumes from it. Metrics, weights,
  their slow copy, the optimizer's state and the step all end as the uninterrupted run's."""
  workdir = tmp_path / 'run'
  epoch = feeds.DeviceFeed.epoch

  def signalled(self, number, start_step=0):
    for step, item in enumerate(epoch(self, number, start_step), start_step + 1):
      if (number, step) == STOP_AT:
        os.kill(os.getpid(), signal.SIGTERM)
      yield item

  monkeypatch.setattr(feeds.DeviceFeed, 'epoch', signalled)
  with pytest.raises(Interrupted), contextlib.redirect_stderr(io.StringIO()):
    _train(workdir)
  monkeypatch.undo()
  assert [r['epoch'] for r in read_metrics(workdir)] == [1, 2]
  out = _train(workdir)
  stopped_at = (STOP_AT[0] - 1) * STEPS_PER_EPOCH + STOP_AT[1]
  assert f'Resuming from checkpoint {stopped_at} (epoch 3, after step 3)' in out
  assert read_metrics(workdir, drop_timing=True) == read_metrics(fast_run[0], drop_timing=True)
  resumed, uninterrupted = (checkpoints.load_run(str(w), 'latest')[2:]
                            for w in (workdir, fast_run[0]))
  assert resumed[1] == uninterrupted[1] == 4 * STEPS_PER_EPOCH
  jax.tree.map(np.testing.assert_array_equal, resumed[0], uninterrupted[0])


def test_eval_and_predict_of_the_whitened_run(fast_run, run_main, tmp_path):
  """jaxres.eval reproduces the run's final test figures (its own normalization and
  test-time augmentation); jaxres.predict labels the same test images with the same
  probabilities, as many of them right as eval counted."""
  workdir, _ = fast_run
  last = read_metrics(workdir)[-1]
  proc = run_main('jaxres.eval', '--workdir', workdir, '--json')
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  assert result['num_examples'] == 256 and result['checkpoint'] == 4 * STEPS_PER_EPOCH
  assert (result['test_accuracy'], result['test_loss']) == (last['test_accuracy'],
                                                            last['test_loss'])
  config = _config()
  split = input_pipeline.load(config.data, config.seed)[1]
  np.save(tmp_path / 'x.npy', split.images)
  out, probs = tmp_path / 'labels.csv', tmp_path / 'probs.csv'
  proc = run_main('jaxres.predict', '--workdir', workdir, '--input', tmp_path / 'x.npy',
                  '--output', out, '--probabilities', probs)
  assert proc.returncode == 0, proc.stderr
  assert f'(checkpoint {4 * STEPS_PER_EPOCH})' in proc.stdout  # the best: the only evaluated
  labels = np.loadtxt(out, delimiter=',', skiprows=1, dtype=np.int64)[:, 1]
  table = np.loadtxt(probs, delimiter=',', skiprows=1)[:, 1:]
  np.testing.assert_allclose(table, run_probabilities(workdir, split.images), atol=1e-6)
  assert np.array_equal(labels, table.argmax(1))
  assert np.sum(labels == split.labels) == round(result['test_accuracy'] * 256)
