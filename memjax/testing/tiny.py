"""Tiny random Stable Diffusion folders, for tests, benchmarks and later training.

`build_tiny_model(out_dir, style)` writes a complete diffusers-layout folder
(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) with
random weights drawn by memjax itself, so tests never download anything and load
it through the same code path as real weights. The folder also loads in PyTorch
`diffusers.StableDiffusionPipeline.from_pretrained`.

Styles:
- "sd1": eps-prediction, 1 x 1 conv projections, quick_gelu text encoder,
  attention_head_dim = number of heads (SD1's meaning).
- "sd2": v-prediction, linear projections, upcast attention, gelu text encoder,
  a wider (1024-style, scaled down) context, head counts per block.
- "micro": the smallest valid model (8 x 8 latents; I/O and memory benchmarks).
- "medium": SD1-like, about 17M UNet params at 32 x 32 latents (benchmarks).
- "sd15": the full SD1.5 architecture (859M UNet params; slow tests, benchmarks).
- "sd1_file", "sd2_file": like "sd1" / "sd2", but follow Stable Diffusion's rules
  for what a single file cannot tell (32 norm groups, 8 heads SD1 / 64 channels
  per head SD2, text heads of 64 channels), so the single-file loader can infer
  them (`memjax.testing.ldm_file` writes them as LDM files).
"""
import copy
import os
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from memjax.data import tokenizer as tokenizer_lib
from memjax.models import convert
from memjax.models import loading
from memjax.models import saving

_SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
    "prediction_type": "epsilon", "trained_betas": None}
# SD2's styles: a v-prediction DDIM scheduler, and a tokenizer padding with "!".
_SD2_STYLES = ("sd2", "sd2_file")


def _unet(blocks, heads, cross_dim, sample_size, groups, linear=False, upcast=False,
          layers=1, attn_blocks=None):
  n = len(blocks)
  attn_blocks = attn_blocks if attn_blocks is not None else [i < n - 1 for i in range(n)]
  return {
      "_class_name": "UNet2DConditionModel", "_diffusers_version": saving.DIFFUSERS_VERSION,
      "sample_size": sample_size, "in_channels": 4, "out_channels": 4,
      "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_blocks],
      "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn_blocks[::-1]],
      "mid_block_type": "UNetMidBlock2DCrossAttn",
      "block_out_channels": list(blocks), "layers_per_block": layers,
      "attention_head_dim": heads, "cross_attention_dim": cross_dim,
      "norm_num_groups": groups, "norm_eps": 1e-5, "act_fn": "silu",
      "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True,
      "freq_shift": 0, "mid_block_scale_factor": 1, "use_linear_projection": linear,
      "upcast_attention": upcast}


def _vae(blocks, groups, sample_size):
  return {
      "_class_name": "AutoencoderKL", "_diffusers_version": saving.DIFFUSERS_VERSION,
      "in_channels": 3, "out_channels": 3, "latent_channels": 4,
      "down_block_types": ["DownEncoderBlock2D"] * len(blocks),
      "up_block_types": ["UpDecoderBlock2D"] * len(blocks),
      "block_out_channels": list(blocks), "layers_per_block": 1, "act_fn": "silu",
      "norm_num_groups": groups, "sample_size": sample_size, "scaling_factor": 0.18215}


def _text(vocab, hidden, layers, heads, act):
  return {
      "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
      "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 4 * hidden,
      "num_hidden_layers": layers, "num_attention_heads": heads,
      "max_position_embeddings": 77, "hidden_act": act, "layer_norm_eps": 1e-5,
      "projection_dim": hidden, "bos_token_id": vocab - 2, "eos_token_id": vocab - 1,
      "pad_token_id": 1, "torch_dtype": "float32"}


