"""Multi-step generation for ground truth (docs/method.md section 4).

`prompts` is a caption table, or a workdir of an earlier stage: its blackbox
(the top `top_k` rows by `edge_scores`) or else its scan (by `scores`). Those
rows get new ids 0..K-1; the stage's own id and status stay as
`<stage>_prompt_id`, `<stage>_status`. Seeds 0,1,2,3 by default (the reference's
regeneration); `noise` gives the start latents instead (seed i = row i).

`WORKDIR/generate/` gets:
- `images/<prompt_id>/<seed>.png`: uint8 RGB, `round(255 * image)` of the [0, 1]
  decoded image (as diffusers' `numpy_to_pil`);
- `generated.parquet`: one row per (prompt, seed): `prompt_id`, `caption`,
  `seed`, `sampler`, `steps`, `image_path` (relative to the stage folder; null
  when no image), `status` ("ok", or why there is no image: "empty", "null",
  "not_text", "malformed_row", "nonfinite_output"), then one column per
  requested `detectors` (float32, null when no image), then the input columns;
- `part-*.parquet`: the resumable shards (one row per prompt, list columns
  `gen_seeds`, `image_paths`, `image_status`), `run_config.json`,
  `manifest.json` (sampler, steps, its timesteps or sigmas, images/s, compiles).

`detectors` (DDIM only) adds the multi-step detectors read along each image's own
trajectory, in the same loop (`memjax.method.trajectory_detectors`): wen_steps
(Wen et al., mean of ||e_c - e_u|| over the first `wen_steps` steps) and
bright_ending (Chen et al., the EOS-attention-masked norm over every step). They
enter the run identity only when requested, so earlier runs stay resumable.
"""
import concurrent.futures
import dataclasses
import os
import time
from typing import Dict, List, Optional, Sequence

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memjax.data import images as images_lib
from memjax.method import noise as noise_lib
from memjax.method import sampling
from memjax.method import trajectory_detectors as traj_lib
from memjax.runtime import checks
from memjax.runtime import distributed
from memjax.runtime import engine
from memjax.runtime import shards
from memjax.runtime import sources
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError
from memjax.stages import common

STAGE = "generate"
DEFAULT_SEEDS = (0, 1, 2, 3)  # the reference's regeneration seeds
OWN_COLUMNS = ("prompt_id", "caption", "seed", "sampler", "steps", "image_path", "status",
               "gen_seeds", "image_paths", "image_status")
_PER_IMAGE = ("gen_seeds", "image_paths", "image_status", "status", "prompt_id", "caption")


@dataclasses.dataclass
class GenerateConfig(common.ModelStageSettings):
  """The generation stage's settings (each one a flag of `python -m memjax.generate`)."""
  model: str
  prompts: str
  workdir: str
  sampler: str = "heun"
  steps: int = 32
  sigma_interpolation: str = "linear"  # Heun: "linear" (LMS, the reference) or "log"
  batch_size: int = 8  # prompts per call; the UNet batch is 2 * batch_size * seeds
  seeds: Sequence[int] = DEFAULT_SEEDS
  shard_size: int = 64  # prompts per shard
  detectors: Sequence[str] = ()  # trajectory detectors (DDIM): wen_steps, bright_ending, all
  wen_steps: int = 50  # wen_steps: the mean over this many first DDIM steps

  def __post_init__(self):
    super().__post_init__()
    checks.at_least(self, 1, "steps", "wen_steps")
    checks.one_of(self, "sampler", sampling.SAMPLERS)
    checks.one_of(self, "sigma_interpolation", ("linear", "log"))
    self.detectors = list(traj_lib.check_names(self.detectors or ()))
    if self.detectors and self.sampler != "ddim":
      raise InputError(f"--detectors={','.join(self.detectors)} reads the DDIM trajectory: "
                       f"use --sampler=ddim (got --sampler={self.sampler})")
    if "wen_steps" in self.detectors and self.wen_steps > self.steps:
      raise InputError(f"--wen_steps={self.wen_steps}: more than the --steps={self.steps} "
                       "DDIM steps")


