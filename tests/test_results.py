"""Tests of memjax.results (shards, run config, top-K) and memjax.progress."""
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from memjax.runtime import progress
from memjax.runtime import results
from memjax.runtime.errors import InputError


def _shard(start, stop, scores=None, status="ok"):
  ids = np.arange(start, stop, dtype=np.int64)
  scores = ids * 0.5 if scores is None else scores
  return pa.table({"caption": [f"c{i}" for i in ids], "prompt_id": ids,
                   "scores": pa.array(scores, pa.float32()),
                   "status": [status] * len(ids)})


def test_shards_are_renamed_into_place_and_resume(tmp_path):
  writer = results.ShardedResults(str(tmp_path), "scan", process_index=0)
  assert writer.done_ranges() == [] and writer.pending([(0, 10)]) == [(0, 10)]
  path = writer.write(_shard(0, 4), 0, 4)
  assert os.path.basename(path) == "part-000000000000-000000000004.parquet"
  writer.write(_shard(8, 10), 8, 10)
  assert writer.done_ranges() == [(0, 4), (8, 10)]
  assert writer.pending([(0, 4), (4, 8), (8, 10)]) == [(4, 8)]
  # A resume with another shard size only writes what is missing.
  assert writer.pending([(0, 3), (3, 6), (6, 9), (9, 10)]) == [(4, 6), (6, 8)]
  scan = tmp_path / "scan"
  # A writer killed mid-write left its temporary file; a second process is
  # writing one right now; a third one died long ago.
  mine = scan / ".part-000000000004-000000000008.parquet.p0.4242.tmp"
  busy = scan / ".part-000000000010-000000000012.parquet.p1.4343.tmp"
  dead = scan / ".part-000000000012-000000000014.parquet.p2.4444.tmp"
  for tmp in (mine, busy, dead):
    tmp.write_bytes(b"PAR1 half a shard")
  os.utime(dead, (time.time() - 7200, time.time() - 7200))
  assert writer.done_ranges() == [(0, 4), (8, 10)]
  assert not mine.exists() and busy.exists() and not dead.exists()
  writer.write(_shard(4, 8), 4, 8)
  busy.unlink()
  table = ds.dataset(str(scan)).to_table().sort_by("prompt_id")
  assert table["prompt_id"].to_pylist() == list(range(10))
  assert table.equals(_shard(0, 10))


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
  writer = results.ShardedResults(str(tmp_path))

  def half_write(table, f, **kwargs):
    f.write(b"PAR1 half")
    raise OSError("disk full")

  monkeypatch.setattr(results.pq, "write_table", half_write)
  with pytest.raises(OSError):
    writer.write(_shard(0, 2), 0, 2)
  assert os.listdir(tmp_path / "scan") == []
  with pytest.raises(ValueError):
    writer.write(_shard(0, 2), 0, 3)
  with pytest.raises(ValueError):
    writer.write(_shard(1, 3), 0, 2)


def test_one_schema_for_every_shard(tmp_path):
  skipped = _shard(0, 2).set_column(2, "scores", pa.nulls(2))  # null-typed
  results.ShardedResults(str(tmp_path / "a")).write(skipped, 0, 2)
  results.ShardedResults(str(tmp_path / "a")).write(_shard(2, 4), 2, 4)
  table = results.open_shards(str(tmp_path / "a" / "scan")).to_table()
  assert table.schema.field("scores").type == pa.float32()
  writer = results.ShardedResults(str(tmp_path / "b"),
                                  schema=_shard(0, 1).schema)
  writer.write(skipped.select([3, 2, 1, 0]), 0, 2)  # any column order
  written = pq.read_table(writer.shard_path(0, 2))
  assert written.schema == _shard(0, 1).schema
  with pytest.raises(ValueError, match="columns"):
    writer.write(skipped.drop_columns(["status"]), 0, 2)


def test_shard_ranges_partition_the_rows():
  all_ranges = results.shard_ranges(10, 3)
  assert all_ranges == [(0, 3), (3, 6), (6, 9), (9, 10)]
  parts = [results.shard_ranges(10, 3, p, 3) for p in range(3)]
  assert sum(parts, []) == all_ranges and all(parts)
  assert results.subtract_ranges([(0, 10)], [(2, 4), (3, 5), (7, 12)]) == [
      (0, 2), (5, 7)]


