"""Blackbox attack: edge consistency of few-step samples (ALGORITHMS.md section 3).

    python -m memjax.blackbox --model=DIR --prompts=FILE_OR_SCAN_WORKDIR --workdir=DIR \
        [--top_k=N] [--seeds=0,1,2,3] [--save_images] [--noise=FILE.npy]
    python -m memjax.blackbox --images=DIR_OR_TABLE --workdir=DIR

With a model, every prompt gets one-step CFG samples (seeds 0..3 unless
--seeds/--noise say otherwise), decoded, rounded to 8 bits and scored by
`edges.edge_score_numpy`. Given a scan workdir as --prompts, the scan's top K by
`scores` are attacked. With --images, the images come from the user (a system
known only through its outputs) and are scored the same way.

Outputs follow the scan's conventions: `WORKDIR/blackbox/part-*.parquet` (input
columns, `prompt_id`, `caption`, `edge_scores`, `status`, ...), resumable with
the run-config check (`run_config_blackbox.json`), `manifest_blackbox.json`,
`top_k_blackbox.parquet`; with --save_images, PNGs at
`WORKDIR/images/<prompt_id>/<seed>.png` and `WORKDIR/images.parquet` mapping
them to prompts.
"""
import collections
import concurrent.futures
import dataclasses
import hashlib
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from memjax import cli
from memjax.method import edges
from memjax.data import images as images_lib
from memjax.method import noise as noise_lib
from memjax.method import onestep
from memjax.runtime import progress as progress_lib
from memjax.data import prompts as prompts_lib
from memjax.runtime import results
from memjax.method import whitebox
from memjax.runtime.errors import InputError
from memjax.models import loading

STAGE = "blackbox"
DEFAULT_SEEDS = (0, 1, 2, 3)  # the reference's n_seeds=4, seed_offset=0


@dataclasses.dataclass
class BlackboxConfig:
  workdir: str
  model: Optional[str] = None
  prompts: Optional[str] = None
  images: Optional[str] = None  # external images instead of model + prompts
  prompt_column: str = "caption"
  csv_delimiter: Optional[str] = None
  batch_size: int = 8
  seeds: Sequence[int] = DEFAULT_SEEDS
  guidance_scale: float = 7.5
  dtype: str = "float32"
  noise: Optional[str] = None
  max_prompts: Optional[int] = None
  top_k: int = 100
  shard_size: int = 256
  overwrite: bool = False
  log_interval_s: float = 30.0
  devices: Optional[int] = None
  save_images: bool = False
  edge_threshold: float = edges.EDGE_THRESHOLD
  edge_consistency: float = edges.CONSISTENCY
  image_column: str = "image_path"
  max_image_pixels: int = images_lib.DEFAULT_MAX_PIXELS
  edge_workers: int = 0  # host threads for resizing/edges/PNGs (0: one per core)


class _Sampler:
  """The jitted one-step sampler bound to one model, noise and mesh."""

  def __init__(self, sd, noise: np.ndarray, guidance_scale: float, batch_size: int, mesh):
    self.batch_size = batch_size
    self.traces = 0
    replicated = NamedSharding(mesh, P())
    self.batch_sharding = NamedSharding(mesh, P("data"))
    put = lambda tree: jax.device_put(tree, replicated)
    self.params = [put(sd.params[k]) for k in ("text_encoder", "unet", "vae")]
    self.noise = put(jnp.asarray(noise))
    sample = onestep.make_onestep_fn(sd.text_encoder.apply, sd.unet.apply,
                                     onestep.vae_decode_fn(sd), sd.schedule, guidance_scale,
                                     sd.vae_scaling_factor, onestep.TIMESTEP)

    def counted(text_p, unet_p, vae_p, ids, z, e_u):
      self.traces += 1  # runs at trace time only
      x = sample(text_p, unet_p, vae_p, ids, z, e_u)  # [B, S, H, W, 3]
      # uint8 leaves the device (4x less to copy); non-finite outputs are flagged.
      return onestep.to_uint8_jax(x), jnp.all(jnp.isfinite(x), axis=(2, 3, 4))

    self._sample = jax.jit(counted, out_shardings=(self.batch_sharding, self.batch_sharding))
    uncond = jax.jit(whitebox.make_uncond_fn(sd.text_encoder.apply, sd.unet.apply,
                                             sd.schedule, onestep.TIMESTEP))
    empty = sd.tokenizer.encode_batch([""])["input_ids"]
    self.e_u = put(uncond(self.params[0], self.params[1], jnp.asarray(empty), self.noise))
    self.pad_ids = empty[0]

  def __call__(self, ids: np.ndarray):
    """ids [batch_size, 77] -> (uint8 [batch_size, S, H, W, 3], finite [batch_size, S])."""
    ids = jax.device_put(np.ascontiguousarray(ids, np.int32), self.batch_sharding)
    return self._sample(*self.params, ids, self.noise, self.e_u)


