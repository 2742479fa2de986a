"""Multi-step generation for ground truth (ALGORITHMS.md section 4, "Regeneration").

    python -m memjax.generate --model=DIR --prompts=FILE_OR_WORKDIR --workdir=DIR \
        [--sampler=heun|ddim] [--steps=32] [--seeds=0,1,2,3] [--guidance_scale=7.5] \
        [--noise=FILE.npy] [--top_k=N] [--batch_size=B]

--prompts is a caption table, or a workdir of an earlier stage: a blackbox workdir
(its top --top_k rows by `edge_scores`) or a scan workdir (its top --top_k rows by
`scores`); a workdir holding both counts as a blackbox workdir. Those rows get new
ids 0..K-1; the stage's own id and status stay as `<stage>_prompt_id`,
`<stage>_status`. Without --seeds the seeds are 0,1,2,3 (the reference's
regeneration); --noise gives the start latents instead (seed i = row i).

The workdir gets:
- `generated/<prompt_id>/<seed>.png`: uint8 RGB, `round(255 * image)` of the
  [0, 1] decoded image (as diffusers' `numpy_to_pil`).
- `generated.parquet`: one row per (prompt, seed):
  `prompt_id`, `caption`, `seed`, `sampler`, `steps`, `image_path` (relative to
  the workdir; null when no image), `status` ("ok", or why there is no image:
  "empty", "null", "not_text", "malformed_row", "nonfinite_output"), then the
  input columns (one named like ours is kept as `input_<name>`).
- `generated_index/part-*.parquet`: the resumable shards (one row per prompt with
  list columns `gen_seeds`, `image_paths`, `image_status`), `run_config_generated_index.json`
  (a resume with other settings is refused), `manifest_generated_index.json`
  (sampler, steps, its timesteps or sigmas, images/s, compiles).
"""
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Dict, List, Optional, Sequence

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from memjax import cli
from memjax.data import images as images_lib
from memjax.method import noise as noise_lib
from memjax.runtime import progress as progress_lib
from memjax.data import prompts as prompts_lib
from memjax.runtime import results
from memjax.method import sampling
from memjax.runtime.errors import InputError
from memjax.models import loading

STAGE = "generated_index"
IMAGE_DIR = "generated"
TABLE = "generated.parquet"
DEFAULT_SEEDS = (0, 1, 2, 3)  # the reference's regeneration seeds
_OWN_COLUMNS = ("prompt_id", "caption", "seed", "sampler", "steps", "image_path", "status",
                "gen_seeds", "image_paths", "image_status")


@dataclasses.dataclass
class GenerateConfig:
  model: str
  prompts: str
  workdir: str
  sampler: str = "heun"
  steps: int = 32
  prompt_column: str = "caption"
  csv_delimiter: Optional[str] = None
  batch_size: int = 8  # prompts per call; the UNet batch is 2 * batch_size * seeds
  seeds: Sequence[int] = DEFAULT_SEEDS
  guidance_scale: float = 7.5
  dtype: str = "float32"
  noise: Optional[str] = None
  max_prompts: Optional[int] = None
  top_k: int = 100
  shard_size: int = 64  # prompts per shard
  sigma_interpolation: str = "linear"  # Heun: "linear" (LMS, the reference) or "log"
  overwrite: bool = False
  log_interval_s: float = 30.0
  devices: Optional[int] = None


class _Source:
  """Prompt rows read by range: a table file, or an earlier stage's top K."""

  def __init__(self, num_rows, read, identity):
    self.num_rows, self.read, self.identity = num_rows, read, identity


