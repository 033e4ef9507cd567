"""Train a config: `python -m jaxres.train --config experiments/base.py --workdir DIR`.

Any config field can be overridden on the command line: --config.num_epochs=10,
--config.data.root=/data/cifar10, --config.model.widths='(16,32,64,128)'.

The workdir receives metrics.jsonl (one JSON object per epoch), curves.png,
TensorBoard event files (events.out.tfevents.*), config.json (the resolved config) and
checkpoints/ (Orbax: the last few and the best by test accuracy). Rerunning the same
command on the same workdir resumes.
"""

import contextlib
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
from jaxres import cli, config_lib, evaluation, feeds, input_pipeline, models
from jaxres import optim, parallel, reporting, runtime, steps, tensorboard, workdir_lock
from jaxres import train_state as train_state_lib
from jaxres.errors import Interrupted, NonFiniteLossError, UsageError

CHECK_EVERY = 50  # steps between host-side looks at the loss (non-finite check, progress)
# Fields that may differ between a run and its resumption: they do not change what is
# computed. num_epochs too, where nothing computes a total from it (_epoch_dependents).
RESUMABLE_CHANGES = ('resume', 'allow_config_change', 'progress', 'data.num_workers',
                     'log_train_steps', 'tensorboard', 'host_allocator', 'compilation_cache')
# What to do about a workdir whose run cannot continue as asked.
START_OVER_HINT = 'use another --workdir, or --config.resume=False to start over'
PLOT_EVERY_SECONDS = 60  # curves.png is redrawn at most this often (and at the end)


def _log(*args, **kwargs):
  if parallel.is_main_process():
    print(*args, **kwargs, flush=True)


class _StopRequests:
  """Turns the first SIGINT/SIGTERM into a request to stop after the current step.

  With several processes, a signal may reach only some of them; `agreed()` makes every
  process take the same decision (a tiny all-gather, done only at check points).
  """

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

  @property
  def requested(self) -> bool:
    """This process saw a signal (single process: act on it at once)."""
    return self.signum is not None and jax.process_count() == 1

  def agreed(self) -> Optional[int]:
    """The signal number if any process saw one, identically on every process."""
    if jax.process_count() == 1:
      return self.signum
    from jax.experimental import multihost_utils
    seen = multihost_utils.process_allgather(np.asarray(self.signum or 0, np.int32))
    return int(np.max(seen)) or None

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


def _epoch_dependents(config) -> dict[str, str]:
  """{setting: what it changes} for the settings that count their steps from
  config.num_epochs (the triangle schedule, lookahead): with any, a resumed run cannot
  change num_epochs."""
  dependents = {}
  if optim.schedule(config).counts_from_num_epochs:
    dependents[f'config.schedule={config.schedule}'] = 'learning rate'
  lookahead = config.get('lookahead')
  if lookahead is not None and lookahead.enabled:
    dependents['config.lookahead'] = 'weight averaging'
  return dependents


def check_resume(config, workdir: str) -> None:
  """UsageError if `workdir` holds a run of a different config that we would resume."""
  saved_path = os.path.join(workdir, 'config.json')
  if not config.resume or not os.path.exists(saved_path) or config.allow_config_change:
    return
  saved = config_lib.load_json(saved_path)
  resumable = RESUMABLE_CHANGES + (() if _epoch_dependents(saved) else ('num_epochs',))
  changed = [d for d in config_lib.differences(saved.to_dict(), config_lib.to_dict(config))
             if d not in resumable]
  override = '--config.allow_config_change=True to resume anyway'
  if changed == ['num_epochs']:
    dependents = _epoch_dependents(saved)
    raise UsageError(f'{workdir} holds a run of num_epochs={saved.num_epochs} whose '
                     f'{" and ".join(dependents)} count steps from that total: resuming it with '
                     f'num_epochs={config.num_epochs} would change its '
                     f'{" and ".join(dependents.values())} mid-run; {START_OVER_HINT}, or '
                     f'{override}')
  if changed:
    raise UsageError(f'{workdir} holds a run with a different config ({", ".join(changed)}); '
                     f'{START_OVER_HINT}, or {override}')


