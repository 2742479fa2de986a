"""memjax.crosscheck: memjax's scan and PyTorch diffusers agree on the same folder."""
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import parse_command
from memjax import crosscheck as crosscheck_cmd
from memjax.method import detectors as detectors_lib
from memjax.method import trajectory_detectors as traj_lib
from memjax.runtime import shards
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError
from memjax.stages import crosscheck

CAPTIONS = [f"a {a} {b} in the {c}" for a in ("small", "large", "striped") for b in ("cat", "boat")
            for c in ("rain", "sun")]


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_fp32_passes(style, tiny_sd1, tiny_sd2, tmp_path):
  model = {"sd1": tiny_sd1, "sd2": tiny_sd2}[style]
  p = tmp_path / "p.txt"
  p.write_text("\n".join([""] + CAPTIONS) + "\n")  # an empty first row is skipped
  # SD1 also cross-checks the trajectory detectors (test_trajectory_detectors.py has SD2's)
  traj = ["bright_ending", "wen_steps"] if style == "sd1" else []
  m = crosscheck.run(crosscheck.CrossCheckConfig(model=model, prompts=str(p),
                                                 workdir=str(tmp_path / "w"), n=12, steps=3,
                                                 detectors=traj))
  s = m.details
  print(s["verdict"])
  if traj:
    _check_trajectory(m, tmp_path / "w" / "crosscheck")
  else:
    assert "trajectory_detectors" not in s and "trajectory_table" not in m.outputs
  assert isinstance(m, workdir_lib.Manifest) and m.stage == "crosscheck"
  assert s["passed"], s["verdict"]
  assert s["verdict"].startswith("PASS")
  assert s["n"] == 12 and s["max_rel_diff"] <= 1e-4 and s["spearman"] >= 0.9999
  assert s["topk_overlap"] == 1.0 and s["memjax_compiles"] == 1
  folder = tmp_path / "w" / "crosscheck"
  saved = workdir_lib.read_manifest(str(tmp_path / "w"), "crosscheck")
  assert {"max_rel_diff", "spearman", "topk_overlap", "n", "dtype", "verdict",
          "passed"} <= set(saved.details)
  assert saved.details["verdict"] == s["verdict"]
  # The files both implementations read, both scores, and memjax's own scan workdir.
  assert pq.read_table(folder / "prompts.parquet")["caption"].to_pylist() == CAPTIONS
  assert np.load(folder / "noise.npy").shape == (1, 4, 16, 16)
  table = pq.read_table(folder / "crosscheck.parquet")
  assert table["caption"].to_pylist() == CAPTIONS
  np.testing.assert_allclose(table["memjax_scores"].to_numpy(), table["torch_scores"].to_numpy(),
                             rtol=1e-4)
  assert float(table["rel_diff"].to_numpy().max()) == pytest.approx(s["max_rel_diff"])
  inner = workdir_lib.stage_dir(str(folder / "memjax"), "scan")
  ours = shards.open_shards(inner).to_table().sort_by("prompt_id")
  np.testing.assert_array_equal(ours["scores"].to_numpy().astype(np.float64),
                                table["memjax_scores"].to_numpy())
  assert m.outputs["memjax_workdir"] == "memjax"


def _check_trajectory(m, folder):
  """wen_steps and bright_ending of memjax's generate stage (DDIM, 3 steps) against the
  PyTorch restatement's trajectory, per prompt and seed."""
  s, t = m.details, m.details["trajectory_detectors"]
  assert t["passed"] and "detectors" not in s, s["verdict"]  # no one-step detector asked
  assert "; trajectory detectors (3 DDIM steps, per prompt and seed) PASS" in s["verdict"]
  assert t["steps"] == 3 and t["seeds"] == 1 and t["memjax_compiles"] == 1
  assert list(t["columns"]) == ["wen_steps", "bright_ending"]
  for c in t["columns"].values():
    assert c["scale_rel_diff"] <= 1e-4, c
  table = pq.read_table(folder / crosscheck.TRAJECTORY_TABLE)
  assert table["caption"].to_pylist() == CAPTIONS and table["seed"].to_pylist() == [0] * 12
  generated = pq.read_table(folder / "memjax" / "generate" / "generated.parquet")
  assert set(generated["steps"].to_pylist()) == {3} and generated["sampler"][0].as_py() == "ddim"
  for column in ("wen_steps", "bright_ending"):  # memjax's: the generate stage's values
    np.testing.assert_array_equal(table[f"memjax_{column}"].to_numpy(),
                                  generated[column].to_numpy().astype(np.float64))
    np.testing.assert_allclose(table[f"memjax_{column}"].to_numpy(),
                               table[f"torch_{column}"].to_numpy(), rtol=1e-4)
  assert m.outputs["trajectory_table"] == crosscheck.TRAJECTORY_TABLE


