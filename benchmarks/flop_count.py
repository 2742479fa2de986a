"""FLOPs of the whitebox step by part, as XLA counts them (no device, no weights).

    python benchmarks/flop_count.py --arch=sd15

Lowers, with abstract float32 params of the chosen architecture and batch 1, the
score step (text encoder + one UNet forward + DCS statistics), the text encoder
alone, the UNet alone and the UNet with every attention call left out, and prints
XLA's FLOP count of each (`Lowered.cost_analysis()`; the count does not depend on
the device). The attention share is the difference of the two UNet counts. With
the measured step time on an accelerator this says how far each part is from peak
only under the assumption that all parts run equally well; gpu_profile.py times
them.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--arch", default="sd15")
  p.add_argument("--out", default=None)
  a = p.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from memjax.method import whitebox  # pylint: disable=g-import-not-at-top
  from memjax.method.schedule import Schedule  # pylint: disable=g-import-not-at-top
  from memjax.models import loading  # pylint: disable=g-import-not-at-top
  from memjax.testing import tiny  # pylint: disable=g-import-not-at-top

  cfgs = tiny.tiny_configs(a.arch)
  schedule = Schedule.from_config(cfgs["scheduler"])
  # The XLA kernel: its dot_general FLOPs are what the GPU paths compute too.
  mods = {n: loading.build_module(n, cfgs[n], n, attention="xla")
          for n in ("unet", "text_encoder")}
  prm = {n: loading.abstract_params(n, mods[n], cfgs[n]) for n in mods}
  size, ch = cfgs["unet"]["sample_size"], cfgs["unet"]["in_channels"]
  f32 = jnp.float32
  ids = jax.ShapeDtypeStruct((1, 77), jnp.int32)
  noise = jax.ShapeDtypeStruct((1, size, size, ch), f32)
  x = jax.ShapeDtypeStruct((1, size, size, ch), f32)
  ctx = jax.ShapeDtypeStruct((1, 77, cfgs["unet"]["cross_attention_dim"]), f32)
  t = jnp.full((1,), schedule.last_timestep, jnp.int32)

  def flops(fn, *args):
    cost = jax.jit(fn).lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])

  # The scan's pure score function with the modules the stage builds (counting
  # needs no weights: the engine's bound step would need real ones, 4 GB at SD1.5).
  text = lambda p, i: mods["text_encoder"].apply({"params": p}, i)
  unet_out = lambda p, xx, tt, cc: mods["unet"].apply({"params": p}, xx, tt, cc)
  score = whitebox.make_score_fn(text, unet_out, schedule, 7.5, schedule.last_timestep)
  unet = lambda up, xx, cc: mods["unet"].apply({"params": up}, xx, t, cc)
  rows = {"arch": a.arch, "latents": f"{size}x{size}",
          "step": flops(score, prm["text_encoder"], prm["unet"], ids, noise, noise),
          "text_encoder": flops(lambda tp, i: mods["text_encoder"].apply({"params": tp}, i),
                                prm["text_encoder"], ids),
          "unet": flops(unet, prm["unet"], x, ctx)}
  real = jax.nn.dot_product_attention
  jax.nn.dot_product_attention = lambda q, k, v, **kw: q  # leave attention out
  try:
    rows["unet_no_attention"] = flops(  # a new function: jit's trace cache is per function
        lambda up, xx, cc: mods["unet"].apply({"params": up}, xx, t, cc), prm["unet"], x, ctx)
  finally:
    jax.nn.dot_product_attention = real
  rows["attention"] = rows["unet"] - rows["unet_no_attention"]
  for k in ("step", "text_encoder", "unet", "unet_no_attention", "attention"):
    print(f"{k:18s} {rows[k] / 1e9:10.1f} GFLOP per prompt ({rows[k] / rows['step']:.1%} of the step)")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
