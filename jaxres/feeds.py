"""Feeds: how training batches reach the devices.

HostFeed    the reference path: the seed's torchvision transforms in DataLoader workers,
            each batch copied to the devices by a background thread while the previous
            step runs (asynchronous prefetch).
DeviceFeed  config.data.on_device (automatic on accelerators): the uint8 dataset lives on
            the devices; each dispatch sends only the example indices of
            `steps_per_dispatch` batches, and the feed's `make_batch` (`device_batch`: a
            pure function) gathers, augments (jaxres.augment) and normalizes them inside
            the jitted step, which scans over the batches (lax.scan) to amortize dispatch.

Both visit the examples in the same order, a pure function of (seed, epoch); both yield
(number of steps, arguments of the jitted train function after the state). The feeds do
not own the step: the command jits steps.train_step (HostFeed, make_batch None) or
steps.train_steps_on_device with the feed's make_batch (DeviceFeed).
"""

import functools
import queue
import threading
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxres import augment, input_pipeline, parallel, runtime


def prefetch(iterator: Iterator, size: int) -> Iterator:
  """Run `iterator` in a background thread, `size` items ahead of the consumer."""
  if size <= 0:
    yield from iterator
    return
  items: queue.Queue = queue.Queue(maxsize=size)
  done = object()

  def produce():
    try:
      for item in iterator:
        items.put(item)
    except BaseException as e:  # pylint: disable=broad-except  # re-raised by the consumer
      items.put(e)
    finally:
      items.put(done)

  threading.Thread(target=produce, daemon=True, name='jaxres-prefetch').start()
  while (item := items.get()) is not done:
    if isinstance(item, BaseException):
      raise item
    yield item


def device_batch(data: dict, indices, key, epoch, *, policy: str, mean, std) -> dict:
  """A training batch made on the device: gather rows of the uint8 dataset `data`,
  augment them with `policy` (jaxres.augment) from `key`, normalize with mean and std.

  If `data` holds per-image 'flip' bits, images are also mirrored by alternating flips
  (augment.alternating_hflip) for `epoch`.
  """
  images = augment.augment(key, data['image'][indices], policy)
  if 'flip' in data:
    images = augment.alternating_hflip(images, data['flip'][indices], epoch)
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  return {'image': (images - mean) / std, 'label': data['label'][indices]}


class HostFeed:
  """torchvision batches (input_pipeline.Loader), prefetched onto the mesh."""

  make_batch = None  # the batches arrive made: the step takes them as they are

  def __init__(self, loader: input_pipeline.Loader, mesh, prefetch_batches: int = 2):
    self.loader, self.prefetch_batches = loader, prefetch_batches
    self.sharding = parallel.data_sharding(mesh)
    self.num_batches = loader.num_batches

  def epoch(self, epoch: int, start_step: int = 0):
    batches = (parallel.global_batch(b, self.sharding)
               for b in self.loader.epoch(epoch, start_step))
    for batch in prefetch(batches, self.prefetch_batches):
      yield 1, (batch,)


class DeviceFeed:
  """The dataset on the devices; index batches scanned `steps_per_dispatch` at a time.

  `make_batch(data, rows, key, epoch)` makes a batch from the arguments `epoch` yields
  (device_batch with `policy`, `mean` and `std`).
  """

  def __init__(self, split: input_pipeline.Split, order: input_pipeline.Loader, mesh,
               steps_per_dispatch: int = 1, alternating_flip: bool = False,
               policy: str = 'none', mean=input_pipeline.MEAN, std=input_pipeline.STD):
    self.order, self.steps_per_dispatch = order, steps_per_dispatch
    self.make_batch = functools.partial(device_batch, policy=policy, mean=tuple(mean),
                                        std=tuple(std))
    self.num_batches = order.num_batches
    self.index_sharding = NamedSharding(mesh, P(None, parallel.DATA_AXIS))
    self.replicated = parallel.replicated(mesh)
    data = {'image': split.images, 'label': split.labels.astype(np.int32)}
    if alternating_flip:  # each image's first-epoch flip, a pure function of the seed
      data['flip'] = np.random.default_rng([order.seed, 2]).integers(0, 2, len(split), np.uint8)
    self.data = jax.device_put(data, self.replicated)

  def epoch(self, epoch: int, start_step: int = 0):
    step = start_step
    while step < self.num_batches:
      chunk = []
      while step < self.num_batches and len(chunk) < self.steps_per_dispatch:
        rows, _ = self.order.global_rows(epoch, step)
        if chunk and len(rows) != len(chunk[0]):
          break  # a partial last batch gets a dispatch of its own
        chunk.append(rows)
        step += 1
      local = np.stack(chunk)[:, self.order.local_slice(len(chunk[0]))].astype(np.int32)
      indices = jax.make_array_from_process_local_data(self.index_sharding, local)
      yield len(chunk), (self.data, indices, jax.device_put(np.int32(epoch), self.replicated))


def create(config, train_split, mesh):
  """The feed config.data asks for (on_device None: automatic, runtime.on_device)."""
  num_devices = mesh.devices.size
  if runtime.on_device(config):
    order = input_pipeline.Loader(train_split, config.batch_size, None, seed=config.seed,
                                  shuffle=True, drop_last=config.data.drop_last,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count(), multiple_of=num_devices)
    return DeviceFeed(train_split, order, mesh, config.data.steps_per_dispatch,
                      config.data.alternating_flip, config.data.augment, config.data.mean,
                      config.data.std)
  loader = input_pipeline.train_loader(train_split, config, jax.process_index(),
                                       jax.process_count(), num_devices)
  return HostFeed(loader, mesh, config.data.prefetch)
