"""Tests of memjax.data.tables (+ captions, line_tables): every format reads the
same rows, in any chunks; read_table reads whole typed tables."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DATA
from memjax.data import captions
from memjax.data import line_tables
from memjax.data import tables
from memjax.runtime.errors import InputError

CAPTIONS = ["A cat, sitting on a mat", "dog", "  ", "a \"quoted\" caption",
            "Ünïcödé caption ✓", "", "last one; with semicolon"]


def _read(table, start, stop):
  """Rows [start, stop) with prompt_id; read_rows is the same without it."""
  out = table.read_prompts(start, stop).table
  assert table.read_rows(start, stop).equals(out.drop_columns(["prompt_id"]))
  return out


def _rows():
  return [{"caption": c, "index": 100 + i, "url": f"http://x/{i}.jpg"}
          for i, c in enumerate(CAPTIONS)]


def _expected(rows, columns=("caption", "index", "url")):
  return [dict({k: r[k] for k in columns}, prompt_id=i)
          for i, r in enumerate(rows)]


def _write_csv(path, rows, delimiter):
  lines = [delimiter.join(["caption", "index", "url"])]
  for r in rows:
    caption = '"' + r["caption"].replace('"', '""') + '"'
    lines.append(delimiter.join([caption, str(r["index"]), r["url"]]))
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def _all_formats(tmp_path):
  """path -> expected rows (CSV columns are text) for each format."""
  rows = _rows()
  as_text = [dict(r, index=str(r["index"])) for r in rows]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet",
                 row_group_size=3)
  with open(tmp_path / "p.jsonl", "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  _write_csv(tmp_path / "semi.csv", rows, ";")
  _write_csv(tmp_path / "comma.csv", rows, ",")
  _write_csv(tmp_path / "p.tsv", rows, "\t")
  (tmp_path / "p.txt").write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
  return {"p.parquet": _expected(rows), "p.jsonl": _expected(rows),
          "semi.csv": _expected(as_text), "comma.csv": _expected(as_text),
          "p.tsv": _expected(as_text), "p.txt": _expected(rows, ("caption",))}


def test_every_format_reads_the_same_rows(tmp_path):
  for name, expected in _all_formats(tmp_path).items():
    table = tables.open_prompts(str(tmp_path / name))
    assert table.num_rows == len(CAPTIONS), name
    whole = _read(table, 0, table.num_rows)
    assert whole.schema.field("prompt_id").type == pa.int64()
    assert whole.schema.remove_metadata() == table.schema.append(
        pa.field("prompt_id", pa.int64())), name
    assert whole.to_pylist() == expected, name
    chunk = table.read_prompts(0, table.num_rows)
    assert chunk.status == ["ok", "ok", "empty", "ok", "ok", "empty", "ok"]
    assert chunk.texts[0] == "A cat, sitting on a mat"
    assert chunk.texts[2] is None


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 4, 7, 100])
def test_chunked_reading_equals_whole_reading(tmp_path, chunk_rows):
  for name in _all_formats(tmp_path):
    table = tables.open_prompts(str(tmp_path / name))
    whole = _read(table, 0, table.num_rows)
    chunks = [c.table for c in table.iter_chunks(chunk_rows=chunk_rows)]
    assert pa.concat_tables(chunks).equals(whole), name
    # Out of order, as a process of a multi-host run or a resume reads.
    for start, stop in [(5, 7), (0, 2), (3, 6), (1, 4), (6, 7), (2, 2)]:
      assert _read(table, start, stop).equals(whole.slice(start, stop - start))


def test_parquet_keeps_every_column_and_a_folder_is_one_table(tmp_path):
  rows = [{"caption": f"c{i}", "tags": [f"t{j}" for j in range(i % 3)],
           "meta": {"w": i, "h": 2 * i}, "score": i / 2} for i in range(10)]
  table = pa.Table.from_pylist(rows)
  pq.write_table(table, tmp_path / "one.parquet", row_group_size=4)
  (tmp_path / "parts").mkdir()
  pq.write_table(table.slice(0, 6), tmp_path / "parts" / "a.parquet")
  pq.write_table(table.slice(6), tmp_path / "parts" / "b.parquet")
  for path in [tmp_path / "one.parquet", tmp_path / "parts"]:
    prompt_table = tables.open_prompts(str(path))
    assert prompt_table.schema == table.schema.remove_metadata()
    out = pa.concat_tables(
        c.table for c in prompt_table.iter_chunks(chunk_rows=3))
    assert out.drop_columns(["prompt_id"]).to_pylist() == rows
    assert out["prompt_id"].to_pylist() == list(range(10))


def test_jsonl_malformed_lines_mixed_types_and_bad_bytes(tmp_path):
  lines = [
      b'{"caption": "a", "index": 1, "score": 1, "flag": true, "x": [1]}',
      b'{"caption": "b", "index": "two", "score": 2.5, "flag": false}',
      b"not json at all",
      b"",  # blank lines are no rows
      b'["a", "list"]',
      b'{"caption": 5, "index": 3, "x": {"k": "v"}}',
      b'{"caption": null, "extra": "only here"}',
      b'{"caption": "bad \xff\xfe bytes", "index": 4}',
      b'{"caption": "lone \\ud800 surrogate"}',
      b'{"caption": "   "}',
      b'{"index": 9}',
  ]
  path = tmp_path / "mixed.jsonl"
  path.write_bytes(b"\r\n".join(lines))  # CRLF and no final newline
  table = tables.open_prompts(str(path))
  assert table.num_rows == 10 and table.num_malformed == 2
  assert table.schema == pa.schema([
      ("caption", pa.string()), ("index", pa.string()), ("score", pa.float64()),
      ("flag", pa.bool_()), ("x", pa.string()), ("extra", pa.string())])
  chunk = table.read_prompts(0, 10)
  assert chunk.status == ["ok", "ok", "malformed_row", "malformed_row",
                          "not_text", "null", "ok_replaced_utf8",
                          "ok_replaced_utf8",
                          "empty", "null"]
  assert chunk.texts[6] == "bad \ufffd\ufffd bytes"
  assert chunk.texts[7] == "lone \ufffd\ufffd\ufffd surrogate"
  out = chunk.table.to_pylist()
  assert [r["index"] for r in out] == ["1", "two", None, None, "3", None, "4",
                                       None, None, "9"]
  assert out[0]["x"] == "[1]" and out[4]["x"] == '{"k": "v"}'
  assert out[4]["caption"] == "5" and out[2]["caption"] is None
  assert [r["score"] for r in out[:2]] == [1.0, 2.5]
  assert out[5]["extra"] == "only here"
  assert out[6]["caption"] == "bad \ufffd\ufffd bytes"
  for chunk_rows in (1, 3):
    chunks = [c.table for c in table.iter_chunks(chunk_rows=chunk_rows)]
    assert pa.concat_tables(chunks).equals(chunk.table)


def test_csv_quoting_sniffing_and_bad_bytes(tmp_path):
  path = tmp_path / "q.csv"
  path.write_bytes(b'\xef\xbb\xbfid;caption\r\n1;"a, b; c"\r\n2;plain\r\n'
                   b'3;"two\nlines"\r\n4;bad \xff byte\r\n5;x;extra\r\n6;\r\n')
  table = tables.open_prompts(str(path))
  assert table.delimiter == ";" and table.num_rows == 6  # every row keeps its place
  assert table.num_malformed == 1  # "5;x;extra" has a column too many
  chunk = table.read_prompts(0, 6)
  assert chunk.texts[:4] == [
      "a, b; c", "plain", "two\nlines", "bad \ufffd byte"]
  assert chunk.status == ["ok", "ok", "ok", "ok_replaced_utf8", "malformed_row", "empty"]
  assert chunk.table["id"].to_pylist() == ["1", "2", "3", "4", None, "6"]
  assert chunk.table["prompt_id"].to_pylist() == list(range(6))
  for a, b in ((4, 5), (3, 6), (5, 6), (0, 4)):  # any range, the same rows
    part = table.read_prompts(a, b)
    assert part.status == chunk.status[a:b] and part.texts == chunk.texts[a:b]
  # A caption full of commas must not fool the sniffer into ",".
  path = tmp_path / "commas.csv"
  path.write_text("caption;n\n" + "".join(
      f"a, b, c, d, e {i};{i}\n" for i in range(20)))
  assert tables.open_prompts(str(path)).delimiter == ";"


def test_csv_delimiter_flag(tmp_path):
  path = tmp_path / "t.csv"
  path.write_text("caption\tk\nhello, world\t1\n")
  table = tables.open_prompts(str(path), csv_delimiter="\\t")
  assert _read(table, 0, 1).to_pylist() == [
      {"caption": "hello, world", "k": "1", "prompt_id": 0}]
  with pytest.raises(InputError, match="one character"):
    tables.open_prompts(str(path), csv_delimiter=";;")


def test_txt_keeps_empty_lines_and_replaces_bad_bytes(tmp_path):
  path = tmp_path / "p.txt"
  path.write_bytes(b"\xef\xbb\xbffirst\r\n\n  \nbad \xc3\x28 utf8\nlast")
  table = tables.open_prompts(str(path), prompt_column="prompt")
  assert table.num_rows == 5 and table.schema.names == ["prompt"]
  chunk = table.read_prompts(0, 5)
  assert chunk.table["prompt"].to_pylist() == [
      "first", "", "  ", "bad \ufffd( utf8", "last"]
  assert chunk.status == ["ok", "empty", "empty", "ok_replaced_utf8", "ok"]
  assert chunk.table["prompt_id"].to_pylist() == [0, 1, 2, 3, 4]
  assert _read(table, 3, 5).to_pylist()[1] == {"prompt": "last", "prompt_id": 4}


def test_clean_captions():
  texts, status = captions.clean_captions(
      ["ok", " ", None, 3, 2.5, True, ["a"], {"a": 1}, b"by\xfftes",
       b"bytes", captions.MALFORMED_ROW, "\udcff"])
  assert status == ["ok", "empty", "null", "not_text", "not_text", "not_text",
                    "not_text", "not_text", "ok_replaced_utf8", "ok",
                    "malformed_row", "ok_replaced_utf8"]
  assert texts[0] == "ok" and texts[8] == "by\ufffdtes" and texts[9] == "bytes"
  assert texts[1] is None and texts[11] == "\ufffd"
  assert captions.clean_captions(pa.array(["a", None]))[1] == ["ok", "null"]


def test_errors_name_the_file_and_the_problem(tmp_path):
  def error(name, content=None, **kwargs):
    path = tmp_path / name
    if content is not None:
      path.write_bytes(content)
    with pytest.raises(InputError) as info:
      tables.open_prompts(str(path), **kwargs)
    assert str(path) in str(info.value)
    return str(info.value)

  assert "does not exist" in error("missing.jsonl")
  assert "unknown table type '.xlsx'" in error("p.xlsx", b"x")
  msg = error("p.jsonl", b'{"text": "a", "id": 1}\n')
  assert "no column 'caption'" in msg and "'text', 'id'" in msg
  msg = error("p.csv", b"text,id\na,1\n")
  assert "'text', 'id'" in msg and "--prompt_column" in msg
  pq.write_table(pa.table({"text": ["a"]}), tmp_path / "p.parquet")
  assert "'text'" in error("p.parquet")
  assert "no rows" in error("e.txt", b"")
  assert "no rows" in error("e.jsonl", b"\n\n")
  assert "no rows" in error("e.csv", b"caption,id\n")
  pq.write_table(pa.table({"caption": pa.array([], pa.string())}),
                 tmp_path / "e.parquet")
  assert "no rows" in error("e.parquet")
  assert "cannot read as parquet" in error("bad.parquet", b"PAR1 not parquet")
  assert "JSON array" in error("a.json", b'[{"caption": "a"}]')
  assert "prompt_id" in error("id.jsonl", b'{"caption": "a", "prompt_id": 3}\n')


def test_json_extension_reads_json_lines(tmp_path):
  (tmp_path / "p.json").write_text('{"caption": "a"}\n{"caption": "b"}\n')
  table = tables.open_prompts(str(tmp_path / "p.json"))
  assert _read(table, 0, 2)["caption"].to_pylist() == ["a", "b"]


def test_each_format_has_its_reader(tmp_path):
  formats = {"p.parquet": "parquet", "p.jsonl": "jsonl", "semi.csv": "csv", "p.tsv": "csv",
             "p.txt": "txt"}
  _all_formats(tmp_path)
  for name, fmt in formats.items():
    assert tables.open_prompts(str(tmp_path / name)).format == fmt, name
  assert isinstance(tables.open_prompts(str(tmp_path / "p.jsonl")), line_tables.JsonlTable)
  assert isinstance(tables.open_prompts(str(tmp_path / "p.txt")), line_tables.TextTable)
  assert tables.open_prompts(str(tmp_path / "p.tsv")).delimiter == "\t"


def test_read_table_types_csv_columns(tmp_path):
  path = tmp_path / "labels.csv"
  path.write_text("id;caption;score;overfit_type\n"
                  "7;a, b, c;0.5;MV\n"
                  "12;plain;1.5;N\n"
                  "3;\"with; semicolon\";-2;TV\n", encoding="utf-8")
  table = tables.read_table(str(path))
  assert table.column_names == ["id", "caption", "score", "overfit_type"]
  assert table.schema.field("id").type == pa.int64()  # ints stay ints (ids join)
  assert table.schema.field("score").type == pa.float64()
  assert table.schema.field("caption").type == pa.string()
  assert table["id"].to_pylist() == [7, 12, 3]
  assert table["caption"].to_pylist() == ["a, b, c", "plain", "with; semicolon"]
  assert table["score"].to_pylist() == [0.5, 1.5, -2.0]
  # The delimiter given wins over the sniffer; a tab also as "tab".
  (tmp_path / "t.csv").write_text("id\tcaption\n1\thello, world\n")
  assert tables.read_table(str(tmp_path / "t.csv"), csv_delimiter="tab").to_pylist() == [
      {"id": 1, "caption": "hello, world"}]
  # Other formats keep their own types; parquet as written.
  pq.write_table(pa.table({"id": pa.array([1, 2], pa.int32()), "x": ["a", "b"]}),
                 tmp_path / "t.parquet")
  assert tables.read_table(str(tmp_path / "t.parquet")).schema == pa.schema(
      [("id", pa.int32()), ("x", pa.string())])
  (tmp_path / "t.jsonl").write_text('{"id": 5, "s": 0.25}\n{"id": 6, "s": 1}\n')
  got = tables.read_table(str(tmp_path / "t.jsonl"))
  assert got.schema == pa.schema([("id", pa.int64()), ("s", pa.float64())])
  assert got.to_pylist() == [{"id": 5, "s": 0.25}, {"id": 6, "s": 1.0}]
  with pytest.raises(InputError, match="does not exist"):
    tables.read_table(str(tmp_path / "none.csv"))
  (tmp_path / "bad.csv").write_text("a;b\n1;2;3;4\n")
  with pytest.raises(InputError, match="bad.csv: cannot read as CSV \\(delimiter ';'\\)"):
    tables.read_table(str(tmp_path / "bad.csv"), csv_delimiter=";")


def test_a_plain_table_may_have_a_prompt_id_column(tmp_path):
  rows = [{"prompt_id": 4, "caption": "a", "scores": 0.5},
          {"prompt_id": 9, "caption": None, "scores": 2.0}]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "top_k.parquet")
  (tmp_path / "top_k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  for name in ("top_k.parquet", "top_k.jsonl"):
    path = str(tmp_path / name)
    with pytest.raises(InputError, match="has a column 'prompt_id'"):
      tables.open_prompts(path)  # a caption table may not: memjax adds it
    table = tables.open_prompts(path, prompt_column=None)
    assert table.num_rows == 2 and table.prompt_column is None
    got = table.read_rows(0, 2)
    assert got.column_names == ["prompt_id", "caption", "scores"]
    assert got.to_pylist() == rows, name
    assert got.schema.field("prompt_id").type == pa.int64()
    assert tables.read_table(path).to_pylist() == rows
  (tmp_path / "ids.csv").write_text("prompt_id,caption\n3,x\n")
  table = tables.open_prompts(str(tmp_path / "ids.csv"), None)
  assert table.read_rows(0, 1).to_pylist() == [{"prompt_id": "3", "caption": "x"}]  # text
  assert tables.read_table(str(tmp_path / "ids.csv")).to_pylist() == [
      {"prompt_id": 3, "caption": "x"}]  # typed


def test_delimiters():
  assert tables.resolve_delimiter("x.csv", "caption", "\\t") == "\t"
  assert tables.resolve_delimiter("x.csv", "caption", "tab") == "\t"
  assert tables.resolve_delimiter("x.csv", "caption", "|") == "|"
  with pytest.raises(InputError, match="one character"):
    tables.resolve_delimiter("x.csv", "caption", ";;")


@pytest.mark.parametrize("name,rows,columns", [
    ("sdv1_500_memorized.jsonl", 500, ["caption", "index", "url"]),
    ("sd2_memorized.jsonl", 219, ["caption", "url", "index", "overfit_type"]),
    ("sd1_nonmemorized.txt", 500, ["caption"]),
])
def test_public_prompt_lists(name, rows, columns):
  path = os.path.join(DATA, name)
  assert os.path.isfile(path), path  # tests/data is part of the repository
  table = tables.open_prompts(path)
  assert table.num_rows == rows and table.schema.names == columns
  chunks = list(table.iter_chunks(chunk_rows=64))
  statuses = [s for c in chunks for s in c.status]
  assert statuses == ["ok"] * rows
  ids = [i for c in chunks for i in c.table["prompt_id"].to_pylist()]
  assert ids == list(range(rows))
  if "index" in columns:
    assert table.schema.field("index").type == pa.int64()
  with open(path, encoding="utf-8") as f:
    first = f.readline().rstrip("\n")
  caption = json.loads(first)["caption"] if name.endswith(".jsonl") else first
  assert chunks[0].texts[0] == caption


_MEASURE = """
import sys
from memjax.data import tables

