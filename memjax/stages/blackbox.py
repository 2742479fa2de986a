"""Blackbox attack: edge consistency of one-step samples (docs/method.md section 3).

With a model, every prompt gets one-step CFG samples (seeds 0..3 unless `seeds`
or `noise` say otherwise), decoded, rounded to 8 bits and scored by
`edges.edge_score_numpy`. Given a workdir as `prompts`, the scan's top K by
`scores` are attacked. With `images`, the images come from the user (a system
known only through its outputs) and are scored the same way.

`WORKDIR/blackbox/` gets `part-*.parquet` (input columns, `prompt_id`, `caption`,
`edge_scores`, `gen_seeds`, `status`, ...), `top_k.parquet`, `manifest.json`;
with `save_images`, `images/<prompt_id>/<seed>.png` and `images.parquet` (one row
per PNG; paths relative to the stage folder).
"""
import concurrent.futures
import dataclasses
import os
import time
from typing import List, Optional, Sequence

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memjax.data import image_groups
from memjax.data import images as images_lib
from memjax.method import edges
from memjax.method import noise as noise_lib
from memjax.method import onestep
from memjax.runtime import checks
from memjax.runtime import distributed
from memjax.runtime import engine
from memjax.runtime import shards
from memjax.runtime import sources
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError
from memjax.stages import common

STAGE = "blackbox"
DEFAULT_SEEDS = (0, 1, 2, 3)  # the reference's n_seeds=4, seed_offset=0
OWN_COLUMNS = ("caption", "edge_scores", "gen_seeds", "image_paths", "status")


@dataclasses.dataclass
class BlackboxConfig(common.ModelStageSettings):
  """The blackbox stage's settings (each one a flag of `python -m memjax.blackbox`)."""
  workdir: str
  model: Optional[str] = None
  prompts: Optional[str] = None
  images: Optional[str] = None  # external images instead of model + prompts
  batch_size: int = 8
  seeds: Sequence[int] = DEFAULT_SEEDS
  shard_size: int = 256
  save_images: bool = False
  edge_threshold: float = edges.EDGE_THRESHOLD
  edge_consistency: float = edges.CONSISTENCY
  image_column: str = "image_path"
  max_image_pixels: int = images_lib.DEFAULT_MAX_PIXELS
  edge_workers: int = 0  # host threads for resizing/edges/PNGs (0: one per core)

  def __post_init__(self):
    super().__post_init__()
    checks.at_least(self, 0, "edge_workers")
    checks.at_least(self, 1, "max_image_pixels")
    checks.finite(self, "edge_threshold", "edge_consistency")
    if self.images and (self.model or self.prompts):
      raise InputError("give either --images (external images) or --model and --prompts")
    if not self.images and not (self.model and self.prompts):
      raise InputError("--model and --prompts are required (or --images for external images)")
    if not self.images and not self.noise and len(self.seeds) < 2:
      raise InputError(f"the edge score compares samples: --seeds needs at least 2 seeds, "
                       f"got {list(self.seeds)}")


def make_step(sd, noise: np.ndarray, guidance_scale: float, batch_size: int, mesh,
              as_uint8: bool = True) -> engine.BoundStep:
  """The one-step sampler: token ids [B, 77] -> (images [B, S, H, W, 3], finite
  [B, S]), bound to the model, the start noise [S, h, w, c] and e_u. Images are
  uint8 (4x less to copy off the device), or float32 in [0, 1]."""
  bound = common.onestep_bound(sd, noise, mesh, ("text_encoder", "unet", "vae"))
  sample = onestep.make_onestep_fn(sd.text_embed, sd.unet_out, sd.vae_decode, sd.schedule,
                                   guidance_scale, sd.vae_scaling_factor,
                                   sd.schedule.last_timestep)

  def step(b, ids):
    x = sample(b["text_encoder"], b["unet"], b["vae"], ids, b["noise"], b["e_u"])
    finite = jnp.all(jnp.isfinite(x), axis=(2, 3, 4))  # non-finite outputs are flagged
    return (onestep.to_uint8_jax(x) if as_uint8 else x), finite

  return engine.BoundStep(step, bound, batch_size, mesh, common.empty_ids(sd))


def _score_prompt(cfg: BlackboxConfig, folder: str, pixels: np.ndarray, finite: np.ndarray,
                  prompt_id: int, seed_names: Sequence[int]):
  """One prompt's uint8 [S, H, W, 3] -> (edge score or None, status, PNG paths)."""
  paths = []
  if cfg.save_images:
    for pix, name in zip(pixels, seed_names):
      rel = os.path.join(workdir_lib.IMAGES, str(prompt_id), f"{name}.png")
      images_lib.write_png(os.path.join(folder, rel), pix)
      paths.append(rel)
  if not finite.all():
    return None, "nonfinite_output", paths
  resized = [images_lib.to_unit(p, edges.EDGE_SIZE) for p in pixels]
  return edges.edge_score_numpy(resized, cfg.edge_threshold, cfg.edge_consistency), "ok", paths


