"""Where the whitebox step's time goes on an accelerator, by leaving parts out.

    python benchmarks/gpu_profile.py --arch=sd15 --batch=128

No hardware counters are needed (the method: time variants that leave one stage
out and take differences). Variants, each jitted and timed (median of --repeats
after a warm-up), on random weights of the chosen architecture:

- step: text encoder on B prompts + UNet on B latents + the DCS statistics
  (what `memjax.scan` runs);
- text: the text encoder alone;
- unet: the UNet alone on a given context;
- unet_no_attention: the UNet with every attention call replaced by its query
  (so the difference to `unet` is the attention kernels' time);
- precision: DCS in bfloat16 against float32 on the same weights, noise and
  prompts (batch --precision_batch), max and mean relative difference.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_timing  # pylint: disable=g-import-not-at-top  # benchmarks/bench_timing.py


def _timed(fn, args, repeats):
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  out = jax.block_until_ready(compiled(*args))  # the warm-up call, whose output is kept
  run_s = bench_timing.median_time(lambda: jax.block_until_ready(compiled(*args)), repeats,
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
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from memjax.testing import tiny  # pylint: disable=g-import-not-at-top
  from memjax.method import whitebox
  from memjax.models import attention  # pylint: disable=g-import-not-at-top
  from memjax.models import loading  # pylint: disable=g-import-not-at-top
  from memjax.method.schedule import Schedule  # pylint: disable=g-import-not-at-top

  cfgs = tiny.tiny_configs(a.arch)
  schedule = Schedule.from_config(cfgs["scheduler"])
  host = {n: tiny.random_params(n, cfgs[n]) for n in ("unet", "text_encoder")}
  size, ch = cfgs["unet"]["sample_size"], cfgs["unet"]["in_channels"]
  rows = {"device": jax.devices()[0].device_kind, "arch": a.arch, "batch": a.batch}

  def setup(dtype, batch):
    mods = {n: loading.build_module(n, cfgs[n], n, dtype) for n in host}
    prm = {n: jax.device_put(jax.tree.map(lambda x: np.asarray(x, dtype), host[n])) for n in host}
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 49000, (batch, 77)), jnp.int32)
    noise = jnp.asarray(np.random.default_rng(1).standard_normal((1, size, size, ch)), jnp.float32)
    e_u = jax.jit(whitebox.make_uncond_fn(mods["text_encoder"].apply, mods["unet"].apply,
                                          schedule, 999))(prm["text_encoder"], prm["unet"],
                                                          ids[:1], noise)
    return mods, prm, ids, noise, e_u

  mods, prm, ids, noise, e_u = setup(jnp.bfloat16, a.batch)
  score = whitebox.make_score_fn(mods["text_encoder"].apply, mods["unet"].apply, schedule, 7.5, 999)
  t, c, _ = _timed(score, (prm["text_encoder"], prm["unet"], ids, noise, e_u), a.repeats)
  rows["step"] = {"ms": t * 1e3, "compile_s": c, "prompts_per_s": a.batch / t}
  print(json.dumps(rows["step"]), flush=True)
  text = lambda tp, i: mods["text_encoder"].apply({"params": tp}, i)
  t, c, ctx = _timed(text, (prm["text_encoder"], ids), a.repeats)
  rows["text"] = {"ms": t * 1e3, "compile_s": c}
  print(json.dumps(rows["text"]), flush=True)
  x = jnp.broadcast_to(noise.astype(jnp.bfloat16), (a.batch, size, size, ch))
  tt = jnp.full((a.batch,), 999, jnp.int32)
  unet = lambda up, xx, cc: mods["unet"].apply({"params": up}, xx, tt, cc)
  t, c, _ = _timed(unet, (prm["unet"], x, ctx), a.repeats)
  rows["unet"] = {"ms": t * 1e3, "compile_s": c}
  print(json.dumps(rows["unet"]), flush=True)
  real = jax.nn.dot_product_attention, attention.blocked_attention
  # Leave attention out, whichever kernel memjax chose (XLA/cuDNN, or blocked on CPU).
  jax.nn.dot_product_attention = lambda q, k, v, **kw: q
  attention.blocked_attention = lambda q, k, v, *args, **kw: q.astype(jnp.float32)
  try:
    t, c, _ = _timed(lambda up, xx, cc: mods["unet"].apply({"params": up}, xx, tt, cc),
                     (prm["unet"], x, ctx), a.repeats)
  finally:
    jax.nn.dot_product_attention, attention.blocked_attention = real
  rows["unet_no_attention"] = {"ms": t * 1e3, "compile_s": c}
  print(json.dumps(rows["unet_no_attention"]), flush=True)
  # bf16 against fp32 DCS, same weights (fp32 master copy), noise and prompts.
  dcs = {}
  for name, dtype in (("bfloat16", jnp.bfloat16), ("float32", jnp.float32)):
    mods_p, prm_p, ids_p, noise_p, e_u_p = setup(dtype, a.precision_batch)
    fn = whitebox.make_score_fn(mods_p["text_encoder"].apply, mods_p["unet"].apply, schedule,
                                7.5, 999)
    dcs[name] = np.asarray(jax.jit(fn)(prm_p["text_encoder"], prm_p["unet"], ids_p, noise_p,
                                       e_u_p)["dcs"], np.float64)
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
