"""How faithful a testbed model's multi-step samples are, per planted kind and guidance.

    python benchmarks/testbed_guidance.py --testbed=DIR [--guidance=1,3,7.5] [--out=F.json]

For every MV, TV and RV evaluation caption of a testbed folder (`memjax.train`'s
workdir or memjax/assets/testbed): 32-step Heun samples from 4 seeds (the generate
stage's sampler and noise), and the SSE at 256 x 256 (the labeller's measure,
Lanczos upscaling as verify does) of the closest seed to the caption's own
training image (for RV captions of a `rv_layout="variant"` testbed also to the
group's source image, which is what they should bring back); beside it, the VAE's
reconstruction error of the own images. Shares are counted under the labeller's
default thresholds (`labels.Thresholds`: MV 2500 to the own image, RV 3000 to the
source): a kind whose samples sit above them at the guidance the ground-truth step
uses cannot be labelled, whatever the masks do.
"""
import argparse
import json
import os

import jax
import numpy as np
import pyarrow.parquet as pq

from memjax.data import images as images_lib
from memjax.method import labels
from memjax.method import noise as noise_lib
from memjax.method import onestep
from memjax.method import sampling
from memjax.models import loading

KINDS = ("MV", "TV", "RV")
THRESHOLDS = labels.Thresholds()  # the labeller's defaults


def _read(testbed, path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(os.path.join(testbed, path)) as im:
    return np.asarray(im.convert("RGB"))


def _unit(image):
  """uint8 or [0, 1] [H, W, 3] -> float64 [256, 256, 3], as the labeller sees it."""
  if image.dtype != np.uint8:
    image = onestep.to_uint8(image)
  return images_lib.to_unit(image, labels.IMAGE_SIZE).astype(np.float64)


def _closest(samples, target):
  """min over the seeds' samples [S, H, W, 3] of the SSE to target (already `_unit`)."""
  return min(float(((_unit(x) - target) ** 2).sum()) for x in samples)


def _summary(errors, threshold, median_key, share_key):
  errors = np.array(errors)
  return {median_key: float(np.median(errors)), share_key: float(np.mean(errors < threshold))}


def run(testbed, guidance, seeds=(0, 1, 2, 3), steps=32):
  sd = loading.load_stable_diffusion(os.path.join(testbed, "model"))
  ev = pq.read_table(os.path.join(testbed, "eval_prompts.parquet")).to_pylist()
  rows = {k: [r for r in ev if r["kind"] == k] for k in KINDS}
  train = pq.read_table(os.path.join(testbed, "train.parquet")).to_pylist()
  group = {r["caption"]: r["group"] for r in train}
  source = {r["group"]: r["image_path"] for r in train if r["kind"] == "RV_source"}
  own = {k: np.stack([_read(testbed, r["image_path"]) for r in rs]) for k, rs in rows.items()}
  own_unit = {k: [_unit(x) for x in images] for k, images in own.items()}
  source_unit = {g: _unit(_read(testbed, p)) for g, p in source.items()}
  out = {"testbed": testbed, "seeds": list(seeds), "sampler": f"heun, {steps} steps",
         "vae_reconstruction": {}, "samples": {}}
  vae = sd.vae
  recon = jax.jit(lambda p, x: vae.apply(
      {"params": p}, vae.apply({"params": p}, x, method=type(vae).encode)[0],
      method=type(vae).decode))
  for kind, images in own.items():
    rec = np.asarray(recon(sd.params["vae"], images.astype(np.float32) / 127.5 - 1)) / 2 + 0.5
    errors = [_closest(r[None], t) for r, t in zip(rec, own_unit[kind])]
    out["vae_reconstruction"][kind] = {"median": float(np.median(errors)),
                                       "max": float(np.max(errors))}
  plan = sampling.make_plan("heun", sd.schedule, sd.scheduler_config, steps)
  noise = noise_lib.noise_for_seeds(list(seeds), sd.latent_shape_chw)
  empty = np.asarray(sd.tokenizer.encode_batch([""])["input_ids"][0], np.int32)
  for w in guidance:
    sample = jax.jit(sampling.sample_fn_for_model(sd, plan, w))
    out["samples"][str(w)] = {}
    for kind, rs in rows.items():
      ids = np.asarray(sd.tokenizer.encode_batch([r["caption"] for r in rs])["input_ids"],
                       np.int32)
      images = np.asarray(sample(sd.params, ids, empty, noise)["images"])
      cell = {"n": len(rs), **_summary(
          [_closest(x, t) for x, t in zip(images, own_unit[kind])], THRESHOLDS.mv,
          "median_sse_to_own", f"under_{THRESHOLDS.mv:g}")}
      if kind == "RV" and source:
        cell.update(_summary([_closest(x, source_unit[group[r["caption"]]])
                              for x, r in zip(images, rs)], THRESHOLDS.rv,
                             "median_sse_to_source", f"source_under_{THRESHOLDS.rv:g}"))
      out["samples"][str(w)][kind] = cell
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--testbed", required=True)
  parser.add_argument("--guidance", default="1,3,7.5")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  result = run(args.testbed, [float(w) for w in args.guidance.split(",")])
  print(json.dumps(result, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
