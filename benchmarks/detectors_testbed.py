"""Every detector on a testbed model, per planted kind.

    python benchmarks/detectors_testbed.py [--seeds=0,1,2,3] [--protocol=authors|shared]
      [--testbed=DIR] [--edge] [--edge_guidance=7.5,1] [--labels=WORKDIR] [--out=table.json]

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

`--testbed`: a `memjax.train` workdir (model/, eval_prompts.parquet) in place of
the bundled testbed. `--edge`: also `memjax.blackbox` (the stage's own run) over
every evaluation caption with the same seeds, its edge score a column like the
others (`--edge_guidance`: one column per guidance scale of the one-step samples,
`edge_scores` at 7.5, `edge_scores_w<w>` at another). Where eval_prompts.parquet
has a `tone` column (testbed 2), MV is also split into MV_dark and MV_bright.
`--labels`: an extract workdir on the same captions; its verify labels against
the planted kinds (a planted MV, TV or RV caption should be labelled so; a
unique or held-out one N): per label, precision
(labelled X and planted X / labelled X) and recall (labelled X / planted X among
the verified captions).
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


def _metrics(labels, scores, kinds, ks):
  from memjax.method import detection  # pylint: disable=g-import-not-at-top
  m = detection.detection_metrics(labels, scores, kinds, ks)
  return {group: {"auc": r["auc"], "tpr1_below": r["tpr_at_1pct_fpr"],
                  "tpr1_closest": r["tpr_at_1pct_fpr_closest"], "tpr01": r["tpr_at_01pct_fpr"],
                  "p_at_k": r["precision_at_k"].get(r["n_pos"])}
          for group, r in m.items()}


def labeller(workdir, eval_table) -> dict:
  """Verify labels of an extract workdir against the planted kinds (joined by caption)."""
  from memjax.runtime import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  planted = {c: (k if k in KINDS else "N") for c, k in
             zip(eval_table["caption"].to_pylist(), eval_table["kind"].to_pylist())}
  v = pq.read_table(os.path.join(workdir_lib.stage_dir(workdir, "verify"),
                                 workdir_lib.VERIFY_TABLE), columns=["caption", "overfit_type"])
  pairs = [(planted[c], label) for c, label in zip(v["caption"].to_pylist(),
                                                    v["overfit_type"].to_pylist())
           if label is not None]
  out = {"verified": len(pairs), "confusion": {}}
  for truth, label in pairs:
    out["confusion"][f"{truth}->{label}"] = out["confusion"].get(f"{truth}->{label}", 0) + 1
  for kind in KINDS + ("N",):
    labelled = sum(label == kind for _, label in pairs)
    true = sum(t == kind for t, _ in pairs)
    hit = sum(t == kind == label for t, label in pairs)
    out[kind] = {"labelled": labelled, "planted": true,
                 "precision": hit / labelled if labelled else None,
                 "recall": hit / true if true else None}
  return out


def run(seeds, workdir, protocol="authors", testbed=TESTBED, edge=False, edge_guidance=(7.5,)):
  from memjax.runtime import shards  # pylint: disable=g-import-not-at-top
  from memjax.runtime import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from memjax.stages import metrics  # pylint: disable=g-import-not-at-top
  from memjax.stages import scan  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  manifest = scan.run(scan.ScanConfig(
      model=os.path.join(testbed, "model"), prompts=os.path.join(testbed, "eval_prompts.parquet"),
      workdir=workdir, seeds=tuple(seeds), batch_size=64, detectors=("all",),
      ren_layer="down_blocks.0.attentions.0", detector_protocol=protocol, log_interval_s=3600,
      overwrite=True))
  table = shards.open_shards(workdir_lib.stage_dir(workdir, "scan")).to_table()
  table = table.sort_by("prompt_id")
  ev = pq.read_table(os.path.join(testbed, "eval_prompts.parquet"))
  kinds = np.array(ev["kind"].to_pylist(), object)
  keep = np.isin(kinds, KINDS + ("heldout",))
  labels = np.where(kinds == "heldout", "N", kinds)[keep]
  tones = (np.array(ev["tone"].to_pylist(), object)[keep] if "tone" in ev.column_names
           else None)
  columns = {c: np.array(table[c].to_pylist(), np.float64)[keep]
             for c in metrics.DETECTORS if c in table.column_names}
  if edge:
    from memjax.stages import blackbox  # pylint: disable=g-import-not-at-top
    t1 = time.perf_counter()
    for w in edge_guidance:  # edge_scores at 7.5, edge_scores_w<w> at any other scale
      blackbox.run(blackbox.BlackboxConfig(
          workdir=workdir, model=os.path.join(testbed, "model"),
          prompts=os.path.join(testbed, "eval_prompts.parquet"), seeds=tuple(seeds),
          batch_size=64, log_interval_s=3600, overwrite=True, guidance_scale=w))
      bb = shards.open_shards(workdir_lib.stage_dir(workdir, "blackbox")).to_table()
      bb = bb.sort_by("prompt_id")
      name = "edge_scores" if w == 7.5 else f"edge_scores_w{w:g}"
      columns[name] = np.array(bb["edge_scores"].to_pylist(), np.float64)[keep]
    edge_s = round(time.perf_counter() - t1, 1)
  out = {"seeds": list(seeds), "protocol": manifest.details["detector_noise"], "n": {k: int((labels == k).sum()) for k in KINDS + ("N",)},
         "scan_s": round(time.perf_counter() - t0, 1),
         "scan_rate_prompts_per_s": manifest.rate, "detectors": {}}
  if edge:
    out["blackbox_s"] = edge_s
  ks = sorted({int((labels == k).sum()) for k in KINDS})
  if tones is not None:  # MV split by background tone
    toned = np.array([f"MV_{t}" if k == "MV" else k for k, t in zip(labels, tones)], object)
    tone_kinds = tuple(sorted(set(toned) - set(KINDS) - {"N"}))
    out["n"].update({k: int((toned == k).sum()) for k in tone_kinds})
  for column, scores in columns.items():
    out["detectors"][column] = _metrics(labels, scores, KINDS, ks)
    if tones is not None:  # each tone against the held-out captions only
      mv_or_n = np.isin(labels, ("MV", "N"))
      split = _metrics(toned[mv_or_n], scores[mv_or_n], tone_kinds,
                       sorted({int((toned == k).sum()) for k in tone_kinds}))
      out["detectors"][column].update({k: split[k] for k in tone_kinds})
  return out


def markdown(result) -> str:
  """One row per detector: per group AUC / TPR@1% below / closest / TPR@0.1% / P@K."""
  groups = ("MV", "TV", "RV", "pooled") + tuple(
      g for g in ("MV_dark", "MV_bright") if g in result["n"])
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
  parser.add_argument("--testbed", default=TESTBED)
  parser.add_argument("--edge", action="store_true")
  parser.add_argument("--edge_guidance", default="7.5",
                      help="guidance scales of the blackbox's one-step samples, comma-separated")
  parser.add_argument("--labels", default=None)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  result = run([int(s) for s in args.seeds.split(",")], tempfile.mkdtemp(), args.protocol,
               args.testbed, args.edge, [float(w) for w in args.edge_guidance.split(",")])
  if args.labels:
    result["labeller"] = labeller(args.labels, pq.read_table(
        os.path.join(args.testbed, "eval_prompts.parquet")))
  print(json.dumps(result, indent=1))
  print("cells: AUC / TPR@1%FPR (below) / TPR@1%FPR (closest) / TPR@0.1%FPR / P@K")
  print(markdown(result))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
