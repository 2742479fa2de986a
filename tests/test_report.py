"""memjax.report on the micro attack's real workdir (conftest.py): gallery order, images,
plots, metrics, missing stages, a resumed stage, a real browser; and the metrics table
of every detector on a synthetic scan."""
import os
import re
import shutil
import subprocess
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import micro_config
from memjax.data import images as images_lib
from memjax.method.masks import Template
from memjax.runtime import shards
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError
from memjax.stages import extract
from memjax.stages import report

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # conftest.py


def _copy(micro_extract, tmp_path, stages=None):
  """A copy of the micro workdir (all of it, or only `stages`), without its report."""
  w = str(tmp_path / "w")
  os.makedirs(w)
  for stage in stages or extract.STAGES:
    if stage != "report":
      shutil.copytree(workdir_lib.stage_dir(micro_extract["workdir"], stage),
                      workdir_lib.stage_dir(w, stage))
  return w


def _top(w, k):
  scan = shards.open_shards(workdir_lib.stage_dir(w, "scan")).to_table()
  ids, scores = np.array(scan["prompt_id"].to_pylist()), np.array(scan["scores"].to_pylist())
  return ids[np.lexsort((ids, -scores))][:k].tolist()


def _page(m):
  with open(m.details["path"], encoding="utf-8") as f:
    return f.read()


def _srcs(page):
  return re.findall(r"<img[^>]* src='([^']+)'", page)


def _check_images(m, page):
  folder = os.path.dirname(m.details["path"])
  srcs = _srcs(page)
  assert srcs
  for src in srcs:  # relative, inside the report folder, present
    assert not os.path.isabs(src) and ".." not in src and "://" not in src, src
    assert os.path.isfile(os.path.join(folder, src)), src
  return srcs


def test_gallery_lists_top_k_in_score_order_with_every_image(micro_extract):
  w = micro_extract["workdir"]
  m = workdir_lib.read_manifest(w, "report")
  page = _page(m)
  top = _top(w, 12)
  assert m.details["ids"] == top and m.counts["gallery"] == 12
  assert [int(x) for x in re.findall(r"data-prompt-id='(\d+)'", page)] == top
  scores = [float(x) for x in re.findall(r"data-score='([^']+)'", page)]
  assert scores == sorted(scores, reverse=True)
  srcs = _check_images(m, page)
  for kind in ("onestep", "generated", "training", "planted"):
    assert any(f"img/{kind}/" in s for s in srcs), kind
  assert sum("img/onestep/" in s for s in srcs) == 2 * 12
  assert sum("img/generated/" in s for s in srcs) == 2 * 12
  verify = pq.read_table(workdir_lib.path(w, "verify", "verify.parquet")).to_pylist()
  shown = sum(len((r["retrieved_urls"] or [r["own_ref"]])[:4]) for r in verify if r["own_ref"]
              or r["retrieved_urls"])  # the matched images, else the prompt's own
  assert sum("img/training/" in s for s in srcs) == shown
  labels = m.details["metrics"]["verified"]["label_counts"]
  pooled = m.details["metrics"]["verified"]["results"]["pooled"]["scores"]
  assert pooled["n_pos"] == sum(v for k, v in labels.items() if k != "N") > 0
  assert {"score_distributions.png", "precision_at_k.png", "roc.png",
          "dcs_vs_edge.png"} <= set(m.details["plots"])
  assert "against planted labels" in page and "against verified labels" in page
  for head in ("TPR@1%<br>below", "TPR@1%<br>closest", "TPR@0.1%<br>below", "P@2/4/8"):
    assert head in page, head
  assert page.count("<table class='metrics'>") == 2
  detectors = re.findall(r"<tr data-detector='([^']+)'>", page)
  assert detectors[:2] == ["scores", "wen"] and detectors[-1] == "edge_scores"
  assert len(detectors) == 2 * len(m.details["metrics"]["planted"]["columns"])
  assert "Webster&#x27;s denoising confidence" in page
  assert "roc_detectors.png" in m.details["plots"]
  assert "id='missing'" not in page and m.details["missing"] == []