def make_step(sd, plan: sampling.SamplerPlan, noise: np.ndarray, guidance_scale: float,
              batch_size: int, mesh, detectors: Sequence[str] = (),
              wen_steps: int = 50) -> engine.BoundStep:
  """The whole sampling loop: token ids [B, 77] -> (uint8 images [B, S, H, W, 3],
  finite [B, S]), bound to the model, the plan and the start noise.

  With detectors: rows [B, 78] (ids, then the EOS index, `_with_eos`) -> (images,
  finite, {detector: [B, S] float32})."""
  empty = common.empty_ids(sd)
  bound = {"params": {k: sd.params[k] for k in ("text_encoder", "unet", "vae")},
           "empty": jnp.asarray(empty), "noise": jnp.asarray(noise)}
  if detectors:  # the same loop, keeping what the trajectory detectors read
    sample = sampling.sample_fn_for_model(sd, plan, guidance_scale, keep_diffs=True)
    capture = None
    if "bright_ending" in detectors:
      capture = traj_lib.bind_capture(sd.unet,
                                      traj_lib.be_paths(sd.unet.config.transformer_paths))
    traj = traj_lib.make_trajectory_fn(sample, capture, float(plan.table["t"][-1]), detectors,
                                       wen_steps)
    run = lambda p, rows, e, z: traj(p, rows[:, :-1], rows[:, -1], e, z)
    pad = _with_eos(empty[None], np.zeros(1, np.int64))[0]  # the empty prompt: EOS at 1
  else:
    run, pad = sampling.sample_fn_for_model(sd, plan, guidance_scale), empty

  def step(b, rows):
    out = run(b["params"], rows, b["empty"], b["noise"])
    finite = jnp.all(jnp.isfinite(out["latents"]), axis=(2, 3, 4))  # [B, S]
    pixels = jnp.round(out["images"] * 255.0).astype(jnp.uint8)  # numpy_to_pil's rounding
    if not detectors:
      return pixels, finite
    return pixels, finite, {d: out[d].astype(jnp.float32) for d in detectors}

  return engine.BoundStep(step, bound, batch_size, mesh, pad)