def _postprocess(cfg: BlackboxConfig, pixels: np.ndarray, finite: np.ndarray,
                 prompt_id: int, seed_names: Sequence[int]):
  """One prompt's uint8 [S, H, W, 3] -> (edge score or None, status, PNG paths)."""
  paths = []
  if cfg.save_images:
    for pix, name in zip(pixels, seed_names):
      rel = os.path.join("images", str(prompt_id), f"{name}.png")
      images_lib.write_png(os.path.join(cfg.workdir, rel), pix)
      paths.append(rel)
  if not finite.all():
    return None, "nonfinite_output", paths
  resized = [edges.resize_for_edges(p) for p in pixels]
  return edges.edge_score_numpy(resized, cfg.edge_threshold, cfg.edge_consistency), "ok", paths


def _generate_shard(cfg, sampler: _Sampler, pool, prep: Dict, seed_names) -> Dict:
  """Samples and scores the valid prompts of one shard; at most 2 batches in flight."""
  ids, rows = prep["enc"]["input_ids"], prep["rows"]
  b, futures, pending = sampler.batch_size, [], collections.deque()

  def collect():
    start, real, out = pending.popleft()
    pixels, finite = jax.device_get(out)
    for i in range(real):
      futures.append(pool.submit(_postprocess, cfg, pixels[i], finite[i],
                                 int(rows[start + i]), seed_names))

  for start in range(0, len(ids), b):
    chunk = ids[start:start + b]
    real = len(chunk)
    if real < b:  # the last batch: padded with the empty prompt, dropped in collect
      chunk = np.concatenate([chunk, np.broadcast_to(sampler.pad_ids, (b - real, ids.shape[1]))])
    pending.append((start, real, sampler(chunk)))  # async dispatch
    if len(pending) > 1:
      collect()
  while pending:
    collect()
  return [f.result() for f in futures]


# ---- prompt sources and output tables ---------------------------------------------

@dataclasses.dataclass
class _PromptSource:
  """Rows of a prompt file, or of a scan's top K (in memory), read by range."""
  num_rows: int
  read: Callable[[int, int], prompts_lib.PromptChunk]
  caption_column: str
  settings: Dict  # what identifies the rows, for the run-config check


def _open_prompt_source(path, prompt_column, csv_delimiter, top_k, max_prompts):
  """--prompts: a caption table, or a scan workdir (its top K by `scores`)."""
  scan = results.stage_paths(path, "scan")
  if not (os.path.isdir(path) and os.path.isdir(scan["dir"])):
    table = prompts_lib.open_prompts(path, prompt_column, csv_delimiter)
    n = table.num_rows if max_prompts is None else min(table.num_rows, max_prompts)
    return _PromptSource(n, table.read_prompts, prompt_column, {
        "prompts": os.path.abspath(path), "prompt_column": prompt_column,
        "max_prompts": max_prompts})
  if not os.path.exists(scan["manifest"]):
    raise InputError(f"--prompts={path}: the scan there is not finished ({scan['manifest']} "
                     "is missing); rerun the scan to finish it")
  column = results.read_json(scan["run_config"]).get("prompt_column", "caption")
  top = results.top_k(scan["dir"], top_k, "scores")
  # The scan's own row ids and statuses stay, renamed: these rows get new ids 0..K-1.
  top = top.rename_columns([{"prompt_id": "scan_prompt_id", "status": "scan_status"}.get(c, c)
                            for c in top.column_names])
  ids = hashlib.sha256(repr(top["scan_prompt_id"].to_pylist()).encode()).hexdigest()

  def read(start, stop):
    part = top.slice(start, stop - start)
    texts, status = prompts_lib.clean_captions(part[column])
    part = part.append_column("prompt_id", pa.array(np.arange(start, stop, dtype=np.int64)))
    return prompts_lib.PromptChunk(start, stop, part, texts, status)

  return _PromptSource(top.num_rows, read, column, {
      "prompts": os.path.abspath(path), "scan_run_config": results.read_json(scan["run_config"]),
      "top_k": top_k, "top_k_ids": ids})


def _tokenize(chunk: prompts_lib.PromptChunk, tokenizer) -> Dict:
  valid = np.array([t is not None for t in chunk.texts], bool)
  enc = tokenizer.encode_batch([t for t in chunk.texts if t is not None])
  return {"enc": enc, "valid": valid, "rows": chunk.start + np.flatnonzero(valid)}


