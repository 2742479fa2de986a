"""Tables with one row a line: JSON lines and plain text, read through an
index of line byte offsets (8 bytes a row), so any row range is one seek."""
import array
import json
from typing import List

import numpy as np
import pyarrow as pa

from memjax.data.captions import MALFORMED_ROW, fix_surrogates
from memjax.data.tables import BOM, PromptTable
from memjax.runtime.errors import InputError


def _strip_eol(line: bytes) -> bytes:
  line = line[:-1] if line.endswith(b"\n") else line
  return line[:-1] if line.endswith(b"\r") else line


def _split_lines(block: bytes) -> List[bytes]:
  """Lines of a block of whole lines, without "\\n" or "\\r\\n"."""
  lines = block.split(b"\n")
  if lines and not lines[-1]:
    lines.pop()  # the block ends with a newline.
  return [_strip_eol(l) for l in lines]


class LineTable(PromptTable):
  """A file with one row a line, read through an index of line byte offsets."""

  def __init__(self, path, prompt_column, fmt, keep_blank):
    super().__init__(path, prompt_column, fmt)
    self._keep_blank = keep_blank
    starts, pos = array.array("q"), 0
    with open(path, "rb") as f:
      for line in f:
        content = _strip_eol(line.removeprefix(BOM) if pos == 0 else line)
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
      block = block.removeprefix(BOM)
    lines = _split_lines(block)
    if not self._keep_blank:
      lines = [l for l in lines if l.strip()]
    if len(lines) != stop - start:
      raise ValueError(f"found {len(lines)} lines, not {stop - start}")
    return lines


class TextTable(LineTable):
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
    except UnicodeDecodeError:  # `fix_surrogates` later marks it replaced.
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


class JsonlTable(LineTable):
  """JSON lines, one object a row; blank lines are no rows.

  The schema comes from a first pass over every line (a column whose rows hold
  different types is read as string), so every chunk has the same columns and
  types; a line that is not a JSON object is a row of nulls (`MALFORMED_ROW`).
  """

  def __init__(self, path, prompt_column):
    self._kinds = {}  # column -> set of Python types seen, in first-seen order.
    with open(path, "rb") as f:
      if f.read(1 << 12).removeprefix(BOM).lstrip().startswith(b"["):
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
              [v if v is None else fix_surrogates(v)[0] for v in values],
              pa.string()))
      else:
        columns.append(pa.array(values, field.type))
    raw = ([r if r is MALFORMED_ROW else r.get(self.prompt_column) for r in rows]
           if self.prompt_column else [])
    return pa.Table.from_arrays(columns, schema=self.schema), raw
