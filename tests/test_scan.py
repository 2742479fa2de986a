"""memjax.scan: the DCS against PyTorch, invariances, resume, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from memjax.stages import scan
from memjax.runtime.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = [f"a {c} {o} on a {s}" for c in ("red", "blue", "green") for o in ("cat", "car", "house")
            for s in ("table", "beach")]


def _prompts(tmp_path, captions=CAPTIONS, name="p.parquet"):
  path = str(tmp_path / name)
  pq.write_table(pa.table({"caption": captions, "extra": list(range(len(captions)))}), path)
  return path


def _read(workdir):
  return ds.dataset(os.path.join(workdir, "scan")).to_table().sort_by("prompt_id")


def _run(model, prompts, workdir, **kw):
  cfg = scan.ScanConfig(model=model, prompts=prompts, workdir=str(workdir), **kw)
  return scan.run(cfg), _read(str(workdir))


def _maxrel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b) / np.abs(b)))


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_dcs_equals_pytorch_diffusers(style, tiny_sd1, tiny_sd2, tmp_path):
  from memjax.testing.torch_reference import TorchWhitebox  # pylint: disable=g-import-not-at-top
  model = {"sd1": tiny_sd1, "sd2": tiny_sd2}[style]
  z = np.random.default_rng(3).standard_normal((2, 4, 16, 16)).astype(np.float32)
  np.save(tmp_path / "z.npy", z)
  captions = CAPTIONS[:6]
  _, table = _run(model, _prompts(tmp_path, captions), tmp_path / "w",
                  noise=str(tmp_path / "z.npy"), batch_size=4)
  ref = TorchWhitebox(model).score(captions, z, 7.5)
  got = np.array(table["scores_per_seed"].to_pylist())
  print(style, "max rel diff DCS", _maxrel(got, ref["dcs"]), "wen",
        _maxrel(np.array(table["wen"]), ref["wen"].mean(1)))
  assert _maxrel(got, ref["dcs"]) <= 1e-4
  assert _maxrel(table["scores"], ref["dcs"].mean(1)) <= 1e-4
  assert _maxrel(table["wen"], ref["wen"].mean(1)) <= 1e-4


def test_scores_do_not_depend_on_batch_padding_order_devices(tiny_sd1, tmp_path):
  p = _prompts(tmp_path)
  m1, base = _run(tiny_sd1, p, tmp_path / "a", batch_size=8, shard_size=7)
  assert m1["compiles"] == 1  # several shards and a padded last batch: one compile
  _, b1 = _run(tiny_sd1, p, tmp_path / "b", batch_size=1, devices=1)
  _, b5 = _run(tiny_sd1, p, tmp_path / "c", batch_size=5, devices=1, shard_size=100)
  rev = _prompts(tmp_path, CAPTIONS[::-1], "rev.parquet")
  _, r = _run(tiny_sd1, rev, tmp_path / "d", batch_size=8)
  ref = np.array(base["scores"])
  for other in (b1, b5):
    assert _maxrel(other["scores"], ref) <= 1e-5
  assert _maxrel(np.array(r["scores"])[::-1], ref) <= 1e-5
  assert base["extra"].to_pylist() == list(range(len(CAPTIONS)))  # input columns kept


def test_skipped_and_truncated_rows_are_counted(tiny_sd1, tmp_path):
  path = str(tmp_path / "p.jsonl")
  rows = [{"caption": "a cat"}, {"caption": ""}, {"caption": None}, {"caption": 5},
          {"caption": "word " * 100}]
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
  m, t = _run(tiny_sd1, path, tmp_path / "w")
  assert t.num_rows == 6 and t["prompt_id"].to_pylist() == list(range(6))
  assert m["scored"] == 2
  assert t["truncated"].to_pylist()[4] is True and t["n_tokens"].to_pylist()[4] == 100
  assert t["scores"].to_pylist()[1] is None
  assert set(m["skipped"]) == {"empty", "null", "not_text", "malformed_row"}


def test_non_utf8_bytes_are_replaced_and_counted(tiny_sd1, tmp_path):
  path = tmp_path / "p.txt"
  path.write_bytes(b"a plain caption\ncaf\xe9 au lait \xff\xfe\n")
  m, t = _run(tiny_sd1, str(path), tmp_path / "w")
  assert t["status"].to_pylist() == ["ok", "ok_replaced_utf8"]
  assert m["counts"]["ok_replaced_utf8"] == 1 and m["scored"] == 2
  assert "\ufffd" in t["caption"].to_pylist()[1]


def test_rerun_with_other_flags_is_refused(tiny_sd1, tmp_path):
  p = _prompts(tmp_path)
  _run(tiny_sd1, p, tmp_path / "w")
  with pytest.raises(InputError, match="guidance_scale"):
    _run(tiny_sd1, p, tmp_path / "w", guidance_scale=3.0)
  m, _ = _run(tiny_sd1, p, tmp_path / "w", guidance_scale=3.0, overwrite=True)
  assert m["identity"]["guidance_scale"] == 3.0


def test_shared_prompt_lists_scan(tiny_sd1, tmp_path):
  from conftest import SHARED_DATA  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(SHARED_DATA):
    pytest.skip("../shared/data not present")
  for i, name in enumerate(("sdv1_500_memorized.jsonl", "sd2_memorized.jsonl",
                            "sd1_nonmemorized.txt")):
    m, t = _run(tiny_sd1, os.path.join(SHARED_DATA, name), tmp_path / str(i), batch_size=64)
    assert t.num_rows == m["rows"] and m["scored"] + sum(m["skipped"].values()) == m["rows"]
    assert m["rows"] in (500, 219)
    assert np.isfinite(np.array(t["scores"].drop_null())).all()


def _cli(args, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "memjax.scan"] + args, capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=600, **kw)


@pytest.mark.parametrize("case,expect", [
    ("missing", "does not exist"), ("ext", "unknown prompt file type"), ("column", "column"),
    ("empty", "no rows"),
])
def test_bad_input_is_one_clear_message(case, expect, tiny_sd1, tmp_path):
  if case == "missing":
    p = str(tmp_path / "nope.parquet")
  elif case == "ext":
    p = str(tmp_path / "p.xlsx")
    open(p, "w").close()
  elif case == "column":
    p = str(tmp_path / "p.parquet")
    pq.write_table(pa.table({"text": ["a"]}), p)
  else:
    p = str(tmp_path / "p.csv")
    open(p, "w").write("caption\n")
  r = _cli([f"--model={tiny_sd1}", f"--prompts={p}", f"--workdir={tmp_path / 'w'}"])
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert expect in r.stderr.lower(), r.stderr[-2000:]


def test_sigkill_then_resume_equals_uninterrupted(tiny_sd1, tmp_path):
  captions = [f"caption number {i} of a {['cat', 'dog', 'car'][i % 3]}" for i in range(240)]
  p = _prompts(tmp_path, captions)
  _, ref = _run(tiny_sd1, p, tmp_path / "ref", batch_size=8, shard_size=16)
  args = [f"--model={tiny_sd1}", f"--prompts={p}", f"--workdir={tmp_path / 'w'}",
          "--batch_size=8", "--shard_size=16"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.Popen([sys.executable, "-m", "memjax.scan"] + args, env=env, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  scan_dir = tmp_path / "w" / "scan"
  deadline = time.time() + 300
  while time.time() < deadline:  # kill once some, not all, shards exist
    if scan_dir.exists() and len(list(scan_dir.glob("part-*.parquet"))) >= 3:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = len(list(scan_dir.glob("part-*.parquet")))
  assert 0 < done < 15, done
  r = _cli(args)
  assert r.returncode == 0, r.stderr[-3000:]
  t = _read(str(tmp_path / "w"))
  assert t["prompt_id"].to_pylist() == list(range(240))  # no duplicate, none missing
  assert _maxrel(t["scores"], ref["scores"]) <= 1e-6


def test_two_processes_equal_one(tiny_sd1, tmp_path):
  p = _prompts(tmp_path)
  _, ref = _run(tiny_sd1, p, tmp_path / "ref", batch_size=4, shard_size=5)
  port = 20000 + os.getpid() % 20000
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "memjax.scan", f"--model={tiny_sd1}", f"--prompts={p}",
       f"--workdir={tmp_path / 'w'}", "--batch_size=4", "--shard_size=5", "--distributed",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [pr.communicate(timeout=600)[0] for pr in procs]
  assert all(pr.returncode == 0 for pr in procs), outs[0][-3000:] + outs[1][-3000:]
  t = _read(str(tmp_path / "w"))
  assert t["prompt_id"].to_pylist() == list(range(len(CAPTIONS)))
  assert _maxrel(t["scores"], ref["scores"]) <= 1e-5
  manifest = json.load(open(tmp_path / "w" / "manifest.json"))
  assert manifest["processes"] == 2 and manifest["scored"] == len(CAPTIONS)
