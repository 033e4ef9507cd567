"""Benchmark a config's train step against the PyTorch reference, and its data paths.

    python -m tools.bench [--config experiments/base.py] [--batch_size 128] [--dtype float32]
                          [--steps 20] [--json] [--epoch] [--config.FIELD=VALUE ...]

On the default JAX device (and the matching PyTorch device) it measures, after
compilation and in steady state (block_until_ready / synchronize):

- the jaxres train step (the config's model, optimizer and loss) in images/s, its compile
  time, and the same with the batch made on the device (augmentation inside the step);
- the PyTorch reference train step (the seed's ModifiedResNet, Adam) eagerly and with
  torch.compile where that works, and jaxres / PyTorch eager (`ratio`); the reference
  exists for the seed's model only (model.name='resnet');
- the input pipelines in images/s (the mean over the timed batches, after the workers'
  queues are drained): the torchvision transforms of data.augment through a
  DataLoader with data.num_workers workers, and the on-device augmentation;
- an epoch's wall time for each data path: estimated from the rates (--epoch_images;
  the host path serially, as on a CPU, where pipeline and step share the cores), or
  measured over one real epoch of the training feed with --epoch;
- peak host memory (RSS) and device memory where the backend reports it; the device,
  library versions and the flags used.

Images are random (the rates do not depend on their content), so no dataset is needed.
Convolutions follow config.model.conv_impl ('auto': Winograd on a CPU): compare with
--config.model.conv_impl=xla.
"""

import dataclasses
import functools
import json
import os
import platform
import resource
import time
from typing import Callable, Optional

from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from jaxres import backends, cli, config_lib, feeds, input_pipeline, models, optim, parallel
from jaxres import runtime, steps, train_state
from jaxres.errors import UsageError
from jaxres import train as train_lib
from . import verify

DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass
class Timing:
  """The first call's seconds and the steady-state seconds of each later call."""
  first: float
  seconds: list

  @property
  def median(self) -> float:
    return float(np.median(self.seconds))


def time_calls(fn: Callable[[], object], num_calls: int, warmup: int = 2) -> Timing:
  """Time fn() `num_calls` times after `warmup` calls; fn must block until it is done."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  for _ in range(max(warmup - 1, 0)):
    fn()
  seconds = []
  for _ in range(num_calls):
    start = time.perf_counter()
    fn()
    seconds.append(time.perf_counter() - start)
  return Timing(first, seconds)


def _random_images(n: int, image_size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, image_size, image_size, 3), np.uint8)


def _random_labels(n: int, num_classes: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed + 1).integers(0, num_classes, n).astype(np.int32)


def _random_split(config, n: int) -> input_pipeline.Split:
  """n random images and labels shaped like config's data."""
  k = config.model.num_classes
  return input_pipeline.Split(_random_images(n, config.data.image_size),
                              _random_labels(n, k), tuple(str(c) for c in range(k)))


def _setup(config, steps_per_epoch: int):
  """(model, tx, initial TrainState) of `config` on the default device; data-dependent
  layers (a whitening layer) are initialized from random images."""
  model = models.create_model(config)
  tx = optim.create_optimizer(config, steps_per_epoch=steps_per_epoch)
  images = _random_images(256, config.data.image_size)[:models.data_images(config)]
  overrides = models.data_init(config, input_pipeline.normalize(images, config.data.mean,
                                                                config.data.std))
  state = jax.jit(functools.partial(train_state.create, config, model, tx))(overrides)
  return model, tx, state


