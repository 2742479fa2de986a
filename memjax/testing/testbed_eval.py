"""How the planted structure of a testbed comes out: AUC per kind against held-out
captions (DCS and Wen norm, averaged over seeds as the scan does), and whether
each planted caption's one-step image lands nearest its own training image.

The scores come from the scan's own step (`stages.scan.make_step`); the images
from the one-step sampler's decode, at the guidance scale and at w = 1.
"""
import os
from typing import Dict, Optional, Sequence

import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq

from memjax.data import images as images_lib
from memjax.method import detection
from memjax.method import noise as noise_lib
from memjax.method import onestep
from memjax.method import whitebox
from memjax.models import loading
from memjax.runtime import distributed
from memjax.runtime import engine
from memjax.stages import common

# The scan flags of configs/demo_scan.flags: the DCS averaged over 4 start noises.
# One noise is not enough to rank 20 MV captions above everything else: on the
# shipped model, seeds 0..3 alone give MV precision@20 of 0.75, 0.65, 0.75, 0.75
# and MV AUC 0.976 to 1.0; their mean gives 1.0 and 1.0
# (benchmarks/train_testbed.md).
EVAL_SEEDS = (0, 1, 2, 3)


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
  """ROC AUC of positives vs negatives (NaN when either is empty)."""
  pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
  if not len(pos) or not len(neg):
    return float("nan")
  labels = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
  return detection.roc_auc(detection.roc_curve(labels, np.r_[pos, neg]))


def auc_table(kinds: np.ndarray, memorized: np.ndarray, columns: Dict[str, np.ndarray],
              tones: Optional[Sequence] = None) -> Dict[str, Dict[str, float]]:
  """AUC of each kind (and MV+TV+RV pooled) against held-out, for each score column;
  `precision_at_k_mv`: fraction of MV / of any memorized caption in the top K
  (K = number of MV captions) by that column. With `tones` (eval_prompts.parquet's
  column: "dark" / "bright" for MV captions), also "MV_dark" and "MV_bright"."""
  kinds, memorized = np.asarray(kinds), np.asarray(memorized, bool)
  tones = np.array([None] * len(kinds) if tones is None else list(tones), object)
  held = kinds == "heldout"
  k = int((kinds == "MV").sum())
  out = {}
  for name, v in columns.items():
    v = np.asarray(v, np.float64)
    row = {kind: _auc(v[kinds == kind], v[held]) for kind in ("MV", "TV", "RV", "unique")}
    for tone in ("dark", "bright"):
      if ((kinds == "MV") & (tones == tone)).any():
        row[f"MV_{tone}"] = _auc(v[(kinds == "MV") & (tones == tone)], v[held])
    row["memorized"] = _auc(v[memorized], v[held])
    top = np.argsort(-v, kind="stable")[:k]
    row["precision_at_k_mv"] = float((kinds[top] == "MV").mean()) if k else float("nan")
    row["precision_at_k_memorized"] = float(memorized[top].mean()) if k else float("nan")
    out[name] = row
  return out


def nearest_is_own(generated: np.ndarray, own: np.ndarray, train_images: np.ndarray
                   ) -> np.ndarray:
  """Whether each generated image is closer (pixel MSE) to its own training image
  than to every other training image.

  Args:
    generated: [N, S, S, 3] float in [0, 1]; own: [N] index into train_images;
    train_images: [M, S, S, 3] float in [0, 1] (distinct images).
  Returns: [N] bool.
  """
  g = generated.reshape(len(generated), -1).astype(np.float64)
  t = train_images.reshape(len(train_images), -1).astype(np.float64)
  d = (g ** 2).sum(1)[:, None] - 2 * g @ t.T + (t ** 2).sum(1)[None]
  own_d = d[np.arange(len(g)), own]
  d[np.arange(len(g)), own] = np.inf
  return own_d < d.min(axis=1)


