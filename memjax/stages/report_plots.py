"""The report's plots (matplotlib, PNG): score distributions, precision@K, ROC per
type, the pooled ROC of every detector, DCS vs edge.

Each plot is drawn from label sources (`{"ids": [N] scan ids, "labels": [N]}`,
e.g. the testbed's planted kinds and verify's labels) and score columns
(`{scan id: score}`); a plot without the data it needs is not drawn.
"""
import os
from typing import Dict, List, Sequence

import numpy as np

from memjax.method import detection

_COLORS = {"MV": "#d62728", "TV": "#9467bd", "RV": "#ff7f0e", "N": "#1f77b4",
           "unique": "#1f77b4", "heldout": "#2ca02c"}
_NAMES = {"scores": "DCS (whitebox)", "wen": "Wen et al. norm", "edge_scores": "edge score",
          "wen981": "Wen et al. at t=981", "jeon": "Jeon et al. sharpness",
          "asthana": "Asthana & Belagiannis", "asthana_norm": "Asthana norm part",
          "asthana_cos": "Asthana cosine part", "ren_le": "Ren et al. entropy",
          "wen_steps": "Wen et al. over DDIM steps", "bright_ending": "Bright Ending (Chen et al.)"}
_PRECISION_COLUMNS = ("scores", "edge_scores", "wen")  # the precision@K plot's lines


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # files only: no display on a server
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _joined(source: Dict, column: Dict[int, float]):
  """(labels [M], scores [M], ids [M]) of the source's rows that have a score."""
  keep = [(lab, column[i], i) for i, lab in zip(source["ids"].tolist(), source["labels"])
          if i in column and lab is not None]
  if not keep:
    return [], np.zeros(0), np.zeros(0, np.int64)
  labels, scores, ids = zip(*keep)
  return list(labels), np.asarray(scores, np.float64), np.asarray(ids, np.int64)


def precision_curve(labels: Sequence[str], scores: np.ndarray, ids: np.ndarray,
                    positive: Sequence[str]) -> np.ndarray:
  """[M] precision@k for k = 1..M, ranked by score (ties: lower id first)."""
  order = np.lexsort((ids, -scores))
  pos = np.isin(np.asarray(labels, object)[order], list(positive))
  return np.cumsum(pos) / np.arange(1, len(pos) + 1)


def _distributions(plt, path, labels_by_source, scores):
  column = scores.get("scores") or scores.get("edge_scores")
  name = "scores" if "scores" in scores else "edge_scores"
  fig, axes = plt.subplots(1, len(labels_by_source), figsize=(5.5 * len(labels_by_source), 3.6),
                           squeeze=False)
  for ax, (source, data) in zip(axes[0], labels_by_source.items()):
    labels, values, _ = _joined(data, column)
    bins = np.histogram_bin_edges(values, bins=30) if len(values) else 10
    for lab in sorted(set(labels)):
      v = values[np.asarray(labels, object) == lab]
      ax.hist(v, bins=bins, alpha=0.55, label=f"{lab} ({len(v)})", color=_COLORS.get(lab),
              density=True)
    ax.set(title=f"{_NAMES[name]} by {source} label", xlabel=_NAMES[name], ylabel="density")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _precision(plt, path, labels_by_source, scores, positive):
  fig, ax = plt.subplots(figsize=(6, 3.8))
  styles = {"scores": "-", "edge_scores": "--", "wen": ":"}
  colors = {"planted": "#1f77b4", "verified": "#d62728"}
  for source, data in labels_by_source.items():
    for col in [c for c in _PRECISION_COLUMNS if c in scores]:
      labels, s, ids = _joined(data, scores[col])
      if len(s):
        curve = precision_curve(labels, s, ids, positive)
        ax.plot(np.arange(1, len(curve) + 1), curve, styles.get(col, "-"),
                color=colors.get(source), label=f"{_NAMES.get(col, col)} / {source} labels")
  ax.set(title="precision@K (positives: " + ", ".join(positive) + ")", xlabel="K",
         ylabel="precision", ylim=(-0.02, 1.02))
  ax.set_xscale("log")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _both_classes(data, positive) -> bool:
  labels = set(data["labels"])
  return bool(labels & set(positive)) and bool(labels - set(positive))


def _roc_panels(plt, path, labels_by_source, positive, draw, title) -> bool:
  """One ROC panel per label source with both classes: draw(ax, data) plots the
  curves and says whether it drew any; title(source) names the panel."""
  labels_by_source = {k: v for k, v in labels_by_source.items() if _both_classes(v, positive)}
  if not labels_by_source:
    return False
  fig, axes = plt.subplots(1, len(labels_by_source), figsize=(5 * len(labels_by_source), 4.2),
                           squeeze=False)
  drawn = False
  for ax, (source, data) in zip(axes[0], labels_by_source.items()):
    drawn |= draw(ax, data)
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(title(source), fontsize=10)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  if drawn:
    fig.savefig(path, dpi=90)
  plt.close(fig)
  return drawn


