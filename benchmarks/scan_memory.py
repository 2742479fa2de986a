"""Host memory of `python -m memjax.scan` against the number of prompts.

    python benchmarks/scan_memory.py --rows=10000,100000

Writes a caption table of each size (parquet), scans it with the `micro` model
(the smallest valid UNet, so time goes to the pipeline, not the model) in a child
process, and reports the child's peak RSS (ru_maxrss), prompts/s (the rate of
WORKDIR/scan/manifest.json) and the number of rows scored. Flat peak RSS across
sizes = streaming works (nothing per prompt is held in memory).
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rows", default="10000,100000")
  p.add_argument("--batch_size", type=int, default=256)
  a = p.parse_args()
  tmp = tempfile.mkdtemp()
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  model = os.path.join(tmp, "micro")
  subprocess.run([sys.executable, "-m", "memjax.testing.tiny", model, "--style=micro"], env=env,
                 check=True, capture_output=True)
  words = "a red blue old new photo painting of the cat dog car house tree city night".split()
  rng = random.Random(0)
  rows = []
  for n in [int(x) for x in a.rows.split(",")]:
    path = os.path.join(tmp, f"captions_{n}.parquet")
    caps = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 25))) for _ in range(n)]
    pq.write_table(pa.table({"caption": caps, "row": list(range(n))}), path, row_group_size=50000)
    cmd = [sys.executable, "-c",
           "import resource, runpy, sys; sys.argv = ['memjax.scan'] + sys.argv[1:];"
           "\ntry:\n  runpy.run_module('memjax.scan', run_name='__main__')\n"
           "finally:\n  print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
           " file=sys.stderr)",
           f"--model={model}", f"--prompts={path}", f"--workdir={tmp}/w{n}",
           f"--batch_size={a.batch_size}", "--shard_size=8192", "--log_interval_s=60"]
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    rss = [l for l in r.stderr.splitlines() if l.startswith("MAXRSS_KB")]
    if r.returncode != 0:
      raise SystemExit(f"memjax.scan failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    with open(os.path.join(tmp, f"w{n}", "scan", "manifest.json")) as f:
      manifest = json.load(f)  # memjax.runtime.workdir.Manifest
    row = {"rows": n, "peak_rss_mb": round(int(rss[-1].split()[1]) / 1024, 1) if rss else None,
           "wall_s": round(wall, 1),
           "prompts_per_s": round(manifest["rate"] or 0.0, 1),
           "scored": manifest["counts"]["scored"]}
    rows.append(row)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
