"""Crash-safe row shards of a batched stage: writing, resuming, reading, top-K.

Rows [a, b) of a stage are done exactly when `WORKDIR/<stage>/part-<a:012d>-<b:012d>.parquet`
exists: each shard is written under a temporary name, fsynced and renamed
(`workdir.write_atomic`), so a killed run leaves either the whole shard or a
`.tmp` file that the next run deletes. Processes write disjoint row ranges, so
they need no coordination.
"""
import bisect
import collections
import os
import re
import time
from typing import Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError

PROMPT_ID = "prompt_id"
_PART = re.compile(r"^part-(\d{12})-(\d{12})\.parquet$")
_TMP = re.compile(r"^\.part-\d{12}-\d{12}\.parquet\.p(\d+)\.(\d+)\.tmp$")
_STALE_S = 3600.0  # another process's .tmp older than this is from a dead run.

Range = Tuple[int, int]


def shard_ranges(num_rows: int, shard_rows: int, process_index: int = 0,
                 process_count: int = 1) -> List[Range]:
  """Rows [0, num_rows) in shards of shard_rows; process p takes every
  process_count-th shard starting at p (round robin: the processes finish
  together when the shards take equal time)."""
  if shard_rows < 1:
    raise InputError(f"the shard size must be >= 1, got {shard_rows}")
  ranges = [(a, min(a + shard_rows, num_rows)) for a in range(0, num_rows, shard_rows)]
  return ranges[process_index::process_count]


def _merge(ranges: Sequence[Range]) -> List[Range]:
  merged = []
  for a, b in sorted(ranges):
    if merged and a <= merged[-1][1]:
      merged[-1] = (merged[-1][0], max(merged[-1][1], b))
    else:
      merged.append((a, b))
  return merged


def subtract_ranges(ranges: Sequence[Range], done: Sequence[Range]) -> List[Range]:
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


class ShardWriter:
  """Parquet shards in one stage folder, each named by the row range it holds.

  Args:
    directory: the stage folder (`workdir.stage_dir`).
    process_index: this process (in temporary names, to tell whose they are).
    schema: if given, every table is cast to it before writing, so that all
      shards have one schema (a shard whose scores are all null would otherwise
      have a null-typed column).
  """

  def __init__(self, directory: str, process_index: int = 0,
               schema: Optional[pa.Schema] = None):
    self.directory = directory
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
    tmp = os.path.join(self.directory,
                       f".{os.path.basename(path)}.p{self.process_index}.{os.getpid()}.tmp")
    workdir_lib.write_atomic(path, lambda f: pq.write_table(table, f, compression="zstd"), tmp)
    return path


def open_shards(directory: str) -> ds.Dataset:
  """All shards as one dataset; a column null in some shards gets the type of
  the others (pyarrow's default would take the first shard's schema)."""
  files = [os.path.join(directory, shard_name(a, b)) for a, b in list_shards(directory)]
  if not files:
    raise InputError(f"{directory} holds no result shards.")
  schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
  return ds.dataset(files, schema=schema, format="parquet")


def top_k(directory: str, k: int, column: str = "scores", ascending: bool = False,
          batch_rows: int = 65536) -> pa.Table:
  """The k rows with the highest (lowest if ascending) non-null, finite value
  of `column` over all shards, best first, ties by prompt_id ascending.

  Streams the shards: memory holds at most k + max(k, batch_rows) rows.
  """
  dataset = open_shards(directory)
  if column not in dataset.schema.names:
    raise InputError(f"{directory}: no column '{column}'; its columns are: "
                     f"{', '.join(dataset.schema.names)}.")
  order = [(column, "ascending" if ascending else "descending"), (PROMPT_ID, "ascending")]

  def best(tables):
    table = pa.concat_tables(tables)
    return table.take(pc.sort_indices(table, sort_keys=order)[:k])

  kept, buffered, rows = dataset.schema.empty_table(), [], 0
  for batch in dataset.to_batches(batch_size=batch_rows):
    values = batch[column]
    keep = pc.is_valid(values)
    if pa.types.is_floating(values.type):
      keep = pc.and_(keep, pc.is_finite(values))  # NaN and inf are never ranked
    batch = batch.filter(keep)
    buffered.append(pa.Table.from_batches([batch], dataset.schema))
    rows += batch.num_rows
    if rows >= max(k, batch_rows):
      kept, buffered, rows = best([kept] + buffered), [], 0
  return best([kept] + buffered)


def write_top_k(directory: str, k: int, column: str = "scores",
                ascending: bool = False) -> pa.Table:
  """Writes `top_k` of the shards in a stage folder to its top_k.parquet."""
  table = top_k(directory, k, column, ascending)
  workdir_lib.write_parquet(os.path.join(directory, workdir_lib.TOP_K), table)
  return table


def count_statuses(directory: str, column: str = "status") -> Dict[str, int]:
  """status -> number of rows over all shards ("<missing>" for null)."""
  counts = collections.Counter()
  for batch in open_shards(directory).to_batches(columns=[column]):
    for item in pc.value_counts(batch[column]).to_pylist():
      counts[item["values"] or "<missing>"] += item["counts"]
  return dict(sorted(counts.items()))
