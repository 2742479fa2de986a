"""memjax.report on hand-made workdirs: gallery order, images, missing stages, a real browser."""
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memjax.stages import report
from memjax.runtime import results
from memjax.runtime.errors import InputError

CHROMIUM = "/usr/bin/chromium"
N, K = 12, 5
KINDS = ["MV", "unique", "TV", "RV", "heldout", "MV", "unique", "heldout", "unique", "RV",
         "unique", "heldout"]
SCORES = [9.0, 3.0, 8.5, 7.0, 1.0, 8.0, 5.0, 0.5, 2.0, 6.0, 4.0, 1.5]
TOP = [int(i) for i in np.argsort(-np.array(SCORES), kind="stable")[:K]]  # [0, 2, 5, 3, 9]
LABELS = {0: "MV", 2: "TV", 5: "N", 3: "RV", 9: "N"}


def _png(path, seed, size=8):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(path)


def _scan(w, with_kind=True, table_dir=None):
  """Scan shards of N prompts; with table_dir, a testbed-like `image_path` per caption."""
  prompts = os.path.join(table_dir or "/data", "eval.parquet")
  cols = {"prompt_id": pa.array(np.arange(N, dtype=np.int64)),
          "caption": [f"a <b>caption</b> number {i}" for i in range(N)],
          "scores": pa.array(SCORES, pa.float32()),
          "wen": pa.array([s / 2 for s in SCORES], pa.float32()), "status": ["ok"] * N}
  if with_kind:
    cols["kind"] = KINDS
  if table_dir:
    cols["image_path"] = [f"images/{i}.png" for i in range(N)]
    for i in range(N):
      _png(os.path.join(table_dir, "images", f"{i}.png"), 500 + i)
  results.ShardedResults(w, "scan").write(pa.table(cols), 0, N)
  results.write_json_atomic(os.path.join(w, "run_config.json"),
                            {"prompt_column": "caption", "prompts": prompts})
  results.write_json_atomic(os.path.join(w, "manifest.json"), {
      "identity": {"model": "/m/tiny", "model_identity": "ab" * 32, "prompts": prompts,
                   "seeds": [0], "guidance_scale": 7.5, "dtype": "float32"},
      "config": {"top_k": K}, "rows": N, "scored": N, "skipped": {}, "devices": 8,
      "backend": "cpu", "timings": {"total_s": 3.0, "prompts_per_s": 4.0}})


def _full(w, train_dir):
  """Scan + blackbox + generated + verify (with a TV template) in workdir w."""
  _scan(w, table_dir=os.path.join(train_dir, "testbed"))
  bb = {"prompt_id": pa.array(np.arange(K, dtype=np.int64)),
        "scan_prompt_id": pa.array(TOP, pa.int64()),
        "caption": [f"a <b>caption</b> number {i}" for i in TOP],
        "edge_scores": pa.array([0.1 * (K - j) for j in range(K)], pa.float32()),
        "image_paths": [[f"images/{j}/{s}.png" for s in range(2)] for j in range(K)],
        "status": ["ok"] * K}
  results.ShardedResults(w, "blackbox").write(pa.table(bb), 0, K)
  results.write_json_atomic(os.path.join(w, "manifest_blackbox.json"),
                            {"timings": {"total_s": 2.0, "rows_per_s": 2.5}})
  gen = {"prompt_id": [], "scan_prompt_id": [], "seed": [], "image_path": []}
  for j, pid in enumerate(TOP):
    for s in range(2):
      _png(os.path.join(w, "images", str(j), f"{s}.png"), 100 * j + s)
      _png(os.path.join(w, "generated", str(j), f"{s}.png"), 200 * j + s)
      for key, v in (("prompt_id", j), ("scan_prompt_id", pid), ("seed", s),
                     ("image_path", f"generated/{j}/{s}.png")):
        gen[key].append(v)
  pq.write_table(pa.table(gen), os.path.join(w, "generated.parquet"))
  vdir = os.path.join(w, "verify")
  rows = []
  for j, pid in enumerate(TOP):
    train = os.path.join(train_dir, f"{pid}.png")
    _png(train, 300 + pid)
    rows.append({"prompt_id": j, "scan_prompt_id": pid, "overfit_type": LABELS[pid],
                 "retrieved_urls": [train] if LABELS[pid] != "N" else [],
                 "template_indices": ["7"] if LABELS[pid] == "TV" else []})
  os.makedirs(os.path.join(vdir, "templates"))
  pq.write_table(pa.Table.from_pylist(rows), os.path.join(vdir, "verify.parquet"))
  tv = TOP.index(2)
  _png(os.path.join(vdir, "templates", "template_000000.png"), 7, size=16)
  mask = np.zeros((16, 16), np.uint8)
  mask[4:12, 4:12] = 255
  Image.fromarray(mask, "L").save(os.path.join(vdir, "templates", "template_000000_mask.png"))
  pq.write_table(pa.Table.from_pylist([{
      "template": 0, "group": str(tv), "template_id": "7", "partner_id": "8", "sse": 10.0,
      "mask_fraction": 0.25, "height": 16, "width": 16, "image_path": "template_000000.png",
      "mask_path": "template_000000_mask.png"}]),
      os.path.join(vdir, "templates", "templates.parquet"))
  results.write_json_atomic(os.path.join(vdir, "manifest.json"), {
      "prompts": K, "labels": {"MV": 1, "N": 2, "RV": 1, "TV": 1},
      "timings": {"total_s": 1.0}})
  return w


