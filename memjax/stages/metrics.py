"""The detection-metrics stage: scores joined with labels, every metric computed.

docs/method.md section 8 (the math: `memjax.method.detection`). Scores come from
workdirs (their scan and blackbox shards, the generate stage's generated table)
or tables; labels from a workdir (its verify table, or its scan shards for a
planted column such as the testbed's `kind`) or a table. Rows join on `prompt_id`
(a stage fed by a scan keeps the scan's id as `scan_prompt_id`, which is used
instead), or on the caption when the labels have no ids. Every detector column of
DETECTORS that the scores hold is scored side by side, with any extra column
named by --score_columns; the generate stage's per-(prompt, seed) values are
reduced to their mean over seeds first (`per_prompt_means`). Rows with an empty
label or a null, NaN or infinite score are dropped, per column (counted in the
report); a column joined on fewer prompts than the widest is marked a subset
(`subset_note`). With a workdir, the report is written to
`WORKDIR/metrics/<name>.json`, listed in `WORKDIR/metrics/manifest.json`.
"""
import collections
import dataclasses
import glob
import json
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from memjax.data import tables
from memjax.method.detection import detection_metrics
from memjax.runtime import shards
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError

STAGE = "metrics"
PROMPT_ID = shards.PROMPT_ID
SCAN_ID = "scan_prompt_id"  # a stage fed by a scan workdir keeps the scan's ids here
# Every detector column scored when present (higher = more likely memorized for
# each; AUCs are reported raw, never flipped), in the order shown:
# column -> (display name, one-line description).
DETECTORS = {
    "scores": ("DCS", "Webster's denoising confidence"),
    "wen": ("wen", "Wen et al., ||e_c - e_u|| at t = 999 (memjax's z)"),
    "wen981": ("wen981", "Wen et al. at the authors' first DDIM step"),
    "jeon": ("jeon", "Jeon et al. sharpness (JVP)"),
    "asthana": ("asthana", "Asthana & Belagiannis anisotropy (norm + cosine)"),
    "asthana_norm": ("asthana_norm", "Asthana & Belagiannis, the norm part alone"),
    "asthana_cos": ("asthana_cos", "Asthana & Belagiannis, the cosine part alone"),
    "ren_le": ("ren_le", "Ren et al. cross-attention entropy (one layer)"),
    "edge_scores": ("edge", "Webster's blackbox edge consistency (one-step images)"),
    "wen_steps": ("wen_steps", "Wen et al., ||e_c - e_u|| averaged over the first n DDIM "
                  "steps (regenerated prompts; mean over seeds)"),
    "bright_ending": ("BE", "Chen et al. Bright Ending, EOS-attention-masked ||e_c - e_u|| "
                      "over every DDIM step (regenerated prompts; mean over seeds)"),
}
# The generate stage's trajectory detectors (`trajectory_detectors.TRAJECTORY`), one
# value per (prompt, seed) in its generated.parquet.
GENERATE_DETECTORS = ("wen_steps", "bright_ending")
SEED = "seed"
DEFAULT_SCORE_COLUMNS = tuple(DETECTORS)
# The ROC numbers of each (group, column), as the text and HTML tables show them:
# report key -> (short header, meaning).
TABLE_METRICS = {
    "auc": ("auc", "ROC AUC (raw: below 0.5 ranks memorized prompts lower)"),
    "tpr_at_1pct_fpr": ("tpr1%<", "TPR at the largest FPR below 1% (Wen et al.)"),
    "tpr_at_1pct_fpr_closest": ("tpr1%~", "TPR at the FPR closest to 1%, which may be "
                                "above it (Jeon et al., Asthana & Belagiannis, Ren et al.)"),
    "tpr_at_01pct_fpr": ("tpr.1%<", "TPR at the largest FPR below 0.1%"),
}
SCORE_STAGES = ("scan", "blackbox")  # workdir stage folders read, in this order.
TIE_ORDER = ("TV", "MV", "RV")  # a caption labelled twice takes the first of these.


