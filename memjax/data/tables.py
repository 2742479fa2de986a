"""Streaming readers of tables: parquet, JSON lines, CSV/TSV, plain text.

A scan reads tables of 2M+ captions, so host memory stays flat in the number of
rows: `PromptTable.read_prompts(start, stop)` reads only rows [start, stop)
(parquet row groups, a streaming CSV reader, or a byte-offset index of lines for
JSON lines and text, 8 bytes a row, `memjax.data.line_tables`) and nothing keeps
the whole table. Every row keeps its 0-based row number as `prompt_id`, and a
row that cannot be scored is still returned with a status (`memjax.data.captions`).

`open_prompts` is the one way a caption table is opened; `read_table` reads a
whole table of any of these formats (label and score tables, training-image
lists), with the same CSV delimiter detection.
"""
import bisect
import csv
import dataclasses
import io
import os
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from memjax.data.captions import MALFORMED_ROW, clean_captions
from memjax.runtime.errors import InputError

PROMPT_ID = "prompt_id"
BOM = b"\xef\xbb\xbf"
_BATCH_ROWS = 16384  # parquet batch size; the cursor cuts chunks out of them.
_DELIMITERS = ",;\t|"


@dataclasses.dataclass
class PromptChunk:
  """Rows [start, stop) of a prompt table, with captions ready to score.

  table: the input columns plus `prompt_id` (int64); texts: [stop - start]
  caption or None; status: [stop - start], see `clean_captions`.
  """
  start: int
  stop: int
  table: pa.Table
  texts: List[Optional[str]]
  status: List[str]


class PromptTable:
  """Rows of a prompt file, read by range. Build with `open_prompts`."""

  def __init__(self, path: str, prompt_column: str, fmt: str):
    self.path = path
    self.prompt_column = prompt_column
    self.format = fmt
    self.num_rows = 0
    self.schema = pa.schema([])  # the input columns, fixed for the whole file.
    self.num_malformed = 0  # JSON lines that are no object; CSV rows skipped.

  def _check_columns(self, extra=""):
    names = self.schema.names
    if self.num_rows == 0:
      raise InputError(f"{self.path}: holds no rows.")
    if self.prompt_column is None:  # a plain table (`read_table`): any columns
      return
    if self.prompt_column not in names:
      raise InputError(
          f"{self.path}: no column '{self.prompt_column}'; its columns are: "
          f"{', '.join(map(repr, names))}{extra}. Pass --prompt_column=NAME.")
    if PROMPT_ID in names:
      raise InputError(f"{self.path}: has a column '{PROMPT_ID}', which memjax "
                       "adds itself (row number); rename that column.")

  def _raw(self, table: pa.Table) -> list:
    """The caption values of a block ([] for a plain table)."""
    if self.prompt_column is None:
      return []
    return raw_captions(table[self.prompt_column])

  def _read(self, start: int, stop: int) -> Tuple[pa.Table, list]:
    """Returns the input columns of rows [start, stop) and the raw captions."""
    raise NotImplementedError

  def read_rows(self, start: int, stop: int) -> pa.Table:
    """The input columns of rows [start, stop), in `schema`."""
    return self._read_checked(start, stop)[0]

  def _read_checked(self, start, stop):
    if not 0 <= start <= stop <= self.num_rows:
      raise ValueError(f"rows [{start}, {stop}) outside [0, {self.num_rows})")
    if start == stop:
      return self.schema.empty_table(), []
    try:
      return self._read(start, stop)
    except (pa.ArrowException, OSError, ValueError) as e:
      raise InputError(f"{self.path}: cannot read rows [{start}, {stop}) "
                       f"(did the file change?): {e}") from None

  def read_prompts(self, start: int, stop: int) -> PromptChunk:
    """Rows [start, stop) with `prompt_id`, texts to score and statuses."""
    table, raw = self._read_checked(start, stop)
    ids = pa.array(np.arange(start, stop, dtype=np.int64))
    texts, status = clean_captions(raw)
    return PromptChunk(start, stop, table.append_column(PROMPT_ID, ids), texts, status)

  def iter_chunks(self, start: int = 0, stop: Optional[int] = None,
                  chunk_rows: int = 4096) -> Iterator[PromptChunk]:
    """Yields consecutive `PromptChunk`s of at most chunk_rows rows."""
    stop = self.num_rows if stop is None else stop
    for lo in range(start, stop, chunk_rows):
      yield self.read_prompts(lo, min(lo + chunk_rows, stop))


