"""What computing the UNet's context-free prefix once per seed saves (unet_prefix).

    python benchmarks/prefix_bench.py --archs=sd1,medium,sd15 --batch=128 \\
        --time_arch=medium --time_batch=16

For each architecture (a `memjax.testing.tiny` style; sd15 is the full SD1.5 UNet
at 64 x 64 latents), XLA's FLOP count (`Compiled.cost_analysis()`, after dead code
elimination) of
  full:   the unsplit UNet forward of B prompts at one seed's z,
  prefix: `unet_prefix.prefix` of that one seed,
  rest:   `unet_prefix.rest` of the B prompts,
and the fraction of the per-prompt FLOPs saved, 1 - (prefix + rest) / full. Params
are abstract (`loading.abstract_params`, jax.ShapeDtypeStruct inputs): nothing is
allocated, so SD1.5 at B = 128 only compiles. The attention kernel is XLA's
(the blocked CPU kernel's loops are counted once by XLA, not once per trip).
Then, if asked, wall time on this machine's CPU of full vs prefix + rest with
random weights (memjax's default kernel), median of --repeats runs. Prints a
markdown table; --out writes the rows as JSON.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_T = 999


def _flops(lowered) -> float:
  cost = lowered.compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def _functions(unet):
  """jit-able (full(p, x, ctx), prefix(p, x), rest(p, state, ctx)) for one seed."""
  from memjax.models import unet_prefix  # pylint: disable=g-import-not-at-top
  return (lambda p, x, c: unet_prefix.full_forward(unet, p, x, _T, c),
          lambda p, x: unet_prefix.prefix(unet, p, x, _T),
          lambda p, s, c: unet_prefix.rest(unet, p, s, c))


def count_flops(arch: str, batch: int) -> dict:
  """The FLOP row of one architecture at `batch` prompts and one seed."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from memjax.models import loading  # pylint: disable=g-import-not-at-top
  from memjax.testing import tiny  # pylint: disable=g-import-not-at-top
  cfg = tiny.tiny_configs(arch)["unet"]
  unet = loading.build_module("unet", cfg, arch, attention="xla")
  params = loading.abstract_params("unet", unet, cfg)
  side, f32 = cfg["sample_size"], jnp.float32
  x = jax.ShapeDtypeStruct((1, side, side, cfg["in_channels"]), f32)
  ctx = jax.ShapeDtypeStruct((batch, 77, cfg["cross_attention_dim"]), f32)
  full, prefix, rest = _functions(unet)
  state = jax.eval_shape(prefix, params, x)
  t0 = time.perf_counter()
  row = {"arch": arch, "latents": f"{side}x{side}", "batch": batch,
         "full": _flops(jax.jit(full).lower(params, x, ctx)),
         "prefix": _flops(jax.jit(prefix).lower(params, x)),
         "rest": _flops(jax.jit(rest).lower(params, state, ctx))}
  row["compile_s"] = time.perf_counter() - t0
  row["saved"] = 1 - (row["prefix"] + row["rest"]) / row["full"]
  # Per prompt, what the prefix costs: the limit of the saving for large batches.
  row["prefix_share"] = row["prefix"] / (row["full"] / batch)
  return row


def time_cpu(arch: str, batch: int, repeats: int) -> dict:
  """Median wall seconds of full vs prefix + rest on the CPU, random weights."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from memjax.models import loading  # pylint: disable=g-import-not-at-top
  from memjax.testing import tiny  # pylint: disable=g-import-not-at-top
  cfg = tiny.tiny_configs(arch)["unet"]
  unet = loading.build_module("unet", cfg, arch)
  params = jax.device_put(tiny.random_params("unet", cfg, 0))
  rng = np.random.default_rng(0)
  side = cfg["sample_size"]
  x = jax.device_put(rng.standard_normal((1, side, side, cfg["in_channels"]), np.float32))
  ctx = jax.device_put(rng.standard_normal((batch, 77, cfg["cross_attention_dim"]),
                                           np.float32))
  full, prefix, rest = (jax.jit(f) for f in _functions(unet))

  def split():
    return rest(params, prefix(params, x), ctx)

  def median(fn):
    jax.block_until_ready(fn())  # compile
    runs = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      runs.append(time.perf_counter() - t0)
    return statistics.median(runs)

  a, b = full(params, x, ctx), split()
  err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(a))))
  t_full, t_split = median(lambda: full(params, x, ctx)), median(split)
  return {"arch": arch, "batch": batch, "full_s": t_full, "split_s": t_split,
          "speedup": t_full / t_split, "max_rel_err": err}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--archs", default="sd1,medium,sd15")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--time_arch", default="medium", help="'' skips the CPU timing")
  p.add_argument("--time_batch", type=int, default=16)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=None)
  a = p.parse_args()
  rows = [count_flops(arch, a.batch) for arch in a.archs.split(",") if arch]
  print(f"\nXLA FLOPs, one seed, B = {a.batch} prompts (compiled, dead code removed)\n")
  print("| arch | latents | full GFLOP/prompt | prefix GFLOP/seed | rest GFLOP/prompt "
        "| prefix share of a prompt | saved at B |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['arch']} | {r['latents']} | {r['full'] / r['batch'] / 1e9:.4g} | "
          f"{r['prefix'] / 1e9:.4g} | {r['rest'] / r['batch'] / 1e9:.4g} | "
          f"{r['prefix_share']:.2%} | {r['saved']:.2%} |")
  timing = None
  if a.time_arch:
    timing = time_cpu(a.time_arch, a.time_batch, a.repeats)
    print(f"\nCPU wall time ({os.cpu_count()} cores), {timing['arch']}, B = "
          f"{timing['batch']}, one seed\n")
    print("| full s | prefix + rest s | speedup | max rel. difference |")
    print("|---|---|---|---|")
    print(f"| {timing['full_s']:.3f} | {timing['split_s']:.3f} | {timing['speedup']:.3f}x | "
          f"{timing['max_rel_err']:.1e} |")
  if a.out:
    with open(a.out, "w") as f:
      json.dump({"flops": rows, "cpu_time": timing}, f, indent=1)


if __name__ == "__main__":
  main()