def _page(out):
  with open(out["path"], encoding="utf-8") as f:
    return f.read()


def _srcs(page):
  return re.findall(r"<img[^>]* src='([^']+)'", page)


def _check_images(out, page):
  folder = os.path.dirname(out["path"])
  srcs = _srcs(page)
  assert srcs
  for src in srcs:  # relative, inside the report folder, present
    assert not os.path.isabs(src) and ".." not in src and "://" not in src, src
    assert os.path.isfile(os.path.join(folder, src)), src
  return srcs


@pytest.fixture
def full_workdir(tmp_path):
  return _full(str(tmp_path / "w"), str(tmp_path / "train"))


def test_gallery_lists_top_k_in_score_order_with_every_image(full_workdir):
  out = report.run(report.ReportConfig(workdir=full_workdir))
  page = _page(out)
  assert out["ids"] == TOP and out["top_k"] == K
  assert [int(x) for x in re.findall(r"data-prompt-id='(\d+)'", page)] == TOP
  scores = [float(x) for x in re.findall(r"data-score='([^']+)'", page)]
  assert scores == sorted(scores, reverse=True)
  srcs = _check_images(out, page)
  for kind in ("onestep", "generated", "training", "tv_mask", "planted"):
    assert any(f"img/{kind}/" in s for s in srcs), kind
  assert sum("img/planted/" in s for s in srcs) == 5  # the top 5 are all planted MV/TV/RV
  assert sum("img/onestep/" in s for s in srcs) == 2 * K
  assert sum("img/training/" in s for s in srcs) == 3  # MV, TV, RV rows
  assert {"score_distributions.png", "precision_at_k.png", "roc.png",
          "dcs_vs_edge.png"} <= set(out["plots"])
  assert "&lt;b&gt;caption&lt;/b&gt;" in page and "<b>caption</b>" not in page  # escaped
  assert "TPR@1%FPR" in page and "against planted labels" in page
  assert "id='missing'" not in page and out["missing"] == []
  # The TV overlay tints the mask's pixels red and leaves the rest as they were.
  tv = np.asarray(Image.open(os.path.join(full_workdir, "report", "img", "tv_mask", "2_0.png")))
  plain = np.asarray(Image.open(os.path.join(full_workdir, "verify", "templates",
                                             "template_000000.png")))
  assert (tv[0, 0] == plain[0, 0]).all() and (tv[8, 8] != plain[8, 8]).any()
  with open(os.path.join(full_workdir, "report", "report.json")) as f:
    assert json.load(f)["metrics"]["verified"]["results"]["pooled"]["scores"]["n_pos"] == 3


