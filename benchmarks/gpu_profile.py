"""Where the whitebox step's time goes on an accelerator, by leaving parts out.

    python benchmarks/gpu_profile.py --arch=sd15 --batch=128

No hardware counters are needed (the method: time variants that leave one stage
out and take differences). Variants, each a `BoundStep` of the stages' engine
(`memjax.runtime.engine`) on one device, compiled (`step.lower().compile()`) and
timed (median of --repeats after a warm-up call), on random weights of the chosen
architecture (`memjax.testing.tiny.random_model`, bfloat16, memjax's attention
kernel):

- step: the scan stage's own step (`memjax.stages.scan.make_step`: text encoder
  on B prompts + UNet on B latents + the DCS statistics, what `memjax.scan` runs);
- text: the text encoder alone;
- unet: the UNet alone on the text encoder's context (copied to the device per
  call, as the ids are for the other steps);
- unet_no_attention: the UNet with every attention call replaced by its query
  (so the difference to `unet` is the attention kernels' time);
- precision: the scan step's DCS in bfloat16 against float32 on the same weights
  (float32 master copy), noise and prompts (batch --precision_batch), max and mean
  relative difference.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_models  # pylint: disable=g-import-not-at-top  # benchmarks/bench_models.py
import bench_timing  # pylint: disable=g-import-not-at-top  # benchmarks/bench_timing.py


def _timed(step, batch, repeats):
  """(median seconds of a call, compile seconds, output of the warm-up call)."""
  _, compile_s, _ = bench_timing.compile_step(step)
  out = bench_timing.run_step(step, batch)  # the warm-up call, whose output is kept
  run_s = bench_timing.median_time(lambda: bench_timing.run_step(step, batch), repeats,
                                   warmup=False)
  return run_s, compile_s, out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--arch", default="sd15")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--precision_batch", type=int, default=16)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--out", default=None)
  a = p.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  from memjax.method import noise as noise_lib  # pylint: disable=g-import-not-at-top
  from memjax.runtime import distributed  # pylint: disable=g-import-not-at-top
  from memjax.stages import scan  # pylint: disable=g-import-not-at-top
  from memjax.testing import tiny  # pylint: disable=g-import-not-at-top

  # One draw of random weights: the float32 master, and its bfloat16 variant.
  sd32 = tiny.random_model(a.arch, "float32", components=("unet", "text_encoder"))
  sd = bench_models.variant(sd32, "bfloat16")
  mesh = distributed.local_mesh(1)
  noise = noise_lib.noise_for_seeds([0], sd.latent_shape_chw)
  ids = bench_models.random_ids(a.batch, 49000, seed=2)
  rows = {"device": mesh.devices.flat[0].device_kind, "arch": a.arch, "batch": a.batch}

  t, c, _ = _timed(scan.make_step(sd, noise, 7.5, a.batch, mesh), ids, a.repeats)
  rows["step"] = {"ms": t * 1e3, "compile_s": c, "prompts_per_s": a.batch / t}
  print(json.dumps(rows["step"]), flush=True)
  t, c, ctx = _timed(bench_models.text_step(sd, a.batch, mesh), ids, a.repeats)
  ctx = np.asarray(jax.device_get(ctx))  # the UNet steps' input, on the host
  rows["text"] = {"ms": t * 1e3, "compile_s": c}
  print(json.dumps(rows["text"]), flush=True)
  t, c, _ = _timed(bench_models.unet_step(sd, noise, a.batch, mesh), ctx, a.repeats)
  rows["unet"] = {"ms": t * 1e3, "compile_s": c}
  print(json.dumps(rows["unet"]), flush=True)
  # Leave attention out, whichever kernel memjax chose (XLA/cuDNN, or blocked on CPU):
  # a new step, traced, compiled and timed inside.
  with bench_models.attention_left_out():
    t, c, _ = _timed(bench_models.unet_step(sd, noise, a.batch, mesh), ctx, a.repeats)
  rows["unet_no_attention"] = {"ms": t * 1e3, "compile_s": c}
  print(json.dumps(rows["unet_no_attention"]), flush=True)
  # bf16 against fp32 DCS, same weights (fp32 master copy), noise and prompts.
  ids_p = bench_models.random_ids(a.precision_batch, 49000, seed=2)
  dcs = {}
  for name, model in (("bfloat16", sd), ("float32", sd32)):
    step = scan.make_step(model, noise, 7.5, a.precision_batch, mesh)
    dcs[name] = np.asarray(bench_timing.run_step(step, ids_p)["dcs"], np.float64)
    del step
  rel = np.abs(dcs["bfloat16"] - dcs["float32"]) / np.abs(dcs["float32"])
  rows["precision"] = {"batch": a.precision_batch, "max_rel_diff": float(rel.max()),
                       "mean_rel_diff": float(rel.mean())}
  print(json.dumps(rows["precision"]), flush=True)
  s, u, na, tx = (rows[k]["ms"] for k in ("step", "unet", "unet_no_attention", "text"))
  print(f"breakdown of the {s:.1f} ms step: text encoder {tx:.1f} ms ({tx / s:.0%}), UNet "
        f"{u:.1f} ms ({u / s:.0%}) of which attention {u - na:.1f} ms ({(u - na) / s:.0%}), "
        f"other UNet ops {na:.1f} ms ({na / s:.0%}), rest {s - u - tx:.1f} ms", flush=True)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
