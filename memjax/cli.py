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

from memjax.runtime.errors import MemjaxError

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None,
    "Call jax.distributed.initialize() before anything else. Default: when "
    "MEMJAX_DISTRIBUTED=1 or JAX_COORDINATOR_ADDRESS is set in the environment.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (not needed on TPU pods or SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_ATTENTION = flags.DEFINE_enum(
    "attention", None, ["xla", "cudnn", "blocked"],
    "Attention kernel (default: blocked on CPU, cuDNN for bf16/fp16 on GPU, else XLA).")


# Flags shared by the stages (scan, blackbox, generate, ...), defined once here
# because absl refuses a flag name defined twice in one process.
_MODEL = flags.DEFINE_string("model", None, "Stable Diffusion folder (diffusers layout).")
_PROMPTS = flags.DEFINE_string(
    "prompts", None, "Caption table: .parquet, .jsonl, .csv, .tsv, .txt (or a stage's workdir "
    "where the stage says so).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (the unit of work; resumable).")
_COLUMN = flags.DEFINE_string("prompt_column", "caption", "Caption column of the table.")
_DELIM = flags.DEFINE_string("csv_delimiter", None, "CSV delimiter (default: detected).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Prompts per step, over all local devices.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Noise seeds; scores are the mean over seeds.")
_CFG = flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance scale w.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Params and activations.")
_NOISE = flags.DEFINE_string("noise", None, ".npy start noise [n_seeds, C, H, W] or [C, H, W].")
_MAX = flags.DEFINE_integer("max_prompts", None, "Use only the first N rows.")
_TOPK = flags.DEFINE_integer("top_k", 100, "Rows kept in WORKDIR/top_k.parquet.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Discard a previous run with other settings.")
_LOG_EVERY = flags.DEFINE_float("log_interval_s", 30.0, "Seconds between progress lines.")
IMAGES = flags.DEFINE_string(
    "images", None,
    "memjax.blackbox: external images, a folder with one subfolder per prompt (caption: the "
    "subfolder's prompt.txt or its name) or a table with caption and image-path columns. "
    "memjax.index: the training-image table (`url` and/or `image_path`, `caption`, "
    "optional `index`).")


def common_flag_values(required=("model", "prompts", "workdir")) -> dict:
  """The shared flags as keyword arguments of a stage's config dataclass."""
  values = {"model": _MODEL.value, "prompts": _PROMPTS.value, "workdir": _WORKDIR.value}
  for name in required:
    if not values[name]:
      raise MemjaxError(f"--{name} is required")
  try:
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError:
    raise MemjaxError(f"--seeds must be integers, got {','.join(_SEEDS.value)}") from None
  values.update(prompt_column=_COLUMN.value, csv_delimiter=_DELIM.value,
                batch_size=_BATCH.value, seeds=seeds, guidance_scale=_CFG.value,
                dtype=_DTYPE.value, noise=_NOISE.value, max_prompts=_MAX.value,
                top_k=_TOPK.value, overwrite=_OVERWRITE.value, log_interval_s=_LOG_EVERY.value)
  return values


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
