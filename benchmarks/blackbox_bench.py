"""One-step generation throughput of the blackbox attack (images/s).

    python benchmarks/blackbox_bench.py --models=tiny,medium --batch_sizes=1,8 --seeds=4

builds random SD folders with `memjax.testing.tiny` ("tiny" = the tests' sd1 style, 32 px
images; "medium" = 32 x 32 latents, 256 px images) and times, per model and batch
size, on JAX's default backend (one device):
- the blackbox stage's own step (`memjax.stages.blackbox.make_step`: text encoder +
  one UNet forward per seed + VAE decode + rounding to uint8, the `BoundStep`
  `memjax.blackbox` runs), compile time separately;
- the host side of the attack per image, as the stage scores it (PIL Lanczos to
  256, Sobel edges: `images.to_unit`, `edges.edge_score_numpy`);
- with --torch, PyTorch diffusers computing the same images
  (`TorchWhitebox.onestep_images`, CFG pair per prompt) on the same folder, and
  the largest difference to the stage's step built with `as_uint8=False`.
An image is one (prompt, seed) sample. Prints one JSON object per row.
"""
import argparse
import json
import os
import platform
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_models  # pylint: disable=g-import-not-at-top  # benchmarks/bench_models.py
import bench_timing  # pylint: disable=g-import-not-at-top  # benchmarks/bench_timing.py

STYLES = {"tiny": "sd1", "medium": "medium"}
GUIDANCE = 7.5


def bench_model(name, folder, batch_sizes, seeds, repeats, with_torch):
  import jax  # pylint: disable=g-import-not-at-top
  from memjax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  from memjax.method import edges  # pylint: disable=g-import-not-at-top
  from memjax.method import noise as noise_lib  # pylint: disable=g-import-not-at-top
  from memjax.models import loading  # pylint: disable=g-import-not-at-top
  from memjax.runtime import distributed  # pylint: disable=g-import-not-at-top
  from memjax.stages import blackbox  # pylint: disable=g-import-not-at-top
  sd = loading.load_stable_diffusion(folder)
  mesh = distributed.local_mesh(1)
  noise = noise_lib.noise_for_seeds(range(seeds), sd.latent_shape_chw)  # [S, h, w, c]
  torch_ref = None
  if with_torch:
    from memjax.testing.torch_reference import TorchWhitebox  # pylint: disable=g-import-not-at-top
    torch_ref = TorchWhitebox(folder, threads=os.cpu_count())
  rows = []
  for batch in batch_sizes:
    captions = [f"a photo of object {i} on a table" for i in range(batch)]
    ids = bench_models.token_ids(sd, captions)
    step = blackbox.make_step(sd, noise, GUIDANCE, batch, mesh)
    _, compile_s, _ = bench_timing.compile_step(step)
    pixels, _ = jax.device_get(bench_timing.run_step(step, ids))  # uint8 [B, S, H, W, 3]
    gen_s = bench_timing.median_time(lambda: bench_timing.run_step(step, ids), repeats,
                                     warmup=False)

    def host():  # what the stage does per prompt (blackbox._score_prompt)
      for group in pixels:
        edges.edge_score_numpy([images_lib.to_unit(im, edges.EDGE_SIZE) for im in group])

    host_s = bench_timing.median_time(host, max(1, repeats // 2), warmup=False)
    n = batch * seeds
    row = {"model": name, "batch": batch, "seeds": seeds, "image_px": list(pixels.shape[2:4]),
           "compile_s": round(compile_s, 2), "gen_images_per_s": round(n / gen_s, 2),
           "host_edge_images_per_s": round(n / host_s, 2),
           "end_to_end_images_per_s": round(n / (gen_s + host_s), 2),
           "backend": jax.default_backend()}
    if torch_ref is not None:
      exact = blackbox.make_step(sd, noise, GUIDANCE, batch, mesh, as_uint8=False)
      out, _ = jax.device_get(bench_timing.run_step(exact, ids))  # float32 in [0, 1]
      z = noise.transpose(0, 3, 1, 2)
      torch_out = torch_ref.onestep_images(captions, z)
      torch_s = bench_timing.median_time(lambda: torch_ref.onestep_images(captions, z),
                                         repeats, warmup=False)
      row.update(torch_images_per_s=round(n / torch_s, 2),
                 max_abs_diff_vs_torch=float(np.abs(torch_out - out).max()))
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="tiny,medium")
  ap.add_argument("--batch_sizes", default="1,8")
  ap.add_argument("--seeds", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--torch", action="store_true", help="also time PyTorch diffusers")
  ap.add_argument("--out", default=None, help="write all rows to this JSON file")
  args = ap.parse_args()
  from memjax.testing import tiny  # pylint: disable=g-import-not-at-top
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.models.split(","):
      folder = tiny.build_tiny_model(os.path.join(tmp, name), STYLES[name], seed=0)
      rows += bench_model(name, folder, [int(b) for b in args.batch_sizes.split(",")],
                          args.seeds, args.repeats, args.torch)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows}, f,
                indent=2)


if __name__ == "__main__":
  main()