def test_bfloat16_reports_figures(tiny_sd1, tmp_path):
  p = tmp_path / "p.txt"
  p.write_text("\n".join(CAPTIONS) + "\n")
  m = crosscheck.run(crosscheck.CrossCheckConfig(model=tiny_sd1, prompts=str(p),
                                                 workdir=str(tmp_path / "w"), n=8,
                                                 dtype="bfloat16"))
  s = m.details
  print(s["verdict"])
  assert s["verdict"].startswith("REPORT") and "passed" not in s
  assert 0 < s["max_rel_diff"] < 1  # bf16 differs, but it is the same score
  assert s["n"] == 8 and s["dtype"] == "bfloat16"
  assert os.path.exists(tmp_path / "w" / "crosscheck" / "crosscheck.parquet")


def test_compare_on_hand_made_arrays():
  c = crosscheck.compare(np.array([3.0, 2.0, 1.0, 0.5]), np.array([3.0, 2.2, 1.0, 0.4]))
  assert abs(c["max_rel_diff"] - 0.25) < 1e-12 and c["spearman"] == 1.0
  assert c["topk_overlap"] == 1.0
  c = crosscheck.compare(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0]), k=1)
  assert c["spearman"] == pytest.approx(-1.0) and c["topk_overlap"] == 0.0


def test_blackbox_images_and_edges_agree(tiny_sd2, tmp_path):
  p = tmp_path / "p.txt"
  p.write_text("\n".join(CAPTIONS[:3]) + "\n")
  m = crosscheck.run(crosscheck.CrossCheckConfig(model=tiny_sd2, prompts=str(p),
                                                 workdir=str(tmp_path / "w"), n=3, blackbox=True))
  s = m.details
  print(s["verdict"])
  assert s["blackbox"]["max_abs_pixel_diff"] <= 1 / 255
  assert s["blackbox"]["seeds"] == [0, 1, 2, 3]
  # A pixel that rounds to the other uint8 value flips a few of the 256 x 256 edge
  # pixels (1.5e-5 each): the scores agree to a handful of pixels.
  assert s["blackbox"]["edge_scores_max_abs_diff"] <= 20 / 256 ** 2
  assert "blackbox:" in s["verdict"]
  saved = workdir_lib.read_manifest(str(tmp_path / "w"), "crosscheck")
  assert saved.details["blackbox"]["seeds"] == [0, 1, 2, 3]


def test_detector_names_and_flags(tmp_path):
  every = list(detectors_lib.ONE_STEP + traj_lib.TRAJECTORY)
  assert list(crosscheck.detector_names(["all"])) == every  # the crosscheck's all: both kinds
  assert list(crosscheck.detector_names(["wen_steps", "jeon"])) == ["jeon", "wen_steps"]
  cfg = parse_command(crosscheck_cmd, ["--model=m", "--prompts=p", "--workdir=w",
                                       "--detectors=bright_ending,wen981", "--steps=8"])
  assert cfg.detectors == ["wen981", "bright_ending"] and cfg.steps == 8
  with pytest.raises(InputError, match="unknown nope"):
    crosscheck.CrossCheckConfig(model="m", prompts="p", workdir="w", detectors=["nope"])
  with pytest.raises(InputError, match="--steps must be >= 1"):
    crosscheck.CrossCheckConfig(model="m", prompts="p", workdir="w", steps=0)
