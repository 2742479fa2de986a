"""Every one-step detector of memjax equals its PyTorch restatement on diffusers
(`memjax.testing.torch_detectors`, written from the authors' code) on the same model
and z: `memjax.crosscheck --detectors=all` on tiny SD1 (eps) and SD2 (v) folders.

The tiny folders have no `down_blocks.1.attentions.1` (Ren's layer in SD); ren_le
reads the deepest cross-attention they have, on both sides.
"""
import pytest

from memjax.method import detectors as detectors_lib
from memjax.stages import crosscheck

CAPTIONS = ["a red boat at dawn", "a cat on a sofa", "two dogs in snow", "a blue house",
            "an old map of a city", "a bowl of fruit"]
REN_LAYER = {"sd1": "down_blocks.0.attentions.0", "sd2": "down_blocks.1.attentions.0"}


@pytest.mark.parametrize("style,protocol", [("sd1", "authors"), ("sd2", "authors"),
                                            ("sd1", "shared")])
def test_every_detector_equals_the_pytorch_restatement(style, protocol, tiny_sd1, tiny_sd2,
                                                       tmp_path):
  """The authors' protocol (wen981 on 2 per-prompt noises here, ren_le on 1, jeon
  and asthana on the first shared z) and the shared one (every detector on both
  seeds' z)."""
  p = tmp_path / "p.txt"
  p.write_text("\n".join(CAPTIONS) + "\n")
  m = crosscheck.run(crosscheck.CrossCheckConfig(
      model={"sd1": tiny_sd1, "sd2": tiny_sd2}[style], prompts=str(p),
      workdir=str(tmp_path / "w"), n=6, seeds=(0, 1), detectors=detectors_lib.ONE_STEP,
      ren_layer=REN_LAYER[style], detector_protocol=protocol,
      detector_generations=2 if protocol == "authors" else 0))
  d = m.details
  print(d["verdict"])
  if protocol == "authors":
    assert d["detectors"]["noise"] == {"wen981": ["per_prompt", 2], "jeon": ["shared", 2],
                                       "asthana": ["shared", 2], "ren_le": ["per_prompt", 2]}
  assert d["passed"] and d["detectors"]["passed"], d["verdict"]
  columns = d["detectors"]["columns"]
  assert set(columns) == set(detectors_lib.columns(detectors_lib.ONE_STEP))
  for name, c in columns.items():
    assert c["scale_rel_diff"] <= 1e-4, (name, c)
    assert c["spearman"] > 0.99 or name == "asthana_cos", (name, c)