def _generated_table(cfg, folder, step, pool, tok: common.Tokenized, seeds) -> pa.Table:
  """Samples and scores the valid prompts of one shard (at most 2 batches in flight)."""
  futures: List = []
  for start, (pixels, finite) in step.map(tok.ids, max_in_flight=2):
    for i in range(len(pixels)):
      row = int(tok.chunk.start + tok.rows[start + i])
      futures.append(pool.submit(_score_prompt, cfg, folder, pixels[i], finite[i], row, seeds))
  out = [f.result() for f in futures]
  n, status = len(tok.valid), list(tok.chunk.status)
  for i, (_, st, _) in zip(tok.rows, out):
    status[i] = st if st != "ok" else status[i]  # keeps "ok_replaced_utf8"
  cols = {"edge_scores": common.scatter_list(n, tok.rows, [o[0] for o in out], pa.float32()),
          "gen_seeds": common.scatter_list(n, tok.rows, [list(seeds)] * len(out),
                                           pa.list_(pa.int64())),
          "status": pa.array(status, pa.string())}
  if cfg.save_images:
    cols["image_paths"] = common.scatter_list(n, tok.rows, [o[2] for o in out],
                                              pa.list_(pa.string()))
  return common.append_columns(tok.chunk.table, cols)


def _write_image_table(folder: str) -> int:
  """images.parquet: one row (prompt_id, caption, seed, path) per PNG the shards list."""
  data = shards.open_shards(folder).to_table(
      columns=["prompt_id", "caption", "gen_seeds", "image_paths"])
  data = data.filter(pc.is_valid(data["image_paths"]))
  parent = pc.list_parent_indices(data["image_paths"])
  table = pa.table({"prompt_id": pc.take(data["prompt_id"], parent),
                    "caption": pc.take(data["caption"], parent),
                    "seed": pc.list_flatten(data["gen_seeds"]),
                    "path": pc.list_flatten(data["image_paths"])})
  workdir_lib.write_parquet(os.path.join(folder, workdir_lib.IMAGE_TABLE), table)
  return table.num_rows


def run(cfg: BlackboxConfig) -> Optional[workdir_lib.Manifest]:
  """Scores every prompt (or external image group) into WORKDIR/blackbox; returns
  the manifest (None on processes other than 0)."""
  t0 = time.perf_counter()
  common_id = {"shard_size": cfg.shard_size, "edge_threshold": cfg.edge_threshold,
               "edge_consistency": cfg.edge_consistency, "save_images": cfg.save_images}
  seeds: List[int] = []
  if cfg.images:
    external = image_groups.ExternalSource(cfg.images, cfg.prompt_column, cfg.image_column,
                                           cfg.csv_delimiter, cfg.max_image_pixels)
    identity = dict(common_id, mode="external", **external.identity())
    n_rows, read = external.num_rows, external.read
  else:
    source = sources.open_rows(cfg.prompts, cfg.prompt_column, cfg.csv_delimiter,
                               top_k=cfg.top_k, max_prompts=cfg.max_prompts,
                               stages=(("scan", "scores"),), reserved=OWN_COLUMNS)
    sd = common.load_model(cfg)
    noise, noise_digest, seeds = noise_lib.start_noise(cfg.noise, cfg.seeds,
                                                       sd.latent_shape_chw)
    if len(noise) < 2:
      raise InputError(f"--noise={cfg.noise}: the edge score needs at least 2 noise arrays")
    identity = dict(common_id, mode="generated",
                    **common.model_identity(cfg),
                    noise=noise_digest, guidance_scale=cfg.guidance_scale,
                    timestep=sd.schedule.last_timestep, **source.identity)
    n_rows = source.num_rows
    read = lambda a, b: common.tokenize(source.read(a, b), sd.tokenizer)
  stage = engine.StageRun(cfg.workdir, STAGE, identity, cfg.overwrite, started=t0)
  load_s = time.perf_counter() - t0
  todo = stage.todo(n_rows, cfg.shard_size)
  mesh, step = None, None
  workers = cfg.edge_workers or os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    if cfg.images:
      work = lambda a, b, groups: image_groups.score_external(
          groups, a, pool, cfg.edge_threshold, cfg.edge_consistency, cfg.max_image_pixels)
    else:
      if todo:  # a finished run resumes without compiling
        mesh = distributed.local_mesh(cfg.devices)
        step = make_step(sd, noise, cfg.guidance_scale, common.batch_for(cfg, n_rows), mesh)
      work = lambda a, b, tok: _generated_table(cfg, stage.dir, step, pool, tok, seeds)
    stats = stage.loop(todo, read, work, "prompts", cfg.log_interval_s)
  if not stage.complete():
    return None
  counts = engine.status_counts(stage.dir)
  outputs = {"shards": "part-*.parquet"}
  if counts["scored"]:
    shards.write_top_k(stage.dir, cfg.top_k, "edge_scores")
    outputs["top_k"] = workdir_lib.TOP_K
  if cfg.save_images:
    counts["images_written"] = _write_image_table(stage.dir)
    outputs.update(images=workdir_lib.IMAGES, image_table=workdir_lib.IMAGE_TABLE)
  return stage.write_manifest(
      cfg, counts=counts,
      timings={"load_s": load_s, "first_shard_s": stats.first_shard_s,
               "work_s": stats.seconds, "prompts_this_run": stats.rows},
      rate=engine.rate(stats.rows, stats.seconds), rate_unit="prompts/s", outputs=outputs,
      runtime=distributed.runtime_info(mesh, step.compiles if step else 0),
      details={"mode": identity["mode"], "seeds": seeds}, did_work=stats.rows > 0)