def _open_source(cfg: GenerateConfig) -> _Source:
  path = cfg.prompts
  for stage, column in (("blackbox", "edge_scores"), ("scan", "scores")):
    paths = results.stage_paths(path, stage)
    if os.path.isdir(path) and os.path.isdir(paths["dir"]):
      break
  else:
    table = prompts_lib.open_prompts(path, cfg.prompt_column, cfg.csv_delimiter)
    n = table.num_rows if cfg.max_prompts is None else min(table.num_rows, cfg.max_prompts)

    def read_file(start, stop):
      chunk = table.read_prompts(start, stop)
      if cfg.prompt_column != "caption":  # `caption` is always the text generated from
        t = chunk.table
        t = t.rename_columns(["input_caption" if c == "caption" else c for c in t.column_names])
        chunk.table = t.append_column("caption", pa.array(chunk.texts, pa.string()))
      return chunk

    return _Source(n, read_file, {"prompts": os.path.abspath(path),
                                  "prompt_column": cfg.prompt_column})
  if not os.path.exists(paths["manifest"]):
    raise InputError(f"--prompts={path}: the {stage} there is not finished "
                     f"({paths['manifest']} is missing); rerun it to finish")
  run_config = results.read_json(paths["run_config"])
  # blackbox rows always carry `caption`; scan rows keep the input's caption column
  caption = (run_config.get("prompt_column") or "caption") if stage == "scan" else "caption"
  top = results.top_k(paths["dir"], cfg.top_k, column)
  top = top.rename_columns([f"{stage}_{c}" if c in _OWN_COLUMNS and c != caption else c
                            for c in top.column_names])
  if cfg.max_prompts is not None:
    top = top.slice(0, cfg.max_prompts)
  ids = hashlib.sha256(repr(top[f"{stage}_prompt_id"].to_pylist()).encode()).hexdigest()

  def read(start, stop):
    part = top.slice(start, stop - start)
    texts, status = prompts_lib.clean_captions(part[caption])
    if caption != "caption":
      part = part.append_column("caption", pa.array(texts, pa.string()))
    part = part.append_column("prompt_id", pa.array(np.arange(start, stop, dtype=np.int64)))
    return prompts_lib.PromptChunk(start, stop, part, texts, status)

  return _Source(top.num_rows, read, {"prompts": os.path.abspath(path), "source_stage": stage,
                                      "source_run_config": run_config, "top_k": cfg.top_k,
                                      "source_ids": ids})


class _Generator:
  """The jitted sampling loop bound to one model, plan, noise and mesh."""

  def __init__(self, sd, plan: sampling.SamplerPlan, noise: np.ndarray, guidance_scale: float,
               batch_size: int, mesh):
    self.batch_size, self.traces = batch_size, 0
    replicated = NamedSharding(mesh, P())
    self.batch_sharding = NamedSharding(mesh, P("data"))
    self.params = jax.device_put({k: sd.params[k] for k in ("text_encoder", "unet", "vae")},
                                 replicated)
    self.noise = jax.device_put(jnp.asarray(noise), replicated)
    empty = sd.tokenizer.encode_batch([""])["input_ids"]
    self.pad_ids = empty[0]
    self.empty = jax.device_put(jnp.asarray(empty[0]), replicated)
    sample = sampling.sample_fn_for_model(sd, plan, guidance_scale)

    def fn(params, ids, empty_ids, z):
      self.traces += 1  # Python runs at trace time only
      out = sample(params, ids, empty_ids, z)
      finite = jnp.all(jnp.isfinite(out["latents"]), axis=(2, 3, 4))  # [B, S]
      pixels = jnp.round(out["images"] * 255.0).astype(jnp.uint8)  # numpy_to_pil's rounding
      return pixels, finite

    self._fn = jax.jit(fn, out_shardings=self.batch_sharding)

  def __call__(self, ids: np.ndarray):
    """ids [batch_size, 77] -> (uint8 [batch_size, S, H, W, 3], bool [batch_size, S])."""
    ids = jax.device_put(np.ascontiguousarray(ids, np.int32), self.batch_sharding)
    return self._fn(self.params, ids, self.empty, self.noise)


def _write_prompt(workdir, prompt_id, pixels, finite, seeds) -> List:
  """PNGs of one prompt; returns (path or None, status) per seed."""
  out = []
  for pix, ok, seed in zip(pixels, finite, seeds):
    if not ok:  # never write a NaN image as black
      out.append((None, "nonfinite_output"))
      continue
    rel = os.path.join(IMAGE_DIR, str(prompt_id), f"{seed}.png")
    images_lib.write_png(os.path.join(workdir, rel), pix)
    out.append((rel, "ok"))
  return out


def _generate_shard(cfg, gen: _Generator, pool, chunk, tokenizer, seeds) -> Dict[int, list]:
  """Samples the valid prompts of one chunk; row index -> [(path, status)] per seed."""
  valid = np.flatnonzero([t is not None for t in chunk.texts])
  ids = tokenizer.encode_batch([chunk.texts[i] for i in valid])["input_ids"] if len(valid) else []
  b, futures, pending = gen.batch_size, {}, []

  def collect(start, real, out):
    pixels, finite = jax.device_get(out)
    for j in range(real):
      row = int(valid[start + j])
      futures[row] = pool.submit(_write_prompt, cfg.workdir, chunk.start + row, pixels[j],
                                 finite[j], seeds)

  for start in range(0, len(valid), b):
    part = ids[start:start + b]
    real = len(part)
    if real < b:  # padded with the empty prompt; the padding is dropped in collect
      part = np.concatenate([part, np.broadcast_to(gen.pad_ids, (b - real, part.shape[1]))])
    pending.append((start, real, gen(part)))  # async dispatch; at most 2 in flight
    if len(pending) > 1:
      collect(*pending.pop(0))
  for item in pending:
    collect(*item)
  return {row: f.result() for row, f in futures.items()}