def test_captions_are_escaped(micro_extract, tmp_path):
  w = _copy(micro_extract, tmp_path)
  page = _page(report.run(report.ReportConfig(workdir=w, top_k=100)))  # every prompt
  assert page.count("data-prompt-id=") == 28
  assert "&lt;b&gt;&amp;amp;&lt;/b&gt;" in page and "<b>&amp;</b>" not in page


def test_the_tv_overlay_tints_the_mask_only(tmp_path):
  image = np.full((16, 16, 3), 0.5, np.float32)
  mask = np.zeros((16, 16), bool)
  mask[4:12, 4:12] = True
  report._overlay(Template(image, mask, "7"), str(tmp_path / "o.png"))
  tv = images_lib.read_image(str(tmp_path / "o.png")).pixels
  assert (tv[0, 0] == 128).all() and tv[8, 8, 0] > 128 and tv[8, 8, 1] < 128


def test_rerun_replaces_the_report_and_the_folder_moves(micro_extract, tmp_path):
  w = _copy(micro_extract, tmp_path)
  report.run(report.ReportConfig(workdir=w, top_k=4))
  m = report.run(report.ReportConfig(workdir=w, top_k=3))
  assert m.details["ids"] == _top(w, 3)
  onestep = os.listdir(workdir_lib.path(w, "report", "img", "onestep"))
  assert len(onestep) == 3 * 2  # no stale image of the 4th
  moved = str(tmp_path / "moved")
  shutil.copytree(workdir_lib.stage_dir(w, "report"), moved)
  shutil.rmtree(w)  # the report stands alone
  page = open(os.path.join(moved, "index.html"), encoding="utf-8").read()
  for src in _srcs(page):
    assert os.path.isfile(os.path.join(moved, src))


def test_a_resumed_finished_stage_keeps_the_rate_of_its_run(micro_extract, tmp_path):
  w = _copy(micro_extract, tmp_path)
  first = workdir_lib.read_manifest(w, "scan")
  extract.run(micro_config(micro_extract["folder"], w, stages=("scan",)))
  again = workdir_lib.read_manifest(w, "scan")
  assert again.resumed_finished and again.rate == first.rate > 0
  page = _page(report.run(report.ReportConfig(workdir=w)))
  assert f"{first.rate:.2f} prompts/s" in page
  assert "a rerun that found the work done keeps them" in page


def test_scan_only_workdir_reports_what_is_missing(micro_extract, tmp_path):
  w = _copy(micro_extract, tmp_path, stages=("scan",))
  m = report.run(report.ReportConfig(workdir=w))
  page = _page(m)
  assert m.details["ids"] == _top(w, 12)
  text = " ".join(m.details["missing"])
  for what in ("blackbox", "regeneration", "ground-truth labels"):
    assert what in text, what
  assert "planted labels" not in text  # the testbed's table has them
  assert "id='missing'" in page and "not verified" in page and "no one-step images" in page
  _check_images(m, page)


def test_blackbox_only_and_empty_workdirs(micro_extract, tmp_path):
  w = _copy(micro_extract, tmp_path, stages=("blackbox", "generate", "verify"))
  m = report.run(report.ReportConfig(workdir=w))
  bb = shards.open_shards(workdir_lib.stage_dir(w, "blackbox")).to_table()
  order = sorted(zip(bb["edge_scores"].to_pylist(), bb["scan_prompt_id"].to_pylist()),
                 key=lambda t: (-t[0], t[1]))
  assert m.details["ids"] == [pid for _, pid in order]  # by edge score without a scan
  assert any("whitebox scan" in x for x in m.details["missing"])
  _check_images(m, _page(m))
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  m = report.run(report.ReportConfig(workdir=empty))
  assert m.details["ids"] == [] and len(m.details["missing"]) >= 3
  with pytest.raises(InputError, match="does not exist"):
    report.run(report.ReportConfig(workdir=str(tmp_path / "nope")))


DETECTORS = ["scores", "wen", "wen981", "jeon", "asthana", "asthana_norm", "asthana_cos",
             "ren_le"]


