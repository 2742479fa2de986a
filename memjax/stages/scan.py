"""Whitebox scan: the denoising confidence score of every caption of a table.

    python -m memjax.scan --model=DIR --prompts=FILE --workdir=DIR [--seeds=0,1]
    python -m memjax.scan --flagfile=configs/<name>.flags

The workdir is the unit of work: `WORKDIR/scan/part-*.parquet` (one row per input
row: input columns, `prompt_id`, `scores`, `scores_per_seed`, `wen`,
`uncond_norm`, `align`, `n_tokens`, `truncated`, `status`), `manifest.json`,
`top_k.parquet`. Shards are written under temporary names and renamed, so a rerun
of the same command resumes where a killed one stopped; a rerun with other
settings is refused unless --overwrite.
"""
import dataclasses
import os
import queue
import threading
import time
from typing import Dict, List, Optional, Sequence

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from memjax import cli
from memjax.method import noise as noise_lib
from memjax.runtime import progress as progress_lib
from memjax.data import prompts as prompts_lib
from memjax.runtime import results
from memjax.method import whitebox
from memjax.runtime.errors import InputError
from memjax.models import loading

TIMESTEP = 999  # ALGORITHMS.md section 2: one step from sigma_max = sigma(999)
SCORE_COLUMNS = ("scores", "scores_per_seed", "wen", "uncond_norm", "align", "n_tokens",
                 "truncated", "status")


@dataclasses.dataclass
class ScanConfig:
  model: str
  prompts: str
  workdir: str
  prompt_column: str = "caption"
  csv_delimiter: Optional[str] = None
  batch_size: int = 32
  seeds: Sequence[int] = (0,)
  guidance_scale: float = 7.5
  dtype: str = "float32"
  noise: Optional[str] = None
  max_prompts: Optional[int] = None
  top_k: int = 100
  shard_size: int = 4096
  overwrite: bool = False
  log_interval_s: float = 30.0
  devices: Optional[int] = None  # local devices to use (None: all)

  def identity(self, model_identity: str, noise_digest: str) -> Dict:
    """What changes results: a resume must match it exactly."""
    return {"model": os.path.abspath(self.model), "model_identity": model_identity,
            "prompts": os.path.abspath(self.prompts), "prompt_column": self.prompt_column,
            "seeds": list(self.seeds), "guidance_scale": self.guidance_scale,
            "dtype": self.dtype, "noise": noise_digest, "max_prompts": self.max_prompts,
            "shard_size": self.shard_size, "timestep": TIMESTEP}


class _Scorer:
  """The jitted scoring function bound to one model, noise and mesh."""

  def __init__(self, sd: loading.StableDiffusion, noise: np.ndarray, guidance_scale: float,
               batch_size: int, mesh):
    self.mesh = mesh
    self.batch_size = batch_size
    self.traces = 0
    replicated = NamedSharding(mesh, P())
    self.batch_sharding = NamedSharding(mesh, P("data"))
    put = lambda tree: jax.device_put(tree, replicated)
    self.text_params = put(sd.params["text_encoder"])
    self.unet_params = put(sd.params["unet"])
    self.noise = put(jnp.asarray(noise))
    score = whitebox.make_score_fn(sd.text_encoder.apply, sd.unet.apply, sd.schedule,
                                   guidance_scale, TIMESTEP)

    def counted(*args):
      self.traces += 1  # runs at trace time only
      return score(*args)

    self._score = jax.jit(counted, out_shardings=self.batch_sharding)
    uncond = jax.jit(whitebox.make_uncond_fn(sd.text_encoder.apply, sd.unet.apply,
                                             sd.schedule, TIMESTEP))
    empty = sd.tokenizer.encode_batch([""])["input_ids"]
    start = time.perf_counter()
    self.e_u = put(uncond(self.text_params, self.unet_params, jnp.asarray(empty), self.noise))
    self.uncond_s = time.perf_counter() - start
    self.pad_ids = empty[0]

  def __call__(self, ids: np.ndarray):
    """ids [batch_size, 77] int32 -> dict of device arrays [batch_size, S]."""
    ids = jax.device_put(ids, self.batch_sharding)
    return self._score(self.text_params, self.unet_params, ids, self.noise, self.e_u)


def _prepare(chunk: prompts_lib.PromptChunk, tokenizer) -> Dict:
  """Tokenizes one shard's cleaned captions (runs in the prefetch thread)."""
  valid = np.array([t is not None for t in chunk.texts], bool)
  enc = tokenizer.encode_batch([t for t in chunk.texts if t is not None])
  return {"table": chunk.table, "status": chunk.status, "valid": valid, "enc": enc}