def _with_eos(ids: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
  """[B, 77] ids and each caption's EOS index as one [B, 78] int32 batch."""
  eos = np.asarray(traj_lib.eos_index(np.asarray(n_tokens)), np.int32)
  return np.concatenate([np.asarray(ids, np.int32), eos[:, None]], axis=1)


def _write_prompt(folder, prompt_id, pixels, finite, seeds) -> List:
  """PNGs of one prompt; returns (path or None, status) per seed."""
  out = []
  for pix, ok, seed in zip(pixels, finite, seeds):
    if not ok:  # never write a NaN image as black
      out.append((None, "nonfinite_output"))
      continue
    rel = os.path.join(workdir_lib.IMAGES, str(prompt_id), f"{seed}.png")
    images_lib.write_png(os.path.join(folder, rel), pix)
    out.append((rel, "ok"))
  return out


def _shard_table(folder, step, pool, tok: common.Tokenized, seeds,
                 detectors: Sequence[str] = ()) -> pa.Table:
  """Generates the valid prompts of one shard: input columns + gen_seeds,
  image_paths, image_status, status (PNGs first, at most 2 batches in flight),
  and with detectors one list column each (a value per seed, null when no image)."""
  futures, scores = {}, {}
  rows_in = _with_eos(tok.ids, tok.n_tokens) if detectors else tok.ids
  for start, got in step.map(rows_in, max_in_flight=2):
    pixels, finite = got[0], got[1]
    for j in range(len(pixels)):
      row = int(tok.rows[start + j])
      futures[row] = pool.submit(_write_prompt, folder, tok.chunk.start + row, pixels[j],
                                 finite[j], seeds)
      if detectors:
        scores[row] = {d: [float(v) if ok and np.isfinite(v) else None
                           for v, ok in zip(got[2][d][j], finite[j])] for d in detectors}
  out = {row: f.result() for row, f in futures.items()}
  n = len(tok.valid)
  paths = [[p for p, _ in out[i]] if i in out else None for i in range(n)]
  img_status = [[s for _, s in out[i]] if i in out else None for i in range(n)]
  status = [tok.chunk.status[i] if i not in out else
            ("ok" if all(s == "ok" for s in img_status[i]) else "nonfinite_output")
            for i in range(n)]
  columns = {
      "gen_seeds": pa.array([list(seeds)] * n, pa.list_(pa.int64())),
      "image_paths": pa.array(paths, pa.list_(pa.string())),
      "image_status": pa.array(img_status, pa.list_(pa.string())),
      "status": pa.array(status, pa.string())}
  for d in detectors:
    columns[d] = pa.array([scores[i][d] if i in scores else None for i in range(n)],
                          pa.list_(pa.float32()))
  return common.append_columns(tok.chunk.table, columns)


def _write_generated_table(folder: str, sampler: str, steps: int,
                           detectors: Sequence[str] = ()) -> pa.Table:
  """generated.parquet from the shards: one row per (prompt, seed)."""
  data = shards.open_shards(folder).to_table().sort_by("prompt_id")
  parent = pc.list_parent_indices(data["gen_seeds"])
  per_prompt = [c for c in data.column_names if c not in _PER_IMAGE + tuple(detectors)]
  paths, status = [], []
  for seeds, p, s, st in zip(data["gen_seeds"].to_pylist(), data["image_paths"].to_pylist(),
                             data["image_status"].to_pylist(), data["status"].to_pylist()):
    paths.extend(p if p is not None else [None] * len(seeds))  # no image: a bad caption
    status.extend(s if s is not None else [st] * len(seeds))
  n = len(paths)
  table = pa.table({"prompt_id": pc.take(data["prompt_id"], parent),
                    "caption": pc.take(data["caption"], parent),
                    "seed": pc.list_flatten(data["gen_seeds"]),
                    "sampler": pa.array([sampler] * n, pa.string()),
                    "steps": pa.array([steps] * n, pa.int32()),
                    "image_path": pa.array(paths, pa.string()),
                    "status": pa.array(status, pa.string())})
  for d in detectors:  # per image; a prompt without images: nulls
    values = [v for seeds, per in zip(data["gen_seeds"].to_pylist(), data[d].to_pylist())
              for v in (per if per is not None else [None] * len(seeds))]
    table = table.append_column(d, pa.array(values, pa.float32()))
  for c in per_prompt:  # then the input columns
    table = table.append_column(c, pc.take(data[c], parent))
  workdir_lib.write_parquet(os.path.join(folder, workdir_lib.GENERATED_TABLE), table)
  return table


def run(cfg: GenerateConfig) -> Optional[workdir_lib.Manifest]:
  """Generates every prompt of cfg.prompts into WORKDIR/generate; returns the
  manifest (None on processes other than 0)."""
  t0 = time.perf_counter()
  source = sources.open_rows(cfg.prompts, cfg.prompt_column, cfg.csv_delimiter,
                             top_k=cfg.top_k, max_prompts=cfg.max_prompts,
                             stages=(("blackbox", "edge_scores"), ("scan", "scores")),
                             reserved=OWN_COLUMNS + tuple(cfg.detectors))
  sd = common.load_model(cfg)
  plan_kw = {"interpolation": cfg.sigma_interpolation} if cfg.sampler == "heun" else {}
  plan = sampling.make_plan(cfg.sampler, sd.schedule, sd.scheduler_config, cfg.steps, **plan_kw)
  load_s = time.perf_counter() - t0
  noise, noise_digest, seeds = noise_lib.start_noise(cfg.noise, cfg.seeds, sd.latent_shape_chw)
  identity = dict(source.identity, **common.model_identity(cfg),
                  sampler=cfg.sampler, steps=cfg.steps, plan=plan.info, seeds=seeds,
                  noise=noise_digest, guidance_scale=cfg.guidance_scale,
                  shard_size=cfg.shard_size)
  if cfg.detectors:  # only then: earlier runs keep their identity
    identity["detectors"] = list(cfg.detectors)
    if "wen_steps" in cfg.detectors:
      identity["wen_steps"] = cfg.wen_steps
  stage = engine.StageRun(cfg.workdir, STAGE, identity, cfg.overwrite, started=t0)
  todo = stage.todo(source.num_rows, cfg.shard_size)
  mesh = distributed.local_mesh(cfg.devices)
  step = make_step(sd, plan, noise, cfg.guidance_scale, common.batch_for(cfg, source.num_rows),
                   mesh, cfg.detectors, cfg.wen_steps)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    stats = stage.loop(todo, lambda a, b: common.tokenize(source.read(a, b), sd.tokenizer),
                       lambda a, b, tok: _shard_table(stage.dir, step, pool, tok, seeds,
                                                      cfg.detectors),
                       "prompts", cfg.log_interval_s)
  if not stage.complete():
    return None
  table = _write_generated_table(stage.dir, cfg.sampler, cfg.steps, cfg.detectors)
  images = int(pc.sum(pc.equal(table["status"], "ok")).as_py() or 0)
  images_this_run = stats.rows * len(seeds)
  details = {"sampler": cfg.sampler, "steps": cfg.steps, "seeds": seeds,
             "unet_evaluations": plan.evaluations, "plan": plan.info}
  if cfg.detectors:
    details["detectors"] = list(cfg.detectors)
    if "wen_steps" in cfg.detectors:
      details["wen_steps"] = cfg.wen_steps
    if "bright_ending" in cfg.detectors:  # the mask: one conditional call at the last step
      details["bright_ending_layers"] = list(traj_lib.be_paths(sd.unet.config.transformer_paths))
  counts: Dict = {"prompts": source.num_rows, "rows": table.num_rows, "images": images,
                  "image_status": {d["values"]: d["counts"]
                                   for d in pc.value_counts(table["status"]).to_pylist()}}
  return stage.write_manifest(
      cfg, counts=counts,
      timings={"load_s": load_s, "first_shard_s": stats.first_shard_s,
               "generate_s": stats.seconds, "prompts_this_run": stats.rows},
      rate=engine.rate(images_this_run, stats.seconds), rate_unit="images/s",
      outputs={"shards": "part-*.parquet", "table": workdir_lib.GENERATED_TABLE,
               "images": workdir_lib.IMAGES},
      runtime=dict(distributed.runtime_info(mesh, step.compiles), batch_prompts=step.batch_size),
      details=details,
      did_work=stats.rows > 0)
