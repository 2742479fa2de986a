"""Processes and devices: `jax.distributed` start-up, the local mesh, barriers.

One command line serves one CPU, one GPU, a multi-GPU host (SLURM) or a TPU pod:
each process scores its own rows with its own devices (scoring is embarrassingly
parallel, so no step needs another host, a slow or preempted host never stalls
the others, and processes may own different numbers of batches); process 0
writes what is global (manifests, top-K, reports).
"""
import os
from typing import Optional

from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh

from memjax.runtime.errors import InputError

AXIS = "data"


def distributed_requested(flag_value: Optional[bool] = None) -> bool:
  """The --distributed flag if given, else the environment (MEMJAX_DISTRIBUTED=1
  or JAX_COORDINATOR_ADDRESS set)."""
  if flag_value is not None:
    return bool(flag_value)
  return (os.environ.get("MEMJAX_DISTRIBUTED") == "1" or
          "JAX_COORDINATOR_ADDRESS" in os.environ)


def maybe_initialize(requested: bool, coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None,
                     process_id: Optional[int] = None) -> None:
  """jax.distributed.initialize() once, when requested."""
  if not requested or jax.distributed.is_initialized():
    return
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d local devices",
               jax.process_index(), jax.process_count(), jax.local_device_count())


def local_mesh(num_devices: Optional[int] = None) -> Mesh:
  """Mesh over this process's devices (or the first `num_devices`), axis "data"."""
  devices = jax.local_devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise InputError(f"--devices={num_devices}: this process has {len(devices)} devices")
    devices = devices[:num_devices]
  return Mesh(np.array(devices), (AXIS,))


def is_main() -> bool:
  """Whether this is process 0 (the one that writes global outputs)."""
  return jax.process_index() == 0


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Blocks until every process reaches `name` (no-op for one process)."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


def runtime_info(mesh: Optional[Mesh] = None, compiles: Optional[int] = None) -> dict:
  """What a manifest records about where a stage ran."""
  info = {"backend": jax.default_backend(), "jax_version": jax.__version__,
          "processes": jax.process_count(),
          "devices": int(mesh.devices.size) if mesh is not None else jax.local_device_count()}
  if compiles is not None:
    info["compiles"] = compiles
  return info