def _output_table(prep: Dict, stats: Dict[str, np.ndarray]) -> pa.Table:
  """Input columns + prompt_id + score columns; skipped rows get null scores."""
  table, valid, enc = prep["table"], prep["valid"], prep["enc"]
  n, idx = len(valid), np.flatnonzero(valid)
  mask = ~valid

  def column(per_prompt: np.ndarray, dtype=pa.float32()):
    full = np.zeros((n,) + per_prompt.shape[1:], per_prompt.dtype)
    full[idx] = per_prompt
    return pa.array(full, type=dtype, mask=mask)

  per_seed = stats["dcs"]  # [n_valid, S]
  full_seed = np.zeros((n, per_seed.shape[1]), np.float32)
  full_seed[idx] = per_seed
  seeds_col = pa.array([list(r) if v else None for r, v in zip(full_seed, valid)],
                       type=pa.list_(pa.float32()))
  cols = {
      "scores": column(per_seed.mean(axis=1)),
      "scores_per_seed": seeds_col,
      "wen": column(stats["wen"].mean(axis=1)),
      "uncond_norm": column(stats["uncond_norm"].mean(axis=1)),
      "align": column(stats["align"].mean(axis=1)),
      "n_tokens": column(enc["n_tokens"].astype(np.int32), pa.int32()),
      "truncated": column(enc["truncated"].astype(bool), pa.bool_()),
      "status": pa.array(prep["status"], pa.string()),
  }
  for name in SCORE_COLUMNS:
    if name in table.column_names:  # an input column of the same name is kept, renamed
      table = table.rename_columns([f"input_{c}" if c == name else c for c in table.column_names])
  for name, col in cols.items():
    table = table.append_column(name, col)
  return table


def _score_shard(scorer: _Scorer, enc: Dict) -> Dict[str, np.ndarray]:
  """Scores the valid prompts of one shard in fixed-size padded batches."""
  ids = enc["input_ids"]
  n, b = len(ids), scorer.batch_size
  outs: List = []
  for start in range(0, n, b):
    chunk = ids[start:start + b]
    real = len(chunk)
    if real < b:  # the last batch: pad with the empty prompt, masked out below
      chunk = np.concatenate([chunk, np.broadcast_to(scorer.pad_ids, (b - real, ids.shape[1]))])
    outs.append((scorer(np.ascontiguousarray(chunk, np.int32)), real))  # async dispatch
  merged: Dict[str, list] = {}
  for out, real in outs:
    for k, v in jax.device_get(out).items():
      merged.setdefault(k, []).append(np.asarray(v)[:real])
  if not merged:
    s = scorer.noise.shape[0]
    return {k: np.zeros((0, s), np.float32) for k in ("dcs", "wen", "uncond_norm", "align")}
  return {k: np.concatenate(v) for k, v in merged.items()}


def _prefetch(table, ranges, tokenizer, out: queue.Queue, stop: threading.Event):
  try:
    for start, end in ranges:
      if stop.is_set():
        return
      out.put((start, end, _prepare(table.read_prompts(start, end), tokenizer)))
  except BaseException as e:  # pylint: disable=broad-except  # re-raised by the consumer
    out.put(e)
    return
  out.put(None)


