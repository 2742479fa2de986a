"""Cross-check: the same scores from memjax and from PyTorch diffusers.

Takes the first n scorable captions, draws (or reads) the start noise z, and
computes the whitebox DCS twice on the same folder (with `blackbox`, also the
one-step images and their edge scores): through memjax's own scan stage
(`stages.scan.run`, the command's path) and with PyTorch diffusers' UNet and
transformers' CLIP text encoder (`testing.torch_reference`, the reference's CFG
pair). `WORKDIR/crosscheck/` gets `prompts.parquet`, `noise.npy` (the file both
implementations read), `crosscheck.parquet` (per prompt: both scores and their
relative difference), `memjax/` (the scan's own workdir) and `manifest.json`
(max_rel_diff, spearman, topk_overlap, the verdict). torch is imported only
here (through torch_reference), when the stage runs.

`detectors` adds the published detectors: the one-step ones through the scan,
the trajectory ones (wen_steps, bright_ending) through memjax's generate stage
(`stages.generate.run`, DDIM with `steps` steps, wen_steps over all of them, into
`memjax/generate/`) against `testing.torch_detectors`' DDIM trajectory of as many
steps, per (prompt, seed): `trajectory.parquet` and the manifest's
`trajectory_detectors`. Every detector's figure is max|ours - theirs| / max|theirs|.
"""
import dataclasses
import os
import time
from typing import Dict, Optional, Sequence

import numpy as np
import pyarrow as pa
from scipy import stats

from memjax.data import images as images_lib
from memjax.data import tables
from memjax.method import detectors as detectors_lib
from memjax.method import edges
from memjax.method import noise as noise_lib
from memjax.method import onestep
from memjax.method import trajectory_detectors as traj_lib
from memjax.models import loading
from memjax.runtime import checks
from memjax.runtime import distributed
from memjax.runtime import shards
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError
from memjax.stages import blackbox
from memjax.stages import common
from memjax.stages import generate
from memjax.stages import scan

STAGE = "crosscheck"
# Acceptance of the cross-check in float32.
FP32_MAX_REL_DIFF = 1e-4
FP32_MIN_SPEARMAN = 0.9999
TOP_K = 10
TRAJECTORY_TABLE = "trajectory.parquet"  # the trajectory detectors per (prompt, seed)


@dataclasses.dataclass
class CrossCheckConfig(common.ModelFileSettings, scan.DetectorSettings):
  """The cross-check's settings (each one a flag of `python -m memjax.crosscheck`)."""
  model: str
  prompts: str
  workdir: str
  n: int = 64
  prompt_column: str = "caption"
  csv_delimiter: Optional[str] = None
  seeds: Sequence[int] = (0,)
  guidance_scale: float = 7.5
  dtype: str = "float32"
  attention: Optional[str] = None
  noise: Optional[str] = None
  batch_size: int = 16
  blackbox: bool = False  # also compare the one-step images and edge scores
  steps: int = 50  # DDIM steps of the trajectory detectors (wen_steps averages all)

  def __post_init__(self):
    super().__post_init__()
    self.check_detectors(detector_names)  # "all": every one, one-step and trajectory
    checks.at_least(self, 1, "n", "batch_size", "steps")
    checks.finite(self, "guidance_scale")
    checks.seeds(self)


def detector_names(names: Sequence[str]) -> tuple:
  """--detectors: the one-step ones (`detectors_lib.ONE_STEP`, the scan's), then the
  trajectory ones (`traj_lib.TRAJECTORY`, the generate stage's); `all`: every one
  of both (the scan's own `all` is the one-step ones)."""
  every = detectors_lib.ONE_STEP + traj_lib.TRAJECTORY
  names = list(names or ())
  if "all" in names:
    names = [n for n in names if n != "all"] + list(every)
  unknown = sorted(set(names) - set(every))
  if unknown:
    raise InputError(f"--detectors: unknown {', '.join(unknown)} (choose from "
                     f"{', '.join(every)}, or all)")
  return tuple(n for n in every if n in names)


