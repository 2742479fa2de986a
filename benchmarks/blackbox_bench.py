"""One-step generation throughput of the blackbox attack (images/s).

    python benchmarks/blackbox_bench.py --models=tiny,medium --batch_sizes=1,8 --seeds=4

builds random SD folders with `memjax.testing.tiny` ("tiny" = the tests' sd1 style, 32 px
images; "medium" = 32 x 32 latents, 256 px images) and times, per model and batch
size, on JAX's default backend (one device):
- memjax's jitted one-step sampler (text encoder + one UNet forward per seed +
  VAE decode, `memjax.onestep`), compile time separately;
- the host side of the attack per image (uint8, PIL Lanczos to 256, Sobel edges);
- with --torch, PyTorch diffusers computing the same images
  (`TorchWhitebox.onestep_images`, CFG pair per prompt) on the same folder.
An image is one (prompt, seed) sample. Prints one JSON object per row.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_timing  # pylint: disable=g-import-not-at-top  # benchmarks/bench_timing.py

STYLES = {"tiny": "sd1", "medium": "medium"}


def bench_model(name, folder, batch_sizes, seeds, repeats, with_torch):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from memjax.method import edges, onestep, whitebox  # pylint: disable=g-import-not-at-top
  from memjax.models import loading  # pylint: disable=g-import-not-at-top
  sd = loading.load_stable_diffusion(folder)
  p = sd.params
  c, h, w = sd.latent_shape_chw
  noise = jax.random.normal(jax.random.PRNGKey(0), (seeds, h, w, c), jnp.float32)
  empty = sd.tokenizer.encode_batch([""])["input_ids"]
  e_u = jax.jit(whitebox.make_uncond_fn(sd.text_encoder.apply, sd.unet.apply, sd.schedule, 999))(
      p["text_encoder"], p["unet"], empty, noise)
  sample = jax.jit(onestep.make_onestep_fn(sd.text_encoder.apply, sd.unet.apply,
                                           onestep.vae_decode_fn(sd), sd.schedule, 7.5,
                                           sd.vae_scaling_factor))
  torch_ref = None
  if with_torch:
    from memjax.testing.torch_reference import TorchWhitebox  # pylint: disable=g-import-not-at-top
    torch_ref = TorchWhitebox(folder, threads=os.cpu_count())
  rows = []
  for batch in batch_sizes:
    captions = [f"a photo of object {i} on a table" for i in range(batch)]
    ids = jnp.asarray(sd.tokenizer.encode_batch(captions)["input_ids"])
    args = (p["text_encoder"], p["unet"], p["vae"], ids, noise, e_u)
    t0 = time.perf_counter()
    compiled = sample.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = np.asarray(jax.block_until_ready(compiled(*args)))
    gen_s = bench_timing.median_time(lambda: jax.block_until_ready(compiled(*args)), repeats,
                                     warmup=False)
    pixels = onestep.to_uint8(out)

    def host():
      for group in pixels:
        edges.edge_score_numpy([edges.resize_for_edges(im) for im in group])

    host_s = bench_timing.median_time(host, max(1, repeats // 2), warmup=False)
    n = batch * seeds
    row = {"model": name, "batch": batch, "seeds": seeds, "image_px": list(out.shape[2:4]),
           "compile_s": round(compile_s, 2), "gen_images_per_s": round(n / gen_s, 2),
           "host_edge_images_per_s": round(n / host_s, 2),
           "end_to_end_images_per_s": round(n / (gen_s + host_s), 2),
           "backend": jax.default_backend()}
    if torch_ref is not None:
      z = np.asarray(noise).transpose(0, 3, 1, 2)
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
