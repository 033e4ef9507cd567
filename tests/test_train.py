import json
import re

from jaxres import reporting
from tests.conftest import read_metrics

EPOCH_LINE = re.compile(r'^Epoch \[(\d+)/3\], Train Loss: [\d.]+, Train Acc: [\d.]+, '
                        r'Test Loss: [\d.]+, Test Acc: [\d.]+, LR: [\d.e+-]+, '
                        r'Time: [\d.]+s(?: \(\+[\d.]+s compiling\))?, '
                        r'\d+ img/s$', re.M)


def test_smoke_run_writes_everything_and_learns(smoke_run):
  workdir, proc = smoke_run
  assert [int(e) for e in EPOCH_LINE.findall(proc.stdout)] == [1, 2, 3]
  assert 'Final Test Accuracy:' in proc.stdout
  # The start line names what is in use (smoke.py pins XLA's convolutions, no restart).
  assert ('jaxres: float32, matmul precision default; convolutions xla; host allocator '
          'system; data torchvision (augment flip_crop, 0 workers)') in proc.stdout
  records = read_metrics(workdir)
  assert records[0]['compile_seconds'] > 0  # the step's compilation, apart from its time
  assert [r['epoch'] for r in records] == [1, 2, 3]
  for key in ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy', 'learning_rate',
              'epoch_seconds'):
    assert key in records[0]
  assert records[-1]['test_accuracy'] > 0.5  # chance is 0.1
  assert records[-1]['train_loss'] < records[0]['train_loss']
  assert (workdir / 'curves.png').stat().st_size > 1000
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['data']['name'] == 'synthetic' and saved['model']['widths'] == [8, 16, 32, 64]
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps == [16, 32, 48]  # 1024 images / batch 64 = 16 steps per epoch


def test_trainer_refuses_a_model_over_budget(run_main, tmp_path):
  proc = run_main('jaxres.train', '--config', 'experiments/smoke.py', '--workdir', tmp_path / 'w',
                  '--config.param_budget=50000')
  assert proc.returncode == 2
  assert proc.stderr.strip() == ('error: model has 78,002 trainable parameters, over the budget '
                                 'of 50,000 (config.param_budget)')
  assert not (tmp_path / 'w').exists()


def test_on_device_feed_scans_steps_and_keeps_the_partial_batch(run_main, tmp_path):
  workdir = tmp_path / 'on_device'
  proc = run_main('jaxres.train', '--config', 'experiments/smoke.py', '--workdir', workdir,
                  '--config.data.on_device=True', '--config.data.steps_per_dispatch=4',
                  '--config.data.synthetic_train_size=1000', '--config.num_epochs=2',
                  '--config.log_train_steps=True')
  assert proc.returncode == 0, proc.stderr
  steps = reporting.read_jsonl(str(workdir / 'train_steps.jsonl'))
  # 1000 images / 64 = 15 full batches (4 dispatches: 4+4+4+3) and a partial one of 40.
  assert [s['step'] for s in steps] == list(range(1, 33))
  records = read_metrics(workdir)
  assert [r['epoch'] for r in records] == [1, 2]
  assert records[-1]['test_accuracy'] > 0.5


def test_holdout_run_evaluates_held_out_training_images(holdout_run):
  workdir, proc = holdout_run
  assert '824 train / 200 holdout images' in proc.stdout
  assert re.search(r'Holdout Loss: [\d.]+, Holdout Acc: [\d.]+', proc.stdout)
  assert 'Final Holdout Accuracy:' in proc.stdout and 'Test Acc' not in proc.stdout
  (record,) = read_metrics(workdir)
  assert record['eval_split'] == 'holdout' and record['test_accuracy'] > 0.1


def test_a_batch_larger_than_the_data_with_drop_last_is_one_line(run_main, tmp_path):
  proc = run_main('jaxres.train', '--config', 'experiments/smoke.py', '--workdir', tmp_path / 'w',
                  '--config.data.drop_last=True', '--config.batch_size=2048')
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip() == ('error: config.batch_size=2048 is more than the 1024 training '
                                 'images and config.data.drop_last=True: an epoch would have no '
                                 'batch; use a smaller batch')
  assert not (tmp_path / 'w').exists()


EXTENSION_CONFIG = '''"""The smoke config on a model and a dataset this file registers, as code outside
jaxres does."""
import flax.linen as nn

from experiments import smoke
from jaxres import input_pipeline, models


@input_pipeline.DATASETS.register('few_stripes')
def few_stripes(data, seed):
  return input_pipeline.synthetic(256, 100, image_size=data.image_size, seed=seed + 1)


class Tiny(nn.Module):
  conv: object = nn.Conv

  @nn.compact
  def __call__(self, x, train=False):
    x = self.conv(6, (3, 3), use_bias=False, name='conv')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name='bn')(x))
    return nn.Dense(10, name='linear')(x.mean(axis=(1, 2)))


@models.register('tiny')
def tiny(config, conv_defs, num_devices):
  return Tiny(conv=conv_defs.get('conv', nn.Conv))


def get_config():
  config = smoke.get_config()
  config.data.name, config.model.name, config.num_epochs = 'few_stripes', 'tiny', 1
  return config
'''


def test_a_model_and_a_dataset_registered_by_the_config_file_train(run_cli, tmp_path):
  config_path = tmp_path / 'tiny_config.py'
  config_path.write_text(EXTENSION_CONFIG)
  workdir = tmp_path / 'run'
  proc = run_cli('jaxres.train', '--config', config_path, '--workdir', workdir)
  assert proc.returncode == 0, proc.stderr
  assert '256 train / 100 test images' in proc.stdout
  assert '244 trainable parameters' in proc.stdout  # conv 3*3*3*6, BN 2*6, linear 6*10+10
  (record,) = read_metrics(workdir)
  assert record['epoch'] == 1 and 'test_accuracy' in record