def _shard_table(chunk, out: Dict[int, list], seeds) -> pa.Table:
  """Input columns + prompt_id + caption + gen_seeds, image_paths, image_status, status."""
  n = chunk.stop - chunk.start
  paths = [[p for p, _ in out[i]] if i in out else None for i in range(n)]
  img_status = [[s for _, s in out[i]] if i in out else None for i in range(n)]
  status = [chunk.status[i] if i not in out else
            ("ok" if all(s == "ok" for s in img_status[i]) else "nonfinite_output")
            for i in range(n)]
  table = chunk.table  # holds prompt_id and caption already
  cols = {"gen_seeds": pa.array([list(seeds)] * n, pa.list_(pa.int64())),
          "image_paths": pa.array(paths, pa.list_(pa.string())),
          "image_status": pa.array(img_status, pa.list_(pa.string())),
          "status": pa.array(status, pa.string())}
  # An input column named like one of ours is kept, renamed (scan's convention).
  clash = set(_OWN_COLUMNS) - {"prompt_id", "caption"}
  table = table.rename_columns([f"input_{c}" if c in clash else c for c in table.column_names])
  for name, col in cols.items():
    table = table.append_column(name, col)
  return table


def _write_generated_table(cfg: GenerateConfig, sampler: str, steps: int) -> pa.Table:
  """WORKDIR/generated.parquet from the shards: one row per (prompt, seed)."""
  data = results.open_shards(results.stage_paths(cfg.workdir, STAGE)["dir"]).to_table()
  data = data.sort_by("prompt_id")
  parent = pc.list_parent_indices(data["gen_seeds"])
  per_prompt = [c for c in data.column_names
                if c not in ("gen_seeds", "image_paths", "image_status", "status", "prompt_id",
                             "caption")]
  paths, status = [], []
  for seeds, p, s, st in zip(data["gen_seeds"].to_pylist(), data["image_paths"].to_pylist(),
                             data["image_status"].to_pylist(), data["status"].to_pylist()):
    paths.extend(p if p is not None else [None] * len(seeds))  # no image: a bad caption
    status.extend(s if s is not None else [st] * len(seeds))
  n = len(paths)
  own = {"prompt_id": pc.take(data["prompt_id"], parent),
         "caption": pc.take(data["caption"], parent),
         "seed": pc.list_flatten(data["gen_seeds"]),
         "sampler": pa.array([sampler] * n, pa.string()),
         "steps": pa.array([steps] * n, pa.int32()),
         "image_path": pa.array(paths, pa.string()),
         "status": pa.array(status, pa.string())}
  table = pa.table(own)
  for c in per_prompt:  # then the input columns
    table = table.append_column(c, pc.take(data[c], parent))
  path = os.path.join(cfg.workdir, TABLE)
  tmp = f"{path}.{os.getpid()}.tmp"
  pq.write_table(table, tmp)
  os.replace(tmp, path)
  return table


