"""memjax.metrics: ROC / AUC / TPR@1%FPR (both conventions) / TPR@0.1%FPR /
precision@K against hand-computed cases and an independent brute-force ROC, every
detector column side by side, and the CLI's joins, table and bad input.

scikit-learn is not installed here; its `roc_curve` (drop_intermediate=False)
is restated in `_brute_roc` from its definition: one point per distinct score
t, descending, fpr = #{neg >= t} / N, tpr = #{pos >= t} / P, after (0, 0).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import mannwhitneyu

from memjax.method import detection
from memjax.method import trajectory_detectors
from memjax.runtime import shards
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError
from memjax.stages import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _brute_roc(y, s):
  y, s = np.asarray(y, bool), np.asarray(s, np.float64)
  fpr, tpr = [0.0], [0.0]
  for t in sorted(set(s.tolist()), reverse=True):
    fpr.append(np.sum(s[~y] >= t) / np.sum(~y))
    tpr.append(np.sum(s[y] >= t) / np.sum(y))
  return np.array(fpr), np.array(tpr)


@pytest.mark.parametrize("y,s,fpr,tpr,auc,tpr1,acc", [
    # perfect separation
    ([1, 1, 0, 0], [4, 3, 2, 1], [0, 0, 0, .5, 1], [0, .5, 1, 1, 1], 1.0, 1.0, 1.0),
    # reversed
    ([1, 1, 0, 0], [1, 2, 3, 4], [0, .5, 1, 1, 1], [0, 0, 0, .5, 1], 0.0, 0.0, 0.5),
    # all scores equal: one threshold, the diagonal
    ([1, 0, 1, 0, 0], [5, 5, 5, 5, 5], [0, 1], [0, 1], 0.5, 0.0, 0.5),
    # ties that mix classes: AUC 5/9 (pairs: 3 wins, 2 ties, 4 losses... counted by hand)
    ([1, 0, 1, 0, 1, 0], [3, 3, 2, 2, 1, 0], [0, 1 / 3, 2 / 3, 2 / 3, 1],
     [0, 1 / 3, 2 / 3, 1, 1], 5 / 9, 0.0, 2 / 3),
])
def test_hand_computed_roc(y, s, fpr, tpr, auc, tpr1, acc):
  curve = detection.roc_curve(y, s)
  np.testing.assert_array_equal(curve.fpr, fpr)
  np.testing.assert_array_equal(curve.tpr, tpr)
  assert curve.thresholds[0] == np.inf
  np.testing.assert_array_equal(curve.thresholds[1:], sorted(set(s), reverse=True))
  assert detection.roc_auc(curve) == auc
  assert detection.tpr_at_fpr(curve) == tpr1
  assert detection.best_accuracy(curve) == pytest.approx(acc, abs=1e-15)
  assert detection.best_accuracy(curve) == max(1 - (f + 1 - t) / 2 for f, t in zip(fpr, tpr))


def test_tpr_at_1pct_fpr_takes_last_point_strictly_below():
  # 200 negatives, 10 positives: 3 positives, 1 negative (fpr 0.005), 2 positives,
  # 1 negative (fpr 0.01, NOT < 0.01), the rest below.
  s = [100, 99, 98, 97, 96, 95, 94] + [1] * 5 + [0] * 198
  y = [1, 1, 1, 0, 1, 1, 0] + [1] * 5 + [0] * 198
  curve = detection.roc_curve(y, s)
  assert detection.tpr_at_fpr(curve, 0.01) == 0.5
  assert detection.tpr_at_fpr(curve, 0.0100001) == 1.0  # now (0.01, 1.0) counts
  assert detection.tpr_at_fpr(curve, 0.02) == 1.0


def _curve(runs, n_neg_tail=0, n_pos_tail=0):
  """(y, s): `runs` of (n_pos, n_neg) tied at one score each, descending, then
  n_neg_tail negatives and n_pos_tail positives at the bottom."""
  y, s = [], []
  for i, (p, n) in enumerate(runs):
    y += [1] * p + [0] * n
    s += [1000.0 - i] * (p + n)
  return y + [0] * n_neg_tail + [1] * n_pos_tail, s + [-1.0] * n_neg_tail + [-2.0] * n_pos_tail


def _closest_restated(fpr, tpr, target):
  """The authors' rule restated in plain Python: the first index of the least
  float distance (min keeps the first of equal keys)."""
  return tpr[min(range(len(fpr)), key=lambda i: abs(float(fpr[i]) - target))]


@pytest.mark.parametrize("runs,neg_tail,pos_tail,below,closest,below01", [
    # 60 negatives: a negative tied with 2 positives enters at fpr 1/60 = 0.0167, closer
    # to 0.01 than 0: closest takes that point (tpr 4/10, above 1% FPR), below the last
    # point at fpr 0 (tpr 2/10).
    ([(2, 0), (2, 1), (3, 0)], 59, 3, 0.2, 0.4, 0.2),
    # 200 negatives, a tie of 2 negatives and a positive jumps fpr 0.005 -> 0.015 (no
    # point at 0.01). Equally far in exact arithmetic; in float64 |0.015 - 0.01| <
    # |0.005 - 0.01|, so the authors' numpy takes fpr 0.015 (tpr 4/10), not the first
    # point at 0.005 (tpr 1/10); below takes the last point at 0.005 (tpr 3/10).
    ([(1, 0), (0, 1), (2, 0), (1, 2), (2, 0)], 197, 4, 0.3, 0.4, 0.1),
    # 100 negatives: fpr 0.01 exists, reached with a tied positive (tpr 4/10), then one
    # more positive (5/10); closest takes the FIRST point at fpr 0.01 (4/10), below the
    # last point before it (3/10).
    ([(3, 0), (1, 1), (1, 0), (1, 1), (2, 0)], 98, 2, 0.3, 0.4, 0.3),
    # 50 negatives, perfect separation: (0, 0) and (0.02, 1) are equally far from 0.01
    # and (0, 0) comes first: closest gives 0 whatever the score; below gives 1.
    ([(5, 0)], 50, 0, 1.0, 0.0, 1.0),
    # 2000 negatives: fpr 0.0005 < 0.001 counts for TPR@0.1%, fpr 0.001 does not.
    ([(1, 0), (0, 1), (1, 0), (0, 1), (1, 0), (0, 18), (1, 0)], 1980, 6, 0.3, 0.3, 0.2),
])
def test_tpr_conventions_on_hand_built_curves(runs, neg_tail, pos_tail, below, closest,
                                              below01):
  y, s = _curve(runs, neg_tail, pos_tail)
  curve = detection.roc_curve(y, s)
  assert detection.tpr_at_fpr(curve, 0.01) == below
  assert detection.tpr_at_fpr_closest(curve, 0.01) == closest
  assert detection.tpr_at_fpr(curve, 0.001) == below01
  fpr, tpr = _brute_roc(y, s)
  assert _closest_restated(fpr, tpr, 0.01) == closest
  row = detection.detection_metrics(np.where(y, "MV", "N"), s, ["MV"], [1])["MV"]
  assert (row["tpr_at_1pct_fpr"], row["tpr_at_1pct_fpr_closest"],
          row["tpr_at_01pct_fpr"]) == (below, closest, below01)


def test_the_float_tie_is_not_the_exact_tie():
  """The second case above: exact arithmetic would take fpr 0.005 first."""
  from fractions import Fraction
  y, s = _curve([(1, 0), (0, 1), (2, 0), (1, 2), (2, 0)], 197, 4)
  curve = detection.roc_curve(y, s)
  exact = [abs(Fraction(int(f), 200) - Fraction(1, 100)) for f in curve.fps]
  assert curve.tpr[exact.index(min(exact))] == 0.1
  assert detection.tpr_at_fpr_closest(curve) == 0.4


def test_drop_intermediate_follows_sklearn_rule():
  # each tied score holds one positive and one negative: a straight diagonal run
  y, s = [1, 0, 1, 0, 1, 0], [4, 4, 3, 3, 2, 2]
  full = detection.roc_curve(y, s)
  dropped = detection.roc_curve(y, s, drop_intermediate=True)
  np.testing.assert_array_equal(full.fpr, [0, 1 / 3, 2 / 3, 1])
  np.testing.assert_array_equal(dropped.fpr, [0, 1 / 3, 1])
  np.testing.assert_array_equal(dropped.thresholds, [np.inf, 4, 2])
  assert detection.roc_auc(full) == detection.roc_auc(dropped) == 0.5


def test_random_arrays_equal_brute_force_and_mann_whitney():
  rng = np.random.default_rng(0)
  for trial in range(100):
    n = int(rng.integers(2, 80))
    y = rng.random(n) < rng.uniform(0.05, 0.95)
    y[0], y[1] = True, False
    s = (rng.integers(0, 8, n) if trial % 2 else rng.standard_normal(n)).astype(np.float64)
    curve = detection.roc_curve(y, s)
    fpr, tpr = _brute_roc(y, s)
    np.testing.assert_array_equal(curve.fpr, fpr)
    np.testing.assert_array_equal(curve.tpr, tpr)
    u = mannwhitneyu(s[y], s[~y]).statistic
    assert detection.roc_auc(curve) == u / (y.sum() * (~y).sum())
    assert detection.tpr_at_fpr(curve) == tpr[np.where(fpr < 0.01)[0][-1]]
    assert detection.tpr_at_fpr_closest(curve) == _closest_restated(fpr, tpr, 0.01)
    assert detection.best_accuracy(curve) == np.max(1 - (fpr + 1 - tpr) / 2)


def test_large_random_arrays_both_conventions_equal_brute_force():
  """Hundreds to thousands of negatives, so that 1% and 0.1% FPR fall inside the
  curve; integer scores make tie groups that skip fprs."""
  rng = np.random.default_rng(1)
  differ = 0
  for trial in range(12):
    n = int(rng.integers(150, 2500))
    y = rng.random(n) < rng.uniform(0.05, 0.5)
    y[0], y[1] = True, False
    s = (rng.integers(0, 60, n) if trial % 2 else rng.standard_normal(n)).astype(np.float64)
    s += 1.5 * y
    curve = detection.roc_curve(y, s)
    fpr, tpr = _brute_roc(y, s)
    np.testing.assert_array_equal(curve.fpr, fpr)
    for target in (0.01, 0.001):
      assert detection.tpr_at_fpr(curve, target) == max(
          [0.0] + [t for f, t in zip(fpr, tpr) if f < target])
      assert detection.tpr_at_fpr_closest(curve, target) == _closest_restated(fpr, tpr, target)
    differ += detection.tpr_at_fpr(curve) != detection.tpr_at_fpr_closest(curve)
  assert differ  # the two conventions are not the same number here


def test_precision_at_k_ties_by_id():
  pos = [0, 1, 1, 0, 1, 0]
  s = [5, 5, 4, 3, 3, 1]
  ids = [1, 0, 2, 3, 4, 5]  # the tie at 5: id 0 (a positive) first
  p = detection.precision_at_k(pos, s, [1, 2, 4, 5, 6, 7], ids)
  assert p == {1: 1.0, 2: 0.5, 4: 0.5, 5: 0.6, 6: 0.5, 7: None}
  p = detection.precision_at_k(pos, s, [1], [0, 1, 2, 3, 4, 5])
  assert p == {1: 0.0}


def test_per_type_negatives_exclude_other_positive_types():
  labels = ["MV", "N", "TV", "N", "RV", "N", "MV"]
  s = [7, 6, 5, 4, 3, 2, np.nan]  # the NaN-score row is dropped
  out = detection.detection_metrics(labels, s, ["MV", "RV", "TV"], [1, 3])
  assert out["pooled"]["n_pos"] == 3 and out["pooled"]["n_neg"] == 3
  assert out["pooled"]["precision_at_k"] == {1: 1.0, 3: 2 / 3}
  # MV: 7 vs negatives 6, 4, 2
  assert out["MV"]["auc"] == 1.0 and out["MV"]["n_pos"] == 1
  # TV: 5 vs 6, 4, 2 -> 2/3; p@1 counts only TV, the MV row still ranks first
  assert out["TV"]["auc"] == 2 / 3 and out["TV"]["precision_at_k"] == {1: 0.0, 3: 1 / 3}
  assert out["RV"]["auc"] == 1 / 3
  assert out["RV"]["tpr_at_1pct_fpr"] == 0.0 and out["MV"]["tpr_at_1pct_fpr"] == 1.0
  # 3 negatives: the point nearest 1% FPR is the first at fpr 0, (0, 0)
  assert out["MV"]["tpr_at_1pct_fpr_closest"] == 0.0 and out["MV"]["tpr_at_01pct_fpr"] == 1.0
  empty = detection.detection_metrics(["N", "N"], [1, 2], ["MV"], [1])["MV"]
  assert {k for k, v in empty.items() if v is None} == {
      "auc", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_closest", "tpr_at_01pct_fpr", "accuracy"}


def test_the_documented_check_example():
  """docs/method.md section 8, the table under 'Check'."""
  out = detection.detection_metrics(["MV", "N", "MV", "N", "TV", "N"],
                                    [0.9, 0.8, 0.8, 0.7, 0.3, 0.2], ["MV", "RV", "TV"],
                                    [1, 2, 3, 5], [0, 1, 2, 3, 4, 5])
  want = {"pooled": (13 / 18, 1 / 3, 0, 1 / 3, 2 / 3, [1, .5, 2 / 3, .6]),
          "MV": (11 / 12, .5, 0, .5, 5 / 6, [1, .5, 2 / 3, .4]),
          "TV": (1 / 3, 0, 0, 0, 2 / 3, [0, 0, 0, .2]),
          "RV": (None, None, None, None, None, [0, 0, 0, 0])}
  for group, (auc, below, closest, below01, acc, pk) in want.items():
    r = out[group]
    got = (r["auc"], r["tpr_at_1pct_fpr"], r["tpr_at_1pct_fpr_closest"],
           r["tpr_at_01pct_fpr"], r["accuracy"])
    assert got == pytest.approx((auc, below, closest, below01, acc)) if auc else \
        got == (None,) * 5, group
    assert list(r["precision_at_k"].values()) == pytest.approx(pk)


def _workdir(tmp_path, n=40, seed=0):
  """A scan-like workdir (scan/ and blackbox/ shards) and a labels table."""
  rng = np.random.default_rng(seed)
  ids = np.arange(n)
  labels = rng.choice(["MV", "RV", "TV", "N", "N", "N"], n)
  dcs = rng.standard_normal(n) + (labels != "N")
  wen = rng.integers(0, 5, n).astype(np.float64)  # ties
  wen[7] = np.nan
  edge = rng.random(n)
  work = str(tmp_path / "w")
  captions = [f"caption {i}" for i in ids]
  scan = shards.ShardWriter(os.path.join(work, "scan"))
  for a, b in [(0, n // 2), (n // 2, n)]:
    scan.write(pa.table({"caption": captions[a:b], "prompt_id": ids[a:b], "scores": dcs[a:b],
                         "wen": wen[a:b]}), a, b)
  # blackbox fed by the scan: its own prompt_id renumbers, scan_prompt_id keeps the scan's
  perm = rng.permutation(n)
  shards.ShardWriter(os.path.join(work, "blackbox")).write(
      pa.table({"prompt_id": ids, "scan_prompt_id": perm, "edge_scores": edge[perm]}), 0, n)
  return work, ids, labels, {"scores": dcs, "wen": wen, "edge_scores": edge}, captions


def test_cli_run_joins_on_prompt_id_and_equals_direct_computation(tmp_path):
  work, ids, labels, cols, _ = _workdir(tmp_path)
  keep = ids[5:]  # labels for a subset, in another order, with an empty label
  table = {"prompt_id": keep[::-1], "overfit_type": labels[keep][::-1].tolist()}
  table["overfit_type"][0] = ""
  pq.write_table(pa.table(table), tmp_path / "labels.parquet")
  out = str(tmp_path / "m" / "metrics.json")
  cfg = metrics.MetricsConfig(scores=[work], labels=str(tmp_path / "labels.parquet"),
                              k_list=[5, 10, 100], out=out)
  report = metrics.run(cfg)
  assert report == json.load(open(out))
  assert report["join_key"] == "prompt_id" and report["label_rows_without_label"] == 1
  used = keep[keep != ids[-1]]  # the empty label was the last id
  for column in ("scores", "wen", "edge_scores"):
    s, y = cols[column][used], labels[used]
    ok = ~np.isnan(s)
    for group in ("pooled", "MV", "RV", "TV"):
      got = report["results"][group][column]
      pos = (y != "N") if group == "pooled" else (y == group)
      neg = y == "N"
      assert got["n_pos"] == int((pos & ok).sum()) and got["n_neg"] == int((neg & ok).sum())
      a, b = s[pos & ok], s[neg & ok]
      assert got["auc"] == mannwhitneyu(a, b).statistic / (a.size * b.size)
      order = np.lexsort((used[ok], -s[ok]))
      top = pos[ok][order]
      assert got["precision_at_k"] == {"5": top[:5].sum() / 5, "10": top[:10].sum() / 10,
                                       "100": None}
  assert report["columns"]["edge_scores"]["source"].endswith("blackbox")
  assert report["columns"]["wen"]["dropped_nonfinite_score"] == 1


def _detector_workdir(tmp_path, n=60, seed=3):
  """A scan with every detector column (nulls, NaN, a score that ranks memorized
  prompts lower, a constant) and an extra column, a blackbox, and labels."""
  rng = np.random.default_rng(seed)
  ids = np.arange(n)
  labels = rng.choice(["MV", "TV", "RV", "N", "N", "N"], n)
  mem = (labels != "N").astype(np.float64)
  cols = {"scores": rng.standard_normal(n) + mem, "wen": rng.integers(0, 4, n) + mem,
          "wen981": rng.standard_normal(n) + 2 * mem, "jeon": -rng.standard_normal(n) - mem,
          "asthana": rng.standard_normal(n) + mem, "asthana_norm": rng.standard_normal(n),
          "asthana_cos": np.full(n, 0.5), "ren_le": rng.standard_normal(n) + mem,
          "custom": rng.standard_normal(n)}
  cols["wen981"][[3, 4]] = np.nan  # status rows: NaN
  work = str(tmp_path / "w")
  table = {"prompt_id": ids, "caption": [f"caption {i}" for i in ids]}
  for c, v in cols.items():
    table[c] = pa.array([None if c == "ren_le" and i % 7 == 0 else float(x)  # nulls
                         for i, x in enumerate(v)], pa.float64())
  shards.ShardWriter(os.path.join(work, "scan")).write(pa.table(table), 0, n)
  cols["ren_le"][ids % 7 == 0] = np.nan
  cols["edge_scores"] = rng.random(n)
  shards.ShardWriter(os.path.join(work, "blackbox")).write(
      pa.table({"prompt_id": ids, "scan_prompt_id": ids, "edge_scores": cols["edge_scores"]}),
      0, n)
  path = str(tmp_path / "labels.parquet")
  pq.write_table(pa.table({"prompt_id": ids, "overfit_type": labels}), path)
  return work, path, ids, labels, cols


def test_every_detector_column_side_by_side(tmp_path):
  work, path, ids, labels, cols = _detector_workdir(tmp_path)
  report = metrics.run(metrics.MetricsConfig(scores=[work], labels=path, k_list=[5, 10],
                                             score_columns=["custom", "scores"]))
  detectors = ["scores", "wen", "wen981", "jeon", "asthana", "asthana_norm", "asthana_cos",
               "ren_le", "edge_scores"]
  assert list(report["columns"]) == detectors + ["custom"]  # detectors first, in order
  assert list(report["results"]) == ["pooled", "MV", "RV", "TV"]
  assert report["columns"]["wen981"]["dropped_nonfinite_score"] == 2
  assert report["columns"]["ren_le"]["dropped_nonfinite_score"] == int((ids % 7 == 0).sum())
  assert report["score_columns_missing"] == list(metrics.GENERATE_DETECTORS)  # no generate
  for column in detectors + ["custom"]:
    direct = detection.detection_metrics(labels, cols[column], ["MV", "RV", "TV"], [5, 10], ids)
    for group, row in direct.items():
      got = report["results"][group][column]
      assert {k: v for k, v in got.items() if k != "precision_at_k"} == \
          {k: v for k, v in row.items() if k != "precision_at_k"}, (group, column)
      assert set(got) >= {"auc", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_closest",
                          "tpr_at_01pct_fpr", "accuracy", "n_pos", "n_neg"}
      assert got["precision_at_k"] == {str(k): v for k, v in row["precision_at_k"].items()}
  pooled = report["results"]["pooled"]
  assert pooled["jeon"]["auc"] < 0.5  # raw, never flipped
  assert pooled["asthana_cos"]["auc"] == 0.5  # a constant: one threshold, the diagonal
  assert pooled["wen981"]["n_pos"] + pooled["wen981"]["n_neg"] == len(ids) - 2


def test_a_scan_with_todays_columns_only(tmp_path):
  work, ids, labels, cols, _ = _workdir(tmp_path)
  path = str(tmp_path / "labels.parquet")
  pq.write_table(pa.table({"prompt_id": ids, "overfit_type": labels}), path)
  report = metrics.run(metrics.MetricsConfig(scores=[work], labels=path, k_list=[5]))
  assert list(report["columns"]) == ["scores", "wen", "edge_scores"]
  assert report["score_columns_missing"] == ["wen981", "jeon", "asthana", "asthana_norm",
                                             "asthana_cos", "ren_le", "wen_steps",
                                             "bright_ending"]
  text = metrics.format_table(report)
  assert "jeon" not in text and "wen981" not in text
  # an absent column asked for by name is still an error, a detector's as another's
  with pytest.raises(InputError, match="no score column 'jeon'"):
    metrics.run(metrics.MetricsConfig(scores=[work], labels=path, score_columns=["jeon"]))


def _generate_workdir(tmp_path, n=40, k=12, seeds=(0, 1, 2)):
  """A scan of n prompts and the generate stage's table of its top k by DCS (fed by
  the scan: own ids 0..k-1, scan_prompt_id, the scan's `scores` as an input column),
  one row per (prompt, seed) with wen_steps and bright_ending; one seed of the 4th
  prompt has no image (null values)."""
  rng = np.random.default_rng(11)
  ids = np.arange(n)
  labels = rng.choice(["MV", "TV", "N", "N"], n)
  dcs = rng.standard_normal(n) + (labels != "N")
  work = str(tmp_path / "w")
  captions = [f"caption {i}" for i in ids]
  shards.ShardWriter(os.path.join(work, "scan")).write(
      pa.table({"prompt_id": ids, "caption": captions, "scores": dcs}), 0, n)
  top = np.lexsort((ids, -dcs))[:k]
  per_seed = {c: rng.standard_normal((k, len(seeds))) + (labels[top] != "N")[:, None]
              for c in metrics.GENERATE_DETECTORS}
  rows = [{"prompt_id": g, "caption": captions[p], "seed": s, "status": "ok",
           **{c: None if (g, j) == (3, 1) else float(per_seed[c][g, j]) for c in per_seed},
           "scan_prompt_id": int(p), "scores": float(dcs[p]) + 100}  # not the scan's column
          for g, p in enumerate(top) for j, s in enumerate(seeds)]
  types = {c: pa.float32() for c in per_seed}
  table = pa.Table.from_pylist(rows, pa.schema([(c, types.get(c, pa.array([rows[0][c]]).type))
                                                for c in rows[0]]))
  os.makedirs(os.path.join(work, "generate"))
  pq.write_table(table, workdir_lib.path(work, "generate", workdir_lib.GENERATED_TABLE))
  path = str(tmp_path / "labels.parquet")
  pq.write_table(pa.table({"prompt_id": ids, "caption": captions, "overfit_type": labels}), path)
  means = {c: v.astype(np.float32).astype(np.float64).mean(axis=1) for c, v in per_seed.items()}
  for v in means.values():
    v[3] = np.nan  # a seed without an image: the prompt's mean is null
  return work, path, labels, top, means


def test_generate_stage_detectors_per_prompt_means_on_the_regenerated_subset(tmp_path):
  work, path, labels, top, means = _generate_workdir(tmp_path)
  assert metrics.GENERATE_DETECTORS == trajectory_detectors.TRAJECTORY
  report = metrics.run(metrics.MetricsConfig(scores=[work], labels=path, k_list=[3, 5]))
  assert list(report["columns"]) == ["scores", "wen_steps", "bright_ending"]
  for column in metrics.GENERATE_DETECTORS:
    info = report["columns"][column]
    assert info["source"].endswith(os.path.join("generate", "generated.parquet"))
    assert info["per_seed_rows"] == 36 and info["seeds_per_prompt"] == [3]
    assert info["joined_rows"] == 12 and info["subset"] and info["dropped_nonfinite_score"] == 1
    # the mean over seeds of each regenerated prompt, joined by scan_prompt_id
    direct = detection.detection_metrics(labels[top], means[column], ["MV", "RV", "TV"],
                                         [3, 5], top)
    for group, row in direct.items():
      got = report["results"][group][column]
      assert got["n_pos"] == row["n_pos"] and got["n_neg"] == row["n_neg"]
      assert got["auc"] == pytest.approx(row["auc"], abs=1e-12), (group, column)
      assert got["precision_at_k"] == {str(k): v for k, v in row["precision_at_k"].items()}
    pooled = report["results"]["pooled"][column]
    assert pooled["n_pos"] + pooled["n_neg"] == 11  # the 12 regenerated, less the null one
  scan = report["columns"]["scores"]
  assert scan["source"].endswith("scan") and not scan["subset"] and scan["joined_rows"] == 40
  assert report["results"]["pooled"]["scores"]["n_pos"] == int((labels != "N").sum())
  assert metrics.subset_columns(report) == ["wen_steps", "bright_ending"]
  text = metrics.format_table(report)
  assert "wen_steps*" in text and "bright_ending*" in text and "scores*" not in text
  assert "* evaluated on a subset of the 40 labelled prompts (wen_steps 12, " \
      "bright_ending 12)" in text and "not comparable with the full-set" in text
  # the generate folder or its table alone: the same numbers; on captions too
  for scores in (workdir_lib.stage_dir(work, "generate"),
                 workdir_lib.path(work, "generate", workdir_lib.GENERATED_TABLE)):
    alone = metrics.run(metrics.MetricsConfig(scores=scores, labels=path, k_list=[3, 5]))
    assert list(alone["columns"]) == ["wen_steps", "bright_ending"]
    assert not metrics.subset_columns(alone) and "*" not in metrics.format_table(alone)
    assert alone["results"] == {g: {c: r[c] for c in metrics.GENERATE_DETECTORS}
                                for g, r in report["results"].items()}
  pq.write_table(pq.read_table(path).drop_columns(["prompt_id"]), tmp_path / "by_caption.parquet")
  by_caption = metrics.run(metrics.MetricsConfig(scores=[work], labels=str(
      tmp_path / "by_caption.parquet"), k_list=[3, 5]))
  assert by_caption["join_key"] == "caption"
  assert by_caption["results"]["pooled"]["bright_ending"]["auc"] == \
      report["results"]["pooled"]["bright_ending"]["auc"]


def test_format_table_one_line_per_group_and_detector(tmp_path):
  work, path, _, _, _ = _detector_workdir(tmp_path)
  report = metrics.run(metrics.MetricsConfig(scores=[work], labels=path, k_list=[5, 10]))
  lines = metrics.format_table(report).splitlines()
  assert lines[0].split() == ["group", "detector", "pos", "neg", "auc", "tpr1%<", "tpr1%~",
                              "tpr.1%<", "p@5", "p@10"]
  fmt = lambda v: "-" if v is None else f"{v:.3f}"
  body = [l.split() for l in lines[1:] if not l.startswith("  ")]
  expect = [[group, column, str(r["n_pos"]), str(r["n_neg"]), fmt(r["auc"]),
             fmt(r["tpr_at_1pct_fpr"]), fmt(r["tpr_at_1pct_fpr_closest"]),
             fmt(r["tpr_at_01pct_fpr"]), fmt(r["precision_at_k"]["5"]),
             fmt(r["precision_at_k"]["10"])]
            for group, by_column in report["results"].items() for column, r in by_column.items()]
  assert body == expect and len(body) == 4 * 9
  assert len({len(l) for l in lines[:len(body) + 1]}) == 1  # aligned
  legend = "\n".join(l for l in lines if l.startswith("  "))
  for text in ("tpr1%<: TPR at the largest FPR below 1% (Wen et al.)",
               "tpr1%~: TPR at the FPR closest to 1%", "tpr.1%<: TPR at the largest FPR below "
               "0.1%", "scores: DCS, Webster's denoising confidence",
               "jeon: Jeon et al. sharpness (JVP)", "ren_le: Ren et al. cross-attention entropy",
               "edge_scores: edge, Webster's blackbox edge consistency"):
    assert text in legend, text
  # a report of an older memjax (no new keys) still prints
  for by_column in report["results"].values():
    for r in by_column.values():
      r.pop("tpr_at_1pct_fpr_closest")
  assert "-" in metrics.format_table(report)


def test_cli_run_joins_on_caption_when_labels_have_no_ids(tmp_path):
  work, ids, labels, cols, captions = _workdir(tmp_path)
  rows = ["caption,overfit_type"] + [f'"{captions[i]}",{labels[i]}' for i in ids]
  rows.append(f'"{captions[0]}",TV')  # a caption labelled twice: TV wins
  (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
  report = metrics.run(metrics.MetricsConfig(scores=[work], labels=str(tmp_path / "labels.csv"),
                                             score_columns=["scores"], k_list=[10]))
  assert report["join_key"] == "caption"
  y = labels.copy()
  y[0] = "TV"
  assert report["label_caption_conflicts"] == int(labels[0] != "TV")
  got = report["results"]["TV"]["scores"]
  a, b = cols["scores"][y == "TV"], cols["scores"][y == "N"]
  assert got["auc"] == mannwhitneyu(a, b).statistic / (a.size * b.size)
  # every detector the caption reaches; the blackbox table has no caption: said, left out
  assert list(report["columns"]) == ["scores", "wen"]
  assert report["score_columns_unjoinable"] == ["edge_scores"]
  with pytest.raises(InputError, match="no column 'caption' to join"):  # asked for by name
    metrics.run(metrics.MetricsConfig(scores=[work], labels=str(tmp_path / "labels.csv"),
                                      score_columns=["edge_scores"]))


@pytest.mark.parametrize("case,expect", [
    ("no_workdir", "does not exist"),
    ("no_column", "no score column 'dcs_missing'"),
    ("no_label_column", "no label column 'kind'"),
    ("no_overlap", "nothing to evaluate"),
    ("no_positives", "needs positives"),
    ("no_negatives", "needs positives"),
    ("bad_type", "unknown table type"),
    ("other_ids", "name other captions"),
    ("bad_k", "k_list must be positive"),
])
def test_bad_input_raises_input_error(case, expect, tmp_path):
  work, ids, labels, _, _ = _workdir(tmp_path, n=10)
  y = {"no_positives": ["N"] * 10, "no_negatives": ["MV"] * 10}.get(case, labels.tolist())
  pid = ids + 1000 if case == "no_overlap" else ids
  path = str(tmp_path / ("labels.xlsx" if case == "bad_type" else "labels.parquet"))
  columns = {"prompt_id": pid, "overfit_type": y}
  if case == "other_ids":  # ids of another prompt table: captions disagree
    columns["caption"] = [f"caption {(i + 1) % 10}" for i in ids]
  pq.write_table(pa.table(columns), path)
  cfg = metrics.MetricsConfig(scores=[work if case != "no_workdir" else work + "_nope"],
                              labels=path)
  if case == "no_column":
    cfg.score_columns = ["scores", "dcs_missing"]
  if case == "bad_k":
    cfg.k_list = ["10", "x"]
  if case == "no_label_column":
    cfg.label_column = "kind"
  with pytest.raises(InputError, match=expect):
    metrics.run(cfg)


def test_semicolon_csv_scores_are_read_like_the_scan_reads_them(tmp_path):
  work, ids, labels, cols, captions = _workdir(tmp_path)
  pq.write_table(pa.table({"prompt_id": ids, "overfit_type": labels}), tmp_path / "l.parquet")
  rows = ["prompt_id;caption;scores"] + [
      f'{i};"{captions[i]}, a comma";{float(cols["scores"][i])!r}' for i in ids]
  (tmp_path / "scores.csv").write_text("\n".join(rows) + "\n")
  report = metrics.run(metrics.MetricsConfig(scores=str(tmp_path / "scores.csv"),
                                             labels=str(tmp_path / "l.parquet")))
  direct = detection.detection_metrics(labels, cols["scores"], ["MV", "RV", "TV"], [10])
  assert report["results"]["pooled"]["scores"]["auc"] == direct["pooled"]["auc"]


def test_labels_from_a_verify_workdir_and_scores_from_a_table(tmp_path):
  work, ids, labels, cols, captions = _workdir(tmp_path)
  os.makedirs(tmp_path / "v" / "verify")  # verify's layout: WORKDIR/verify/verify.parquet
  pq.write_table(pa.table({"prompt_id": ids, "caption": captions, "overfit_type": labels}),
                 tmp_path / "v" / "verify" / "verify.parquet")
  pq.write_table(pa.table({"prompt_id": ids, "overfit_type": ["N"] * len(ids)}),
                 tmp_path / "v" / "verify" / "other.parquet")
  scores = str(tmp_path / "scores.csv")
  rows = ["prompt_id,caption,scores"] + [f'{i},"{captions[i]}",{float(cols["scores"][i])!r}'
                                         for i in ids]
  open(scores, "w").write("\n".join(rows) + "\n")
  report = metrics.run(metrics.MetricsConfig(scores=scores, labels=str(tmp_path / "v")))
  assert list(report["columns"]) == ["scores"] and report["join_key"] == "prompt_id"
  direct = detection.detection_metrics(labels, cols["scores"], ["MV", "RV", "TV"], [10, 100, 500])
  for group in direct:
    got = report["results"][group]["scores"]
    assert got["auc"] == direct[group]["auc"]
    assert got["precision_at_k"] == {str(k): v for k, v in direct[group]["precision_at_k"].items()}


def _cli(args):
  return subprocess.run([sys.executable, "-m", "memjax.metrics"] + args, capture_output=True,
                        text=True, cwd=REPO, timeout=300)


def test_cli_prints_table_and_bad_input_is_one_line(tmp_path):
  work, ids, labels, _, _ = _workdir(tmp_path)
  path = str(tmp_path / "labels.parquet")
  pq.write_table(pa.table({"prompt_id": ids, "overfit_type": labels}), path)
  r = _cli([f"--scores={work}", f"--labels={path}", "--k_list=5,10",
            f"--out={tmp_path / 'o.json'}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "pooled" in r.stdout and "edge_scores" in r.stdout and "p@10" in r.stdout
  assert "tpr1%<" in r.stdout and "tpr1%~" in r.stdout and "tpr.1%<" in r.stdout
  assert json.load(open(tmp_path / "o.json"))["results"]["MV"]["scores"]["n_pos"] > 0
  r = _cli([f"--scores={work}", f"--labels={path}", "--score_columns=nope"])
  assert r.returncode == 2 and "Traceback" not in r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "no score column 'nope'" in errors[0], r.stderr


def test_on_the_micro_attack_equals_the_direct_computation(micro_extract):
  """The real outputs: scores from the scan and blackbox shards, labels from the
  verify table, joined by the scan's prompt id."""
  w = micro_extract["workdir"]
  report = json.load(open(workdir_lib.path(w, "metrics", "verified.json")))
  scan = shards.open_shards(workdir_lib.stage_dir(w, "scan")).to_table()
  verify = pq.read_table(workdir_lib.path(w, "verify", "verify.parquet"))
  label_of = dict(zip(verify["scan_prompt_id"].to_pylist(), verify["overfit_type"].to_pylist()))
  ids = [i for i in scan["prompt_id"].to_pylist() if i in label_of]
  score_of = dict(zip(scan["prompt_id"].to_pylist(), scan["scores"].to_pylist()))
  y = [label_of[i] for i in ids]
  assert {"MV", "N"} <= set(y)
  direct = detection.detection_metrics(y, [score_of[i] for i in ids], ["MV", "RV", "TV"],
                                       [2, 4, 8], ids)
  for group, row in direct.items():
    got = report["results"][group]["scores"]
    assert got["auc"] == row["auc"] and got["n_pos"] == row["n_pos"]
    assert got["precision_at_k"] == {str(k): v for k, v in row["precision_at_k"].items()}
  manifest = workdir_lib.read_manifest(w, "metrics")
  assert manifest.outputs == {"planted": "planted.json", "verified": "verified.json"}
  assert manifest.config["k_list"] == [2, 4, 8]
  # The planted labels (the testbed's `kind`) of every scanned caption.
  planted = json.load(open(workdir_lib.path(w, "metrics", "planted.json")))
  assert planted["label_column"] == "kind" and planted["join_key"] == "prompt_id"
  assert planted["results"]["pooled"]["scores"]["n_pos"] + \
      planted["results"]["pooled"]["scores"]["n_neg"] == scan.num_rows