def _roc(plt, path, labels_by_source, scores, positive) -> bool:
  """The ROC of each positive type against N, for the DCS and the edge score."""
  def draw(ax, data):
    drawn = False
    for col, style in (("scores", "-"), ("edge_scores", "--")):
      if col not in scores:
        continue
      labels, s, _ = _joined(data, scores[col])
      labels = np.asarray(labels, object)
      negative = ~np.isin(labels, list(positive))
      for t in positive:
        pos = labels == t
        if pos.any() and negative.any():
          keep = pos | negative
          curve = detection.roc_curve(pos[keep], s[keep])
          ax.plot(curve.fpr, curve.tpr, style, color=_COLORS.get(t),
                  label=f"{t} {_NAMES[col]} AUC {detection.roc_auc(curve):.3f}")
          drawn = True
    return drawn
  return _roc_panels(plt, path, labels_by_source, positive, draw,
                     lambda source: f"ROC per type ({source} labels)")


def _roc_detectors(plt, path, labels_by_source, scores, positive) -> bool:
  """The pooled ROC (every positive type against N) of every score column; each
  legend entry says on how many prompts (a subset column has fewer)."""
  def draw(ax, data):
    drawn = False
    for n, (col, values) in enumerate(scores.items()):
      labels, s, _ = _joined(data, values)
      pos = np.isin(np.asarray(labels, object), list(positive))
      if pos.any() and not pos.all():
        curve = detection.roc_curve(pos, s)
        ax.plot(curve.fpr, curve.tpr, "-" if n < 10 else "--", color=f"C{n % 10}",
                label=f"{_NAMES.get(col, col)} AUC {detection.roc_auc(curve):.3f} "
                      f"(n={len(s)})")
        drawn = True
    return drawn
  return _roc_panels(plt, path, labels_by_source, positive, draw, lambda source: (
      f"ROC per detector, pooled {'+'.join(positive)} ({source} labels)"))


def _scatter(plt, path, labels_by_source, scores):
  dcs, edge = scores["scores"], scores["edge_scores"]
  ids = sorted(set(dcs) & set(edge))
  label_of = {}
  for source in ("planted", "verified"):  # the verified label wins where both exist
    if source in labels_by_source:
      label_of.update(zip(labels_by_source[source]["ids"].tolist(),
                          labels_by_source[source]["labels"]))
  fig, ax = plt.subplots(figsize=(5.5, 4.2))
  labs = [label_of.get(i, "unlabelled") for i in ids]
  for lab in sorted(set(labs)):
    sel = [i for i, l in zip(ids, labs) if l == lab]
    ax.scatter([dcs[i] for i in sel], [edge[i] for i in sel], s=18, label=f"{lab} ({len(sel)})",
               color=_COLORS.get(lab, "#7f7f7f"))
  ax.set(title="DCS against edge score (prompts attacked by both)", xlabel=_NAMES["scores"],
         ylabel=_NAMES["edge_scores"])
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def write_all(out_dir: str, labels_by_source: Dict[str, Dict], scores: Dict[str, Dict],
              positive: Sequence[str]) -> List[str]:
  """Draws every plot the data allows into out_dir; returns their file names."""
  plt = _pyplot()
  os.makedirs(out_dir, exist_ok=True)
  names = []
  if scores and labels_by_source:
    _distributions(plt, os.path.join(out_dir, "score_distributions.png"), labels_by_source,
                   scores)
    _precision(plt, os.path.join(out_dir, "precision_at_k.png"), labels_by_source, scores,
               positive)
    names += ["score_distributions.png", "precision_at_k.png"]
    if _roc(plt, os.path.join(out_dir, "roc.png"), labels_by_source, scores, positive):
      names.append("roc.png")
    if _roc_detectors(plt, os.path.join(out_dir, "roc_detectors.png"), labels_by_source,
                      scores, positive):
      names.append("roc_detectors.png")
  elif scores:  # no labels: the distribution of the scores alone
    col = "scores" if "scores" in scores else next(iter(scores))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.hist(list(scores[col].values()), bins=30)
    ax.set(title=f"{_NAMES.get(col, col)} of every prompt (no labels)", xlabel=col,
           ylabel="prompts")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "score_distributions.png"), dpi=90)
    plt.close(fig)
    names.append("score_distributions.png")
  if "scores" in scores and "edge_scores" in scores and set(scores["scores"]) & set(
      scores["edge_scores"]):
    _scatter(plt, os.path.join(out_dir, "dcs_vs_edge.png"), labels_by_source, scores)
    names.append("dcs_vs_edge.png")
  return names