def _workdir_tables(path: str, what: str) -> List[tuple]:
  """(dataset, source) of a folder: a stage folder's shards (generate's: its table), its
  workdir's scan/blackbox shards and generated table, its verify table, or its files."""
  generated = os.path.join(path, workdir_lib.GENERATED_TABLE)
  if os.path.isfile(generated):  # the generate folder: its shards hold lists
    return [(ds.dataset(tables.read_table(generated)), generated)]
  if shards.list_shards(path):
    return [(shards.open_shards(path), path)]
  found = [(shards.open_shards(d), d) for d in
           (workdir_lib.resolve(path, s) for s in SCORE_STAGES) if shards.list_shards(d)]
  generated = os.path.join(workdir_lib.resolve(path, "generate"), workdir_lib.GENERATED_TABLE)
  if what == "scores" and os.path.isfile(generated):
    found.append((ds.dataset(tables.read_table(generated)), generated))
  verify = os.path.join(workdir_lib.resolve(path, "verify"), workdir_lib.VERIFY_TABLE)
  if what == "labels" and os.path.isfile(verify):
    found.insert(0, (ds.dataset(tables.read_table(verify)), verify))
  if found:
    return found
  files = sorted(glob.glob(os.path.join(path, "*.parquet")))
  if not files:
    raise InputError(f"--{what}={path} holds no result shards (also looked in its stage "
                     f"folders {', '.join(SCORE_STAGES)}, generate and verify) and no "
                     ".parquet files.")
  return [(ds.dataset(tables.read_table(path)), files[0] if len(files) == 1 else path)]


def is_per_seed(names: Sequence[str]) -> bool:
  """Whether a table of these columns is the generate stage's (a row per prompt, seed)."""
  return SEED in names and any(c in names for c in GENERATE_DETECTORS)


def per_prompt_means(table: pa.Table) -> pa.Table:
  """One row per prompt (by `scan_prompt_id` when present, else `prompt_id`) of a
  per-(prompt, seed) table: each GENERATE_DETECTORS column is the mean over the
  prompt's rows (its seeds, the authors' "generations"), null when any is null (a
  seed without an image; the scan's mean over seeds is NaN then); other columns
  take the prompt's first row. Schema metadata: per_seed_rows, seeds_per_prompt."""
  key = SCAN_ID if SCAN_ID in table.column_names else PROMPT_ID
  _, first, inverse, counts = np.unique(table[key].to_numpy(zero_copy_only=False),
                                        return_index=True, return_inverse=True,
                                        return_counts=True)
  out = {c: table[c].take(pa.array(first)) for c in table.column_names
         if c not in GENERATE_DETECTORS + (SEED,)}
  for c in [c for c in GENERATE_DETECTORS if c in table.column_names]:
    values = table[c].cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
    mean = np.bincount(inverse.ravel(), weights=values, minlength=counts.size) / counts
    out[c] = pa.array(mean, pa.float64(), mask=np.isnan(mean))  # NaN propagates: any null
  return pa.table(out).replace_schema_metadata({
      b"per_seed_rows": str(table.num_rows).encode(),
      b"seeds_per_prompt": json.dumps(sorted({int(n) for n in counts})).encode()})


def read_tables(path: str, what: str, columns) -> List[tuple]:
  """(table of only `columns`, source, all its column names) per source.

  A table with `scan_prompt_id` (a stage fed by a scan workdir renumbers its
  prompts) joins by it, as its prompt_id. A per-(prompt, seed) table
  (`is_per_seed`) gives only its GENERATE_DETECTORS, as `per_prompt_means`.
  """
  if not os.path.exists(path):
    raise InputError(f"--{what}={path} does not exist.")
  try:
    found = (_workdir_tables(path, what) if os.path.isdir(path) else
             [(ds.dataset(tables.read_table(path)), path)])
    out = []
    for x, source in found:
      names = x.schema.names
      wanted = set(columns) | {SCAN_ID, SEED}
      if is_per_seed(names):  # the generate stage's: only its detectors, per prompt
        wanted -= set(DETECTORS) - set(GENERATE_DETECTORS)
      table = x.to_table(columns=[c for c in names if c in wanted])
      if SCAN_ID in table.column_names:  # a stage fed by a scan: its ids are the scan's
        table = table.drop_columns([c for c in [PROMPT_ID] if c in table.column_names])
        table = table.rename_columns([PROMPT_ID if c == SCAN_ID else c
                                      for c in table.column_names])
      out.append((per_prompt_means(table) if is_per_seed(names) else table, source, names))
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


def wanted_columns(score_columns: Optional[Sequence[str]]) -> List[str]:
  """The detector columns, then the extra `score_columns` (each once, in order)."""
  return list(dict.fromkeys([*DEFAULT_SCORE_COLUMNS, *(score_columns or ())]))


