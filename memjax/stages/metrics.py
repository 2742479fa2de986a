"""Detection metrics of memorization scores against labels (ALGORITHMS.md section 5).

    python -m memjax.metrics --scores=WORKDIR --labels=TABLE_OR_WORKDIR \
      [--label_column=overfit_type] [--positive=MV,RV,TV] [--k_list=10,100,500] \
      [--score_columns=scores,wen,edge_scores] [--out=FILE.json]

For every score column (higher = more likely memorized) and for the pooled
positives as well as each label type separately (never only pooled):

- precision@K = #{positives among the top K by score} / K, ranking every joined
  row with a score (other positive types too; they do not count for one type),
  ties by prompt_id ascending (as `results.top_k`); null for fewer than K rows.
- ROC curve as scikit-learn's `roc_curve(y, s, drop_intermediate=False)`:
  thresholds at the distinct scores, descending; at threshold t a row is
  called positive when its score >= t; the curve starts at (fpr, tpr) = (0, 0)
  with threshold +inf. (sklearn's default drop_intermediate=True, used by Wen
  et al., removes collinear points; that never changes the AUC and changes
  TPR@1%FPR only when tied scores make a straight run cross fpr = 0.01.)
- AUC = trapezoidal area under that curve = Mann-Whitney U / (P N), ties half.
- TPR@1%FPR = tpr[last index where fpr < 0.01] (Wen et al.'s convention).
- accuracy = max over the curve of 1 - (fpr + 1 - tpr) / 2.

Positives of a type T are the rows labelled T; negatives, those whose label is
none of the --positive types (N); other positive types are left out of T's ROC.
Rows with an empty label or a null / NaN score are dropped (counted in the JSON).
"""
import collections
import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence

from absl import flags
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from memjax import cli
from memjax.runtime import results
from memjax.runtime.errors import InputError

