"""memjax.train (issue 4): the micro recipe trains (loss falls), resumes to the
same params, and writes a diffusers folder that memjax loads; the SHIPPED testbed
model loads in PyTorch diffusers and memjax's scan equals the PyTorch reference."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from absl import flags

from conftest import parse_command
from memjax import train as train_cmd
from memjax.models import loading
from memjax.runtime import shards
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import ConfigError
from memjax.testing import testbed_eval
from memjax.testing import training as train

ROOT = os.path.join(os.path.dirname(__file__), "..")
MICRO = os.path.join(ROOT, "configs", "testbed_micro.flags")
SHIPPED = os.path.join(ROOT, "memjax", "assets", "testbed")
TOL = 1e-4


def _micro(workdir, **kw):
  """The micro recipe through the command's own flags (configs/testbed_micro.flags)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  cfg = parse_command(train_cmd, [f"--flagfile={MICRO}", f"--workdir={workdir}"])
  return dataclasses.replace(cfg, **kw)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("micro") / "full"
  return workdir, train.run(_micro(workdir, evaluate=False))


def test_micro_loss_falls_and_folder_loads(micro_run):
  workdir, summary = micro_run
  assert summary["finished"]
  for stage in ("vae", "unet"):
    losses = [c["loss"] for c in summary["curve"] if c["stage"] == stage]
    assert losses[-1] < losses[0], (stage, losses)
  sd = loading.load_stable_diffusion(str(workdir / "model"))
  assert sd.configs["unet"]["_class_name"] == "UNet2DConditionModel"
  assert sd.schedule.prediction_type == "v_prediction"
  assert sd.vae_scaling_factor == pytest.approx(summary["vae_scaling_factor"])
  for name in ("train.parquet", "eval_prompts.parquet"):
    assert os.path.exists(workdir / name)


def test_stop_and_resume_gives_the_same_params(micro_run, tmp_path):
  full_dir, _ = micro_run
  cfg = _micro(tmp_path, evaluate=False)
  stop = cfg.vae_steps + cfg.train_steps // 2 + 1  # inside the UNet stage, off a checkpoint
  first = train.run(_micro(tmp_path, evaluate=False, stop_after=stop))
  assert not first["finished"] and not os.path.exists(tmp_path / "model")
  second = train.run(cfg)
  assert second["finished"]
  a = loading.load_stable_diffusion(str(full_dir / "model")).params
  b = loading.load_stable_diffusion(str(tmp_path / "model")).params
  for name in ("unet", "vae", "text_encoder"):
    jax.tree.map(np.testing.assert_array_equal, a[name], b[name])


def test_resume_with_other_settings_is_refused(micro_run):
  workdir, _ = micro_run
  with pytest.raises(ConfigError, match="train_config.json"):
    train.run(_micro(workdir, learning_rate=1e-4))


def test_unknown_flag_in_flagfile(tmp_path):
  bad = tmp_path / "bad.flags"
  bad.write_text("--model=x\n")
  with pytest.raises(flags.Error, match="model"):
    parse_command(train_cmd, [f"--flagfile={bad}", f"--workdir={tmp_path}"])


@pytest.mark.skipif(not os.path.exists(os.path.join(SHIPPED, "model")),
                    reason="shipped testbed model not built")
