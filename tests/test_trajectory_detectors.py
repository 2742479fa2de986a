"""The generate stage's trajectory detectors (wen_steps, bright_ending) against the
PyTorch reference (memjax.testing.torch_detectors) on tiny SD1 (eps) and SD2
(v-prediction) folders, on the same z and prompts, at 5 DDIM steps both sides."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import parse_command
from memjax import generate as generate_cmd
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError
from memjax.stages import generate

STEPS, WEN = 5, 3
# A prompt longer than 77 tokens: the EOS index is capped at 76.
CAPTIONS = ["a cat", "a photo of a dog on the beach at sunset", "",
            " ".join(["a red house by the sea"] * 20)]


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b) / np.abs(b)))


def _run(model, tmp_path, name, noise_path, **kw):
  prompts = str(tmp_path / "p.parquet")
  pq.write_table(pa.table({"caption": CAPTIONS}), prompts)
  base = dict(model=model, prompts=prompts, workdir=str(tmp_path / name), sampler="ddim",
              steps=STEPS, noise=noise_path, batch_size=2, shard_size=3, devices=2)
  base.update(kw)
  manifest = generate.run(generate.GenerateConfig(**base))
  table = pq.read_table(workdir_lib.path(str(tmp_path / name), generate.STAGE,
                                         workdir_lib.GENERATED_TABLE))
  return manifest, table


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_parity_with_torch_reference(style, tiny_sd1, tiny_sd2, tmp_path, monkeypatch):
  torch = pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  from memjax.testing import torch_detectors as td  # pylint: disable=g-import-not-at-top
  model = {"sd1": tiny_sd1, "sd2": tiny_sd2}[style]
  monkeypatch.setattr(td, "NUM_STEPS", STEPS)  # the reference's DDIM at 5 steps
  torch.manual_seed(0)
  ref_det = td.TorchDetectors(model, threads=1)
  size = ref_det.unet.config.sample_size
  z = np.random.default_rng(7).standard_normal((2, 4, size, size)).astype(np.float32)
  np.save(tmp_path / "z.npy", z)
  manifest, table = _run(model, tmp_path, "g", str(tmp_path / "z.npy"),
                         detectors=["bright_ending", "wen_steps"], wen_steps=WEN)
  assert table.column_names[:9] == ["prompt_id", "caption", "seed", "sampler", "steps",
                                    "image_path", "status", "wen_steps", "bright_ending"]
  assert manifest.identity["detectors"] == ["wen_steps", "bright_ending"]
  assert manifest.identity["wen_steps"] == WEN and manifest.details["wen_steps"] == WEN
  assert manifest.runtime["compiles"] == 1
  rows = table.to_pylist()
  assert all(r["wen_steps"] is None and r["bright_ending"] is None
             for r in rows if r["caption"] == "")  # no image, no score
  valid = [c for c in CAPTIONS if c]
  ref = ref_det.trajectory(valid, z, n_steps=STEPS, guidance_scale=7.5, be=True)
  ref_wen = ref["wen_steps"][..., :WEN].mean(-1)  # [B, S]
  ref_be = ref["be_steps"].mean(-1)
  ours = {k: np.array([[r[k] for r in rows if r["caption"] == c] for c in valid])
          for k in ("wen_steps", "bright_ending")}
  assert _rel(ours["wen_steps"], ref_wen) <= 1e-4, (ours["wen_steps"], ref_wen)
  assert _rel(ours["bright_ending"], ref_be) <= 1e-4, (ours["bright_ending"], ref_be)
  assert not np.allclose(ref_be, ref["be_steps"][..., :WEN].mean(-1))  # BE's steps: all 5
  # The long caption's mask is read at token 76 (its EOS), not at a padding token.
  assert len(ref_det.tokenizer.encode(CAPTIONS[-1])) > 77

  # Without detectors: no detector column, no identity key, the same images.
  m0, plain = _run(model, tmp_path, "g0", str(tmp_path / "z.npy"))
  assert "detectors" not in m0.identity and "wen_steps" not in m0.identity
  assert "detectors" not in m0.details
  assert plain.column_names == [c for c in table.column_names
                                if c not in ("wen_steps", "bright_ending")]
  assert plain.drop_columns(["sampler"]).equals(
      table.drop_columns(["wen_steps", "bright_ending", "sampler"]))
  for r in rows:
    if r["image_path"]:
      a = (tmp_path / "g" / "generate" / r["image_path"]).read_bytes()
      assert a == (tmp_path / "g0" / "generate" / r["image_path"]).read_bytes()
  # Another detector set is another run: refused without --overwrite.
  with pytest.raises(InputError, match="detectors"):
    _run(model, tmp_path, "g", str(tmp_path / "z.npy"), detectors=["wen_steps"],
         wen_steps=WEN)


def test_flags_and_bad_settings(tmp_path):
  cfg = parse_command(generate_cmd, [
      "--model=m", "--prompts=p", "--workdir=w", "--sampler=ddim", "--steps=10",
      "--detectors=bright_ending,wen_steps", "--wen_steps=4"])
  assert cfg.detectors == ["wen_steps", "bright_ending"] and cfg.wen_steps == 4
  base = dict(model="m", prompts="p", workdir=str(tmp_path), steps=10)
  assert generate.GenerateConfig(**base).detectors == []  # default: none
  assert generate.GenerateConfig(**base, sampler="ddim", detectors=["all"],
                                 wen_steps=10).detectors == [
      "wen_steps", "bright_ending"]
  with pytest.raises(InputError, match=r"use --sampler=ddim \(got --sampler=heun\)"):
    generate.GenerateConfig(**base, detectors=["wen_steps"])
  with pytest.raises(InputError, match="unknown wen981"):
    generate.GenerateConfig(**base, sampler="ddim", detectors=["wen981"])
  with pytest.raises(InputError, match="--wen_steps=50: more than the --steps=10"):
    generate.GenerateConfig(**base, sampler="ddim", detectors=["wen_steps"])
  with pytest.raises(InputError, match="--wen_steps must be >= 1"):
    generate.GenerateConfig(**base, sampler="ddim", detectors=["wen_steps"], wen_steps=0)