def bench_jax_step(config, batch_size: int, num_steps: int) -> dict:
  """jaxres train step on a fixed normalized batch, and with the batch made on the device."""
  model, tx, state = _setup(config, steps_per_epoch=100)
  d = config.data
  images = _random_images(batch_size, d.image_size)
  labels = _random_labels(batch_size, config.model.num_classes)
  batch = jax.device_put({'image': input_pipeline.normalize(images, d.mean, d.std),
                          'label': labels})
  step_fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                      frozen=optim.frozen_in_epoch(config, 1),
                                      label_smoothing=config.label_smoothing), donate_argnums=0)
  holder = {'state': state}

  def one_step():
    holder['state'], metrics = step_fn(holder['state'], batch)
    jax.block_until_ready(metrics)

  timing = time_calls(one_step, num_steps)
  result = {'jax_train_img_s': batch_size / timing.median,
            'jax_step_ms': 1e3 * timing.median,
            'jax_compile_s': timing.first - timing.median}

  # The on-device path: gather + augment + normalize inside the jitted step.
  data = jax.device_put({'image': _random_images(4 * batch_size, d.image_size),
                         'label': _random_labels(4 * batch_size, config.model.num_classes)})
  indices = jax.device_put(np.arange(batch_size, dtype=np.int32)[None])
  make_batch = functools.partial(feeds.device_batch, policy=d.augment, mean=tuple(d.mean),
                                 std=tuple(d.std))
  device_fn = jax.jit(functools.partial(
      steps.train_steps_on_device, make_batch=make_batch, model=model, tx=tx,
      label_smoothing=config.label_smoothing, frozen=optim.frozen_in_epoch(config, 1)),
      donate_argnums=0)
  epoch = jax.device_put(np.int32(1))

  def one_device_step():
    holder['state'], metrics = device_fn(holder['state'], data, indices, epoch)
    jax.block_until_ready(metrics)

  timing = time_calls(one_device_step, num_steps)
  result['jax_on_device_train_img_s'] = batch_size / timing.median
  return result


def bench_torch_step(config, batch_size: int, num_steps: int, dtype: str,
                     compile_: bool) -> dict:
  """The seed's PyTorch model and Adam on the matching device: eager, then torch.compile."""
  if config.model.name != 'resnet':
    return {'torch_train_img_s': None,
            'torch_note': f'no PyTorch reference for model.name={config.model.name!r}'}
  import torch
  from jaxres import torch_reference
  on_gpu = jax.default_backend() == 'gpu' and torch.cuda.is_available()
  device = torch.device('cuda' if on_gpu else 'cpu')
  m = config.model

  def make():
    torch.manual_seed(0)
    model = torch_reference.ModifiedResNet(tuple(m.blocks), tuple(m.widths),
                                           m.num_classes).to(device)
    return model, torch_reference.seed_optimizer(model, config.learning_rate,
                                                 config.weight_decay)

  images = torch.randn(batch_size, 3, config.data.image_size, config.data.image_size,
                       device=device)
  labels = torch.randint(0, m.num_classes, (batch_size,), device=device)
  autocast = dtype == 'bfloat16'

  def timed(model, optimizer, forward):
    def one_step():
      optimizer.zero_grad(set_to_none=True)
      with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = torch.nn.functional.cross_entropy(forward(images), labels)
      loss.backward()
      optimizer.step()
      if on_gpu:
        torch.cuda.synchronize()
    return time_calls(one_step, num_steps)

  model, optimizer = make()
  model.train()
  eager = timed(model, optimizer, model)
  result = {'torch_train_img_s': batch_size / eager.median, 'torch_step_ms': 1e3 * eager.median,
            'torch_device': str(device), 'torch_threads': torch.get_num_threads()}
  if compile_:
    try:
      model, optimizer = make()
      model.train()
      compiled = timed(model, optimizer, torch.compile(model))
      result['torch_compile_train_img_s'] = batch_size / compiled.median
      result['torch_compile_s'] = compiled.first - compiled.median
    except Exception as e:  # torch.compile needs a working compiler toolchain
      result['torch_compile_train_img_s'] = None
      result['torch_compile_note'] = f'torch.compile failed: {type(e).__name__}: {e}'[:300]
  return result