def epoch_record(epoch, train_sums, test_sums, learning_rate, seconds, images,
                 split_name='test') -> dict:
  """One line of metrics.jsonl; test_sums is None for an epoch without evaluation.
  Evaluated on another split than the test set (split_name 'holdout'), the test_*
  figures are that split's and the record says so in 'eval_split'."""
  record = {'epoch': epoch}
  record.update(steps.summarize(train_sums, 'train'))
  if test_sums is not None:
    record.update(steps.summarize(test_sums, 'test'))
    if split_name != 'test':
      record['eval_split'] = split_name
  record['learning_rate'] = float(learning_rate)
  record['epoch_seconds'] = round(seconds, 3)
  record['images_per_second'] = round(images / max(seconds, 1e-9), 1)
  return record


def train_function(feed, model, tx, config, lookahead=None, frozen=()):
  """The jitted train function for `feed`'s arguments: steps.train_step on made batches,
  or, for a feed with a make_batch (feeds.DeviceFeed), steps.train_steps_on_device
  making them inside the step. The state argument is donated."""
  options = dict(model=model, tx=tx, label_smoothing=config.label_smoothing,
                 lookahead=lookahead, frozen=frozen)
  if feed.make_batch is None:
    step = functools.partial(steps.train_step, **options)
  else:
    step = functools.partial(steps.train_steps_on_device, make_batch=feed.make_batch, **options)
  return jax.jit(step, donate_argnums=0)


def _add_sums(total: dict, step_metrics: list) -> dict:
  """Add fetched per-step metric sums into `total` (float64, fixed order)."""
  for m in step_metrics:
    for key in ('loss_sum', 'correct', 'count'):
      total[key] = total.get(key, 0.0) + float(m[key])
  return total


def _prepare_workdir(config, workdir: str, ckpts, state, is_main: bool):
  """Restore the latest valid checkpoint (if resuming) and align metrics.jsonl with it.

  Returns (state, start_epoch, start_step, partial train sums, records so far).
  """
  metrics_log = reporting.MetricsLog(os.path.join(workdir, 'metrics.jsonl'))
  restored = (ckpts.restore_latest_valid(state, log=_log, hint=f'; {START_OVER_HINT}')
              if config.resume else None)
  if not restored:
    if config.resume:
      _check_nothing_to_lose(workdir, metrics_log.read(), ckpts.set_aside())
    if ckpts.steps() or ckpts.set_aside():
      _log(f'Starting over (config.resume=False): removing the checkpoints in {ckpts.directory}')
      ckpts.delete_all()
    if is_main:
      metrics_log.keep_through(0)
    return state, 1, 0, {}, []
  step, state, meta = restored
  epoch, step_in_epoch = meta['epoch'], meta['step_in_epoch']
  _log(f'Resuming from checkpoint {step} (epoch {epoch}, '
       f'{"after step " + str(step_in_epoch) if step_in_epoch else "end of epoch"})')
  done_epochs = epoch if step_in_epoch == 0 else epoch - 1
  records = metrics_log.keep_through(done_epochs) if is_main else []
  if step_in_epoch == 0:  # an end-of-epoch checkpoint: continue with the next epoch
    return state, epoch + 1, 0, {}, records
  return state, epoch, step_in_epoch, meta.get('train_sums', {}), records


def _check_nothing_to_lose(workdir: str, records: list[dict], set_aside: list[str]):
  """UsageError if a workdir without a checkpoint to resume holds a run: checkpoints set
  aside as unreadable, or metrics of more than epoch 1 (a kill before the first
  checkpoint was complete can leave epoch 1's record alone: that run starts over)."""
  found = []
  if any(r['epoch'] > 1 for r in records):
    found.append(f'metrics.jsonl with {len(records)} epochs')
  if set_aside:
    found.append(f'unreadable checkpoints set aside as {", ".join(set_aside)}')
  if found:
    raise UsageError(f'{workdir} holds a run ({"; ".join(found)}) but no checkpoint to resume '
                     f'from; --config.resume=False starts over (removing them), or use another '
                     f'--workdir')
  if records:
    _log('No checkpoint of epoch 1 was complete: starting over')


