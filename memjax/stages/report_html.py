"""The report page: one self-contained HTML file (inline CSS and script, relative images).

The page script records, in a hidden `<pre id="status">`, how many images
loaded, which did not (naturalWidth 0) and every error event, so a headless
browser's `--dump-dom` tells a test whether the page rendered cleanly.
"""
import datetime
import html
from typing import Dict, List, Optional, Sequence

from memjax.runtime import progress
from memjax.stages import metrics as metrics_lib

_CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0 1em}
td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px;vertical-align:top;text-align:left}
th{background:#f2f2f2}
.num{text-align:right;font-variant-numeric:tabular-nums}
.missing{background:#fff4e0;border:1px solid #e0a040;padding:.5em 1em}
td.ims{white-space:nowrap}
img.px{width:64px;height:64px;image-rendering:pixelated;object-fit:contain;margin:1px;
border:1px solid #ddd;background:#eee}
img.plot{max-width:100%;margin:4px}
.lab{font-weight:bold;padding:1px 5px;border-radius:3px;color:#fff}
.MV{background:#d62728}.TV{background:#9467bd}.RV{background:#ff7f0e}
.N,.unique,.heldout{background:#1f77b4}
.cap{max-width:320px}
.none{color:#999;font-size:12px}
table.metrics td,table.metrics th{font-size:12px;padding:2px 4px}
table.metrics th{text-align:center;font-size:11px}
table.metrics .g{border-left:2px solid #888}
td.det{max-width:210px}
td.pk{white-space:nowrap}
.low{color:#b00000;font-weight:bold}
.subset{color:#a05a00;font-size:11px}
"""

_SCRIPT_HEAD = """
window.__errors = [];
(function () {  // console errors count as page errors too
  var original = console.error;
  console.error = function () {
    window.__errors.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
    return original.apply(console, arguments);
  };
})();
window.addEventListener('error', function (e) {
  var t = e.target;
  window.__errors.push(t && t.tagName ? 'failed to load ' + (t.getAttribute('src') || t.tagName)
                                      : String(e.message));
}, true);
"""

_SCRIPT_TAIL = """
window.addEventListener('load', function () {
  var imgs = document.images, broken = [];
  for (var i = 0; i < imgs.length; i++) {
    if (!imgs[i].complete || imgs[i].naturalWidth === 0) broken.push(imgs[i].getAttribute('src'));
  }
  var ids = [];
  document.querySelectorAll('#gallery tr.item').forEach(function (r) {
    ids.push(Number(r.dataset.promptId));
  });
  document.getElementById('status').textContent = JSON.stringify(
      {loaded: true, images: imgs.length, broken: broken, errors: window.__errors,
       gallery: ids});
});
"""


def _e(text) -> str:
  return html.escape("" if text is None else str(text))


def _num(v, fmt="{:.4g}") -> str:
  return "-" if v is None or v != v else fmt.format(v)


def _rate(manifest: Dict) -> str:
  """A stage's rate with its unit; '-' when no run did any work."""
  rate = manifest.get("rate")
  return "-" if not rate else f"{_num(rate, '{:.2f}')} {manifest.get('rate_unit', '')}"


def _table(header: Optional[Sequence[str]], rows: List[Sequence], numeric=()) -> str:
  head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
  body = "".join(
      "<tr>" + "".join(f"<td class='num'>{_e(c)}</td>" if i in numeric else f"<td>{_e(c)}</td>"
                       for i, c in enumerate(r)) + "</tr>" for r in rows)
  return f"<table>{head}{body}</table>"


def _summary(d: Dict) -> str:
  rows = []
  manifests = d.get("manifests") or {}
  sm = manifests.get("scan") or {}
  ident = sm.get("identity") or {}
  if ident:
    short = str(ident.get("model_identity"))[:12]
    rows.append(("model", f"{ident.get('model')} (identity {short})"))
    rows.append(("prompt table", ident.get("prompts")))
    rows.append(("seeds / guidance / dtype",
                 f"{ident.get('seeds')} / {ident.get('guidance_scale')} / {ident.get('dtype')}"))
  if sm:
    counts, runtime = sm.get("counts") or {}, sm.get("runtime") or {}
    rows += [("prompts scanned", f"{counts.get('scored')} of {counts.get('rows')} rows "
                                 f"(skipped: {counts.get('skipped') or 'none'})"),
             ("scan time", progress.format_duration((sm.get("timings") or {}).get("total_s"))),
             ("scan rate", f"{_rate(sm)} on {runtime.get('devices')} "
                           f"{runtime.get('backend')} device(s)")]
  elif d.get("scan") is not None:
    rows.append(("prompts scanned", len(d["scan"]["prompt_id"])))
  stage_rows = [(name, progress.format_duration((m.get("timings") or {}).get("total_s")),
                 _rate(m)) for name, m in manifests.items()]
  out = "<h2>Summary</h2>" + _table(None, rows)
  if any(m.get("resumed_finished") for m in manifests.values()):
    out += ("<p>Times and rates are those of the run of each stage that did its work; a "
            "rerun that found the work done keeps them.</p>")
  if stage_rows:
    out += "<h3>Stages</h3>" + _table(("stage", "time", "rate"), stage_rows, (1, 2))
  counts = _label_counts(d)
  if counts:
    out += "<h3>Counts per label</h3>" + _table(("label source", "counts"), counts)
  return out


def _label_counts(d: Dict) -> List[Sequence]:
  rows = []
  if d.get("scan") is not None and "kind" in d["scan"]:
    c: Dict[str, int] = {}
    for k in d["scan"]["kind"]:
      c[k] = c.get(k, 0) + 1
    rows.append(("planted (testbed kind, every prompt)",
                 ", ".join(f"{k}: {v}" for k, v in sorted(c.items()))))
  vm = ((d.get("manifests") or {}).get("verify") or {}).get("counts") or {}
  if vm.get("labels"):
    rows.append((f"verified (memjax.verify, {vm.get('prompts')} prompts)",
                 ", ".join(f"{k}: {v}" for k, v in sorted(vm["labels"].items()))))
  return rows


def _detector_cell(column: str, subset: Optional[str] = None) -> str:
  """The detector's name and description; a subset column gets a '*' and `subset`
  (on how many labelled prompts it was scored)."""
  name, what = metrics_lib.DETECTORS.get(column, (column, "score column"))
  if name != column:
    what += f" (column {column})"
  mark = "" if subset is None else f"*<br><span class='subset'>{_e(subset)}</span>"
  return (f"<td class='det'><b>{_e(name)}</b>{mark}<br><span class='none'>{_e(what)}"
          "</span></td>")


def _range(values) -> str:
  lo, hi = min(values), max(values)
  return str(lo) if lo == hi else f"{lo}-{hi}"


def _metrics_table(report: Dict, ks: Sequence[int]) -> str:
  """One table: a row per detector column, per label group the ROC numbers and P@K;
  then `metrics.subset_note` when some columns were scored on a subset."""
  results, info = report["results"], report["columns"]
  groups = list(results)
  widest = max((v["joined_rows"] for v in info.values()), default=0)
  subset = {c: f"subset: {info[c]['joined_rows']} of {widest} prompts, "
               f"{results[groups[0]][c]['n_pos']} pos / {results[groups[0]][c]['n_neg']} neg"
            for c in metrics_lib.subset_columns(report) if c in results[groups[0]]}
  columns = list(dict.fromkeys(c for g in groups for c in results[g]))
  meaning = {k: what for k, (_, what) in metrics_lib.TABLE_METRICS.items()}
  heads = [("AUC", meaning["auc"]), ("TPR@1%|below", meaning["tpr_at_1pct_fpr"]),
           ("TPR@1%|closest", meaning["tpr_at_1pct_fpr_closest"]),
           ("TPR@0.1%|below", meaning["tpr_at_01pct_fpr"]),
           ("P@" + "/".join(map(str, ks)), "precision among the top K by score, for each K")]
  top, sub = ["<tr><th rowspan='2'>detector</th>"], ["<tr>"]
  for g in groups:
    rows = results[g].values()
    top.append(f"<th colspan='{len(heads)}' class='g'>{_e(g)} <span class='none'>"
               f"{_range([r['n_pos'] for r in rows])} pos / "
               f"{_range([r['n_neg'] for r in rows])} neg</span></th>")
    sub += [f"<th{' class=g' if n == 0 else ''} title='{_e(t)}'>"
            f"{'<br>'.join(_e(x) for x in h.split('|'))}</th>" for n, (h, t) in enumerate(heads)]
  body = []
  for column in columns:
    cells = [_detector_cell(column, subset.get(column))]
    for g in groups:
      r = results[g].get(column)
      if r is None:
        cells.append(f"<td class='num g' colspan='{len(heads)}'>-</td>")
        continue
      auc = r.get("auc")
      low = " low" if auc is not None and auc < 0.5 else ""
      cells.append(f"<td class='num g{low}' title='{r['n_pos']} pos / {r['n_neg']} neg'>"
                   f"{_num(auc, '{:.3f}')}</td>")
      cells += [f"<td class='num'>{_num(r.get(m), '{:.3f}')}</td>" for m in
                ("tpr_at_1pct_fpr", "tpr_at_1pct_fpr_closest", "tpr_at_01pct_fpr")]
      pk = "/".join(_num(r["precision_at_k"].get(str(k)), "{:.2f}") for k in ks)
      cells.append(f"<td class='num pk'>{pk}</td>")
    body.append(f"<tr data-detector='{_e(column)}'>" + "".join(cells) + "</tr>")
  note = metrics_lib.subset_note(report)
  return ("<table class='metrics'>" + "".join(top) + "</tr>" + "".join(sub) + "</tr>" +
          "".join(body) + "</table>" +
          (f"<p class='subset' id='subset-note'>{_e(note)}</p>" if note else ""))


_METRICS_NOTE = (
    "<p class='none'>Higher = more likely memorized for every detector; AUCs are raw, never "
    "flipped (<span class='low'>below 0.5</span>: the score ranks memorized prompts lower). "
    "TPR@1%FPR in both conventions of the literature: <b>below</b>, at the largest FPR "
    "under 1% (Wen et al.); <b>closest</b>, at the FPR nearest 1%, possibly above it (Jeon "
    "et al., Asthana &amp; Belagiannis, Ren et al.). TPR@0.1%: below 0.1%. For a type, "
    "negatives are the N rows and other types are left out; P@K ranks every scored row. "
    "Rows with no score for a detector (status rows) are left out of its line.</p>")


def _metrics(metric_reports: Dict, ks: Sequence[int]) -> str:
  if not metric_reports:
    return ""
  out = ["<h2>Detection metrics</h2>"]
  for source, rep in metric_reports.items():
    out.append(f"<h3>against {_e(source)} labels</h3>")
    if "error" in rep:
      out.append(f"<p class='missing'>not computed: {_e(rep['error'])}</p>")
      continue
    out.append(_metrics_table(rep, ks))
  if any("error" not in rep for rep in metric_reports.values()):
    out.append(_METRICS_NOTE)
  return "".join(out)


def _images(items, empty: str) -> str:
  if not items:
    return f"<span class='none'>{_e(empty)}</span>"
  out = []
  for rel, title in items:
    if rel:
      out.append(f"<img class='px' src='{_e(rel)}' title='{_e(title)}' alt='{_e(title)}'>")
    else:
      out.append(f"<span class='none'>{_e(title)} (not available offline)</span>")
  return "".join(out)


def _label(value: Optional[str]) -> str:
  if not value:
    return "<span class='none'>-</span>"
  return f"<span class='lab {_e(value)}'>{_e(value)}</span>"


def _gallery(rows: List[Dict]) -> str:
  planted = any(r["images"]["planted"] for r in rows)  # the testbed's known copies
  header = ("rank", "caption", "DCS", "edge", "label", "planted", "one-step images",
            "regenerated images", "matched training image", "TV template + mask") + (
                ("planted training image",) if planted else ())
  out = ["<h2>Top prompts</h2><p>Ordered by score, highest first.</p><table id='gallery'><tr>",
         "".join(f"<th>{h}</th>" for h in header), "</tr>"]
  for rank, r in enumerate(rows, 1):
    v, im = r.get("verify") or {}, r["images"]
    score = r.get("scores", r.get("edge_scores"))
    out.append(
        f"<tr class='item' data-prompt-id='{r['id']}' data-score='{_num(score, '{:.9g}')}'>"
        f"<td class='num'>{rank}</td><td class='cap'>{_e(r.get('caption'))}"
        f"<br><span class='none'>prompt {r['id']}</span></td>"
        f"<td class='num'>{_num(r.get('scores'))}</td>"
        f"<td class='num'>{_num(r.get('edge_scores'))}</td>"
        f"<td>{_label(v.get('overfit_type'))}</td><td>{_label(r.get('kind'))}</td>"
        f"<td class='ims'>{_images(im['onestep'], 'no one-step images')}</td>"
        f"<td class='ims'>{_images(im['generated'], 'not regenerated')}</td>"
        f"<td class='ims'>{_images(im['training'], 'no match' if v else 'not verified')}</td>"
        f"<td>{_images(im['tv_mask'], '-')}</td>" +
        (f"<td>{_images(im['planted'], '-')}</td>" if planted else "") + "</tr>")
  out.append("</table>")
  return "".join(out)


def render(d: Dict, rows: List[Dict], metric_reports: Dict, plots: List[str],
           ks: Sequence[int]) -> str:
  """The whole page as text."""
  missing = ""
  if d["missing"]:
    missing = ("<div class='missing' id='missing'><b>Not in this workdir</b><ul>" +
               "".join(f"<li>{_e(m)}</li>" for m in d["missing"]) + "</ul></div>")
  plot_html = "".join(f"<img class='plot' src='{_e(p)}' alt='{_e(p)}'>" for p in plots)
  when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  return (
      "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
      f"<title>memjax report: {_e(d['workdir'])}</title><style>{_CSS}</style>"
      f"<script>{_SCRIPT_HEAD}</script></head><body>"
      f"<h1>memjax extraction report</h1><p>workdir <code>{_e(d['workdir'])}</code>, "
      f"written {when}</p>{missing}{_summary(d)}{_metrics(metric_reports, ks)}"
      f"{_gallery(rows)}<h2>Plots</h2>{plot_html or '<p class=none>no scores to plot</p>'}"
      f"<pre id='status' hidden></pre><script>{_SCRIPT_TAIL}</script>"
      "</body></html>\n")
