"""Time jaxres.cpu.native's Winograd transforms on the 3x3 convolutions of experiments/fast.py.

    python -m tools.bench_transforms [--batch 1024] [--repeats 5]

For each convolution of fast.py's network on 32x32 images (name, input size, channels in
and out), prints the median time of one jitted call of each transform it runs in a
train step (compilation excluded, after a warm-up call): the input transform and its
adjoint, and the output transform and its adjoint, or for a group's first convolution
the output transform fused with 2x2 max pooling and that pair's adjoint. Each call
writes a fresh result buffer, as in a step; like jaxres.train, the command runs under
config.host_allocator's default policy ('hugepages', jaxres/cpu/host_allocator.py).
`python -m tools.profile_step` shows the same ops inside the step.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxres.cpu import host_allocator

# fast.py's 3x3 convolutions: (name, input height = width, in channels, out channels,
# followed by 2x2 max pooling).
FAST_CONVS = (('group1/conv1', 31, 24, 64, True), ('group1/conv2', 15, 64, 64, False),
              ('group2/conv1', 15, 64, 256, True), ('group2/conv2', 7, 256, 256, False),
              ('group3/conv1', 7, 256, 256, True), ('group3/conv2', 3, 256, 256, False))


def _median_ms(fn, args, repeats: int) -> float:
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def bench(batch: int, repeats: int, convs=FAST_CONVS) -> list[dict]:
  """[{'conv', 'shape', op name: median ms, ...}] for each convolution of `convs`."""
  from jaxres.cpu import native
  reason = native.unavailable_reason()
  if reason is not None:
    raise SystemExit(f'tools.bench_transforms: {reason}')
  rows = []
  for name, size, cin, cout, pool in convs:
    n, h, w = batch, size, size
    tiles = n * -(-h // 4) * -(-w // 4)
    x, v = jnp.ones((n, h, w, cin)), jnp.ones((36, tiles, cin))
    m = jnp.ones((36, tiles, cout))
    ops = {'input': (native.input_transform, (x,)),
           'input_adjoint': (lambda v: native.input_transform_adjoint(v, (n, h, w, cin)), (v,))}
    if pool:
      dy = jnp.ones((n, h // 2, w // 2, cout))
      mask = jnp.ones(dy.shape, jnp.uint8)
      ops['output_pool'] = (lambda m: native.output_transform_pool(m, (n, h, w)), (m,))
      ops['output_pool_adjoint'] = (
          lambda dy, mask: native.output_transform_pool_adjoint(dy, mask, (h, w)), (dy, mask))
    else:
      ops['output'] = (lambda m: native.output_transform(m, (n, h, w)), (m,))
      ops['output_adjoint'] = (native.output_transform_adjoint, (jnp.ones((n, h, w, cout)),))
    row = {'conv': name, 'shape': f'{n}x{h}x{w}, {cin}->{cout}'}
    row.update({op: _median_ms(fn, args, repeats) for op, (fn, args) in ops.items()})
    rows.append(row)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=1024)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  host_allocator.apply('hugepages')
  print(f'{jax.devices()[0].device_kind}, batch {args.batch}, median of {args.repeats} '
        f'calls (ms)')
  total = 0.0
  for row in bench(args.batch, args.repeats):
    times = {k: t for k, t in row.items() if k not in ('conv', 'shape')}
    total += sum(times.values())
    print(f"{row['conv']:13} {row['shape']:20} " +
          '  '.join(f'{k} {t:6.1f}' for k, t in times.items()))
  print(f'all of the above, summed: {total:.0f} ms')


if __name__ == '__main__':
  main()