def tiny_configs(style: str = "sd1", vocab_size: int = 49408) -> Dict[str, dict]:
  """Component configs (unet, vae, text_encoder, scheduler) of a named style."""
  scheduler = copy.deepcopy(_SD1_SCHEDULER)
  if style == "sd1":
    unet = _unet((32, 64), 8, 32, 16, 8)
    vae, text = _vae((32, 64), 8, 32), _text(vocab_size, 32, 2, 4, "quick_gelu")
  elif style == "sd2":
    unet = _unet((32, 64, 64), [2, 4, 4], 64, 16, 8, linear=True, upcast=True)
    vae, text = _vae((32, 64), 8, 32), _text(vocab_size, 64, 3, 4, "gelu")
  elif style == "micro":  # the smallest valid model: I/O and memory benchmarks
    unet = _unet((32,), 4, 32, 8, 8, attn_blocks=[True])
    vae, text = _vae((32,), 8, 8), _text(vocab_size, 32, 1, 2, "quick_gelu")
  elif style == "medium":
    unet = _unet((64, 128, 256), 8, 256, 32, 32, layers=2)
    vae, text = _vae((32, 64, 64, 64), 16, 256), _text(vocab_size, 256, 4, 4, "quick_gelu")
  elif style == "sd15":
    unet = _unet((320, 640, 1280, 1280), 8, 768, 64, 32, layers=2,
                 attn_blocks=[True, True, True, False])
    vae, text = _vae((128, 256, 512, 512), 32, 512), _text(vocab_size, 768, 12, 12, "quick_gelu")
    vae["layers_per_block"] = 2
  elif style in ("sd1_file", "sd2_file"):  # SD's rules: the shapes tell the rest
    sd1 = style == "sd1_file"
    unet = _unet((32, 64) if sd1 else (64, 128), 8 if sd1 else [1, 2], 64, 16, 32,
                 linear=not sd1, attn_blocks=[True, False])
    vae, text = _vae((32, 64), 32, 32), _text(vocab_size, 64, 2, 1,
                                              "quick_gelu" if sd1 else "gelu")
  else:
    raise ValueError(f"unknown style {style!r} (sd1, sd2, micro, medium, sd15, sd1_file, "
                     f"sd2_file)")
  if style in _SD2_STYLES:
    scheduler.update({"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"})
  return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler}


def random_params(name: str, config: dict, seed: int = 0):
  """Random params of one component, drawn with numpy from the abstract shapes
  (no Flax init to compile): kernels LeCun-normal, embeddings N(0, 0.02), and
  every bias and norm scale perturbed so that a swapped or dropped weight changes
  the output."""
  module = loading.build_module(name, config, f"<{name}>")
  flat = convert.flatten(loading.abstract_params(name, module, config))
  rng = np.random.default_rng(seed)
  out = {}
  for path in sorted(flat):
    shape = tuple(flat[path].shape)
    if path[-1] == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    elif path[-1] == "embedding":
      value = 0.02 * rng.standard_normal(shape)
    elif path[-1] == "scale":
      value = 1 + 0.05 * rng.standard_normal(shape)
    else:
      value = 0.05 * rng.standard_normal(shape)
    out[path] = value.astype(np.float32)
  return convert.unflatten(out)


def build_tiny_model(out_dir: str, style: str = "sd1", seed: int = 0,
                     num_merges: Optional[int] = None) -> str:
  """Writes a random model folder of `style` to out_dir; returns out_dir.

  Args:
    num_merges: BPE merges kept in the tokenizer (None = CLIP's full 49408 vocab);
      the text encoder's vocabulary matches it.
  """
  pad = "!" if style in _SD2_STYLES else "<|endoftext|>"
  vocab = tokenizer_lib.write_tokenizer_folder(os.path.join(out_dir, "tokenizer"),
                                               num_merges=num_merges, pad_token=pad)
  configs = tiny_configs(style, vocab)
  scheduler = configs.pop("scheduler")
  params = {name: random_params(name, cfg, seed + i) for i, (name, cfg) in enumerate(configs.items())}
  saving.save_stable_diffusion(out_dir, configs, params, scheduler)
  return out_dir


def random_model(style: str = "sd15", dtype: str = "float32", attention: Optional[str] = None,
                 components=loading.COMPONENTS, seed: int = 0) -> loading.StableDiffusion:
  """A random model of `style` in memory, as `loading.load_stable_diffusion` returns
  one (no folder written: SD1.5 size in seconds, for benchmarks on accelerators)."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from memjax.method.schedule import Schedule  # pylint: disable=g-import-not-at-top
  configs = tiny_configs(style)
  scheduler = configs.pop("scheduler")
  np_dtype = loading._NP_DTYPES[dtype]  # pylint: disable=protected-access
  compute = jnp.float32 if dtype == "float32" else jnp.bfloat16
  modules = {n: loading.build_module(n, configs[n], f"<{n}>", compute, attention)
             for n in components}
  params = {n: jax.tree.map(lambda a: np.asarray(a, np_dtype),
                            random_params(n, configs[n], seed + i))
            for i, n in enumerate(components)}
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer_lib.write_tokenizer_folder(tmp)
    tokenizer = tokenizer_lib.CLIPTokenizer.from_folder(tmp)
  return loading.StableDiffusion(
      model_dir=f"<random {style}>", unet=modules.get("unet"), vae=modules.get("vae"),
      text_encoder=modules.get("text_encoder"), tokenizer=tokenizer,
      schedule=Schedule.from_config(scheduler), scheduler_config=scheduler, params=params,
      configs=configs, dtype=dtype, attention=attention)


def main():
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description="Write a tiny random SD folder.")
  p.add_argument("out_dir")
  p.add_argument("--style", default="sd1")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--num_merges", type=int, default=None)
  a = p.parse_args()
  print(build_tiny_model(a.out_dir, a.style, a.seed, a.num_merges))


if __name__ == "__main__":
  main()
