"""The HTML report of a workdir: summary, metrics, plots and a gallery of the top K.

    python -m memjax.report --workdir=DIR [--report_top_k=K]

Reads what the stages left in DIR (every part optional; the page lists what is
missing): the scan (`scan/`, `manifest.json`), the blackbox (`blackbox/` with
`image_paths`, `images/`), the regeneration (`generated.parquet`, `generated/`),
the labels (`verify/verify.parquet` or `verify.parquet`, with `templates/`) and,
for the shipped testbed, the planted `kind` and training image of each caption. Writes
`DIR/report/index.html` with every image copied beside it (`DIR/report/img/`),
so the folder opens from disk with no server and no network.

Rows of all stages are joined by the scan's prompt id (`scan_prompt_id` in the
stages fed by a scan). The gallery lists the top K by the whitebox score
(`scores`, the DCS), or by `edge_scores` when there is no scan.
"""
import dataclasses
import os
import shutil
import time
from typing import Dict, List, Optional

from absl import flags
import numpy as np
import pyarrow.parquet as pq

from memjax import cli
from memjax.stages import metrics as metrics_lib
from memjax.stages import report_html
from memjax.stages import report_plots
from memjax.runtime import results
from memjax.runtime.errors import InputError

POSITIVE = ("MV", "RV", "TV")
PLANTED_COLUMN = "kind"  # the testbed's ground truth of every caption
_SCAN_ID = metrics_lib.SCAN_ID


@dataclasses.dataclass
class ReportConfig:
  workdir: str
  top_k: Optional[int] = None  # None: the scan's top_k (25 without a scan manifest)
  k_list: tuple = (5, 10, 25, 100)


def _read_json(path: str) -> Optional[dict]:
  return results.read_json(path) if os.path.isfile(path) else None


def _scan_key(table) -> str:
  return _SCAN_ID if _SCAN_ID in table.column_names else "prompt_id"


def _find_verify(workdir: str) -> Optional[str]:
  for folder in (os.path.join(workdir, "verify"), workdir):
    if os.path.isfile(os.path.join(folder, "verify.parquet")):
      return folder
  return None


