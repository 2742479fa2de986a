"""memjax.extract: the whole attack end to end (the micro attack of conftest.py), the
workdir layout, resume, and every flag of the command reaching its stage."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO, micro_config, parse_command
from memjax import extract as extract_cmd
from memjax.method import noise as noise_lib
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError
from memjax.stages import extract

pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # conftest.py


def test_every_stage_writes_only_its_own_folder(micro_extract):
  w, out = micro_extract["workdir"], micro_extract["out"]
  assert set(out["timings"]) == set(extract.STAGES)
  assert sorted(os.listdir(w)) == sorted(extract.STAGES + ("extract",))
  for stage in extract.STAGES + ("extract",):
    m = workdir_lib.read_manifest(w, stage)
    assert m is not None and m.stage == stage, stage
    for name in m.outputs.values():
      if "*" not in name:
        assert os.path.exists(os.path.join(workdir_lib.stage_dir(w, stage), name)), (stage, name)
  for stage in ("scan", "blackbox", "generate"):
    m = workdir_lib.read_manifest(w, stage)
    assert m.runtime["compiles"] == 1 and m.rate > 0 and m.rate_unit, stage
  assert out["report"] == workdir_lib.path(w, "report", "index.html")
  page = open(out["report"], encoding="utf-8").read()
  ids = [int(x) for x in re.findall(r"data-prompt-id='(\d+)'", page)]
  rep = workdir_lib.read_manifest(w, "report")
  assert len(ids) == 12 and ids == rep.details["ids"] and rep.details["missing"] == []
  assert page.count("img/onestep/") == 12 * 2 and page.count("img/generated/") == 12 * 2
  labels = pq.read_table(workdir_lib.path(w, "verify", "verify.parquet"))["overfit_type"]
  assert labels.to_pylist().count("MV") >= 4  # the bundled model reproduces its MV images


def test_rerun_resumes_and_other_settings_are_refused(micro_extract, tmp_path):
  w = str(tmp_path / "copy")
  shutil.copytree(micro_extract["workdir"], w)
  before = workdir_lib.read_manifest(w, "generate")
  cfg = micro_config(micro_extract["folder"], w, stages=("scan", "blackbox", "generate"))
  extract.run(cfg)
  for stage in ("scan", "blackbox", "generate"):
    m = workdir_lib.read_manifest(w, stage)
    assert m.resumed_finished and m.timings["prompts_this_run"] > 0, stage  # the first run's
  assert workdir_lib.read_manifest(w, "generate").timings == before.timings
  other = micro_config(micro_extract["folder"], w, stages=("generate",),
                       options={"generate": {"steps": 3}})
  with pytest.raises(InputError, match="other settings"):
    extract.run(other)


def test_config_errors(tmp_path):
  with pytest.raises(InputError, match="unknown stage"):
    extract.run(extract.ExtractConfig(model="m", prompts="p", workdir=str(tmp_path),
                                      stages=("scan", "sacn")))
  with pytest.raises(InputError, match="training_set"):
    extract.run(extract.ExtractConfig(model="m", prompts="p", workdir=str(tmp_path)))
  with pytest.raises(InputError, match="no setting"):
    extract.stage_configs(extract.ExtractConfig(model="m", prompts="p", workdir="w",
                                                options={"scan": {"sedes": [1]}}))
  with pytest.raises(InputError, match="set by extract itself"):
    extract.stage_configs(extract.ExtractConfig(model="m", prompts="p", workdir="w",
                                                options={"blackbox": {"prompts": "x"}}))


def _value(stage, field, kind, default, d):
  """A valid value other than the default for every flag of the micro attack."""
  special = {
      "noise": d["noise"], "prompt_column": "text", "csv_delimiter": ";", "dtype": "bfloat16",
      "attention": "xla", "devices": 4, "log_interval_s": 5.0, "guidance_scale": 6.5,
      ("scan", "seeds"): [1, 2], ("blackbox", "seeds"): [2, 3], ("generate", "seeds"): [1],
      ("scan", "top_k"): 11, ("blackbox", "top_k"): 11, ("generate", "top_k"): 10,
      ("report", "top_k"): 6, "max_prompts": 27, ("blackbox", "max_prompts"): 11,
      ("generate", "max_prompts"): 9, ("verify", "max_prompts"): 8, "shard_size": 5,
      "batch_size": 16, ("index", "batch_size"): 64, ("verify", "batch_size"): 8,
      "edge_threshold": 1.25, "edge_consistency": 0.4, "image_column": "img",
      "max_image_pixels": 10 ** 6, "edge_workers": 2, "sampler": "ddim", "steps": 4,
      "sigma_interpolation": "log", "embeddings": d["embeddings"], "embedder": "random",
      "embedder_checkpoint": d["checkpoint"], "index_factory": "IVF4,Flat", "nprobe": 2,
      "max_images": 1030, "chunk_rows": 500, "max_train": 700, "k": 3,
      "tv_threshold": 2400.0, "mv_threshold": 2600.0, "rv_threshold": 2900.0,
      "template_sse_low": 90.0, "template_sse_high": 1100.0, "template_pixel_tol": 0.04,
      "template_rule": "group", "template_agree_low": 0.6, "template_agree_high": 0.998,
      "template_min_partners": 3,
      "positive": ["MV", "RV"], "k_list": [2, 4], "score_columns": ["scores", "wen"],
      "variant": "fp16", "model_config": d["model_config"], "prediction_type": "v_prediction",
      "image_size": 64, ("scan", "detectors"): ["wen981", "ren_le"],
      "ren_layer": "down_blocks.0.attentions.0", ("generate", "detectors"): ["wen_steps"],
      "wen_steps": 3, "detector_protocol": "shared", "detector_generations": 2,
      "detector_seed": 3}
  value = special.get((stage, field), special.get(field))
  assert value is not None and value != default, (stage, field, kind, default)
  return value


def _flag_text(value):
  return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def test_every_flag_reaches_its_stage_manifest(micro_extract, tmp_path):
  """Each flag of memjax.extract set to a non-default value: found in the config of
  every stage it names, and, for a real run, in that stage's manifest."""
  src = pq.read_table(micro_extract["prompts"])
  table = src.append_column("text", src["caption"])
  pq.write_table(table, tmp_path / "eval.parquet")
  z = noise_lib.noise_for_seeds([5, 6], (4, 8, 8)).transpose(0, 3, 1, 2)  # the testbed latents
  np.save(tmp_path / "noise.npy", z)
  (tmp_path / "fake.ckpt").write_bytes(b"x")
  emb = str(tmp_path / "laion")
  index_dir = workdir_lib.stage_dir(micro_extract["workdir"], "index")
  for sub in ("img_emb", "metadata"):
    shutil.copytree(os.path.join(index_dir, sub), os.path.join(emb, sub))
  d = {"noise": str(tmp_path / "noise.npy"), "embeddings": emb,
       "checkpoint": str(tmp_path / "fake.ckpt"), "model_config": str(tmp_path / "config")}
  argv, expected = [], []
  for name, targets in extract_cmd.flag_table().items():
    stage, opt = targets[0]
    kind, default = extract_cmd.options.field_info(extract.CONFIGS[stage], opt.field)
    value = _value(stage, opt.field, kind, default, d)
    argv.append(f"--{name}={_flag_text(value)}")
    expected += [(name, s, o.field, value) for s, o in targets]
  w = str(tmp_path / "w")
  base = [f"--model={os.path.join(REPO, 'memjax/assets/testbed/model')}",
          f"--prompts={tmp_path / 'eval.parquet'}", f"--workdir={w}",
          f"--training_set={os.path.join(REPO, 'memjax/assets/testbed/train.parquet')}"]
  cfg = parse_command(extract_cmd, base + argv)
  configs = extract.stage_configs(cfg)
  for name, stage, field, value in expected:
    assert getattr(configs[stage], field) == value, (name, stage, field)
  # A real run: a checkpoint for the random encoder is refused, and the settings of
  # a single-file model or an fp16 variant do not apply to the bundled folder, so
  # those are checked in the configs above only.
  config_only = ("embedder_checkpoint",) + extract_cmd.options.MODEL_FILE
  run_cfg = dataclasses.replace(cfg, options={
      s: {f: v for f, v in o.items() if f not in config_only}
      for s, o in cfg.options.items()})
  extract.run(run_cfg)
  for name, stage, field, value in expected:
    if field in config_only:
      continue
    manifest = workdir_lib.read_manifest(w, stage)
    assert manifest.config[field] == json.loads(json.dumps(value)), (name, stage, field)


