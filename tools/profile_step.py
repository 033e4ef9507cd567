"""Where a config's train step spends its time, op by op, from a jax.profiler trace.

    python -m tools.profile_step [--config experiments/fast.py] [--batch_size 1024]
                                 [--epoch 1] [--steps 2] [--top 15] [--json]
                                 [--config.FIELD=VALUE ...]

It compiles the config's train step as jaxres.train runs it in epoch `--epoch` (the
parameters config.frozen and config.frozen_after hold constant then cost no gradient;
random images, as tools.bench), runs it twice to
warm up, traces `--steps` more steps with jax.profiler, and prints:

- the step's wall time (median of the traced steps), the summed time of its ops, and
  the time between ops (no op's span running): Eigen's matmuls (`dot_general`) return
  before their threads finish, so most of their time shows there, not under their name,
  together with the host's time between the traced steps;
- that time by layer and direction: the Flax module path of each op (from the compiled
  program's op_name metadata), 'fwd' for the forward pass and 'bwd' for the gradient
  (ops under `transpose(...)`), and 'update' for the optimizer and everything else
  outside the model;
- that time by op kind (the compiled op's name without its number: `ynn_fusion` is a
  matmul or reduction XLA's CPU backend hands to its YNNPACK library, `dot_general` an
  Eigen matmul, `*concatenate*_fusion` and other `*_fusion`s its own elementwise loops);
- the `--top` single ops with their layer.

Per-op times are the CPU backend's thunks (XLA:CPU); on a CPU the runtime may run two
independent ops at once, so their sum can exceed the wall time. On other backends the
trace names kernels, not compiled ops, and most of the time is reported unmatched.
"""

import collections
import functools
import glob
import gzip
import json
import os
import re
import tempfile
import time

from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from jaxres import cli, input_pipeline, optim, runtime, steps
from jaxres.errors import UsageError
from . import bench

# Trace events that are not compiled ops: the runtime's own spans and Python frames.
_RUNTIME = re.compile(r'^(\$|ThunkExecutor|PjitFunction|CommonPjRt|Pjit|ParseArguments|'
                      r'Handle inputs|AllocateOutputBuffers|SlinkyThreadPool)')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', re.M)


def op_names(hlo_text: str) -> dict:
  """{instruction name: op_name metadata} for the compiled program's instructions."""
  return {name: op for name, op in _INSTRUCTION.findall(hlo_text)}


def layer_of(op_name: str) -> str:
  """'group2/conv1 bwd' for an op_name such as
  'jit(train_step)/transpose(jvp(WhitenedResNet))/group2/conv1/dot_general'."""
  parts = op_name.split('/')
  model = [i for i, p in enumerate(parts) if re.search(r'jvp\(\w+\)', p)]
  if not model:
    return 'update'
  direction = 'bwd' if 'transpose(' in parts[model[0]] else 'fwd'
  modules = [p for p in parts[model[0] + 1:-1] if not re.search(r'[()]', p)]
  return f'{"/".join(modules) or "(model)"} {direction}'


def kind_of(instruction: str) -> str:
  return re.sub(r'\.\d+$', '', instruction)


def aggregate(events: list, names: dict, num_steps: int, top: int) -> dict:
  """Per-step milliseconds by layer, by kind and per op, from complete trace events."""
  per_op = collections.Counter()
  unmatched = 0.0
  spans = []
  for e in events:
    if e.get('ph') != 'X' or _RUNTIME.match(e.get('name', '')):
      continue
    ms = e.get('dur', 0) / 1e3 / num_steps
    if e['name'] in names:
      per_op[e['name']] += ms
      if 'ts' in e:
        spans.append((e['ts'], e['ts'] + e.get('dur', 0)))
    else:
      unmatched += ms
  by_layer, by_kind = collections.Counter(), collections.Counter()
  for name, ms in per_op.items():
    by_layer[layer_of(names[name])] += ms
    by_kind[kind_of(name)] += ms
  return {
      'ops_ms': sum(per_op.values()),
      'unmatched_ms': unmatched,
      'between_ops_ms': _uncovered(spans) / 1e3 / num_steps,
      'by_layer_ms': dict(by_layer.most_common()),
      'by_kind_ms': dict(by_kind.most_common()),
      'top_ops': [{'op': n, 'layer': layer_of(names[n]), 'ms': ms}
                  for n, ms in per_op.most_common(top)],
  }