def _generated_table(chunk, caption_column: str, prep: Dict, out: List, seeds: Sequence[int],
                     save_images: bool) -> pa.Table:
  """Input columns + prompt_id + caption + edge_scores, gen_seeds, status (+ image_paths)."""
  table, n = chunk.table, chunk.stop - chunk.start
  scores, status, paths = [None] * n, list(chunk.status), [None] * n
  for i, (score, st, p) in zip(np.flatnonzero(prep["valid"]), out):
    # a scored row keeps its caption's status ("ok" or "ok_replaced_utf8").
    scores[i], status[i], paths[i] = score, st if st != "ok" else status[i], p
  cols = {"edge_scores": pa.array(scores, pa.float32()),
          "gen_seeds": pa.array([list(seeds) if v else None for v in prep["valid"]],
                                pa.list_(pa.int64())),
          "status": pa.array(status, pa.string())}
  if save_images:
    cols["image_paths"] = pa.array(paths, pa.list_(pa.string()))
  if caption_column != "caption" and "caption" not in table.column_names:
    cols["caption"] = pa.array(chunk.texts, pa.string())
  for name in cols:  # an input column of the same name is kept, renamed
    table = table.rename_columns([f"input_{c}" if c == name else c for c in table.column_names])
  for name, col in cols.items():
    table = table.append_column(name, col)
  return table


def _check_config(cfg: BlackboxConfig) -> None:
  if cfg.images and (cfg.model or cfg.prompts):
    raise InputError("give either --images (external images) or --model and --prompts")
  if not cfg.images and not (cfg.model and cfg.prompts):
    raise InputError("--model and --prompts are required (or --images for external images)")
  if cfg.batch_size < 1 or cfg.shard_size < 1:
    raise InputError(f"--batch_size and --blackbox_shard_size must be >= 1, got "
                     f"{cfg.batch_size}, {cfg.shard_size}")
  if not cfg.images and not cfg.noise and len(cfg.seeds) < 2:
    raise InputError(f"the edge score compares samples: --seeds needs at least 2 seeds, "
                     f"got {list(cfg.seeds)}")


