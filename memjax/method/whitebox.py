"""The whitebox score: denoising confidence (DCS) from ONE denoising step.

docs/method.md section 2. With z the fixed start noise and t = T - 1 (999):

  x_in   = sqrt(1 - abar[t]) * z                 # k-diffusion c_in * sigma_max * z
  e_u    = unet(x_in, t, text(""))                # eps (v converted to eps)
  e_c    = unet(x_in, t, text(prompt))
  e_cfg  = e_u + w * (e_c - e_u)
  dcs    = sigma_max**2 * mean(e_cfg**2)          # = mean((sigma_max z - x0_hat)**2)

e_u depends only on z, t and the empty prompt, none of which varies between
prompts, so it is computed once per seed (`uncond_eps`) and broadcast: each prompt
then costs one text-encoder pass and ONE UNet forward instead of the reference's
CFG pair, with the same numbers.

Everything here is pure: no flags, no I/O. `scan.py` binds and jits it.
"""
from typing import Callable, Dict

import jax
import jax.numpy as jnp

from memjax.method.schedule import Schedule


def timestep_constants(schedule: Schedule, t: int) -> Dict[str, float]:
  """sigma, sqrt(abar), sqrt(1 - abar) at timestep t, as Python floats."""
  abar = float(schedule.alphas_cumprod[t])
  return {"sigma": schedule.sigma(t), "sqrt_abar": abar ** 0.5,
          "sqrt_one_minus_abar": (1.0 - abar) ** 0.5}


def model_eps(unet: Callable, unet_params, x_in: jax.Array, t: int,
              context: jax.Array, schedule: Schedule) -> jax.Array:
  """The UNet's noise prediction at t as float32, v-prediction converted to eps.

  Args:
    unet: (params, x, t, context) -> the raw output (`StableDiffusion.unet_out`).
    x_in: [B, h, w, c] the UNet input (DDPM scale).
    context: [B, 77, D] text embeddings.
  Returns:
    [B, h, w, c] float32 eps.
  """
  out = unet(unet_params, x_in, jnp.full((x_in.shape[0],), t, jnp.int32),
             context).astype(jnp.float32)
  if schedule.prediction_type == "v_prediction":
    c = timestep_constants(schedule, t)
    # eps = sqrt(abar) v + sqrt(1 - abar) x_t; CFG commutes with this affine map.
    out = c["sqrt_abar"] * out + c["sqrt_one_minus_abar"] * x_in.astype(jnp.float32)
  return out


def dcs_statistics(e_u: jax.Array, e_c: jax.Array, guidance_scale: float,
                   sigma: float) -> Dict[str, jax.Array]:
  """The DCS and its free by-products for one seed.

  Args:
    e_u: [h, w, c] float32 unconditional eps (shared by every prompt).
    e_c: [B, h, w, c] float32 conditional eps.
  Returns:
    dict of [B] float32: `dcs`, `wen` = ||e_c - e_u||, `uncond_norm` = ||e_u||,
    `align` = cos(e_u, e_c - e_u).
  """
  d = e_c - e_u[None]
  e_cfg = e_u[None] + guidance_scale * d
  axes = (1, 2, 3)
  dcs = (sigma ** 2) * jnp.mean(e_cfg ** 2, axis=axes)
  d_norm = jnp.sqrt(jnp.sum(d ** 2, axis=axes))
  u_norm = jnp.sqrt(jnp.sum(e_u ** 2))
  align = jnp.sum(e_u[None] * d, axis=axes) / jnp.maximum(u_norm * d_norm, 1e-30)
  return {"dcs": dcs, "wen": d_norm, "uncond_norm": jnp.broadcast_to(u_norm, dcs.shape),
          "align": align}


def make_uncond_fn(text: Callable, unet: Callable, schedule: Schedule, t: int) -> Callable:
  """Returns f(text_params, unet_params, empty_ids [1, 77], noise [S, h, w, c]) -> e_u [S, h, w, c]."""
  scale = timestep_constants(schedule, t)["sqrt_one_minus_abar"]

  def uncond(text_params, unet_params, empty_ids, noise):
    ctx = text(text_params, empty_ids)
    x_in = (scale * noise).astype(ctx.dtype)
    ctx = jnp.broadcast_to(ctx, (noise.shape[0],) + ctx.shape[1:])
    return model_eps(unet, unet_params, x_in, t, ctx, schedule)

  return uncond


def make_score_fn(text: Callable, unet: Callable, schedule: Schedule,
                  guidance_scale: float, t: int) -> Callable:
  """Returns score(text_params, unet_params, input_ids, noise, e_u) -> dict.

  Args (of the returned function):
    input_ids: [B, 77] int32 token ids of the prompts.
    noise: [S, h, w, c] float32 start noise z, one per seed.
    e_u: [S, h, w, c] float32 unconditional eps (`make_uncond_fn`).
  Returns:
    dict of [B, S] float32 arrays: dcs, wen, uncond_norm, align.
  """
  from_context = make_context_score_fn(unet, schedule, guidance_scale, t)

  def score(text_params, unet_params, input_ids, noise, e_u):
    return from_context(unet_params, text(text_params, input_ids), noise, e_u)

  return score


def make_context_score_fn(unet: Callable, schedule: Schedule, guidance_scale: float,
                          t: int) -> Callable:
  """`make_score_fn` from the prompts' text embeddings: score(unet_params, ctx
  [B, 77, D], noise, e_u), for a step that shares them with other scores."""
  c = timestep_constants(schedule, t)

  def score(unet_params, ctx, noise, e_u):
    per_seed = []
    for s in range(noise.shape[0]):  # few seeds: unrolled, one UNet batch each
      x_in = jnp.broadcast_to((c["sqrt_one_minus_abar"] * noise[s]).astype(ctx.dtype),
                              (ctx.shape[0],) + noise.shape[1:])
      e_c = model_eps(unet, unet_params, x_in, t, ctx, schedule)
      per_seed.append(dcs_statistics(e_u[s], e_c, guidance_scale, c["sigma"]))
    return {k: jnp.stack([p[k] for p in per_seed], axis=1) for k in per_seed[0]}

  return score
