"""Crash-safe, resumable stage outputs: shards, run config, top-K, manifest.

The output folder is the unit of work. Rows [a, b) are done exactly when
`WORKDIR/<stage>/part-<a:012d>-<b:012d>.parquet` exists: each shard is written
under a temporary name, fsynced and renamed, so a killed run leaves either the
whole shard or a `.tmp` file that the next run deletes. Processes write disjoint
row ranges, so they need no coordination. The settings that change results are
recorded in `run_config.json`; a resume with different settings is refused.
"""
import bisect
import collections
import hashlib
import json
import os
import re
import shutil
import time
from typing import Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from memjax.runtime.errors import InputError

PROMPT_ID = "prompt_id"
_PART = re.compile(r"^part-(\d{12})-(\d{12})\.parquet$")
_TMP = re.compile(r"^\.part-\d{12}-\d{12}\.parquet\.p(\d+)\.(\d+)\.tmp$")
_STALE_S = 3600.0  # another process's .tmp older than this is from a dead run.
# Hashed by content: configs, scheduler, tokenizer files. Weights: name, size.
_CONTENT_EXT = (".json", ".txt", ".model", ".yaml", ".yml", ".tiktoken")
_WEIGHT_EXT = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack",
               ".h5", ".onnx", ".npz")

Range = Tuple[int, int]


def stage_paths(workdir: str, stage: str = "scan") -> Dict[str, str]:
  """Where a stage writes: its shard folder, run config, top-K and manifest."""
  suffix = "" if stage == "scan" else "_" + stage
  return {"dir": os.path.join(workdir, stage),
          "run_config": os.path.join(workdir, f"run_config{suffix}.json"),
          "top_k": os.path.join(workdir, f"top_k{suffix}.parquet"),
          "manifest": os.path.join(workdir, f"manifest{suffix}.json")}


def _fsync_dir(path: str) -> None:
  """Makes a rename durable; some filesystems cannot fsync a folder."""
  try:
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  except OSError:
    pass


def _write_atomic(path: str, write, tmp: Optional[str] = None) -> None:
  """Calls write(file) on a temporary file, fsyncs it, renames it to path."""
  folder, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(folder, tmp or f".{name}.{os.getpid()}.tmp")
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _fsync_dir(folder)


def write_json_atomic(path: str, obj) -> None:
  """Writes obj as indented JSON (sorted keys); readers never see half."""
  data = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
  _write_atomic(path, lambda f: f.write(data.encode("utf-8")))


def read_json(path: str):
  """The JSON in path; InputError naming the file if it is missing or broken."""
  try:
    with open(path, "rb") as f:
      return json.load(f)
  except FileNotFoundError:
    raise InputError(f"{path} does not exist.") from None
  except (ValueError, OSError) as e:
    raise InputError(f"{path}: cannot read as JSON: {e}") from None


def shard_ranges(num_rows: int, shard_rows: int, process_index: int = 0,
                 process_count: int = 1) -> List[Range]:
  """Rows [0, num_rows) in shards of shard_rows; process p gets block p."""
  bounds = list(range(0, num_rows, shard_rows))
  ranges = [(a, min(a + shard_rows, num_rows)) for a in bounds]
  lo = len(ranges) * process_index // process_count
  hi = len(ranges) * (process_index + 1) // process_count
  return ranges[lo:hi]


def _merge(ranges: Sequence[Range]) -> List[Range]:
  merged = []
  for a, b in sorted(ranges):
    if merged and a <= merged[-1][1]:
      merged[-1] = (merged[-1][0], max(merged[-1][1], b))
    else:
      merged.append((a, b))
  return merged


def subtract_ranges(ranges: Sequence[Range],
                    done: Sequence[Range]) -> List[Range]:
  """The parts of `ranges` that no range in `done` covers, in order."""
  done = _merge(done)
  starts = [a for a, _ in done]
  out = []
  for a, b in ranges:
    i = max(bisect.bisect_right(starts, a) - 1, 0)
    while a < b and i < len(done) and done[i][0] < b:
      if done[i][1] > a:
        if done[i][0] > a:
          out.append((a, done[i][0]))
        a = done[i][1]
      i += 1
    if a < b:
      out.append((a, b))
  return out


def shard_name(start: int, stop: int) -> str:
  """The file name of the shard that holds rows [start, stop)."""
  return f"part-{start:012d}-{stop:012d}.parquet"


