"""The HTML report of a workdir: summary, metrics, plots and a gallery of the top K.

Reads what the stages left in the workdir (every part optional; the page lists
what is missing): the scan, the blackbox (one-step images), the regeneration, the
labels (with their templates) and, for the shipped testbed, the planted `kind`
and training image of each caption; every name comes from `runtime.workdir`.
Writes `WORKDIR/report/index.html` with every image copied beside it
(`WORKDIR/report/img/`), so the folder opens from disk with no server and no
network, and `WORKDIR/report/manifest.json`.

Rows of all stages are joined by the scan's prompt id (`scan_prompt_id` in the
stages fed by a scan). The metrics table and the pooled ROC plot score every
detector column the scan holds (`metrics.DETECTORS`), the edge score and the
generate stage's trajectory detectors (per prompt: the mean over its seeds,
`metrics.per_prompt_means`), against each label source; a column scored on a
subset of the labelled prompts (the regenerated top K) is marked so. The
gallery lists the top K by the whitebox score (`scores`, the DCS), or by
`edge_scores` when there is no scan.
"""
import dataclasses
import os
import shutil
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq

from memjax.data import images as images_lib
from memjax.data import templates as templates_lib
from memjax.runtime import checks
from memjax.runtime import distributed
from memjax.runtime import shards
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError
from memjax.stages import metrics as metrics_lib
from memjax.stages import report_html
from memjax.stages import report_plots

STAGE = "report"
POSITIVE = ("MV", "RV", "TV")
PLANTED_COLUMN = "kind"  # the testbed's ground truth of every caption
_SCAN_ID = metrics_lib.SCAN_ID
_SHOWN_STAGES = ("scan", "blackbox", "generate", "index", "verify")
# The scan's detector columns (metrics.DETECTORS but the blackbox's and generate's).
SCAN_DETECTORS = tuple(c for c in metrics_lib.DETECTORS
                       if c not in ("edge_scores",) + metrics_lib.GENERATE_DETECTORS)


@dataclasses.dataclass
class ReportConfig:
  """The report's settings (each one a flag of `python -m memjax.report`)."""
  workdir: str
  top_k: Optional[int] = None  # None: the scan's top_k (25 without a scan manifest)
  k_list: Sequence[int] = (5, 10, 25, 100)

  def __post_init__(self):
    checks.at_least(self, 1, "top_k")
    if not self.k_list or min(self.k_list) < 1:
      raise InputError(f"--k_list must be positive integers, got {list(self.k_list)}")


def _scan_key(table) -> str:
  return _SCAN_ID if _SCAN_ID in table.column_names else "prompt_id"


def _manifests(workdir: str) -> Dict[str, dict]:
  out = {}
  for stage in _SHOWN_STAGES:
    m = workdir_lib.read_manifest(workdir, stage)
    if m is not None:
      out[stage] = dataclasses.asdict(m)
  return out


def _load_scan(d: Dict, workdir: str) -> None:
  scan_dir = workdir_lib.stage_dir(workdir, "scan")
  d["scan"] = None
  if not shards.list_shards(scan_dir):
    d["missing"].append("whitebox scan (no scan/ shards): no DCS scores")
    return
  data = shards.open_shards(scan_dir)
  cols = [c for c in ("prompt_id", "caption", *SCAN_DETECTORS, PLANTED_COLUMN)
          if c in data.schema.names]
  d["scan"] = data.to_table(columns=cols).to_pydict()
  d["scan"].setdefault("caption", None)
  identity = (d["manifests"].get("scan") or {}).get("identity") or {}
  if PLANTED_COLUMN in data.schema.names and "image_path" in data.schema.names:
    # the testbed's own training image of each caption (relative to the table)
    base = os.path.dirname(identity.get("prompts") or "")
    d["scan"]["planted_image"] = [
        None if p is None else os.path.join(base, p)
        for p in data.to_table(columns=["image_path"])["image_path"].to_pylist()]
  if "scan" not in d["manifests"]:
    d["missing"].append("scan manifest (the scan did not finish: rerun it)")


