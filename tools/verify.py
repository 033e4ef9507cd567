"""Check a new machine end to end, on whatever backend it has, in one command.

    python -m tools.verify [--quick] [--out DIR] [--data_root PATH] [--minutes N]
                           [--compare_seeds K [--compare_minutes M]] [--stages A,B]
    make verify

Run it from the checkout (`PYTHONPATH=. python3 -m tools.verify` where jaxres is not
installed). The stages, in order; every one but the first is a subprocess of an existing
command (this interpreter, the checkout as working directory and first on PYTHONPATH):

  environment  Python, platform, library versions, the JAX backend and devices (probed in
               a subprocess: this process never holds the accelerator), CPU and memory;
               each missing package in one line with the pip command that installs it, at
               the version range of pyproject.toml. A stage whose packages are missing is
               skipped.
  tests        the test suite (on every core with pytest-xdist, when it is installed)
  bench_*      tools.bench --json: base.py in float32 and in bfloat16, and fast.py;
               PyTorch eager only (torch.compile's compilation does not fit the run)
  fast         fast.py trained end to end: test accuracy, wall time, seconds per epoch
  base         base.py for as many epochs as --minutes allow: it runs with its 40 epochs
               and gets SIGTERM (the trainer checkpoints and exits) once the next epoch
               would not end in time; its 40-epoch wall time extrapolated, its accuracy
               beside the seed's published numbers
  compare      off unless --compare_seeds K: tools.compare_torch --train, base.py's whole
               40 epochs on the whole dataset, K seeds in jaxres and K in PyTorch (the
               seed's own loop), within --compare_minutes; the final test accuracies, the
               interval of their difference and the verdict. Longer than the rest put
               together: a stopped comparison continues where it was when the same command
               runs again (its runs in --out/compare are kept)

--stages runs the environment and the named stages only (e.g. --stages fast,base, to check
a change to the trainer without the rest), in the order above.

Each stage runs under a time limit: its share (SHARES; base's is --minutes) plus what the
stages before it left of theirs, base excepted. The shares of the full run add up to just
under 10 minutes; a stage that fails or runs out of time is recorded (with the last lines
of its output) and the next one starts.

--quick runs every stage at toy size on generated data (two test files, the smoke model,
fast.py at toy widths, smoke.py for 2 epochs as base.py's stand-in), its stages sharing a
compilation cache in --out: minutes on a CPU. It checks that the machine is set up; its
figures measure nothing.

--data_root: the training stages' data, official CIFAR-10 (a folder holding
cifar-10-batches-py/) or an image folder (train/<class>/*, test/<class>/*). Without it the
full run uses data.name=cifar10 at its default root, downloading where the network
allows (else the stage fails with the trainer's one-line message).

In --out (runs/verify): verify.json (everything, machine-readable), verify.md (a section
for BENCHMARKS.md), <stage>.log (each stage's command and output), fast/ and base/ (the
training runs' workdirs). Both reports are rewritten after each stage. Exit code: 0 when
every stage passed, 1 otherwise, 2 for bad flags.
"""

import dataclasses
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from importlib import metadata
from typing import Callable, Optional

from jaxres import reporting
from jaxres.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Set in every stage's environment: the test of tools.verify skips its own run inside one.
GUARD = 'JAXRES_VERIFY'
SEED_EPOCHS = 40  # base.py's run, to which its time is extrapolated

# Seconds each stage may take (base: --minutes), in the full run and in --quick. Full:
# 9 min 50 s in all with the default --minutes (each bench stage 60 s), for one call of
# at most 10 minutes on an H100-class GPU, where a stage's time is mostly start-up and
# compilation. Quick: generous for a busy 2-core CPU; only a hang should meet them.
SHARES = {
    False: {'environment': 40, 'tests': 130, 'bench': 60, 'fast': 120},
    True: {'environment': 60, 'tests': 120, 'bench': 150, 'fast': 150},
}
MINUTES = {False: 2.0, True: 5.0}  # --minutes' default: base's share (quick: 2 epochs, a limit)
COMPARE_MINUTES = 120.0  # --compare_minutes' default: the comparison's own limit
STOP_SECONDS = 15  # of base's share, kept for the trainer to stop and checkpoint
POLL_SECONDS = 0.5
TAIL_LINES = 15  # of a stage's output, kept in verify.json when it did not pass

STAGES = ('tests', 'bench_base_float32', 'bench_base_bfloat16', 'bench_fast', 'fast', 'base',
          'compare')  # after environment, in order: --stages chooses among them
QUICK_TESTS = ('tests/test_cli.py', 'tests/test_count_params.py::test_per_module_rows_add_up')
QUICK_SYNTHETIC = ('--config.data.name=synthetic', '--config.data.synthetic_train_size=512',
                   '--config.data.synthetic_test_size=256')
# fast.py at toy size: 4 full batches of QUICK_SYNTHETIC's images (it drops a partial
# one); XLA's convolutions, which compile faster than the CPU's matmul forms at toy widths
# (as in smoke.py); no restart for huge pages, which toy buffers do not use. fast.py's
# own automatic settings are trained by tests/test_multihost.py's shipped-recipe test.
QUICK_FAST = ('--config.model.widths=(16,32,32)', '--config.batch_size=128',
              '--config.model.whiten_images=512', '--config.model.conv_impl=xla',
              '--config.host_allocator=system')