def _of(cfg: CrossCheckConfig, kind: Sequence[str]) -> list:
  """cfg.detectors of one kind (ONE_STEP or TRAJECTORY)."""
  return [d for d in cfg.detectors if d in kind]


def scale_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
  """max |a - b| / max |b|: the detectors' figure (a per-value ratio means nothing
  for a score near 0, such as asthana_cos)."""
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _first_captions(cfg: CrossCheckConfig):
  table = tables.open_prompts(cfg.prompts, cfg.prompt_column, cfg.csv_delimiter)
  captions = []
  for chunk in table.iter_chunks(0, table.num_rows, 4096):
    captions += [t for t in chunk.texts if t is not None]
    if len(captions) >= cfg.n:
      break
  if not captions:
    raise InputError(f"{cfg.prompts}: no scorable caption")
  return captions[:cfg.n]


def compare(a: np.ndarray, b: np.ndarray, k: int = TOP_K) -> Dict:
  """max relative difference of a to b, Spearman of the rankings, top-k overlap."""
  rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-30)
  k = min(k, len(a))
  top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
  top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
  rho = float(stats.spearmanr(a, b).statistic) if len(a) > 1 else 1.0
  return {"max_rel_diff": float(rel.max()), "mean_rel_diff": float(rel.mean()),
          "spearman": rho, "topk_overlap": len(top_a & top_b) / k, "k": k, "rel": rel}


def _verdict(cfg: CrossCheckConfig, c: Dict, n: int) -> Dict:
  if cfg.dtype != "float32":
    return {"verdict": (f"REPORT: n={n} {cfg.dtype} max rel diff {c['max_rel_diff']:.2e}, "
                        f"mean {c['mean_rel_diff']:.2e}, Spearman {c['spearman']:.6f}, "
                        f"top-{c['k']} overlap {c['topk_overlap']:.2f} (no threshold in "
                        f"{cfg.dtype})")}
  ok = (c["max_rel_diff"] <= FP32_MAX_REL_DIFF and c["spearman"] >= FP32_MIN_SPEARMAN and
        c["topk_overlap"] == 1.0)
  return {"passed": bool(ok), "verdict": (
      f"{'PASS' if ok else 'FAIL'}: n={n} fp32 max rel diff {c['max_rel_diff']:.2e} "
      f"(<= {FP32_MAX_REL_DIFF:g}), Spearman {c['spearman']:.6f} (>= {FP32_MIN_SPEARMAN}), "
      f"top-{c['k']} overlap {c['topk_overlap']:.2f} (= 1)")}


