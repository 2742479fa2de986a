"""Single-file checkpoints in the original latent-diffusion layout load through the
same path as diffusers folders and score what diffusers scores.

Tiny folders that follow Stable Diffusion's rules (`tiny` styles sd1_file and
sd2_file) are written as LDM files (`memjax.testing.ldm_file`, proven against
diffusers' `from_single_file` in test_ldm_layout.py). Here memjax reads those files:
with the architecture read off the weights, its params equal the folder's exactly;
with --model_config, its scores equal diffusers' `from_single_file` (the
cross-check); and what the file cannot tell is asked for by name.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from memjax.models import checkpoint
from memjax.models import ldm_layout
from memjax.models import loading
from memjax.models import model_files
from memjax.runtime import shards
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import CheckpointError, ConfigError, InputError
from memjax.stages import crosscheck
from memjax.stages import scan
from memjax.testing import ldm_file
from memjax.testing import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a red boat at dawn", "a cat on a sofa", "two dogs in snow", "a blue house",
            "an old map of a city", "a bowl of fruit"]
# The tiny folders: 16 x 16 latents under a VAE of 2 levels (factor 2), so the
# files' image side is 32 px.
IMAGE_SIZE = 32
SD2 = model_files.ModelOptions(prediction_type="v_prediction", image_size=IMAGE_SIZE)
SD1 = model_files.ModelOptions(image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("single_file")
  return {f: tiny.build_tiny_model(str(root / f), f"{f}_file", seed=20 + i, num_merges=1000)
          for i, f in enumerate(("sd1", "sd2"))}


@pytest.fixture(scope="module")
def files(folders, tmp_path_factory):
  """{family: the folder as an LDM .safetensors file with an EMA copy}."""
  root = tmp_path_factory.mktemp("ldm")
  return {f: ldm_file.write_ldm_file(folders[f], str(root / f"{f}.safetensors"), f, ema=True)
          for f in folders}


def _options(family, **changes):
  base = SD2 if family == "sd2" else SD1
  return model_files.ModelOptions(**dict(vars(base), **changes))


def _prompts(tmp_path):
  p = tmp_path / "p.txt"
  p.write_text("\n".join(CAPTIONS) + "\n")
  return str(p)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_inferred_architecture_loads_the_folders_params(family, folders, files):
  """No --model_config: configs, tokenizer and schedule from the weights and
  Stable Diffusion's rules, params identical to the folder's."""
  mine = loading.load_stable_diffusion(files[family], options=_options(family))
  ref = loading.load_stable_diffusion(folders[family])
  for name in loading.COMPONENTS:
    a, b = jax.tree.leaves_with_path(mine.params[name]), jax.tree.leaves_with_path(
        ref.params[name])
    assert [p for p, _ in a] == [p for p, _ in b], name
    for (path, x), (_, y) in zip(a, b):
      np.testing.assert_array_equal(x, y, err_msg=f"{name} {path}")
  assert mine.latent_shape_chw == ref.latent_shape_chw == (4, 16, 16)
  assert mine.schedule.prediction_type == ref.schedule.prediction_type
  np.testing.assert_allclose(mine.schedule.alphas_cumprod, ref.schedule.alphas_cumprod,
                             rtol=1e-12)
  assert mine.vae_scaling_factor == ref.vae_scaling_factor
  ids = lambda sd: sd.tokenizer.encode_batch(CAPTIONS + ["!!! <|endoftext|>"])["input_ids"]
  np.testing.assert_array_equal(ids(mine), ids(ref))  # SD2 pads with "!", SD1 with EOS


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_scores_equal_diffusers_from_single_file(family, folders, files, tmp_path):
  """memjax on the file (configs from --model_config) against diffusers'
  from_single_file(config=folder) on the same file and noise."""
  m = crosscheck.run(crosscheck.CrossCheckConfig(
      model=files[family], model_config=folders[family], prompts=_prompts(tmp_path),
      workdir=str(tmp_path / "w"), n=6))
  print(m.details["verdict"])
  assert m.details["passed"] and m.details["max_rel_diff"] <= 1e-5


def test_ema_weights_by_variant(folders, files, tmp_path):
  m = crosscheck.run(crosscheck.CrossCheckConfig(
      model=files["sd1"], model_config=folders["sd1"], variant="ema",
      prompts=_prompts(tmp_path), workdir=str(tmp_path / "w"), n=6))
  assert m.details["passed"] and m.details["max_rel_diff"] <= 1e-5
  ema = loading.load_stable_diffusion(files["sd1"], components=("unet",),
                                      options=_options("sd1", variant="ema"))
  plain = loading.load_stable_diffusion(files["sd1"], components=("unet",),
                                        options=_options("sd1"))
  a, b = (sd.params["unet"]["conv_in"]["kernel"] for sd in (ema, plain))
  assert not np.array_equal(a, b)


def _scan_scores(model, workdir, prompts, options=model_files.ModelOptions()):
  scan.run(scan.ScanConfig(model=model, prompts=prompts, workdir=workdir, seeds=(0, 1),
                           log_interval_s=3600, **vars(options)))
  table = shards.open_shards(workdir_lib.stage_dir(workdir, "scan")).to_table()
  return np.array(table.sort_by("prompt_id")["scores"].to_pylist())


def test_ckpt_scans_like_the_folder(folders, tmp_path):
  """A .ckpt (through torch) in float16, as many community files are."""
  path = ldm_file.write_ldm_file(folders["sd2"], str(tmp_path / "sd2.ckpt"), "sd2",
                                 dtype=np.float16)
  prompts = _prompts(tmp_path)
  mine = _scan_scores(path, str(tmp_path / "file"), prompts, SD2)
  folder = str(tmp_path / "fp16_folder")  # the folder with the same float16 weights
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(folders["sd2"], folder)
  for name, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                     ("text_encoder", "model")):
    p = os.path.join(folder, name, stem + ".safetensors")
    state = {k: np.asarray(v, np.float16).astype(np.float32)
             for k, v in checkpoint.read_safetensors(p).items()}
    checkpoint.write_safetensors(p, state)
  ref = _scan_scores(folder, str(tmp_path / "folder"), prompts)
  np.testing.assert_allclose(mine, ref, rtol=1e-6)


def test_what_the_file_cannot_tell_is_asked_for(folders, files):
  with pytest.raises(ConfigError, match=r"an SD2 checkpoint.*--prediction_type"):
    loading.load_stable_diffusion(files["sd2"], components=())
  with pytest.raises(ConfigError, match=r"--model_config.*already says"):
    loading.load_stable_diffusion(files["sd1"], components=(), options=model_files.ModelOptions(
        model_config=folders["sd1"], prediction_type="epsilon"))
  with pytest.raises(ConfigError, match=r"only --variant=ema"):
    loading.load_stable_diffusion(files["sd1"], components=(),
                                  options=model_files.ModelOptions(variant="fp16"))
  with pytest.raises(ConfigError, match=r"describes a single-file checkpoint"):
    loading.load_stable_diffusion(folders["sd1"], components=(),
                                  options=model_files.ModelOptions(image_size=512))
  with pytest.raises(ConfigError, match=r"not a multiple of the VAE"):
    loading.load_stable_diffusion(files["sd1"], components=(),
                                  options=model_files.ModelOptions(image_size=33))


def test_default_image_size_is_the_familys(files):
  sd = loading.load_stable_diffusion(files["sd1"], components=())
  assert sd.latent_shape_chw == (4, 256, 256)  # 512 px over the tiny VAE's factor 2
  sd = loading.load_stable_diffusion(files["sd2"], components=(), options=model_files.ModelOptions(
      prediction_type="v_prediction"))
  assert sd.latent_shape_chw == (4, 384, 384)  # SD2's v models: 768 px


def test_a_schedule_the_file_was_not_trained_with_is_refused(folders, tmp_path):
  state = ldm_file.ldm_state(folders["sd1"], "sd1")
  state["alphas_cumprod"] = (state["alphas_cumprod"] * 0.99).astype(np.float32)
  path = str(tmp_path / "other_schedule.safetensors")
  checkpoint.write_safetensors(path, state)
  with pytest.raises(ConfigError, match=r"its alphas_cumprod .* differ"):
    loading.load_stable_diffusion(path, components=())


def test_a_file_without_a_vae(folders, tmp_path):
  state = {k: v for k, v in ldm_file.ldm_state(folders["sd1"], "sd1").items()
           if not k.startswith(ldm_layout.VAE_PREFIX)}
  path = str(tmp_path / "no_vae.safetensors")
  checkpoint.write_safetensors(path, state)
  sd = loading.load_stable_diffusion(path, components=("unet", "text_encoder"), options=SD1)
  assert sd.vae is None
  with pytest.raises(CheckpointError, match=r"holds no vae \(no first_stage_model\.\* weights\)"):
    loading.load_stable_diffusion(path, options=SD1)


def test_scan_command_on_a_file_and_its_resume(files, tmp_path):
  """The command line: flags reach the loader; the run config records them and the
  file's content identity; a resume with another prediction type is refused."""
  prompts = _prompts(tmp_path)
  work = str(tmp_path / "w")

  def run(*flags, workdir=work):
    return subprocess.run(
        [sys.executable, "-m", "memjax.scan", f"--model={files['sd2']}", f"--prompts={prompts}",
         f"--workdir={workdir}", f"--image_size={IMAGE_SIZE}", *flags], cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300,
        check=False)
  out = run("--prediction_type=v_prediction")
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(work, "scan", workdir_lib.RUN_CONFIG)) as f:
    config = json.load(f)
  assert config["prediction_type"] == "v_prediction" and config["image_size"] == IMAGE_SIZE
  assert config["model_identity"].startswith("sha256:")
  out = run("--prediction_type=epsilon")
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert 'prediction_type: "v_prediction" -> "epsilon"' in out.stderr
  out = run(workdir=str(tmp_path / "w2"))  # SD2 without --prediction_type: one line
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert "--prediction_type" in [l for l in out.stderr.splitlines() if l.startswith("error:")][0]


def test_crosscheck_of_a_file_needs_its_config_folder(files, tmp_path):
  with pytest.raises(InputError, match=r"--model_config"):
    crosscheck.run(crosscheck.CrossCheckConfig(
        model=files["sd1"], prompts=_prompts(tmp_path), workdir=str(tmp_path / "w"), n=2,
        image_size=IMAGE_SIZE))


def test_scale_factor_of_the_file_against_the_config_folder(folders, tmp_path):
  path = ldm_file.write_ldm_file(folders["sd1"], str(tmp_path / "scaled.safetensors"), "sd1",
                                 scale_factor=0.13025)
  sd = loading.load_stable_diffusion(path, components=(), options=SD1)
  assert sd.vae_scaling_factor == pytest.approx(0.13025)  # read off the file
  with pytest.raises(ConfigError, match=r"scale_factor 0.13025 differs"):
    loading.load_stable_diffusion(path, components=(), options=model_files.ModelOptions(
        model_config=folders["sd1"]))