def run(cfg: BlackboxConfig) -> Dict:
  """Scores every prompt (or external image group) into cfg.workdir; returns the manifest."""
  t_start = time.perf_counter()
  _check_config(cfg)
  common = {"shard_size": cfg.shard_size, "edge_threshold": cfg.edge_threshold,
            "edge_consistency": cfg.edge_consistency, "save_images": cfg.save_images}
  sampler, seed_names = None, []
  if cfg.images:
    source = images_lib.ExternalSource(cfg.images, cfg.prompt_column, cfg.image_column,
                                        cfg.csv_delimiter, cfg.max_image_pixels)
    identity = dict(common, mode="external", **source.identity())
  else:
    source = _open_prompt_source(cfg.prompts, cfg.prompt_column, cfg.csv_delimiter,
                                 cfg.top_k, cfg.max_prompts)
    sd = loading.load_stable_diffusion(cfg.model, cfg.dtype)
    noise, noise_digest, seed_names = noise_lib.start_noise(cfg.noise, cfg.seeds,
                                                            sd.latent_shape_chw)
    if len(noise) < 2:
      raise InputError(f"--noise={cfg.noise}: the edge score needs at least 2 noise arrays")
    identity = dict(common, mode="generated", model=os.path.abspath(cfg.model),
                    model_identity=results.model_identity(cfg.model), noise=noise_digest,
                    guidance_scale=cfg.guidance_scale, dtype=cfg.dtype,
                    timestep=onestep.TIMESTEP, **source.settings)
  pid, nproc = jax.process_index(), jax.process_count()
  if pid == 0:
    results.check_run_config(cfg.workdir, identity, cfg.overwrite, stage=STAGE)
  cli.barrier("memjax_blackbox_config")
  if pid != 0:
    results.check_run_config(cfg.workdir, identity, overwrite=False, stage=STAGE)
  load_s = time.perf_counter() - t_start

  n_rows = source.num_rows
  ranges = [(s, min(s + cfg.shard_size, n_rows)) for s in range(0, n_rows, cfg.shard_size)]
  mine = [r for i, r in enumerate(ranges) if i % nproc == pid]
  writer = results.ShardedResults(cfg.workdir, STAGE, process_index=pid)
  todo = writer.pending(mine)
  logging.info("blackbox (%s): %d rows, %d shards for process %d (%d already done)",
               identity["mode"], n_rows, len(mine), pid, len(mine) - len(todo))
  progress = progress_lib.Progress(sum(e - s for s, e in todo), "prompts", cfg.log_interval_s)
  workers = cfg.edge_workers or os.cpu_count() or 1
  first_s, t_work = None, time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    for start, end in todo:
      t0 = time.perf_counter()
      chunk = source.read(start, end)
      if cfg.images:
        table = images_lib.score_external(chunk, start, pool, cfg.edge_threshold,
                                           cfg.edge_consistency, cfg.max_image_pixels)
      else:
        if sampler is None:  # built lazily: a finished run resumes without compiling
          mesh = cli.local_mesh(cfg.devices)
          n_dev = mesh.devices.size
          sampler = _Sampler(sd, noise, cfg.guidance_scale,
                             -(-cfg.batch_size // n_dev) * n_dev, mesh)
        prep = _tokenize(chunk, sd.tokenizer)
        out = _generate_shard(cfg, sampler, pool, prep, seed_names)
        table = _generated_table(chunk, source.caption_column, prep, out, seed_names,
                                 cfg.save_images)
      writer.write(table, start, end)
      first_s = first_s if first_s is not None else time.perf_counter() - t0
      progress.update(end - start)
  work_s = time.perf_counter() - t_work

  cli.barrier("memjax_blackbox_done")
  if pid != 0:
    return {}
  summary = progress.summary()
  done = summary["done"] - summary["resumed"]
  timings = {"load_s": load_s, "first_shard_s": first_s, "work_s": work_s,
             "total_s": time.perf_counter() - t_start, "rows_this_run": done,
             "rows_per_s": done / work_s if work_s and done else None}
  if timings["rows_per_s"] and sampler is not None:
    timings["images_per_s"] = timings["rows_per_s"] * len(sampler.noise)
  return _finish(cfg, identity, writer, ranges, timings, sampler)


def _finish(cfg, identity, writer, ranges, timings, sampler) -> Dict:
  missing = writer.pending(ranges)
  if missing:
    raise InputError(f"blackbox incomplete: {len(missing)} shards missing, e.g. {missing[0]}; "
                     "rerun the same command to finish them")
  paths = results.stage_paths(cfg.workdir, STAGE)
  counts = results.count_statuses(paths["dir"])
  scored = sum(v for k, v in counts.items() if k.startswith("ok"))
  if scored:
    results.write_top_k(cfg.workdir, cfg.top_k, "edge_scores", stage=STAGE)
  n_images = (images_lib.write_image_table(cfg.workdir, paths["dir"])
              if cfg.save_images else 0)
  manifest = {
      "stage": STAGE, "config": dataclasses.asdict(cfg), "identity": identity,
      "rows": sum(e - s for s, e in ranges), "counts": counts, "scored": scored,
      "skipped": {k: v for k, v in counts.items() if not k.startswith("ok")},
      "images_written": n_images, "timings": timings,
      "compiles": sampler.traces if sampler is not None else 0,
      "processes": jax.process_count(), "backend": jax.default_backend(),
      "jax_version": jax.__version__,
  }
  results.write_json_atomic(paths["manifest"], manifest)
  return manifest


# ---- command line -----------------------------------------------------------------

_IMAGES = cli.IMAGES  # shared with memjax.index (one flag name per process)
_SAVE = flags.DEFINE_bool("save_images", False, "Write the one-step samples as PNGs under "
                          "WORKDIR/images/<prompt_id>/<seed>.png.")
_EDGE_T = flags.DEFINE_float("edge_threshold", edges.EDGE_THRESHOLD,
                             "Sobel magnitude (summed over RGB) above which a pixel is an edge.")
_EDGE_C = flags.DEFINE_float("edge_consistency", edges.CONSISTENCY,
                             "A consistent edge: mean over the images' edge maps above this.")
_IMAGE_COL = flags.DEFINE_string("image_column", "image_path",
                                 "Image-path column of an --images table.")
_MAX_PIX = flags.DEFINE_integer("max_image_pixels", images_lib.DEFAULT_MAX_PIXELS,
                                "External images with more pixels are skipped (too_large).")
_SHARD = flags.DEFINE_integer("blackbox_shard_size", 256, "Prompts per output shard.")
_WORKERS = flags.DEFINE_integer("edge_workers", 0, "Host threads for images (0: one per core).")


def _config_from_flags() -> BlackboxConfig:
  f = cli.common_flag_values(required=("workdir",))
  if not flags.FLAGS["seeds"].present and not f["noise"]:
    f["seeds"] = list(DEFAULT_SEEDS)  # the shared flag's default (one seed) is the scan's
  if not flags.FLAGS["batch_size"].present:
    f["batch_size"] = BlackboxConfig.batch_size
  return BlackboxConfig(images=_IMAGES.value, save_images=_SAVE.value,
                        edge_threshold=_EDGE_T.value, edge_consistency=_EDGE_C.value,
                        image_column=_IMAGE_COL.value, max_image_pixels=_MAX_PIX.value,
                        shard_size=_SHARD.value, edge_workers=_WORKERS.value, **f)


def main(argv):
  del argv
  cli.startup_from_flags()
  cfg = _config_from_flags()
  manifest = run(cfg)
  if manifest:
    print(f"blackbox done: {manifest['scored']} scored, skipped "
          f"{manifest['skipped'] or 'none'}; results in "
          f"{results.stage_paths(cfg.workdir, STAGE)['dir']}")


if __name__ == "__main__":
  cli.run_main(main)
