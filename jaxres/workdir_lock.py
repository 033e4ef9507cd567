"""One trainer per workdir: a lock file that a trainer holds for its lifetime.

DIR/trainer.lock holds JSON {host, pid, pid_start, started, token}. It is created
atomically: written under a unique temporary name, then hard-linked to its own name,
which fails if a lock exists (atomic on local and network file systems, NFS included;
where hard links are not supported, created with O_CREAT | O_EXCL instead).
While held, a daemon thread refreshes the file's modification time every
HEARTBEAT_SECONDS. A lock is stale, and is taken over with a one-line warning, when its
holder ran on this host and no longer runs (kill -9, a crash), or when its heartbeat is
older than STALE_SECONDS (a holder on another host, e.g. a crashed one). Ages are measured
on the file system's clock (against a file just written), so clocks of hosts that
disagree do not matter.

In a multi-process run process 0 takes the lock and every process learns the outcome
(`acquire_for_run`). Readers (jaxres.eval, predict, export_torch) never take it.
"""

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Optional

from jaxres.errors import UsageError

LOCK_NAME = 'trainer.lock'
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 120.0
_MESSAGE_BYTES = 1024  # a refusal shared with the other processes of a run


def _process_start(pid: int) -> Optional[str]:
  """The start time of process `pid` (Linux /proc), to tell a reused pid apart."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _running(pid: int, start: Optional[str]) -> bool:
  """Whether process `pid` of this host, started at `start` (if known), still runs."""
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process
  now = _process_start(pid)
  return start is None or now is None or now == start


def _describe(holder: Optional[dict]) -> str:
  if not holder:
    return 'an unknown process'
  return f'host {holder.get("host")}, pid {holder.get("pid")}, since {holder.get("started")}'


def stale_reason(holder: Optional[dict], age: float, host: str) -> Optional[str]:
  """Why a lock held by `holder` (its JSON; None if unreadable) whose heartbeat is `age`
  seconds old may be taken over, or None while its holder may still run."""
  if holder and holder.get('host') == host:
    if not _running(int(holder.get('pid', -1)), holder.get('pid_start')):
      return 'which no longer runs'
    return None
  if age > STALE_SECONDS:
    return f'whose heartbeat stopped {age:.0f} s ago'
  return None


def _read(path: str) -> tuple[Optional[dict], Optional[float]]:
  """(holder JSON or None, modification time) of the lock file; (None, None) if absent."""
  try:
    mtime = os.stat(path).st_mtime
    with open(path) as f:
      return json.load(f), mtime
  except FileNotFoundError:
    return None, None
  except (OSError, ValueError):
    return None, mtime


class WorkdirLock:
  """A held lock; `release()` (idempotent) removes it and stops the heartbeat."""

  def __init__(self, path: str, token: str):
    self.path, self.token = path, token
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, name='jaxres-lock-heartbeat',
                                    daemon=True)
    self._thread.start()

  def held(self) -> bool:
    holder, _ = _read(self.path)
    return bool(holder) and holder.get('token') == self.token

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_SECONDS):
      if not self.held():
        print(f'warning: the lock {self.path} was removed or taken over by another trainer; '
              f'two trainers may now write this workdir', file=sys.stderr, flush=True)
        return
      try:
        os.utime(self.path)
      except OSError:
        pass  # the next beat tries again

  def release(self):
    self._stop.set()
    if self.held():
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def acquire(workdir: str, log=print) -> WorkdirLock:
  """Take the lock of `workdir` (which exists); UsageError naming the holder if in use."""
  path = os.path.join(workdir, LOCK_NAME)
  host, token = socket.gethostname(), uuid.uuid4().hex
  mine = {'host': host, 'pid': os.getpid(), 'pid_start': _process_start(os.getpid()),
          'started': time.strftime('%Y-%m-%d %H:%M:%S %z'), 'token': token}
  tmp = f'{path}.{token}.tmp'
  try:
    with open(tmp, 'w') as f:
      json.dump(mine, f)
      f.flush()
      os.fsync(f.fileno())
    for _ in range(5):  # a few rounds: a contender may take over a stale lock meanwhile
      if _create(tmp, path):
        return WorkdirLock(path, token)
      holder, mtime = _read(path)
      if mtime is None:
        continue  # released meanwhile
      os.utime(tmp)
      reason = stale_reason(holder, os.stat(tmp).st_mtime - mtime, host)
      if reason is None:
        raise UsageError(f'workdir {workdir} is in use by another trainer ({_describe(holder)}); '
                         f'wait for it to finish or stop it (a lock left by a process that '
                         f'died is taken over)')
      if _break(path, holder, token):
        log(f'warning: taking over the lock of {workdir} left by {_describe(holder)}, '
            f'{reason}', file=sys.stderr)
    raise UsageError(f'workdir {workdir}: could not take its lock {path} (other trainers '
                     f'are starting on it)')
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def _create(tmp: str, path: str) -> bool:
  """Create the lock `path` with the contents of `tmp`; False if it exists."""
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  except OSError:  # no hard links on this file system
    pass
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w') as f, open(tmp) as source:
    f.write(source.read())
  return True


def _break(path: str, holder: Optional[dict], token: str) -> bool:
  """Remove the stale lock `holder`; False if another contender replaced it meanwhile
  (then that lock is put back)."""
  aside = f'{path}.{token}.stale'
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return False
  now, _ = _read(aside)
  if holder is not None and now != holder:  # not the lock judged stale: restore it
    _create(aside, path)
    os.remove(aside)
    return False
  os.remove(aside)
  return True


def _share(message: str) -> str:
  """Process 0's `message` ('' for none), on every process."""
  import numpy as np
  from jax.experimental import multihost_utils
  data = np.zeros(_MESSAGE_BYTES, np.uint8)
  encoded = message.encode()[:_MESSAGE_BYTES]
  data[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  shared = np.asarray(multihost_utils.broadcast_one_to_all(data))
  return bytes(shared).rstrip(b'\0').decode(errors='replace')


def acquire_for_run(workdir: str, log=print) -> Optional[WorkdirLock]:
  """The lock of a run's workdir: process 0 takes it (others get None); a refusal is a
  UsageError on every process, so none of them waits for the others."""
  import jax
  lock, refusal = None, ''
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir, log)
    except UsageError as e:
      refusal = str(e)
    except OSError as e:
      refusal = (f'workdir {workdir}: cannot write its lock file {LOCK_NAME} ({e.strerror}); '
                 f'nothing was changed')
  if jax.process_count() > 1:
    refusal = _share(refusal)
  if refusal:
    raise UsageError(refusal)
  return lock