def run(cfg: CrossCheckConfig) -> workdir_lib.Manifest:
  """Scores cfg.n prompts with memjax and with PyTorch; returns the manifest
  (its details hold the comparison and the verdict)."""
  from memjax.testing.torch_detectors import TorchDetectors  # pylint: disable=g-import-not-at-top
  from memjax.testing.torch_reference import TorchWhitebox  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  folder = workdir_lib.stage_dir(cfg.workdir, STAGE)
  captions = _first_captions(cfg)
  prompts_path = os.path.join(folder, "prompts.parquet")
  workdir_lib.write_parquet(prompts_path, pa.table({"caption": captions}))
  shape = loading.load_stable_diffusion(cfg.model, components=(),
                                        options=cfg.model_options).latent_shape_chw
  z, _, _ = noise_lib.start_noise(cfg.noise, cfg.seeds, shape)
  noise_path = os.path.join(folder, "noise.npy")
  workdir_lib.write_atomic(noise_path, lambda f: np.save(f, z.transpose(0, 3, 1, 2)))
  ours_dir = os.path.join(folder, "memjax")
  manifest = scan.run(scan.ScanConfig(
      model=cfg.model, prompts=prompts_path, workdir=ours_dir, batch_size=cfg.batch_size,
      guidance_scale=cfg.guidance_scale, dtype=cfg.dtype, attention=cfg.attention,
      noise=noise_path, top_k=TOP_K, overwrite=True, log_interval_s=3600,
      detectors=_of(cfg, detectors_lib.ONE_STEP), ren_layer=cfg.ren_layer,
      detector_protocol=cfg.detector_protocol, detector_generations=cfg.detector_generations,
      detector_seed=cfg.detector_seed, **common.model_file_fields(cfg)))
  ours = shards.open_shards(workdir_lib.stage_dir(ours_dir, "scan")).to_table()
  ours = ours.sort_by("prompt_id")
  mine = np.array(ours["scores"].to_pylist(), np.float64)
  if cfg.detectors:
    ref = TorchDetectors(cfg.model, cfg.dtype, options=cfg.model_options,
                         ren_layer=f"{cfg.ren_layer}.transformer_blocks.0.attn2",
                         batch_size=cfg.batch_size)
  else:
    ref = TorchWhitebox(cfg.model, cfg.dtype, options=cfg.model_options)
  theirs = np.concatenate([
      ref.score(captions[i:i + cfg.batch_size], z.transpose(0, 3, 1, 2),
                cfg.guidance_scale)["dcs"].mean(axis=1)
      for i in range(0, len(captions), cfg.batch_size)])
  c = compare(mine, theirs)
  workdir_lib.write_parquet(os.path.join(folder, workdir_lib.CROSSCHECK_TABLE), pa.table({
      "prompt_id": np.arange(len(captions)), "caption": captions, "memjax_scores": mine,
      "torch_scores": theirs, "rel_diff": c.pop("rel")}))
  details = dict(c, n=len(captions), dtype=cfg.dtype, model=os.path.abspath(cfg.model),
                 memjax_compiles=manifest.runtime.get("compiles"), **_verdict(cfg, c,
                                                                              len(captions)))
  outputs = {"table": workdir_lib.CROSSCHECK_TABLE, "noise": "noise.npy",
             "prompts": "prompts.parquet", "memjax_workdir": "memjax"}
  if _of(cfg, detectors_lib.ONE_STEP):
    _add(details, "detectors", _detectors(cfg, ours, captions, z, ref))
  if _of(cfg, traj_lib.TRAJECTORY):
    _add(details, "trajectory_detectors",
         _trajectory(cfg, folder, prompts_path, noise_path, captions, z, ref))
    outputs["trajectory_table"] = TRAJECTORY_TABLE
  if cfg.blackbox:
    details["blackbox"] = _blackbox(cfg, captions, ref)
    details["verdict"] += "; " + details["blackbox"]["verdict"]
  return workdir_lib.write_manifest(cfg.workdir, workdir_lib.Manifest(
      stage=STAGE, config=dataclasses.asdict(cfg), timings={"total_s": time.perf_counter() - t0},
      outputs=outputs, runtime=distributed.runtime_info(), details=details))


def _add(details: Dict, key: str, part: Dict) -> None:
  """details[key] = part, its verdict appended; in float32 it must pass too."""
  details[key] = part
  details["verdict"] += "; " + part["verdict"]
  if "passed" in details:  # float32: the verdict covers the detectors too
    details["passed"] = details["passed"] and part["passed"]


