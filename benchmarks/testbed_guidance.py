"""How faithful a testbed model's multi-step samples are, per planted kind and guidance.

    python benchmarks/testbed_guidance.py --testbed=DIR [--guidance=1,3,7.5] [--out=F.json]

For every MV, TV and RV evaluation caption of a testbed folder (`memjax.train`'s
workdir or memjax/assets/testbed): 32-step Heun samples from 4 seeds (the generate
stage's sampler and noise), and the SSE at 256 x 256 (the labeller's measure,
Lanczos upscaling as verify does) of the closest seed to the caption's own
training image (for RV captions of a `rv_layout="variant"` testbed also to the
group's source image, which is what they should bring back); beside it, the VAE's
reconstruction error of the own images. The
labeller's MV and TV thresholds are 2500, so a kind whose samples sit above it at
the guidance the ground-truth step uses cannot be labelled, whatever the masks do.
"""
import argparse
import json
import os

import jax
import numpy as np
import pyarrow.parquet as pq

from memjax.data import images as images_lib
from memjax.method import noise as noise_lib
from memjax.method import sampling
from memjax.models import loading

KINDS = ("MV", "TV", "RV")
THRESHOLD = 2500.0


def _own(testbed, path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(os.path.join(testbed, path)) as im:
    return np.asarray(im.convert("RGB"))


def _sse(a, b):
  """SSE at 256 x 256 of two uint8 or [0, 1] images, as the labeller compares them."""
  def up(x):
    x = np.asarray(x)
    if x.dtype != np.uint8:
      x = (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
    return images_lib.to_unit(x, 256).astype(np.float64)
  return float(((up(a) - up(b)) ** 2).sum())


def run(testbed, guidance, seeds=(0, 1, 2, 3), steps=32):
  sd = loading.load_stable_diffusion(os.path.join(testbed, "model"))
  ev = pq.read_table(os.path.join(testbed, "eval_prompts.parquet")).to_pylist()
  rows = {k: [r for r in ev if r["kind"] == k] for k in KINDS}
  train = pq.read_table(os.path.join(testbed, "train.parquet")).to_pylist()
  group = {r["caption"]: r["group"] for r in train}
  source = {r["group"]: r["image_path"] for r in train if r["kind"] == "RV_source"}
  out = {"testbed": testbed, "seeds": list(seeds), "sampler": f"heun, {steps} steps",
         "vae_reconstruction": {}, "samples": {}}
  vae = sd.vae
  recon = jax.jit(lambda p, x: vae.apply(
      {"params": p}, vae.apply({"params": p}, x, method=type(vae).encode)[0],
      method=type(vae).decode))
  for kind, rs in rows.items():
    own = np.stack([_own(testbed, r["image_path"]) for r in rs])
    rec = np.asarray(recon(sd.params["vae"], own.astype(np.float32) / 127.5 - 1)) / 2 + 0.5
    errors = [_sse(a, b) for a, b in zip(rec, own)]
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
      best = [min(_sse(images[i, s], _own(testbed, r["image_path"])) for s in range(len(seeds)))
              for i, r in enumerate(rs)]
      out["samples"][str(w)][kind] = {
          "n": len(rs), "median_sse_to_own": float(np.median(best)),
          "under_2500": float(np.mean(np.array(best) < THRESHOLD))}
      if kind == "RV" and source:
        src = [min(_sse(images[i, s], _own(testbed, source[group[r["caption"]]]))
                   for s in range(len(seeds))) for i, r in enumerate(rs)]
        out["samples"][str(w)][kind].update(
            median_sse_to_source=float(np.median(src)),
            source_under_3000=float(np.mean(np.array(src) < 3000.0)))
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
