"""Orbax checkpoints of a run: the last few, plus the best by test accuracy.

Each checkpoint holds two items: 'state' (the TrainState pytree) and 'meta' (JSON: the
epoch, the position within it, and the running train sums of a partial epoch). Orbax
writes each step to a temporary directory and renames it when complete, so a kill at
any moment leaves either the whole checkpoint or none (a temporary directory left behind
is ignored, and removed by the next trainer).

Restoring first compares what is saved (Orbax's metadata: tree paths, shapes, dtypes)
with what the run needs: a checkpoint that does not fit (another model, optimizer or
lookahead setting, another jaxres version) is an error naming the first differing path,
and nothing is moved. Only a checkpoint that cannot be read (missing or truncated files,
bad metadata) is reported, set aside and skipped in favour of the one before.
"""

import errno
import os
import shutil
import sys
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from jaxres.errors import UsageError, causes

_policy = checkpoint_managers.preservation_policy


FREE_SPACE_MARGIN = 1 << 20  # bytes kept free beyond a checkpoint's raw array size
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_FULL_TEXT = ('No space left on device', 'File too large', 'Disk quota exceeded')
_OUT_OF_MEMORY_TEXT = ('RESOURCE_EXHAUSTED', 'Out of memory', 'out of memory')
SET_ASIDE_PREFIX = 'corrupt-'  # a damaged checkpoint N is moved to corrupt-N


class Unreadable(UsageError):
  """A checkpoint whose files cannot be read (missing, truncated, bad metadata)."""


def _accuracy(metrics) -> float:
  return metrics['test_accuracy']


def disk_full(exc: BaseException) -> Optional[str]:
  """What filled up ('No space left on device', 'Disk quota exceeded', 'File too large')
  if `exc` (or what caused it) is a full disk, a quota or a file-size limit, else None."""
  for e in causes(exc):
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
      return os.strerror(e.errno)
    for text in _DISK_FULL_TEXT:
      if text in str(e):
        return text
  return None


def _out_of_memory(exc: BaseException) -> bool:
  return any(isinstance(e, MemoryError) or any(t in str(e) for t in _OUT_OF_MEMORY_TEXT)
             for e in causes(exc))


def _root_cause(exc: BaseException, limit: int = 200) -> str:
  """'Type: message' of what first went wrong (Orbax wraps TensorStore's errors)."""
  root = causes(exc)[-1]
  return f'{type(root).__name__}: {" ".join(str(root).split())[:limit]}'


