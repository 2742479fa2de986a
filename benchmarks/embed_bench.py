"""memjax's Flax CLIP image encoder against open_clip's, same weights, same images.

    python benchmarks/embed_bench.py --archs=ViT-B-32,ViT-L-14 --batch=16 --repeats=3

For each architecture: open_clip builds it with random torch weights (seed 0,
QuickGELU as the `@openai` tag), the state dict is written as .safetensors,
memjax's `embed.load_embedder(ARCH@openai, FILE)` reads it (no torch on that
path) and `memjax.testing.open_clip_reference` embeds with open_clip itself. In
one run, on the same PIL images (random 300 x 200 RGB): images/s of each (the
whole `embed` call: preprocessing + forward + normalisation; medians, timed in
turn within each repeat), their ratio, and the relative max difference of the
unit embeddings.
"""
import argparse
import json
import os
import platform
import sys
import tempfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_timing  # pylint: disable=g-import-not-at-top  # benchmarks/bench_timing.py


def run(args):
  import jax  # pylint: disable=g-import-not-at-top
  import open_clip  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from memjax.data import embed  # pylint: disable=g-import-not-at-top
  from memjax.models import checkpoint  # pylint: disable=g-import-not-at-top
  from memjax.testing import open_clip_reference  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  rng = np.random.default_rng(0)
  images = [Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
            for _ in range(args.batch)]
  rows = []
  for arch in args.archs.split(","):
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=True)
    path = os.path.join(tempfile.mkdtemp(), "open_clip_model.safetensors")
    checkpoint.write_safetensors(path, {k: v.numpy() for k, v in model.state_dict().items()})
    del model
    ours = embed.load_embedder(f"{arch}@openai", path, batch_size=args.batch)
    ref = open_clip_reference.OpenClipEmbedder(ours.spec, batch_size=args.batch)
    a, b = ours.embed(images), ref.embed(images)
    t_ours, t_ref = bench_timing.median_seconds(
        [lambda: ours.embed(images), lambda: ref.embed(images)], args.repeats)
    rows.append({"arch": arch + "@openai", "batch": args.batch,
                 "memjax_images_per_s": round(args.batch / t_ours, 2),
                 "open_clip_images_per_s": round(args.batch / t_ref, 2),
                 "memjax_over_open_clip_speed": round(t_ref / t_ours, 3),
                 "rel_max_diff": float(np.abs(a - b).max() / np.abs(b).max()),
                 "machine": f"{platform.machine()} {os.cpu_count()} cores, jax "
                            f"{jax.__version__} {jax.default_backend()}, torch {torch.__version__}"})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--archs", default="ViT-B-32,ViT-L-14")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  rows = run(args)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
