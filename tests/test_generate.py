"""memjax.generate: output layout, one compile, resume, scan workdirs, bad input."""
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memjax.runtime import shards
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError
from memjax.stages import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a red cat", "", "a blue car", "a green house", "a tree", "a dog on a beach"]


def _prompts(tmp_path, captions=CAPTIONS):
  path = str(tmp_path / "p.parquet")
  pq.write_table(pa.table({"caption": captions, "status": ["x"] * len(captions),
                           "extra": list(range(len(captions)))}), path)
  return path


def _cfg(model, prompts, workdir, **kw):
  base = dict(model=model, prompts=prompts, workdir=str(workdir), steps=2, seeds=[0, 1],
              batch_size=2, shard_size=4)
  base.update(kw)
  return generate.GenerateConfig(**base)


def _pixels(workdir, rel):
  """The PNG at rel, a path relative to WORKDIR/generate (as generated.parquet has it)."""
  return np.asarray(Image.open(os.path.join(workdir, generate.STAGE, rel)))


def _table(workdir):
  return pq.read_table(workdir_lib.path(workdir, generate.STAGE, workdir_lib.GENERATED_TABLE))


def test_layout_compile_once_resume_and_batch_invariance(tiny_sd1, tmp_path):
  prompts, w = _prompts(tmp_path), str(tmp_path / "w")
  manifest = generate.run(_cfg(tiny_sd1, prompts, w))
  assert isinstance(manifest, workdir_lib.Manifest) and manifest.stage == "generate"
  assert manifest.runtime["compiles"] == 1  # two shards, padded batches: one compile
  assert manifest.runtime["batch_prompts"] == 8  # 2, rounded up to the 8 devices
  d = manifest.details
  assert d["sampler"] == "heun" and d["steps"] == 2 and d["seeds"] == [0, 1]
  assert d["unet_evaluations"] == 3 and len(d["plan"]["sigmas"]) == 3
  assert manifest.rate_unit == "images/s" and manifest.rate > 0
  assert manifest.timings["prompts_this_run"] == 6
  assert manifest.outputs["table"] == "generated.parquet" and manifest.outputs["images"] == "images"
  folder = os.path.join(w, "generate")
  assert {"generated.parquet", "images", "manifest.json", "run_config.json"} <= set(
      os.listdir(folder))
  assert shards.list_shards(folder) == [(0, 4), (4, 6)]
  table = _table(w)
  assert table.column_names[:7] == ["prompt_id", "caption", "seed", "sampler", "steps",
                                    "image_path", "status"]
  assert set(table.column_names[7:]) == {"input_status", "extra"}  # input columns kept
  rows = table.to_pylist()
  assert [(r["prompt_id"], r["seed"]) for r in rows] == [(p, s) for p in range(6) for s in (0, 1)]
  assert [r["status"] for r in rows if r["prompt_id"] == 1] == ["empty", "empty"]
  assert all(r["image_path"] is None for r in rows if r["prompt_id"] == 1)
  assert manifest.counts == {"prompts": 6, "rows": 12, "images": 10,
                             "image_status": {"ok": 10, "empty": 2}}
  for r in rows:
    if r["image_path"]:
      assert r["image_path"] == os.path.join("images", str(r["prompt_id"]), f"{r['seed']}.png")
      pix = _pixels(w, r["image_path"])
      assert pix.shape == (32, 32, 3) and pix.dtype == np.uint8 and pix.std() > 1
  assert r["caption"] == CAPTIONS[-1] and r["extra"] == 5 and r["input_status"] == "x"
  # Different seeds give different images.
  seed0, seed1 = _pixels(w, "images/0/0.png"), _pixels(w, "images/0/1.png")
  assert np.abs(seed0.astype(int) - seed1).max() > 10

  # Resume: a lost shard is redone, the rest kept; the same images come back.
  before = _pixels(w, "images/5/1.png")
  os.remove(os.path.join(folder, shards.shard_name(4, 6)))
  os.remove(os.path.join(folder, "images", "5", "1.png"))
  m2 = generate.run(_cfg(tiny_sd1, prompts, w))
  assert m2.timings["prompts_this_run"] == 2 and not m2.resumed_finished  # the lost shard
  assert m2.runtime["compiles"] == 1
  np.testing.assert_array_equal(_pixels(w, "images/5/1.png"), before)
  assert _table(w).equals(table)
  m3 = generate.run(_cfg(tiny_sd1, prompts, w))  # finished: nothing to do
  assert m3.resumed_finished and m3.runtime["compiles"] == 0 and m3.timings == m2.timings
  with pytest.raises(InputError, match="steps"):  # other settings: refused
    generate.run(_cfg(tiny_sd1, prompts, w, steps=3))

  # Another batch size and device count: the same images (up to uint8 rounding).
  w1 = str(tmp_path / "w1")
  generate.run(_cfg(tiny_sd1, prompts, w1, batch_size=1, devices=1, shard_size=100))
  assert _table(w1)["image_path"].to_pylist() == table["image_path"].to_pylist()
  for r in rows:
    if r["image_path"]:
      diff = np.abs(_pixels(w, r["image_path"]).astype(int) - _pixels(w1, r["image_path"]))
      assert diff.max() <= 1