def load(workdir: str) -> Dict:
  """Everything the report shows, by scan prompt id; `missing` lists absent stages."""
  if not os.path.isdir(workdir):
    raise InputError(f"--workdir={workdir} does not exist")
  d = {"workdir": workdir, "missing": [], "prompts": {}, "manifests": _manifests(workdir)}
  prompts = d["prompts"]  # scan id -> dict of what is known about the prompt

  def entry(pid):
    return prompts.setdefault(int(pid), {"id": int(pid), "onestep": [], "generated": []})

  _load_scan(d, workdir)
  bb_dir = workdir_lib.stage_dir(workdir, "blackbox")
  if shards.list_shards(bb_dir):
    table = shards.open_shards(bb_dir).to_table()
    key = _scan_key(table)
    for row in table.to_pylist():
      e = entry(row[key])
      e["edge_scores"] = row.get("edge_scores")
      e.setdefault("caption", row.get("caption"))
      e["onestep"] = [os.path.join(bb_dir, p) for p in row.get("image_paths") or [] if p]
    if "image_paths" not in table.column_names:
      d["missing"].append("one-step images (the blackbox ran without --save_images)")
  else:
    d["missing"].append("blackbox attack (no blackbox/ shards): no edge scores, no one-step "
                        "images")

  gen_dir = workdir_lib.stage_dir(workdir, "generate")
  gen_path = os.path.join(gen_dir, workdir_lib.GENERATED_TABLE)
  d["generated_scores"] = {}  # trajectory detector -> {scan id: mean over seeds}
  if os.path.isfile(gen_path):
    table = pq.read_table(gen_path)
    key = _scan_key(table)
    for row in table.to_pylist():
      if row.get("image_path"):
        entry(row[key])["generated"].append(os.path.join(gen_dir, row["image_path"]))
    if metrics_lib.is_per_seed(table.column_names):
      means = metrics_lib.per_prompt_means(table)
      for col in [c for c in metrics_lib.GENERATE_DETECTORS if c in means.column_names]:
        d["generated_scores"][col] = {int(i): float(v) for i, v in zip(
            means[key].to_pylist(), means[col].to_pylist()) if v is not None and v == v}
  else:
    d["missing"].append(f"regeneration (no generate/{workdir_lib.GENERATED_TABLE}): no "
                        "multi-step images")

  verify_dir = workdir_lib.stage_dir(workdir, "verify")
  d["verify_dir"], d["templates"] = None, {}
  if os.path.isfile(os.path.join(verify_dir, workdir_lib.VERIFY_TABLE)):
    d["verify_dir"] = verify_dir
    table = pq.read_table(os.path.join(verify_dir, workdir_lib.VERIFY_TABLE))
    key = _scan_key(table)
    for row in table.to_pylist():
      entry(row[key])["verify"] = row
    d["templates_table"] = os.path.join(verify_dir, workdir_lib.TEMPLATES,
                                        templates_lib.TABLE_NAME)
  else:
    d["missing"].append(f"ground-truth labels (no verify/{workdir_lib.VERIFY_TABLE}): no "
                        "labels, no matched training images, no precision/ROC against "
                        "verified labels")
  if d["scan"] is not None and PLANTED_COLUMN not in d["scan"]:
    d["missing"].append(f"planted labels (the prompt table has no '{PLANTED_COLUMN}' column; "
                        "only the shipped testbed has them)")
  return d


def label_sets(d: Dict) -> Dict[str, Dict]:
  """Label source -> {"ids": [N] scan ids, "labels": [N]} (planted and/or verified)."""
  out = {}
  scan = d["scan"]
  if scan is not None and PLANTED_COLUMN in scan:
    out["planted"] = {"ids": np.asarray(scan["prompt_id"]), "labels": list(scan[PLANTED_COLUMN])}
  verified = [(pid, p["verify"]["overfit_type"]) for pid, p in d["prompts"].items()
              if p.get("verify") and p["verify"].get("overfit_type")]
  if verified:
    out["verified"] = {"ids": np.array([i for i, _ in verified]),
                       "labels": [v for _, v in verified]}
  return out