def list_shards(directory: str) -> List[Range]:
  """Sorted row ranges of the finished shards in directory (none if absent)."""
  if not os.path.isdir(directory):
    return []
  matches = [_PART.match(n) for n in os.listdir(directory)]
  return sorted((int(m.group(1)), int(m.group(2))) for m in matches if m)


class ShardedResults:
  """Parquet shards of one stage, each named by the row range it holds.

  Args:
    workdir: the output folder of the run.
    stage: the subfolder (e.g. "scan").
    process_index: this process (in temporary names, to tell whose they are).
    schema: if given, every table is cast to it before writing, so that all
      shards have one schema (a shard whose scores are all null would otherwise
      have a null-typed column).
  """

  def __init__(self, workdir: str, stage: str = "scan", process_index: int = 0,
               schema: Optional[pa.Schema] = None):
    self.directory = stage_paths(workdir, stage)["dir"]
    self.process_index = process_index
    self.schema = schema
    os.makedirs(self.directory, exist_ok=True)

  def shard_path(self, start: int, stop: int) -> str:
    return os.path.join(self.directory, shard_name(start, stop))

  def done_ranges(self) -> List[Range]:
    """Sorted row ranges whose shard exists; deletes stale temporary files.

    A .tmp of this process index is from a killed run (this process writes
    from one thread); another process's .tmp only when older than an hour, as
    that process may still be writing it.
    """
    for name in os.listdir(self.directory):
      tmp = _TMP.match(name)
      if tmp:
        path = os.path.join(self.directory, name)
        try:
          if (int(tmp.group(1)) == self.process_index or
              time.time() - os.path.getmtime(path) > _STALE_S):
            os.remove(path)
        except FileNotFoundError:  # its writer finished or removed it.
          pass
    return list_shards(self.directory)

  def pending(self, ranges: Sequence[Range]) -> List[Range]:
    """The parts of `ranges` not yet written (a resume may use other ranges)."""
    return subtract_ranges(ranges, self.done_ranges())

  def write(self, table: pa.Table, start: int, stop: int) -> str:
    """Writes rows [start, stop) as one shard, atomically; returns its path."""
    if table.num_rows != stop - start:
      raise ValueError(f"{table.num_rows} rows for range [{start}, {stop})")
    if PROMPT_ID in table.column_names and table.num_rows:
      ids = table[PROMPT_ID]
      if (ids[0].as_py(), ids[-1].as_py()) != (start, stop - 1):
        raise ValueError(f"prompt_id {ids[0]}..{ids[-1]} for [{start}, {stop})")
    if self.schema is not None:
      if sorted(table.column_names) != sorted(self.schema.names):
        raise ValueError(f"columns {table.column_names} != {self.schema.names}")
      table = table.select(self.schema.names).cast(self.schema)
    path = self.shard_path(start, stop)
    tmp = (f".{os.path.basename(path)}.p{self.process_index}.{os.getpid()}.tmp")
    _write_atomic(path, lambda f: pq.write_table(table, f, compression="zstd"),
                  tmp)
    return path


def model_identity(model_dir: str) -> str:
  """sha256 over a model folder's configs (content) and weights (name, size).

  Weight bytes are not read (GBs); a changed weight file almost always changes
  its size or name, and every config, scheduler and tokenizer file is hashed.
  """
  if not os.path.isdir(model_dir):
    raise InputError(f"model folder {model_dir} does not exist.")
  entries = []
  for root, dirs, files in os.walk(model_dir, followlinks=True):
    dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .cache
    for name in files:
      if name.startswith("."):
        continue
      path = os.path.join(root, name)
      rel = os.path.relpath(path, model_dir).replace(os.sep, "/")
      if name.endswith(_CONTENT_EXT):
        with open(path, "rb") as f:
          digest = hashlib.sha256(f.read()).hexdigest()
        entries.append(f"content\t{rel}\t{digest}")
      elif name.endswith(_WEIGHT_EXT):
        entries.append(f"weights\t{rel}\t{os.path.getsize(path)}")
  if not entries:
    raise InputError(
        f"model folder {model_dir} holds no config or weight files.")
  return hashlib.sha256("\n".join(sorted(entries)).encode("utf-8")).hexdigest()


def _remove(path: str) -> None:
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)