def bench_pipelines(config, batch_size: int, num_batches: int) -> dict:
  """Images/s of the torchvision path (DataLoader workers) and the on-device augmentation."""
  d = config.data
  # The DataLoader's workers queue up to PREFETCH_FACTOR batches each: the warm-up drains
  # that queue, so the timed batches come at the rate the workers make them.
  warmup = input_pipeline.PREFETCH_FACTOR * d.num_workers + 2
  split = _random_split(config, batch_size * (num_batches + warmup))
  loader = input_pipeline.train_loader(split, config)
  batches = iter(loader.epoch(1))
  timing = time_calls(lambda: next(batches), num_batches, warmup=warmup)
  result = {'torchvision_pipeline_img_s': batch_size / np.mean(timing.seconds),
            'torchvision_workers': d.num_workers}

  data = jax.device_put({'image': split.images, 'label': split.labels})
  make = jax.jit(functools.partial(feeds.device_batch, policy=d.augment, mean=tuple(d.mean),
                                   std=tuple(d.std)))
  keys = iter(jax.random.split(jax.random.key(0), num_batches + 2))
  rows = jax.device_put(np.arange(batch_size, dtype=np.int32))
  timing = time_calls(lambda: jax.block_until_ready(make(data, rows, next(keys), 1)),
                      num_batches)
  result['on_device_pipeline_img_s'] = batch_size / timing.median
  result['pipeline_ratio'] = (result['on_device_pipeline_img_s']
                              / result['torchvision_pipeline_img_s'])
  return result


def measure_epochs(config, num_images: int) -> dict:
  """Wall time of one real epoch of the training feed over `num_images` random images,
  host path and on-device path (compilation included)."""
  mesh = parallel.make_mesh()
  split = _random_split(config, num_images)
  result = {}
  for on_device in (False, True):
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.data.on_device = on_device
    feed = feeds.create(cfg, split, mesh)
    model, tx, state = _setup(cfg, feed.num_batches)
    state = jax.device_put(state, parallel.replicated(mesh))
    train_fn = train_lib.train_function(feed, model, tx, cfg)
    start = time.perf_counter()
    for _, args in feed.epoch(1):
      state, metrics = train_fn(state, *args)
    jax.block_until_ready(metrics)
    key = 'on_device' if on_device else 'torchvision'
    result[f'epoch_seconds_{key}'] = time.perf_counter() - start  # compilation included
  return result


def _peak_device_bytes() -> Optional[int]:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def _versions() -> dict:
  import flax
  import jaxlib
  import optax
  import torch
  import torchvision
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jaxlib.__version__,
          'flax': flax.__version__, 'optax': optax.__version__, 'torch': torch.__version__,
          'torchvision': torchvision.__version__}


def _device_name() -> str:
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return verify.cpu_description()
  return f'{device.platform}: {device.device_kind}'


