"""Start-up shared by every `python -m memjax.<stage>` entry point.

- `run_main(main)`: absl's app.run, with every `MemjaxError` (a user's missing
  file, malformed table, mismatched model folder) printed as one line and exit
  status 2, never a traceback.
- `maybe_initialize_distributed`: `jax.distributed.initialize()` when asked by flag
  or environment, so one command line serves one CPU, one GPU, a multi-GPU host
  (SLURM) or a TPU pod.
- `local_mesh`: a Mesh over this process's devices with one "data" axis.
- `barrier`: waits for every process (a no-op with one process).
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh

from memjax.errors import MemjaxError

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None,
    "Call jax.distributed.initialize() before anything else. Default: when "
    "MEMJAX_DISTRIBUTED=1 or JAX_COORDINATOR_ADDRESS is set in the environment.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (not needed on TPU pods or SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_ATTENTION = flags.DEFINE_enum(
    "attention", None, ["xla", "cudnn"],
    "Attention kernel for jax.nn.dot_product_attention (default: JAX chooses).")


def distributed_requested(flag_value=None) -> bool:
  if flag_value is not None:
    return bool(flag_value)
  return (os.environ.get("MEMJAX_DISTRIBUTED") == "1" or
          "JAX_COORDINATOR_ADDRESS" in os.environ)


def maybe_initialize_distributed(requested: bool, coordinator_address=None,
                                 num_processes=None, process_id=None) -> None:
  """jax.distributed.initialize() once, when requested."""
  if not requested or jax.distributed.is_initialized():
    return
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d local devices",
               jax.process_index(), jax.process_count(), jax.local_device_count())


def startup_from_flags() -> None:
  """Distributed start-up and kernel choice from the shared flags."""
  from memjax.models import attention  # pylint: disable=g-import-not-at-top
  attention.set_attention_implementation(_ATTENTION.value)
  maybe_initialize_distributed(distributed_requested(_DISTRIBUTED.value), _COORDINATOR.value,
                               _NUM_PROCESSES.value, _PROCESS_ID.value)


def local_mesh(num_devices=None) -> Mesh:
  """Mesh over this process's devices (or the first `num_devices`), axis "data".

  Each process scores its own rows with its own devices: scoring is
  embarrassingly parallel, so no step needs another host, a slow or preempted
  host never stalls the others, and processes may own different numbers of
  batches.
  """
  devices = jax.local_devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise MemjaxError(f"asked for {num_devices} devices; this process has {len(devices)}")
    devices = devices[:num_devices]
  return Mesh(np.array(devices), ("data",))


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Blocks until every process reaches `name` (no-op for one process)."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


def run_main(main) -> None:
  """app.run(main), turning MemjaxError into one line on stderr and exit 2."""
  def wrapped(argv):
    try:
      return main(argv)
    except MemjaxError as e:
      logging.flush()
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  app.run(wrapped)
