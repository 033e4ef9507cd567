"""The seed's code path at toy size on generated data, in seconds.

    python -m jaxres.train --config experiments/smoke.py --workdir runs/smoke
"""

from experiments import base


def get_config():
  config = base.get_config()
  config.num_epochs = 3
  config.batch_size = 64
  config.eval_batch_size = 100
  config.learning_rate = 3e-3
  config.model.widths = (8, 16, 32, 64)
  config.model.blocks = (1, 1, 1, 1)
  # At toy widths compilation dominates, and XLA's convolution compiles faster than the
  # CPU matmul formulations (which pay at the seed's widths: tools.bench). The shipped
  # automatic settings are trained by tests/test_multihost.py's shipped-recipe test.
  config.model.conv_impl = 'xla'
  # Toy buffers stay under glibc's mmap threshold: restarting for huge pages gains nothing.
  config.host_allocator = 'system'
  config.data.name = 'synthetic'
  config.data.num_workers = 0
  config.data.augment = 'flip_crop'
  config.data.synthetic_train_size = 1024
  config.data.synthetic_test_size = 500
  return config