def train_and_evaluate(config, workdir: str) -> list[dict]:
  """Run (or resume) training of `config` in `workdir`; returns the epoch records.

  The command calls runtime.start first (start-up order, JAX options); as a library
  function this only checks the config, for this platform.
  """
  config_lib.validate(config)
  runtime.check(config)
  num_params = config_lib.check_budget(config)
  _check_workdir(workdir)
  mesh = parallel.make_mesh()
  num_devices = mesh.devices.size
  parallel.check_batch_size(config.batch_size, mesh)
  check_resume(config, workdir)
  train_split, eval_split, split_name = input_pipeline.evaluation_split(
      config.data, *input_pipeline.load(config.data, config.seed))
  if train_split.labels.max() >= config.model.num_classes:
    raise UsageError(f'the data has {len(train_split.classes)} classes but '
                     f'config.model.num_classes={config.model.num_classes}')
  if config.data.drop_last and len(train_split) < config.batch_size:
    raise UsageError(f'config.batch_size={config.batch_size} is more than the {len(train_split)} '
                     f'training images and config.data.drop_last=True: an epoch would have no '
                     f'batch; use a smaller batch')

  # Nothing in the workdir changes before this point.
  is_main = parallel.is_main_process()
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  # One trainer per workdir, held until every checkpoint is written.
  with workdir_lock.acquire_for_run(workdir, log=_log) or contextlib.nullcontext():
    ckpts = checkpoints_lib.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                        keep=config.checkpoint_keep)
    try:
      return _train(config, workdir, mesh, num_params, train_split, eval_split, split_name,
                    ckpts, is_main)
    except OSError as e:
      if checkpoints_lib.disk_full(e):
        raise UsageError(f'disk full while writing to {workdir} ({e.strerror}: {e.filename}); '
                         f'free space and rerun the same command to resume') from None
      raise
    finally:
      ckpts.close()  # waits for a checkpoint still being written