def _detectors(cfg: CrossCheckConfig, ours, captions, z, ref) -> Dict:
  """Each detector column of memjax's scan (`ours`, by prompt_id) against the PyTorch restatement
  (`memjax.testing.torch_detectors`) on the same captions and noises: the shared z
  of the first seeds, and each prompt's own z (`noise.per_prompt_noise`, drawn here
  as the scan draws it), by the scan's noise plan; means over each detector's
  generations.

  The figure is scale-relative, max |ours - theirs| / max |theirs| over the
  prompts: asthana_cos is a cosine near 0, where a per-prompt ratio means nothing.
  """
  plan = cfg.noise_plan(len(z))
  theirs = {}

  def add(part, names):  # each detector's mean over its own generations
    for n in names:
      for c in detectors_lib.COLUMNS[n]:
        theirs.setdefault(c, []).append(part[c][:, :plan[n][1]].mean(axis=1))

  kind = lambda k: [n for n in detectors_lib.check_names(list(plan)) if plan[n][0] == k]
  if kind(detectors_lib.SHARED):
    z_shared = z[:detectors_lib.plan_noise(plan, detectors_lib.SHARED)].transpose(0, 3, 1, 2)
    for i in range(0, len(captions), cfg.batch_size):
      add(ref.scores(captions[i:i + cfg.batch_size], z_shared,
                     jeon="jeon" in cfg.detectors), kind(detectors_lib.SHARED))
  if kind(detectors_lib.PER_PROMPT):  # each prompt's own z, as the scan draws it (prompt_id i)
    z_own = np.asarray(noise_lib.per_prompt_noise(
        cfg.detector_seed, noise_lib.prompt_words(np.arange(len(captions))),
        detectors_lib.plan_noise(plan, detectors_lib.PER_PROMPT),
        (z.shape[3], z.shape[1], z.shape[2])))
    for i, caption in enumerate(captions):
      add(ref.scores([caption], z_own[i].transpose(0, 3, 1, 2), jeon=False),
          kind(detectors_lib.PER_PROMPT))
  out, worst = {"columns": {}, "noise": {n: list(v) for n, v in plan.items()}}, 0.0
  for column in detectors_lib.columns(_of(cfg, detectors_lib.ONE_STEP)):
    a = np.array(ours[column].to_pylist(), np.float64)
    b = np.concatenate(theirs[column])
    c = compare(a, b)
    c.pop("rel")
    c["scale_rel_diff"] = scale_rel_diff(a, b)
    worst = max(worst, c["scale_rel_diff"])
    out["columns"][column] = c
  ok = worst <= FP32_MAX_REL_DIFF
  out["passed"] = bool(ok) if cfg.dtype == "float32" else None
  shown = ", ".join(f"{k} {v['scale_rel_diff']:.1e}" for k, v in out["columns"].items())
  out["verdict"] = (f"detectors {'PASS' if ok else 'FAIL'} (max|diff|/max|ref| <= "
                    f"{FP32_MAX_REL_DIFF:g}): {shown}" if cfg.dtype == "float32" else
                    f"detectors REPORT ({cfg.dtype}): {shown}")
  return out