QUICK_BENCH = ('--batch_size', '16', '--steps', '2')
# The comparison at toy size: 2 epochs on a class-balanced subset.
QUICK_COMPARE = ('--epochs', '2', '--train_images', '256', '--test_images', '100',
                 '--torch_threads', '1')
# Several pytest workers may share one accelerator: none takes most of its memory up front.
TESTS_ENV = (('XLA_PYTHON_CLIENT_PREALLOCATE', 'false'),)


# ------------------------------------------------------------------------ the environment

def requirements(pyproject: str) -> dict:
  """{'runtime': [...], 'test': [...]}: pyproject.toml's [project] dependencies and test
  extra, as requirement strings ('jax>=0.6')."""
  with open(pyproject) as f:
    source = f.read()
  try:
    import tomllib
  except ImportError:  # Python 3.10: the two lists' quoted strings, comments dropped
    def strings(key):
      block = re.search(rf'^{key}\s*=\s*\[(.*?)\]\s*$', source, re.S | re.M).group(1)
      return re.findall(r'"([^"]+)"', re.sub(r'#.*', '', block))
    return {'runtime': strings('dependencies'), 'test': strings('test')}
  project = tomllib.loads(source)['project']
  return {'runtime': list(project['dependencies']),
          'test': list(project['optional-dependencies']['test'])}


def requirement_name(requirement: str) -> str:
  return re.match(r'[A-Za-z0-9._-]+', requirement).group(0)


def installed_version(name: str) -> Optional[str]:
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def python_name() -> str:
  """How to call this interpreter in a command a user can paste ('python3')."""
  return os.path.basename(sys.executable) or 'python'


def install_line(requirement: str, why: str) -> str:
  """A missing package, what needs it, and the pip command that installs it."""
  return f"{requirement_name(requirement)} ({why}): {python_name()} -m pip install '{requirement}'"


def outside_range(requirement: str, version: str) -> bool:
  """Whether `version` is outside the requirement's range (False where `packaging`,
  which judges it, is not installed)."""
  try:
    from packaging.requirements import Requirement
    return not Requirement(requirement).specifier.contains(version, prereleases=True)
  except (ImportError, ValueError):  # no packaging, or a version it cannot read
    return False


