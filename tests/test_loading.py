"""A diffusers folder written by memjax loads in memjax and in PyTorch diffusers,
and both compute the same functions (issue: Flax Stable Diffusion, acceptance 1),
and a broken folder fails with one message naming the file and the key."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.runtime.errors import CheckpointError, ConfigError
from memjax.models import checkpoint
from memjax.models import loading

TOL = 1e-4


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def folder(request, tiny_sd1, tiny_sd2):
  return {"sd1": tiny_sd1, "sd2": tiny_sd2}[request.param]


def test_parity_with_diffusers_on_the_folder(folder):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextModel, CLIPTokenizer  # pylint: disable=g-import-not-at-top
  sd = loading.load_stable_diffusion(folder)
  rng = np.random.default_rng(0)
  report = {}
  # Text encoder, through both tokenizers.
  prompts = ["a photograph of an astronaut riding a horse", ""]
  ids = sd.tokenizer.encode_batch(prompts)["input_ids"]
  ref_tok = CLIPTokenizer.from_pretrained(f"{folder}/tokenizer")
  ref_ids = ref_tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids
  np.testing.assert_array_equal(ids, np.array(ref_ids))
  text = CLIPTextModel.from_pretrained(f"{folder}/text_encoder").eval()
  with torch.no_grad():
    ref_ctx = text(torch.from_numpy(ids.astype(np.int64)))[0].numpy()
  ctx = sd.text_embed(sd.params["text_encoder"], jnp.asarray(ids))
  np.testing.assert_array_equal(ctx, sd.text_encoder.apply(
      {"params": sd.params["text_encoder"]}, jnp.asarray(ids)))
  report["text_encoder"] = _rel(ctx, ref_ctx)
  # UNet at t = 999 and t = 500.
  unet = UNet2DConditionModel.from_pretrained(f"{folder}/unet").eval()
  c, h, w = sd.latent_shape_chw
  x = rng.standard_normal((2, c, h, w)).astype(np.float32)
  for t in (999, 500):
    with torch.no_grad():
      ref = unet(torch.from_numpy(x), t, encoder_hidden_states=torch.from_numpy(ref_ctx)).sample
    out = sd.unet_out(sd.params["unet"], jnp.asarray(x.transpose(0, 2, 3, 1)),
                      jnp.full((2,), t), jnp.asarray(ref_ctx))
    report[f"unet_t{t}"] = _rel(np.asarray(out).transpose(0, 3, 1, 2), ref.numpy())
  # VAE decode and encode.
  vae = AutoencoderKL.from_pretrained(f"{folder}/vae").eval()
  with torch.no_grad():
    img = vae.decode(torch.from_numpy(x)).sample
    post = vae.encode(img).latent_dist
  dec = sd.vae_decode(sd.params["vae"], jnp.asarray(x.transpose(0, 2, 3, 1)))
  report["vae_decode"] = _rel(np.asarray(dec).transpose(0, 3, 1, 2), img.numpy())
  mean, logvar = sd.vae.apply({"params": sd.params["vae"]},
                              jnp.asarray(img.numpy().transpose(0, 2, 3, 1)),
                              method=type(sd.vae).encode)
  report["vae_encode_mean"] = _rel(np.asarray(mean).transpose(0, 3, 1, 2), post.mean.numpy())
  report["vae_encode_logvar"] = _rel(np.asarray(logvar).transpose(0, 3, 1, 2), post.logvar.numpy())
  print(os.path.basename(folder), json.dumps({k: f"{v:.2e}" for k, v in report.items()}))
  assert all(v <= TOL for v in report.values()), report


def test_scheduler_config_and_schedule(folder, tmp_path):
  with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
    want = json.load(f)
  assert loading.read_scheduler_config(folder) == want
  sd = loading.load_stable_diffusion(folder, components=("text_encoder",))
  assert sd.scheduler_config == want and sd.attention is None
  assert sd.schedule.prediction_type == want["prediction_type"]
  assert sd.schedule.num_train_timesteps == want["num_train_timesteps"] == 1000
  assert sd.schedule.last_timestep == 999
  assert sd.unet is None and sd.vae is None and "unet" in sd.configs  # config read, not built
  d = _copy(folder, tmp_path)
  os.remove(os.path.join(d, "scheduler", "scheduler_config.json"))
  with pytest.raises(ConfigError, match="scheduler_config.json: missing"):
    loading.read_scheduler_config(d)
  with pytest.raises(ConfigError, match="scheduler_config.json: missing"):
    loading.load_stable_diffusion(d, components=("text_encoder",))


def test_folder_generates_with_diffusers_pipeline(tiny_sd1):
  from diffusers import StableDiffusionPipeline  # pylint: disable=g-import-not-at-top
  pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
  out = pipe("a red bicycle", num_inference_steps=2, output_type="np").images
  assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_bfloat16_params(tiny_sd1):
  sd = loading.load_stable_diffusion(tiny_sd1, "bfloat16", components=("unet",))
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(sd.params["unet"]))
  assert sd.vae is None and sd.text_encoder is None


def _copy(src, tmp_path):
  dst = str(tmp_path / "model")
  shutil.copytree(src, dst)
  return dst


def _edit_weights(path, fn):
  state = {k: np.array(v) for k, v in checkpoint.read_safetensors(path).items()}
  fn(state)
  checkpoint.write_safetensors(path, state)


def test_missing_component(tiny_sd1, tmp_path):
  d = _copy(tiny_sd1, tmp_path)
  shutil.rmtree(os.path.join(d, "vae"))
  with pytest.raises(ConfigError, match=r"model/vae.*missing component folder 'vae'"):
    loading.load_stable_diffusion(d)


def test_missing_weight(tiny_sd1, tmp_path):
  d = _copy(tiny_sd1, tmp_path)
  path = os.path.join(d, "unet", "diffusion_pytorch_model.safetensors")
  _edit_weights(path, lambda s: s.pop("conv_in.weight"))
  with pytest.raises(CheckpointError) as e:
    loading.load_stable_diffusion(d, components=("unet",))
  msg = str(e.value)
  assert path in msg and "missing weight" in msg and "conv_in.weight" in msg


def test_extra_weight(tiny_sd1, tmp_path):
  d = _copy(tiny_sd1, tmp_path)
  path = os.path.join(d, "vae", "diffusion_pytorch_model.safetensors")
  _edit_weights(path, lambda s: s.update({"decoder.extra_layer.weight": np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError, match=r"vae/diffusion_pytorch_model.safetensors: "
                     r"unexpected weight 'decoder.extra_layer.weight'"):
    loading.load_stable_diffusion(d, components=("vae",))


def test_shape_not_matching_config(tiny_sd1, tmp_path):
  d = _copy(tiny_sd1, tmp_path)
  cfg_path = os.path.join(d, "unet", "config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg["cross_attention_dim"] = 48  # the weights were written for 32
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(CheckpointError) as e:
    loading.load_stable_diffusion(d, components=("unet",))
  assert "unet/diffusion_pytorch_model.safetensors: weight '" in str(e.value)
  assert "attn2.to_k.weight' has shape (32, 32)" in str(e.value)


def test_unknown_block_type(tiny_sd1, tmp_path):
  d = _copy(tiny_sd1, tmp_path)
  cfg_path = os.path.join(d, "unet", "config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg["down_block_types"][0] = "SimpleCrossAttnDownBlock2D"
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ConfigError) as e:
    loading.load_stable_diffusion(d, components=("unet",))
  assert cfg_path in str(e.value) and "down_block_types" in str(e.value)


def test_missing_model_index(tmp_path):
  with pytest.raises(ConfigError, match="model_index.json: missing"):
    os.makedirs(tmp_path / "m")
    loading.load_stable_diffusion(str(tmp_path / "m"))


def test_bin_weights_load_like_safetensors(tiny_sd1, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  d = _copy(tiny_sd1, tmp_path)
  st = os.path.join(d, "unet", "diffusion_pytorch_model.safetensors")
  state = {k: torch.from_numpy(np.array(v)) for k, v in checkpoint.read_safetensors(st).items()}
  torch.save(state, os.path.join(d, "unet", "diffusion_pytorch_model.bin"))
  os.remove(st)
  a = loading.load_stable_diffusion(d, components=("unet",)).params["unet"]
  b = loading.load_stable_diffusion(tiny_sd1, components=("unet",)).params["unet"]
  jax.tree.map(np.testing.assert_array_equal, a, b)