def _detector_scan(tmp_path, n=80):
  """A scan-only workdir whose shards carry every detector column (the testbed's
  planted `kind` as labels; jeon ranks memorized prompts lower, ren_le has nulls)."""
  rng = np.random.default_rng(5)
  kind = rng.choice(["MV", "TV", "RV", "N", "N", "N"], n)
  mem = (kind != "N").astype(np.float64)
  cols = {c: rng.standard_normal(n) + mem for c in DETECTORS}
  cols["jeon"] = -cols["jeon"]
  table = {"prompt_id": np.arange(n), "caption": [f"caption {i}" for i in range(n)],
           **{c: pa.array(v, pa.float64()) for c, v in cols.items()}, "kind": kind}
  table["ren_le"] = pa.array([None if i % 9 == 0 else v for i, v in enumerate(cols["ren_le"])],
                             pa.float64())
  w = str(tmp_path / "w")
  shards.ShardWriter(workdir_lib.stage_dir(w, "scan")).write(pa.table(table), 0, n)
  return w


def test_metrics_table_lists_every_detector(tmp_path):
  w = _detector_scan(tmp_path)
  m = report.run(report.ReportConfig(workdir=w, top_k=5, k_list=[5, 10]))
  page = _page(m)
  results = m.details["metrics"]["planted"]["results"]
  assert list(results) == ["pooled", "MV", "RV", "TV"]
  assert page.count("<table class='metrics'>") == 1  # one label source, one table
  table = page[page.index("<table class='metrics'>"):]
  table = table[:table.index("</table>")]
  assert re.findall(r"<tr data-detector='([^']+)'>", table) == DETECTORS
  heads = re.findall(r"<th colspan='5' class='g'>(\w+) <span class='none'>([\d-]+) pos / "
                     r"([\d-]+) neg", table)
  assert [h[0] for h in heads] == list(results)
  span = lambda v: str(min(v)) if min(v) == max(v) else f"{min(v)}-{max(v)}"
  for group, n_pos, n_neg in heads:  # ren_le's null rows make its counts lower
    assert n_pos == span([r["n_pos"] for r in results[group].values()]), group
    assert n_neg == span([r["n_neg"] for r in results[group].values()]), group
  assert "-" in heads[0][2]
  for text in ("<b>DCS</b>", "Webster&#x27;s denoising confidence (column scores)",
               "Wen et al., ||e_c - e_u|| at t = 999 (memjax&#x27;s z)",
               "Wen et al. at the authors&#x27; first DDIM step", "Jeon et al. sharpness (JVP)",
               "Asthana &amp; Belagiannis anisotropy (norm + cosine)",
               "Ren et al. cross-attention entropy (one layer)"):
    assert text in table, text
  for det in DETECTORS:  # every cell: the metrics stage's numbers
    row = re.search(rf"<tr data-detector='{det}'>(.*?)</tr>", table).group(1)
    cells = re.findall(r"<td class='num[^']*'[^>]*>([^<]*)</td>", row)
    want = []
    for group in results:
      r = results[group][det]
      want += [f"{r[k]:.3f}" for k in ("auc", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_closest",
                                        "tpr_at_01pct_fpr")]
      want.append("/".join(f"{r['precision_at_k'][k]:.2f}" for k in ("5", "10")))
    assert cells == want, det
  jeon = re.search(r"<tr data-detector='jeon'>(.*?)</tr>", table).group(1)
  assert results["pooled"]["jeon"]["auc"] < 0.5 and "class='num g low'" in jeon  # raw, marked
  assert "class='num g low'" not in re.search(r"<tr data-detector='scores'>(.*?)</tr>",
                                               table).group(1)
  pooled = results["pooled"]["ren_le"]
  assert pooled["n_pos"] + pooled["n_neg"] == 80 - len(range(0, 80, 9))  # nulls left out
  assert "roc_detectors.png" in m.details["plots"]
  assert os.path.isfile(workdir_lib.path(w, "report", "img", "roc_detectors.png"))


