"""The whitebox score computed with PyTorch diffusers/transformers (the reference).

Loads a model through diffusers' own `StableDiffusionPipeline` (`from_pretrained`
for a folder, with its variant; `from_single_file` for an original-layout file) and
computes docs/method.md section 2 the reference's way: the CFG
pair [uncond, cond] through the UNet for every prompt, x_in = sqrt(1 - abar[999]) z.
Used by the parity tests, the benchmarks and the cross-check. This is the only
module of the scoring path's neighbours that imports torch, and only when called.
"""
from typing import Dict, Sequence

import numpy as np


class TorchWhitebox:
  """Batched PyTorch reference of the DCS on one model folder."""

  def __init__(self, model_dir: str, dtype: str = "float32", threads: int = 0,
               options=None):
    """model_dir: a diffusers folder, or a single file read by diffusers'
    `from_single_file` with options.model_config as its config folder (the only way
    diffusers reads one without downloading); options: `model_files.ModelOptions`."""
    import torch  # pylint: disable=g-import-not-at-top
    from diffusers import StableDiffusionPipeline  # pylint: disable=g-import-not-at-top
    from memjax.models import model_files  # pylint: disable=g-import-not-at-top
    from memjax.runtime.errors import InputError  # pylint: disable=g-import-not-at-top
    options = options or model_files.ModelOptions()
    if threads:
      torch.set_num_threads(threads)
    self.torch = torch
    self.model_dir = model_dir
    self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if model_files.is_single_file(model_dir):
      if not options.model_config:
        raise InputError(f"{model_dir}: the PyTorch reference reads a single file only with "
                         "--model_config (diffusers' from_single_file needs a config folder "
                         "and memjax downloads nothing)")
      pipe = StableDiffusionPipeline.from_single_file(
          model_dir, config=options.model_config, local_files_only=True,
          extract_ema=options.variant == "ema", safety_checker=None,
          requires_safety_checker=False)
    else:  # a variant where a component has one, else its plain weights
      pipe = StableDiffusionPipeline.from_pretrained(
          model_dir, variant=options.variant, safety_checker=None,
          requires_safety_checker=False, local_files_only=True)
    self.vae = pipe.vae.to(self.dtype).eval()
    self.unet = pipe.unet.to(self.dtype).eval()
    self.text = pipe.text_encoder.to(self.dtype).eval()
    self.tokenizer = pipe.tokenizer
    sched = pipe.scheduler
    self.prediction_type = sched.config.prediction_type
    abar = np.cumprod(1.0 - np.asarray(
        np.linspace(sched.config.beta_start ** 0.5, sched.config.beta_end ** 0.5,
                    sched.config.num_train_timesteps, dtype=np.float64) ** 2
        if sched.config.beta_schedule == "scaled_linear" else
        np.linspace(sched.config.beta_start, sched.config.beta_end,
                    sched.config.num_train_timesteps, dtype=np.float64)))
    self.t = sched.config.num_train_timesteps - 1
    self.abar = float(abar[self.t])
    self.sigma = float(np.sqrt((1 - self.abar) / self.abar))

  def embed(self, prompts: Sequence[str]):
    ids = self.tokenizer(list(prompts), padding="max_length", max_length=77,
                         truncation=True, return_tensors="pt").input_ids
    with self.torch.no_grad():
      return self.text(ids)[0]

  def eps(self, x_in, ctx):
    """UNet eps (v converted) at t = T - 1, float32."""
    torch = self.torch
    with torch.no_grad():
      t = torch.full((x_in.shape[0],), self.t, dtype=torch.long)
      out = self.unet(x_in.to(self.dtype), t, encoder_hidden_states=ctx).sample.float()
    if self.prediction_type == "v_prediction":
      out = self.abar ** 0.5 * out + (1 - self.abar) ** 0.5 * x_in.float()
    return out

  def score(self, prompts: Sequence[str], noise_nchw: np.ndarray,
            guidance_scale: float = 7.5) -> Dict[str, np.ndarray]:
    """DCS per prompt and seed, the reference's CFG-pair way.

    Args:
      noise_nchw: [S, C, H, W] start noise z.
    Returns:
      dict of [B, S] float64: dcs, wen.
    """
    torch = self.torch
    cond = self.embed(prompts)
    uncond = self.embed([""]).expand(len(prompts), -1, -1)
    ctx = torch.cat([uncond, cond])
    dcs, wen = [], []
    for z in noise_nchw:
      x_in = ((1 - self.abar) ** 0.5 * torch.from_numpy(np.asarray(z, np.float32)))
      x_in = x_in[None].expand(2 * len(prompts), -1, -1, -1)
      e_u, e_c = self.eps(x_in, ctx).chunk(2)
      e_cfg = e_u + guidance_scale * (e_c - e_u)
      dcs.append((self.sigma ** 2 * e_cfg.double().pow(2).mean(dim=(1, 2, 3))).numpy())
      wen.append((e_c - e_u).double().flatten(1).norm(dim=1).numpy())
    return {"dcs": np.stack(dcs, 1), "wen": np.stack(wen, 1)}

  def onestep_images(self, prompts: Sequence[str], noise_nchw: np.ndarray,
                     guidance_scale: float = 7.5) -> np.ndarray:
    """The blackbox attack's one-step CFG images, decoded by diffusers' VAE.

    k-diffusion's denoiser at x_T = sigma_max z (the one Heun/Euler step to
    sigma = 0 lands on it), then diffusers' `decode_latents`:
    clip(vae.decode(x0 / scaling_factor) / 2 + 0.5, 0, 1).

    Args:
      noise_nchw: [S, C, H, W] start noise z.
    Returns:
      [B, S, H_img, W_img, 3] float32 in [0, 1].
    """
    torch = self.torch
    cond = self.embed(prompts)
    ctx = torch.cat([self.embed([""]).expand(len(prompts), -1, -1), cond])
    c_in = 1.0 / (self.sigma ** 2 + 1) ** 0.5
    out = []
    for z in noise_nchw:
      x_t = self.sigma * torch.from_numpy(np.array(z, np.float32))[None]
      x_t = x_t.expand(2 * len(prompts), -1, -1, -1)
      e_u, e_c = self.eps(c_in * x_t, ctx).chunk(2)
      e_cfg = e_u + guidance_scale * (e_c - e_u)
      denoised = x_t[:len(prompts)] - self.sigma * e_cfg  # CompVis(V)Denoiser output
      with torch.no_grad():
        x = self.vae.decode((denoised / self.vae.config.scaling_factor).to(self.dtype)).sample
      out.append((x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())
    return np.stack(out, axis=1)