def _fake_stage(workdir, stage, table, prompt_column="caption"):
  """A finished stage in workdir as memjax leaves it (shards, run config, manifest)."""
  workdir_lib.check_run_config(workdir, stage, {"prompt_column": prompt_column},
                               overwrite=False)
  shards.ShardWriter(workdir_lib.stage_dir(workdir, stage)).write(table, 0, table.num_rows)
  workdir_lib.write_manifest(workdir, workdir_lib.Manifest(stage=stage, config={}))


def _fake_scan(workdir, captions, scores):
  """A scan of a table whose caption column is `text` (the scan adds `caption`)."""
  n = len(captions)
  _fake_stage(workdir, "scan", pa.table({
      "text": captions, "prompt_id": pa.array(range(n), pa.int64()), "caption": captions,
      "scores": pa.array(scores, pa.float32()), "status": ["ok"] * n}), "text")


def test_scan_workdir_top_k_with_ddim_and_noise_file(tiny_sd2, tmp_path):
  scan_dir = str(tmp_path / "scan")
  _fake_scan(scan_dir, ["a cat", "a dog", "a car", "a bus"], [1.0, 4.0, 3.0, 2.0])
  z = np.random.default_rng(0).standard_normal((3, 4, 16, 16)).astype(np.float32)
  np.save(tmp_path / "z.npy", z)
  w = str(tmp_path / "g")
  m = generate.run(_cfg(tiny_sd2, scan_dir, w, sampler="ddim", top_k=2, batch_size=2,
                        devices=2, noise=str(tmp_path / "z.npy")))
  assert m.details["sampler"] == "ddim" and m.details["seeds"] == [0, 1, 2]
  assert m.details["plan"]["timesteps"] and m.details["unet_evaluations"] == 2
  assert m.identity["source_stage"] == "scan" and m.identity["noise"].startswith("file:")
  rows = _table(w).to_pylist()
  assert [(r["prompt_id"], r["seed"]) for r in rows] == [(p, s) for p in (0, 1) for s in (0, 1, 2)]
  assert [r["caption"] for r in rows[::3]] == ["a dog", "a car"]  # top 2 by scores
  assert [r["scan_prompt_id"] for r in rows[::3]] == [1, 2]
  assert rows[0]["scan_status"] == "ok" and rows[0]["text"] == "a dog"
  assert all(r["status"] == "ok" for r in rows)

  # A workdir with a blackbox too: its top K by edge_scores come first.
  _fake_stage(scan_dir, "blackbox", pa.table({
      "caption": ["a bus", "a cat"], "prompt_id": pa.array([0, 1], pa.int64()),
      "edge_scores": pa.array([0.1, 0.9], pa.float32()), "status": ["ok", "ok"]}))
  m = generate.run(_cfg(tiny_sd2, scan_dir, str(tmp_path / "g2"), sampler="ddim", steps=1,
                        seeds=[0], top_k=1))
  assert m.identity["source_stage"] == "blackbox"
  rows = _table(str(tmp_path / "g2")).to_pylist()
  assert [(r["caption"], r["blackbox_prompt_id"], r["status"]) for r in rows] == [
      ("a cat", 1, "ok")]


def test_bad_input_is_a_clear_error(tiny_sd1, tmp_path):
  scan_dir = str(tmp_path / "unfinished")
  os.makedirs(os.path.join(scan_dir, "scan"))
  with pytest.raises(InputError, match="no finished blackbox or scan"):
    generate.run(_cfg(tiny_sd1, scan_dir, tmp_path / "a"))
  shards.ShardWriter(os.path.join(scan_dir, "scan")).write(
      pa.table({"caption": ["a"], "prompt_id": [0], "scores": [1.0]}), 0, 1)
  with pytest.raises(InputError, match="not finished"):  # shards, but no manifest
    generate.run(_cfg(tiny_sd1, scan_dir, tmp_path / "a"))
  with pytest.raises(InputError, match="batch_size"):
    generate.run(_cfg(tiny_sd1, _prompts(tmp_path), tmp_path / "b", batch_size=0))
  with pytest.raises(InputError, match="duplicates"):
    generate.run(_cfg(tiny_sd1, _prompts(tmp_path), tmp_path / "c", seeds=[1, 1]))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, "-m", "memjax.generate", f"--model={tiny_sd1}",
       f"--prompts={_prompts(tmp_path)}", f"--workdir={tmp_path / 'd'}", "--steps=0"],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and errors[0].startswith("error: --steps must be >= 1"), proc.stderr[-2000:]
  for refused in "abcd":  # nothing recorded for a refused configuration
    assert not os.path.exists(tmp_path / refused / "generate"), refused