def _make_step(sd, z: np.ndarray, guidance_scale: float, batch: int, mesh) -> engine.BoundStep:
  """token ids [B, 77] -> ({dcs, wen, ...} [B], images at w, images at w = 1)."""
  t = sd.schedule.last_timestep
  c = whitebox.timestep_constants(sd.schedule, t)
  bound = common.onestep_bound(sd, z[None], mesh, ("text_encoder", "unet", "vae"))

  def decode(b, z_, e):
    x0 = c["sigma"] * z_ - c["sigma"] * e  # docs/method.md section 2: x0_hat, latent space
    return onestep.decode_images(sd.vae_decode, b["vae"], x0, sd.vae_scaling_factor)

  def step(b, ids):
    z_, e_u = b["noise"][0], b["e_u"][0]
    ctx = sd.text_embed(b["text_encoder"], ids)
    x_in = jnp.broadcast_to(c["sqrt_one_minus_abar"] * z_, (ids.shape[0],) + z_.shape)
    e_c = whitebox.model_eps(sd.unet_out, b["unet"], x_in, t, ctx, sd.schedule)
    stats = whitebox.dcs_statistics(e_u, e_c, guidance_scale, c["sigma"])
    return stats, decode(b, z_, e_u + guidance_scale * (e_c - e_u)), decode(b, z_, e_c)

  return engine.BoundStep(step, bound, batch, mesh, common.empty_ids(sd))


def evaluate(folder: str, guidance_scale: float = 7.5, seeds=EVAL_SEEDS, batch: int = 64
             ) -> Dict:
  """Scores eval_prompts.parquet of a testbed folder with its model/ (the DCS and
  Wen norm for each of `seeds`, averaged over seeds as the scan does) and checks
  what the planted captions generate.

  Returns {"auc": auc_table for `scores` and `wen`, "nearest_own": per kind, the
  fraction of (caption, seed) pairs whose one-step image (x0_hat with CFG at
  guidance_scale, decoded, clipped to [0, 1]) is nearer its own training image than
  any other, "nearest_own_w1": the same for the conditional prediction alone
  (w = 1), "rows": the per-caption numbers (`nearest_own*`: the fraction of seeds)}.
  """
  seeds = [int(s) for s in seeds]
  sd = loading.load_stable_diffusion(os.path.join(folder, "model"))
  ev = pq.read_table(os.path.join(folder, "eval_prompts.parquet")).to_pydict()
  paths = sorted(set(pq.read_table(os.path.join(folder, "train.parquet"),
                                   columns=["image_path"]).column(0).to_pylist()))
  train_images = np.stack([images_lib.read_image(p, folder).pixels
                           for p in paths]).astype(np.float32) / 255.0
  ids = sd.tokenizer.encode_batch(ev["caption"])["input_ids"].astype(np.int32)
  n = len(ids)
  kinds = np.array(ev["kind"])
  memorized = np.array(ev["memorized"], bool)
  index = {p: i for i, p in enumerate(paths)}
  own = np.array([index.get(p, -1) if p else -1 for p in ev["image_path"]])
  has = own >= 0
  mesh = distributed.local_mesh()
  scores, wen = np.zeros((n, len(seeds))), np.zeros((n, len(seeds)))
  near = {"cfg": np.zeros((n, len(seeds)), bool), "w1": np.zeros((n, len(seeds)), bool)}
  for j, seed in enumerate(seeds):
    z = noise_lib.noise_for_seeds([seed], sd.latent_shape_chw)[0]  # [h, w, c]
    stats, cfg_images, w1_images = _make_step(sd, z, guidance_scale, batch, mesh).all(ids)
    scores[:, j], wen[:, j] = stats["dcs"], stats["wen"]
    for key, gen in (("cfg", cfg_images), ("w1", w1_images)):  # at w, and the cond. model
      near[key][has, j] = nearest_is_own(gen[has], own[has], train_images)
  nearest = {key: {k: float(near[key][(kinds == k) & has].mean())
                   for k in ("MV", "TV", "RV", "unique") if ((kinds == k) & has).any()}
             for key in near}
  scores, wen = scores.mean(axis=1), wen.mean(axis=1)
  return {"guidance_scale": guidance_scale, "seeds": seeds,
          "auc": auc_table(kinds, memorized, {"scores": scores, "wen": wen}, ev.get("tone")),
          "nearest_own": nearest["cfg"], "nearest_own_w1": nearest["w1"],
          "rows": {"caption": ev["caption"], "kind": ev["kind"], "scores": scores.tolist(),
                   "wen": wen.tolist(), "nearest_own": near["cfg"].mean(axis=1).tolist(),
                   "nearest_own_w1": near["w1"].mean(axis=1).tolist()}}
