"""One-step CFG samples decoded by the VAE: the images of the blackbox attack.

docs/method.md sections 2 and 3. The reference runs k-diffusion's `sample_heun`
with ONE Karras step, i.e. sigmas [sigma_max, 0]: the Heun step to sigma = 0 is
an Euler step, which lands exactly on the denoised latent. With z the start noise
(x_T = sigma_max * z) and t = T - 1 (999 for SD):

  x_in   = sqrt(1 - abar[t]) * z                     # c_in * x_T
  e_cfg  = e_u + w * (e_c - e_u)                      # eps (v converted)
  x0_hat = sigma_max * z - sigma_max * e_cfg          # the denoised latent
  image  = clip(vae.decode(x0_hat / scaling) / 2 + 0.5, 0, 1)

As in the whitebox scan, e_u depends only on z, so it is computed once per seed
(`whitebox.make_uncond_fn`) and each prompt costs one UNet forward per seed.

Everything here is pure (no flags, no I/O); `blackbox.py` binds and jits it.

API (also used by the multi-step samplers and the testbed evaluation):
- `decode_images(vae_decode, vae_params, latents, scaling_factor, dtype)`: the one
  decode from diffusion latents to images in [0, 1].
- `onestep_latents(noise, e_u, e_c, guidance_scale, sigma)`: the x0_hat above.
- `make_onestep_fn(text, unet, vae_decode, schedule, guidance_scale,
  scaling_factor, t)` -> sample(text_params, unet_params, vae_params, input_ids
  [B, 77], noise [S, h, w, c], e_u [S, h, w, c]) -> images [B, S, H, W, 3].
- `to_uint8(images)`: the reference's rounding to 8 bits (through PIL).
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from memjax.method import whitebox
from memjax.method.schedule import Schedule

def decode_images(vae_decode: Callable, vae_params, latents: jax.Array,
                  scaling_factor: float, dtype=jnp.float32) -> jax.Array:
  """Diffusion latents -> images in [0, 1], as diffusers' `decode_latents`.

  Args:
    vae_decode: f(vae_params, z) -> [N, H, W, 3] in [-1, 1]
      (`StableDiffusion.vae_decode`).
    latents: [N, h, w, c] diffusion latents (the VAE's mean times scaling_factor).
    dtype: the VAE's compute dtype (its input is cast to it).
  Returns:
    [N, H, W, 3] float32 in [0, 1]: clip(x / 2 + 0.5, 0, 1).
  """
  x = vae_decode(vae_params, (latents / scaling_factor).astype(dtype)).astype(jnp.float32)
  return jnp.clip(x / 2 + 0.5, 0.0, 1.0)


def onestep_latents(noise: jax.Array, e_u: jax.Array, e_c: jax.Array,
                    guidance_scale: float, sigma: float) -> jax.Array:
  """x0_hat = sigma z - sigma e_cfg (k-diffusion's denoised latent at sigma_max).

  Args:
    noise: [h, w, c] the start noise z of one seed.
    e_u: [h, w, c] unconditional eps; e_c: [B, h, w, c] conditional eps.
  Returns:
    [B, h, w, c] float32.
  """
  e_cfg = e_u[None] + guidance_scale * (e_c - e_u[None])
  return sigma * noise[None].astype(jnp.float32) - sigma * e_cfg


def make_onestep_fn(text: Callable, unet: Callable, vae_decode: Callable,
                    schedule: Schedule, guidance_scale: float, scaling_factor: float,
                    t: int) -> Callable:
  """Returns sample(text_params, unet_params, vae_params, input_ids, noise, e_u).

  Args (of the returned function):
    input_ids: [B, 77] int32 token ids of the prompts.
    noise: [S, h, w, c] float32 start noise z, one per seed.
    e_u: [S, h, w, c] float32 unconditional eps (`whitebox.make_uncond_fn`, same t).
  Returns:
    [B, S, H, W, 3] float32 images in [0, 1].
  """
  c = whitebox.timestep_constants(schedule, t)

  def sample(text_params, unet_params, vae_params, input_ids, noise, e_u):
    ctx = text(text_params, input_ids)
    images = []
    for s in range(noise.shape[0]):  # few seeds: unrolled, one UNet + VAE batch each
      x_in = jnp.broadcast_to((c["sqrt_one_minus_abar"] * noise[s]).astype(ctx.dtype),
                              (input_ids.shape[0],) + noise.shape[1:])
      e_c = whitebox.model_eps(unet, unet_params, x_in, t, ctx, schedule)
      x0 = onestep_latents(noise[s], e_u[s], e_c, guidance_scale, c["sigma"])
      images.append(decode_images(vae_decode, vae_params, x0, scaling_factor, ctx.dtype))
    return jnp.stack(images, axis=1)

  return sample


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[..., 3] float in [0, 1] -> uint8, `round(x * 255)` as diffusers' numpy_to_pil
  (the reference's pipeline output, which it then resizes with PIL)."""
  x = np.asarray(images, np.float32)
  return np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def to_uint8_jax(images: jax.Array) -> jax.Array:
  """`to_uint8` inside jit (jnp.round rounds half to even, as numpy does)."""
  x = jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255
  return jnp.round(x).astype(jnp.uint8)