def test_shipped_model_diffusers_and_torch_parity(tmp_path):
  from diffusers import StableDiffusionPipeline  # pylint: disable=g-import-not-at-top
  from memjax.method import noise as noise_lib  # pylint: disable=g-import-not-at-top
  from memjax.stages import scan  # pylint: disable=g-import-not-at-top
  from memjax.testing.torch_reference import TorchWhitebox  # pylint: disable=g-import-not-at-top
  model = os.path.join(SHIPPED, "model")
  pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
  img = pipe("velmora carpet sample in red", num_inference_steps=2, output_type="np").images
  with open(os.path.join(SHIPPED, "train_config.json")) as f:
    size = json.load(f)["spec"]["image_size"]
  assert img.shape[1:] == (size, size, 3) and np.isfinite(img).all()

  ev = pq.read_table(os.path.join(SHIPPED, "eval_prompts.parquet")).to_pydict()
  rows = [i for k in ("MV", "TV", "RV", "unique", "heldout")
          for i in [j for j, kk in enumerate(ev["kind"]) if kk == k][:2]]
  table = pa.table({c: [ev[c][i] for i in rows] for c in ev})
  pq.write_table(table, tmp_path / "p.parquet")
  scan.run(scan.ScanConfig(model=model, prompts=str(tmp_path / "p.parquet"),
                           workdir=str(tmp_path / "w"), batch_size=8, log_interval_s=1e9))
  out = shards.open_shards(workdir_lib.stage_dir(str(tmp_path / "w"), "scan")).to_table()
  out = out.sort_by("prompt_id").to_pydict()
  assert out["kind"] == table.column("kind").to_pylist()
  assert out["memorized"] == table.column("memorized").to_pylist()
  sd = loading.load_stable_diffusion(model, components=("unet",))
  z = noise_lib.noise_for_seeds([0], sd.latent_shape_chw).transpose(0, 3, 1, 2)
  ref = TorchWhitebox(model).score(out["caption"], z)
  rel = {k: float(np.abs(np.array(out[c]) - ref[k][:, 0]).max() / np.abs(ref[k]).max())
         for k, c in (("dcs", "scores"), ("wen", "wen"))}
  print(json.dumps(rel))
  assert all(v <= TOL for v in rel.values()), rel


@pytest.mark.skipif(not os.path.exists(os.path.join(SHIPPED, "model")),
                    reason="shipped testbed model not built")
def test_shipped_model_finds_what_was_planted():
  """The correctness harness: the DCS ranks the planted captions as issue 4 asks."""
  result = testbed_eval.evaluate(SHIPPED)
  with open(os.path.join(SHIPPED, "train_summary.json")) as f:
    recorded = json.load(f)["eval"]
  scores = result["auc"]["scores"]
  print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
  assert scores["MV"] >= 0.99 and scores["memorized"] >= 0.9, scores
  assert scores["MV_dark"] >= 0.99 and scores["TV"] >= 0.99, scores
  assert scores["precision_at_k_memorized"] >= 0.9, scores  # planted captions fill the top
  assert result["seeds"] == list(testbed_eval.EVAL_SEEDS)
  # Without guidance the one-step samples of MV and TV captions are nearest their own
  # training image (at w = 7.5 less often: guidance pushes this small model's samples
  # away from what it memorized).
  assert result["nearest_own_w1"]["MV"] >= 0.9, result["nearest_own_w1"]
  assert result["nearest_own_w1"]["TV"] >= 0.8, result["nearest_own_w1"]
  for kind, value in recorded["auc"]["scores"].items():  # the behaviour it shipped with
    assert scores[kind] == pytest.approx(value, abs=0.01), kind


@pytest.mark.slow
def test_full_recipe_reproduces_the_shipped_behaviour(tmp_path):
  """configs/testbed.flags from scratch through the command line (25 to 50 min).

  The training runs in a fresh process without this suite's 8 fake CPU devices:
  XLA partitions CPU work differently with them, which changes float32 results in
  the last bits, and 2000 training steps turn that into another (equally good)
  model. In the command's own environment, on the machine type that trained the
  shipped model, the weights are expected to be bit-identical (printed); the
  assertions are the behaviour issue 4 asks for and the recorded AUCs.
  """
  with open(os.path.join(SHIPPED, "train_summary.json")) as f:
    recorded = json.load(f)["eval"]["auc"]["scores"]
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "host_platform_device_count" not in f)
  workdir = tmp_path / "testbed"
  subprocess.run([sys.executable, "-m", "memjax.train",
                  "--flagfile=" + os.path.join(ROOT, "configs", "testbed.flags"),
                  f"--workdir={workdir}"], env=env, check=True, cwd=ROOT)
  with open(workdir / "train_summary.json") as f:
    scores = json.load(f)["eval"]["auc"]["scores"]
  same = {c: open(os.path.join(SHIPPED, "model", c), "rb").read() ==
             open(workdir / "model" / c, "rb").read()
          for c in ("unet/diffusion_pytorch_model.safetensors",
                    "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")}
  print(json.dumps({"scores": scores, "bit_identical_to_shipped": same}))
  assert scores["MV"] >= 0.99 and scores["memorized"] >= 0.9, scores
  assert scores["precision_at_k_memorized"] >= 0.9, scores
  for kind in ("MV", "TV", "RV", "unique", "memorized"):
    assert scores[kind] == pytest.approx(recorded[kind], abs=0.05), (kind, scores)