def load(workdir: str) -> Dict:
  """Everything the report shows, by scan prompt id; `missing` lists absent stages."""
  if not os.path.isdir(workdir):
    raise InputError(f"--workdir={workdir} does not exist")
  d = {"workdir": workdir, "missing": [], "prompts": {}}
  prompts = d["prompts"]  # scan id -> dict of what is known about the prompt

  def entry(pid):
    return prompts.setdefault(int(pid), {"id": int(pid), "onestep": [], "generated": []})

  scan_dir = os.path.join(workdir, "scan")
  d["scan_manifest"] = _read_json(os.path.join(workdir, "manifest.json"))
  d["scan"] = None
  if results.list_shards(scan_dir):
    run_config = _read_json(os.path.join(workdir, "run_config.json")) or {}
    caption = run_config.get("prompt_column") or "caption"
    data = results.open_shards(scan_dir)
    cols = [c for c in ("prompt_id", caption, "scores", "wen", PLANTED_COLUMN)
            if c in data.schema.names]
    d["scan"] = data.to_table(columns=cols).to_pydict()
    d["scan"]["caption"] = d["scan"].pop(caption, None)
    if PLANTED_COLUMN in data.schema.names and "image_path" in data.schema.names:
      # the testbed's own training image of each caption (relative to the table)
      base = os.path.dirname(((d["scan_manifest"] or {}).get("identity") or {}).get("prompts")
                             or run_config.get("prompts") or "")
      d["scan"]["planted_image"] = [
          None if p is None else os.path.join(base, p)
          for p in data.to_table(columns=["image_path"])["image_path"].to_pylist()]
    if d["scan_manifest"] is None:
      d["missing"].append("scan manifest (the scan did not finish: rerun it)")
  else:
    d["missing"].append("whitebox scan (no scan/ shards): no DCS scores")

  bb_dir = os.path.join(workdir, "blackbox")
  d["blackbox_manifest"] = _read_json(os.path.join(workdir, "manifest_blackbox.json"))
  if results.list_shards(bb_dir):
    table = results.open_shards(bb_dir).to_table()
    key = _scan_key(table)
    for row in table.to_pylist():
      e = entry(row[key])
      e["edge_scores"] = row.get("edge_scores")
      e.setdefault("caption", row.get("caption"))
      e["onestep"] = [os.path.join(workdir, p) for p in row.get("image_paths") or [] if p]
    if "image_paths" not in table.column_names:
      d["missing"].append("one-step images (the blackbox ran without --save_images)")
  else:
    d["missing"].append("blackbox attack (no blackbox/ shards): no edge scores, no one-step "
                        "images")

  gen_path = os.path.join(workdir, "generated.parquet")
  d["generate_manifest"] = _read_json(os.path.join(workdir, "manifest_generated_index.json"))
  if os.path.isfile(gen_path):
    table = pq.read_table(gen_path)
    key = _scan_key(table)
    for row in table.to_pylist():
      if row.get("image_path"):
        path = row["image_path"]
        entry(row[key])["generated"].append(
            path if os.path.isabs(path) else os.path.join(workdir, path))
  else:
    d["missing"].append("regeneration (no generated.parquet): no multi-step images")

  d["verify_dir"] = _find_verify(workdir)
  d["verify_manifest"], d["templates"] = None, {}
  if d["verify_dir"]:
    d["verify_manifest"] = _read_json(os.path.join(d["verify_dir"], "manifest.json"))
    table = pq.read_table(os.path.join(d["verify_dir"], "verify.parquet"))
    key = _scan_key(table)
    for row in table.to_pylist():
      entry(row[key])["verify"] = row
    tpl = os.path.join(d["verify_dir"], "templates", "templates.parquet")
    if os.path.isfile(tpl):
      for row in pq.read_table(tpl).to_pylist():
        d["templates"][(row["group"], row["template_id"])] = row
  else:
    d["missing"].append("ground-truth labels (no verify.parquet): no labels, no matched "
                        "training images, no precision/ROC against verified labels")
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
  """Score column -> {scan id: value} (NaN-free)."""
  out = {}
  if d["scan"] is not None:
    for col in ("scores", "wen"):
      if col in d["scan"]:
        out[col] = {int(i): float(v) for i, v in zip(d["scan"]["prompt_id"], d["scan"][col])
                    if v is not None and v == v}
  edge = {pid: p["edge_scores"] for pid, p in d["prompts"].items()
          if p.get("edge_scores") is not None and p["edge_scores"] == p["edge_scores"]}
  if edge:
    out["edge_scores"] = edge
  return out


def compute_metrics(d: Dict, ks) -> Dict[str, Dict]:
  """memjax.metrics against each label source; a source that cannot be scored says why."""
  out = {}
  sources = []
  if d["scan"] is not None and PLANTED_COLUMN in d["scan"]:
    sources.append(("planted", os.path.join(d["workdir"], "scan"), PLANTED_COLUMN))
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
    ok = np.flatnonzero(~np.isnan(vals))
    order = ok[np.lexsort((ids[ok], -vals[ok]))][:k]  # ties by prompt id, as results.top_k
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
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not src or ("://" in src and not src.startswith("file://")):
    return None  # a remote training image: never fetched by the report
  if src.startswith("file://"):
    src = src[len("file://"):]
  if not os.path.isfile(src):
    return None
  dst = os.path.join(out_dir, rel)
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  try:
    if src.lower().endswith(".png"):
      shutil.copyfile(src, dst)
    else:
      with Image.open(src) as im:
        im.convert("RGB").save(dst, format="PNG")
  except OSError:
    return None
  return rel


