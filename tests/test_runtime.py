"""Tests of memjax.runtime: workdir (layout, atomic writes, run config, manifest),
shards (writing, resuming, round-robin ranges, top-K), fingerprint, progress."""
import dataclasses
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from memjax.runtime import fingerprint
from memjax.runtime import progress
from memjax.runtime import shards
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError


def _shard(start, stop, scores=None, status="ok"):
  ids = np.arange(start, stop, dtype=np.int64)
  scores = ids * 0.5 if scores is None else scores
  return pa.table({"caption": [f"c{i}" for i in ids], "prompt_id": ids,
                   "scores": pa.array(scores, pa.float32()),
                   "status": [status] * len(ids)})


def _writer(workdir, stage="scan", **kwargs):
  return shards.ShardWriter(workdir_lib.stage_dir(str(workdir), stage), **kwargs)


# ---- workdir: layout and atomic writes ------------------------------------------------


def test_layout_paths_and_resolve(tmp_path):
  w = str(tmp_path / "w")
  assert workdir_lib.stage_dir(w, "scan") == os.path.join(w, "scan")
  assert workdir_lib.path(w, "index", "img_emb", "x.npy") == os.path.join(
      w, "index", "img_emb", "x.npy")
  with pytest.raises(ValueError, match="unknown stage 'scna'"):
    workdir_lib.stage_dir(w, "scna")
  # Nothing there yet: WORKDIR/<stage>, absent.
  assert workdir_lib.resolve(w, "scan") == os.path.join(w, "scan")
  os.makedirs(os.path.join(w, "scan"))
  assert workdir_lib.resolve(w, "scan") == os.path.join(w, "scan")
  # A stage folder given directly is recognised by its manifest's stage.
  folder = str(tmp_path / "elsewhere")
  workdir_lib.write_json(os.path.join(folder, "manifest.json"), {"stage": "index"})
  assert workdir_lib.resolve(folder, "index") == folder
  assert workdir_lib.resolve(folder, "scan") == os.path.join(folder, "scan")  # another stage's
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "manifest.json").write_text("{ half")
  assert workdir_lib.resolve(str(tmp_path / "broken"), "index") == str(
      tmp_path / "broken" / "index")


def test_write_json_is_atomic_sorted_and_utf8(tmp_path):
  path = str(tmp_path / "x.json")
  workdir_lib.write_json(path, {"b": [1, 2], "a": "é"})
  with open(path, encoding="utf-8") as f:
    text = f.read()
  assert json.loads(text) == {"a": "é", "b": [1, 2]}
  assert text.index('"a"') < text.index('"b"') and "é" in text and text.endswith("\n")
  assert os.listdir(tmp_path) == ["x.json"]
  assert workdir_lib.read_json(path) == {"a": "é", "b": [1, 2]}
  workdir_lib.write_text(str(tmp_path / "sub" / "t.txt"), "héllo")  # makes the folder
  assert (tmp_path / "sub" / "t.txt").read_text(encoding="utf-8") == "héllo"
  table = pa.table({"a": [1, 2]})
  workdir_lib.write_parquet(str(tmp_path / "t.parquet"), table)
  assert pq.read_table(tmp_path / "t.parquet").equals(table)
  assert sorted(os.listdir(tmp_path)) == ["sub", "t.parquet", "x.json"]


def test_a_failed_atomic_write_leaves_the_old_file(tmp_path):
  path = str(tmp_path / "x.json")
  workdir_lib.write_json(path, {"v": 1})

  def half(f):
    f.write(b'{"v": ')
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    workdir_lib.write_atomic(path, half)
  assert workdir_lib.read_json(path) == {"v": 1}
  assert os.listdir(tmp_path) == ["x.json"]  # no temporary file left
  tmp = workdir_lib.tmp_name(path, ".t")
  assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith(".x.json.t.")


def test_read_json_and_remove(tmp_path):
  with pytest.raises(InputError, match="nope.json does not exist"):
    workdir_lib.read_json(str(tmp_path / "nope.json"))
  (tmp_path / "bad.json").write_text("{ half")
  with pytest.raises(InputError, match="bad.json: cannot read as JSON"):
    workdir_lib.read_json(str(tmp_path / "bad.json"))
  (tmp_path / "d" / "e").mkdir(parents=True)
  (tmp_path / "d" / "e" / "f").write_text("x")
  workdir_lib.remove(str(tmp_path / "d"))
  workdir_lib.remove(str(tmp_path / "bad.json"))
  workdir_lib.remove(str(tmp_path / "never"))  # absent: nothing to do
  assert os.listdir(tmp_path) == []


