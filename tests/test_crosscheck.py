"""memjax.crosscheck: memjax's scan and PyTorch diffusers agree on the same folder."""
import json
import os

import numpy as np
import pytest

from memjax.stages import crosscheck

CAPTIONS = [f"a {a} {b} in the {c}" for a in ("small", "large", "striped") for b in ("cat", "boat")
            for c in ("rain", "sun")]


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_fp32_passes(style, tiny_sd1, tiny_sd2, tmp_path):
  model = {"sd1": tiny_sd1, "sd2": tiny_sd2}[style]
  p = tmp_path / "p.txt"
  p.write_text("\n".join([""] + CAPTIONS) + "\n")  # an empty first row is skipped
  s = crosscheck.run(crosscheck.CrossCheckConfig(model=model, prompts=str(p),
                                                 workdir=str(tmp_path / "w"), n=12))
  print(s["verdict"])
  assert s["passed"], s["verdict"]
  assert s["n"] == 12 and s["max_rel_diff"] <= 1e-4 and s["spearman"] >= 0.9999
  assert s["topk_overlap"] == 1.0
  saved = json.load(open(tmp_path / "w" / "crosscheck.json"))
  assert {"max_rel_diff", "spearman", "topk_overlap", "n", "dtype"} <= set(saved)


def test_bfloat16_reports_figures(tiny_sd1, tmp_path):
  p = tmp_path / "p.txt"
  p.write_text("\n".join(CAPTIONS) + "\n")
  s = crosscheck.run(crosscheck.CrossCheckConfig(model=tiny_sd1, prompts=str(p),
                                                 workdir=str(tmp_path / "w"), n=8,
                                                 dtype="bfloat16"))
  print(s["verdict"])
  assert s["verdict"].startswith("REPORT") and "passed" not in s
  assert 0 < s["max_rel_diff"] < 1  # bf16 differs, but it is the same score
  assert os.path.exists(tmp_path / "w" / "crosscheck.parquet")


def test_compare_on_hand_made_arrays():
  c = crosscheck.compare(np.array([3.0, 2.0, 1.0, 0.5]), np.array([3.0, 2.2, 1.0, 0.4]))
  assert abs(c["max_rel_diff"] - 0.25) < 1e-12 and c["spearman"] == 1.0


def test_blackbox_images_and_edges_agree(tiny_sd2, tmp_path):
  p = tmp_path / "p.txt"
  p.write_text("\n".join(CAPTIONS[:3]) + "\n")
  s = crosscheck.run(crosscheck.CrossCheckConfig(model=tiny_sd2, prompts=str(p),
                                                 workdir=str(tmp_path / "w"), n=3, blackbox=True))
  print(s["verdict"])
  assert s["blackbox"]["max_abs_pixel_diff"] <= 1 / 255
  assert s["blackbox"]["seeds"] == [0, 1, 2, 3]
