"""Weight variants of a diffusers folder (`--variant`, diffusers' `variant=`): a
folder of only fp16 files loads with --variant=fp16 and scores what diffusers
scores on it; without the flag the error names the variant files it saw."""
import os
import shutil

import numpy as np
import pytest

from memjax.models import checkpoint
from memjax.models import loading
from memjax.models import model_files
from memjax.runtime.errors import CheckpointError
from memjax.stages import crosscheck

WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
           "text_encoder": "model"}
CAPTIONS = ["a red boat at dawn", "a cat on a sofa", "two dogs in snow", "a blue house",
            "an old map of a city", "a bowl of fruit"]


def _as_variant(folder, name, variant="fp16", shards=1):
  """Replaces a component's weights by their `variant` file(s), stored as float16."""
  stem = WEIGHTS[name]
  plain = os.path.join(folder, name, stem + ".safetensors")
  state = {k: np.asarray(v, np.float16) for k, v in checkpoint.read_safetensors(plain).items()}
  os.remove(plain)
  if shards == 1:
    checkpoint.write_safetensors(os.path.join(folder, name, f"{stem}.{variant}.safetensors"),
                                 state)
    return
  keys, weight_map = sorted(state), {}
  for i in range(shards):
    shard = f"{stem}.{variant}-{i + 1:05d}-of-{shards:05d}.safetensors"
    part = {k: state[k] for k in keys[i::shards]}
    checkpoint.write_safetensors(os.path.join(folder, name, shard), part)
    weight_map.update({k: shard for k in part})
  with open(os.path.join(folder, name, f"{stem}.safetensors.index.{variant}.json"), "w") as f:
    f.write('{"metadata": {}, "weight_map": %s}' % str(weight_map).replace("'", '"'))


@pytest.fixture
def fp16_only(tiny_sd1, tmp_path):
  folder = str(tmp_path / "fp16")
  shutil.copytree(tiny_sd1, folder)
  for name in WEIGHTS:
    _as_variant(folder, name)
  return folder


def _prompts(tmp_path):
  p = tmp_path / "p.txt"
  p.write_text("\n".join(CAPTIONS) + "\n")
  return str(p)


def test_fp16_only_folder_names_its_variant_files(fp16_only):
  with pytest.raises(CheckpointError) as e:
    loading.load_stable_diffusion(fp16_only)
  msg = str(e.value)
  assert "\n" not in msg
  assert os.path.join(fp16_only, "unet") in msg
  assert "diffusion_pytorch_model.fp16.safetensors" in msg and "--variant=fp16" in msg


def test_fp16_variant_scores_equal_diffusers(fp16_only, tmp_path):
  m = crosscheck.run(crosscheck.CrossCheckConfig(
      model=fp16_only, prompts=_prompts(tmp_path), workdir=str(tmp_path / "w"), n=6,
      variant="fp16"))
  print(m.details["verdict"])
  assert m.details["passed"] and m.details["max_rel_diff"] <= 1e-5
  sd = loading.load_stable_diffusion(fp16_only, options=model_files.ModelOptions("fp16"))
  # float16 weights, float32 params: the same values as the fp16 file holds
  want = checkpoint.read_safetensors(
      os.path.join(fp16_only, "unet", "diffusion_pytorch_model.fp16.safetensors"))
  np.testing.assert_array_equal(sd.params["unet"]["conv_in"]["bias"],
                                want["conv_in.bias"].astype(np.float32))


def test_a_component_without_the_variant_takes_its_plain_weights(tiny_sd1, tmp_path):
  """As diffusers' pipelines do: a mixture, with a warning."""
  folder = str(tmp_path / "mixed")
  shutil.copytree(tiny_sd1, folder)
  _as_variant(folder, "unet", shards=2)  # sharded: index.fp16.json, fp16-0000k shards
  m = crosscheck.run(crosscheck.CrossCheckConfig(
      model=folder, prompts=_prompts(tmp_path), workdir=str(tmp_path / "w"), n=6,
      variant="fp16"))
  assert m.details["passed"] and m.details["max_rel_diff"] <= 1e-5
  files, of_variant = checkpoint.find_weight_files(os.path.join(folder, "text_encoder"), "fp16")
  assert not of_variant and files[0].endswith("model.safetensors")
  files, of_variant = checkpoint.find_weight_files(os.path.join(folder, "unet"), "fp16")
  assert of_variant and len(files) == 2


def test_a_variant_no_component_has_is_refused(tiny_sd1):
  with pytest.raises(CheckpointError, match=r"--variant=ema, but no component folder holds "
                     r"ema weights"):
    loading.load_stable_diffusion(tiny_sd1, options=model_files.ModelOptions("ema"))


def test_variants_listed_in_a_folder(tmp_path):
  names = ["diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.ema.bin",
           "diffusion_pytorch_model.safetensors.index.non_ema.json",
           "diffusion_pytorch_model.safetensors.index.json", "config.json",
           "diffusion_pytorch_model-00001-of-00002.safetensors"]
  for n in names:
    (tmp_path / n).write_text("")
  assert checkpoint.variants_in(str(tmp_path)) == {
      "ema": ["diffusion_pytorch_model.ema.bin"],
      "fp16": ["diffusion_pytorch_model.fp16.safetensors"],
      "non_ema": ["diffusion_pytorch_model.safetensors.index.non_ema.json"]}
