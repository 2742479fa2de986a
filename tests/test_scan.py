"""memjax.scan: the DCS against PyTorch, the engine adds nothing, invariances, resume,
bad input."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DATA  # pylint: disable=g-bad-import-order
from memjax.method import noise as noise_lib
from memjax.method import whitebox
from memjax.models import loading
from memjax.runtime import distributed
from memjax.runtime import engine
from memjax.runtime import shards
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError
from memjax.stages import common
from memjax.stages import scan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = [f"a {c} {o} on a {s}" for c in ("red", "blue", "green") for o in ("cat", "car", "house")
            for s in ("table", "beach")]


def _prompts(tmp_path, captions=CAPTIONS, name="p.parquet"):
  path = str(tmp_path / name)
  pq.write_table(pa.table({"caption": captions, "extra": list(range(len(captions)))}), path)
  return path


def _read(workdir):
  """Every row of WORKDIR/scan's shards (not its top_k.parquet), by prompt_id."""
  folder = workdir_lib.stage_dir(str(workdir), scan.STAGE)
  return shards.open_shards(folder).to_table().sort_by("prompt_id")


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
  assert got.shape == (6, 2)
  assert _maxrel(got, ref["dcs"]) <= 1e-4
  assert _maxrel(table["scores"], ref["dcs"].mean(1)) <= 1e-4
  assert _maxrel(table["wen"], ref["wen"].mean(1)) <= 1e-4


# ---- the engine adds nothing to the pure score function -----------------------------

def _direct_scores(sd, ids, noise, guidance_scale, batch_size):
  """whitebox.make_score_fn under a plain jax.jit, on the batches the stage makes
  (batch_size rows, the last padded with the empty prompt): dict of [N, S]."""
  t = sd.schedule.last_timestep
  p = sd.params
  empty = common.empty_ids(sd)
  e_u = jax.jit(whitebox.make_uncond_fn(sd.text_embed, sd.unet_out, sd.schedule, t))(
      p["text_encoder"], p["unet"], jnp.asarray(empty[None]), jnp.asarray(noise))
  score = jax.jit(whitebox.make_score_fn(sd.text_embed, sd.unet_out, sd.schedule,
                                         guidance_scale, t))
  outs = []
  for start in range(0, len(ids), batch_size):
    chunk = ids[start:start + batch_size]
    real = len(chunk)
    chunk = np.concatenate([chunk, np.broadcast_to(empty, (batch_size - real, len(empty)))])
    out = score(p["text_encoder"], p["unet"], jnp.asarray(chunk.astype(np.int32)),
                jnp.asarray(noise), e_u)
    outs.append({k: np.asarray(v)[:real] for k, v in out.items()})
  return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def test_bound_step_compiles_once_and_equals_the_pure_score_fn(tiny_sd1, tmp_path):
  sd = loading.load_stable_diffusion(tiny_sd1, components=("unet", "text_encoder"))
  noise = noise_lib.noise_for_seeds([0, 1], sd.latent_shape_chw)
  ids = np.asarray(sd.tokenizer.encode_batch(CAPTIONS)["input_ids"], np.int32)  # 18 rows
  # One device: the same per-device batch as the plain jit, so bit-identical.
  step = scan.make_step(sd, noise, 7.5, 5, distributed.local_mesh(1))
  assert step.batch_size == 5
  got = [step.all(ids[:n]) for n in (18, 5, 3, 11)]  # full and padded last batches
  assert step.compiles == 1
  direct = _direct_scores(sd, ids, noise, 7.5, 5)
  assert set(got[0]) == set(direct) == {"dcs", "wen", "uncond_norm", "align"}
  for out in got:
    n = len(out["dcs"])
    for k in direct:
      assert out[k].shape == (n, 2)
      assert float(np.abs(out[k] - direct[k][:n]).max()) == 0, k  # the engine adds nothing
  # In flight or not, the same rows come back, in order.
  starts = [s for s, _ in step.map(ids, max_in_flight=1)]
  assert starts == [0, 5, 10, 15] and step.compiles == 1
  # On 8 devices a batch is rounded up to a multiple of 8; the padding is dropped.
  double = engine.BoundStep(lambda b, x: x * b, np.float32(2), 5, distributed.local_mesh(),
                            np.float32(-1))
  rows = np.arange(11, dtype=np.float32)
  assert double.batch_size == 8
  np.testing.assert_array_equal(double.all(rows), 2 * rows)
  assert double.all(rows[:0]) is None and double.compiles == 1

  # scan.run writes exactly these numbers: per seed, and their mean over seeds.
  m, t = _run(tiny_sd1, _prompts(tmp_path), tmp_path / "w", seeds=[0, 1], batch_size=5,
              devices=1, shard_size=7)
  assert m.runtime["compiles"] == 1 and m.runtime["batch_size"] == 5
  per_seed = np.array(t["scores_per_seed"].to_pylist(), np.float32)
  assert float(np.abs(per_seed - direct["dcs"]).max()) == 0
  mean = direct["dcs"].mean(axis=1).astype(np.float32)
  assert float(np.abs(t["scores"].to_numpy() - mean).max()) == 0
  for k in ("wen", "uncond_norm", "align"):
    assert float(np.abs(t[k].to_numpy() - direct[k].mean(axis=1).astype(np.float32)).max()) == 0