def _train(config, workdir, mesh, num_params, train_split, eval_split, split_name, ckpts,
           is_main):
  num_devices = mesh.devices.size
  model = models.create_model(config, num_devices)
  feed = feeds.create(config, train_split, mesh)
  tx = optim.create_optimizer(config, steps_per_epoch=feed.num_batches)
  lookahead = optim.create_lookahead(config, feed.num_batches)
  plateau = optim.create_plateau(config)
  batch_sharding = parallel.data_sharding(mesh)
  overrides = models.data_init(config, input_pipeline.normalize(
      train_split.images[:models.data_images(config)], config.data.mean, config.data.std))
  state = jax.jit(functools.partial(train_state_lib.create, config, model, tx),
                  out_shardings=parallel.replicated(mesh))(overrides)
  state, start_epoch, start_step, partial_sums, records = _prepare_workdir(
      config, workdir, ckpts, state, is_main)
  steps_on_test_loss = optim.schedule(config).steps_on_test_loss
  if (start_epoch > 1 or start_step) and steps_on_test_loss:
    # A resumed run takes config.learning_rate (it may have been changed on purpose with
    # allow_config_change); unchanged, this recomputes the learning rate bit for bit.
    state = jax.jit(functools.partial(steps.apply_plateau_scale,
                                      base_learning_rate=config.learning_rate))(state)
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json(indent=2))
  metrics_log = reporting.MetricsLog(os.path.join(workdir, 'metrics.jsonl'))
  steps_log = (reporting.MetricsLog(os.path.join(workdir, 'train_steps.jsonl'))
               if config.log_train_steps and is_main else None)
  if steps_log:
    steps_log.keep_while(lambda r: r['step'] <= int(jax.device_get(state.step)))
  # Events beside metrics.jsonl; a resumed run starts a new file (config.get: configs
  # saved before the field existed write them too).
  tb_writer = (tensorboard.EventWriter(workdir, start_step=int(jax.device_get(state.step)) + 1)
               if config.get('tensorboard', True) and is_main else None)

  # One compiled step per set of frozen parameters (optim.frozen_in_epoch): a parameter
  # that config.frozen_after freezes stops costing its backward pass in later epochs.
  train_fns = {}

  def train_fn_for(epoch):
    frozen = optim.frozen_in_epoch(config, epoch)
    if frozen not in train_fns:
      train_fns[frozen] = train_function(feed, model, tx, config, lookahead, frozen)
    return train_fns[frozen]

  sync_fn = jax.jit(lookahead.sync, donate_argnums=0) if lookahead else None
  eval_loader = input_pipeline.eval_loader(eval_split, config, jax.process_index(),
                                           jax.process_count(), num_devices)
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=model,
                                      **evaluation.tta_options(config)))
  plateau_fn = jax.jit(functools.partial(steps.plateau_step, plateau=plateau,
                                         base_learning_rate=config.learning_rate))

  _log(f'jaxres: {num_params:,} trainable parameters (budget {config.param_budget:,}); '
       f'{len(train_split)} train / {len(eval_split)} {split_name} images; '
       f'{num_devices} device(s) '
       f'({jax.devices()[0].platform}), {jax.process_count()} process(es)')
  _log(f'jaxres: {runtime.describe(config)}')
  last_plot = time.perf_counter()
  # Compilation (each new step, and the evaluation's first call) is timed apart:
  # epoch_seconds and eval_seconds leave it out, compile_seconds holds it.
  with (_StopRequests() as stop, reporting.CompileClock() as clock,
        tb_writer or contextlib.nullcontext()):
    for epoch in range(start_epoch, config.num_epochs + 1):
      resumed = epoch == start_epoch
      compiled_before = clock.seconds
      state, sums = _train_epoch(state, dict(partial_sums) if resumed else {}, epoch,
                                 start_step if resumed else 0, train_fn_for(epoch), feed,
                                 ckpts, config, stop, steps_log, clock, tb_writer)
      if sync_fn:
        state = sync_fn(state)
      t_eval, compiled_before_eval = time.perf_counter(), clock.seconds
      evaluate_now = config.eval_every_epoch or epoch == config.num_epochs
      test_sums = (evaluation.evaluate(eval_fn, state, eval_loader.epoch(0), batch_sharding)
                   if evaluate_now else None)
      learning_rate = float(jax.device_get(optim.learning_rate(state.opt_state)))
      seconds = sums.pop('seconds')
      record = epoch_record(epoch, sums, test_sums, learning_rate, seconds, sums['count'],
                             split_name)
      if steps_on_test_loss:
        state = plateau_fn(state, record['test_loss'])
      ckpts.save(int(jax.device_get(state.step)), state, {'epoch': epoch, 'step_in_epoch': 0},
                 metrics={'test_accuracy': record['test_accuracy']} if evaluate_now else None)
      record['eval_seconds'] = round(time.perf_counter() - t_eval
                                     - (clock.seconds - compiled_before_eval), 3)
      record['compile_seconds'] = round(clock.seconds - compiled_before, 3)
      records.append(record)
      if is_main:
        metrics_log.append(record)
        if tb_writer:
          tb_writer.scalars(tensorboard.epoch_scalars(record), int(jax.device_get(state.step)))
          tb_writer.flush()
        if time.perf_counter() - last_plot > PLOT_EVERY_SECONDS or epoch == config.num_epochs:
          reporting.plot_curves(records, os.path.join(workdir, 'curves.png'))
          last_plot = time.perf_counter()
      _log(reporting.epoch_line(record, config.num_epochs))
      signum = stop.agreed()
      if signum:  # arrived during evaluation: the checkpoint is written
        ckpts.wait()
        raise Interrupted(signum)
  ckpts.wait()
  if records:
    _log(f'Final {reporting.eval_name(records[-1])} Accuracy: '
         f'{records[-1]["test_accuracy"]:.4f}')
  return records


def _per_step(metrics: dict) -> list[dict]:
  """Fetched metrics of one dispatch (scalars, or stacked over scanned steps) as a list."""
  if np.ndim(metrics['loss_sum']) == 0:
    return [metrics]
  return [{k: v[i] for k, v in metrics.items()} for i in range(len(metrics['loss_sum']))]