def _uncovered(spans: list) -> float:
  """Time (trace units) from the first span's start to the last one's end covered by none.

  In XLA:CPU's traces that is work no op's span shows -- Eigen's matmuls return before
  their threads finish, so their time appears here, not under `dot_general` -- plus the
  host's time between the traced steps.
  """
  total, end = 0.0, None
  for start, stop in sorted(spans):
    if end is not None and start > end:
      total += start - end
    end = stop if end is None else max(end, stop)
  return total


def _trace_events(trace_dir: str) -> list:
  paths = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
  if not paths:
    raise RuntimeError(f'jax.profiler wrote no perfetto trace under {trace_dir}')
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    trace = json.load(f)
  return trace['traceEvents'] if isinstance(trace, dict) else trace


def profile(config, batch_size: int, num_steps: int, top: int, epoch: int = 1) -> dict:
  """Trace `num_steps` train steps of `config` at `batch_size` as in `epoch`; see the
  module docstring."""
  model, tx, state = bench._setup(config, steps_per_epoch=100)
  d = config.data
  images = bench._random_images(batch_size, d.image_size)
  batch = jax.device_put({'image': input_pipeline.normalize(images, d.mean, d.std),
                          'label': bench._random_labels(batch_size, config.model.num_classes)})
  step_fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                      frozen=optim.frozen_in_epoch(config, epoch),
                                      label_smoothing=config.label_smoothing), donate_argnums=0)
  names = op_names(step_fn.lower(state, batch).compile().as_text())
  for _ in range(2):
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
  seconds = []
  with tempfile.TemporaryDirectory(prefix='jaxres-profile-') as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    try:
      for _ in range(num_steps):
        start = time.perf_counter()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    finally:
      jax.profiler.stop_trace()
    events = _trace_events(trace_dir)
  result = {'device': bench._device_name(), 'batch_size': batch_size, 'epoch': epoch,
            'steps': num_steps,
            'step_ms': 1e3 * float(np.median(seconds))}
  result.update(aggregate(events, names, num_steps, top))
  return result


def format_report(r: dict) -> str:
  lines = [f"device      {r['device']}, batch {r['batch_size']}, the step of epoch "
           f"{r['epoch']}, {r['steps']} traced steps",
           f"step        {r['step_ms']:.0f} ms wall (median); ops {r['ops_ms']:.0f} ms, "
           f"unmatched {r['unmatched_ms']:.0f} ms, between ops {r['between_ops_ms']:.0f} ms "
           f"(per step)", '', 'by layer (ms per step)']
  lines += [f'  {ms:8.1f}  {name}' for name, ms in r['by_layer_ms'].items()]
  lines += ['', 'by op kind (ms per step)']
  lines += [f'  {ms:8.1f}  {name}' for name, ms in r['by_kind_ms'].items()]
  lines += ['', f"top {len(r['top_ops'])} ops (ms per step)"]
  lines += [f"  {o['ms']:8.1f}  {o['op']:32}  {o['layer']}" for o in r['top_ops']]
  return '\n'.join(lines)


def command():
  """The command-line entry point (flags are defined only here, as in tools.bench)."""
  config_flag = config_flags.DEFINE_config_file(
      'config', 'experiments/fast.py', 'Config file (get_config()); fields overridable.')
  batch_flag = flags.DEFINE_integer('batch_size', None, 'Images per step (default: the '
                                    "config's batch_size).")
  epoch_flag = flags.DEFINE_integer('epoch', 1, 'Profile the step of this epoch (which '
                                    'parameters are frozen).')
  steps_flag = flags.DEFINE_integer('steps', 2, 'Traced steps.')
  top_flag = flags.DEFINE_integer('top', 15, 'Single ops listed.')
  json_flag = flags.DEFINE_bool('json', False, 'Print one JSON object instead of the report.')

  def main(argv):
    if len(argv) > 1:
      raise UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    config = cli.config_value(config_flag)
    batch_size = batch_flag.value or config.batch_size
    for name, value in (('--batch_size', batch_size), ('--epoch', epoch_flag.value),
                        ('--steps', steps_flag.value),
                        ('--top', top_flag.value)):
      if value <= 0:
        raise UsageError(f'{name} must be positive, got {value}')
    runtime.start(config)  # as jaxres.train starts: validation, allocator, JAX options
    result = profile(config, batch_size, steps_flag.value, top_flag.value, epoch_flag.value)
    print(json.dumps(result) if json_flag.value else format_report(result))

  return main


if __name__ == '__main__':
  cli.run(command())