def test_rerun_replaces_the_report_and_the_folder_moves(full_workdir, tmp_path):
  report.run(report.ReportConfig(workdir=full_workdir, top_k=2))
  out = report.run(report.ReportConfig(workdir=full_workdir, top_k=3))
  assert out["ids"] == TOP[:3]
  assert not os.path.exists(os.path.join(full_workdir, "report", "img", "onestep", "3_0.png"))
  moved = str(tmp_path / "moved")
  shutil.copytree(os.path.join(full_workdir, "report"), moved)
  shutil.rmtree(full_workdir)  # the report stands alone
  page = open(os.path.join(moved, "index.html"), encoding="utf-8").read()
  for src in _srcs(page):
    assert os.path.isfile(os.path.join(moved, src))


def test_a_resumed_finished_stage_shows_no_rate(full_workdir):
  """Rerunning a finished stage rewrites its manifest with rate 0: shown as '-'."""
  path = os.path.join(full_workdir, "manifest.json")
  manifest = {"stage": "scan", "rows": 8, "scored": 8, "devices": 1, "backend": "cpu",
              "timings": {"total_s": 3.5, "prompts_per_s": 0.0, "prompts_scored_this_run": 0}}
  with open(path, "w") as f:
    json.dump(manifest, f)
  page = _page(report.run(report.ReportConfig(workdir=full_workdir)))
  assert "- prompts/s" in page and "0.0 prompts/s" not in page
  assert "a stage that found its work already done shows no rate" in page
  manifest["timings"].update(prompts_per_s=52.5, prompts_scored_this_run=8)
  with open(path, "w") as f:
    json.dump(manifest, f)
  page = _page(report.run(report.ReportConfig(workdir=full_workdir)))
  assert "52.5 prompts/s" in page and "already done" not in page


def test_scan_only_workdir_reports_what_is_missing(tmp_path):
  w = str(tmp_path / "w")
  _scan(w, with_kind=False)
  out = report.run(report.ReportConfig(workdir=w))
  page = _page(out)
  assert out["ids"] == TOP
  text = " ".join(out["missing"])
  for what in ("blackbox", "regeneration", "ground-truth labels", "planted labels",
               "labels of any kind"):
    assert what in text, what
  assert "id='missing'" in page and "not verified" in page and "no one-step images" in page
  _check_images(out, page)
  assert out["plots"] == ["score_distributions.png"]


def test_blackbox_only_and_empty_workdirs(tmp_path):
  w = str(tmp_path / "w")
  _full(w, str(tmp_path / "train"))
  shutil.rmtree(os.path.join(w, "scan"))
  os.remove(os.path.join(w, "manifest.json"))
  out = report.run(report.ReportConfig(workdir=w))
  assert out["ids"] == TOP  # ordered by edge score without a scan
  assert any("whitebox scan" in m for m in out["missing"])
  _check_images(out, _page(out))
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  out = report.run(report.ReportConfig(workdir=empty))
  assert out["ids"] == [] and len(out["missing"]) >= 3
  with pytest.raises(InputError, match="does not exist"):
    report.run(report.ReportConfig(workdir=str(tmp_path / "nope")))


def _chromium(tmp_path, *args):
  profile = tmp_path / f"profile{len(os.listdir(tmp_path))}"
  cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.browser
def test_renders_in_headless_chromium(full_workdir, tmp_path):
  if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
  out = report.run(report.ReportConfig(workdir=full_workdir))
  url = "file://" + os.path.abspath(out["path"])
  dom = _chromium(tmp_path, "--dump-dom", url)
  status = re.search(r'<pre id="status"[^>]*>(.*?)</pre>', dom.stdout, re.S)
  assert status, dom.stdout[-2000:] + dom.stderr[-2000:]
  status = json.loads(status.group(1).replace("&quot;", '"').replace("&amp;", "&"))
  assert status["loaded"] and status["broken"] == [] and status["errors"] == []
  assert status["images"] == len(_srcs(_page(out))) and status["gallery"] == TOP
  console = [l for l in dom.stderr.splitlines() if "CONSOLE" in l]
  assert not console, console
  shot = tmp_path / "report.png"
  _chromium(tmp_path, "--hide-scrollbars", "--window-size=1400,2000", f"--screenshot={shot}",
            url)
  assert shot.stat().st_size > 10000
  print(f"screenshot: {shot}")