def test_run_config_new_resume_refuse_overwrite(tmp_path):
  workdir = str(tmp_path / "w")
  config = {"model_identity": "abc", "seeds": (0, 1), "guidance_scale": 7.5}
  assert results.check_run_config(workdir, config, overwrite=False) == "new"
  assert results.read_json(os.path.join(workdir, "run_config.json")) == dict(
      config, seeds=[0, 1])
  assert results.check_run_config(workdir, dict(config), False) == "resume"
  results.ShardedResults(workdir).write(_shard(0, 2), 0, 2)
  for name in ("top_k.parquet", "manifest.json"):
    (tmp_path / "w" / name).write_text("x")
  changed = dict(config, guidance_scale=3.0, model_identity="def", top_k=5)
  with pytest.raises(InputError) as info:
    results.check_run_config(workdir, changed, overwrite=False)
  msg = str(info.value)
  assert "guidance_scale: 7.5 -> 3.0" in msg
  assert 'model_identity: "abc" -> "def"' in msg
  assert "top_k: \"<not set>\" -> 5" in msg and "seeds" not in msg
  assert "--overwrite" in msg and "--workdir" in msg
  assert results.check_run_config(workdir, changed, True) == "overwrite"
  assert sorted(os.listdir(workdir)) == ["run_config.json"]
  assert results.check_run_config(workdir, changed, False) == "resume"


def test_run_config_refuses_orphan_shards_and_a_broken_record(tmp_path):
  workdir = str(tmp_path)
  results.ShardedResults(workdir).write(_shard(0, 2), 0, 2)
  with pytest.raises(InputError, match="run_config.json is missing"):
    results.check_run_config(workdir, {"a": 1}, overwrite=False)
  (tmp_path / "run_config.json").write_text("{ half")
  with pytest.raises(InputError, match="cannot read as JSON.*--overwrite"):
    results.check_run_config(workdir, {"a": 1}, overwrite=False)
  assert results.check_run_config(workdir, {"a": 1}, True) == "overwrite"
  with pytest.raises(InputError, match="does not exist"):
    results.read_json(str(tmp_path / "nope.json"))


def test_top_k_equals_a_full_sort(tmp_path):
  rng = np.random.default_rng(0)
  writer = results.ShardedResults(str(tmp_path))
  n, rows = 1000, []
  for start in range(0, n, 137):
    stop = min(start + 137, n)
    scores = rng.integers(0, 20, stop - start).astype(np.float32)  # many ties
    scores[rng.random(stop - start) < 0.1] = np.nan
    table = _shard(start, stop, scores)
    nulls = pa.array(rng.random(stop - start) < 0.1)
    table = table.set_column(2, "scores", pc.if_else(
        nulls, pa.scalar(None, pa.float32()), table["scores"]))
    writer.write(table, start, stop)
    rows += table.to_pylist()
  valid = [r for r in rows
           if r["scores"] is not None and not np.isnan(r["scores"])]
  for k, ascending in [(1, False), (50, False), (50, True), (5000, False)]:
    expected = sorted(valid, key=lambda r: (
        r["scores"] if ascending else -r["scores"], r["prompt_id"]))[:k]
    for batch_rows in (64, 65536):
      got = results.top_k(str(tmp_path / "scan"), k, ascending=ascending,
                          batch_rows=batch_rows)
      assert got.to_pylist() == expected, (k, ascending, batch_rows)
  table = results.write_top_k(str(tmp_path), 10)
  assert pq.read_table(tmp_path / "top_k.parquet").equals(table)
  with pytest.raises(InputError, match="no column 'dcs'"):
    results.top_k(str(tmp_path / "scan"), 3, column="dcs")


def test_count_statuses(tmp_path):
  writer = results.ShardedResults(str(tmp_path))
  writer.write(_shard(0, 3), 0, 3)
  writer.write(_shard(3, 5, status="empty"), 3, 5)
  assert results.count_statuses(str(tmp_path / "scan")) == {"ok": 3, "empty": 2}
  writer.write(_shard(5, 7), 5, 7)
  assert results.count_statuses(str(tmp_path / "scan")) == {"empty": 2, "ok": 5}
  with pytest.raises(InputError, match="no result shards"):
    results.count_statuses(str(tmp_path / "nothing"))


