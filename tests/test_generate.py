"""memjax.generate: output layout, one compile, resume, scan workdirs, bad input."""
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memjax.stages import generate
from memjax.runtime import results
from memjax.runtime.errors import InputError

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
  return np.asarray(Image.open(os.path.join(workdir, rel)))


def test_layout_compile_once_resume_and_batch_invariance(tiny_sd1, tmp_path):
  prompts, w = _prompts(tmp_path), str(tmp_path / "w")
  manifest = generate.run(_cfg(tiny_sd1, prompts, w))
  assert manifest["compiles"] == 1  # two shards, padded batches: one compile
  assert manifest["sampler"] == "heun" and manifest["steps"] == 2
  assert manifest["unet_evaluations"] == 3 and len(manifest["plan"]["sigmas"]) == 3
  table = pq.read_table(os.path.join(w, generate.TABLE))
  assert table.column_names[:7] == ["prompt_id", "caption", "seed", "sampler", "steps",
                                    "image_path", "status"]
  assert set(table.column_names[7:]) == {"input_status", "extra"}  # input columns kept
  rows = table.to_pylist()
  assert [(r["prompt_id"], r["seed"]) for r in rows] == [(p, s) for p in range(6) for s in (0, 1)]
  assert [r["status"] for r in rows if r["prompt_id"] == 1] == ["empty", "empty"]
  assert all(r["image_path"] is None for r in rows if r["prompt_id"] == 1)
  assert manifest["images"] == 10 and manifest["rows"] == 12
  for r in rows:
    if r["image_path"]:
      assert r["image_path"] == f"generated/{r['prompt_id']}/{r['seed']}.png"
      pix = _pixels(w, r["image_path"])
      assert pix.shape == (32, 32, 3) and pix.dtype == np.uint8 and pix.std() > 1
  assert r["caption"] == CAPTIONS[-1] and r["extra"] == 5 and r["input_status"] == "x"
  # Different seeds give different images.
  seed0, seed1 = _pixels(w, "generated/0/0.png"), _pixels(w, "generated/0/1.png")
  assert np.abs(seed0.astype(int) - seed1).max() > 10

  # Resume: a lost shard is redone, the rest kept; the same images come back.
  before = _pixels(w, "generated/5/1.png")
  shard = os.path.join(w, generate.STAGE, results.shard_name(4, 6))
  os.remove(shard)
  os.remove(os.path.join(w, "generated/5/1.png"))
  m2 = generate.run(_cfg(tiny_sd1, prompts, w))
  assert m2["timings"]["images_this_run"] == 4  # only the lost shard's 2 prompts x 2 seeds
  np.testing.assert_array_equal(_pixels(w, "generated/5/1.png"), before)
  assert pq.read_table(os.path.join(w, generate.TABLE)).equals(table)
  with pytest.raises(InputError, match="steps"):  # other settings: refused
    generate.run(_cfg(tiny_sd1, prompts, w, steps=3))

  # Another batch size and device count: the same images (up to uint8 rounding).
  w1 = str(tmp_path / "w1")
  generate.run(_cfg(tiny_sd1, prompts, w1, batch_size=1, devices=1, shard_size=100))
  for r in rows:
    if r["image_path"]:
      diff = np.abs(_pixels(w, r["image_path"]).astype(int) - _pixels(w1, r["image_path"]))
      assert diff.max() <= 1


def _fake_scan(workdir, captions, scores):
  """A finished scan workdir as memjax.scan leaves it (shards, run config, manifest)."""
  n = len(captions)
  table = pa.table({"text": captions, "prompt_id": pa.array(range(n), pa.int64()),
                    "scores": pa.array(scores, pa.float32()), "status": ["ok"] * n})
  results.check_run_config(workdir, {"prompt_column": "text"}, overwrite=False)
  results.ShardedResults(workdir, "scan").write(table, 0, n)
  results.write_json_atomic(os.path.join(workdir, "manifest.json"), {"stage": "scan"})


def test_scan_workdir_top_k_with_ddim_and_noise_file(tiny_sd2, tmp_path):
  scan_dir = str(tmp_path / "scan")
  _fake_scan(scan_dir, ["a cat", "a dog", "a car", "a bus"], [1.0, 4.0, 3.0, 2.0])
  z = np.random.default_rng(0).standard_normal((3, 4, 16, 16)).astype(np.float32)
  np.save(tmp_path / "z.npy", z)
  w = str(tmp_path / "g")
  m = generate.run(_cfg(tiny_sd2, scan_dir, w, sampler="ddim", top_k=2, batch_size=2,
                        devices=2, noise=str(tmp_path / "z.npy")))
  assert m["sampler"] == "ddim" and m["seeds"] == [0, 1, 2] and m["plan"]["timesteps"]
  rows = pq.read_table(os.path.join(w, generate.TABLE)).to_pylist()
  assert [(r["prompt_id"], r["seed"]) for r in rows] == [(p, s) for p in (0, 1) for s in (0, 1, 2)]
  assert [r["caption"] for r in rows[::3]] == ["a dog", "a car"]  # top 2 by scores
  assert [r["scan_prompt_id"] for r in rows[::3]] == [1, 2]
  assert rows[0]["scan_status"] == "ok" and rows[0]["text"] == "a dog"
  assert all(r["status"] == "ok" for r in rows)


def test_bad_input_is_a_clear_error(tiny_sd1, tmp_path):
  scan_dir = str(tmp_path / "unfinished")
  os.makedirs(os.path.join(scan_dir, "scan"))
  with pytest.raises(InputError, match="not finished"):
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
  assert proc.returncode == 2 and "error: --steps=0" in proc.stderr, proc.stderr[-2000:]