def leaf_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'params/conv1/kernel': (shape, dtype name)} of a pytree of arrays, ShapeDtypeStructs
  or Orbax array metadata, with the paths Orbax saves them under, in tree order."""
  flat = ocp.tree.to_flat_dict(tree, sep='/')
  return {path: (tuple(leaf.shape), np.dtype(leaf.dtype).name) for path, leaf in flat.items()}


def first_difference(saved: dict, wanted: dict) -> Optional[str]:
  """The first path (in `wanted`'s order, then `saved`'s) whose shape or dtype differs,
  with both, or None when the two leaf_specs agree."""

  def show(spec):
    return 'absent' if spec is None else f'{spec[1]}[{",".join(map(str, spec[0]))}]'

  for path in [*wanted, *(p for p in saved if p not in wanted)]:
    if saved.get(path) != wanted.get(path):
      return (f'{path} is {show(saved.get(path))} in the checkpoint but '
              f'{show(wanted.get(path))} in this run')
  return None


class Checkpoints:
  """A run's checkpoint directory (DIR/checkpoints)."""

  def __init__(self, directory: str, keep: int = 3, read_only: bool = False,
               asynchronous: bool = True):
    self.directory = os.path.abspath(directory)
    policy = _policy.AnyPreservationPolicy([
        _policy.LatestN(n=keep),
        _policy.BestN(get_metric_fn=_accuracy, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, create=not read_only, read_only=read_only,
        enable_async_checkpointing=asynchronous, cleanup_tmp_directories=not read_only)
    # Handlers registered up front, so that a step's metadata reads before any restore.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item, handler, save, restore in (
        ('state', ocp.StandardCheckpointHandler, ocp.args.StandardSave, ocp.args.StandardRestore),
        ('meta', ocp.JsonCheckpointHandler, ocp.args.JsonSave, ocp.args.JsonRestore)):
      registry.add(item, save, handler)
      registry.add(item, restore, handler)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         handler_registry=registry)

  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def best_step(self) -> Optional[int]:
    return self.manager.best_step()

  def save(self, step: int, state, meta: dict, metrics: Optional[dict] = None):
    """Save (asynchronously) at `step`; `metrics` (with test_accuracy) ranks the best.

    A checkpoint already at `step` (one written on SIGTERM after the epoch's last step)
    is replaced. A full disk becomes a UsageError; the previous checkpoints stay valid.
    """
    with self._disk_errors(step):
      self.manager.wait_until_finished()  # the previous save, so free space is current
      if step in self.manager.all_steps():
        self.manager.delete(step)
      self._check_free_space(step, state)
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)),
                        metrics=metrics, force=True)

  def wait(self):
    with self._disk_errors(None):
      self.manager.wait_until_finished()

  def close(self):
    with self._disk_errors(None):
      self.manager.close()

  def _check_free_space(self, step: int, state):
    """UsageError before writing anything if the disk cannot hold one more checkpoint."""
    need = sum(x.nbytes for x in jax.tree.leaves(state)) + FREE_SPACE_MARGIN
    free = shutil.disk_usage(self.directory).free
    if free < need:
      raise UsageError(f'disk full: checkpoint {step} needs about {need / 2**20:.1f} MiB but '
                       f'{self.directory} has {free / 2**20:.1f} MiB free; free space and rerun '
                       f'the same command to resume from the last complete checkpoint')

  def delete_all(self):
    """Remove every checkpoint, and those set aside (starting a run over)."""
    for step in self.steps():
      self.manager.delete(step)
    for name in self.set_aside() if jax.process_index() == 0 else ():
      shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def set_aside(self) -> list[str]:
    """Names of the damaged checkpoints moved aside (corrupt-N), oldest first."""
    if not os.path.isdir(self.directory):
      return []
    names = [n for n in os.listdir(self.directory) if n.startswith(SET_ASIDE_PREFIX)]
    return sorted(names, key=lambda n: (len(n), n))

  def _disk_errors(self, step):
    directory = self.directory

    class _Guard:
      def __enter__(self):
        return self

      def __exit__(self, exc_type, exc, tb):
        reason = disk_full(exc) if exc is not None else None
        if reason:
          where = f'checkpoint {step}' if step is not None else 'a checkpoint'
          raise UsageError(f'disk full while writing {where} to {directory} ({reason}); free '
                           f'space and rerun the same command to resume from the last complete '
                           f'checkpoint') from None
        return False

    return _Guard()

  def restore(self, step: int, target, hint: str = '') -> tuple[Any, dict]:
    """(state, meta) of checkpoint `step`, laid out like `target`.

    `target` holds arrays or jax.ShapeDtypeStructs; their shardings say where the
    restored arrays go, whatever the device count of the run that saved them.
    UsageError, touching nothing, if the checkpoint does not fit `target` (`hint` says
    what to do) or memory runs out; Unreadable if its files cannot be read.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    difference = first_difference(self._saved_specs(step), leaf_specs(abstract))
    if difference:
      raise UsageError(f'checkpoint {step} in {self.directory} does not fit this run: '
                       f'{difference} (saved by another model, optimizer, lookahead setting '
                       f'or jaxres version); nothing was changed{hint}')
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise self._read_error(step, e) from None
    return restored['state'], dict(restored['meta'])

  def _saved_specs(self, step: int) -> dict:
    """leaf_specs of the state saved at `step`, from its metadata alone."""
    try:
      metadata = self.manager.item_metadata(step)['state']
    except Exception as e:  # pylint: disable=broad-except
      raise self._read_error(step, e) from None
    if metadata is None:
      raise Unreadable(f'checkpoint {step} in {self.directory} is unreadable (no state '
                       f'metadata)')
    return leaf_specs(metadata.tree)

  def _read_error(self, step: int, exc: Exception) -> UsageError:
    if _out_of_memory(exc):
      return UsageError(f'out of memory while restoring checkpoint {step} from {self.directory} '
                        f'({_root_cause(exc, 120)}); nothing was changed: free memory and rerun')
    return Unreadable(f'checkpoint {step} in {self.directory} is unreadable ({_root_cause(exc)})')

  def restore_latest_valid(self, target, log=print, hint: str = ''
                           ) -> Optional[tuple[int, Any, dict]]:
    """(step, state, meta) of the newest checkpoint that restores; None if none exist.

    An unreadable checkpoint is reported, set aside and skipped; if every one is, or one
    does not fit `target`, UsageError.
    """
    steps = sorted(self.steps(), reverse=True)
    for step in steps:
      try:
        state, meta = self.restore(step, target, hint)
        return step, state, meta
      except Unreadable as e:
        log(f'warning: {e}; moved aside to {SET_ASIDE_PREFIX}{step}, falling back to the '
            f'previous one', file=sys.stderr)
        self._set_aside(step)
    if steps:
      raise UsageError(f'no readable checkpoint in {self.directory} (tried steps {steps}, '
                       f'moved aside); start over with --config.resume=False or use another '
                       f'--workdir')
    return None

  def _set_aside(self, step: int):
    """Move a damaged checkpoint out of the way (kept for inspection, never restored).
    Process 0 moves it; every process waits for that, then rereads the directory."""
    if self.manager._options.read_only:  # pylint: disable=protected-access
      return
    if jax.process_index() == 0:
      path = os.path.join(self.directory, str(step))
      target = os.path.join(self.directory, f'{SET_ASIDE_PREFIX}{step}')
      shutil.rmtree(target, ignore_errors=True)
      os.replace(path, target)
    ocp.multihost.sync_global_processes(f'jaxres_set_aside_{step}')
    self.manager.reload()

  def resolve(self, which: str) -> int:
    """A step number from 'latest', 'best' or an integer string."""
    steps = self.steps()
    if not steps:
      raise UsageError(f'no checkpoints in {self.directory}')
    if which == 'latest':
      return max(steps)
    if which == 'best':
      best = self.best_step()
      if best is None:
        raise UsageError(f'no checkpoint in {self.directory} has test metrics to rank')
      return best
    try:
      step = int(which)
    except ValueError:
      raise UsageError(f'--step must be latest, best or a step number, got {which!r}') from None
    if step not in steps:
      raise UsageError(f'no checkpoint at step {step} in {self.directory} (have {sorted(steps)})')
    return step


def abstract_state(config, model, tx, sharding=None):
  """Shapes, dtypes (and sharding) of a TrainState for `config`, computing nothing."""
  import functools
  from jaxres import train_state
  shapes = jax.eval_shape(functools.partial(train_state.create, config, model, tx))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def load_run(workdir: str, which: str = 'latest', mesh=None):
  """(config, model, state, step) of a finished or running jaxres workdir."""
  from jaxres import config_lib, models, optim, parallel
  config = config_lib.load_json(os.path.join(workdir, 'config.json'))
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    raise UsageError(f'{workdir} has no checkpoints/ directory')
  ckpts = Checkpoints(ckpt_dir, read_only=True)
  step = ckpts.resolve(which)
  mesh = mesh or parallel.make_mesh()
  model = models.create_model(config, mesh.devices.size)
  target = abstract_state(config, model, optim.create_optimizer(config), parallel.replicated(mesh))
  state, _ = ckpts.restore(step, target)
  ckpts.close()
  return config, model, state, step
