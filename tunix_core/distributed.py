"""Multi-process start-up (Pathways, then jax.distributed) and process-local data -> global arrays."""

import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

# Environment variables by which launchers (TPU pods, SLURM, Open MPI, GKE/XPK) describe a multi-process
# job; jax.distributed.initialize() reads the details itself.
_MULTI_PROCESS_HINTS = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")
_PROCESS_COUNT_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES")


def _environment_wants_many_processes() -> bool:
  if any(os.environ.get(name) for name in _MULTI_PROCESS_HINTS):
    return True
  if any(int(os.environ.get(name, "1") or 1) > 1 for name in _PROCESS_COUNT_VARIABLES):
    return True
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in tpu_hosts


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Starts Pathways when JAX_PLATFORMS asks for it, then jax.distributed when several processes run.

  Explicit arguments (from the config) win over what the environment says; with neither, this does
  nothing and JAX runs as one process. Calling it twice is harmless.
  """
  import pathwaysutils  # pylint: disable=import-outside-toplevel

  pathwaysutils.initialize()
  if jax.distributed.is_initialized():
    return
  explicit = bool(coordinator_address) or num_processes > 1
  if not explicit and not _environment_wants_many_processes():
    return
  jax.distributed.initialize(
      coordinator_address=coordinator_address or None,
      num_processes=num_processes if num_processes > 0 else None,
      process_id=process_id if process_id >= 0 else None)


def row_sharding(sharding: NamedSharding) -> NamedSharding:
  """The sharding of one value per row ([..., rows]) that goes with token arrays ([..., rows, length]) in `sharding`."""
  return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[:-1]))


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding,
                 global_rows: int) -> dict[str, jax.Array]:
  """Builds global arrays from each process's rows: token arrays are [..., rows, length] in `sharding`; arrays of
  one value per row are [..., rows], sharded as `sharding` without its length axis."""
  per_row = row_sharding(sharding)

  def one(local: np.ndarray) -> jax.Array:
    if local.ndim == len(sharding.spec):
      return jax.make_array_from_process_local_data(sharding, local, (*local.shape[:-2], global_rows, local.shape[-1]))
    return jax.make_array_from_process_local_data(per_row, local, (*local.shape[:-1], global_rows))
  return {key: one(value) for key, value in local_batch.items()}
