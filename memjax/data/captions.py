"""Caption values as the stages score them: text, or a status saying why not.

A row that cannot be scored (null, empty, not text, malformed) keeps its place
with a status, so no prompt id is ever missing; invalid UTF-8 is replaced
(U+FFFD) and still scored, with a status that says so.
"""
from typing import List, Optional, Tuple

import pyarrow as pa


class _MalformedRow:
  """Raw caption of a JSON line that is not a JSON object."""

  def __repr__(self):
    return "MALFORMED_ROW"


MALFORMED_ROW = _MalformedRow()


def fix_surrogates(text: str) -> Tuple[str, bool]:
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
    text, replaced = fix_surrogates(value)
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