def run(cfg: ScanConfig) -> Dict:
  """Scores every prompt of cfg.prompts into cfg.workdir; returns the manifest."""
  t_start = time.perf_counter()
  if cfg.batch_size < 1:
    raise InputError(f"--batch_size must be >= 1, got {cfg.batch_size}")
  if not cfg.seeds and not cfg.noise:
    raise InputError("--seeds must name at least one seed")
  table = prompts_lib.open_prompts(cfg.prompts, cfg.prompt_column, cfg.csv_delimiter)
  n_rows = table.num_rows if cfg.max_prompts is None else min(table.num_rows, cfg.max_prompts)
  sd = loading.load_stable_diffusion(cfg.model, cfg.dtype, components=("unet", "text_encoder"))
  load_s = time.perf_counter() - t_start
  noise, noise_digest, _ = noise_lib.start_noise(cfg.noise, cfg.seeds, sd.latent_shape_chw)
  pid, nproc = jax.process_index(), jax.process_count()
  identity = cfg.identity(results.model_identity(cfg.model), noise_digest)
  if pid == 0:
    results.check_run_config(cfg.workdir, identity, cfg.overwrite)
  cli.barrier("memjax_scan_config")
  if pid != 0:
    results.check_run_config(cfg.workdir, identity, overwrite=False)

  mesh = cli.local_mesh(cfg.devices)
  n_dev = mesh.devices.size
  batch = -(-cfg.batch_size // n_dev) * n_dev  # a multiple of the local device count
  scorer = _Scorer(sd, noise, cfg.guidance_scale, batch, mesh)
  writer = results.ShardedResults(cfg.workdir, "scan", process_index=pid)
  ranges = [(s, min(s + cfg.shard_size, n_rows)) for s in range(0, n_rows, cfg.shard_size)]
  mine = [r for i, r in enumerate(ranges) if i % nproc == pid]
  todo = writer.pending(mine)
  logging.info("scan: %d prompts, %d shards for process %d (%d already done), batch %d "
               "on %d devices", n_rows, len(mine), pid, len(mine) - len(todo), batch, n_dev)

  progress = progress_lib.Progress(sum(e - s for s, e in todo), what="prompts",
                                   interval_s=cfg.log_interval_s)
  q: queue.Queue = queue.Queue(maxsize=2)
  stop = threading.Event()
  thread = threading.Thread(target=_prefetch, daemon=True,
                            args=(table, todo, sd.tokenizer, q, stop))
  thread.start()
  t_score = time.perf_counter()
  first_batch_s = None
  try:
    while True:
      item = q.get()
      if item is None:
        break
      if isinstance(item, BaseException):
        raise item
      start, end, prep = item
      t0 = time.perf_counter()
      stats = _score_shard(scorer, prep["enc"])
      if first_batch_s is None:
        first_batch_s = time.perf_counter() - t0
      writer.write(_output_table(prep, stats), start, end)
      progress.update(end - start)
  finally:
    stop.set()
  score_s = time.perf_counter() - t_score

  cli.barrier("memjax_scan_done")
  manifest = {}
  if pid == 0:
    manifest = _finish(cfg, identity, writer, ranges, {
        "load_s": load_s, "uncond_s": scorer.uncond_s, "first_shard_s": first_batch_s,
        "score_s": score_s, "total_s": time.perf_counter() - t_start,
        "prompts_scored_this_run": progress.summary()["done"]}, scorer, n_dev)
  return manifest


def _finish(cfg, identity, writer, ranges, timings, scorer, n_dev) -> Dict:
  missing = writer.pending(ranges)
  if missing:
    raise InputError(f"scan incomplete: {len(missing)} shards missing, e.g. {missing[0]}; "
                     "rerun the same command to finish them")
  scan_dir = os.path.join(cfg.workdir, "scan")
  counts = results.count_statuses(scan_dir)
  results.write_top_k(cfg.workdir, cfg.top_k, "scores")
  rate = timings["prompts_scored_this_run"] / timings["score_s"] if timings["score_s"] else None
  manifest = {
      "stage": "scan", "config": dataclasses.asdict(cfg), "identity": identity,
      "rows": sum(e - s for s, e in ranges), "counts": counts,
      "scored": sum(v for k, v in counts.items() if k.startswith("ok")),
      "skipped": {k: v for k, v in counts.items() if not k.startswith("ok")},
      "timings": dict(timings, prompts_per_s=rate),
      "compiles": scorer.traces, "devices": n_dev, "processes": jax.process_count(),
      "backend": jax.default_backend(), "jax_version": jax.__version__,
  }
  results.write_json_atomic(os.path.join(cfg.workdir, "manifest.json"), manifest)
  return manifest


# ---- command line -----------------------------------------------------------------

_SHARD = flags.DEFINE_integer("shard_size", 4096, "Rows per output shard.")


def _config_from_flags() -> ScanConfig:
  f = cli.common_flag_values(required=("model", "prompts", "workdir"))
  return ScanConfig(shard_size=_SHARD.value, **f)


def main(argv):
  del argv
  cli.startup_from_flags()
  cfg = _config_from_flags()
  manifest = run(cfg)
  if manifest:
    print(f"scan done: {manifest['scored']} scored, skipped {manifest['skipped'] or 'none'}, "
          f"{manifest['timings']['prompts_per_s'] or 0.0:.1f} prompts/s; "
          f"results in {os.path.join(cfg.workdir, 'scan')}")


if __name__ == "__main__":
  cli.run_main(main)