def cpu_model() -> str:
  """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_description() -> str:
  return f'cpu: {cpu_model()}, {os.cpu_count()} cores'


def memory_gib() -> Optional[float]:
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
  except (ValueError, OSError, AttributeError):
    return None


def probe() -> None:
  """Print the JAX backend and devices and PyTorch's CUDA device as one JSON line (run in
  a subprocess by `probe_devices`)."""
  found = {}
  try:
    import jax
    devices = jax.devices()
    found.update(backend=jax.default_backend(), platform=devices[0].platform,
                 devices=[d.device_kind for d in devices])
    found['device_memory_bytes'] = (devices[0].memory_stats() or {}).get('bytes_limit')
  except Exception as e:  # a broken install or driver: reported, not raised
    found['jax_error'] = one_line(f'{type(e).__name__}: {e}')
  try:
    import torch
    found['torch_cuda'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
  except Exception as e:
    found['torch_error'] = one_line(f'{type(e).__name__}: {e}')
  print(json.dumps(found))


def probe_devices(env: dict, timeout: float) -> dict:
  """`probe()`'s findings, or {'jax_error': why} when it fails or hangs."""
  env = dict(env, XLA_PYTHON_CLIENT_PREALLOCATE='false')
  try:
    proc = subprocess.run([sys.executable, '-c', 'from tools.verify import probe; probe()'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
  except subprocess.TimeoutExpired:
    return {'jax_error': f'the device probe did not finish in {timeout:.0f} s'}
  lines = proc.stdout.strip().splitlines()
  if proc.returncode or not lines:
    return {'jax_error': last_line(proc.stderr) or f'the device probe exited {proc.returncode}'}
  return json.loads(lines[-1])


def describe_device(found: dict) -> str:
  """'gpu: NVIDIA H100 80GB HBM3 x 1 (79.1 GiB)', or 'cpu: <model>, N cores'."""
  if 'devices' not in found:
    return f'no JAX device ({found.get("jax_error", "unknown error")})'
  if found['platform'] == 'cpu':
    return cpu_description()
  memory = found.get('device_memory_bytes')
  return (f'{found["platform"]}: {found["devices"][0]} x {len(found["devices"])}'
          + (f' ({memory / 2**30:.1f} GiB)' if memory else ''))


def environment(reqs: dict, found: dict) -> dict:
  """What the machine has: versions, device, and what is missing (one line each)."""
  runtime = [requirement_name(r) for r in reqs['runtime']]
  names = runtime + ['jaxlib'] + [requirement_name(r) for r in reqs['test']]
  plugins = sorted({d.metadata['Name'] for d in metadata.distributions()
                    if re.match(r'jax[-_](cuda|rocm)', d.metadata['Name'] or '', re.I)})
  versions = {'python': platform.python_version()}
  versions.update({name: installed_version(name) for name in names + plugins})
  missing, notes = {}, []
  for requirement in reqs['runtime'] + reqs['test']:
    name = requirement_name(requirement)
    have = versions.get(name)
    if have is None:
      missing[name] = install_line(
          requirement, 'every stage but environment' if name in runtime else
          'tests' if name == 'pytest' else 'optional: the tests run on one worker')
    elif outside_range(requirement, have):
      notes.append(f'{name} {have} is outside pyproject.toml\'s {requirement}')
  memory = memory_gib()
  return {'versions': versions, 'platform': platform.platform(), 'device': describe_device(found),
          'backend': found.get('backend'), 'probe': found, 'cpu': cpu_model(),
          'cpu_count': os.cpu_count(), 'memory_gib': round(memory, 1) if memory else None,
          'missing': missing, 'notes': notes}


def environment_facts(env: dict) -> list:
  """The environment stage's report: (label, text), one fact each."""
  memory = f', {env["memory_gib"]:.0f} GiB memory' if env['memory_gib'] else ''
  facts = [('device', env['device']),
           ('host', f'{env["cpu"]}, {env["cpu_count"]} cores{memory}; {env["platform"]}'),
           ('versions', ', '.join(f'{name} {version}' for name, version
                                  in env['versions'].items() if version is not None))]
  if env['probe'].get('torch_cuda'):
    facts.append(('torch cuda', env['probe']['torch_cuda']))
  facts += [('error', env['probe'][k]) for k in ('jax_error', 'torch_error')
            if k in env['probe']]
  return (facts + [('missing', line) for line in env['missing'].values()]
          + [('note', note) for note in env['notes']])


def environment_lines(env: dict) -> list:
  """The environment's facts as the terminal shows them, one line each."""
  return [f'{label:<11} {text}' for label, text in environment_facts(env)]


# ------------------------------------------------------------------------------ the plan

@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: `python ARGS` in the checkout, within `share` seconds."""
  name: str  # also its log's file name
  title: str  # what verify.md calls it
  kind: str  # tests | bench | train | compare: how its figures are read
  args: tuple
  share: float
  needs: tuple = ()  # requirement names
  workdir: Optional[str] = None  # train: the run's workdir
  budget: bool = False  # stopped once its next epoch would not end within its share
  env: tuple = ()  # (name, value) defaults added to its environment

  @property
  def own_limit(self) -> bool:
    """Whether its share is its whole limit: neither takes nor leaves time to others."""
    return self.budget or self.kind == 'compare'


def missing_for(stage: Stage, missing: dict) -> list:
  """The install lines of the packages `stage` needs and the machine lacks."""
  return [f'missing {missing[name]}' for name in stage.needs if name in missing]


def data_overrides(root: str) -> tuple:
  """The trainer's config overrides for the data at `root` (UsageError if neither
  official CIFAR-10 nor an image folder is there)."""
  root = os.path.abspath(root)
  if os.path.exists(os.path.join(root, 'data_batch_1')):  # the batches folder itself
    root = os.path.dirname(root)
  if os.path.isdir(os.path.join(root, 'cifar-10-batches-py')):
    return ('--config.data.name=cifar10', f'--config.data.root={root}',
            '--config.data.download=False')
  if all(os.path.isdir(os.path.join(root, split)) for split in ('train', 'test')):
    return ('--config.data.name=imagefolder', f'--config.data.root={root}')
  raise UsageError(f'--data_root {root} holds neither cifar-10-batches-py/ (official '
                   f'CIFAR-10) nor train/ and test/ class folders (an image folder)')


def train_args(config: str, workdir: str, overrides: tuple) -> tuple:
  """A fresh jaxres.train run of `config` in `workdir`."""
  return ('-m', 'jaxres.train', '--config', config, '--workdir', workdir,
          '--config.resume=False') + overrides


def compare_stage(quick: bool, out: str, data: tuple, seeds: int, minutes: float,
                  runtime: tuple) -> Stage:
  """tools.compare_torch --train of base.py (quick: smoke.py, its generated images or
  `data`, at toy size), `seeds` runs a side, into out/compare."""
  config = 'experiments/smoke.py' if quick else 'experiments/base.py'
  sizes = QUICK_COMPARE + data if quick else data
  workdir = os.path.join(out, 'compare')
  return Stage('compare', f'compare_torch --train, {seeds} seeds a side', 'compare',
               ('-m', 'tools.compare_torch', '--train', '--config', config, '--seeds',
                str(seeds), '--out', workdir) + sizes, 60 * minutes, runtime, workdir)


def compare_figures(workdir: str) -> dict:
  """The comparison's final test accuracies, interval and verdict (from compare.json;
  {} where it did not finish)."""
  path = os.path.join(workdir, 'compare.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    summary = json.load(f)
  final = summary['final'].get('test_accuracy')
  if not final:
    return {}
  welch = final.get('welch') or {}
  return {'epochs': summary['num_epochs'], 'data': summary['data'],
          **{f'{side}_{k}': final[side][k] for side in ('jaxres', 'torch')
             for k in ('values', 'mean', 'std', 'n')},
          'difference': welch.get('difference'), 'low': welch.get('low'),
          'high': welch.get('high'), 'verdict': summary['verdict']}


def plan(quick: bool, out: str, data: tuple, minutes: float, runtime: tuple,
         xdist: bool, compare_seeds: int = 0,
         compare_minutes: float = COMPARE_MINUTES) -> list:
  """The stages after environment. `data`: the trainer's data overrides; `runtime`: the
  packages every stage needs; `xdist`: whether pytest-xdist is installed;
  `compare_seeds`: the comparison's runs a side (0: no comparison)."""
  share = SHARES[quick]
  base = 'experiments/smoke.py' if quick else 'experiments/base.py'
  base_name = os.path.basename(base)
  tests = QUICK_TESTS if quick else (('-n', 'auto', '--dist', 'loadfile') if xdist else ()) + (
      'tests',)
  bench = ('-m', 'tools.bench', '--json', '--torch_compile=false')
  fast_bench = QUICK_FAST + QUICK_BENCH if quick else ('--batch_size', '1024')  # fast.py's
  fast = QUICK_FAST + ('--config.num_epochs=1',) + (data or QUICK_SYNTHETIC) if quick else data
  base_overrides = ('--config.num_epochs=2',) + data if quick else data
  fast_dir, base_dir = os.path.join(out, 'fast'), os.path.join(out, 'base')
  return [
      Stage('tests', 'tests', 'tests', ('-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider')
            + tests, share['tests'], runtime + ('pytest',), env=TESTS_ENV),
      *[Stage(f'bench_base_{dtype}', f'tools.bench {base_name} {dtype}', 'bench',
              bench + ('--config', base, '--dtype', dtype) + (QUICK_BENCH if quick else ()),
              share['bench'], runtime) for dtype in ('float32', 'bfloat16')],
      Stage('bench_fast', 'tools.bench fast.py', 'bench',
            bench + ('--config', 'experiments/fast.py') + fast_bench, share['bench'], runtime),
      Stage('fast', 'fast.py end to end', 'train',
            train_args('experiments/fast.py', fast_dir, fast), share['fast'], runtime,
            fast_dir),
      Stage('base', f'{base_name} for up to {minutes:g} min', 'train',
            train_args(base, base_dir, base_overrides), 60 * minutes, runtime, base_dir,
            budget=True),
  ] + ([compare_stage(quick, out, data, compare_seeds, compare_minutes, runtime)]
       if compare_seeds else [])