def test_generate_stage_detectors_in_the_table_and_roc_as_a_subset(tmp_path):
  """The generate stage's wen_steps and bright_ending (per seed, over the scan's top 20)
  join the metrics table and the pooled ROC as per-prompt means, marked a subset."""
  w = _detector_scan(tmp_path)
  scan = shards.open_shards(workdir_lib.stage_dir(w, "scan")).to_table()
  top = _top(w, 20)
  kind = dict(zip(scan["prompt_id"].to_pylist(), scan["kind"].to_pylist()))
  rng = np.random.default_rng(2)
  rows = [{"prompt_id": g, "caption": f"caption {p}", "seed": seed, "image_path": None,
           "status": "ok", "wen_steps": float(rng.random() + (kind[p] != "N")),
           "bright_ending": float(rng.random()), "scan_prompt_id": p}
          for g, p in enumerate(top) for seed in (0, 1)]
  os.makedirs(workdir_lib.stage_dir(w, "generate"))
  pq.write_table(pa.Table.from_pylist(rows), workdir_lib.path(w, "generate",
                                                              workdir_lib.GENERATED_TABLE))
  m = report.run(report.ReportConfig(workdir=w, top_k=5, k_list=[5, 10]))
  page = _page(m)
  rep = m.details["metrics"]["planted"]
  table = page[page.index("<table class='metrics'>"):]
  table = table[:table.index("</p>")]
  assert re.findall(r"<tr data-detector='([^']+)'>", table) == DETECTORS + [
      "wen_steps", "bright_ending"]
  for det in ("wen_steps", "bright_ending"):
    assert rep["columns"][det]["joined_rows"] == 20 and rep["columns"][det]["subset"]
    assert rep["results"]["pooled"][det]["n_pos"] + rep["results"]["pooled"][det]["n_neg"] == 20
    row = re.search(rf"<tr data-detector='{det}'>(.*?)</tr>", table).group(1)
    pooled = rep["results"]["pooled"][det]
    assert (f"*<br><span class='subset'>subset: 20 of 80 prompts, {pooled['n_pos']} pos / "
            f"{pooled['n_neg']} neg</span>") in row
    auc = pooled["auc"]
    assert f">{auc:.3f}</td>" in row
  assert "subset" not in re.search(r"<tr data-detector='scores'>(.*?)</tr>", table).group(1)
  assert "id='subset-note'>* evaluated on a subset of the 80 labelled prompts (wen_steps 20, " \
      "bright_ending 20)" in table
  assert "Chen et al. Bright Ending" in table and "<b>BE</b>" in table
  d = report.load(w)  # the ROC plot's columns: the same per-prompt means
  scores = report.score_columns(d)
  assert list(scores) == DETECTORS + ["wen_steps", "bright_ending"]
  assert sorted(scores["wen_steps"]) == sorted(top)
  by_id = {}
  for r in rows:
    by_id.setdefault(r["scan_prompt_id"], []).append(r["wen_steps"])
  assert scores["wen_steps"] == pytest.approx({p: np.mean(v) for p, v in by_id.items()})
  assert "roc_detectors.png" in m.details["plots"]


def _chromium(tmp_path, *args):
  profile = tmp_path / f"profile{len(os.listdir(tmp_path))}"
  cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.browser
def test_renders_in_headless_chromium(micro_extract, tmp_path):
  if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
  m = workdir_lib.read_manifest(micro_extract["workdir"], "report")
  url = "file://" + os.path.abspath(m.details["path"])
  dom = _chromium(tmp_path, "--dump-dom", url)
  status = re.search(r'<pre id="status"[^>]*>(.*?)</pre>', dom.stdout, re.S)
  assert status, dom.stdout[-2000:] + dom.stderr[-2000:]
  status = json.loads(status.group(1).replace("&quot;", '"').replace("&amp;", "&"))
  assert status["loaded"] and status["broken"] == [] and status["errors"] == []
  assert status["images"] == len(_srcs(_page(m))) and status["gallery"] == m.details["ids"]
  console = [l for l in dom.stderr.splitlines() if "CONSOLE" in l]
  assert not console, console
  shot = tmp_path / "report.png"
  _chromium(tmp_path, "--hide-scrollbars", "--window-size=1400,2000", f"--screenshot={shot}",
            url)
  assert shot.stat().st_size > 10000
  print(f"screenshot: {shot}")
