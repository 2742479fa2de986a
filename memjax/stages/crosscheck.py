"""Cross-check: the same scores from memjax and from PyTorch diffusers.

    python -m memjax.crosscheck --model=DIR --prompts=FILE --workdir=DIR [--n=64] \
      [--dtype=float32|bfloat16] [--seeds=0] [--noise=FILE.npy]

Takes the first n scorable captions, draws (or reads) one start noise z, and
computes the whitebox DCS twice on the same folder (with --blackbox also the
one-step images and their edge scores): through memjax's own scan
(`memjax.scan.run`, the real command path) and with PyTorch diffusers' UNet and
transformers' CLIP text encoder (`memjax.torch_reference`, the reference's CFG
pair). Writes `WORKDIR/crosscheck.parquet` (per prompt: both scores and their
relative difference) and `WORKDIR/crosscheck.json` (max_rel_diff, spearman,
topk_overlap, n, dtype) and prints a one-line verdict. torch is imported only here
(through torch_reference).
"""
import dataclasses
import os
from typing import Dict, Optional, Sequence

from absl import flags
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import stats

from memjax import cli
from memjax.method import noise as noise_lib
from memjax.data import prompts as prompts_lib
from memjax.runtime import results
from memjax.stages import scan
from memjax.runtime.errors import InputError
from memjax.models import loading

# Acceptance of the cross-check in float32 (issue: cross-check against PyTorch).
FP32_MAX_REL_DIFF = 1e-4
FP32_MIN_SPEARMAN = 0.9999
TOP_K = 10


@dataclasses.dataclass
class CrossCheckConfig:
  model: str
  prompts: str
  workdir: str
  n: int = 64
  prompt_column: str = "caption"
  csv_delimiter: Optional[str] = None
  seeds: Sequence[int] = (0,)
  guidance_scale: float = 7.5
  dtype: str = "float32"
  noise: Optional[str] = None
  batch_size: int = 16
  blackbox: bool = False  # also compare the one-step images and edge scores


def _first_captions(cfg: CrossCheckConfig):
  table = prompts_lib.open_prompts(cfg.prompts, cfg.prompt_column, cfg.csv_delimiter)
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


def run(cfg: CrossCheckConfig) -> Dict:
  """Scores cfg.n prompts with memjax and with PyTorch; returns the summary."""
  from memjax.testing.torch_reference import TorchWhitebox  # pylint: disable=g-import-not-at-top
  os.makedirs(cfg.workdir, exist_ok=True)
  captions = _first_captions(cfg)
  prompts_path = os.path.join(cfg.workdir, "crosscheck_prompts.parquet")
  pq.write_table(pa.table({"caption": captions}), prompts_path)
  shape = loading.load_stable_diffusion(cfg.model, components=()).latent_shape_chw
  if cfg.noise:
    z = noise_lib.load_noise(cfg.noise, shape)
  else:
    z = noise_lib.noise_for_seeds(cfg.seeds, shape)
  noise_path = os.path.join(cfg.workdir, "noise.npy")
  np.save(noise_path, z.transpose(0, 3, 1, 2))  # the file both implementations read
  manifest = scan.run(scan.ScanConfig(
      model=cfg.model, prompts=prompts_path, workdir=os.path.join(cfg.workdir, "memjax_scan"),
      batch_size=cfg.batch_size, guidance_scale=cfg.guidance_scale, dtype=cfg.dtype,
      noise=noise_path, top_k=TOP_K, overwrite=True, log_interval_s=3600))
  ours = results.open_shards(os.path.join(cfg.workdir, "memjax_scan", "scan")).to_table()
  ours = ours.sort_by("prompt_id")
  mine = np.array(ours["scores"].to_pylist(), np.float64)
  ref = TorchWhitebox(cfg.model, cfg.dtype)
  theirs = []
  for i in range(0, len(captions), cfg.batch_size):
    theirs.append(ref.score(captions[i:i + cfg.batch_size], z.transpose(0, 3, 1, 2),
                            cfg.guidance_scale)["dcs"].mean(axis=1))
  theirs = np.concatenate(theirs)
  c = compare(mine, theirs)
  pq.write_table(pa.table({"prompt_id": np.arange(len(captions)), "caption": captions,
                           "memjax_scores": mine, "torch_scores": theirs,
                           "rel_diff": c.pop("rel")}),
                 os.path.join(cfg.workdir, "crosscheck.parquet"))
  summary = dict(c, n=len(captions), dtype=cfg.dtype, model=os.path.abspath(cfg.model),
                 memjax_compiles=manifest.get("compiles"))
  if cfg.dtype == "float32":
    ok = (c["max_rel_diff"] <= FP32_MAX_REL_DIFF and c["spearman"] >= FP32_MIN_SPEARMAN and
          c["topk_overlap"] == 1.0)
    summary["verdict"] = (
        f"{'PASS' if ok else 'FAIL'}: n={len(captions)} fp32 max rel diff "
        f"{c['max_rel_diff']:.2e} (<= {FP32_MAX_REL_DIFF:g}), Spearman {c['spearman']:.6f} "
        f"(>= {FP32_MIN_SPEARMAN}), top-{c['k']} overlap {c['topk_overlap']:.2f} (= 1)")
    summary["passed"] = bool(ok)
  else:
    summary["verdict"] = (
        f"REPORT: n={len(captions)} {cfg.dtype} max rel diff {c['max_rel_diff']:.2e}, "
        f"mean {c['mean_rel_diff']:.2e}, Spearman {c['spearman']:.6f}, top-{c['k']} "
        f"overlap {c['topk_overlap']:.2f} (no threshold in {cfg.dtype})")
  if cfg.blackbox:
    summary["blackbox"] = _blackbox(cfg, captions, ref)
    summary["verdict"] += "; " + summary["blackbox"]["verdict"]
  results.write_json_atomic(os.path.join(cfg.workdir, "crosscheck.json"), summary)
  return summary


