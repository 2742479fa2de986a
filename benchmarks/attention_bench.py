"""Attention kernels on CPU: memjax's blocked kernel against XLA's and PyTorch's.

    python benchmarks/attention_bench.py --tile_kib=256,1024,4096

Times, in one run and on the same inputs, the attention shapes of the medium
benchmark UNet (32 x 32 latents: 1024 tokens, 8 heads of 8) and of SD1.5's first
block (4096 tokens, 8 heads of 40; --sd15): `jax.nn.dot_product_attention`'s XLA
path, memjax's "blocked" kernel at each tile size, and
`torch.nn.functional.scaled_dot_product_attention`. Ratios > 1: blocked faster.
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_timing  # pylint: disable=g-import-not-at-top  # benchmarks/bench_timing.py

# (name, batch, query tokens, key tokens, heads, head dim, causal)
SHAPES = [
    ("medium self 32x32", 8, 1024, 1024, 8, 8, False),
    ("medium cross 32x32", 8, 1024, 77, 8, 8, False),
    ("medium self 16x16", 8, 256, 256, 8, 16, False),
    ("text encoder", 8, 77, 77, 4, 64, True),
]
SD15 = [("sd15 self 64x64", 1, 4096, 4096, 8, 40, False),
        ("sd15 cross 64x64", 1, 4096, 77, 8, 40, False)]


def _median_ms(fn, repeats):
  return 1e3 * bench_timing.median_time(fn, repeats)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tile_kib", default="256,1024,4096")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--sd15", action="store_true", help="also SD1.5's 4096-token shapes")
  p.add_argument("--out", default=None, help="write rows as JSON here")
  args = p.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from memjax.models import attention  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  rows = []
  for name, b, lq, lk, h, d, causal in SHAPES + (SD15 if args.sd15 else []):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) for n in (lq, lk, lk))
    xla = jax.jit(lambda q, k, v, c=causal: jax.nn.dot_product_attention(
        q, k, v, is_causal=c, implementation="xla"))
    ref = np.asarray(xla(q, k, v))
    row = {"shape": name, "batch": b, "lq": lq, "lk": lk, "heads": h, "head_dim": d,
           "xla_ms": round(_median_ms(lambda: jax.block_until_ready(xla(q, k, v)),
                                      args.repeats), 2)}
    for kib in [int(t) for t in args.tile_kib.split(",")]:
      blocked = jax.jit(lambda q, k, v, c=causal, t=kib * 1024: attention.blocked_attention(
          q, k, v, c, tile_bytes=t))
      err = float(np.max(np.abs(np.asarray(blocked(q, k, v)) - ref)))
      row[f"blocked_{kib}k_ms"] = round(
          _median_ms(lambda: jax.block_until_ready(blocked(q, k, v)), args.repeats), 2)
      row[f"blocked_{kib}k_max_abs_diff"] = float(f"{err:.2e}")
    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2) for x in (q, k, v))
    with torch.no_grad():
      row["torch_ms"] = round(_median_ms(
          lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal),
          args.repeats), 2)
    rows.append(row)
    print(json.dumps(row), flush=True)
  meta = {"argv": sys.argv, "machine": platform.platform(), "cpus": os.cpu_count(),
          "jax": jax.__version__, "torch": torch.__version__,
          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  print(json.dumps(meta))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