class _BatchCursor:
  """Cuts row ranges out of a stream of record batches; forward reads stream."""

  def __init__(self, open_at, reopen_for=lambda start, pos: False):
    self._open_at = open_at  # start -> (batch iterator, row of first batch)
    self._reopen_for = reopen_for  # (start, pos) -> True if a jump is cheaper
    self._batches, self._pos, self._pending = None, None, None

  def take(self, start: int, stop: int) -> List[pa.RecordBatch]:
    try:
      return self._take(start, stop)
    except BaseException:
      self._pos = None  # unknown state: the next read starts afresh.
      raise

  def _take(self, start, stop):
    if (self._pos is None or start < self._pos or
        self._reopen_for(start, self._pos)):
      self._batches, self._pos = self._open_at(start)
      self._pending = None
    out = []
    while self._pos < stop:
      batch, self._pending = self._pending, None
      if batch is None:
        batch = next(self._batches, None)
        if batch is None:
          raise ValueError(f"the file ends at row {self._pos}")
      lo, hi = max(start - self._pos, 0), min(stop - self._pos, batch.num_rows)
      if lo < hi:
        out.append(batch.slice(lo, hi - lo))
      if hi < batch.num_rows:  # keep the rest for the next range.
        self._pending = batch.slice(hi)
        self._pos += hi
      else:
        self._pos += batch.num_rows
    return out


def raw_captions(column: pa.ChunkedArray) -> list:
  """Caption values for `clean_captions`; invalid UTF-8 strings as bytes."""
  if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
    try:
      column.validate(full=True)
    except pa.ArrowInvalid:
      column = column.cast(pa.binary(), safe=False)
  return column.to_pylist()


class _ParquetTable(PromptTable):
  """A parquet file, or a folder of them read as one table in name order."""

  def __init__(self, path, prompt_column):
    super().__init__(path, prompt_column, "parquet")
    files = [path]
    if os.path.isdir(path):
      files = sorted(os.path.join(path, f) for f in os.listdir(path)
                     if f.endswith(".parquet") and not f.startswith((".", "_")))
      if not files:
        raise InputError(f"{path}: a folder without .parquet files.")
    self._files, self._groups, self._starts = [], [], []
    for name in files:
      try:
        pf = pq.ParquetFile(name, buffer_size=1 << 20)
      except (pa.ArrowException, OSError) as e:
        raise InputError(f"{name}: cannot read as parquet: {e}") from None
      schema = pf.schema_arrow.remove_metadata()
      if not self._files:
        self.schema = schema
      elif schema != self.schema:
        raise InputError(f"{name}: its columns differ from those of {files[0]}:"
                         f"\n{schema}\nvs\n{self.schema}")
      for g in range(pf.metadata.num_row_groups):
        self._groups.append((len(self._files), g))
        self._starts.append(self.num_rows)
        self.num_rows += pf.metadata.row_group(g).num_rows
      self._files.append(pf)
    self._check_columns()
    self._cursor = _BatchCursor(self._open_at, self._reopen_for)

  def _group_of(self, row):
    return bisect.bisect_right(self._starts, row) - 1

  def _open_at(self, start):
    first = self._group_of(start)

    def batches():
      for f, g in self._groups[first:]:
        yield from self._files[f].iter_batches(_BATCH_ROWS, row_groups=[g])

    return batches(), self._starts[first]

  def _reopen_for(self, start, pos):
    return self._group_of(start) > self._group_of(pos)  # skip whole groups.

  def _read(self, start, stop):
    batches = [b.replace_schema_metadata()
               for b in self._cursor.take(start, stop)]
    table = pa.Table.from_batches(batches, self.schema)
    return table, self._raw(table)