def test_model_identity(tmp_path):
  model = tmp_path / "model"
  for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
    (model / sub).mkdir(parents=True)
  (model / "model_index.json").write_text('{"_class_name": "SD"}')
  (model / "unet" / "config.json").write_text('{"sample_size": 64}')
  (model / "unet" / "model.safetensors").write_bytes(b"\0" * 100)
  (model / "text_encoder" / "pytorch_model.bin").write_bytes(b"\0" * 50)
  (model / "tokenizer" / "vocab.json").write_text("{}")
  (model / "tokenizer" / "merges.txt").write_text("a b\n")
  (model / "scheduler" / "scheduler_config.json").write_text("{}")
  first = results.model_identity(str(model))
  assert len(first) == 64 and results.model_identity(str(model)) == first
  # Same sizes, other weight bytes; docs; hidden folders: same identity.
  (model / "unet" / "model.safetensors").write_bytes(b"\1" * 100)
  (model / "README.md").write_text("docs")
  (model / ".cache").mkdir()
  (model / ".cache" / "x.json").write_text("{}")
  assert results.model_identity(str(model)) == first
  for path, content in [("unet/config.json", '{"sample_size": 96}'),
                        ("tokenizer/merges.txt", "a c\n"),
                        ("scheduler/scheduler_config.json", '{"a": 1}')]:
    old = (model / path).read_text()
    (model / path).write_text(content)
    assert results.model_identity(str(model)) != first, path
    (model / path).write_text(old)
  assert results.model_identity(str(model)) == first
  (model / "unet" / "model.safetensors").write_bytes(b"\1" * 101)
  assert results.model_identity(str(model)) != first
  (model / "unet" / "model.safetensors").write_bytes(b"\1" * 100)
  (model / "unet" / "model.safetensors").rename(
      model / "unet" / "w.safetensors")
  assert results.model_identity(str(model)) != first
  with pytest.raises(InputError, match="does not exist"):
    results.model_identity(str(tmp_path / "none"))


def test_write_json_atomic(tmp_path):
  path = str(tmp_path / "x.json")
  results.write_json_atomic(path, {"b": [1, 2], "a": "é"})
  with open(path, encoding="utf-8") as f:
    assert json.load(f) == {"a": "é", "b": [1, 2]}
  assert os.listdir(tmp_path) == ["x.json"]


class _Clock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_logs_rate_and_eta_at_most_every_interval():
  clock, lines = _Clock(), []
  bar = progress.Progress(1000, what="prompts", interval_s=10.0,
                          log=lines.append, clock=clock, window_s=20.0)
  for _ in range(9):  # 100/s for 9 s: no line yet
    clock.now += 1.0
    bar.update(100)
  assert lines == []
  clock.now += 1.0
  bar.update(50)  # t = 10 s, 950 done
  assert len(lines) == 1
  assert lines[0] == ("prompts 950/1,000 (95.0%) | 95.0/s overall, "
                      "95.0/s recent | elapsed 0:00:10 | ETA 0:00:01")
  clock.now += 30.0  # a slow stretch: the recent window drops the old rate
  bar.update(30)
  assert "1.0/s recent" in lines[1] and "24.5/s overall" in lines[1]
  assert bar.summary() == {"what": "prompts", "done": 980, "total": 1000,
                           "resumed": 0, "elapsed_s": 40.0, "rate": 24.5}
  assert progress.format_duration(3 * 3600 + 62.4) == "3:01:02"
  assert progress.format_duration(None) == "?"


def test_progress_counts_resumed_items_apart():
  clock, lines = _Clock(), []
  bar = progress.Progress(100, log=lines.append, clock=clock, initial=60,
                          interval_s=0.0)
  clock.now += 4.0
  bar.update(20)
  assert lines[0].startswith("prompts 80/100 (80.0%) | 5.0/s overall")
  assert "ETA 0:00:04" in lines[0]
  assert bar.summary()["rate"] == 5.0 and bar.summary()["resumed"] == 60
