"""How the host's C allocator serves the large buffers XLA allocates and frees every step.

On the CPU backend every activation of a train step is a host buffer from malloc. glibc
hands buffers above 32 MB (batch 1024 at 31 x 31 x 64 floats is 252 MB) straight to mmap
and unmaps them when they are freed, so each step faults every page of its working set
in again, 4 KB at a time, and much of the step's CPU time goes to the kernel
(BENCHMARKS.md, host memory).

Policy 'hugepages' (config.host_allocator) runs the command under glibc's tunable
glibc.malloc.hugetlb=1: malloc asks for transparent huge pages (madvise MADV_HUGEPAGE)
on the memory it maps, so the same working set faults in 2 MB at a time instead of 4 KB.
Memory use does not change. Tunables are read when a process starts, so `apply` restarts
the command (the same interpreter and arguments, os.execve: the same process id) with the
tunable added to its environment -- once: the restarted process finds it set and goes
on. This costs the command's imports a second time (seconds).

Policy 'system' leaves the allocator as it is. 'hugepages' does nothing where it cannot
help: outside Linux with glibc, or where the kernel has transparent huge pages off; and
a command applies it (jaxres.cpu.prepare_process) only when the run's platform is the CPU
(on an accelerator the activations are device buffers, and a restart would only cost
start-up time).

(Keeping freed memory in the process instead -- mallopt M_MMAP_MAX=0, M_ARENA_MAX=1,
M_TRIM_THRESHOLD=max -- was as fast, but the heap fragmented and a fast.py timing's
resident set kept growing towards the machine's memory; it is not offered.)
"""

import ctypes
import ctypes.util
import os
import sys
from typing import Mapping, Optional

POLICIES = ('hugepages', 'system')
TUNABLE = 'glibc.malloc.hugetlb=1'
THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'


def is_glibc() -> bool:
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  except OSError:
    return False
  return hasattr(libc, 'gnu_get_libc_version')


def transparent_huge_pages() -> Optional[str]:
  """The kernel's THP mode ('always', 'madvise', 'never'), or None where there is none."""
  try:
    with open(THP_SETTING) as f:
      text = f.read()
  except OSError:
    return None
  chosen = [word.strip('[]') for word in text.split() if word.startswith('[')]
  return chosen[0] if chosen else None


def environment(policy: str, env: Mapping[str, str]) -> Optional[dict]:
  """The environment a process under `policy` needs, or None if `env` already serves.

  Raises ValueError for an unknown policy.
  """
  if policy not in POLICIES:
    raise ValueError(f'host_allocator must be one of {", ".join(POLICIES)}, got {policy!r}')
  if policy == 'system' or TUNABLE.split('=')[0] in env.get('GLIBC_TUNABLES', ''):
    return None
  if sys.platform != 'linux' or not is_glibc() or transparent_huge_pages() in (None, 'never'):
    return None
  tunables = ':'.join(t for t in (env.get('GLIBC_TUNABLES', ''), TUNABLE) if t)
  return {**env, 'GLIBC_TUNABLES': tunables}


def in_use(env: Optional[Mapping[str, str]] = None) -> str:
  """The policy serving this process: 'hugepages' where glibc's tunable is set, else 'system'."""
  env = os.environ if env is None else env
  return 'hugepages' if TUNABLE.split('=')[0] in env.get('GLIBC_TUNABLES', '') else 'system'


def apply(policy: str) -> None:
  """Serve this process under `policy`: returns if it already is, else restarts it.

  Call it before the command has done anything it would have to undo: the restarted
  process runs from the beginning, with the same arguments.
  """
  env = environment(policy, os.environ)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
