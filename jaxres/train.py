"""Train a config: `python -m jaxres.train --config experiments/base.py --workdir DIR`.

Any config field can be overridden on the command line: --config.num_epochs=10,
--config.data.root=/data/cifar10, --config.model.widths='(16,32,64,128)'.

The workdir receives metrics.jsonl (one JSON object per epoch), curves.png,
config.json (the resolved config) and checkpoints/ (Orbax: the last few and the best by
test accuracy). Rerunning the same command on the same workdir resumes.
"""

import functools
import os
import signal
import sys
import tempfile
import time
from typing import Optional

from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from jaxres import checkpoints as checkpoints_lib
from jaxres import cli, config_lib, evaluation, input_pipeline, models, optim, parallel, reporting, steps
from jaxres import train_state as train_state_lib
from jaxres.errors import Interrupted, NonFiniteLossError, UsageError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file (get_config()).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, curves and checkpoints.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for a multi-host run '
                                   '(default: $JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Processes in a multi-host run (default: $JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process, 0..num_processes-1 (default: $JAX_PROCESS_ID).')

CHECK_EVERY = 50  # steps between host-side looks at the loss (non-finite check, progress)
TIMING_KEYS = ('epoch_seconds', 'images_per_second', 'wall_seconds')


def _log(*args, **kwargs):
  if parallel.is_main_process():
    print(*args, **kwargs, flush=True)


class _StopRequests:
  """Turns the first SIGINT/SIGTERM into a request to stop after the current step."""

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is not None:  # a second signal: stop now
      signal.signal(signum, self._previous[signum])
      os.kill(os.getpid(), signum)
    self.signum = signum
    print(f'\nsignal {signum}: stopping after this step', file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _check_workdir(workdir: str):
  """UsageError if `workdir` cannot be created or written; creates nothing."""
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UsageError(f'workdir {workdir}: {existing} is not a directory')
  try:  # a real write: os.access is wrong for root, read-only mounts and /proc
    os.rmdir(tempfile.mkdtemp(prefix='.jaxres-write-test-', dir=existing))
  except OSError as e:
    raise UsageError(f'workdir {workdir} is not writable ({e.strerror})') from None


def _check_resume(config, workdir: str) -> bool:
  """Whether to resume from `workdir`; UsageError if its saved config differs."""
  saved_path = os.path.join(workdir, 'config.json')
  if not config.resume or not os.path.exists(saved_path):
    return False
  saved = config_lib.load_json(saved_path).to_dict()
  changed = [d for d in config_lib.differences(saved, config_lib.to_dict(config))
             if d not in ('resume', 'allow_config_change', 'progress', 'num_epochs',
                          'data.num_workers')]
  if changed and not config.allow_config_change:
    raise UsageError(f'{workdir} holds a run with a different config ({", ".join(changed)}); '
                     f'use another --workdir, --config.resume=False to start over, or '
                     f'--config.allow_config_change=True to resume anyway')
  return True


def _epoch_record(epoch, train_sums, test_sums, learning_rate, seconds, images) -> dict:
  record = {'epoch': epoch}
  record.update(steps.summarize(train_sums, 'train'))
  record.update(steps.summarize(test_sums, 'test'))
  record['learning_rate'] = float(learning_rate)
  record['epoch_seconds'] = round(seconds, 3)
  record['images_per_second'] = round(images / max(seconds, 1e-9), 1)
  return record


def _add_sums(total: dict, step_metrics: list) -> dict:
  """Add fetched per-step metric sums into `total` (float64, fixed order)."""
  for m in step_metrics:
    for key in ('loss_sum', 'correct', 'count'):
      total[key] = total.get(key, 0.0) + float(m[key])
  return total


def train_and_evaluate(config, workdir: str) -> list[dict]:
  """Run (or resume) training of `config` in `workdir`; returns the epoch records."""
  config_lib.validate(config)
  num_params = config_lib.check_budget(config)
  _check_workdir(workdir)
  mesh = parallel.make_mesh()
  num_devices = mesh.devices.size
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  resume = _check_resume(config, workdir)
  train_split, test_split = input_pipeline.load(config.data, config.seed)
  if train_split.labels.max() >= config.model.num_classes:
    raise UsageError(f'the data has {len(train_split.classes)} classes but '
                     f'config.model.num_classes={config.model.num_classes}')

  # Nothing in the workdir changes before this point.
  is_main = parallel.is_main_process()
  ckpt_dir = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  ckpts = checkpoints_lib.Checkpoints(ckpt_dir, keep=config.checkpoint_keep)

  model = models.create_model(config, num_devices)
  tx = optim.create_optimizer(config)
  plateau = optim.create_plateau(config)
  replicated = parallel.replicated(mesh)
  batch_sharding = parallel.data_sharding(mesh)
  state = jax.jit(functools.partial(train_state_lib.create, config, model, tx),
                  out_shardings=replicated)()

  start_epoch, start_step, partial_sums = 1, 0, {}
  metrics_log = reporting.MetricsLog(os.path.join(workdir, 'metrics.jsonl'))
  records = []
  restored = ckpts.restore_latest_valid(state, log=_log) if resume else None
  if restored:
    step, state, meta = restored
    start_epoch, start_step = meta['epoch'], meta['step_in_epoch']
    partial_sums = meta.get('train_sums', {})
    if start_step == 0:  # an end-of-epoch checkpoint: continue with the next epoch
      start_epoch += 1
    _log(f'Resuming from checkpoint {step} (epoch {meta["epoch"]}, '
         f'step {meta["step_in_epoch"] or "end"})')
  if is_main:
    records = metrics_log.keep_through(start_epoch - 1) if restored else []
    if not restored:
      metrics_log.keep_through(0)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json(indent=2))

  train_loader = input_pipeline.train_loader(train_split, config, jax.process_index(),
                                             jax.process_count(), num_devices)
  eval_loader = input_pipeline.eval_loader(test_split, config, jax.process_index(),
                                           jax.process_count())
  train_fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                       label_smoothing=config.label_smoothing),
                     donate_argnums=0)
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=model))
  plateau_fn = jax.jit(functools.partial(steps.plateau_step, plateau=plateau,
                                         base_learning_rate=config.learning_rate))

  _log(f'jaxres: {num_params:,} trainable parameters (budget {config.param_budget:,}); '
       f'{len(train_split)} train / {len(test_split)} test images; {num_devices} device(s) '
       f'({jax.devices()[0].platform}), {jax.process_count()} process(es)')

  with _StopRequests() as stop:
    for epoch in range(start_epoch, config.num_epochs + 1):
      first_step = start_step if epoch == start_epoch else 0
      sums = dict(partial_sums) if epoch == start_epoch else {}
      state, sums = _train_epoch(state, sums, epoch, first_step, train_fn, train_loader,
                                 batch_sharding, ckpts, config, stop)
      t_eval = time.perf_counter()
      test_sums = evaluation.evaluate(eval_fn, state, eval_loader, batch_sharding)
      learning_rate = float(jax.device_get(optim.learning_rate(state.opt_state)))
      record = _epoch_record(epoch, sums, test_sums, learning_rate,
                             sums.pop('seconds'), sums['count'])
      if config.schedule == 'plateau':
        state = plateau_fn(state, record['test_loss'])
      meta = {'epoch': epoch, 'step_in_epoch': 0}
      ckpts.save(int(jax.device_get(state.step)), state, meta,
                 metrics={'test_accuracy': record['test_accuracy']})
      record['eval_seconds'] = round(time.perf_counter() - t_eval, 3)
      records.append(record)
      if is_main:
        metrics_log.append(record)
        reporting.plot_curves(records, os.path.join(workdir, 'curves.png'))
      _log(reporting.epoch_line(record, config.num_epochs))
  ckpts.wait()
  ckpts.close()
  if records:
    _log(f'Final Test Accuracy: {records[-1]["test_accuracy"]:.4f}')
  return records


