"""Whitebox scan: the denoising confidence score of every caption of a table.

docs/method.md section 2. `WORKDIR/scan/` gets one row per input row in
`part-*.parquet`: the input columns, `prompt_id`, `caption`, `scores` (the DCS,
mean over seeds), `scores_per_seed`, `wen`, `uncond_norm`, `align` (means over
seeds), `n_tokens`, `truncated`, `status` (rows with an empty, null or non-text
caption are kept with null scores and their status); `top_k.parquet` and
`manifest.json` (`memjax.runtime.workdir`). A rerun of the same command resumes; a
rerun with other settings is refused unless `overwrite`.

`detectors` adds the published one-step detectors (docs/method.md section 10,
`memjax.method.detectors`): one column each (means over seeds), computed in the
same jitted step as the DCS, sharing its text encoder pass, each seed's
unconditional passes, and one conditional forward at their (z, t).
"""
import dataclasses
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from memjax.method import detectors as detectors_lib
from memjax.method import noise as noise_lib
from memjax.method import whitebox
from memjax.models import convert
from memjax.runtime import checks
from memjax.runtime import distributed
from memjax.runtime import engine
from memjax.runtime import shards
from memjax.runtime import sources
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import ConfigError
from memjax.runtime.errors import InputError
from memjax.stages import common

STAGE = "scan"
NONFINITE = "nonfinite_score"  # a NaN or infinite DCS (a broken model, noise or w)
# Written by every scan; the detectors' columns only when asked for; all of them
# reserved (an input column of the same name is renamed on the way in).
BASE_COLUMNS = ("scores", "scores_per_seed", "wen", "uncond_norm", "align", "n_tokens",
                "truncated", "status")
SCORE_COLUMNS = BASE_COLUMNS + detectors_lib.columns(detectors_lib.ONE_STEP)
# Ren et al.'s layer as diffusers names it (SD's 32 x 32 cross-attention).
REN_LAYER = "down_blocks.1.attentions.1"


@dataclasses.dataclass(kw_only=True)
class DetectorSettings:
  """The one-step detectors' settings (the scan's and the cross-check's flags)."""
  detectors: Sequence[str] = ()  # one-step detectors beside the DCS; "all": every one
  ren_layer: str = REN_LAYER
  detector_protocol: str = "authors"  # each detector's own noise and generations, or "shared"
  detector_generations: int = 0  # > 0: this many generations for every detector
  detector_seed: int = 0  # the seed of the per-prompt noises

  def check_detectors(self, parse_names=None):
    """Checks the settings; `parse_names` reads --detectors (the scan's: one-step)."""
    self.detectors = list((parse_names or detector_names)(self.detectors))
    checks.one_of(self, "detector_protocol", detectors_lib.PROTOCOLS)
    checks.at_least(self, 0, "detector_generations")
    self.detector_seed = noise_lib.check_seed(self.detector_seed, "--detector_seed")

  def noise_plan(self, n_shared: int) -> dict:
    """detector -> (noise, generations) (`detectors.noise_plan`); {} without detectors."""
    names = [d for d in self.detectors if d in detectors_lib.ONE_STEP]
    if not names:
      return {}
    try:
      return detectors_lib.noise_plan(names, self.detector_protocol, n_shared,
                                      self.detector_generations)
    except ConfigError as e:
      raise InputError(f"--detector_protocol={self.detector_protocol}, --detector_generations="
                       f"{self.detector_generations}: {e}; give more --seeds or rows of "
                       "--noise, or fewer generations") from None


@dataclasses.dataclass
class ScanConfig(common.ModelStageSettings, DetectorSettings):
  """The scan's settings (each one a flag of `python -m memjax.scan`)."""
  model: str
  prompts: str
  workdir: str
  batch_size: int = 32
  seeds: Sequence[int] = (0,)
  shard_size: int = 4096

  def __post_init__(self):
    super().__post_init__()
    self.check_detectors()


def detector_names(names: Sequence[str]) -> tuple:
  """--detectors: names of `detectors_lib.ONE_STEP` (in its order), or `all`."""
  names = list(names or ())
  if "all" in names:
    names = [n for n in names if n != "all"] + list(detectors_lib.ONE_STEP)
  unknown = sorted(set(names) - set(detectors_lib.ONE_STEP))
  if unknown:
    raise InputError(f"--detectors: unknown {', '.join(unknown)} (choose from "
                     f"{', '.join(detectors_lib.ONE_STEP)}, or all)")
  return tuple(n for n in detectors_lib.ONE_STEP if n in names)