def _read_scheduler_config(model_dir: str) -> dict:
  path = os.path.join(model_dir, "scheduler", "scheduler_config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise InputError(f"{path}: cannot read: {e}") from None


def run(cfg: GenerateConfig) -> Dict:
  """Generates every prompt of cfg.prompts into cfg.workdir; returns the manifest."""
  t_start = time.perf_counter()
  if cfg.batch_size < 1 or cfg.shard_size < 1 or cfg.top_k < 1:
    raise InputError(f"--batch_size, --top_k and the shard size must be >= 1, got "
                     f"{cfg.batch_size}, {cfg.top_k}, {cfg.shard_size}")
  if not cfg.seeds and not cfg.noise:
    raise InputError("--seeds must name at least one seed")
  source = _open_source(cfg)
  sd = loading.load_stable_diffusion(cfg.model, cfg.dtype)
  plan_kw = {"interpolation": cfg.sigma_interpolation} if cfg.sampler == "heun" else {}
  plan = sampling.make_plan(cfg.sampler, sd.schedule, _read_scheduler_config(cfg.model),
                            cfg.steps, **plan_kw)
  load_s = time.perf_counter() - t_start
  noise, noise_digest, seeds = noise_lib.start_noise(cfg.noise, cfg.seeds, sd.latent_shape_chw)
  identity = dict(source.identity, model=os.path.abspath(cfg.model),
                  model_identity=results.model_identity(cfg.model), sampler=cfg.sampler,
                  steps=cfg.steps, plan=plan.info, seeds=seeds, noise=noise_digest,
                  guidance_scale=cfg.guidance_scale, dtype=cfg.dtype,
                  max_prompts=cfg.max_prompts, shard_size=cfg.shard_size)
  pid, nproc = jax.process_index(), jax.process_count()
  if pid == 0:
    if cfg.overwrite:
      for stale in (os.path.join(cfg.workdir, IMAGE_DIR), os.path.join(cfg.workdir, TABLE)):
        if os.path.isdir(stale):
          shutil.rmtree(stale)
        elif os.path.exists(stale):
          os.remove(stale)
    results.check_run_config(cfg.workdir, identity, cfg.overwrite, stage=STAGE)
  cli.barrier("memjax_generate_config")
  if pid != 0:
    results.check_run_config(cfg.workdir, identity, overwrite=False, stage=STAGE)

  mesh = cli.local_mesh(cfg.devices)
  n_dev = mesh.devices.size
  batch = -(-cfg.batch_size // n_dev) * n_dev  # a multiple of the local device count
  gen = _Generator(sd, plan, noise, cfg.guidance_scale, batch, mesh)
  writer = results.ShardedResults(cfg.workdir, STAGE, process_index=pid)
  n_rows = source.num_rows
  ranges = [(s, min(s + cfg.shard_size, n_rows)) for s in range(0, n_rows, cfg.shard_size)]
  todo = writer.pending([r for i, r in enumerate(ranges) if i % nproc == pid])
  logging.info("generate: %d prompts x %d seeds, %s %d steps, %d shards to do, batch %d on "
               "%d devices", n_rows, len(seeds), cfg.sampler, cfg.steps, len(todo), batch, n_dev)
  progress = progress_lib.Progress(sum(e - s for s, e in todo), what="prompts",
                                   interval_s=cfg.log_interval_s)
  t_gen, first_s, images_done = time.perf_counter(), None, 0
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    for start, end in todo:
      t0 = time.perf_counter()
      chunk = source.read(start, end)
      out = _generate_shard(cfg, gen, pool, chunk, sd.tokenizer, seeds)
      first_s = first_s if first_s is not None else time.perf_counter() - t0
      writer.write(_shard_table(chunk, out, seeds), start, end)  # after its PNGs exist
      images_done += sum(s == "ok" for v in out.values() for _, s in v)
      progress.update(end - start)
  gen_s = time.perf_counter() - t_gen

  cli.barrier("memjax_generate_done")
  if pid != 0:
    return {}
  missing = writer.pending(ranges)
  if missing:
    raise InputError(f"generate incomplete: {len(missing)} shards missing, e.g. {missing[0]}; "
                     "rerun the same command to finish them")
  table = _write_generated_table(cfg, cfg.sampler, cfg.steps)
  status = pc.value_counts(table["status"]).to_pylist()
  manifest = {
      "stage": "generate", "config": dataclasses.asdict(cfg), "identity": identity,
      "sampler": cfg.sampler, "steps": cfg.steps, "unet_evaluations": plan.evaluations,
      "plan": plan.info, "seeds": seeds, "prompts": n_rows, "rows": table.num_rows,
      "images": int(pc.sum(pc.equal(table["status"], "ok")).as_py() or 0),
      "image_status": {d["values"]: d["counts"] for d in status},
      "table": TABLE, "image_dir": IMAGE_DIR,
      "timings": {"load_s": load_s, "first_shard_s": first_s, "generate_s": gen_s,
                  "images_this_run": images_done,
                  "images_per_s": images_done / gen_s if gen_s and images_done else None,
                  "total_s": time.perf_counter() - t_start},
      "compiles": gen.traces, "devices": n_dev, "batch_prompts": batch,
      "processes": nproc, "backend": jax.default_backend(), "jax_version": jax.__version__}
  results.write_json_atomic(results.stage_paths(cfg.workdir, STAGE)["manifest"], manifest)
  return manifest


# ---- command line -----------------------------------------------------------------

_SAMPLER = flags.DEFINE_enum("sampler", "heun", list(sampling.SAMPLERS),
                             "Multi-step sampler: k-diffusion Heun (the reference) or DDIM.")
_STEPS = flags.DEFINE_integer("steps", 32, "Sampler steps (Heun: 2 * steps - 1 UNet calls).")


def _config_from_flags() -> GenerateConfig:
  f = cli.common_flag_values(required=("model", "prompts", "workdir"))
  if not flags.FLAGS["seeds"].present:
    f["seeds"] = list(DEFAULT_SEEDS)
  return GenerateConfig(sampler=_SAMPLER.value, steps=_STEPS.value, **f)


def main(argv):
  del argv
  cli.startup_from_flags()
  cfg = _config_from_flags()
  manifest = run(cfg)
  if manifest:
    rate = manifest["timings"]["images_per_s"] or 0.0
    print(f"generate done: {manifest['images']} images of {manifest['prompts']} prompts "
          f"({manifest['sampler']}, {manifest['steps']} steps), {rate:.2f} images/s; "
          f"table {os.path.join(cfg.workdir, TABLE)}")


if __name__ == "__main__":
  cli.run_main(main)
