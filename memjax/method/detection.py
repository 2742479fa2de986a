"""Detection metrics of memorization scores against labels (docs/method.md section 8).

For a score (higher = more likely memorized) and labels, for the pooled positives
as well as each label type separately (never only pooled):

- precision@K = #{positives among the top K by score} / K, ranking every row
  with a score (other positive types too; they do not count for one type),
  ties by a tiebreak (prompt_id) ascending; None for fewer than K rows.
- ROC curve as scikit-learn's `roc_curve(y, s, drop_intermediate=False)`:
  thresholds at the distinct scores, descending; at threshold t a row is
  called positive when its score >= t; the curve starts at (fpr, tpr) = (0, 0)
  with threshold +inf. (sklearn's default drop_intermediate=True, used by Wen
  et al., removes collinear points; that never changes the AUC and changes a
  TPR@FPR, of either convention, only when tied scores of both classes make a
  straight run across its target fpr.)
- AUC = trapezoidal area under that curve = Mann-Whitney U / (P N), ties half.
- TPR@1%FPR, two conventions of the literature:
  below (Wen et al.):            tpr[last index where fpr < 0.01];
  closest (Jeon, Asthana, Ren):  tpr[argmin |fpr - 0.01|] (numpy, float64: the
  first index among equal distances; the chosen fpr may exceed 1%).
- TPR@0.1%FPR = tpr[last index where fpr < 0.001] (below).
- accuracy = max over the curve of 1 - (fpr + 1 - tpr) / 2.

Positives of a type T are the rows labelled T; negatives, those whose label is
none of the positive types (N); other positive types are left out of T's ROC.
Everything here is pure numpy.
"""
import collections
from typing import Dict, Optional, Sequence

import numpy as np


# fpr, tpr, thresholds: [n_points]; fps, tps: the counts at each point.
RocCurve = collections.namedtuple("RocCurve", "fpr tpr thresholds fps tps")


def roc_curve(y_true, y_score, drop_intermediate: bool = False) -> RocCurve:
  """The ROC curve exactly as scikit-learn's `roc_curve` builds it.

  Args:
    y_true: [N] bool, True for positives (both classes must occur).
    y_score: [N] finite or infinite float scores, higher = more positive.
    drop_intermediate: drop collinear points (sklearn's default rule).
  """
  y = np.asarray(y_true, bool).ravel()
  s = np.asarray(y_score, np.float64).ravel()
  if y.shape != s.shape or np.isnan(s).any() or y.all() or not y.any():
    raise ValueError("roc_curve needs [N] labels of both classes and [N] non-NaN scores")
  order = np.argsort(s, kind="mergesort")[::-1]
  s, y = s[order], y[order]
  idx = np.r_[np.where(np.diff(s))[0], s.size - 1]
  tps = np.cumsum(y, dtype=np.int64)[idx]
  fps = 1 + idx - tps
  thresholds = s[idx]
  if drop_intermediate and fps.size > 2:
    keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
    fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
  fps, tps = np.r_[0, fps], np.r_[0, tps]
  return RocCurve(fps / fps[-1], tps / tps[-1], np.r_[np.inf, thresholds], fps, tps)


def roc_auc(curve: RocCurve) -> float:
  """Trapezoidal AUC, summed in exact integers and divided once."""
  twice_area = np.sum(np.diff(curve.fps) * (curve.tps[1:] + curve.tps[:-1]))
  return float(twice_area / (2 * curve.fps[-1] * curve.tps[-1]))


def tpr_at_fpr(curve: RocCurve, max_fpr: float = 0.01) -> float:
  """tpr at the last point with fpr < max_fpr (point 0 always qualifies)."""
  return float(curve.tpr[np.where(curve.fpr < max_fpr)[0][-1]])


def tpr_at_fpr_closest(curve: RocCurve, target_fpr: float = 0.01) -> float:
  """tpr at the point whose fpr is closest to target_fpr (may be above it).

  Exactly the authors' `tpr[np.argmin(np.abs(fpr - 0.01))]` on the same curve:
  distances in float64, the first index wins a tie. Two fprs equally far in exact
  arithmetic are decided by that rounding (200 negatives, no point at 0.01:
  0.015 beats 0.005), and at one fpr the first point, the lowest tpr, is taken.
  For 0.01 with at most 50 negatives, that is (0, 0): tpr 0.
  """
  return float(curve.tpr[np.argmin(np.abs(curve.fpr - target_fpr))])


def best_accuracy(curve: RocCurve) -> float:
  """max(1 - (fpr + 1 - tpr) / 2): balanced accuracy at the best threshold."""
  return float(np.max(1 - (curve.fpr + 1 - curve.tpr) / 2))


def precision_at_k(is_positive, scores, ks: Sequence[int],
                   tiebreak=None) -> Dict[int, Optional[float]]:
  """{K: #positives among the top K by score / K}; None when fewer than K rows.

  Ranked by score descending, ties by tiebreak (default: position) ascending.
  """
  scores = np.asarray(scores, np.float64)
  tiebreak = np.arange(scores.size) if tiebreak is None else np.asarray(tiebreak)
  hits = np.cumsum(np.asarray(is_positive, bool)[np.lexsort((tiebreak, -scores))])
  return {int(k): (float(hits[k - 1] / k) if 0 < k <= hits.size else None) for k in ks}


def detection_metrics(labels: Sequence[str], scores, positive: Sequence[str],
                      ks: Sequence[int], tiebreak=None) -> Dict[str, dict]:
  """Metrics for the pooled positives and each positive type.

  Args:
    labels: [N] label strings (rows with a NaN or infinite score are dropped here).
    scores: [N] float, higher = more likely memorized.
    positive: the positive label types (e.g. MV, RV, TV).
    ks: the K of precision@K.
    tiebreak: [N] ranks ties (default: position).

  Returns:
    {"pooled" and each type: {auc, tpr_at_1pct_fpr (below 1%, Wen et al.),
    tpr_at_1pct_fpr_closest (closest to 1%), tpr_at_01pct_fpr (below 0.1%),
    accuracy, n_pos, n_neg, precision_at_k}}; ROC numbers are None when a class
    is empty.
  """
  scores = np.asarray(scores, np.float64)
  tiebreak = np.arange(scores.size) if tiebreak is None else np.asarray(tiebreak)
  valid = np.isfinite(scores)  # NaN and inf scores are dropped, never ranked
  labels, scores, tiebreak = np.asarray(labels, object)[valid], scores[valid], tiebreak[valid]
  negative = ~np.isin(labels, list(positive))
  out = {}
  for group in ["pooled"] + list(positive):
    pos = ~negative if group == "pooled" else labels == group
    row = out[group] = {"n_pos": int(pos.sum()), "n_neg": int(negative.sum()), "auc": None,
                        "tpr_at_1pct_fpr": None, "tpr_at_1pct_fpr_closest": None,
                        "tpr_at_01pct_fpr": None, "accuracy": None,
                        "precision_at_k": precision_at_k(pos, scores, ks, tiebreak)}
    if row["n_pos"] and row["n_neg"]:
      curve = roc_curve(pos[pos | negative], scores[pos | negative])
      row.update(auc=roc_auc(curve), tpr_at_1pct_fpr=tpr_at_fpr(curve, 0.01),
                 tpr_at_1pct_fpr_closest=tpr_at_fpr_closest(curve, 0.01),
                 tpr_at_01pct_fpr=tpr_at_fpr(curve, 0.001), accuracy=best_accuracy(curve))
  return out