# ---- workdir: the run config ----------------------------------------------------------


def test_run_config_new_resume_refuse_overwrite(tmp_path):
  workdir = str(tmp_path / "w")
  config = {"model_identity": "abc", "seeds": (0, 1), "guidance_scale": 7.5}
  assert workdir_lib.check_run_config(workdir, "scan", config, overwrite=False) == "new"
  assert workdir_lib.read_json(os.path.join(workdir, "scan", "run_config.json")) == dict(
      config, seeds=[0, 1])
  assert workdir_lib.check_run_config(workdir, "scan", dict(config), False) == "resume"
  _writer(workdir).write(_shard(0, 2), 0, 2)
  for name in ("top_k.parquet", "manifest.json"):
    (tmp_path / "w" / "scan" / name).write_text("x")
  (tmp_path / "w" / "scan" / "images" / "0").mkdir(parents=True)
  (tmp_path / "w" / "blackbox").mkdir()
  (tmp_path / "w" / "blackbox" / "keep.txt").write_text("another stage's")
  changed = dict(config, guidance_scale=3.0, model_identity="def", top_k=5)
  with pytest.raises(InputError) as info:
    workdir_lib.check_run_config(workdir, "scan", changed, overwrite=False)
  msg = str(info.value)
  assert "guidance_scale: 7.5 -> 3.0" in msg
  assert 'model_identity: "abc" -> "def"' in msg
  assert "top_k: \"<not set>\" -> 5" in msg and "seeds" not in msg
  assert "--overwrite" in msg and "--workdir" in msg and "scan run" in msg
  # Nothing was touched by the refusal.
  assert len(shards.list_shards(os.path.join(workdir, "scan"))) == 1
  assert workdir_lib.check_run_config(workdir, "scan", changed, True) == "overwrite"
  # The whole stage folder went (shards, top-K, manifest, images); other stages stay.
  assert sorted(os.listdir(os.path.join(workdir, "scan"))) == ["run_config.json"]
  assert (tmp_path / "w" / "blackbox" / "keep.txt").read_text() == "another stage's"
  assert workdir_lib.check_run_config(workdir, "scan", changed, False) == "resume"
  # Stages keep their own records.
  assert workdir_lib.check_run_config(workdir, "generate", config, False) == "new"
  assert workdir_lib.check_run_config(workdir, "scan", changed, False) == "resume"


@pytest.mark.parametrize("leftover", ["part", "manifest.json", "top_k.parquet", "images"])
def test_run_config_refuses_any_leftover_without_a_record(tmp_path, leftover):
  workdir = str(tmp_path)
  folder = tmp_path / "scan"
  if leftover == "part":
    _writer(workdir).write(_shard(0, 2), 0, 2)
  elif leftover == "images":
    (folder / "images").mkdir(parents=True)
  else:
    folder.mkdir()
    (folder / leftover).write_text("x")
  with pytest.raises(InputError, match="run_config.json is missing") as info:
    workdir_lib.check_run_config(workdir, "scan", {"a": 1}, overwrite=False)
  assert "--overwrite" in str(info.value)
  assert not (folder / "run_config.json").exists()
  assert workdir_lib.check_run_config(workdir, "scan", {"a": 1}, True) == "overwrite"
  assert os.listdir(folder) == ["run_config.json"]


def test_run_config_ignores_dot_files_and_refuses_a_broken_record(tmp_path):
  workdir = str(tmp_path)
  folder = tmp_path / "scan"
  folder.mkdir()
  # A killed writer's temporary file is no output.
  (folder / ".part-000000000000-000000000002.parquet.p0.1.tmp").write_bytes(b"half")
  assert workdir_lib.check_run_config(workdir, "scan", {"a": 1}, overwrite=False) == "new"
  (folder / "run_config.json").write_text("{ half")
  with pytest.raises(InputError, match="cannot read as JSON.*--overwrite"):
    workdir_lib.check_run_config(workdir, "scan", {"a": 1}, overwrite=False)
  assert workdir_lib.check_run_config(workdir, "scan", {"a": 1}, True) == "overwrite"
  assert workdir_lib.check_run_config(workdir, "scan", {"a": 1}, False) == "resume"
  with pytest.raises(ValueError, match="unknown stage"):
    workdir_lib.check_run_config(workdir, "nope", {"a": 1}, False)