def stage_env(quick: bool = False, out: str = '') -> dict:
  """Every stage's environment: this one's, the checkout first on PYTHONPATH; --quick's
  stages share a compilation cache in `out` (unless one is set): some of their programs
  are equal, and a rerun compiles nothing."""
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
  env['PYTHONUNBUFFERED'] = '1'
  env[GUARD] = '1'
  if quick:
    env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(os.path.abspath(out), 'xla_cache'))
  return env


# ---------------------------------------------------------------------- running a stage

def one_line(text: str) -> str:
  return ' '.join(str(text).split())


def last_line(text: str) -> str:
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return lines[-1].strip() if lines else ''


def epoch_wall(record: dict) -> float:
  """An epoch's training and evaluation seconds."""
  return record['epoch_seconds'] + (record.get('eval_seconds') or 0.0)


def steady_epoch_seconds(records: list) -> float:
  """Seconds per epoch once compiled: the mean over epochs 2.., or epoch 1's (an upper
  bound: its compilation included) when it is the only one."""
  later = records[1:] or records
  return sum(map(epoch_wall, later)) / len(later)


def should_stop(records: list, elapsed: float, deadline: float) -> bool:
  """Whether to stop a run `elapsed` seconds in: past the deadline, or when its next epoch
  would end after it."""
  if elapsed >= deadline:
    return True
  return bool(records) and elapsed + steady_epoch_seconds(records) > deadline


def extrapolate(records: list, first_epoch_end: float, epochs: int = SEED_EPOCHS) -> dict:
  """A run's wall time for `epochs` epochs: the seconds to its first epoch's end (start-up,
  data, compilation, epoch 1) plus the rest at the steady seconds per epoch."""
  steady = steady_epoch_seconds(records)
  return {'seconds_to_first_epoch': round(first_epoch_end, 1),
          'steady_epoch_seconds': round(steady, 2),
          'steady_from': ('epoch 1, compilation included' if len(records) == 1 else
                          'epoch 2' if len(records) == 2 else f'epochs 2-{len(records)}'),
          'extrapolated_seconds': round(first_epoch_end + (epochs - 1) * steady, 1),
          'extrapolated_epochs': epochs}


class EpochWatch:
  """Decides when to stop a training run, from its metrics.jsonl, and notes when its first
  epoch ended."""

  def __init__(self, metrics_path: str, deadline: float):
    self.log = reporting.MetricsLog(metrics_path)
    self.deadline = deadline
    self.first_epoch_end = None

  def __call__(self, elapsed: float) -> bool:
    records = self.log.read()
    if records and self.first_epoch_end is None:
      self.first_epoch_end = elapsed
    return should_stop(records, elapsed, self.deadline)


def supervise(proc: subprocess.Popen, limit: float, watch: Optional[Callable] = None) -> str:
  """Wait for `proc` (a session leader): 'exited'; 'stopped' if watch(elapsed) asked for
  a stop (SIGTERM to proc alone, which winds down its own workers) and it then exited;
  'timeout' if it ran past `limit` seconds. Whatever of its process group is left is
  killed."""
  start = time.monotonic()
  outcome = 'exited'
  while True:
    try:
      proc.wait(timeout=POLL_SECONDS)
      break
    except subprocess.TimeoutExpired:
      pass
    elapsed = time.monotonic() - start
    if elapsed >= limit:
      outcome = 'timeout'
      break
    if outcome == 'exited' and watch is not None and watch(elapsed):
      os.kill(proc.pid, signal.SIGTERM)
      outcome = 'stopped'
  kill_group(proc)
  return outcome


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
  """SIGTERM, then SIGKILL, to what is left of the process group that `proc` leads."""
  for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      return
    try:
      proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
      pass


def pytest_counts(text: str) -> dict:
  """The counts of pytest's last summary line ('3 passed, 1 skipped in 4.20s')."""
  word = r'(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b'
  for line in reversed(text.splitlines()):
    if re.search(word, line) and re.search(r' in [\d.]+s', line):
      return {'error' if kind.startswith('error') else kind: int(n)
              for n, kind in re.findall(word, line)}
  return {}