def join_scores(sources: Sequence[tuple], labels: dict, key: str,
                score_columns: Optional[Sequence[str]], info: dict,
                captions: Optional[dict] = None, caption_column: str = "caption") -> dict:
  """Per score column: the labelled rows' labels, scores and tiebreak (prompt_id).

  The columns: those of DETECTORS present, and every one of `score_columns`
  (required), in that order. Each column comes from the first (table, source,
  names) that has it. A detector column not asked for by name whose table has
  no `key` (a blackbox table has no caption) is left out when another column
  can be joined, and listed in info["score_columns_unjoinable"]. A key scored
  twice keeps its row with the lowest prompt_id. With the prompt_id key,
  `captions` (the labels' prompt_id -> caption) must agree with the scores'.
  """
  wanted = wanted_columns(score_columns)
  found = {}
  for table, source, all_names in sources:
    for column in wanted:
      if column in table.column_names and column not in found:
        found[column] = (table, source, all_names)
  found = {c: found[c] for c in wanted if c in found}
  missing = [c for c in wanted if c not in found]
  required = [c for c in missing if c in (score_columns or ())]
  names = ", ".join(dict.fromkeys(s for _, s, _ in sources))
  if required or not found:
    missing = required or missing
    available = sorted({c for _, _, n in sources for c in n})
    raise InputError(f"--scores ({names}): no score column {', '.join(map(repr, missing))}; "
                     f"its columns are: {', '.join(available)}. Pass --score_columns=NAME,...")
  label_keys, joined, unjoinable = pa.array(list(labels)), {}, []
  for column, (table, source, all_names) in found.items():
    if key not in table.column_names and column not in (score_columns or ()) and \
        any(key in t.column_names for t, _, _ in found.values()):
      unjoinable.append(column)  # e.g. a blackbox table has no caption: left out, said
      continue
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
                      "dropped_nonfinite_score": int((~np.isfinite(scores)).sum()),
                      "duplicate_keys_dropped": int(rows.size - kept.size)}
    meta = table.schema.metadata or {}  # a per_prompt_means table's: what was reduced
    joined[column].update({k.decode(): json.loads(v) for k, v in meta.items()
                           if k in (b"per_seed_rows", b"seeds_per_prompt")})
  if not any(j["labels"] for j in joined.values()):
    raise InputError(f"no {key} of the labels occurs in --scores ({names}); nothing to "
                     "evaluate.")
  info["score_columns_missing"] = missing
  info["score_columns_unjoinable"] = unjoinable
  return joined


@dataclasses.dataclass
class MetricsConfig:
  """The metrics stage's settings (each one a flag of `python -m memjax.metrics`)."""
  scores: Sequence[str]  # workdirs or tables
  labels: str
  label_column: str = "overfit_type"
  positive: Sequence[str] = ("MV", "RV", "TV")
  k_list: Sequence[int] = (10, 100, 500)
  score_columns: Optional[Sequence[str]] = None  # extra columns, beside DETECTORS present
  prompt_column: str = "caption"  # the caption join's column
  out: Optional[str] = None  # a JSON file for the report
  workdir: Optional[str] = None  # or WORKDIR/metrics/<name>.json, with a manifest
  name: str = "metrics"


def _counts(values) -> Dict[str, int]:
  return dict(sorted(collections.Counter(values).items()))


def run(cfg: MetricsConfig) -> dict:
  """Joins scores and labels, computes every metric, writes cfg.out if set.

  Returns:
    The report (JSON-ready; precision_at_k keys are strings): the join's
    counts, "columns" (source and counts per score column) and "results"
    {"pooled" | type: {score column: detection_metrics row}}.
  """
  t0 = time.perf_counter()
  score_paths = [cfg.scores] if isinstance(cfg.scores, str) else list(cfg.scores)
  if not score_paths or not cfg.labels or not cfg.positive:
    raise InputError("--scores, --labels and --positive must not be empty.")
  try:
    ks = sorted({int(k) for k in cfg.k_list})
  except ValueError:
    ks = [0]
  if not ks or ks[0] <= 0:
    raise InputError(f"--k_list must be positive integers, got {list(cfg.k_list)}")
  label_sources = read_tables(cfg.labels, "labels",
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
  wanted = {PROMPT_ID, cfg.prompt_column, *wanted_columns(cfg.score_columns)}
  sources = [s for path in score_paths for s in read_tables(path, "scores", wanted)]
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
                                     joined_label_counts=_counts(j["labels"]),
                                     subset=len(j["labels"]) < len(joined_labels))
    per_group = detection_metrics(j["labels"], j["scores"], cfg.positive, ks, j["tiebreak"])
    for group, row in per_group.items():
      report["results"].setdefault(group, {})[column] = row
  report = json.loads(json.dumps(report, allow_nan=False))  # as in the file: K keys are text
  if cfg.out:
    workdir_lib.write_json(cfg.out, report)
  if cfg.workdir:
    _write_to_workdir(cfg, report, t0)
  return report