def test_attention_kernel_agrees_and_is_part_of_the_run_config(tiny_sd1, tmp_path):
  p = _prompts(tmp_path)
  m_default, default = _run(tiny_sd1, p, tmp_path / "a", batch_size=8)
  m_xla, xla = _run(tiny_sd1, p, tmp_path / "b", batch_size=8, attention="xla")
  assert _maxrel(xla["scores"], default["scores"]) <= 1e-5
  # The kernel really changed (the default on CPU is memjax's blocked kernel):
  # another formulation, other float32 roundings.
  if jax.default_backend() == "cpu":
    assert not np.array_equal(xla["scores_per_seed"].to_pylist(),
                              default["scores_per_seed"].to_pylist())
  configs = [workdir_lib.read_json(workdir_lib.path(str(tmp_path / w), scan.STAGE,
                                                    workdir_lib.RUN_CONFIG)) for w in "ab"]
  assert configs[0] != configs[1]
  assert {k for k in configs[0] if configs[0][k] != configs[1].get(k)} == {"attention"}
  assert configs[0]["attention"] is None and configs[1]["attention"] == "xla"
  assert m_default.identity["attention"] is None and m_xla.identity["attention"] == "xla"
  assert m_xla.config["attention"] == "xla"
  with pytest.raises(InputError, match="attention"):  # a resume must use the same kernel
    _run(tiny_sd1, p, tmp_path / "a", batch_size=8, attention="xla")


def test_scores_do_not_depend_on_batch_padding_order_devices(tiny_sd1, tmp_path):
  p = _prompts(tmp_path)
  m1, base = _run(tiny_sd1, p, tmp_path / "a", batch_size=8, shard_size=7)
  assert m1.runtime["compiles"] == 1  # several shards and a padded last batch: one compile
  assert m1.runtime["devices"] == 8 and m1.runtime["batch_size"] == 8
  assert len(shards.list_shards(workdir_lib.stage_dir(str(tmp_path / "a"), "scan"))) == 3
  _, b1 = _run(tiny_sd1, p, tmp_path / "b", batch_size=1, devices=1)
  rev = _prompts(tmp_path, CAPTIONS[::-1], "rev.parquet")  # and other batches, 2 devices
  _, r = _run(tiny_sd1, rev, tmp_path / "c", batch_size=6, devices=2, shard_size=100)
  ref = np.array(base["scores"])
  assert np.isfinite(ref).all() and np.unique(ref).size == len(CAPTIONS)
  assert _maxrel(b1["scores"], ref) <= 1e-5
  assert _maxrel(np.array(r["scores"])[::-1], ref) <= 1e-5
  assert base["extra"].to_pylist() == list(range(len(CAPTIONS)))  # input columns kept
  assert base["caption"].to_pylist() == CAPTIONS