def score_columns(d: Dict) -> Dict[str, Dict[int, float]]:
  """Score column -> {scan id: value} (NaN-free): every detector the scan holds,
  then the edge score, then the generate stage's (means over seeds)."""
  out = {}
  if d["scan"] is not None:
    for col in SCAN_DETECTORS:
      if col in d["scan"]:
        out[col] = {int(i): float(v) for i, v in zip(d["scan"]["prompt_id"], d["scan"][col])
                    if v is not None and v == v}
  edge = {pid: p["edge_scores"] for pid, p in d["prompts"].items()
          if p.get("edge_scores") is not None and p["edge_scores"] == p["edge_scores"]}
  if edge:
    out["edge_scores"] = edge
  out.update({c: v for c, v in d.get("generated_scores", {}).items() if v})
  return out


def compute_metrics(d: Dict, ks) -> Dict[str, Dict]:
  """memjax.metrics against each label source; a source that cannot be scored says why."""
  out = {}
  sources = []
  if d["scan"] is not None and PLANTED_COLUMN in d["scan"]:
    sources.append(("planted", workdir_lib.stage_dir(d["workdir"], "scan"), PLANTED_COLUMN))
  if d["verify_dir"]:
    sources.append(("verified", d["verify_dir"], "overfit_type"))
  for name, labels, column in sources:
    try:
      out[name] = metrics_lib.run(metrics_lib.MetricsConfig(
          scores=[d["workdir"]], labels=labels, label_column=column, positive=POSITIVE,
          k_list=ks))
    except InputError as e:
      out[name] = {"error": str(e)}
  return out


def top_rows(d: Dict, k: int) -> List[Dict]:
  """The top k prompts by DCS (or edge score without a scan), best first."""
  if d["scan"] is not None and "scores" in d["scan"]:
    ids, values = np.asarray(d["scan"]["prompt_id"]), d["scan"]["scores"]
    vals = np.array([np.nan if v is None else v for v in values], np.float64)
    ok = np.flatnonzero(np.isfinite(vals))
    order = ok[np.lexsort((ids[ok], -vals[ok]))][:k]  # ties by prompt id, as shards.top_k
    rows = []
    for i in order:
      pid = int(ids[i])
      row = dict(d["prompts"].get(pid, {"onestep": [], "generated": []}), id=pid)
      row.update(caption=d["scan"]["caption"][i] if d["scan"]["caption"] else row.get("caption"),
                 scores=float(vals[i]))
      for col in ("wen", PLANTED_COLUMN, "planted_image"):
        if col in d["scan"]:
          row[col] = d["scan"][col][i]
      rows.append(row)
    return rows
  rows = [p for p in d["prompts"].values() if p.get("edge_scores") is not None]
  return sorted(rows, key=lambda p: (-p["edge_scores"], p["id"]))[:k]


def _copy(src: str, out_dir: str, rel: str) -> Optional[str]:
  """Copies an image into the report (as PNG); returns its path relative to the page."""
  if not src or ("://" in src and not src.startswith("file://")):
    return None  # a remote training image: never fetched by the report
  dst = os.path.join(out_dir, rel)
  if src.lower().endswith(".png") and os.path.isfile(src):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(src, dst)
    return rel
  read = images_lib.read_image(src)
  if not read.usable:
    return None
  images_lib.write_png(dst, read.pixels)
  return rel


def _overlay(template, dst: str) -> None:
  """The template with its mask (the pixels TV compares) tinted red."""
  image = np.rint(template.image * 255.0)
  mask = template.mask.astype(np.float32)[..., None]
  red = np.array([255.0, 0.0, 0.0])
  out = image * (1 - 0.45 * mask) + red * 0.45 * mask
  images_lib.write_png(dst, np.clip(out, 0, 255).astype(np.uint8))


def _templates(d: Dict, group: str) -> Dict[str, object]:
  """template id -> Template of one retrieved group (read once per group)."""
  if group not in d["templates"]:
    table = d.get("templates_table")
    found = (templates_lib.load_templates(table, group)
             if table and os.path.isfile(table) else [])
    d["templates"][group] = {str(t.template_id): t for t in found}
  return d["templates"][group]