def _trajectory(cfg: CrossCheckConfig, folder, prompts_path, noise_path, captions, z,
                ref) -> Dict:
  """wen_steps and bright_ending of memjax's generate stage against the PyTorch
  restatement (`TorchDetectors.trajectory`), per (prompt, seed): the same captions,
  z and guidance, DDIM of cfg.steps steps, Wen's mean over all of them, BE's mask
  at the last. Writes TRAJECTORY_TABLE (memjax_<column>, torch_<column>)."""
  names = _of(cfg, traj_lib.TRAJECTORY)
  manifest = generate.run(generate.GenerateConfig(
      model=cfg.model, prompts=prompts_path, workdir=os.path.join(folder, "memjax"),
      sampler="ddim", steps=cfg.steps, batch_size=cfg.batch_size, noise=noise_path,
      detectors=names, wen_steps=cfg.steps, guidance_scale=cfg.guidance_scale, dtype=cfg.dtype,
      attention=cfg.attention, overwrite=True, log_interval_s=3600,
      **common.model_file_fields(cfg)))
  table = tables.read_table(os.path.join(workdir_lib.stage_dir(
      os.path.join(folder, "memjax"), generate.STAGE), workdir_lib.GENERATED_TABLE))
  table = table.sort_by([("prompt_id", "ascending"), ("seed", "ascending")])
  traj = ref.trajectory(captions, z.transpose(0, 3, 1, 2), cfg.steps, cfg.guidance_scale,
                        be="bright_ending" in names, total_steps=cfg.steps)
  theirs = {"wen_steps": traj["wen_steps"].mean(-1)}  # [n, S]
  if "bright_ending" in names:
    theirs["bright_ending"] = traj["be_steps"].mean(-1)
  n, s = theirs["wen_steps"].shape
  rows = {"prompt_id": np.repeat(np.arange(n), s), "seed": np.tile(np.arange(s), n),
          "caption": np.repeat(np.array(captions, object), s)}
  out, worst = {"steps": cfg.steps, "seeds": s, "columns": {},
                "memjax_compiles": manifest.runtime.get("compiles")}, 0.0
  for column in names:
    a = np.array(table[column].to_pylist(), np.float64)  # null (no image): NaN, fails
    b = theirs[column].ravel()
    rows.update({f"memjax_{column}": a, f"torch_{column}": b})
    c = compare(a, b)
    c.pop("rel")
    c["scale_rel_diff"] = scale_rel_diff(a, b)
    worst = max(worst, c["scale_rel_diff"]) if np.isfinite(c["scale_rel_diff"]) else np.inf
    out["columns"][column] = c
  workdir_lib.write_parquet(os.path.join(folder, TRAJECTORY_TABLE), pa.table(rows))
  ok = worst <= FP32_MAX_REL_DIFF
  out["passed"] = bool(ok) if cfg.dtype == "float32" else None
  shown = ", ".join(f"{k} {v['scale_rel_diff']:.1e}" for k, v in out["columns"].items())
  head = f"trajectory detectors ({cfg.steps} DDIM steps, per prompt and seed)"
  out["verdict"] = (f"{head} {'PASS' if ok else 'FAIL'} (max|diff|/max|ref| <= "
                    f"{FP32_MAX_REL_DIFF:g}): {shown}" if cfg.dtype == "float32" else
                    f"{head} REPORT ({cfg.dtype}): {shown}")
  return out


def _blackbox(cfg: CrossCheckConfig, captions, ref) -> Dict:
  """One-step images (docs/method.md section 3) and their edge scores, both ways.

  Seeds: cfg.seeds when there are at least 2, else 0..3 (the blackbox default).
  """
  sd = common.load_model(cfg)
  seeds = list(cfg.seeds) if len(cfg.seeds) >= 2 else list(blackbox.DEFAULT_SEEDS)
  z = noise_lib.noise_for_seeds(seeds, sd.latent_shape_chw)
  step = blackbox.make_step(sd, z, cfg.guidance_scale, cfg.batch_size,
                            distributed.local_mesh(), as_uint8=False)
  ids = common.tokenize(tables.PromptChunk(0, len(captions), None, list(captions),
                                           ["ok"] * len(captions)), sd.tokenizer).ids
  mine = step.all(ids)[0]
  theirs = np.concatenate([ref.onestep_images(captions[i:i + cfg.batch_size],
                                              z.transpose(0, 3, 1, 2), cfg.guidance_scale)
                           for i in range(0, len(captions), cfg.batch_size)])
  pixel = float(np.abs(mine - theirs).max())

  def scores(images):  # through uint8 and PIL, as the blackbox stage does
    u8 = onestep.to_uint8(images)
    return np.array([edges.edge_score_numpy([images_lib.to_unit(im, edges.EDGE_SIZE)
                                             for im in row]) for row in u8])
  a, b = scores(mine), scores(theirs)
  out = {"seeds": seeds, "max_abs_pixel_diff": pixel,
         "edge_scores_max_abs_diff": float(np.abs(a - b).max()),
         "edge_scores_equal_fraction": float(np.mean(a == b))}
  out["verdict"] = (f"blackbox: max abs pixel diff {pixel:.2e} (<= 1/255 = 3.9e-3 expected), "
                    f"edge scores equal for {out['edge_scores_equal_fraction']:.0%} of prompts "
                    f"(max abs diff {out['edge_scores_max_abs_diff']:.2e})")
  return out