def _decode(column: pa.ChunkedArray) -> pa.ChunkedArray:
  """Binary -> string; invalid UTF-8 is replaced (U+FFFD), never an error."""
  try:
    return column.cast(pa.string())
  except pa.ArrowInvalid:
    return pa.chunked_array([pa.array(
        [None if b is None else b.decode("utf-8", "replace")
         for b in column.to_pylist()], pa.string())])


def sniff_delimiter(path: str, column: Optional[str], default: str = ",") -> str:
  """The delimiter of a CSV file, from csv.Sniffer on its head."""
  with open(path, "rb") as f:
    head = f.read(1 << 16)
  head = head.removeprefix(BOM).decode("utf-8", "replace")
  if "\n" in head:
    head = head[:head.rindex("\n") + 1]  # whole lines only.
  try:
    delimiter = csv.Sniffer().sniff(head, delimiters=_DELIMITERS).delimiter
  except csv.Error:
    delimiter = default
  # Captions are full of commas, which can fool the sniffer; a delimiter that
  # makes the header hold the caption column wins.
  for candidate in [delimiter] + list(_DELIMITERS):
    header = next(csv.reader(io.StringIO(head), delimiter=candidate), [])
    if column is not None and column in header:
      return candidate
  return delimiter


def resolve_delimiter(path: str, column: Optional[str], delimiter: Optional[str] = None) -> str:
  """The delimiter given (`\\t` and `tab` mean a tab), else the one detected."""
  if delimiter in ("\\t", "tab"):
    delimiter = "\t"
  if delimiter is not None and len(delimiter) != 1:
    raise InputError(f"--csv_delimiter={delimiter!r}: must be one character.")
  default = "\t" if path.lower().endswith(".tsv") else ","
  return delimiter or sniff_delimiter(path, column, default)


class _CsvTable(PromptTable):
  """A CSV/TSV file with a header row; every column is read as text."""

  def __init__(self, path, prompt_column, delimiter):
    super().__init__(path, prompt_column, "csv")
    self.delimiter = resolve_delimiter(path, prompt_column, delimiter)
    self._counting = False
    self._parse = pacsv.ParseOptions(
        delimiter=self.delimiter, newlines_in_values=True,
        invalid_row_handler=self._on_invalid_row)
    try:
      with self._open(pacsv.ConvertOptions(check_utf8=False)) as reader:
        names = reader.schema.names
      # Bytes, decoded by `_decode`, so that invalid UTF-8 never stops a scan.
      self._convert = pacsv.ConvertOptions(
          column_types={n: pa.binary() for n in names})
      self.schema = pa.schema([(n, pa.string()) for n in names])
      count = pacsv.ConvertOptions(column_types={names[0]: pa.binary()},
                                   include_columns=names[:1])
      self._counting = True
      with self._open(count) as reader:
        self.num_rows = sum(b.num_rows for b in reader)
    except (pa.ArrowException, OSError) as e:
      raise InputError(f"{path}: cannot read as CSV (delimiter "
                       f"{self.delimiter!r}): {e}") from None
    self._counting = False
    # Rows with another number of fields than the header are skipped by pyarrow;
    # they keep their place (and row number) here, as malformed rows.
    self._bad = self._malformed_rows(len(names)) if self.num_malformed else np.zeros(0, int)
    self.num_rows += len(self._bad)
    self._check_columns(f" (delimiter {self.delimiter!r}; set --csv_delimiter)")
    self._cursor = _BatchCursor(lambda start: (self._stream(), 0))

  def _malformed_rows(self, width: int) -> np.ndarray:
    """Row numbers (after the header) of the rows pyarrow skipped, found by a
    second, Python pass (only when there are such rows)."""
    with open(self.path, encoding="utf-8", errors="surrogateescape", newline="") as f:
      rows = (r for r in csv.reader(f, delimiter=self.delimiter) if r)
      next(rows, None)  # the header
      bad = [i for i, r in enumerate(rows) if len(r) != width]
    if len(bad) != self.num_malformed:
      raise InputError(f"{self.path}: {self.num_malformed} rows have another number of fields "
                       f"than the header, but they cannot be located (found {len(bad)}); "
                       "fix the file's quoting")
    return np.asarray(bad, int)

  def _on_invalid_row(self, row):
    if self._counting:  # a skipped row is no row; count it in one pass only.
      self.num_malformed += 1
    return "skip"

  def _open(self, convert):
    return pacsv.open_csv(self.path, pacsv.ReadOptions(block_size=1 << 20),
                          self._parse, convert)

  def _stream(self):
    with self._open(self._convert) as reader:
      yield from reader

  def _read(self, start, stop):
    # Rows [start, stop) are the well-formed rows [lo, hi) plus the malformed ones.
    lo, hi = (start - np.searchsorted(self._bad, start), stop - np.searchsorted(self._bad, stop))
    table = pa.Table.from_batches(self._cursor.take(lo, hi), self._cursor_schema())
    raw = table[self.prompt_column].to_pylist() if self.prompt_column else []
    columns = [_decode(table[n]) for n in self.schema.names]
    table = pa.Table.from_arrays(columns, schema=self.schema)
    bad = set((self._bad[(self._bad >= start) & (self._bad < stop)] - start).tolist())
    if bad:  # a null row with a malformed caption at each malformed row's place
      take, out_raw, k = [], [], 0
      for i in range(stop - start):
        if i in bad:
          take.append(None)
          out_raw.append(MALFORMED_ROW)
        else:
          take.append(k)
          out_raw.append(raw[k] if raw else None)
          k += 1
      table = table.take(pa.array(take, pa.int64()))
      raw = out_raw if self.prompt_column else []
    return table, raw

  def _cursor_schema(self):
    return pa.schema([(n, pa.binary()) for n in self.schema.names])