def bench_figures(text: str) -> dict:
  """tools.bench --json's object: the last line of its output that is one."""
  for line in reversed(text.splitlines()):
    if line.startswith('{'):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  return {}


def train_figures(records: list, seconds: float, first_epoch_end: Optional[float] = None,
                  budget: bool = False) -> dict:
  """What a training stage reports from its metrics.jsonl records (keys: JSON's)."""
  if not records:
    return {}
  evaluated = [r for r in records if 'test_accuracy' in r]
  figures = {'epochs': len(records), 'process_seconds': round(seconds, 1),
             'train_seconds': round(sum(r['epoch_seconds'] for r in records), 1),
             'eval_seconds': round(sum(r.get('eval_seconds') or 0.0 for r in records), 1),
             'first_epoch_seconds': records[0]['epoch_seconds'],
             'later_epoch_seconds': (round(sum(r['epoch_seconds'] for r in records[1:])
                                           / (len(records) - 1), 2) if records[1:] else None)}
  if evaluated:
    figures.update(test_accuracy=evaluated[-1]['test_accuracy'],
                   eval_split=evaluated[-1].get('eval_split', 'test'))
  compile_seconds = [r['compile_seconds'] for r in records if 'compile_seconds' in r]
  if compile_seconds:  # where metrics.jsonl reports it
    figures['compile_seconds'] = round(sum(compile_seconds), 1)
  if budget:
    if first_epoch_end is None:  # it ended between two looks: all but epochs 2.. counted
      first_epoch_end = seconds - sum(map(epoch_wall, records[1:]))
    figures.update(extrapolate(records, first_epoch_end))
    figures['accuracy_by_epoch'] = {str(r['epoch']): r['test_accuracy'] for r in evaluated}
    figures['seed_accuracy_by_epoch'] = seed_numbers()
  return figures


def seed_numbers() -> dict:
  """The seed's published test accuracies by epoch (jaxres.torch_reference.PUBLISHED)."""
  try:
    from jaxres.torch_reference import PUBLISHED
  except ImportError:  # it imports torch, without which the base stage is skipped
    return {}
  return {str(epoch): numbers['test_accuracy'] for epoch, numbers in PUBLISHED.items()}


def judge(outcome: str, returncode: int, figures: dict, kind: str, text: str,
          limit: float) -> tuple:
  """(status, reason) of a stage that ran."""
  stopped = outcome == 'stopped' and returncode in (128 + signal.SIGTERM, -signal.SIGTERM)
  if outcome == 'timeout' or (outcome == 'stopped' and not figures):
    more = ('; the same command continues it' if kind == 'compare' else '')
    return 'timeout', f'no result within its {limit:.0f} s{more}'
  if returncode and not stopped:
    return 'failed', f'exit code {returncode}: {last_line(text)}'
  if not figures or (kind == 'tests' and (not figures.get('passed') or figures.get('failed'))):
    return 'failed', f'no figures in its output: {last_line(text)}'
  return 'passed', 'stopped by SIGTERM: the next epoch would not fit' if stopped else ''


def run_stage(stage: Stage, out: str, env: dict, limit: float) -> dict:
  """Run one stage into out/<name>.log: its result (status, seconds, figures, ...)."""
  log_path = os.path.join(out, f'{stage.name}.log')
  metrics_path = os.path.join(stage.workdir or out, 'metrics.jsonl')
  if stage.workdir and os.path.exists(metrics_path):
    os.remove(metrics_path)  # a previous run's epochs
  watch = EpochWatch(metrics_path, limit - STOP_SECONDS) if stage.budget else None
  start = time.monotonic()
  with open(log_path, 'w') as log:
    log.write(f'$ {display_command(stage.args)}\n')
    log.flush()
    proc = subprocess.Popen([sys.executable, *stage.args], cwd=REPO,
                            env={**dict(stage.env), **env}, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    outcome = supervise(proc, limit, watch)
  seconds = time.monotonic() - start
  with open(log_path, errors='replace') as f:
    text = f.read()
  if stage.kind == 'tests':
    figures = pytest_counts(text)
  elif stage.kind == 'bench':
    figures = bench_figures(text)
  elif stage.kind == 'compare':
    figures = compare_figures(stage.workdir)
  else:
    records = reporting.MetricsLog(metrics_path).read()
    figures = train_figures(records, seconds, watch and watch.first_epoch_end, stage.budget)
  status, reason = judge(outcome, proc.returncode, figures, stage.kind, text, limit)
  result = {'name': stage.name, 'title': stage.title, 'status': status,
            'seconds': round(seconds, 1), 'limit_seconds': round(limit, 1),
            'returncode': proc.returncode, 'command': display_command(stage.args),
            'log': os.path.basename(log_path), 'figures': figures, 'reason': reason}
  if status != 'passed':
    result['tail'] = text.splitlines()[-TAIL_LINES:]
  return result


def display_command(args) -> str:
  return shlex.join(['python', *args])


# ------------------------------------------------------------------------------ reports

def duration(seconds: Optional[float]) -> str:
  if seconds is None:
    return 'n/a'
  if seconds < 60:
    return f'{seconds:.1f} s'
  minutes, rest = divmod(round(seconds), 60)
  return (f'{minutes // 60} h {minutes % 60:02d} min' if minutes >= 60 else
          f'{minutes} min {rest:02d} s')


def fmt(value, spec: str = ',.0f', suffix: str = '') -> str:
  return 'n/a' if value is None else f'{value:{spec}}{suffix}'


def percent(value) -> str:
  return fmt(None if value is None else 100 * value, '.2f', ' %')


def table(header: tuple, rows: list) -> list:
  return ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)] + [
      '| ' + ' | '.join(str(cell).replace('|', '/') for cell in row) + ' |' for row in rows]