def test_one_stage_sets_its_own_shared_option(tmp_path):
  """--<stage>_guidance_scale (or _dtype, _attention, _devices) sets that stage
  alone; the others keep the shared flag's value, and unset it changes nothing."""
  base = [f"--model={os.path.join(REPO, 'memjax/assets/testbed/model')}",
          f"--prompts={tmp_path / 'p.parquet'}", f"--workdir={tmp_path / 'w'}",
          f"--training_set={tmp_path / 't.parquet'}", "--guidance_scale=7.5"]
  configs = extract.stage_configs(parse_command(
      extract_cmd, base + ["--generate_guidance_scale=1", "--scan_dtype=bfloat16"]))
  assert {s: configs[s].guidance_scale for s in ("scan", "blackbox", "generate")} == {
      "scan": 7.5, "blackbox": 7.5, "generate": 1.0}
  assert {s: configs[s].dtype for s in ("scan", "blackbox", "generate")} == {
      "scan": "bfloat16", "blackbox": "float32", "generate": "float32"}
  plain = extract.stage_configs(parse_command(extract_cmd, base))
  assert all(plain[s].guidance_scale == 7.5 for s in ("scan", "blackbox", "generate"))
  assert set(extract_cmd.override_table()) >= {"scan_guidance_scale", "blackbox_guidance_scale",
                                                "generate_guidance_scale", "generate_dtype"}
  assert not set(extract_cmd.override_table()) & set(extract_cmd.flag_table())
  with pytest.raises(Exception, match="blackbox_attention"):
    parse_command(extract_cmd, base + ["--blackbox_attention=fast"])


def test_demo_flagfile_parses(tmp_path):
  """Every flag of configs/demo.flags exists (absl refuses unknown ones)."""
  cmd = [sys.executable, "-m", "memjax.extract", "--flagfile=configs/demo.flags",
         f"--workdir={tmp_path}", "--stages=none"]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
  assert done.returncode == 2, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1].startswith("error: --stages: unknown")