# ---- workdir: the manifest ------------------------------------------------------------


def _manifest(**changes):
  fields = dict(stage="scan", config={"seeds": [0, 1]}, identity={"model": "abc"},
                counts={"rows": 10}, timings={"score_s": 4.0, "total_s": 5.0}, rate=2.5,
                rate_unit="prompts/s", outputs={"top_k": "top_k.parquet"},
                runtime={"backend": "cpu"}, details={"k": 3})
  fields.update(changes)
  return workdir_lib.Manifest(**fields)


def test_manifest_round_trip(tmp_path):
  w = str(tmp_path)
  assert workdir_lib.read_manifest(w, "scan") is None
  written = workdir_lib.write_manifest(w, _manifest())
  assert written == _manifest() and not written.resumed_finished
  assert workdir_lib.read_manifest(w, "scan") == _manifest()
  on_disk = workdir_lib.read_json(os.path.join(w, "scan", "manifest.json"))
  assert on_disk == dataclasses.asdict(_manifest())
  assert sorted(on_disk) == sorted(f.name for f in dataclasses.fields(workdir_lib.Manifest))
  # Keys a later version adds are ignored when reading.
  assert workdir_lib.Manifest.from_dict(dict(on_disk, future_key=1)) == _manifest()
  assert workdir_lib.read_manifest(w, "blackbox") is None


def test_a_run_that_did_no_work_keeps_the_timings_of_the_one_that_did(tmp_path):
  w = str(tmp_path)
  workdir_lib.write_manifest(w, _manifest())
  rerun = _manifest(counts={"rows": 10, "again": True}, timings={"total_s": 0.01}, rate=None)
  got = workdir_lib.write_manifest(w, rerun, did_work=False)
  assert got.resumed_finished
  assert got.timings == {"score_s": 4.0, "total_s": 5.0} and got.rate == 2.5
  assert got.counts == {"rows": 10, "again": True}  # the rest is this run's
  back = workdir_lib.read_manifest(w, "scan")
  assert back == got and back.resumed_finished
  # A second idle rerun still reports the working run's numbers.
  again = workdir_lib.write_manifest(w, _manifest(timings={"total_s": 0.02}, rate=None),
                                     did_work=False)
  assert again.timings["total_s"] == 5.0 and again.rate == 2.5 and again.resumed_finished
  # A run that worked writes its own numbers.
  worked = workdir_lib.write_manifest(w, _manifest(timings={"total_s": 9.0}, rate=1.0))
  assert not worked.resumed_finished and worked.rate == 1.0
  assert workdir_lib.read_manifest(w, "scan").timings == {"total_s": 9.0}


def test_no_work_without_a_usable_old_manifest_writes_its_own(tmp_path):
  w = str(tmp_path)
  got = workdir_lib.write_manifest(w, _manifest(rate=None), did_work=False)
  assert not got.resumed_finished and got.rate is None
  assert workdir_lib.read_manifest(w, "scan").rate is None
  (tmp_path / "scan" / "manifest.json").write_text("{ half")
  got = workdir_lib.write_manifest(w, _manifest(rate=3.0), did_work=False)
  assert not got.resumed_finished and got.rate == 3.0
  (tmp_path / "scan" / "manifest.json").write_text('{"stage": "scan"}')  # no config: TypeError
  got = workdir_lib.write_manifest(w, _manifest(rate=4.0), did_work=False)
  assert not got.resumed_finished and workdir_lib.read_manifest(w, "scan").rate == 4.0


# ---- shards ---------------------------------------------------------------------------