def summary(stage: dict) -> str:
  """A stage's result in a few words, for the overview table and the progress line."""
  f = stage['figures']
  if stage['status'] != 'passed' or not f:
    return stage['reason']
  if stage['name'] == 'environment':
    return f['device']
  if stage['name'] == 'tests':
    return ', '.join(f'{n} {kind}' for kind, n in f.items())
  if 'verdict' in f:
    return (f'test accuracy jaxres {percent(f["jaxres_mean"])} (n={f["jaxres_n"]}), PyTorch '
            f'{percent(f["torch_mean"])} (n={f["torch_n"]}); {f["verdict"]}')
  if 'jax_train_img_s' in f:
    ratio = f' ({f["ratio"]:.2f}x PyTorch eager)' if f.get('ratio') else ''
    return f'{fmt(f["jax_train_img_s"])} img/s{ratio}'
  text = (f'{f["epochs"]} epoch(s), {f.get("eval_split", "test")} accuracy '
          f'{percent(f.get("test_accuracy"))}')
  if 'extrapolated_seconds' in f:
    text += f'; {f["extrapolated_epochs"]} epochs: {duration(f["extrapolated_seconds"])}'
  return text + (f'; {stage["reason"]}' if stage['reason'] else '')


def bench_table(stages: list) -> list:
  rows = [(s['title'].replace('tools.bench ', ''), f['batch_size'], f['conv_impl'],
           fmt(f['jax_train_img_s']), fmt(f.get('jax_on_device_train_img_s')),
           fmt(f.get('torch_train_img_s')), fmt(f.get('ratio'), '.2f', 'x'),
           fmt(f.get('jax_compile_s'), '.1f', ' s'), fmt(f.get('peak_device_mb'), ',.0f', ' MB'))
          for s in stages for f in [s['figures']] if 'jax_train_img_s' in f]
  if not rows:
    return []
  return ['', "`tools.bench` (random images, after compilation; PyTorch: the seed's model and "
          'Adam, eager):', '', *table(
              ('config', 'batch', 'conv', 'jaxres img/s', 'batch made on device, img/s',
               'PyTorch img/s', 'ratio', 'jaxres compile', 'peak device memory'), rows)]


def fast_table(stage: dict) -> list:
  f = stage['figures']
  if not f:
    return []
  return ['', f'{stage["title"]}:', '', *table(
      ('epochs', 'accuracy', 'process wall time', 'training', 'epoch 1', 'epochs 2.., mean',
       'evaluation', 'compilation'),
      [(f['epochs'], f'{percent(f.get("test_accuracy"))} ({f.get("eval_split", "none")})',
        duration(f['process_seconds']), duration(f['train_seconds']),
        duration(f['first_epoch_seconds']), duration(f['later_epoch_seconds']),
        duration(f['eval_seconds']), duration(f.get('compile_seconds')))])]


def base_table(stage: dict) -> list:
  f = stage['figures']
  if 'extrapolated_seconds' not in f:
    return []
  seed, ours = f['seed_accuracy_by_epoch'], f['accuracy_by_epoch']
  epochs = sorted(set(seed) | {str(f['epochs'])}, key=int)
  return ['', f'{stage["title"]}: {f["epochs"]} epoch(s); {f["extrapolated_epochs"]} '
          f'epochs extrapolated: {duration(f["seconds_to_first_epoch"])} to the end of epoch 1 '
          f'(start-up, data, compilation), then {duration(f["steady_epoch_seconds"])} per '
          f'epoch ({f["steady_from"]}): **{duration(f["extrapolated_seconds"])}**. The seed: '
          'PyTorch, official CIFAR-10, GPU.', '', *table(
              ('epoch', 'jaxres test accuracy', 'seed test accuracy'),
              [(e, percent(ours.get(e)), percent(seed.get(e))) for e in epochs])]


def compare_table(stage: dict) -> list:
  f = stage['figures']
  if 'verdict' not in f:
    return []
  rows = [(name, f[f'{side}_n'], percent(f[f'{side}_mean']), percent(f[f'{side}_std']),
           ', '.join(percent(v) for v in f[f'{side}_values']))
          for side, name in (('jaxres', 'jaxres'), ('torch', 'PyTorch'))]
  return ['', f'{stage["title"]}: {f["epochs"]} epochs on {f["data"]}; {f["verdict"]}.', '',
          *table(('framework', 'runs', 'mean final test accuracy', 'std', 'runs\' accuracies'),
                 rows)]