def test_outputs_layout_and_manifest(tiny_sd1, tmp_path):
  m, t = _run(tiny_sd1, _prompts(tmp_path), tmp_path / "w", top_k=4, shard_size=10)
  folder = tmp_path / "w" / "scan"
  assert sorted(os.listdir(folder)) == [
      "manifest.json", shards.shard_name(0, 10), shards.shard_name(10, 18), "run_config.json",
      "top_k.parquet"]
  assert isinstance(m, workdir_lib.Manifest)
  on_disk = workdir_lib.read_manifest(str(tmp_path / "w"), "scan")
  assert json.loads(json.dumps(dataclasses.asdict(m))) == dataclasses.asdict(on_disk)
  assert m.stage == "scan" and m.rate_unit == "prompts/s" and m.rate > 0
  assert not m.resumed_finished
  assert m.counts == {"rows": 18, "status": {"ok": 18}, "scored": 18, "skipped": {}}
  assert m.outputs == {"shards": "part-*.parquet", "top_k": "top_k.parquet"}
  assert m.timings["prompts_this_run"] == 18 and m.timings["total_s"] > 0
  last = loading.read_scheduler_config(tiny_sd1)["num_train_timesteps"] - 1
  assert m.identity["timestep"] == m.details["timestep"] == last
  assert m.config["workdir"] == str(tmp_path / "w") and m.config["top_k"] == 4
  top = pq.read_table(folder / "top_k.parquet")
  best = t.sort_by([("scores", "descending")]).slice(0, 4)
  assert top["prompt_id"].to_pylist() == best["prompt_id"].to_pylist()
  assert set(scan.BASE_COLUMNS) | {"prompt_id", "caption", "extra"} == set(t.column_names)
  # A rerun of a finished scan does nothing and keeps the figures of the run that did it.
  again, _ = _run(tiny_sd1, _prompts(tmp_path), tmp_path / "w", top_k=4, shard_size=10)
  assert again.resumed_finished and again.runtime["compiles"] == 0
  assert again.timings == m.timings and again.rate == m.rate


def test_skipped_and_truncated_rows_are_counted(tiny_sd1, tmp_path):
  path = str(tmp_path / "p.jsonl")
  rows = [{"caption": "a cat"}, {"caption": ""}, {"caption": None}, {"caption": 5},
          {"caption": "word " * 100}]
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
  m, t = _run(tiny_sd1, path, tmp_path / "w")
  assert t.num_rows == 6 and t["prompt_id"].to_pylist() == list(range(6))
  assert m.counts["scored"] == 2 and m.counts["rows"] == 6
  assert t["truncated"].to_pylist()[4] is True and t["n_tokens"].to_pylist()[4] == 100
  assert t["scores"].to_pylist()[1] is None
  assert set(m.counts["skipped"]) == {"empty", "null", "not_text", "malformed_row"}


def test_non_utf8_bytes_are_replaced_and_counted(tiny_sd1, tmp_path):
  path = tmp_path / "p.txt"
  path.write_bytes(b"a plain caption\ncaf\xe9 au lait \xff\xfe\n")
  m, t = _run(tiny_sd1, str(path), tmp_path / "w")
  assert t["status"].to_pylist() == ["ok", "ok_replaced_utf8"]
  assert m.counts["status"]["ok_replaced_utf8"] == 1 and m.counts["scored"] == 2
  assert "\ufffd" in t["caption"].to_pylist()[1]


def test_rerun_with_other_flags_is_refused(tiny_sd1, tmp_path):
  p, w = _prompts(tmp_path), tmp_path / "w"
  for bad in ({"shard_size": 0}, {"batch_size": 0}, {"top_k": 0}):  # refused at once
    with pytest.raises(InputError, match="must be >= 1"):
      _run(tiny_sd1, p, w, **bad)
  assert not os.path.exists(w / "scan" / "run_config.json")  # nothing recorded: w is free
  _run(tiny_sd1, p, tmp_path / "w")
  with pytest.raises(InputError, match="guidance_scale"):
    _run(tiny_sd1, p, tmp_path / "w", guidance_scale=3.0)
  m, t = _run(tiny_sd1, p, tmp_path / "w", guidance_scale=3.0, overwrite=True)
  assert m.identity["guidance_scale"] == 3.0 and not m.resumed_finished
  assert t.num_rows == len(CAPTIONS)


def test_shared_prompt_lists_scan(tiny_sd1, tmp_path):
  """The public prompt lists of tests/data (tests/data/README.md) read, tokenize and score."""
  expected = {"sdv1_500_memorized.jsonl": 500, "sd2_memorized.jsonl": 219,
              "sd1_nonmemorized.txt": 500}
  for i, (name, n) in enumerate(expected.items()):
    m, t = _run(tiny_sd1, os.path.join(DATA, name), tmp_path / str(i), batch_size=128,
                devices=1)
    assert t.num_rows == m.counts["rows"] == n, name
    assert m.counts["scored"] + sum(m.counts["skipped"].values()) == n
    assert m.counts["scored"] >= n - 5, m.counts  # real captions: almost all scorable
    scores = t["scores"].drop_null().to_numpy()
    assert len(scores) == m.counts["scored"] and np.isfinite(scores).all()
    assert np.unique(scores).size > n // 2  # scores vary with the caption
    assert m.runtime["compiles"] == 1