def run(config, batch_size: int, dtype: str, num_steps: int, torch_compile: bool,
        epoch: bool, epoch_images: int = 50_000) -> dict:
  """Every measurement, as one flat dict."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.batch_size = batch_size
    config.dtype = dtype
  config_lib.validate(config)
  result = {'device': _device_name(), 'backend': jax.default_backend(),
            'batch_size': batch_size, 'dtype': dtype, 'steps': num_steps,
            'model': config.model.name,
            'params': config_lib.param_count(config)[0],
            # conv_impl, winograd_transforms, host_allocator: the platform backend's
            **backends.resolved(config),
            'augment': config.data.augment,
            'xla_flags': os.environ.get('XLA_FLAGS', ''),
            'matmul_precision': jax.config.jax_default_matmul_precision or 'default',
            'date': time.strftime('%Y-%m-%d')}
  result.update(_versions())
  result.update(bench_jax_step(config, batch_size, num_steps))
  result.update(bench_torch_step(config, batch_size, num_steps, dtype, torch_compile))
  torch_rate = result.get('torch_train_img_s')
  result['ratio'] = result['jax_train_img_s'] / torch_rate if torch_rate else None
  result.update(bench_pipelines(config, batch_size, num_steps))
  result['epoch_images'] = epoch_images
  result['epoch_seconds_torchvision_est'] = epoch_images * (
      1 / result['jax_train_img_s'] + 1 / result['torchvision_pipeline_img_s'])
  result['epoch_seconds_on_device_est'] = epoch_images / result['jax_on_device_train_img_s']
  if epoch:
    result.update(measure_epochs(config, epoch_images))
  result['peak_host_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  peak = _peak_device_bytes()
  result['peak_device_mb'] = peak / 2**20 if peak is not None else None
  return result


def format_table(r: dict) -> str:
  def rate(key):
    value = r.get(key)
    return f'{value:9.1f} img/s' if value else '      n/a'

  def secs(key):
    value = r.get(key)
    return f'{value:9.1f} s' if value is not None else '      n/a'

  lines = [
      f'device      {r["device"]} ({r["backend"]}); {r["date"]}',
      f'versions    jax {r["jax"]}, flax {r["flax"]}, optax {r["optax"]}, torch {r["torch"]}, '
      f'torchvision {r["torchvision"]}',
      f'setup       model {r["model"]} ({r["params"]:,} params), batch {r["batch_size"]}, '
      f'{r["dtype"]}, conv_impl {r["conv_impl"]} (transforms {r["winograd_transforms"]}), '
      f'augment {r["augment"]}, '
      f'{r["steps"]} timed steps, host allocator {r["host_allocator"]}, '
      f'XLA_FLAGS={r["xla_flags"] or "(none)"}',
      '',
      'train step',
      f'  jaxres                         {rate("jax_train_img_s")}   '
      f'({r["jax_step_ms"]:.1f} ms/step, compile {r["jax_compile_s"]:.1f} s)',
      f'  jaxres, batch made on device   {rate("jax_on_device_train_img_s")}',
      f'  PyTorch eager                  {rate("torch_train_img_s")}',
      f'  PyTorch torch.compile          {rate("torch_compile_train_img_s")}',
      f'  ratio jaxres / PyTorch eager   '
      + (f'{r["ratio"]:9.2f} x' if r.get('ratio') else '      n/a'),
      '',
      'input pipeline',
      f'  torchvision, {r["torchvision_workers"]} worker(s)        '
      f'{rate("torchvision_pipeline_img_s")}',
      f'  on device                      {rate("on_device_pipeline_img_s")}   '
      f'({r["pipeline_ratio"]:.1f}x)',
      '',
      f'epoch of {r["epoch_images"]} images',
      f'  torchvision path, estimated    {secs("epoch_seconds_torchvision_est")}',
      f'  on-device path, estimated      {secs("epoch_seconds_on_device_est")}',
  ]
  if 'epoch_seconds_torchvision' in r:
    lines += [f'  torchvision path, measured     {secs("epoch_seconds_torchvision")}',
              f'  on-device path, measured       {secs("epoch_seconds_on_device")}']
  lines += ['',
            f'memory      peak host RSS {r["peak_host_rss_mb"]:.0f} MB; peak device '
            + (f'{r["peak_device_mb"]:.0f} MB' if r['peak_device_mb'] is not None
               else 'n/a (not reported by this backend)')]
  for key in ('torch_note', 'torch_compile_note'):
    if r.get(key):
      lines.append(f'note        {r[key]}')
  return '\n'.join(lines)


def command():
  """The command-line entry point: defines the flags (only then, so that importing this
  module as a library defines none) and returns main(argv)."""
  config_flag = config_flags.DEFINE_config_file(
      'config', 'experiments/base.py', 'Config file (get_config()); fields overridable.')
  batch_flag = flags.DEFINE_integer('batch_size', 128, 'Images per train step.')
  dtype_flag = flags.DEFINE_enum('dtype', 'float32', DTYPES, 'Compute dtype.')
  steps_flag = flags.DEFINE_integer('steps', 20, 'Timed steps (and pipeline batches).')
  json_flag = flags.DEFINE_bool('json', False, 'Print one JSON object instead of the table.')
  compile_flag = flags.DEFINE_bool('torch_compile', True, 'Also time torch.compile.')
  epoch_flag = flags.DEFINE_bool('epoch', False, 'Also measure one real epoch of each data '
                                 'path (long on a CPU).')
  epoch_images_flag = flags.DEFINE_integer('epoch_images', 50_000,
                                           'Images per epoch (CIFAR-10: 50000).')

  def main(argv):
    if len(argv) > 1:
      raise UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    for name, flag in (('--batch_size', batch_flag), ('--steps', steps_flag),
                       ('--epoch_images', epoch_images_flag)):
      if flag.value <= 0:
        raise UsageError(f'{name} must be positive, got {flag.value}')
    config = cli.config_value(config_flag)
    runtime.start(config)  # as jaxres.train starts: validation, allocator, JAX options
    result = run(config, batch_flag.value, dtype_flag.value,
                 steps_flag.value, compile_flag.value, epoch_flag.value,
                 epoch_images_flag.value)
    print(json.dumps(result) if json_flag.value else format_table(result))

  return main


if __name__ == '__main__':
  cli.run(command())