def markdown(report: dict) -> str:
  """verify.md: a section for BENCHMARKS.md (from the report or its JSON)."""
  env = report['environment']
  stages = {s['name']: s for s in report['stages']}
  no_figures = {'figures': {}}
  commit = f' at commit {report["commit"]}' if report.get('commit') else ''
  verdict = 'every stage passed' if report['passed'] else 'not every stage passed'
  lines = [f'### tools.verify{" --quick" if report["quick"] else ""}: {env["device"]}, '
           f'{report["date"]}', '',
           f'`{report["command"]}`{commit}: {duration(report["seconds"])}, {verdict}. Data: '
           f'{report["data"]}.', '', *[f'- {label}: {text}' for label, text in
                                        environment_facts(env)]]
  if report['quick']:
    lines += ['', 'A quick run: toy sizes, generated data; its figures measure nothing.']
  lines += ['', *table(('stage', 'status', 'time', 'limit', 'result'), [
      (s['title'], s['status'], duration(s['seconds']), duration(s.get('limit_seconds')),
       summary(s)) for s in report['stages']])]
  lines += bench_table(report['stages'])
  lines += fast_table(stages.get('fast', no_figures))
  lines += base_table(stages.get('base', no_figures))
  lines += compare_table(stages.get('compare', no_figures))
  return '\n'.join(lines) + '\n'


def write_reports(report: dict, out: str) -> None:
  for name, text in (('verify.json', json.dumps(report, indent=2) + '\n'),
                     ('verify.md', markdown(report))):
    tmp = os.path.join(out, f'.{name}.tmp')
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, os.path.join(out, name))


def progress(stage: dict) -> None:
  print(f'verify: {stage["title"]:<34} {stage["status"]:<8} {duration(stage["seconds"]):>10}  '
        f'{summary(stage)}', flush=True)