def rss_mb():  # resident memory now; ru_maxrss would include start-up peaks
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

start = rss_mb()
table = tables.open_prompts(sys.argv[1])
opened, peak, rows = rss_mb(), 0.0, 0
for chunk in table.iter_chunks(chunk_rows=4096):
  rows += chunk.table.num_rows
  peak = max(peak, rss_mb())
print(rows, opened - start, peak - start)
"""


@pytest.mark.slow
def test_memory_stays_flat_while_reading_200k_rows(tmp_path):
  """Peak RSS growth over a chunked read of 200k rows (printed; run with -s)."""
  if not os.path.exists("/proc/self/status"):
    pytest.skip("needs Linux /proc to read the resident memory")
  n = 200_000
  captions = [f"a photo of thing number {i} on a table, oil painting"
              for i in range(n)]
  table = pa.table({"caption": captions, "index": list(range(n))})
  pq.write_table(table, tmp_path / "big.parquet", row_group_size=50_000)
  with open(tmp_path / "big.jsonl", "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"caption": c, "index": i}) + "\n"
                 for i, c in enumerate(captions))
  root = os.path.join(os.path.dirname(__file__), "..")
  for name in ("big.parquet", "big.jsonl"):
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / name)],
                         cwd=root, check=True, capture_output=True, text=True)
    rows, opened_mb, peak_mb = out.stdout.split()
    print(f"{name}: {rows} rows; RSS growth after open {float(opened_mb):.1f}"
          f" MB, peak while reading {float(peak_mb):.1f} MB")
    assert int(rows) == n
    assert float(peak_mb) < 200  # a loose bound: flat, whatever the row count
