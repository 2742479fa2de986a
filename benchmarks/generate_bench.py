"""Multi-step generation throughput (images/s) of the generate stage on this machine.

    python benchmarks/generate_bench.py --styles=sd1,medium --steps=1,32 --samplers=heun,ddim

builds random SD folders with `memjax.testing.tiny` ("sd1": 16 x 16 latents, 32 px images;
"medium": 32 x 32 latents, 256 px images), and times, per style, sampler and number
of steps, the generate stage's own step (`memjax.stages.generate.make_step`: the
whole jitted loop, text encoder, 2 * steps - 1 CFG UNet calls for Heun or `steps`
for DDIM, VAE decode, rounding to uint8; the `BoundStep` `memjax.generate` runs, on
one device) on --prompts x --seeds images at once: compile time separately, one
untimed call, then the median of --repeats runs. Writes a JSON file under
benchmarks/results/ and prints one line per case.
"""
import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_models  # pylint: disable=g-import-not-at-top  # benchmarks/bench_models.py
import bench_timing  # pylint: disable=g-import-not-at-top  # benchmarks/bench_timing.py


def bench_case(sd, sampler, steps, prompts, seeds, repeats):
  """Times one (sampler, steps) case; returns a dict of results."""
  from memjax.method import noise as noise_lib  # pylint: disable=g-import-not-at-top
  from memjax.method import sampling  # pylint: disable=g-import-not-at-top
  from memjax.runtime import distributed  # pylint: disable=g-import-not-at-top
  from memjax.stages import generate  # pylint: disable=g-import-not-at-top
  plan = sampling.make_plan(sampler, sd.schedule, sd.scheduler_config, steps)
  noise = noise_lib.noise_for_seeds(range(seeds), sd.latent_shape_chw)
  step = generate.make_step(sd, plan, noise, 7.5, prompts, distributed.local_mesh(1))
  ids = bench_models.token_ids(sd, [f"a photo of thing {i}" for i in range(prompts)])
  _, compile_s, _ = bench_timing.compile_step(step)
  bench_timing.run_step(step, ids)  # the first call (dispatch caches), not timed
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    bench_timing.run_step(step, ids)
    times.append(time.perf_counter() - t0)
  run_s = float(np.median(times))
  n = prompts * seeds
  return {"sampler": sampler, "steps": steps, "unet_evaluations": plan.evaluations,
          "images": n, "unet_batch": 2 * n, "compile_s": compile_s, "run_s": run_s,
          "images_per_s": n / run_s, "times_s": times}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--styles", default="sd1,medium")
  p.add_argument("--steps", default="1,32")
  p.add_argument("--samplers", default="heun")
  p.add_argument("--prompts", type=int, default=2)
  p.add_argument("--seeds", type=int, default=4)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
  a = p.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  from memjax.testing import tiny  # pylint: disable=g-import-not-at-top
  from memjax.models import loading  # pylint: disable=g-import-not-at-top
  out = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
         "jax_version": jax.__version__, "cpu_count": os.cpu_count(),
         "platform": platform.platform(), "load_avg": os.getloadavg(), "cases": []}
  with tempfile.TemporaryDirectory() as tmp:
    for style in a.styles.split(","):
      folder = tiny.build_tiny_model(os.path.join(tmp, style), style, seed=0)
      sd = loading.load_stable_diffusion(folder)
      for sampler in a.samplers.split(","):
        for steps in (int(s) for s in a.steps.split(",")):
          r = bench_case(sd, sampler, steps, a.prompts, a.seeds, a.repeats)
          r.update(style=style, image_px=sd.latent_shape_chw[1] * 2 ** (
              len(sd.configs["vae"]["block_out_channels"]) - 1))
          out["cases"].append(r)
          print(f"{style:7s} {sampler:5s} {steps:3d} steps ({r['unet_evaluations']:2d} CFG UNet "
                f"calls) {r['images']} images of {r['image_px']} px: {r['images_per_s']:8.3f} "
                f"images/s (run {r['run_s']:.2f} s, compile {r['compile_s']:.1f} s)", flush=True)
  path = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                               f"cpu_generate_bench_{datetime.date.today().isoformat()}.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  print("wrote", path)


if __name__ == "__main__":
  main()