_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv",
            ".tsv": "csv", ".txt": "txt"}


def _format(path: str) -> str:
  if not os.path.exists(path):
    raise InputError(f"{path} does not exist.")
  ext = ".parquet" if os.path.isdir(path) else os.path.splitext(path)[1].lower()
  if ext not in _FORMATS:
    raise InputError(f"{path}: unknown table type '{ext}'; memjax reads .parquet (a file or a "
                     "folder of them), .jsonl/.json (JSON lines), .csv, .tsv and .txt.")
  return _FORMATS[ext]


def open_prompts(path: str, prompt_column: Optional[str] = "caption",
                 csv_delimiter: Optional[str] = None) -> PromptTable:
  """Opens a table for reading by row range; counts the rows, fixes the schema.

  Args:
    path: .parquet (or a folder of them, as one table), .jsonl/.json (JSON
      lines), .csv/.tsv (delimiter detected unless given) or .txt (one caption
      a line).
    prompt_column: the caption column (required); None for a plain table.
    csv_delimiter: the CSV delimiter (default: detected).

  Raises:
    InputError: missing file, unknown type, no caption column (the message lists
      the columns there), no rows, or a file that cannot be read.
  """
  from memjax.data import line_tables  # pylint: disable=g-import-not-at-top  # they build on this
  fmt = _format(path)
  readers = {"parquet": lambda: _ParquetTable(path, prompt_column),
             "jsonl": lambda: line_tables.JsonlTable(path, prompt_column),
             "csv": lambda: _CsvTable(path, prompt_column, csv_delimiter),
             "txt": lambda: line_tables.TextTable(path, prompt_column or "caption")}
  try:
    return readers[fmt]()
  except OSError as e:
    raise InputError(f"{path}: cannot read: {e}") from None


def read_table(path: str, csv_delimiter: Optional[str] = None) -> pa.Table:
  """A whole table of any format `open_prompts` reads, with typed columns.

  CSV columns get pyarrow's type inference (numbers as numbers, so ids join),
  with the delimiter detected as for captions.
  """
  if _format(path) == "csv":
    delimiter = resolve_delimiter(path, None, csv_delimiter)
    try:
      return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(
          delimiter=delimiter, newlines_in_values=True))
    except (pa.ArrowException, OSError) as e:
      raise InputError(f"{path}: cannot read as CSV (delimiter {delimiter!r}): {e}") from None
  table = open_prompts(path, None)
  return table.read_rows(0, table.num_rows)
