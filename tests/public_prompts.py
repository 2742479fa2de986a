"""The public prompt lists in tests/data (their sources: tests/data/README.md), as captions.

A plain module (no pytest, no jax flags), so benchmarks read the same captions as the tests.
"""
import json
import os

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def read_captions():
  """Every caption of the three lists: SD1 and SD2 memorized (jsonl), SD1 non-memorized."""
  captions = []
  for name in ("sdv1_500_memorized.jsonl", "sd2_memorized.jsonl"):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
      captions += [json.loads(line)["caption"] for line in f if line.strip()]
  with open(os.path.join(DATA, "sd1_nonmemorized.txt"), encoding="utf-8") as f:
    captions += [line.rstrip("\n") for line in f if line.strip()]
  return captions