def _train_epoch(state, sums, epoch, first_step, train_fn, feed, ckpts, config, stop,
                 steps_log=None, clock=None, tb_writer=None):
  """One epoch (from `first_step`): returns (state, train sums incl. 'seconds', the
  epoch's wall time less what `clock`, a reporting.CompileClock, counted in it).
  tb_writer (a tensorboard.EventWriter) gets the loss of the steps between two looks."""
  progress = reporting.Progress(feed.num_batches, f'epoch {epoch}',
                                enabled=config.progress and parallel.is_main_process())
  t0, compiled_before = time.perf_counter(), clock.seconds if clock else 0.0
  pending, pending_steps, step_in_epoch = [], 0, first_step

  def drain(pending):
    """Fetch queued step metrics; stop at the first non-finite loss."""
    fetched = [m for dispatch in jax.device_get(pending) for m in _per_step(dispatch)]
    for i, m in enumerate(fetched):
      if not np.isfinite(m['loss_sum']):
        raise NonFiniteLossError(
            f'non-finite loss ({m["loss_sum"]}) at step {int(m["step"])} (epoch {epoch}, batch '
            f'{step_in_epoch - len(fetched) + i + 1} of {feed.num_batches}), learning rate '
            f'{float(m["learning_rate"]):.3g}; stopped without saving, the last good '
            f'checkpoint is kept in {ckpts.directory}')
      if steps_log:
        steps_log.append({'step': int(m['step']), 'epoch': epoch,
                          'loss': float(m['loss_sum']) / float(m['count']),
                          'accuracy': float(m['correct']) / float(m['count'])})
    if tb_writer and fetched:
      tb_writer.scalars(tensorboard.window_scalars(fetched), int(fetched[-1]['step']))
      tb_writer.flush()
    return _add_sums(sums, fetched)

  for num_steps, args in feed.epoch(epoch, first_step):
    state, metrics = train_fn(state, *args)
    pending.append(metrics)
    pending_steps += num_steps
    step_in_epoch += num_steps
    signum = None
    if pending_steps >= CHECK_EVERY or stop.requested:
      sums = drain(pending)
      pending, pending_steps = [], 0
      progress.update(step_in_epoch, f'loss {sums["loss_sum"] / max(sums["count"], 1):.4f}')
      signum = stop.agreed()
    else:
      progress.update(step_in_epoch)
    if signum:
      progress.close()
      ckpts.save(int(jax.device_get(state.step)), state,
                 {'epoch': epoch, 'step_in_epoch': step_in_epoch, 'train_sums': sums})
      ckpts.wait()
      raise Interrupted(signum)
  sums = drain(pending)
  progress.close()
  sums['seconds'] = time.perf_counter() - t0 - ((clock.seconds if clock else 0.0) - compiled_before)
  return state, sums


def command():
  """The command-line entry point: defines the flags (only then, so that importing this
  module as a library defines none) and returns main(argv)."""
  config_flag = config_flags.DEFINE_config_file(
      'config', None, 'Path to a config file (get_config()).', lock_config=True)
  workdir_flag = flags.DEFINE_string('workdir', None,
                                     'Directory for metrics, curves and checkpoints.')
  coordinator_flag = flags.DEFINE_string('coordinator_address', None,
                                         'host:port of process 0, for a multi-host run '
                                         '(default: $JAX_COORDINATOR_ADDRESS).')
  num_processes_flag = flags.DEFINE_integer(
      'num_processes', None, 'Processes in a multi-host run (default: $JAX_NUM_PROCESSES).')
  process_id_flag = flags.DEFINE_integer(
      'process_id', None, 'This process, 0..num_processes-1 (default: $JAX_PROCESS_ID).')

  def main(argv):
    if len(argv) > 1:
      raise UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    if cli.config_value(config_flag) is None:
      raise UsageError('--config is required (e.g. --config experiments/base.py)')
    if not workdir_flag.value:
      raise UsageError('--workdir is required (e.g. --workdir runs/base)')
    config = cli.config_value(config_flag)
    runtime.start(config, coordinator_flag.value, num_processes_flag.value,
                  process_id_flag.value)
    train_and_evaluate(config, workdir_flag.value)

  return main


if __name__ == '__main__':
  cli.run(command())
