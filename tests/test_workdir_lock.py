"""One trainer per workdir: the lock file, its heartbeat and its takeover (issue: reliability)."""

import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from jaxres import workdir_lock
from jaxres.errors import UsageError


def _hold(workdir, host, pid, age=0.0):
  """A lock file as another trainer would have left it, its heartbeat `age` seconds old."""
  path = workdir / workdir_lock.LOCK_NAME
  path.write_text(json.dumps({'host': host, 'pid': pid, 'started': '2024-01-01 00:00:00',
                              'token': 'theirs'}))
  if age:
    mtime = path.stat().st_mtime - age
    os.utime(path, (mtime, mtime))
  return path


def _dead_pid():
  child = subprocess.Popen([sys.executable, '-c', ''])
  child.wait()
  return child.pid


def _take(workdir):
  log = io.StringIO()
  lock = workdir_lock.acquire(str(workdir), log=lambda *a, **k: print(*a, file=log))
  return lock, log.getvalue()


def test_one_holder_then_released(tmp_path):
  lock, warnings = _take(tmp_path)
  assert not warnings
  holder = json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())
  assert holder['host'] == socket.gethostname() and holder['pid'] == os.getpid()
  with pytest.raises(UsageError, match=rf'in use by another trainer \(host '
                                       rf'{socket.gethostname()}, pid {os.getpid()}, since '):
    _take(tmp_path)
  lock.release()
  assert os.listdir(tmp_path) == []  # no lock, no temporary file
  _take(tmp_path)[0].release()


@pytest.mark.parametrize('case', ['dead process on this host', 'silent host'])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, case):
  if case == 'dead process on this host':
    _hold(tmp_path, socket.gethostname(), _dead_pid())
    reason = 'which no longer runs'
  else:
    _hold(tmp_path, 'elsewhere', 1, age=workdir_lock.STALE_SECONDS + 60)
    reason = 'whose heartbeat stopped'
  lock, warnings = _take(tmp_path)
  assert warnings.startswith(f'warning: taking over the lock of {tmp_path} left by host ')
  assert reason in warnings and warnings.count('\n') == 1
  assert lock.held()
  lock.release()


@pytest.mark.parametrize('case', ['live process on this host', 'beating host'])
def test_a_live_lock_is_respected(tmp_path, case):
  if case == 'live process on this host':
    path = _hold(tmp_path, socket.gethostname(), os.getppid(), age=1e6)  # beat does not matter
  else:
    path = _hold(tmp_path, 'elsewhere', 1, age=workdir_lock.STALE_SECONDS / 2)
  before = path.read_text()
  with pytest.raises(UsageError, match='in use by another trainer'):
    _take(tmp_path)
  assert path.read_text() == before


def test_release_leaves_a_lock_taken_over_by_another(tmp_path):
  lock, _ = _take(tmp_path)
  lock.release()
  path = _hold(tmp_path, 'elsewhere', 1)
  lock.release()
  assert path.exists()


def test_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, 'HEARTBEAT_SECONDS', 0.05)
  lock, _ = _take(tmp_path)
  path = tmp_path / workdir_lock.LOCK_NAME
  os.utime(path, (0, 0))
  time.sleep(0.5)
  assert path.stat().st_mtime > 0
  lock.release()


def test_without_hard_links_the_lock_is_created_exclusively(tmp_path, monkeypatch):
  def no_links(*args):
    raise PermissionError(1, 'Operation not permitted')

  monkeypatch.setattr(os, 'link', no_links)
  lock, _ = _take(tmp_path)
  assert lock.held()
  with pytest.raises(UsageError, match='in use by another trainer'):
    _take(tmp_path)
  lock.release()
  assert os.listdir(tmp_path) == []