def git_commit() -> Optional[str]:
  """The checkout's commit ('52f30f2'; '+' when tracked files have changes), if git is here."""
  try:
    rev, status = (subprocess.run(['git', *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=10)
                   for args in (('rev-parse', '--short', 'HEAD'),
                                ('status', '--porcelain', '--untracked-files=no')))
  except (OSError, subprocess.TimeoutExpired):
    return None
  return rev.stdout.strip() + ('+' if status.stdout.strip() else '') if not rev.returncode else None


def command_line(quick: bool, out: str, data_root: Optional[str],
                 minutes: Optional[float], compare_seeds: int = 0,
                 compare_minutes: Optional[float] = None, stages: tuple = ()) -> str:
  """The command as a user would type it (for verify.md)."""
  args = ['python', '-m', 'tools.verify'] + (['--quick'] if quick else []) + [f'--out={out}']
  args += [f'--data_root={data_root}'] if data_root else []
  args += [f'--minutes={minutes:g}'] if minutes is not None else []
  args += [f'--compare_seeds={compare_seeds}'] if compare_seeds else []
  args += [f'--stages={",".join(stages)}'] if stages else []
  return shlex.join(args + ([f'--compare_minutes={compare_minutes:g}']
                            if compare_seeds and compare_minutes is not None else []))


# ------------------------------------------------------------------------------ the run

def environment_stage(reqs: dict, env_vars: dict, limit: float, out: str,
                      quick: bool = False) -> tuple:
  """(environment, its stage result); prints and logs its lines."""
  start = time.monotonic()
  found = probe_devices(env_vars, limit)
  env = environment(reqs, found)
  if found.get('platform') == 'cpu' and not quick:
    env['notes'].append('no accelerator: the full run is sized for a GPU and most of its '
                        'stages will run out of time here; --quick checks a CPU machine')
  lines = environment_lines(env)
  print('\n'.join(lines), flush=True)
  with open(os.path.join(out, 'environment.log'), 'w') as f:
    f.write('\n'.join(lines + [json.dumps(found)]) + '\n')
  required = {requirement_name(r) for r in reqs['runtime']} | {'pytest'}
  problems = [f'missing {line}' for name, line in env['missing'].items() if name in required]
  problems += [found['jax_error']] if 'jax_error' in found else []
  return env, {'name': 'environment', 'title': 'environment',
               'status': 'failed' if problems else 'passed',
               'seconds': round(time.monotonic() - start, 1), 'limit_seconds': limit,
               'figures': {'device': env['device']}, 'reason': '; '.join(problems),
               'log': 'environment.log'}


def verify(quick: bool, out: str, data_root: Optional[str], minutes: float,
           command: str, compare_seeds: int = 0,
           compare_minutes: float = COMPARE_MINUTES, stages: tuple = ()) -> dict:
  """Every stage in turn (`stages`: the environment and these only), the reports
  rewritten after each; the final report."""
  start = time.monotonic()
  reqs = requirements(os.path.join(REPO, 'pyproject.toml'))
  env_vars = stage_env(quick, out)
  env, result = environment_stage(reqs, env_vars, SHARES[quick]['environment'], out, quick)
  data = data_overrides(data_root) if data_root else ()
  report = {'command': command, 'date': time.strftime('%Y-%m-%d %H:%M'),
            'commit': git_commit(), 'quick': quick, 'minutes': minutes,
            'data': (f'{data[0].split("=")[1]} at {data_root}' if data else
                     'generated images' if quick else "cifar10 at the config's data.root"),
            'environment': env, 'stages': [result], 'passed': False, 'seconds': 0.0}
  progress(result)
  carried = result['limit_seconds'] - result['seconds']
  runtime = tuple(requirement_name(r) for r in reqs['runtime'])
  for stage in plan(quick, os.path.abspath(out), data, minutes, runtime,
                    'pytest-xdist' not in env['missing'], compare_seeds, compare_minutes):
    if stages and stage.name not in stages:
      continue
    absent = missing_for(stage, env['missing'])
    limit = stage.share + (0.0 if stage.own_limit else max(carried, 0.0))
    if absent:
      result = {'name': stage.name, 'title': stage.title, 'status': 'skipped', 'seconds': 0.0,
                'limit_seconds': limit, 'figures': {}, 'reason': '; '.join(absent)}
    else:
      print(f'verify: {stage.title}: running, up to {duration(limit)} '
            f'({os.path.join(out, stage.name)}.log)', flush=True)
      result = run_stage(stage, out, env_vars, limit)
    if not stage.own_limit:
      carried = limit - result['seconds']
    report['stages'].append(result)
    report['seconds'] = round(time.monotonic() - start, 1)
    write_reports(report, out)
    progress(result)
  report['passed'] = all(s['status'] == 'passed' for s in report['stages'])
  write_reports(report, out)
  return report


def command():
  """The command-line entry point: defines the flags (only then, so that importing this
  module as a library defines none) and returns main(argv)."""
  from absl import flags
  quick_flag = flags.DEFINE_bool(
      'quick', False, 'Every stage at toy size on generated data (minutes on a CPU): checks '
      'the set-up; its figures measure nothing.')
  out_flag = flags.DEFINE_string(
      'out', 'runs/verify', "Directory for verify.json, verify.md, the stages' logs and the "
      'training runs.')
  data_flag = flags.DEFINE_string(
      'data_root', None, "The training stages' CIFAR-10: a folder holding "
      'cifar-10-batches-py/ (official) or train/ and test/ class folders (an image folder). '
      "Default: data.name=cifar10 at the config's root (downloaded where the network "
      'allows); with --quick, generated images.')
  minutes_flag = flags.DEFINE_float(
      'minutes', None, 'Minutes for the base.py stage: as many epochs as fit, the 40-epoch '
      f'time extrapolated (default {MINUTES[False]:g}; --quick: {MINUTES[True]:g}).')
  compare_flag = flags.DEFINE_integer(
      'compare_seeds', 0, 'Also run the comparison stage: base.py for its 40 epochs on the '
      'whole dataset, this many seeds in jaxres and as many in PyTorch (0: no comparison; '
      'it needs 2 or more for a verdict). Longer than the other stages together.')
  stages_flag = flags.DEFINE_list(
      'stages', None, f'Run the environment and only these stages (of {", ".join(STAGES)}), '
      'e.g. --stages fast,base; compare also needs --compare_seeds.')
  compare_minutes_flag = flags.DEFINE_float(
      'compare_minutes', COMPARE_MINUTES, 'The comparison stage\'s time limit in minutes; '
      'what it finished is kept, and the same command continues it.')

  def main(argv):
    if len(argv) > 1:
      raise UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    if not os.path.exists(os.path.join(REPO, 'pyproject.toml')):
      raise UsageError('tools.verify runs from a jaxres checkout (its stages are the '
                       "checkout's tests and experiments/ configs): python -m tools.verify there")
    quick, out, data_root, minutes = (quick_flag.value, out_flag.value, data_flag.value,
                                      minutes_flag.value)
    compare_seeds, compare_minutes = compare_flag.value, compare_minutes_flag.value
    if minutes is not None and minutes * 60 <= STOP_SECONDS:
      raise UsageError(f'--minutes must be more than {STOP_SECONDS / 60:g}, got {minutes:g}')
    if compare_seeds < 0 or compare_seeds == 1:
      raise UsageError(f'--compare_seeds must be 0 (no comparison) or 2 or more (a verdict '
                       f'needs 2 runs a side), got {compare_seeds}')
    if compare_minutes <= 0:
      raise UsageError(f'--compare_minutes must be positive, got {compare_minutes:g}')
    stages = tuple(stages_flag.value or ())
    unknown = [name for name in stages if name not in STAGES]
    if unknown or stages_flag.value == []:
      raise UsageError(f'--stages takes names of {", ".join(STAGES)}; got '
                       f'{",".join(unknown) or "none"}')
    if 'compare' in stages and not compare_seeds:
      raise UsageError('--stages compare needs --compare_seeds K (2 or more)')
    if data_root is not None:
      if not os.path.isdir(data_root):
        raise UsageError(f'--data_root {data_root} is not a directory')
      data_overrides(data_root)  # its layout, checked before anything runs
    try:
      os.makedirs(out, exist_ok=True)
    except OSError as e:
      raise UsageError(f'cannot create --out {out} ({e.strerror})') from None
    report = verify(quick, out, data_root, MINUTES[quick] if minutes is None else minutes,
                    command_line(quick, out, data_root, minutes, compare_seeds,
                                 None if compare_minutes == COMPARE_MINUTES else compare_minutes,
                                 stages),
                    compare_seeds, compare_minutes, stages)
    print(f'verify: {"every stage passed" if report["passed"] else "not every stage passed"}'
          f' in {duration(report["seconds"])}; report in {os.path.join(out, "verify.md")}')
    return 0 if report['passed'] else 1

  return main


def missing_for_verify() -> list:
  """Install lines for what this command needs itself (absl-py, for its flags) and lacks."""
  if not os.path.exists(os.path.join(REPO, 'pyproject.toml')):  # installed, not a checkout
    return []
  return [install_line(r, 'tools.verify')
          for r in requirements(os.path.join(REPO, 'pyproject.toml'))['runtime']
          if requirement_name(r) == 'absl-py' and installed_version('absl-py') is None]


if __name__ == '__main__':
  if missing_for_verify():
    print('\n'.join(f'missing {line}' for line in missing_for_verify()), file=sys.stderr)
    sys.exit(2)
  from jaxres import cli
  cli.run(command())
