"""Streaming reader of prompt tables: parquet, JSON lines, CSV/TSV, plain text.

A scan reads tables of 2M+ captions, so host memory stays flat in the number of
rows: `PromptTable.read(start, stop)` reads only rows [start, stop) (parquet row
groups, a streaming CSV reader, or a byte-offset index of lines for JSON lines
and text, 8 bytes a row) and nothing keeps the whole table. Every row keeps its
0-based row number as `prompt_id`, and a row that cannot be scored (null, empty,
not text, malformed) is still returned with a status, so no id is ever missing.
"""
import array
import bisect
import csv
import dataclasses
import io
import json
import os
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from memjax.runtime.errors import InputError

PROMPT_ID = "prompt_id"
_BOM = b"\xef\xbb\xbf"
_BATCH_ROWS = 16384  # parquet batch size; the cursor cuts chunks out of them.
_DELIMITERS = ",;\t|"


class _MalformedRow:
  """Raw caption of a JSON line that is not a JSON object."""

  def __repr__(self):
    return "MALFORMED_ROW"


MALFORMED_ROW = _MalformedRow()


def _fix_surrogates(text: str) -> Tuple[str, bool]:
  """Replaces lone surrogates (undecodable bytes, bad JSON escapes): U+FFFD."""
  try:
    text.encode("utf-8")
    return text, False
  except UnicodeEncodeError:
    pass
  try:  # bytes smuggled in by decode(errors="surrogateescape"): restore them.
    raw = text.encode("utf-8", "surrogateescape")
  except UnicodeEncodeError:
    raw = text.encode("utf-8", "surrogatepass")
  return raw.decode("utf-8", "replace"), True


def _clean_one(value) -> Tuple[Optional[str], str]:
  if value is MALFORMED_ROW:
    return None, "malformed_row"
  if value is None:
    return None, "null"
  if isinstance(value, (bytes, bytearray, memoryview)):
    try:
      text, replaced = bytes(value).decode("utf-8"), False
    except UnicodeDecodeError:
      text, replaced = bytes(value).decode("utf-8", "replace"), True
  elif isinstance(value, str):
    text, replaced = _fix_surrogates(value)
  else:  # numbers, bools, lists, dicts: a caption must be text.
    return None, "not_text"
  if not text.strip():
    return None, "empty"
  return text, "ok_replaced_utf8" if replaced else "ok"


def clean_captions(values) -> Tuple[List[Optional[str]], List[str]]:
  """Turns raw caption values into texts to score and a status per row.

  Args:
    values: [N] raw values (a list, or a pyarrow array): str, bytes, None,
      `MALFORMED_ROW`, or anything else (numbers, lists, ...).

  Returns:
    texts: [N] the caption to score, or None where status is not "ok*". Texts
      are not stripped: the tokenizer sees the caption as the table holds it.
    status: [N] "ok", "ok_replaced_utf8" (invalid UTF-8 replaced by U+FFFD;
      still scored), "empty" (whitespace only), "null", "not_text" or
      "malformed_row".
  """
  if isinstance(values, (pa.Array, pa.ChunkedArray)):
    values = values.to_pylist()
  pairs = [_clean_one(v) for v in values]
  return [p[0] for p in pairs], [p[1] for p in pairs]


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
    if self.prompt_column not in names:
      raise InputError(
          f"{self.path}: no column '{self.prompt_column}'; its columns are: "
          f"{', '.join(map(repr, names))}{extra}. Pass --prompt_column=NAME.")
    if PROMPT_ID in names:
      raise InputError(f"{self.path}: has a column '{PROMPT_ID}', which memjax "
                       "adds itself (row number); rename that column.")

  def _read(self, start: int, stop: int) -> Tuple[pa.Table, list]:
    """Returns the input columns of rows [start, stop) and the raw captions."""
    raise NotImplementedError

  def read_prompts(self, start: int, stop: int) -> PromptChunk:
    """Rows [start, stop) with `prompt_id`, texts to score and statuses."""
    if not 0 <= start <= stop <= self.num_rows:
      raise ValueError(f"rows [{start}, {stop}) outside [0, {self.num_rows})")
    if start == stop:
      table, raw = self.schema.empty_table(), []
    else:
      try:
        table, raw = self._read(start, stop)
      except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"{self.path}: cannot read rows [{start}, {stop}) "
                         f"(did the file change?): {e}") from None
    ids = pa.array(np.arange(start, stop, dtype=np.int64))
    texts, status = clean_captions(raw)
    return PromptChunk(start, stop, table.append_column(PROMPT_ID, ids), texts,
                       status)

  def read(self, start: int, stop: int) -> pa.Table:
    """Rows [start, stop): the input columns in `schema`, plus `prompt_id`."""
    return self.read_prompts(start, stop).table

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


