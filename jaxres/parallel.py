"""Data parallelism on JAX's own runtime: one device mesh, jit with shardings.

The global batch is split along a 1-D mesh axis 'data' over every device of every
process; the train state is replicated. XLA inserts the collectives, so BatchNorm
statistics and metrics computed over the batch axis are global (synchronized) for free.
Across hosts, `jax.distributed.initialize` connects the processes first.
"""

import os
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxres.errors import UsageError

DATA_AXIS = 'data'


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Connect to the other processes of a multi-host run, if there are any.

  Arguments left as None come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID. With no coordinator address at all this is a single-process run and
  nothing happens.
  """
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if not address:
    return
  if num_processes is None and os.environ.get('JAX_NUM_PROCESSES'):
    num_processes = int(os.environ['JAX_NUM_PROCESSES'])
  if process_id is None and os.environ.get('JAX_PROCESS_ID'):
    process_id = int(os.environ['JAX_PROCESS_ID'])
  jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                             process_id=process_id)


def make_mesh() -> Mesh:
  """A 1-D mesh over every device of every process."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, name: str = 'batch_size'):
  devices = mesh.devices.size
  if batch_size % devices:
    raise UsageError(f'config.{name}={batch_size} does not split evenly over {devices} devices '
                     f'({jax.process_count()} processes); use a multiple of {devices}')


def global_batch(local: dict, sharding: NamedSharding) -> dict:
  """Assemble each process's rows of a batch into global arrays sharded over the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def is_main_process() -> bool:
  return jax.process_index() == 0
