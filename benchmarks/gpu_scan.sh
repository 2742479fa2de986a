#!/usr/bin/env bash
# One prepared accelerator run (issue: scan at the speed of the hardware).
# Usage on the GPU machine, from the repo root: OUT=/some/dir bash benchmarks/gpu_scan.sh
# 1. scan_bench accelerator mode: the scan stage's own step (stages/scan.make_step) on
#    the full SD1.5 architecture, random bf16 weights (testing/tiny.random_model),
#    built with cuDNN-or-XLA attention ("auto") and with XLA attention, prompts/s and MFU.
# 2. End to end: a full-size SD1.5-architecture folder written by memjax.testing.tiny,
#    then `python -m memjax.scan` on 12,800 captions in bf16 (real tokenizer,
#    prefetch thread, shards, manifest).
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
timeout 330 python3 benchmarks/scan_bench.py --mode=accelerator --arch=sd15 --dtype=bfloat16 \
  --attention="auto:64,128;xla:64" --repeats=10 --out="$OUT/sd15_bench.json" 2>&1 \
  | grep -v "^WARNING\|^I0000\|^W0000" | tee "$OUT/bench.log"
python3 - <<'PY'
import random
random.seed(0)
words = "a red blue old new photo painting of the cat dog car house tree city night sea".split()
with open("/tmp/captions.txt", "w") as f:
  for i in range(12800):
    f.write(" ".join(random.choice(words) for _ in range(random.randint(3, 30))) + f" {i}\n")
PY
timeout 240 bash -c 'python3 -m memjax.testing.tiny /tmp/sd15 --style=sd15 && python3 -m memjax.scan \
  --model=/tmp/sd15 --prompts=/tmp/captions.txt --workdir=/tmp/scan_sd15 --dtype=bfloat16 \
  --batch_size=128 --shard_size=2560 --log_interval_s=10 --alsologtostderr' 2>&1 \
  | grep -v "^WARNING\|^W0000" | tail -25 | tee "$OUT/e2e.log"
cp /tmp/scan_sd15/scan/manifest.json "$OUT/e2e_manifest.json" 2>/dev/null
echo "=== summary ==="; cat "$OUT/bench.log" | grep -E "prompts_per_s|DCS|device"
python3 -c "import json; m=json.load(open('$OUT/e2e_manifest.json')); print('e2e', m['timings'], m['counts']['scored'], m['rate'], m['rate_unit'])" 2>&1
