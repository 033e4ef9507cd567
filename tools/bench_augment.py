"""Time augment(key, images_uint8, policy) under jit on the default JAX backend.

    python -m tools.bench_augment [--batch 128 512] [--policy seed flip_crop none] [--repeats 20]

Prints, per (policy, batch), the median and minimum time of one jitted call on a fresh
key (compilation excluded), after two warm-up calls.
"""

import argparse
import statistics
import time

import jax
import numpy as np

from jaxres import augment


def bench(policy: str, batch: int, repeats: int, image_size: int = 32) -> list[float]:
  """Seconds per call of the jitted policy on a random uint8 batch, `repeats` times."""
  images = jax.device_put(np.random.default_rng(0).integers(
      0, 256, (batch, image_size, image_size, 3), dtype=np.uint8))
  fn = jax.jit(augment.augment, static_argnames='policy')
  keys = jax.random.split(jax.random.key(0), repeats + 2)
  for key in keys[:2]:
    fn(key, images, policy=policy).block_until_ready()
  times = []
  for key in keys[2:]:
    start = time.perf_counter()
    fn(key, images, policy=policy).block_until_ready()
    times.append(time.perf_counter() - start)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, nargs='+', default=[128, 512])
  parser.add_argument('--policy', nargs='+', default=list(augment.POLICIES))
  parser.add_argument('--repeats', type=int, default=20)
  args = parser.parse_args()
  print(f'backend {jax.default_backend()} ({jax.devices()[0].device_kind})')
  for policy in args.policy:
    for batch in args.batch:
      times = bench(policy, batch, args.repeats)
      print(f'{policy:>10} batch {batch:4d}: median {1e3 * statistics.median(times):7.2f} ms'
            f'   min {1e3 * min(times):7.2f} ms')


if __name__ == '__main__':
  main()