def _train_epoch(state, sums, epoch, first_step, train_fn, loader, sharding, ckpts, config, stop):
  """One epoch (from `first_step`): returns (state, train sums incl. 'seconds')."""
  progress = reporting.Progress(loader.num_batches, f'epoch {epoch}',
                                enabled=config.progress and parallel.is_main_process())
  t0 = time.perf_counter()
  pending, step_in_epoch = [], first_step

  def drain(pending):
    fetched = jax.device_get(pending)
    for i, m in enumerate(fetched):
      if not np.isfinite(m['loss_sum']):
        bad_step = int(m['step'])
        raise NonFiniteLossError(
            f'non-finite loss ({m["loss_sum"]}) at step {bad_step} (epoch {epoch}, batch '
            f'{step_in_epoch - len(fetched) + i + 1}), learning rate {float(m["learning_rate"]):.3g}; '
            f'the last good checkpoint is kept in {ckpts.directory}')
    return _add_sums(sums, fetched)

  for batch in loader.epoch(epoch, first_step):
    state, metrics = train_fn(state, parallel.global_batch(batch, sharding))
    pending.append(metrics)
    step_in_epoch += 1
    if len(pending) >= CHECK_EVERY or stop.signum is not None:
      sums = drain(pending)
      pending = []
      progress.update(step_in_epoch, f'loss {sums["loss_sum"] / max(sums["count"], 1):.4f}')
    else:
      progress.update(step_in_epoch)
    if stop.signum is not None:
      sums = drain(pending)
      ckpts.save(int(jax.device_get(state.step)), state,
                 {'epoch': epoch, 'step_in_epoch': step_in_epoch, 'train_sums': sums})
      ckpts.wait()
      ckpts.close()
      progress.close()
      raise Interrupted(stop.signum)
  sums = drain(pending)
  progress.close()
  sums['seconds'] = time.perf_counter() - t0
  return state, sums


def main(argv):
  if len(argv) > 1:
    raise UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if cli.config_value(_CONFIG) is None:
    raise UsageError('--config is required (e.g. --config experiments/base.py)')
  if not _WORKDIR.value:
    raise UsageError('--workdir is required (e.g. --workdir runs/base)')
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  train_and_evaluate(cli.config_value(_CONFIG), _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
