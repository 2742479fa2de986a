"""Every detector on the bundled testbed model, per planted kind.

    python benchmarks/detectors_testbed.py [--seeds=0,1,2,3] [--protocol=authors|shared]
      [--out=table.json]

Runs `memjax.scan` (the stage's own run) with `--detectors=all` over every
evaluation caption of `memjax/assets/testbed/eval_prompts.parquet` with the
seeds of configs/demo.flags and the detectors' noise protocol (`--protocol`: the
authors' own noises and generations, or every seed's shared z), then, for each score column, the detection
metrics of `memjax.method.detection` of each planted kind (MV, TV, RV) and of
all of them pooled against the held-out captions (never trained on; the
testbed's unique training captions are left out): AUC, TPR at 1% FPR in both
conventions (largest FPR below, closest), TPR at 0.1% FPR, precision@K (K = the
number of positives of the kind). The bundled UNet has one cross-attention layer
(`down_blocks.0.attentions.0`, 8 x 8 latents), which ren_le reads in place of SD's
`down_blocks.1.attentions.1`.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

TESTBED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "memjax", "assets",
                       "testbed")
KINDS = ("MV", "TV", "RV")


def run(seeds, workdir, protocol="authors"):
  from memjax.method import detection  # pylint: disable=g-import-not-at-top
  from memjax.runtime import shards  # pylint: disable=g-import-not-at-top
  from memjax.runtime import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from memjax.stages import metrics  # pylint: disable=g-import-not-at-top
  from memjax.stages import scan  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  manifest = scan.run(scan.ScanConfig(
      model=os.path.join(TESTBED, "model"), prompts=os.path.join(TESTBED, "eval_prompts.parquet"),
      workdir=workdir, seeds=tuple(seeds), batch_size=64, detectors=("all",),
      ren_layer="down_blocks.0.attentions.0", detector_protocol=protocol, log_interval_s=3600,
      overwrite=True))
  table = shards.open_shards(workdir_lib.stage_dir(workdir, "scan")).to_table()
  table = table.sort_by("prompt_id")
  kinds = np.array(pq.read_table(os.path.join(TESTBED, "eval_prompts.parquet"),
                                 columns=["kind"]).column(0).to_pylist(), object)
  keep = np.isin(kinds, KINDS + ("heldout",))
  labels = np.where(kinds == "heldout", "N", kinds)[keep]
  out = {"seeds": list(seeds), "protocol": manifest.details["detector_noise"], "n": {k: int((labels == k).sum()) for k in KINDS + ("N",)},
         "scan_s": round(time.perf_counter() - t0, 1),
         "scan_rate_prompts_per_s": manifest.rate, "detectors": {}}
  for column in [c for c in metrics.DETECTORS if c in table.column_names]:
    scores = np.array(table[column].to_pylist(), np.float64)[keep]
    ks = sorted({int((labels == k).sum()) for k in KINDS})
    m = detection.detection_metrics(labels, scores, KINDS, ks)
    out["detectors"][column] = {
        group: {"auc": r["auc"], "tpr1_below": r["tpr_at_1pct_fpr"],
                "tpr1_closest": r["tpr_at_1pct_fpr_closest"], "tpr01": r["tpr_at_01pct_fpr"],
                "p_at_k": r["precision_at_k"].get(r["n_pos"])}
        for group, r in m.items()}
  return out


def markdown(result) -> str:
  """One row per detector: per group AUC / TPR@1% below / closest / TPR@0.1% / P@K."""
  groups = ("MV", "TV", "RV", "pooled")
  head = "| detector | " + " | ".join(groups) + " |\n|---|" + "---|" * len(groups)
  rows = []
  for column, by_group in result["detectors"].items():
    cells = []
    for g in groups:
      r = by_group[g]
      cells.append(" / ".join("-" if r[k] is None else f"{r[k]:.3f}" for k in
                              ("auc", "tpr1_below", "tpr1_closest", "tpr01", "p_at_k")))
    rows.append(f"| {column} | " + " | ".join(cells) + " |")
  return head + "\n" + "\n".join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", default="0,1,2,3")
  parser.add_argument("--protocol", default="authors", choices=("authors", "shared"))
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  result = run([int(s) for s in args.seeds.split(",")], tempfile.mkdtemp(), args.protocol)
  print(json.dumps(result, indent=1))
  print("cells: AUC / TPR@1%FPR (below) / TPR@1%FPR (closest) / TPR@0.1%FPR / P@K")
  print(markdown(result))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