PROMPT_ID = results.PROMPT_ID
SCAN_ID = "scan_prompt_id"  # a stage fed by a scan workdir keeps the scan's ids here
DEFAULT_SCORE_COLUMNS = ("scores", "wen", "edge_scores")
SCORE_STAGES = ("scan", "blackbox")  # workdir subfolders read, in this order.
LABEL_STAGES = ("verify", "labels")
TIE_ORDER = ("TV", "MV", "RV")  # a caption labelled twice takes the first of these.


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
    labels: [N] label strings (rows with a NaN score are dropped here).
    scores: [N] float, higher = more likely memorized.
    positive: the positive label types (e.g. MV, RV, TV).
    ks: the K of precision@K.
    tiebreak: [N] ranks ties (default: position).

  Returns:
    {"pooled" and each type: {auc, tpr_at_1pct_fpr, accuracy, n_pos, n_neg,
    precision_at_k}}; ROC numbers are None when a class is empty.
  """
  scores = np.asarray(scores, np.float64)
  tiebreak = np.arange(scores.size) if tiebreak is None else np.asarray(tiebreak)
  valid = ~np.isnan(scores)
  labels, scores, tiebreak = np.asarray(labels, object)[valid], scores[valid], tiebreak[valid]
  negative = ~np.isin(labels, list(positive))
  out = {}
  for group in ["pooled"] + list(positive):
    pos = ~negative if group == "pooled" else labels == group
    row = out[group] = {"n_pos": int(pos.sum()), "n_neg": int(negative.sum()), "auc": None,
                        "tpr_at_1pct_fpr": None, "accuracy": None,
                        "precision_at_k": precision_at_k(pos, scores, ks, tiebreak)}
    if row["n_pos"] and row["n_neg"]:
      curve = roc_curve(pos[pos | negative], scores[pos | negative])
      row.update(auc=roc_auc(curve), tpr_at_1pct_fpr=tpr_at_fpr(curve, 0.01),
                 accuracy=best_accuracy(curve))
  return out


def read_tables(path: str, what: str, stages: Sequence[str], columns) -> List[tuple]:
  """(table of only `columns`, source, all its column names) per source.

  A workdir gives its own shards and those of its `stages` subfolders that
  exist (e.g. scan/ and blackbox/); a folder without shards, its <stage>.parquet
  (e.g. verify.parquet), else all its .parquet files as one table; a file,
  .parquet, .csv, .tsv or .jsonl/.json. A table with `scan_prompt_id` (a stage
  fed by a scan workdir renumbers its prompts) joins by it, as its prompt_id.
  """
  if not os.path.exists(path):
    raise InputError(f"--{what}={path} does not exist.")
  ext = os.path.splitext(path)[1].lower()
  try:
    if os.path.isdir(path):
      dirs = [d for d in [path] + [os.path.join(path, s) for s in stages]
              if results.list_shards(d)]
      files = ([f for f in (os.path.join(path, s + ".parquet") for s in stages)
                if os.path.isfile(f)] or
               sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet")))
      if not dirs and not files:
        raise InputError(f"--{what}={path} holds no result shards (also looked in its "
                         f"subfolders {', '.join(stages)}) and no .parquet files.")
      found = ([(results.open_shards(d), d) for d in dirs] or
               [(ds.dataset(files, format="parquet"), files[0] if len(files) == 1 else path)])
    elif ext == ".parquet":
      found = [(ds.dataset(path, format="parquet"), path)]
    elif ext in (".csv", ".tsv"):
      import pyarrow.csv as pacsv  # pylint: disable=g-import-not-at-top
      parse = pacsv.ParseOptions(delimiter="\t" if ext == ".tsv" else ",",
                                 newlines_in_values=True)
      found = [(ds.dataset(pacsv.read_csv(path, parse_options=parse)), path)]
    elif ext in (".jsonl", ".json"):
      import pyarrow.json as pajson  # pylint: disable=g-import-not-at-top
      found = [(ds.dataset(pajson.read_json(path)), path)]
    else:
      raise InputError(f"--{what}={path}: unknown table type '{ext}'; memjax reads .parquet, "
                       ".csv, .tsv, .jsonl/.json or a workdir.")
    out = []
    for x, source in found:
      table = x.to_table(columns=[c for c in x.schema.names if c in set(columns) | {SCAN_ID}])
      if SCAN_ID in table.column_names:  # a stage fed by a scan: its ids are the scan's
        table = table.drop_columns([c for c in [PROMPT_ID] if c in table.column_names])
        table = table.rename_columns([PROMPT_ID if c == SCAN_ID else c for c in table.column_names])
      out.append((table, source, x.schema.names))
    return out
  except (pa.ArrowException, OSError) as e:
    raise InputError(f"--{what}={path}: cannot read: {e}") from None


def _labels_by_key(table: pa.Table, source: str, all_names: Sequence[str], key: str,
                   label_column: str, caption_column: str, info: dict) -> tuple:
  """(key -> label, prompt_id -> caption or {}); empty labels dropped.

  A prompt_id labelled twice differently is refused. A caption labelled twice
  differently takes the first of TV, MV, RV: one caption generates the same
  images, so a match through any of its rows makes the caption memorized.
  """
  if label_column not in table.column_names:
    raise InputError(f"{source}: no label column '{label_column}'; its columns are: "
                     f"{', '.join(all_names)}. Pass --label_column=NAME.")
  keys = table[key].to_pylist()
  values = [None if v is None else str(v).strip() for v in table[label_column].to_pylist()]
  rank = lambda x: TIE_ORDER.index(x) if x in TIE_ORDER else len(TIE_ORDER)
  out, conflicts = {}, 0
  for k, v in zip(keys, values):
    if k is None or not v:
      continue
    if k in out and out[k] != v:
      if key == PROMPT_ID:
        raise InputError(f"{source}: {PROMPT_ID} {k} is labelled both '{out[k]}' and '{v}'.")
      conflicts += 1
      v = min(out[k], v, key=rank)
    out[k] = v
  captions = {}
  if key == PROMPT_ID and caption_column in table.column_names:
    captions = dict(zip(keys, table[caption_column].to_pylist()))
  info.update(label_rows=table.num_rows, labelled=len(out),
              label_rows_without_label=sum(k is None or not v for k, v in zip(keys, values)),
              label_caption_conflicts=conflicts)
  return out, captions


def join_scores(sources: Sequence[tuple], labels: dict, key: str,
                score_columns: Optional[Sequence[str]], info: dict,
                captions: Optional[dict] = None, caption_column: str = "caption") -> dict:
  """Per score column: the labelled rows' labels, scores and tiebreak (prompt_id).

  Each column comes from the first (table, source, names) that has it. A key
  scored twice keeps its row with the lowest prompt_id. With the prompt_id key,
  `captions` (the labels' prompt_id -> caption) must agree with the scores'.
  """
  wanted = list(score_columns or DEFAULT_SCORE_COLUMNS)
  found = {}
  for table, source, all_names in sources:
    for column in wanted:
      if column in table.column_names and column not in found:
        found[column] = (table, source, all_names)
  missing = [c for c in wanted if c not in found]
  names = ", ".join(dict.fromkeys(s for _, s, _ in sources))
  if (score_columns and missing) or not found:
    available = sorted({c for _, _, n in sources for c in n})
    raise InputError(f"--scores ({names}): no score column {', '.join(map(repr, missing))}; "
                     f"its columns are: {', '.join(available)}. Pass --score_columns=NAME,...")
  label_keys, joined = pa.array(list(labels)), {}
  for column, (table, source, all_names) in found.items():
    if key not in table.column_names:
      raise InputError(f"{source}: no column '{key}' to join the labels on; its columns "
                       f"are: {', '.join(all_names)}.")
    ids = (np.asarray(table[PROMPT_ID].to_numpy(), np.int64) if PROMPT_ID in table.column_names
           else np.arange(table.num_rows))
    try:
      value_set = label_keys.cast(table[key].type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
      raise InputError(f"{source}: column '{key}' is {table[key].type}, the labels' is "
                       f"{label_keys.type}; cannot join them.") from None
    keep = pc.is_in(table[key], value_set=value_set).fill_null(False)
    rows = np.where(np.asarray(keep.to_numpy(zero_copy_only=False), bool))[0]
    rows = rows[np.argsort(ids[rows], kind="stable")]
    first = {}  # key -> its row with the lowest prompt_id, in prompt_id order
    for r, k in zip(rows, table[key].take(pa.array(rows)).to_pylist()):
      first.setdefault(k, r)
    kept, keys = np.array(list(first.values()), np.int64), list(first)
    if captions and caption_column in table.column_names:
      got = table[caption_column].take(pa.array(kept)).to_pylist()
      bad = [(k, g) for k, g in zip(keys, got) if captions.get(k) not in (None, g)]
      if bad:
        raise InputError(f"{len(bad)} {PROMPT_ID}s name other captions in {source} than in "
                         f"the labels (e.g. {PROMPT_ID} {bad[0][0]}: {bad[0][1]!r} vs "
                         f"{captions[bad[0][0]]!r}): the ids come from different prompt "
                         f"tables. Drop the labels' {PROMPT_ID} column to join on captions.")
    values = table[column]
    if not any(f(values.type) for f in (pa.types.is_floating, pa.types.is_integer,
                                        pa.types.is_null)):
      raise InputError(f"{source}: score column '{column}' is {values.type}, not a number.")
    scores = values.cast(pa.float64()).fill_null(np.nan).to_numpy()[kept]
    joined[column] = {"source": source, "labels": [labels[k] for k in keys], "scores": scores,
                      "tiebreak": ids[kept], "score_rows": table.num_rows,
                      "dropped_nan_score": int(np.isnan(scores).sum()),
                      "duplicate_keys_dropped": int(rows.size - kept.size)}
  if not any(j["labels"] for j in joined.values()):
    raise InputError(f"no {key} of the labels occurs in --scores ({names}); nothing to "
                     "evaluate.")
  info["score_columns_missing"] = missing
  return joined


@dataclasses.dataclass
class MetricsConfig:
  scores: Sequence[str]  # workdirs or tables
  labels: str
  label_column: str = "overfit_type"
  positive: Sequence[str] = ("MV", "RV", "TV")
  k_list: Sequence[int] = (10, 100, 500)
  score_columns: Optional[Sequence[str]] = None  # None: those of the defaults present.
  out: Optional[str] = None
  prompt_column: str = "caption"  # the caption join's column


def _counts(values) -> Dict[str, int]:
  return dict(sorted(collections.Counter(values).items()))


def run(cfg: MetricsConfig) -> dict:
  """Joins scores and labels, computes every metric, writes cfg.out if set.

  Returns:
    The report (JSON-ready; precision_at_k keys are strings): the join's
    counts, "columns" (source and counts per score column) and "results"
    {"pooled" | type: {score column: detection_metrics row}}.
  """
  score_paths = [cfg.scores] if isinstance(cfg.scores, str) else list(cfg.scores)
  if not score_paths or not cfg.labels or not cfg.positive:
    raise InputError("--scores, --labels and --positive must not be empty.")
  try:
    ks = sorted({int(k) for k in cfg.k_list})
  except ValueError:
    ks = [0]
  if not ks or ks[0] <= 0:
    raise InputError(f"--k_list must be positive integers, got {list(cfg.k_list)}")
  label_sources = read_tables(cfg.labels, "labels", LABEL_STAGES,
                              {PROMPT_ID, cfg.prompt_column, cfg.label_column})
  table, _, all_names = next((s for s in label_sources if cfg.label_column in s[0].column_names),
                             label_sources[0])
  if PROMPT_ID in table.column_names:
    key = PROMPT_ID
  elif cfg.prompt_column in table.column_names:
    key = cfg.prompt_column
  else:
    raise InputError(f"--labels={cfg.labels}: neither '{PROMPT_ID}' nor '{cfg.prompt_column}' "
                     f"to join on; its columns are: {', '.join(all_names)}.")
  info = {"join_key": key}
  labels, captions = _labels_by_key(table, cfg.labels, all_names, key, cfg.label_column,
                                    cfg.prompt_column, info)
  wanted = {PROMPT_ID, cfg.prompt_column, *(cfg.score_columns or DEFAULT_SCORE_COLUMNS)}
  sources = [s for path in score_paths for s in read_tables(path, "scores", SCORE_STAGES, wanted)]
  joined = join_scores(sources, labels, key, cfg.score_columns, info, captions,
                       cfg.prompt_column)
  joined_labels = max((j["labels"] for j in joined.values()), key=len)  # the widest join
  present = {v for j in joined.values() for v in j["labels"]}
  if not present & set(cfg.positive) or not present - set(cfg.positive):
    raise InputError(f"--labels={cfg.labels}: column '{cfg.label_column}' of the rows that "
                     f"have scores needs positives ({','.join(cfg.positive)}) and negatives "
                     f"(any other label); it holds {_counts(joined_labels)}. Check --positive "
                     "and --label_column.")
  report = {"scores": score_paths, "labels": cfg.labels, "label_column": cfg.label_column,
            "positive": list(cfg.positive), "k_list": ks, **info,
            "label_counts": _counts(labels.values()), "columns": {}, "results": {}}
  for column, j in joined.items():
    report["columns"][column] = {k: v for k, v in j.items()
                                 if k not in ("labels", "scores", "tiebreak")}
    report["columns"][column].update(joined_rows=len(j["labels"]),
                                     joined_label_counts=_counts(j["labels"]))
    per_group = detection_metrics(j["labels"], j["scores"], cfg.positive, ks, j["tiebreak"])
    for group, row in per_group.items():
      report["results"].setdefault(group, {})[column] = row
  report = json.loads(json.dumps(report, allow_nan=False))  # as in the file: K keys are text
  if cfg.out:
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    results.write_json_atomic(cfg.out, report)
  return report


def format_table(report: dict) -> str:
  """A small text table: one line per (label group, score column)."""
  ks = report["k_list"]
  fmt = lambda v: "-" if v is None else f"{v:.3f}"
  lines = [f"{'group':<7}{'column':<14}{'n_pos':>6}{'n_neg':>7}{'auc':>8}{'tpr@1%':>8}"
           f"{'acc':>7}" + "".join(f"{'p@' + str(k):>8}" for k in ks)]
  for group, columns in report["results"].items():
    for column, r in columns.items():
      lines.append(f"{group:<7}{column:<14}{r['n_pos']:>6}{r['n_neg']:>7}{fmt(r['auc']):>8}"
                   f"{fmt(r['tpr_at_1pct_fpr']):>8}{fmt(r['accuracy']):>7}" +
                   "".join(f"{fmt(r['precision_at_k'][str(k)]):>8}" for k in ks))
  return "\n".join(lines)


_SCORES = flags.DEFINE_list("scores", None, "Scan/blackbox workdir(s) or score table(s).")
_LABELS = flags.DEFINE_string("labels", None, "Label table or verify workdir.")
_LABEL_COLUMN = flags.DEFINE_string("label_column", "overfit_type", "Label column (MV|RV|TV|N).")
_POSITIVE = flags.DEFINE_list("positive", ["MV", "RV", "TV"], "Labels that count as memorized.")
_K_LIST = flags.DEFINE_list("k_list", ["10", "100", "500"], "K values of precision@K.")
_SCORE_COLUMNS = flags.DEFINE_list(
    "score_columns", None, "Score columns (default: those of scores,wen,edge_scores present).")
_OUT = flags.DEFINE_string("out", None, "Write the JSON report here.")


def main(argv):
  del argv
  cfg = MetricsConfig(scores=_SCORES.value or [], labels=_LABELS.value,
                      label_column=_LABEL_COLUMN.value, positive=_POSITIVE.value,
                      k_list=_K_LIST.value,
                      score_columns=_SCORE_COLUMNS.value, out=_OUT.value,
                      prompt_column=cli.common_flag_values(required=())["prompt_column"])
  print(format_table(run(cfg)) + (f"\nreport written to {cfg.out}" if cfg.out else ""))


if __name__ == "__main__":
  cli.run_main(main)