def _raw_captions(column: pa.ChunkedArray) -> list:
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
    return table, _raw_captions(table[self.prompt_column])


def _decode(column: pa.ChunkedArray) -> pa.ChunkedArray:
  """Binary -> string; invalid UTF-8 is replaced (U+FFFD), never an error."""
  try:
    return column.cast(pa.string())
  except pa.ArrowInvalid:
    return pa.chunked_array([pa.array(
        [None if b is None else b.decode("utf-8", "replace")
         for b in column.to_pylist()], pa.string())])


def _sniff_delimiter(path, prompt_column, default):
  """The delimiter of a CSV file, from csv.Sniffer on its head."""
  with open(path, "rb") as f:
    head = f.read(1 << 16)
  head = head.removeprefix(_BOM).decode("utf-8", "replace")
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
    if prompt_column in header:
      return candidate
  return delimiter


class _CsvTable(PromptTable):
  """A CSV/TSV file with a header row; every column is read as text."""

  def __init__(self, path, prompt_column, delimiter):
    super().__init__(path, prompt_column, "csv")
    default = "\t" if path.lower().endswith(".tsv") else ","
    if delimiter in ("\\t", "tab"):
      delimiter = "\t"
    if delimiter is not None and len(delimiter) != 1:
      raise InputError(f"--csv_delimiter={delimiter!r}: must be one character.")
    self.delimiter = delimiter or _sniff_delimiter(path, prompt_column, default)
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
    self._check_columns(f" (delimiter {self.delimiter!r}; set --csv_delimiter)")
    self._cursor = _BatchCursor(lambda start: (self._stream(), 0))

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
    table = pa.Table.from_batches(self._cursor.take(start, stop))
    raw = table[self.prompt_column].to_pylist()
    columns = [_decode(table[n]) for n in self.schema.names]
    return pa.Table.from_arrays(columns, schema=self.schema), raw


def _strip_eol(line: bytes) -> bytes:
  line = line[:-1] if line.endswith(b"\n") else line
  return line[:-1] if line.endswith(b"\r") else line


def _split_lines(block: bytes) -> List[bytes]:
  """Lines of a block of whole lines, without "\\n" or "\\r\\n"."""
  lines = block.split(b"\n")
  if lines and not lines[-1]:
    lines.pop()  # the block ends with a newline.
  return [_strip_eol(l) for l in lines]


class _LineTable(PromptTable):
  """A file with one row a line, read through an index of line byte offsets."""

  def __init__(self, path, prompt_column, fmt, keep_blank):
    super().__init__(path, prompt_column, fmt)
    self._keep_blank = keep_blank
    starts, pos = array.array("q"), 0
    with open(path, "rb") as f:
      for line in f:
        content = _strip_eol(line.removeprefix(_BOM) if pos == 0 else line)
        if keep_blank or content.strip():
          starts.append(pos)
          self._index_line(content)
        pos += len(line)
    starts.append(pos)
    self._offsets = np.frombuffer(starts, dtype=np.int64)  # [num_rows + 1]
    self.num_rows = len(starts) - 1

  def _index_line(self, line: bytes):
    """Sees each row's line once, in the counting pass."""

  def _lines(self, start, stop) -> List[bytes]:
    lo, hi = int(self._offsets[start]), int(self._offsets[stop])
    with open(self.path, "rb") as f:
      f.seek(lo)
      block = f.read(hi - lo)
    if lo == 0:
      block = block.removeprefix(_BOM)
    lines = _split_lines(block)
    if not self._keep_blank:
      lines = [l for l in lines if l.strip()]
    if len(lines) != stop - start:
      raise ValueError(f"found {len(lines)} lines, not {stop - start}")
    return lines


class _TextTable(_LineTable):
  """Plain text, one caption a line; empty lines are rows (line i = row i)."""

  def __init__(self, path, prompt_column):
    super().__init__(path, prompt_column, "txt", keep_blank=True)
    self.schema = pa.schema([(prompt_column, pa.string())])
    self._check_columns()

  def _read(self, start, stop):
    raw = self._lines(start, stop)
    text = pa.array([l.decode("utf-8", "replace") for l in raw], pa.string())
    return pa.Table.from_arrays([text], schema=self.schema), raw