def _cli(args, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "memjax.scan"] + args, capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=600, **kw)


def _one_error_line(stderr):
  """The `error: ...` line of a failed command (exactly one, no traceback)."""
  assert "Traceback" not in stderr, stderr[-2000:]
  lines = [l for l in stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, stderr[-2000:]
  return lines[0]


@pytest.mark.parametrize("case,expect", [
    ("missing", "does not exist"), ("ext", "unknown table type"), ("column", "column"),
    ("empty", "no rows"), ("seeds", "--seeds must be integers"),
    ("batch", "--batch_size must be >= 1, got 0"),
])
def test_bad_input_is_one_clear_message(case, expect, tiny_sd1, tmp_path):
  extra = []
  if case == "missing":
    p = str(tmp_path / "nope.parquet")
  elif case == "ext":
    p = str(tmp_path / "p.xlsx")
    open(p, "w").close()
  elif case == "column":
    p = str(tmp_path / "p.parquet")
    pq.write_table(pa.table({"text": ["a"]}), p)
  elif case == "empty":
    p = str(tmp_path / "p.csv")
    open(p, "w").write("caption\n")
  else:
    p = _prompts(tmp_path)
    extra = ["--seeds=0,x"] if case == "seeds" else ["--batch_size=0"]
  r = _cli([f"--model={tiny_sd1}", f"--prompts={p}", f"--workdir={tmp_path / 'w'}"] + extra)
  assert r.returncode == 2, r.stderr[-2000:]
  line = _one_error_line(r.stderr)
  assert expect in line.lower(), line


@pytest.mark.parametrize("flag,expect", [
    ("--batch_size=abc", "batch_size"), ("--dtype=float16", "dtype"),
    ("--shard_sise=7", "shard_sise"),
])
def test_bad_flags_are_one_clear_message(flag, expect, tmp_path):
  r = _cli(["--model=m", "--prompts=p", f"--workdir={tmp_path / 'w'}", flag])
  assert (r.returncode, "FATAL" in r.stderr) == (2, False), (
      f"{flag}: exit {r.returncode}, stderr {r.stderr!r}. A flag absl cannot parse must "
      "also be one line `error: ...` with exit status 2 (memjax/cli/command.py: app.run "
      "parses the flags before run_main's handler, so absl prints 'FATAL Flags parsing "
      "error' and exits 1)")
  assert expect in _one_error_line(r.stderr)


def test_flags_are_the_config_fields(tmp_path):
  from conftest import parse_command  # pylint: disable=g-import-not-at-top
  import memjax.scan as command  # pylint: disable=g-import-not-at-top
  cfg = parse_command(command, ["--model=m", "--prompts=p", f"--workdir={tmp_path}",
                                "--seeds=0,1,2", "--attention=xla", "--shard_size=7"])
  assert cfg == scan.ScanConfig(model="m", prompts="p", workdir=str(tmp_path), seeds=[0, 1, 2],
                                attention="xla", shard_size=7)
  defaults = parse_command(command, ["--model=m", "--prompts=p", "--workdir=w"])
  assert defaults == scan.ScanConfig(model="m", prompts="p", workdir="w", seeds=[0])
  with pytest.raises(Exception, match="required"):  # a required field left unset
    parse_command(command, ["--model=m", "--prompts=p"])


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
  assert not (scan_dir / "manifest.json").exists()
  r = _cli(args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "scan done: 240 scored" in r.stdout
  t = _read(str(tmp_path / "w"))
  assert t["prompt_id"].to_pylist() == list(range(240))  # no duplicate, none missing
  assert _maxrel(t["scores"], ref["scores"]) <= 1e-6
  m = workdir_lib.read_manifest(str(tmp_path / "w"), "scan")
  assert m.counts["scored"] == 240 and m.timings["prompts_this_run"] == 240 - 16 * done
  assert not [n for n in os.listdir(scan_dir) if n.endswith(".tmp")]  # no leftovers


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
  assert "scan done" in outs[0] and "scan done" not in outs[1]  # process 0 reports
  t = _read(str(tmp_path / "w"))
  assert t["prompt_id"].to_pylist() == list(range(len(CAPTIONS)))
  assert _maxrel(t["scores"], ref["scores"]) <= 1e-5
  manifest = workdir_lib.read_manifest(str(tmp_path / "w"), "scan")
  assert manifest.runtime["processes"] == 2 and manifest.counts["scored"] == len(CAPTIONS)
  # Round robin: process 0 did shards 0, 2 (10 rows), process 1 shards 1, 3 (8 rows).
  assert manifest.timings["prompts_this_run"] == 10


def test_detectors_add_their_columns_beside_the_dcs(tiny_sd1, tmp_path):
  """--detectors: one column each, the DCS and its by-products as without them, the
  detectors and their timesteps in the run identity (another set is refused)."""
  prompts = _prompts(tmp_path)
  plain, base = _run(tiny_sd1, prompts, tmp_path / "plain", seeds=(0, 1))
  m, t = _run(tiny_sd1, prompts, tmp_path / "det", seeds=(0, 1), detectors=("all",),
              ren_layer="down_blocks.0.attentions.0")
  for column in ("scores", "wen", "uncond_norm", "align"):
    np.testing.assert_allclose(t[column].to_numpy(), base[column].to_numpy(), rtol=1e-6)
  for column in ("wen981", "jeon", "asthana", "asthana_norm", "asthana_cos", "ren_le"):
    values = t[column].to_numpy()
    assert values.dtype == np.float32 and np.isfinite(values).all(), column
  assert 0 < t["ren_le"].to_numpy().max() <= np.log(77) + 1e-5
  assert m.identity["detectors"] == ["wen981", "jeon", "asthana", "ren_le"]
  assert m.identity["detector_timesteps"] == [981, 41]
  assert "detectors" not in plain.identity  # earlier run configs stay resumable
  with pytest.raises(InputError, match="other settings"):
    _run(tiny_sd1, prompts, tmp_path / "det", seeds=(0, 1), detectors=("wen981",))
  with pytest.raises(InputError, match="unknown sharpness"):
    scan.ScanConfig(model="m", prompts="p", workdir="w", detectors=("sharpness",))
  with pytest.raises(InputError, match="no such cross-attention layer"):
    _run(tiny_sd1, prompts, tmp_path / "ren", detectors=("ren_le",))  # SD's layer: absent


def test_detector_protocols(tiny_sd1, tmp_path):
  """--detector_protocol=authors (the default): wen981 and ren_le on each prompt's
  own noise, the same whatever the batch and shard; asthana on the first seed's
  shared z, as a shared-protocol scan of that seed; --detector_seed moves only the
  per-prompt noise."""
  prompts = _prompts(tmp_path)
  kw = dict(detectors=("wen981", "asthana", "ren_le"), ren_layer="down_blocks.0.attentions.0")
  m, a = _run(tiny_sd1, prompts, tmp_path / "a", seeds=(0, 1), batch_size=3, shard_size=4, **kw)
  assert m.identity["detector_noise"] == {
      "wen981": {"noise": "per_prompt", "generations": 4},
      "asthana": {"noise": "shared", "generations": 1},
      "ren_le": {"noise": "per_prompt", "generations": 1}}
  assert m.identity["detector_seed"] == 0
  _, b = _run(tiny_sd1, prompts, tmp_path / "b", seeds=(0, 1), batch_size=5, **kw)
  for c in ("scores", "wen981", "asthana", "ren_le"):
    np.testing.assert_allclose(a[c].to_numpy(), b[c].to_numpy(), rtol=1e-6, err_msg=c)
  _, shared = _run(tiny_sd1, prompts, tmp_path / "s", seeds=(0,), detector_protocol="shared",
                   **kw)
  np.testing.assert_allclose(a["asthana"].to_numpy(), shared["asthana"].to_numpy(), rtol=1e-6)
  assert not np.allclose(a["wen981"].to_numpy(), shared["wen981"].to_numpy(), rtol=1e-3)
  _, other = _run(tiny_sd1, prompts, tmp_path / "o", seeds=(0, 1), detector_seed=5, **kw)
  np.testing.assert_allclose(other["asthana"].to_numpy(), a["asthana"].to_numpy(), rtol=1e-6)
  assert not np.allclose(other["wen981"].to_numpy(), a["wen981"].to_numpy(), rtol=1e-3)
  with pytest.raises(InputError, match="asthana on shared noise needs 3 generations"):
    _run(tiny_sd1, prompts, tmp_path / "g", seeds=(0, 1), detector_generations=3, **kw)
  with pytest.raises(InputError, match="detector_protocol"):
    scan.ScanConfig(model="m", prompts="p", workdir="w", detector_protocol="wen")