def gallery_images(d: Dict, row: Dict, out_dir: str) -> Dict[str, List]:
  """Copies one prompt's images into out_dir/img; returns {kind: [(rel, title)]}."""
  pid, imgs = row["id"], {"onestep": [], "generated": [], "training": [], "tv_mask": [],
                          "planted": []}
  img = workdir_lib.REPORT_IMAGES
  if row.get("planted_image") and row.get(PLANTED_COLUMN) in POSITIVE:
    rel = _copy(row["planted_image"], out_dir, f"{img}/planted/{pid}.png")
    imgs["planted"].append((rel, row["planted_image"]))
  for kind in ("onestep", "generated"):
    for n, src in enumerate(row.get(kind) or []):
      rel = _copy(src, out_dir, f"{img}/{kind}/{pid}_{n}.png")
      if rel:
        imgs[kind].append((rel, os.path.basename(src)))
      else:  # listed by a stage, gone from disk: said in the report, not hidden
        d.setdefault("absent_images", []).append(src)
  v = row.get("verify") or {}
  refs = v.get("retrieved_urls") or ([v["own_ref"]] if v.get("own_ref") else [])
  for n, ref in enumerate(refs[:4]):
    rel = _copy(ref, out_dir, f"{img}/training/{pid}_{n}.png")
    imgs["training"].append((rel, ref))
  if v.get("template_indices") and v.get("prompt_id") is not None:
    group = _templates(d, str(v["prompt_id"]))
    for n, tid in enumerate(v["template_indices"]):
      t = group.get(str(tid))
      if t is not None:
        rel = f"{img}/tv_mask/{pid}_{n}.png"
        _overlay(t, os.path.join(out_dir, rel))
        imgs["tv_mask"].append((rel, f"template {tid}, mask {t.mask_fraction:.0%}"))
  return imgs


def run(cfg: ReportConfig) -> workdir_lib.Manifest:
  """Writes WORKDIR/report/index.html; returns the report's manifest (its details:
  the page's path, what is missing, the gallery's ids, plots and metrics)."""
  t0 = time.perf_counter()
  d = load(cfg.workdir)
  out_dir = workdir_lib.stage_dir(cfg.workdir, STAGE)
  workdir_lib.remove(out_dir)  # every run rewrites it all: no stale images
  os.makedirs(os.path.join(out_dir, workdir_lib.REPORT_IMAGES))
  k = cfg.top_k or ((d["manifests"].get("scan") or {}).get("config") or {}).get("top_k") or 25
  rows = top_rows(d, k)
  for row in rows:
    row["images"] = gallery_images(d, row, out_dir)
  ks = sorted({int(x) for x in cfg.k_list})
  metric_reports = compute_metrics(d, ks)
  labels, scores = label_sets(d), score_columns(d)
  img = workdir_lib.REPORT_IMAGES
  plots = report_plots.write_all(os.path.join(out_dir, img), labels, scores, POSITIVE)
  if not labels:
    d["missing"].append("labels of any kind: no precision@K, ROC or label plots")
  absent = d.get("absent_images") or []
  if absent:
    d["missing"].append(f"{len(absent)} images the stages wrote are no longer on disk "
                        f"(e.g. {absent[0]}): not shown")
  page = report_html.render(d, rows, metric_reports, [f"{img}/{p}" for p in plots], ks)
  path = os.path.join(out_dir, workdir_lib.REPORT_PAGE)
  workdir_lib.write_text(path, page)
  return workdir_lib.write_manifest(cfg.workdir, workdir_lib.Manifest(
      stage=STAGE, config=dataclasses.asdict(cfg),
      counts={"gallery": len(rows), "plots": len(plots)},
      timings={"total_s": time.perf_counter() - t0},
      outputs={"page": workdir_lib.REPORT_PAGE, "images": img},
      runtime=distributed.runtime_info(),
      details={"path": path, "missing": d["missing"], "ids": [r["id"] for r in rows],
               "plots": plots, "metrics": metric_reports}))