def test_shards_are_renamed_into_place_and_resume(tmp_path):
  writer = _writer(tmp_path, process_index=0)
  assert writer.directory == str(tmp_path / "scan") and os.path.isdir(writer.directory)
  assert writer.done_ranges() == [] and writer.pending([(0, 10)]) == [(0, 10)]
  path = writer.write(_shard(0, 4), 0, 4)
  assert path == str(tmp_path / "scan" / "part-000000000000-000000000004.parquet")
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
  (scan / "run_config.json").write_text("{}")  # other files of the stage folder: no shards
  (scan / "part-1-2.parquet").write_text("not a shard name")
  assert writer.done_ranges() == [(0, 4), (8, 10)]
  assert not mine.exists() and busy.exists() and not dead.exists()
  writer.write(_shard(4, 8), 4, 8)
  busy.unlink()
  (scan / "part-1-2.parquet").unlink()
  table = shards.open_shards(str(scan)).to_table().sort_by("prompt_id")
  assert table["prompt_id"].to_pylist() == list(range(10))
  assert table.equals(_shard(0, 10))
  assert ds.dataset(str(scan / shards.shard_name(4, 8))).to_table().equals(_shard(4, 8))
  assert shards.list_shards(str(scan)) == [(0, 4), (4, 8), (8, 10)]
  assert shards.list_shards(str(tmp_path / "absent")) == []


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
  writer = _writer(tmp_path)

  def half_write(table, f, **kwargs):
    f.write(b"PAR1 half")
    raise OSError("disk full")

  monkeypatch.setattr(shards.pq, "write_table", half_write)
  with pytest.raises(OSError):
    writer.write(_shard(0, 2), 0, 2)
  assert os.listdir(tmp_path / "scan") == []
  monkeypatch.undo()
  with pytest.raises(ValueError, match="2 rows for range"):
    writer.write(_shard(0, 2), 0, 3)
  with pytest.raises(ValueError, match="prompt_id"):
    writer.write(_shard(1, 3), 0, 2)
  assert os.listdir(tmp_path / "scan") == []


def test_one_schema_for_every_shard(tmp_path):
  skipped = _shard(0, 2).set_column(2, "scores", pa.nulls(2))  # null-typed
  _writer(tmp_path / "a").write(skipped, 0, 2)
  _writer(tmp_path / "a").write(_shard(2, 4), 2, 4)
  table = shards.open_shards(str(tmp_path / "a" / "scan")).to_table()
  assert table.schema.field("scores").type == pa.float32()
  assert table.sort_by("prompt_id")["scores"].to_pylist() == [None, None, 1.0, 1.5]
  writer = _writer(tmp_path / "b", schema=_shard(0, 1).schema)
  writer.write(skipped.select([3, 2, 1, 0]), 0, 2)  # any column order
  written = pq.read_table(writer.shard_path(0, 2))
  assert written.schema == _shard(0, 1).schema
  with pytest.raises(ValueError, match="columns"):
    writer.write(skipped.drop_columns(["status"]), 0, 2)
  with pytest.raises(InputError, match="no result shards"):
    shards.open_shards(str(tmp_path / "c"))


def test_shard_ranges_are_round_robin_and_partition_the_rows():
  all_ranges = shards.shard_ranges(10, 3)
  assert all_ranges == [(0, 3), (3, 6), (6, 9), (9, 10)]
  parts = [shards.shard_ranges(10, 3, p, 3) for p in range(3)]
  assert parts == [[(0, 3), (9, 10)], [(3, 6)], [(6, 9)]]
  assert parts == [all_ranges[p::3] for p in range(3)]
  assert sorted(sum(parts, [])) == all_ranges
  # More processes than shards: some get nothing, none gets a row twice.
  many = [shards.shard_ranges(10, 3, p, 6) for p in range(6)]
  assert many[4:] == [[], []] and sorted(sum(many, [])) == all_ranges
  assert shards.shard_ranges(0, 3) == []
  with pytest.raises(InputError, match="shard size"):
    shards.shard_ranges(10, 0)
  assert shards.subtract_ranges([(0, 10)], [(2, 4), (3, 5), (7, 12)]) == [(0, 2), (5, 7)]
  assert shards.subtract_ranges([(0, 3), (3, 6), (6, 9)], [(0, 3), (6, 9)]) == [(3, 6)]
  assert shards.subtract_ranges([(0, 5)], []) == [(0, 5)]


def test_top_k_equals_a_full_sort(tmp_path):
  rng = np.random.default_rng(0)
  writer = _writer(tmp_path)
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
  assert 0 < len(valid) < n
  stage = str(tmp_path / "scan")
  for k, ascending in [(1, False), (50, False), (50, True), (5000, False)]:
    expected = sorted(valid, key=lambda r: (
        r["scores"] if ascending else -r["scores"], r["prompt_id"]))[:k]
    for batch_rows in (64, 65536):
      got = shards.top_k(stage, k, ascending=ascending, batch_rows=batch_rows)
      assert got.to_pylist() == expected, (k, ascending, batch_rows)
  table = shards.write_top_k(stage, 10)
  assert table.num_rows == 10
  assert pq.read_table(tmp_path / "scan" / "top_k.parquet").equals(table)
  assert table.equals(shards.top_k(stage, 10))
  # top_k.parquet beside the shards is no shard.
  assert shards.list_shards(stage)[-1] == (959, 1000)
  assert shards.top_k(stage, 5000).num_rows == len(valid)
  with pytest.raises(InputError, match="no column 'dcs'"):
    shards.top_k(stage, 3, column="dcs")