def ren_path(layer: str) -> str:
  """`down_blocks.1.attentions.1` (diffusers' name) -> memjax's Flax path."""
  return "/".join(convert.torch_key_to_path(layer + ".x")[:-1])

def make_step(sd, noise: np.ndarray, guidance_scale: float, batch_size: int,
              mesh, detectors: Sequence[str] = (), ren_layer: str = REN_LAYER,
              plan: Optional[dict] = None, detector_seed: int = 0) -> engine.BoundStep:
  """The scan's jitted step: token ids [B, 77] -> {dcs, wen, uncond_norm, align} [B,
  S] and each detector's columns [B, G] (its generations, `plan`: None = every
  detector on every seed's shared z), bound to the model, the start noise [S, h, w,
  c], e_u and the detectors' per-seed unconditional outputs. With detectors on
  per-prompt noise, each batch row is [77 token ids, `noise.prompt_words` of its
  prompt id] (`batch_rows`), and the step draws every prompt's noises itself."""
  bound = common.onestep_bound(sd, noise, mesh, ("text_encoder", "unet"))
  n_ids = common.empty_ids(sd).shape[0]
  per_prompt = detectors_lib.plan_noise(plan or {}, detectors_lib.PER_PROMPT)
  score = whitebox.make_context_score_fn(sd.unet_out, sd.schedule, guidance_scale,
                                         sd.schedule.last_timestep)
  detect = None
  if detectors:
    protocol = detectors_lib.Protocol.from_scheduler(sd.scheduler_config)
    path = ren_path(ren_layer)
    if "ren_le" in detectors and path not in sd.unet.config.transformer_paths:
      raise InputError(f"--ren_layer={ren_layer}: the model has no such cross-attention "
                       f"layer (it has {', '.join(sd.unet.config.transformer_paths)})")
    unet, unet_f32, unet_capture = detectors_lib.bind_unet(sd.unet, path)
    shared = jax.jit(detectors_lib.make_shared_fn(sd.text_embed, unet, protocol, detectors,
                                                  plan))
    bound["detector_shared"] = engine.replicate(shared(
        bound["text_encoder"], bound["unet"], jnp.asarray(common.empty_ids(sd)[None]),
        bound["noise"]), mesh)
    detect = detectors_lib.make_detectors_fn(unet, unet_f32, unet_capture, sd.schedule,
                                             protocol, detectors, ren_layer=path, plan=plan)

  def step(b, rows):
    ids = rows[:, :n_ids]
    ctx = sd.text_embed(b["text_encoder"], ids)
    out = score(b["unet"], ctx, b["noise"], b["e_u"])
    if detect is not None:
      prompt_noise = (noise_lib.per_prompt_noise(detector_seed, rows[:, n_ids:], per_prompt,
                                                 sd.latent_shape_chw) if per_prompt else None)
      out.update(detect(b["unet"], ctx, b["noise"], b["detector_shared"], prompt_noise))
    return out

  pad = common.empty_ids(sd)
  if per_prompt:
    pad = np.concatenate([pad, np.zeros(2, np.int32)])
  return engine.BoundStep(step, bound, batch_size, mesh, pad)


def batch_rows(tok: common.Tokenized, plan: Optional[dict]) -> np.ndarray:
  """The step's input rows of a shard: token ids, and with detectors on per-prompt
  noise each prompt's id (`noise.prompt_words`) after them."""
  if not detectors_lib.plan_noise(plan or {}, detectors_lib.PER_PROMPT):
    return tok.ids
  words = noise_lib.prompt_words(tok.chunk.start + tok.rows)
  return np.concatenate([tok.ids, words], axis=1)


def _output_table(tok: common.Tokenized, stats, detector_columns=()) -> pa.Table:
  """Input columns + prompt_id + caption + score columns; skipped rows get nulls."""
  n, rows = len(tok.valid), tok.rows
  if stats is None:  # no scorable row in this shard
    stats = {k: np.zeros((0, 1), np.float32) for k in ("dcs", "wen", "uncond_norm", "align")
             + detector_columns}
  mean = lambda k: stats[k].mean(axis=1).astype(np.float32)
  status = list(tok.chunk.status)
  for i in rows[~np.isfinite(stats["dcs"]).all(axis=1)]:  # never ranked, counted apart
    status[i] = NONFINITE
  cols = {
      "scores": common.scatter(n, rows, mean("dcs"), pa.float32()),
      "scores_per_seed": common.scatter_list(n, rows, [list(r) for r in stats["dcs"]],
                                             pa.list_(pa.float32())),
      "wen": common.scatter(n, rows, mean("wen"), pa.float32()),
      "uncond_norm": common.scatter(n, rows, mean("uncond_norm"), pa.float32()),
      "align": common.scatter(n, rows, mean("align"), pa.float32()),
      "n_tokens": common.scatter(n, rows, tok.n_tokens.astype(np.int32), pa.int32()),
      "truncated": common.scatter(n, rows, tok.truncated.astype(bool), pa.bool_()),
      "status": pa.array(status, pa.string()),
  }
  cols.update({c: common.scatter(n, rows, mean(c), pa.float32()) for c in detector_columns})
  return common.append_columns(tok.chunk.table, cols)