def _overlay(template_png: str, mask_png: str, dst: str) -> bool:
  """The template with its mask (the pixels TV compares) tinted red."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(template_png) as t, Image.open(mask_png) as m:
      image = np.asarray(t.convert("RGB"), np.float32)
      mask = np.asarray(m.convert("L").resize(t.size), np.float32)[..., None] / 255.0
  except OSError:
    return False
  red = np.array([255.0, 0.0, 0.0])
  out = image * (1 - 0.45 * mask) + red * 0.45 * mask
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).save(dst, format="PNG")
  return True


def gallery_images(d: Dict, row: Dict, out_dir: str) -> Dict[str, List]:
  """Copies one prompt's images into out_dir/img; returns {kind: [(rel, title)]}."""
  pid, imgs = row["id"], {"onestep": [], "generated": [], "training": [], "tv_mask": [],
                          "planted": []}
  if row.get("planted_image") and row.get(PLANTED_COLUMN) in POSITIVE:
    rel = _copy(row["planted_image"], out_dir, f"img/planted/{pid}.png")
    imgs["planted"].append((rel, row["planted_image"]))
  for kind in ("onestep", "generated"):
    for n, src in enumerate(row.get(kind) or []):
      rel = _copy(src, out_dir, f"img/{kind}/{pid}_{n}.png")
      if rel:
        imgs[kind].append((rel, os.path.basename(src)))
  v = row.get("verify") or {}
  refs = v.get("retrieved_urls") or ([v["own_ref"]] if v.get("own_ref") else [])
  for n, ref in enumerate(refs[:4]):
    rel = _copy(ref, out_dir, f"img/training/{pid}_{n}.png")
    imgs["training"].append((rel, ref))
  group = None if v.get("prompt_id") is None else str(v["prompt_id"])
  for n, tid in enumerate(v.get("template_indices") or []):
    t = d["templates"].get((group, str(tid)))
    if t:
      folder = os.path.join(d["verify_dir"], "templates")
      rel = f"img/tv_mask/{pid}_{n}.png"
      if _overlay(os.path.join(folder, t["image_path"]), os.path.join(folder, t["mask_path"]),
                  os.path.join(out_dir, rel)):
        imgs["tv_mask"].append((rel, f"template {tid}, mask {t['mask_fraction']:.0%}"))
  return imgs


def run(cfg: ReportConfig) -> Dict:
  """Writes WORKDIR/report/index.html; returns {"path", "missing", "top_k", "ids"}."""
  t0 = time.perf_counter()
  d = load(cfg.workdir)
  out_dir = os.path.join(cfg.workdir, "report")
  shutil.rmtree(out_dir, ignore_errors=True)  # every run rewrites it all: no stale images
  os.makedirs(os.path.join(out_dir, "img"))
  k = cfg.top_k or (d["scan_manifest"] or {}).get("config", {}).get("top_k") or 25
  rows = top_rows(d, k)
  for row in rows:
    row["images"] = gallery_images(d, row, out_dir)
  ks = sorted({int(x) for x in cfg.k_list})
  metric_reports = compute_metrics(d, ks)
  labels, scores = label_sets(d), score_columns(d)
  plots = report_plots.write_all(os.path.join(out_dir, "img"), labels, scores, POSITIVE)
  if not labels:
    d["missing"].append("labels of any kind: no precision@K, ROC or label plots")
  page = report_html.render(d, rows, metric_reports, [f"img/{p}" for p in plots], ks)
  path = os.path.join(out_dir, "index.html")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(page)
  os.replace(path + ".tmp", path)
  summary = {"path": path, "missing": d["missing"], "top_k": len(rows),
             "ids": [r["id"] for r in rows], "plots": plots,
             "seconds": time.perf_counter() - t0}
  results.write_json_atomic(os.path.join(out_dir, "report.json"),
                            dict(summary, metrics=metric_reports))
  return summary


_TOPK = flags.DEFINE_integer("report_top_k", None, "Gallery size (default: the scan's top_k).")


def main(argv):
  del argv
  cfg = ReportConfig(workdir=cli.common_flag_values(required=("workdir",))["workdir"],
                     top_k=_TOPK.value)
  out = run(cfg)
  for item in out["missing"]:
    print(f"missing: {item}")
  print(f"report: {out['path']}")


if __name__ == "__main__":
  cli.run_main(main)
