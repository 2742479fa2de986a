"""The rows a stage works on: a caption table, or an earlier stage's best rows.

    --prompts=captions.parquet     every row of a table (`memjax.data.tables`)
    --prompts=WORKDIR              the top --top_k rows of an earlier stage there

Every row comes out as a `PromptChunk` whose table holds the input columns,
`prompt_id` (the row number here) and `caption` (the text to use: the caption
column's text when that column has another name). A column the consuming stage
writes itself is renamed on the way in, so nothing is overwritten: `input_<c>`
for a table's column, `<stage>_<c>` for an earlier stage's (`scan_prompt_id`,
`scan_status`: the report and the metrics join stages by `scan_prompt_id`).
"""
import dataclasses
import hashlib
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from memjax.data import tables
from memjax.data.captions import clean_captions
from memjax.runtime import fingerprint
from memjax.runtime import shards
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError

CAPTION = "caption"
PROMPT_ID = shards.PROMPT_ID


@dataclasses.dataclass
class RowSource:
  """Rows read by range.

  Attributes:
    num_rows: rows in the source (after --max_prompts / --top_k).
    read: (start, stop) -> `tables.PromptChunk`.
    identity: what identifies the rows, for the run config.
    stage: the earlier stage read, or None for a table.
  """
  num_rows: int
  read: Callable[[int, int], tables.PromptChunk]
  identity: Dict
  stage: Optional[str] = None


def _rename(table: pa.Table, names: Sequence[str], prefix: str) -> pa.Table:
  """Columns in `names` become `<prefix>_<name>` (prefixed again while that name is
  taken, so an input holding both `scores` and `input_scores` keeps both)."""
  names, taken, out = set(names), set(table.column_names), []
  for c in table.column_names:
    new = c
    while new in names or (new != c and new in taken):
      new = f"{prefix}_{new}"
    taken.add(new)
    out.append(new)
  return table.rename_columns(out)


def _with_caption(table: pa.Table, texts, caption_column: str) -> pa.Table:
  """Adds `caption` (the texts) when the captions came from another column."""
  if caption_column == CAPTION:
    return table
  table = _rename(table, [CAPTION], "input")
  return table.append_column(CAPTION, pa.array(texts, pa.string()))


def _from_table(path: str, prompt_column: str, csv_delimiter: Optional[str],
                max_prompts: Optional[int], reserved: Sequence[str]) -> RowSource:
  table = tables.open_prompts(path, prompt_column, csv_delimiter)
  n = table.num_rows if max_prompts is None else min(table.num_rows, max_prompts)
  clash = [c for c in reserved if c not in (PROMPT_ID, CAPTION, prompt_column)]

  def read(start, stop):
    chunk = table.read_prompts(start, stop)
    t = _rename(chunk.table, clash, "input")
    chunk.table = _with_caption(t, chunk.texts, prompt_column)
    return chunk

  return RowSource(n, read, {"prompts": os.path.abspath(path),
                             "prompts_content": fingerprint.path_identity(path),
                             "prompt_column": prompt_column, "max_prompts": max_prompts})


def _stage_dir(path: str, stages: Sequence[Tuple[str, str]]):
  for stage, column in stages:
    folder = workdir_lib.resolve(path, stage)
    if os.path.isdir(folder) and shards.list_shards(folder):
      return stage, column, folder
  return None


def _from_stage(path: str, stage: str, column: str, folder: str, top_k: int,
                max_prompts: Optional[int], reserved: Sequence[str]) -> RowSource:
  manifest = os.path.join(folder, workdir_lib.MANIFEST)
  if not os.path.exists(manifest):
    raise InputError(f"--prompts={path}: the {stage} there is not finished ({manifest} is "
                     "missing); rerun it to finish")
  run_config = workdir_lib.read_json(os.path.join(folder, workdir_lib.RUN_CONFIG))
  top = shards.top_k(folder, top_k, column)
  if max_prompts is not None:
    top = top.slice(0, max_prompts)
  # The stage's own ids and statuses (and any column we write) keep their values
  # under <stage>_<name>: these rows get new ids 0..K-1.
  top = _rename(top, {PROMPT_ID, "status"} | (set(reserved) - {CAPTION}), stage)
  ids = hashlib.sha256(repr(top[f"{stage}_{PROMPT_ID}"].to_pylist()).encode()).hexdigest()

  def read(start, stop):
    part = top.slice(start, stop - start)
    texts, status = clean_captions(part[CAPTION])
    part = part.append_column(PROMPT_ID, pa.array(np.arange(start, stop, dtype=np.int64)))
    return tables.PromptChunk(start, stop, part, texts, status)

  # The rows are identified by what they are (the stage's settings and the ids it
  # ranked first), not by where the workdir lies: a moved workdir resumes.
  return RowSource(top.num_rows, read, {
      "source_stage": stage, "source_run_config": run_config, "top_k": top_k,
      "max_prompts": max_prompts, "source_ids": ids}, stage)


def open_rows(path: str, prompt_column: str = CAPTION, csv_delimiter: Optional[str] = None, *,
              top_k: int = 100, max_prompts: Optional[int] = None,
              stages: Sequence[Tuple[str, str]] = (), reserved: Sequence[str] = ()
              ) -> RowSource:
  """The rows of --prompts.

  Args:
    path: a caption table, or a workdir (or stage folder) of one of `stages`.
    prompt_column, csv_delimiter: of a table.
    top_k: rows taken from an earlier stage, best first by its score column.
    max_prompts: only the first rows (None: all).
    stages: (stage, score column) pairs a workdir may hold, first found wins.
    reserved: the columns the consuming stage writes (renamed on the way in).

  The counts are the stage config's, checked when it was built (`runtime.checks`).
  """
  if os.path.isdir(path):
    found = _stage_dir(path, stages)
    if found:
      return _from_stage(path, *found, top_k, max_prompts, reserved)
    if any(os.path.isdir(workdir_lib.resolve(path, s)) for s, _ in stages):
      raise InputError(f"--prompts={path}: the workdir holds no finished "
                       f"{' or '.join(s for s, _ in stages)} results")
  return _from_table(path, prompt_column, csv_delimiter, max_prompts, reserved)