def _write_to_workdir(cfg: MetricsConfig, report: dict, t0: float) -> None:
  """WORKDIR/metrics/<name>.json, and the manifest listing every report there."""
  if not cfg.name or os.sep in cfg.name or cfg.name in ("manifest", "run_config"):
    raise InputError(f"--name={cfg.name!r}: must be a plain file name (not manifest)")
  folder = workdir_lib.stage_dir(cfg.workdir, STAGE)
  workdir_lib.write_json(os.path.join(folder, cfg.name + ".json"), report)
  reports = sorted(n[:-5] for n in os.listdir(folder) if n.endswith(".json") and
                   n not in (workdir_lib.MANIFEST, workdir_lib.RUN_CONFIG))
  workdir_lib.write_manifest(cfg.workdir, workdir_lib.Manifest(
      stage=STAGE, config=dataclasses.asdict(cfg),
      counts={"reports": len(reports), "joined_rows": {
          c: v["joined_rows"] for c, v in report["columns"].items()}},
      timings={"total_s": time.perf_counter() - t0},
      outputs={name: name + ".json" for name in reports}))


def describe(column: str) -> str:
  """'name: description' of a detector column ('column' alone for another)."""
  name, what = DETECTORS.get(column, (column, ""))
  return f"{column}: {name}, {what}" if name != column else (
      f"{column}: {what}" if what else column)


def subset_columns(report: dict) -> List[str]:
  """The columns joined on fewer labelled prompts than the widest column."""
  return [c for c, v in report.get("columns", {}).items() if v.get("subset")]


def subset_note(report: dict) -> Optional[str]:
  """What the text and HTML tables print under a report with subset columns."""
  subset = subset_columns(report)
  if not subset:
    return None
  rows = {c: v["joined_rows"] for c, v in report["columns"].items()}
  each = ", ".join(f"{c} {rows[c]}" for c in subset)
  return (f"* evaluated on a subset of the {max(rows.values())} labelled prompts ({each}): "
          "those a later stage took (the generate stage's regenerated or the blackbox's "
          "attacked top K, chosen by another score); their numbers are not comparable with "
          "the full-set rows'.")


def format_table(report: dict) -> str:
  """The text table: per label group (pooled, then each type), one line per
  detector column: counts, AUC, TPR at 1% FPR (below; closest), TPR at 0.1% FPR
  and precision@K; then what the headers and detectors mean, and
  `subset_note` (the subset columns carry a '*')."""
  ks = report["k_list"]
  fmt = lambda v: "-" if v is None else f"{v:.3f}"
  columns = list(dict.fromkeys(c for cols in report["results"].values() for c in cols))
  subset = set(subset_columns(report))
  shown = {c: c + "*" if c in subset else c for c in columns}
  w = max([len("detector")] + [len(c) for c in shown.values()]) + 2
  heads = [h for h, _ in TABLE_METRICS.values()] + [f"p@{k}" for k in ks]
  lines = [f"{'group':<8}{'detector':<{w}}{'pos':>5}{'neg':>6}" +
           "".join(f"{h:>8}" for h in heads)]
  for group, by_column in report["results"].items():
    for column, r in by_column.items():
      values = [r.get(m) for m in TABLE_METRICS] + [r["precision_at_k"][str(k)] for k in ks]
      lines.append(f"{group:<8}{shown[column]:<{w}}{r['n_pos']:>5}{r['n_neg']:>6}" +
                   "".join(f"{fmt(v):>8}" for v in values))
  lines += [f"  {h}: {what}" for h, what in TABLE_METRICS.values()]
  lines.append("  p@K: precision among the top K by score")
  lines += [f"  {describe(c)}" for c in columns]
  note = subset_note(report)
  return "\n".join(lines + ([f"  {note}"] if note else []))
