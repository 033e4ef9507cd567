"""jaxres.cpu.host_allocator: 'hugepages' restarts a command once with glibc's tunable; the CPU
backend checks the policy a config names."""

import os
import subprocess
import sys
import textwrap

import pytest

from experiments import base, smoke
from jaxres import config_lib, cpu
from jaxres.cpu import host_allocator
from jaxres.errors import UsageError

SERVED = (sys.platform == 'linux' and host_allocator.is_glibc()
          and host_allocator.transparent_huge_pages() not in (None, 'never'))


def test_unknown_policy():
  with pytest.raises(ValueError, match='hugepages, system'):
    host_allocator.environment('jemalloc', {})


def test_system_and_an_environment_that_has_it_need_nothing():
  assert host_allocator.environment('system', {}) is None
  env = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  assert host_allocator.environment('hugepages', env) is None


@pytest.mark.skipif(not SERVED, reason='needs Linux, glibc and transparent huge pages')
def test_hugepages_adds_the_tunable_to_the_others():
  env = host_allocator.environment('hugepages', {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2',
                                                 'HOME': '/x'})
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1',
                 'HOME': '/x'}


def test_configs_choose_a_known_policy():
  assert base.get_config().host_allocator == 'hugepages'
  assert smoke.get_config().host_allocator == 'system'
  config = base.get_config()
  config.host_allocator = 'fast'
  config_lib.validate(config)  # the core leaves the backend's fields to it
  with pytest.raises(UsageError, match='config.host_allocator must be one of hugepages, system'):
    cpu.validate(config)


@pytest.mark.skipif(not SERVED, reason='needs Linux, glibc and transparent huge pages')
def test_apply_restarts_the_process_once_with_the_same_arguments(tmp_path):
  script = tmp_path / 'command.py'
  script.write_text(textwrap.dedent('''
      import os, sys
      print('start', os.getpid(), sys.argv[1:], flush=True)
      from jaxres.cpu import host_allocator
      host_allocator.apply('hugepages')
      print('run', os.getpid(), os.environ['GLIBC_TUNABLES'])
  '''))
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env['PYTHONPATH'] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, str(script), '--flag', 'x'], env=env, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  assert len(out) == 3, out
  pid = out[0].split()[1]
  assert out[1] == out[0]  # the same process (pid) started again with the same arguments
  assert out[2] == f'run {pid} glibc.malloc.hugetlb=1'