def run(cfg: ScanConfig) -> Optional[workdir_lib.Manifest]:
  """Scores every prompt of cfg.prompts into WORKDIR/scan; returns the manifest
  (None on processes other than 0)."""
  t0 = time.perf_counter()
  source = sources.open_rows(cfg.prompts, cfg.prompt_column, cfg.csv_delimiter,
                             max_prompts=cfg.max_prompts, reserved=SCORE_COLUMNS)
  sd = common.load_model(cfg, ("unet", "text_encoder"))
  load_s = time.perf_counter() - t0
  noise, noise_digest, _ = noise_lib.start_noise(cfg.noise, cfg.seeds, sd.latent_shape_chw)
  identity = dict(common.model_identity(cfg), **source.identity,
                  seeds=list(cfg.seeds), guidance_scale=cfg.guidance_scale, noise=noise_digest,
                  shard_size=cfg.shard_size, timestep=sd.schedule.last_timestep)
  details = {"timestep": sd.schedule.last_timestep, "seeds": list(cfg.seeds)}
  columns = detectors_lib.columns(cfg.detectors) if cfg.detectors else ()
  plan = cfg.noise_plan(len(noise))
  if cfg.detectors:  # recorded only when asked for: earlier runs stay resumable
    protocol = detectors_lib.Protocol.from_scheduler(sd.scheduler_config)
    details["detectors"] = identity["detectors"] = list(cfg.detectors)
    details["detector_timesteps"] = identity["detector_timesteps"] = [
        protocol.t_first, protocol.t_low]
    details["detector_noise"] = identity["detector_noise"] = {
        n: {"noise": kind, "generations": g} for n, (kind, g) in plan.items()}
    if detectors_lib.plan_noise(plan, detectors_lib.PER_PROMPT):
      details["detector_seed"] = identity["detector_seed"] = cfg.detector_seed
    if "ren_le" in cfg.detectors:
      details["ren_layer"] = identity["ren_layer"] = cfg.ren_layer
  stage = engine.StageRun(cfg.workdir, STAGE, identity, cfg.overwrite, started=t0)
  todo = stage.todo(source.num_rows, cfg.shard_size)
  mesh = distributed.local_mesh(cfg.devices)
  t1 = time.perf_counter()
  step = make_step(sd, noise, cfg.guidance_scale, common.batch_for(cfg, source.num_rows), mesh,
                   cfg.detectors, cfg.ren_layer, plan, cfg.detector_seed)
  uncond_s = time.perf_counter() - t1
  stats = stage.loop(
      todo, lambda a, b: common.tokenize(source.read(a, b), sd.tokenizer),
      lambda a, b, tok: _output_table(tok, step.all(batch_rows(tok, plan)), columns),
      "prompts", cfg.log_interval_s)
  if not stage.complete():
    return None
  shards.write_top_k(stage.dir, cfg.top_k, "scores")
  counts = engine.status_counts(stage.dir)
  manifest = stage.write_manifest(
      cfg, counts=counts,
      timings={"load_s": load_s, "uncond_s": uncond_s, "first_shard_s": stats.first_shard_s,
               "score_s": stats.seconds, "prompts_this_run": stats.rows},
      rate=engine.rate(stats.rows, stats.seconds), rate_unit="prompts/s",
      outputs={"shards": "part-*.parquet", "top_k": workdir_lib.TOP_K},
      runtime=dict(distributed.runtime_info(mesh, step.compiles), batch_size=step.batch_size),
      details=details,
      did_work=stats.rows > 0)
  bad = counts["status"].get(NONFINITE, 0)
  if bad and not counts["scored"]:
    raise InputError(f"every score is NaN or infinite ({bad} rows, status {NONFINITE}): check "
                     "the model's weights, --noise and --guidance_scale")
  return manifest
