"""Whitebox scan throughput: memjax against PyTorch, and on accelerators.

CPU mode (the ratio goes into benchmarks/RESULTS.md):

    python benchmarks/scan_bench.py --mode=cpu --models=tiny,medium --batch_sizes=1,8,32

builds tiny random SD folders with `memjax.testing.tiny`, and in one run times, per model
and batch size: the scan stage's own step (`memjax.stages.scan.make_step`, the
`BoundStep` `memjax.scan` runs, on one device; compile time separately), PyTorch
diffusers computing the same DCS the reference's way (CFG pair per prompt) and
PyTorch with the unconditional output computed once (memjax's formulation), on
the same folder and captions. The three are timed in turn within each repeat
(medians), so load from other processes falls on all of them alike.

Accelerator mode (full SD1.5 architecture, random weights, no folder needed):

    python benchmarks/scan_bench.py --mode=accelerator --batch_sizes=16,32,64,128

times the same stage step on a model from `memjax.testing.tiny.random_model`,
built with each attention kernel of --attention, and reports prompts/s, compile
time, peak device memory and MFU: nominal (1.63 TFLOP per prompt, the reference's
CFG pair) and executed (XLA's FLOP count of the compiled step, which has one UNet
forward per prompt) against --peak_tflops.
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

import bench_models  # pylint: disable=g-import-not-at-top  # benchmarks/bench_models.py
import bench_timing  # pylint: disable=g-import-not-at-top  # benchmarks/bench_timing.py

NOMINAL_TFLOP_PER_PROMPT = 1.63  # SD1.x, 64 x 64 latents, the CFG pair (flop_count.py measures 0.80 per UNet call)


def _kernel(name):
  """--attention's name of a kernel -> the `attention=` of the model (auto: None)."""
  return None if name == "auto" else name


def _stage_step(sd, batch, ids, seeds=1, guidance=7.5):
  """The scan stage's step on one device for `batch` prompts, compiled; returns
  (call(), compile_s, flops): call() runs it on `ids` and waits, call.first the
  DCS [batch, seeds] of the first call."""
  from memjax.method import noise as noise_lib  # pylint: disable=g-import-not-at-top
  from memjax.runtime import distributed  # pylint: disable=g-import-not-at-top
  from memjax.stages import scan  # pylint: disable=g-import-not-at-top
  noise = noise_lib.noise_for_seeds(range(seeds), sd.latent_shape_chw)
  step = scan.make_step(sd, noise, guidance, batch, distributed.local_mesh(1))
  _, compile_s, flops = bench_timing.compile_step(step)

  def call():
    return bench_timing.run_step(step, ids)

  call.first = np.asarray(call()["dcs"], np.float64)
  call.step = step
  return call, compile_s, flops