def check_run_config(workdir: str, config: dict, overwrite: bool,
                     stage: str = "scan") -> str:
  """Records `config` in the workdir, or checks it against the recorded one.

  Call it on process 0 only, before any shard is written, and let the other
  processes wait for it (a barrier): with overwrite it deletes outputs.

  Args:
    workdir: the output folder.
    config: JSON-serializable dict of everything that changes results (resolved
      flags that matter, `model_identity`).
    overwrite: delete the stage's outputs (shards, top-K, manifest) and start
      again if the recorded config differs or cannot be read.
    stage: which stage's outputs.

  Returns:
    "new" (nothing recorded), "resume" (same config) or "overwrite".

  Raises:
    InputError: the recorded config differs (the message lists each key, old
      and new value), or shards exist without a recorded config.
  """
  paths = stage_paths(workdir, stage)
  config = json.loads(json.dumps(config, sort_keys=True))  # tuples == lists
  os.makedirs(workdir, exist_ok=True)
  fix = ("Pass --overwrite to delete its outputs and start again, or use "
         "another --workdir.")
  if overwrite:
    # Outputs first, the record last: a crash in between leaves a record whose
    # remaining shards still match it.
    for key in ("dir", "top_k", "manifest", "run_config"):
      _remove(paths[key])
    write_json_atomic(paths["run_config"], config)
    return "overwrite"
  if os.path.exists(paths["run_config"]):
    try:
      old = read_json(paths["run_config"])
    except InputError as e:
      raise InputError(f"{e} {fix}") from None
    if old == config:
      return "resume"
    missing = "<not set>"
    lines = [f"  {k}: {json.dumps(old.get(k, missing))} -> "
             f"{json.dumps(config.get(k, missing))}"
             for k in sorted(set(old) | set(config))
             if old.get(k, missing) != config.get(k, missing)]
    raise InputError(f"{workdir} holds a {stage} run with other settings "
                     f"({paths['run_config']}):\n" + "\n".join(lines) +
                     "\n" + fix)
  if list_shards(paths["dir"]):
    raise InputError(f"{paths['dir']} holds shards but {paths['run_config']} "
                     "is missing, so they may come from other settings. " + fix)
  write_json_atomic(paths["run_config"], config)
  return "new"


def open_shards(directory: str) -> ds.Dataset:
  """All shards as one dataset; a column null in some shards gets the type of
  the others (pyarrow's default would take the first shard's schema)."""
  files = [os.path.join(directory, shard_name(a, b))
           for a, b in list_shards(directory)]
  if not files:
    raise InputError(f"{directory} holds no result shards.")
  schema = pa.unify_schemas([pq.read_schema(f) for f in files],
                            promote_options="permissive")
  return ds.dataset(files, schema=schema, format="parquet")


def top_k(directory: str, k: int, column: str = "scores",
          ascending: bool = False, batch_rows: int = 65536) -> pa.Table:
  """The k rows with the highest (lowest if ascending) non-null, non-NaN value
  of `column` over all shards, best first, ties by prompt_id ascending.

  Streams the shards: memory holds at most k + max(k, batch_rows) rows.
  """
  dataset = open_shards(directory)
  if column not in dataset.schema.names:
    raise InputError(f"{directory}: no column '{column}'; its columns are: "
                     f"{', '.join(dataset.schema.names)}.")
  order = [(column, "ascending" if ascending else "descending"),
           (PROMPT_ID, "ascending")]

  def best(tables):
    table = pa.concat_tables(tables)
    return table.take(pc.sort_indices(table, sort_keys=order)[:k])

  kept, buffered, rows = dataset.schema.empty_table(), [], 0
  for batch in dataset.to_batches(batch_size=batch_rows):
    values = batch[column]
    keep = pc.is_valid(values)
    if pa.types.is_floating(values.type):
      keep = pc.and_(keep, pc.invert(pc.is_nan(values)))
    batch = batch.filter(keep)
    buffered.append(pa.Table.from_batches([batch], dataset.schema))
    rows += batch.num_rows
    if rows >= max(k, batch_rows):
      kept, buffered, rows = best([kept] + buffered), [], 0
  return best([kept] + buffered)


def write_top_k(workdir: str, k: int, column: str = "scores",
                ascending: bool = False, stage: str = "scan") -> pa.Table:
  """Writes `top_k` of the stage's shards to WORKDIR/top_k.parquet."""
  paths = stage_paths(workdir, stage)
  table = top_k(paths["dir"], k, column, ascending)
  _write_atomic(paths["top_k"], lambda f: pq.write_table(table, f))
  return table


def count_statuses(directory: str, column: str = "status") -> Dict[str, int]:
  """status -> number of rows over all shards ("<missing>" for null)."""
  counts = collections.Counter()
  for batch in open_shards(directory).to_batches(columns=[column]):
    for item in pc.value_counts(batch[column]).to_pylist():
      counts[item["values"] or "<missing>"] += item["counts"]
  return dict(sorted(counts.items()))
