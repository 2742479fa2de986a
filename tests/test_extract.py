"""memjax.extract: the whole attack, end to end, on a tiny random model and a micro testbed."""
import json
import os
import re
import subprocess
import sys

import pytest

from memjax.stages import extract
from memjax.testing import testbed
from memjax.runtime.errors import InputError

ROOT = os.path.join(os.path.dirname(__file__), "..")
MICRO = testbed.TestbedSpec(num_unique=40, num_mv=4, mv_copies=10, num_tv_groups=1,
                            tv_members=3, tv_copies=5, num_rv=1, rv_captions=2, rv_copies=5,
                            num_heldout=10, eval_unique=10)


def _tiny_cfg(model, paths, workdir, **kw):
  base = dict(model=model, prompts=paths["eval"], workdir=workdir, training_set=paths["train"],
              top_k=4, batch_size=8, blackbox_seeds=(0, 1), generate_seeds=(0, 1),
              sampler="ddim", steps=2, blackbox_batch_size=4, generate_batch_size=4,
              k_list=(2, 4), log_interval_s=60.0)
  base.update(kw)
  return extract.ExtractConfig(**base)


@pytest.mark.slow  # about a minute on 2 cores: every stage compiles once
def test_end_to_end_on_a_micro_testbed_and_resume(tiny_sd1, tmp_path):
  paths = testbed.write(testbed.generate(MICRO), str(tmp_path / "testbed"))
  w = str(tmp_path / "run")
  out = extract.run(_tiny_cfg(tiny_sd1, paths, w))
  assert set(out["timings"]) == set(extract.STAGES)
  assert out["report"] == os.path.join(w, "report", "index.html")
  for path in ("scan", "blackbox", "generated.parquet", "index/faiss.index",
               "verify/verify.parquet", "metrics_planted.json", "extract.json"):
    assert os.path.exists(os.path.join(w, path)), path
  page = open(out["report"], encoding="utf-8").read()
  ids = [int(x) for x in re.findall(r"data-prompt-id='(\d+)'", page)]
  with open(os.path.join(w, "report", "report.json")) as f:
    rep = json.load(f)
  assert len(ids) == 4 and ids == rep["ids"] and rep["missing"] == []
  assert page.count("img/onestep/") == 4 * 2 and page.count("img/generated/") == 4 * 2
  # A rerun of the same command resumes: nothing is scored or generated again.
  again = extract.run(_tiny_cfg(tiny_sd1, paths, w, stages=("scan", "blackbox", "generate")))
  assert again["timings"]["generate"] < out["timings"]["generate"] + 5
  with open(os.path.join(w, "manifest.json")) as f:
    assert json.load(f)["timings"]["prompts_scored_this_run"] == 0
  with pytest.raises(InputError, match="other settings"):
    extract.run(_tiny_cfg(tiny_sd1, paths, w, steps=3, stages=("generate",)))


def test_config_errors(tmp_path):
  with pytest.raises(InputError, match="unknown stage"):
    extract.run(extract.ExtractConfig(model="m", prompts="p", workdir=str(tmp_path),
                                      stages=("scan", "sacn")))
  with pytest.raises(InputError, match="extract_training_set"):
    extract.run(extract.ExtractConfig(model="m", prompts="p", workdir=str(tmp_path)))


def test_demo_flagfile_parses(tmp_path):
  """Every flag of configs/demo.flags exists (absl refuses unknown ones)."""
  cmd = [sys.executable, "-m", "memjax.extract", "--flagfile=configs/demo.flags",
         f"--workdir={tmp_path}", "--extract_stages=none"]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
  assert done.returncode == 2, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1].startswith("error: --extract_stages: unknown")