def cpu_mode(args):
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from memjax.testing import tiny  # pylint: disable=g-import-not-at-top
  from memjax.models import loading  # pylint: disable=g-import-not-at-top
  from memjax.testing.torch_reference import TorchWhitebox  # pylint: disable=g-import-not-at-top
  if ";" in args.attention or ":" in args.attention:
    raise SystemExit("--mode=cpu takes one kernel in --attention (auto, xla, blocked)")
  torch.set_num_threads(os.cpu_count())
  rows = []
  for name in args.models.split(","):
    style = {"tiny": "sd1", "medium": "medium"}[name]
    folder = tiny.build_tiny_model(os.path.join(tempfile.mkdtemp(), name), style, num_merges=2000)
    sd = loading.load_stable_diffusion(folder, "float32", ("unet", "text_encoder"),
                                       attention=_kernel(args.attention))
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(sd.params["unet"]))
    ref = TorchWhitebox(folder)
    c, h, w = sd.latent_shape_chw
    z = np.random.default_rng(0).standard_normal((1, c, h, w)).astype(np.float32)
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
      prompts = ["a photo of a cat"] * batch
      step, compile_s, _ = _stage_step(sd, batch, bench_models.token_ids(sd, prompts))
      x = torch.from_numpy(z * (1 - ref.abar) ** 0.5)

      def torch_once():  # memjax's formulation in PyTorch: e_u precomputed
        ctx = ref.embed(prompts)
        return ref.eps(x.expand(batch, -1, -1, -1), ctx)
      t_jax, t_ref, t_once = bench_timing.median_seconds(
          [step, lambda: ref.score(prompts, z), torch_once], args.repeats)
      rows.append({"model": name, "unet_params_M": round(n_params / 1e6, 2),
                   "latents": f"{h}x{w}", "batch": batch, "compile_s": round(compile_s, 2),
                   "memjax_prompts_per_s": round(batch / t_jax, 1),
                   "torch_cfg_pair_prompts_per_s": round(batch / t_ref, 1),
                   "torch_uncond_once_prompts_per_s": round(batch / t_once, 1),
                   "ratio_vs_torch_cfg_pair": round(t_ref / t_jax, 2),
                   "ratio_vs_torch_same_formulation": round(t_once / t_jax, 2)})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def accelerator_mode(args):
  import jax  # pylint: disable=g-import-not-at-top
  from memjax.testing import tiny  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  base = tiny.random_model(args.arch, args.dtype, components=("unet", "text_encoder"))
  print(f"random params built in {time.perf_counter() - t0:.1f} s", flush=True)
  n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(base.params["unet"]))
  dev = jax.local_devices()[0]  # the stage step runs on local_mesh(1): this device
  print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"UNet params {n_params / 1e6:.1f}M, dtype {args.dtype}", flush=True)
  rows, first = [], {}
  for spec in args.attention.split(";"):  # "auto" or "auto:16,64" (batch sizes of its own)
    impl, _, sizes = spec.partition(":")
    sd = bench_models.variant(base, attention=_kernel(impl))  # the kernel is a module field
    for batch in [int(b) for b in (sizes or args.batch_sizes).split(",")]:
      try:
        step, compile_s, flops = _stage_step(sd, batch, bench_models.random_ids(batch))
        t = bench_timing.median_time(step, args.repeats)
      except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory
        print(f"attention={impl} batch={batch}: failed: {str(e)[:300]}", flush=True)
        continue
      rate = batch / t
      stats = dev.memory_stats() or {}
      first.setdefault(batch, {})[impl] = step.first
      row = {"attention": impl, "batch": batch, "compile_s": round(compile_s, 1),
             "step_ms": round(t * 1e3, 2), "prompts_per_s": round(rate, 1),
             "mfu_nominal": round(rate * NOMINAL_TFLOP_PER_PROMPT / args.peak_tflops, 3),
             "executed_tflop_per_prompt": round(flops / batch / 1e12, 3),
             "mfu_executed": round(rate * flops / batch / 1e12 / args.peak_tflops, 3),
             "peak_mem_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)}
      rows.append(row)
      print(json.dumps(row), flush=True)
      del step  # its device copy of the params
  for batch, by_impl in first.items():  # the kernels must agree on the scores
    names = sorted(by_impl)
    for other in names[1:]:
      a, b = by_impl[names[0]], by_impl[other]
      print(f"batch {batch}: DCS {names[0]} vs {other}: max rel diff "
            f"{np.max(np.abs(a - b) / np.abs(b)):.2e}", flush=True)
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mode", choices=["cpu", "accelerator"], default="cpu")
  p.add_argument("--models", default="tiny,medium")
  p.add_argument("--arch", default="sd15", help="accelerator mode: tiny.tiny_configs style")
  p.add_argument("--batch_sizes", default="1,8,32")
  p.add_argument("--dtype", default="bfloat16", help="accelerator mode: float32 or bfloat16")
  p.add_argument("--attention", default="auto",
                 help="accelerator mode: ';'-separated kernels (auto, xla, cudnn, blocked), "
                      "each optionally with its own batch sizes: 'auto:64,128;xla:64'; "
                      "cpu mode: one kernel (auto = memjax's choice, blocked on CPU)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--peak_tflops", type=float, default=989.0,
                 help="dense bf16 peak of the device (H100/H200 SXM datasheet: 989)")
  p.add_argument("--out", default=None, help="write rows as JSON here")
  args = p.parse_args()
  rows = cpu_mode(args) if args.mode == "cpu" else accelerator_mode(args)
  meta = {"mode": args.mode, "argv": sys.argv, "machine": platform.platform(),
          "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(json.dumps(meta))


if __name__ == "__main__":
  main()