def _blackbox(cfg: CrossCheckConfig, captions, ref) -> Dict:
  """One-step images (ALGORITHMS.md section 3) and their edge scores, both ways.

  Seeds: cfg.seeds when there are at least 2, else 0..3 (the blackbox default).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from memjax.method import edges  # pylint: disable=g-import-not-at-top
  from memjax.method import onestep  # pylint: disable=g-import-not-at-top
  from memjax.method import whitebox  # pylint: disable=g-import-not-at-top
  sd = loading.load_stable_diffusion(cfg.model, cfg.dtype)
  seeds = list(cfg.seeds) if len(cfg.seeds) >= 2 else [0, 1, 2, 3]
  z = noise_lib.noise_for_seeds(seeds, sd.latent_shape_chw)
  p = sd.params
  e_u = jax.jit(whitebox.make_uncond_fn(sd.text_encoder.apply, sd.unet.apply, sd.schedule,
                                        onestep.TIMESTEP))(
      p["text_encoder"], p["unet"], jnp.asarray(sd.tokenizer.encode_batch([""])["input_ids"]), z)
  sample = jax.jit(onestep.make_onestep_fn(sd.text_encoder.apply, sd.unet.apply,
                                           onestep.vae_decode_fn(sd), sd.schedule,
                                           cfg.guidance_scale, sd.vae_scaling_factor))
  mine, theirs = [], []
  for i in range(0, len(captions), cfg.batch_size):
    batch = captions[i:i + cfg.batch_size]
    ids = jnp.asarray(sd.tokenizer.encode_batch(batch)["input_ids"])
    mine.append(np.asarray(sample(p["text_encoder"], p["unet"], p["vae"], ids, z, e_u)))
    theirs.append(ref.onestep_images(batch, z.transpose(0, 3, 1, 2), cfg.guidance_scale))
  mine, theirs = np.concatenate(mine), np.concatenate(theirs)
  pixel = float(np.abs(mine - theirs).max())

  def scores(images):  # through uint8 and PIL, as the blackbox stage does
    u8 = onestep.to_uint8(images)
    return np.array([edges.edge_score_numpy([edges.resize_for_edges(im) for im in row])
                     for row in u8])
  a, b = scores(mine), scores(theirs)
  out = {"seeds": seeds, "max_abs_pixel_diff": pixel,
         "edge_scores_max_abs_diff": float(np.abs(a - b).max()),
         "edge_scores_equal_fraction": float(np.mean(a == b))}
  out["verdict"] = (f"blackbox: max abs pixel diff {pixel:.2e} (<= 1/255 = 3.9e-3 expected), "
                    f"edge scores equal for {out['edge_scores_equal_fraction']:.0%} of prompts "
                    f"(max abs diff {out['edge_scores_max_abs_diff']:.2e})")
  return out


_N = flags.DEFINE_integer("n", 64, "Number of captions to cross-check.")
_BLACKBOX = flags.DEFINE_bool("blackbox", False, "Also compare the one-step images (4 seeds "
                              "unless --seeds names 2 or more) and their edge scores.")


def main(argv):
  del argv
  cli.startup_from_flags()
  f = cli.common_flag_values(required=("model", "prompts", "workdir"))
  cfg = CrossCheckConfig(model=f["model"], prompts=f["prompts"], workdir=f["workdir"],
                         n=_N.value, prompt_column=f["prompt_column"],
                         csv_delimiter=f["csv_delimiter"], seeds=f["seeds"],
                         guidance_scale=f["guidance_scale"], dtype=f["dtype"],
                         noise=f["noise"], batch_size=min(f["batch_size"], 64),
                         blackbox=_BLACKBOX.value)
  summary = run(cfg)
  print(summary["verdict"])
  print(f"details: {os.path.join(cfg.workdir, 'crosscheck.json')}")


if __name__ == "__main__":
  cli.run_main(main)