def test_count_statuses(tmp_path):
  writer = _writer(tmp_path)
  writer.write(_shard(0, 3), 0, 3)
  writer.write(_shard(3, 5, status="empty"), 3, 5)
  stage = str(tmp_path / "scan")
  assert shards.count_statuses(stage) == {"ok": 3, "empty": 2}
  writer.write(_shard(5, 7), 5, 7)
  assert shards.count_statuses(stage) == {"empty": 2, "ok": 5}
  assert list(shards.count_statuses(stage)) == ["empty", "ok"]  # sorted
  nulls = _shard(7, 9).set_column(3, "status", pa.array([None, "ok"], pa.string()))
  writer.write(nulls, 7, 9)
  assert shards.count_statuses(stage) == {"<missing>": 1, "empty": 2, "ok": 6}
  with pytest.raises(InputError, match="no result shards"):
    shards.count_statuses(str(tmp_path / "nothing"))


# ---- fingerprint ----------------------------------------------------------------------


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
  first = fingerprint.model_identity(str(model))
  assert first.startswith("sha256:") and fingerprint.model_identity(str(model)) == first
  # Docs and hidden folders do not count.
  (model / "README.md").write_text("docs")
  (model / ".cache").mkdir()
  (model / ".cache" / "x.json").write_text("{}")
  assert fingerprint.model_identity(str(model)) == first
  # Same size, other weight bytes: another model (a weight file is identified by content).
  (model / "unet" / "model.safetensors").write_bytes(b"\1" * 100)
  assert fingerprint.model_identity(str(model)) != first
  (model / "unet" / "model.safetensors").write_bytes(b"\0" * 100)
  for path, content in [("unet/config.json", '{"sample_size": 96}'),
                        ("tokenizer/merges.txt", "a c\n"),
                        ("scheduler/scheduler_config.json", '{"a": 1}')]:
    old = (model / path).read_text()
    (model / path).write_text(content)
    assert fingerprint.model_identity(str(model)) != first, path
    (model / path).write_text(old)
  assert fingerprint.model_identity(str(model)) == first
  (model / "unet" / "model.safetensors").rename(model / "unet" / "w.safetensors")
  assert fingerprint.model_identity(str(model)) != first
  with pytest.raises(InputError, match="does not exist"):
    fingerprint.model_identity(str(tmp_path / "none"))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.md").write_text("no configs")
  with pytest.raises(InputError, match="no config or weight files"):
    fingerprint.model_identity(str(tmp_path / "empty"))


def test_content_identity_reads_small_files_whole_and_samples_large_ones(tmp_path):
  a = tmp_path / "w.ckpt"
  a.write_bytes(b"\0" * 100)
  first = fingerprint.content_identity(str(a))
  assert first.startswith("sha256:") and fingerprint.content_identity(str(a)) == first
  a.write_bytes(b"\0" * 99 + b"\1")  # same name and size, one other byte
  assert fingerprint.content_identity(str(a)) != first
  big = tmp_path / "big.bin"
  size = (64 << 20) + 1  # above the whole-file limit: size and 64 samples
  with open(big, "wb") as f:
    f.truncate(size)
  sampled = fingerprint.content_identity(str(big))
  assert sampled.startswith("sampled:")
  with open(big, "r+b") as f:  # the last byte is always sampled
    f.seek(size - 1)
    f.write(b"\1")
  assert fingerprint.content_identity(str(big)) != sampled
  folder = tmp_path / "parts"
  folder.mkdir()
  (folder / "a.parquet").write_bytes(b"x")
  (folder / ".hidden").write_bytes(b"y")
  one = fingerprint.path_identity(str(folder))
  (folder / ".hidden").write_bytes(b"z")
  assert fingerprint.path_identity(str(folder)) == one
  (folder / "a.parquet").write_bytes(b"X")
  assert fingerprint.path_identity(str(folder)) != one
  with pytest.raises(InputError, match="cannot read"):
    fingerprint.content_identity(str(tmp_path / "none"))


# ---- progress -------------------------------------------------------------------------


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