def _parse_json(line: bytes):
  """A JSON line as an object, or MALFORMED_ROW; bad UTF-8 as surrogates."""
  try:
    try:
      obj = json.loads(line)
    except UnicodeDecodeError:  # `_fix_surrogates` later marks it replaced.
      obj = json.loads(line.decode("utf-8", "surrogateescape"))
  except ValueError:
    return MALFORMED_ROW
  return obj if isinstance(obj, dict) else MALFORMED_ROW


def _arrow_type(kinds: set) -> pa.DataType:
  """The column type for the Python types seen in it; string on any conflict."""
  kinds = kinds - {type(None)}
  if kinds == {bool}:
    return pa.bool_()
  if kinds == {int}:
    return pa.int64()
  if kinds and kinds <= {int, float}:
    return pa.float64()
  return pa.string()  # str; all null; lists/dicts (as JSON); any mixture.


def _to_string(value):
  if value is None or isinstance(value, str):
    return value
  return json.dumps(value, ensure_ascii=False)


class _JsonlTable(_LineTable):
  """JSON lines, one object a row; blank lines are no rows.

  The schema comes from a first pass over every line (a column whose rows hold
  different types is read as string), so every chunk has the same columns and
  types; a line that is not a JSON object is a row of nulls (`MALFORMED_ROW`).
  """

  def __init__(self, path, prompt_column):
    self._kinds = {}  # column -> set of Python types seen, in first-seen order.
    with open(path, "rb") as f:
      if f.read(1 << 12).removeprefix(_BOM).lstrip().startswith(b"["):
        raise InputError(f"{path}: a JSON array; memjax reads JSON lines (one "
                         "object a line), which `jq -c '.[]'` makes from it.")
    super().__init__(path, prompt_column, "jsonl", keep_blank=False)
    self.schema = pa.schema(
        [(k, _arrow_type(v)) for k, v in self._kinds.items()])
    self._check_columns()

  def _index_line(self, line):
    obj = _parse_json(line)
    if obj is MALFORMED_ROW:
      self.num_malformed += 1
      return
    for key, value in obj.items():
      kind = type(value)
      if kind is int and not -2**63 <= value < 2**63:
        kind = "bigint"  # no int64: a conflict, read as string.
      self._kinds.setdefault(key, set()).add(kind)

  def _read(self, start, stop):
    rows = [_parse_json(l) for l in self._lines(start, stop)]
    objs = [{} if r is MALFORMED_ROW else r for r in rows]
    columns = []
    for field in self.schema:
      values = [o.get(field.name) for o in objs]
      if pa.types.is_string(field.type):
        values = [_to_string(v) for v in values]
        try:
          columns.append(pa.array(values, pa.string()))
        except (UnicodeEncodeError, pa.ArrowException):  # lone surrogates.
          columns.append(pa.array(
              [v if v is None else _fix_surrogates(v)[0] for v in values],
              pa.string()))
      else:
        columns.append(pa.array(values, field.type))
    raw = [r if r is MALFORMED_ROW else r.get(self.prompt_column) for r in rows]
    return pa.Table.from_arrays(columns, schema=self.schema), raw


def open_prompts(path: str, prompt_column: str = "caption",
                 csv_delimiter: Optional[str] = None) -> PromptTable:
  """Opens a prompt table for reading by row range.

  Reads .parquet (or a folder of them, as one table), .jsonl/.json (JSON lines),
  .csv/.tsv and .txt; counts the rows and fixes the schema up front.

  Raises:
    InputError: missing file, unknown type, no caption column (the message lists
      the columns there), no rows, or a file that cannot be read.
  """
  if not os.path.exists(path):
    raise InputError(f"prompt file {path} does not exist.")
  ext = os.path.splitext(path.rstrip("/"))[1].lower()
  if os.path.isdir(path):
    ext = ".parquet"
  readers = {".parquet": lambda: _ParquetTable(path, prompt_column),
             ".jsonl": lambda: _JsonlTable(path, prompt_column),
             ".json": lambda: _JsonlTable(path, prompt_column),
             ".csv": lambda: _CsvTable(path, prompt_column, csv_delimiter),
             ".tsv": lambda: _CsvTable(path, prompt_column, csv_delimiter),
             ".txt": lambda: _TextTable(path, prompt_column)}
  if ext not in readers:
    raise InputError(f"{path}: unknown prompt file type '{ext}'; memjax "
                     "reads .parquet, .jsonl/.json (JSON lines), .csv, .tsv "
                     "and .txt.")
  try:
    return readers[ext]()
  except OSError as e:
    raise InputError(f"{path}: cannot read: {e}") from None
